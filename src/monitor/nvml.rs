//! NVML 采样线程：约每 10 ms 读取设备已用显存与本进程显存，扣除基线；没有驱动时为 None。

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::Nvml;

/// One NVML reading.
#[derive(Debug, Clone, Copy)]
pub struct NvmlReading {
    /// Device memory in use (all processes), bytes.
    pub device_used: u64,
    /// This process's device memory, bytes (None when the driver does not say).
    pub process_used: Option<u64>,
}

/// Reads device 0 once. None when NVML or the device is unavailable.
pub fn read_once(nvml: &Nvml) -> Option<NvmlReading> {
    let dev = nvml.device_by_index(0).ok()?;
    let device_used = dev.memory_info().ok()?.used;
    let pid = std::process::id();
    let process_used = dev.running_compute_processes().ok().and_then(|ps| {
        ps.into_iter()
            .find(|p| p.pid == pid)
            .and_then(|p| match p.used_gpu_memory {
                UsedGpuMemory::Used(b) => Some(b),
                UsedGpuMemory::Unavailable => None,
            })
    });
    Some(NvmlReading {
        device_used,
        process_used,
    })
}

/// Result of one sampling window.
#[derive(Debug, Clone, Default)]
pub struct NvmlWindow {
    /// Peak device memory used minus the baseline (bytes).
    pub device_peak_over_baseline: u64,
    /// Peak of this process's device memory (bytes), when the driver reports it.
    pub process_peak: Option<u64>,
    /// (seconds since the window opened, device used bytes minus baseline).
    pub samples: Vec<(f64, u64)>,
}

/// A background sampler: [`NvmlSampler::start`] returns once the first reading is taken;
/// [`NvmlSampler::stop`] takes a last reading and joins the thread.
pub struct NvmlSampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<NvmlWindow>,
}

impl NvmlSampler {
    /// Starts sampling every `interval`, subtracting `baseline` (device bytes used before the
    /// work started). Returns None when NVML is not available (no NVIDIA driver).
    pub fn start(interval: Duration, baseline: u64) -> Option<NvmlSampler> {
        let nvml = Nvml::init().ok()?;
        read_once(&nvml)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut w = NvmlWindow::default();
            let mut first = true;
            loop {
                let done = flag.load(Ordering::Acquire);
                if let Some(r) = read_once(&nvml) {
                    let over = r.device_used.saturating_sub(baseline);
                    w.device_peak_over_baseline = w.device_peak_over_baseline.max(over);
                    if let Some(p) = r.process_used {
                        w.process_peak = Some(w.process_peak.unwrap_or(0).max(p));
                    }
                    w.samples.push((t0.elapsed().as_secs_f64(), over));
                }
                if first {
                    let _ = ready_tx.send(());
                    first = false;
                }
                if done {
                    break;
                }
                std::thread::sleep(interval);
            }
            w
        });
        // handshake: the workload starts only after the sampler has its first reading
        ready_rx.recv().ok()?;
        Some(NvmlSampler { stop, handle })
    }

    /// Stops and returns the window (a final reading is taken after the stop request).
    pub fn stop(self) -> NvmlWindow {
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or_default()
    }
}

/// Device memory used now on device 0 (the baseline), or None without NVML.
pub fn baseline() -> Option<u64> {
    let nvml = Nvml::init().ok()?;
    read_once(&nvml).map(|r| r.device_used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_driver_gives_none_not_zero() {
        if Nvml::init().is_ok() {
            return; // an NVIDIA machine: the absent case cannot be checked here
        }
        assert!(baseline().is_none());
        assert!(NvmlSampler::start(Duration::from_millis(10), 0).is_none());
    }
}
