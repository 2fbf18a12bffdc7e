//! 机器信息采集：CPU、核数、内存、操作系统、GPU（NVML）以及工具版本。

use serde::{Deserialize, Serialize};

/// 报告中的工具信息。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolInfo {
    /// 名称（`dsopt`）。
    pub name: String,
    /// 版本。
    pub version: String,
    /// 构建时的 git 提交（不在 git 仓库中构建时为 null）。
    pub git_commit: Option<String>,
}

impl ToolInfo {
    /// This build's tool info.
    pub fn current() -> ToolInfo {
        let commit = env!("DSOPT_GIT_COMMIT");
        ToolInfo {
            name: "dsopt".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            git_commit: (!commit.is_empty()).then(|| commit.to_string()),
        }
    }
}

/// 一块 GPU。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GpuInfo {
    /// 名称。
    pub name: String,
    /// 驱动版本（未知为 null）。
    pub driver: Option<String>,
    /// 总显存（字节；未知为 null）。
    pub memory_bytes: Option<u64>,
    /// 已用显存（字节；未知为 null）。
    #[serde(default)]
    pub used_bytes: Option<u64>,
    /// 信息来源：`nvml` 或 `wgpu`。
    pub source: String,
}

/// 报告中的机器信息。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineInfo {
    /// CPU 型号。
    pub cpu: String,
    /// 逻辑核数。
    pub cores: usize,
    /// 物理内存（字节）。
    pub ram_bytes: u64,
    /// 操作系统。
    pub os: String,
    /// GPU 列表（NVML；没有 NVIDIA 驱动时来自 wgpu 的硬件适配器；都没有时为空）。
    pub gpus: Vec<GpuInfo>,
    /// CPU 内核使用的 SIMD 级别（`avx512`、`avx2`、`neon`、`scalar`；`DSOPT_SIMD` 可降低）。
    /// 较早的报告没有此项（null）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simd: Option<String>,
}

impl MachineInfo {
    /// Reads this machine's facts.
    pub fn capture() -> MachineInfo {
        use sysinfo::System;
        let mut sys = System::new().ok();
        if let Some(sys) = sys.as_mut() {
            sys.refresh_memory();
            sys.refresh_cpu_all();
        }
        let cpu = sys
            .as_ref()
            .and_then(|s| s.cpus().first().map(|c| c.brand().trim().to_string()))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let os = format!(
            "{} {} ({})",
            System::name().unwrap_or_else(|_| std::env::consts::OS.into()),
            System::os_version().unwrap_or_default(),
            System::kernel_version().unwrap_or_default()
        );
        let mut gpus = nvml_gpus();
        if gpus.is_empty() {
            gpus = crate::backend::wgpu_adapters()
                .into_iter()
                .filter(|a| a.device_type.is_hardware())
                .map(|a| GpuInfo {
                    name: a.name,
                    driver: Some(a.driver).filter(|d| !d.is_empty()),
                    memory_bytes: None,
                    used_bytes: None,
                    source: "wgpu".into(),
                })
                .collect();
        }
        MachineInfo {
            cpu,
            cores,
            ram_bytes: sys.as_ref().map(|s| s.total_memory()).unwrap_or(0),
            os,
            gpus,
            simd: Some(crate::kernels::Level::current().name().to_string()),
        }
    }
}

/// NVIDIA GPUs via NVML; empty when the driver (libnvidia-ml) is absent. Never panics.
pub fn nvml_gpus() -> Vec<GpuInfo> {
    let Ok(nvml) = nvml_wrapper::Nvml::init() else {
        return vec![];
    };
    let driver = nvml.sys_driver_version().ok();
    let n = nvml.device_count().unwrap_or(0);
    (0..n)
        .filter_map(|i| nvml.device_by_index(i).ok())
        .map(|d| {
            let mem = d.memory_info().ok();
            GpuInfo {
                name: d.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                driver: driver.clone(),
                memory_bytes: mem.as_ref().map(|m| m.total),
                used_bytes: mem.as_ref().map(|m| m.used),
                source: "nvml".into(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_reads_real_facts() {
        let m = MachineInfo::capture();
        assert!(m.cores >= 1);
        assert!(m.ram_bytes > 64 * 1024 * 1024, "RAM {}", m.ram_bytes);
        assert!(!m.cpu.is_empty() && !m.os.is_empty());
        for g in &m.gpus {
            assert!(!g.name.is_empty());
        }
    }

    #[test]
    fn tool_info_has_version() {
        let t = ToolInfo::current();
        assert_eq!(t.name, "dsopt");
        assert_eq!(t.version, env!("CARGO_PKG_VERSION"));
    }
}
