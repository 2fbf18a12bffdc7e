//! 硬件发现：后端种类、编译进来的特性、本机可用性探测、机器信息（[`machine`]），以及把泛型任务
//! 派发到具体后端的接口。
//!
//! Concrete backend types are named in exactly one place, the binary's dispatch point
//! (`src/cli/dispatch.rs`), so that the heavy generic model code is instantiated once per
//! backend. The library only describes backends and runs [`BackendJob`]s generically.

use serde::{Deserialize, Serialize};

use crate::error::DsoptError;

pub mod machine;

/// 后端种类。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// CPU：burn-flex（gemm 矩阵乘、零拷贝视图、写时复制缓冲、原生 f16/bf16、rayon 多线程）。总是编译进来。
    Flex,
    /// wgpu（Vulkan/Metal/DX12）；无 GPU 的 Linux 上经 Mesa lavapipe 在 CPU 上运行。
    Wgpu,
    /// CUDA（需要 NVIDIA 驱动与 NVRTC）。
    Cuda,
}

impl BackendKind {
    /// All kinds, in the order `auto` prefers them.
    pub const ALL: [BackendKind; 3] = [BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Flex];

    /// Whether this backend compiles its kernels per shape at run time (CubeCL: wgpu, CUDA).
    pub fn compiles_per_shape(self) -> bool {
        matches!(self, BackendKind::Wgpu | BackendKind::Cuda)
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }

