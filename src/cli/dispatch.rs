//! The one dispatch point: the only place where concrete Burn backends are named.

use dsopt::backend::{BackendContext, BackendJob, BackendKind, SelectedBackend};
use dsopt::error::DsoptError;

/// Runs `job` on the selected backend.
pub fn dispatch<J: BackendJob>(
    selected: &SelectedBackend,
    job: J,
) -> Result<J::Output, DsoptError> {
    match selected.kind {
        BackendKind::Flex => Ok(job.run::<burn::backend::Flex>(BackendContext {
            device: Default::default(),
            selected: selected.clone(),
            pool: None,
        })),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            use burn::backend::wgpu::WgpuDevice;
            use dsopt::backend::AdapterType;
            let device = match selected.wgpu_adapter {
                Some(AdapterType::DiscreteGpu) => WgpuDevice::DiscreteGpu(0),
                Some(AdapterType::IntegratedGpu) => WgpuDevice::IntegratedGpu(0),
                Some(AdapterType::VirtualGpu) => WgpuDevice::VirtualGpu(0),
                Some(AdapterType::Cpu) => WgpuDevice::Cpu,
                _ => WgpuDevice::DefaultDevice,
            };
            let pool = dsopt::monitor::device::wgpu_pool_probe(device.clone());
            Ok(job.run::<burn::backend::Wgpu>(BackendContext {
                device,
                selected: selected.clone(),
                pool: Some(pool),
            }))
        }
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => {
            let device = burn::backend::cuda::CudaDevice::new(0);
            let pool = dsopt::monitor::device::cuda_pool_probe(device.clone());
            Ok(job.run::<burn::backend::Cuda>(BackendContext {
                device,
                selected: selected.clone(),
                pool: Some(pool),
            }))
        }
        #[allow(unreachable_patterns)]
        other => Err(DsoptError::BackendUnavailable {
            backend: other.to_string(),
            reason: format!(
                "not compiled in — rebuild with `cargo build --release --features {other}`"
            ),
        }),
    }
}
