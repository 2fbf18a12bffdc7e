//! Backend discovery tests: the auto choice, unavailable backends as exit-3 errors, dtypes.

use super::*;

#[test]
fn flex_is_always_usable() {
    let st = probe(BackendKind::Flex);
    assert!(st.compiled && st.usable && st.reason.is_none());
    assert!(st.features.contains(&"rayon".to_string()));
    // exactly one of the two run-time kernel sets is reported, the one this CPU has
    let avx512 = st.features.iter().filter(|f| f.contains("avx512f")).count();
    assert_eq!(avx512, usize::from(cpu_has_avx512f()));
}

#[test]
fn explicit_flex_selects_flex() {
    let s = select(BackendChoice::Flex).unwrap();
    assert_eq!(s.kind, BackendKind::Flex);
    assert!(s.wgpu_adapter.is_none());
}

#[test]
fn cuda_without_driver_is_an_exit_3_error_not_a_panic() {
    if probe(BackendKind::Cuda).usable {
        return; // a real CUDA machine: nothing to check here
    }
    let e = select(BackendChoice::Cuda).unwrap_err();
    assert_eq!(e.exit_code(), crate::error::EXIT_CANNOT_RUN);
    assert!(e.to_string().starts_with("backend cuda: "), "{e}");
}

#[test]
fn auto_never_picks_a_cpu_wgpu_adapter() {
    let status = |kind, usable, adapters: Vec<AdapterType>| BackendStatus {
        kind,
        compiled: true,
        usable,
        reason: None,
        features: Vec::new(),
        devices: Vec::new(),
        adapters: adapters
            .into_iter()
            .map(|device_type| WgpuAdapter {
                name: "test".into(),
                device_type,
                api: "Vulkan".into(),
                driver: String::new(),
            })
            .collect(),
    };
    let no_cuda = status(BackendKind::Cuda, false, vec![]);
    let cpu_only = status(BackendKind::Wgpu, true, vec![AdapterType::Cpu]);
    let gpu = status(
        BackendKind::Wgpu,
        true,
        vec![AdapterType::Cpu, AdapterType::DiscreteGpu],
    );
    assert_eq!(pick_auto(&no_cuda, &cpu_only), BackendKind::Flex);
    assert_eq!(pick_auto(&no_cuda, &gpu), BackendKind::Wgpu);
    let cuda = status(BackendKind::Cuda, true, vec![]);
    assert_eq!(pick_auto(&cuda, &gpu), BackendKind::Cuda);
    // and on this machine: whatever auto picked, a wgpu pick has a hardware adapter
    let s = select(BackendChoice::Auto).unwrap();
    if s.kind == BackendKind::Wgpu {
        assert!(s.wgpu_adapter.unwrap().is_hardware());
    }
}