    /// Whether this backend was compiled into this build.
    pub fn compiled(self) -> bool {
        match self {
            BackendKind::Flex => true,
            BackendKind::Wgpu => cfg!(feature = "wgpu"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The backend features compiled in for this kind (reported with every benchmark).
    pub fn features(self) -> Vec<&'static str> {
        match self {
            BackendKind::Flex => {
                // gemm picks its AVX-512 kernels at run time when the CPU has them (feature
                // x86-v4 compiles them in); report which set this machine runs
                let mut f = vec!["std", "simd", "rayon", "x86-v4"];
                f.push(if cpu_has_avx512f() {
                    "avx512f (run time)"
                } else {
                    "avx2/fma (run time)"
                });
                f
            }
            BackendKind::Wgpu | BackendKind::Cuda => {
                if !self.compiled() {
                    vec![]
                } else if cfg!(feature = "fusion") {
                    vec!["autotune", "fusion"]
                } else {
                    vec!["autotune"]
                }
            }
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--backend` choice: a kind, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum BackendChoice {
    /// CUDA if a device answers, else a wgpu hardware adapter, else flex (CPU).
    #[default]
    Auto,
    /// burn-flex on the CPU.
    Flex,
    /// wgpu (any adapter, including lavapipe's CPU adapter).
    Wgpu,
    /// CUDA.
    Cuda,
}

/// wgpu 适配器类型（与 wgpu::DeviceType 对应）。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterType {
    /// 独立显卡。
    DiscreteGpu,
    /// 集成显卡。
    IntegratedGpu,
    /// 虚拟 GPU。
    VirtualGpu,
    /// CPU 软件实现（如 Mesa lavapipe）。
    Cpu,
    /// 其他。
    Other,
}

impl AdapterType {
    /// Hardware GPUs (what `auto` accepts for wgpu).
    pub fn is_hardware(self) -> bool {
        matches!(
            self,
            AdapterType::DiscreteGpu | AdapterType::IntegratedGpu | AdapterType::VirtualGpu
        )
    }
}

/// 一个 wgpu 适配器。
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WgpuAdapter {
    /// 名称（lavapipe 显示为 `llvmpipe (...)`）。
    pub name: String,
    /// 类型。
    pub device_type: AdapterType,
    /// 图形 API（Vulkan、Metal、Dx12、Gl）。
    pub api: String,
    /// 驱动。
    pub driver: String,
}

/// 一个后端在本机的状态。
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendStatus {
    /// 后端种类。
    pub kind: BackendKind,
    /// 是否编译进来。
    pub compiled: bool,
    /// 本机是否可用。
    pub usable: bool,
    /// 不可用的原因（可用时为 null）。
    pub reason: Option<String>,
    /// 编译进来的特性（autotune、fusion、simd……）。
    pub features: Vec<String>,
    /// 可用设备的描述。
    pub devices: Vec<String>,
    /// wgpu 适配器（仅 wgpu）。
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub adapters: Vec<WgpuAdapter>,
}

/// Probes every backend kind.
pub fn probe_all() -> Vec<BackendStatus> {
    [BackendKind::Flex, BackendKind::Wgpu, BackendKind::Cuda]
        .into_iter()
        .map(probe)
        .collect()
}

/// Probes one backend: compiled in? usable here (and why not)? which devices?
pub fn probe(kind: BackendKind) -> BackendStatus {
    let features = kind.features().into_iter().map(String::from).collect();
    let mut st = BackendStatus {
        kind,
        compiled: kind.compiled(),
        usable: false,
        reason: None,
        features,
        devices: vec![],
        adapters: vec![],
    };
    if !st.compiled {
        st.reason = Some(format!(
            "not compiled in — rebuild with `cargo build --release --features {kind}`"
        ));
        return st;
    }
    match kind {
        BackendKind::Flex => {
            st.usable = true;
            let threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            st.devices = vec![format!("cpu ({threads} threads)")];
        }
        BackendKind::Wgpu => {
            let adapters = wgpu_adapters();
            if adapters.is_empty() {
                st.reason = Some(
                    "no wgpu adapter found — install a Vulkan driver (on Debian without a GPU: \
                     `apt-get install mesa-vulkan-drivers libvulkan1` for lavapipe)"
                        .into(),
                );
            } else {
                st.usable = true;
                st.devices = adapters
                    .iter()
                    .map(|a| format!("{} ({:?}, {})", a.name, a.device_type, a.api))
                    .collect();
            }
            st.adapters = adapters;
        }
        BackendKind::Cuda => match cuda_probe() {
            Ok(devices) => {
                st.usable = true;
                st.devices = devices;
            }
            Err(reason) => st.reason = Some(reason),
        },
    }
    st
}

/// Lists wgpu adapters (Vulkan/Metal/DX12/GL), without creating a device.
#[cfg(feature = "wgpu")]
pub fn wgpu_adapters() -> Vec<WgpuAdapter> {
    use std::sync::OnceLock;
    static CACHE: OnceLock<Vec<WgpuAdapter>> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
                backends: wgpu::Backends::PRIMARY,
                ..wgpu::InstanceDescriptor::new_without_display_handle()
            });
            let adapters = burn::cubecl::future::block_on(
                instance.enumerate_adapters(wgpu::Backends::PRIMARY),
            );
            adapters
                .into_iter()
                .map(|a| {
                    let info = a.get_info();
                    WgpuAdapter {
                        name: info.name.clone(),
                        device_type: match info.device_type {
                            wgpu::DeviceType::DiscreteGpu => AdapterType::DiscreteGpu,
                            wgpu::DeviceType::IntegratedGpu => AdapterType::IntegratedGpu,
                            wgpu::DeviceType::VirtualGpu => AdapterType::VirtualGpu,
                            wgpu::DeviceType::Cpu => AdapterType::Cpu,
                            wgpu::DeviceType::Other => AdapterType::Other,
                        },
                        api: format!("{:?}", info.backend),
                        driver: format!("{} {}", info.driver, info.driver_info)
                            .trim()
                            .to_string(),
                    }
                })
                .collect()
        })
        .clone()
}

/// Lists wgpu adapters (none: wgpu is not compiled in).
#[cfg(not(feature = "wgpu"))]
pub fn wgpu_adapters() -> Vec<WgpuAdapter> {
    vec![]
}

/// Probes CUDA without touching cudarc (which panics when the driver library is missing):
/// the driver library must load, and NVML (when present) names the devices.
fn cuda_probe() -> Result<Vec<String>, String> {
    // SAFETY: loading a system library; we only keep it long enough to see that it loads.
    let lib = ["libcuda.so.1", "libcuda.so", "nvcuda.dll"]
        .iter()
        .find_map(|name| unsafe { libloading::Library::new(*name) }.ok());
    if lib.is_none() {
        return Err("libcuda.so.1 not found — no NVIDIA driver on this machine".into());
    }
    let gpus = crate::backend::machine::nvml_gpus();
    if gpus.is_empty() {
        return Err("the NVIDIA driver loads but reports no GPU (NVML found none)".into());
    }
    let toolkit = ["CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .chain(std::iter::once("/usr/local/cuda".to_string()))
        .any(|p| std::path::Path::new(&p).join("include").exists());
    if !toolkit {
        return Err(
            "NVIDIA driver present but no CUDA toolkit headers (set CUDA_PATH or install the \
             toolkit under /usr/local/cuda): CubeCL compiles kernels with NVRTC at run time"
                .into(),
        );
    }
    Ok(gpus
        .iter()
        .enumerate()
        .map(|(i, g)| format!("cuda:{i} {}", g.name))
        .collect())
}

/// The backend chosen for a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelectedBackend {
    /// Kind.
    pub kind: BackendKind,
    /// For wgpu: the adapter type to ask for (hardware first, else the CPU adapter).
    pub wgpu_adapter: Option<AdapterType>,
    /// A human description of the device.
    pub device: String,
}

/// Resolves `--backend` to a usable backend, or an exit-3 error saying why not.
pub fn select(choice: BackendChoice) -> Result<SelectedBackend, DsoptError> {
    let wanted = match choice {
        BackendChoice::Flex => Some(BackendKind::Flex),
        BackendChoice::Wgpu => Some(BackendKind::Wgpu),
        BackendChoice::Cuda => Some(BackendKind::Cuda),
        BackendChoice::Auto => None,
    };
    if let Some(kind) = wanted {
        let st = probe(kind);
        if !st.usable {
            return Err(DsoptError::BackendUnavailable {
                backend: kind.to_string(),
                reason: st.reason.unwrap_or_else(|| "not usable".into()),
            });
        }
        return Ok(from_status(&st, false));
    }
    let (cuda, wgpu) = (probe(BackendKind::Cuda), probe(BackendKind::Wgpu));
    let st = match pick_auto(&cuda, &wgpu) {
        BackendKind::Cuda => cuda,
        BackendKind::Wgpu => wgpu,
        BackendKind::Flex => probe(BackendKind::Flex),
    };
    Ok(from_status(&st, true))
}

/// `--backend auto`: CUDA when usable, then wgpu when it has a *hardware* adapter (a CPU adapter
/// such as lavapipe is far slower than flex), then flex (CPU).
fn pick_auto(cuda: &BackendStatus, wgpu: &BackendStatus) -> BackendKind {
    if cuda.usable {
        BackendKind::Cuda
    } else if wgpu.usable && wgpu.adapters.iter().any(|a| a.device_type.is_hardware()) {
        BackendKind::Wgpu
    } else {
        BackendKind::Flex
    }
}

fn from_status(st: &BackendStatus, hardware_only: bool) -> SelectedBackend {
    let wgpu_adapter = (st.kind == BackendKind::Wgpu).then(|| {
        let best = st
            .adapters
            .iter()
            .map(|a| a.device_type)
            .filter(|t| t.is_hardware() || !hardware_only)
            .min_by_key(|t| match t {
                AdapterType::DiscreteGpu => 0,
                AdapterType::IntegratedGpu => 1,
                AdapterType::VirtualGpu => 2,
                AdapterType::Cpu => 3,
                AdapterType::Other => 4,
            });
        best.unwrap_or(AdapterType::Cpu)
    });
    let device = match st.kind {
        BackendKind::Wgpu => st
            .adapters
            .iter()
            .find(|a| Some(a.device_type) == wgpu_adapter)
            .map(|a| format!("{} ({:?})", a.name, a.device_type))
            .unwrap_or_else(|| "wgpu".into()),
        _ => st.devices.first().cloned().unwrap_or_default(),
    };
    SelectedBackend {
        kind: st.kind,
        wgpu_adapter,
        device,
    }
}

/// Whether this CPU has AVX-512F (gemm then runs its AVX-512 kernels; else AVX2/FMA).
pub fn cpu_has_avx512f() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
    {
        false
    }
}

/// 一个可在任意后端上运行的泛型任务。派发点为选中的后端实例化 `run::<B>`。
pub trait BackendJob {
    /// 结果类型。
    type Output;
    /// 在后端 `B` 的设备 `device` 上运行。
    fn run<B: burn::tensor::backend::Backend>(self, ctx: BackendContext<B>) -> Self::Output;
}

/// 派发点交给任务的上下文：设备、后端描述，以及设备内存池探针（wgpu/CUDA 才有）。
pub struct BackendContext<B: burn::tensor::backend::Backend> {
    /// 设备。
    pub device: B::Device,
    /// 选中的后端。
    pub selected: SelectedBackend,
    /// 设备内存池读数（CubeCL `memory_usage`）；CPU 后端（flex）为 None。
    pub pool: Option<crate::monitor::device::PoolProbe>,
}

impl<B: burn::tensor::backend::Backend> BackendContext<B> {
    /// Whether models run here pad data-dependent shapes (partial key blocks, MoE expert groups)
    /// to a few bucket sizes: on the backends that compile kernels per shape at run time (CubeCL:
    /// wgpu, CUDA); on the CPU backend exact shapes cost nothing extra. Runners pass it to
    /// [`crate::nn::DecoderConfig::with_shape_buckets`] once.
    pub fn shape_buckets(&self) -> bool {
        self.selected.kind.compiles_per_shape()
    }
}

/// The Burn float dtype of a scenario dtype.
pub fn burn_dtype(dtype: crate::config::Dtype) -> burn::tensor::DType {
    use burn::tensor::DType;
    match dtype {
        crate::config::Dtype::F32 => DType::F32,
        crate::config::Dtype::F16 => DType::F16,
        crate::config::Dtype::Bf16 => DType::BF16,
    }
}

/// 让设备上此后创建的浮点张量（参数、缓存、激活）都用 `dtype`：Burn 的设备默认类型策略。
///
/// 必须在该设备上创建任何张量之前调用；设备一旦用过就锁定它的默认类型（Burn 的规则），
/// 这时只要锁定的类型与所求相同就算成功，否则报错（退出码 3：换一个进程单独运行该场景）。
/// 设备不支持 `dtype` 时（lavapipe 上的 wgpu 有 f16 没有 bf16；flex 三种都有）报错，
/// 说明哪个后端支持。注意力的 softmax 统计量与路由分数总是在 f32 中计算（见各模块）。
pub fn use_float_dtype<B: burn::tensor::backend::Backend>(
    device: &B::Device,
    dtype: crate::config::Dtype,
) -> Result<(), DsoptError> {
    use burn::tensor::{Element, FloatDType};
    let want = burn_dtype(dtype);
    let name = B::name(device);
    if !B::supports_dtype(device, want) {
        let hint = "this device lacks it: use --backend flex (CPU: f16, bf16), f16 on wgpu \
             adapters with SHADER_F16, CUDA (f16, bf16), or set the dtype to f32";
        return Err(DsoptError::CannotRun(format!(
            "dtype {} is not supported by backend {name} on this device — {hint}",
            dtype.as_str()
        )));
    }
    let int = <B::IntElem as Element>::dtype();
    match burn::tensor::set_default_dtypes::<B>(device, want, int) {
        Ok(()) => Ok(()),
        Err(_) => {
            let have = burn::tensor::get_device_settings::<B>(device).float_dtype;
            if have == FloatDType::from(want) {
                Ok(())
            } else {
                Err(DsoptError::CannotRun(format!(
                    "dtype {}: this process already used the device in {have:?} (Burn fixes a \
                     device's default dtype at its first tensor); run scenarios of different \
                     dtypes in separate `dsopt bench` calls",
                    dtype.as_str()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests;
