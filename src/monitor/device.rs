//! 设备内存池读数：CubeCL 的 `memory_usage()`（wgpu/CUDA），在同步点采样。

use std::sync::Arc;

/// 一次内存池读数（字节）。
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    /// 正在使用的字节数（不含填充）。
    pub in_use: u64,
    /// 内存池已向驱动保留的字节数。
    pub reserved: u64,
}

/// A function that reads the device pool; made by the dispatch point for CubeCL backends.
pub type PoolProbe = Arc<dyn Fn() -> Option<PoolUsage> + Send + Sync>;

/// Pool probe for a wgpu device.
#[cfg(feature = "wgpu")]
pub fn wgpu_pool_probe(device: burn::backend::wgpu::WgpuDevice) -> PoolProbe {
    use burn::cubecl::Runtime;
    Arc::new(move || {
        let client = burn::backend::wgpu::WgpuRuntime::client(&device);
        client.memory_usage().ok().map(|u| PoolUsage {
            in_use: u.bytes_in_use,
            reserved: u.bytes_reserved,
        })
    })
}

/// Pool probe for a CUDA device.
#[cfg(feature = "cuda")]
pub fn cuda_pool_probe(device: burn::backend::cuda::CudaDevice) -> PoolProbe {
    use burn::cubecl::Runtime;
    Arc::new(move || {
        let client = burn::cubecl::cuda::CudaRuntime::client(&device);
        client.memory_usage().ok().map(|u| PoolUsage {
            in_use: u.bytes_in_use,
            reserved: u.bytes_reserved,
        })
    })
}
