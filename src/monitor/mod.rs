//! 性能监控（`PerformanceMonitor`）：计时统计与三种内存来源的测量。
//!
//! 用法：创建监控器（它记下 NVML 基线），把工作负载写成闭包交给 [`PerformanceMonitor::measure`]
//! 或 [`PerformanceMonitor::measure_interleaved`]。闭包收到一个 [`Probe`]，可在每层/每步调用
//! [`Probe::checkpoint`]：先同步设备，再读取设备内存池与主机分配计数，峰值逐点保留。
//!
//! 三种内存来源分别报告，测不到就是 `None`（JSON 中为 `null`），绝不写 0：
//! 1. 主机：计数全局分配器（CPU 后端 flex 下精确）；
//! 2. 设备内存池：CubeCL `memory_usage()`（wgpu/CUDA），只在同步点采样；
//! 3. NVML：后台线程约 10 ms 采样一次，扣除创建监控器时的基线（没有 NVIDIA 驱动时为 `None`）。

pub mod alloc;
pub mod device;
pub mod nvml;
pub mod progress;
pub mod rss;
pub mod stats;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use device::{PoolProbe, PoolUsage};
pub use stats::{TimingWarning, Timings};

/// 内存时间序列中的一个点。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemorySample {
    /// 自监控器创建起的秒数。
    pub t_s: f64,
    /// 变体名。
    pub variant: String,
    /// 来源：`host`、`device_in_use`、`device_reserved`、`nvml`。
    pub source: String,
    /// 字节数。
    pub bytes: u64,
    /// 采样点标签（checkpoint 名称或 `run_end`）。
    pub label: String,
}

/// 一个变体测得的内存峰值（字节）；`None` = 未测量（不是 0）。
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MeasuredMemory {
    /// 设备内存池使用峰值（wgpu/CUDA）。
    pub device_peak_bytes: Option<u64>,
    /// 设备内存池保留峰值。
    pub device_reserved_peak_bytes: Option<u64>,
    /// 测量开始前的设备内存池使用量（例如已加载的权重）。
    pub device_baseline_bytes: Option<u64>,
    /// NVML：设备已用显存峰值减去基线。
    pub nvml_peak_bytes: Option<u64>,
    /// NVML：本进程显存峰值。
    pub nvml_process_peak_bytes: Option<u64>,
    /// 主机堆峰值（计数分配器）。
    pub host_peak_bytes: Option<u64>,
    /// 测量开始前的主机堆大小（例如已加载的权重）。
    pub host_baseline_bytes: Option<u64>,
}

/// 监控器设置。
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// 预热次数（不计入统计）。
    pub warmup: usize,
    /// 重复测量次数。
    pub repetitions: usize,
    /// NVML 采样间隔。
    pub nvml_interval: Duration,
    /// 是否显示进度条（stderr；非终端时自动隐藏）。
    pub progress: bool,
}

impl MonitorConfig {
    /// 相同设置但不做预热（供按自己的形状预热的运行器使用）。
    pub fn without_warmup(&self) -> MonitorConfig {
        MonitorConfig {
            warmup: 0,
            ..self.clone()
        }
    }
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            warmup: 1,
            repetitions: 5,
            nvml_interval: Duration::from_millis(10),
            progress: false,
        }
    }
}

/// 一个变体的测量结果。
#[derive(Debug, Clone)]
pub struct Measurement<T> {
    /// 变体名。
    pub name: String,
    /// 计时统计（失败时为 None）。
    pub timings: Option<Timings>,
    /// 内存峰值。
    pub memory: MeasuredMemory,
    /// 警告（带补救办法）。
    pub warnings: Vec<TimingWarning>,
    /// 最后一次运行的输出（用于等价性检查）。
    pub output: Option<T>,
    /// 失败信息（错误、panic）；有值时变体记为失败。
    pub error: Option<String>,
}

/// 工作负载在运行中可调用的探针。
pub struct Probe<'a> {
    state: &'a mut VariantState,
    shared: &'a mut Shared,
    variant: &'a str,
}

impl Probe<'_> {
    /// 同步点：同步设备，然后采样设备内存池与主机分配计数，更新峰值并记入时间序列。
    pub fn checkpoint(&mut self, label: &str) {
        (self.shared.sync)();
        self.shared.sample(self.state, self.variant, label);
    }
}

struct Shared {
    sync: Arc<dyn Fn() + Send + Sync>,
    pool: Option<PoolProbe>,
    t0: Instant,
    series: Vec<MemorySample>,
}

impl Shared {
    fn sample(&mut self, st: &mut VariantState, variant: &str, label: &str) {
        let t = self.t0.elapsed().as_secs_f64();
        let mut push = |source: &str, bytes: u64| {
            self.series.push(MemorySample {
                t_s: t,
                variant: variant.to_string(),
                source: source.into(),
                bytes,
                label: label.into(),
            })
        };
        if let Some(p) = self.pool.as_ref().and_then(|p| p()) {
            st.mem.device_peak_bytes = Some(st.mem.device_peak_bytes.unwrap_or(0).max(p.in_use));
            st.mem.device_reserved_peak_bytes = Some(
                st.mem
                    .device_reserved_peak_bytes
                    .unwrap_or(0)
                    .max(p.reserved),
            );
            push("device_in_use", p.in_use);
            push("device_reserved", p.reserved);
        }
        if let Some(h) = alloc::current() {
            push("host", h);
        }
        if let Some(peak) = alloc::peak() {
            st.mem.host_peak_bytes = Some(st.mem.host_peak_bytes.unwrap_or(0).max(peak));
        }
    }
}

#[derive(Default)]
struct VariantState {
    samples: Vec<f64>,
    warmup: Vec<f64>,
    mem: MeasuredMemory,
    error: Option<String>,
}

/// 性能监控器：计时（预热、重复、设备同步）与内存测量（主机、设备内存池、NVML）。
pub struct PerformanceMonitor {
    cfg: MonitorConfig,
    shared: Shared,
    nvml_baseline: Option<u64>,
}

impl PerformanceMonitor {
    /// 新建监控器。`sync` 同步设备（如 `B::sync(&device)`）；`pool` 读取设备内存池（没有则 None）。
    /// 此时读取 NVML 基线。
    pub fn new(
        cfg: MonitorConfig,
        sync: impl Fn() + Send + Sync + 'static,
        pool: Option<PoolProbe>,
    ) -> PerformanceMonitor {
        PerformanceMonitor {
            cfg,
            shared: Shared {
                sync: Arc::new(sync),
                pool,
                t0: Instant::now(),
                series: Vec::new(),
            },
            nvml_baseline: nvml::baseline(),
        }
    }

    /// 为 Burn 后端 `B` 的设备新建监控器（同步用 `B::sync`）。
    pub fn for_backend<B: burn::tensor::backend::Backend>(
        cfg: MonitorConfig,
        device: &B::Device,
        pool: Option<PoolProbe>,
    ) -> PerformanceMonitor {
        let device = device.clone();
        PerformanceMonitor::new(
            cfg,
            move || {
                let _ = B::sync(&device);
            },
            pool,
        )
    }

    /// 设置。
    pub fn config(&self) -> &MonitorConfig {
        &self.cfg
    }

    /// 内存时间序列（所有变体）。
    pub fn series(&self) -> &[MemorySample] {
        &self.shared.series
    }

    /// 测量一个变体：预热 `warmup` 次，再计时 `repetitions` 次。
    pub fn measure<T>(
        &mut self,
        name: &str,
        f: impl FnMut(&mut Probe) -> anyhow::Result<T>,
    ) -> Measurement<T> {
        let mut fs: Vec<Workload<'_, T>> = vec![Box::new(f)];
        self.measure_interleaved(&[name], &mut fs).remove(0)
    }

    /// 交替测量多个变体（每轮依次运行每个变体一次），以抵消机器状态的漂移。
    /// 一个变体失败（错误或 panic）不会影响其他变体。
    ///
    /// # Panics
    /// `names` 与 `workloads` 的长度不同时 panic。
    pub fn measure_interleaved<T>(
        &mut self,
        names: &[&str],
        workloads: &mut [Workload<'_, T>],
    ) -> Vec<Measurement<T>> {
        assert_eq!(names.len(), workloads.len(), "one name per workload");
        let mut states: Vec<VariantState> = names.iter().map(|_| VariantState::default()).collect();
        let mut outputs: Vec<Option<T>> = names.iter().map(|_| None).collect();
        let mut first_run: Vec<Option<f64>> = vec![None; names.len()];
        let total = (self.cfg.warmup + self.cfg.repetitions) * names.len();
        let bar = progress::bar(self.cfg.progress, total as u64, "measuring");

        // 每个变体的基线，在该变体任何一次运行之前读取
        (self.shared.sync)();
        let host_base = alloc::current();
        let pool_base = self
            .shared
            .pool
            .as_ref()
            .and_then(|p| p())
            .map(|p| p.in_use);
        for st in states.iter_mut() {
            st.mem.host_baseline_bytes = host_base;
            st.mem.device_baseline_bytes = pool_base;
        }
        let nvml_sampler = self
            .nvml_baseline
            .and_then(|b| nvml::NvmlSampler::start(self.cfg.nvml_interval, b));

        for round in 0..(self.cfg.warmup + self.cfg.repetitions) {
            let warm = round < self.cfg.warmup;
            for (i, work) in workloads.iter_mut().enumerate() {
                let st = &mut states[i];
                if st.error.is_some() {
                    bar.inc(1);
                    continue;
                }
                bar.set_message(format!(
                    "{} {}",
                    names[i],
                    if warm { "(warm-up)" } else { "" }
                ));
                alloc::reset_peak();
                (self.shared.sync)();
                let start = Instant::now();
                let result = {
                    let mut probe = Probe {
                        state: st,
                        shared: &mut self.shared,
                        variant: names[i],
                    };
                    catch_unwind(AssertUnwindSafe(|| work(&mut probe)))
                };
                (self.shared.sync)();
                let elapsed = start.elapsed().as_secs_f64();
                progress::trace(format!(
                    "{}: {} run {}/{} took {elapsed:.3} s",
                    names[i],
                    if warm { "warm-up" } else { "timed" },
                    round + 1,
                    self.cfg.warmup + self.cfg.repetitions
                ));
                self.shared.sample(st, names[i], "run_end");
                match result {
                    Ok(Ok(out)) => {
                        first_run[i].get_or_insert(elapsed);
                        if warm {
                            st.warmup.push(elapsed);
                        } else {
                            st.samples.push(elapsed);
                        }
                        outputs[i] = Some(out);
                    }
                    Ok(Err(e)) => st.error = Some(format!("{e:#}")),
                    Err(panic) => st.error = Some(format!("panicked: {}", panic_text(&panic))),
                }
                bar.inc(1);
            }
        }
        bar.finish_and_clear();

        let nvml_window = nvml_sampler.map(|s| s.stop());
        if let Some(w) = &nvml_window {
            let t_base = self.shared.t0.elapsed().as_secs_f64()
                - w.samples.last().map(|s| s.0).unwrap_or(0.0);
            for (t, b) in &w.samples {
                self.shared.series.push(MemorySample {
                    t_s: t_base + t,
                    variant: if names.len() == 1 {
                        names[0].into()
                    } else {
                        "*".into()
                    },
                    source: "nvml".into(),
                    bytes: *b,
                    label: String::new(),
                });
            }
        }

        states
            .into_iter()
            .zip(outputs)
            .zip(first_run)
            .zip(names)
            .map(|(((st, output), first), name)| {
                let mut mem = st.mem;
                if let Some(w) = &nvml_window {
                    // 交替测量的变体共用一个 NVML 采样窗口：该数值涵盖所有变体
                    mem.nvml_peak_bytes = Some(w.device_peak_over_baseline);
                    mem.nvml_process_peak_bytes = w.process_peak;
                }
                let timings = if st.error.is_none() {
                    Timings::from_samples(st.samples, st.warmup)
                } else {
                    None
                };
                let warnings = timings
                    .as_ref()
                    .map(|t| stats::warnings(t, first))
                    .unwrap_or_default();
                Measurement {
                    name: name.to_string(),
                    timings,
                    memory: mem,
                    warnings,
                    output,
                    error: st.error,
                }
            })
            .collect()
    }
}

/// 一个被测工作负载。
pub type Workload<'a, T> = Box<dyn FnMut(&mut Probe) -> anyhow::Result<T> + 'a>;

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cfg(warmup: usize, reps: usize) -> MonitorConfig {
        MonitorConfig {
            warmup,
            repetitions: reps,
            ..Default::default()
        }
    }

    #[test]
    fn counts_runs_and_syncs_around_each() {
        let syncs = Arc::new(AtomicUsize::new(0));
        let s2 = syncs.clone();
        let mut m = PerformanceMonitor::new(
            cfg(2, 3),
            move || {
                s2.fetch_add(1, Ordering::SeqCst);
            },
            None,
        );
        let mut calls = 0;
        let r = m.measure("v", |p| {
            calls += 1;
            p.checkpoint("mid");
            Ok(calls)
        });
        assert_eq!(calls, 5);
        let t = r.timings.unwrap();
        assert_eq!(t.samples_s.len(), 3);
        assert_eq!(t.warmup_s.len(), 2);
        assert_eq!(r.output, Some(5));
        // 1 baseline sync + per run: before, checkpoint, after
        assert_eq!(syncs.load(Ordering::SeqCst), 1 + 5 * 3);
        assert!(r.error.is_none());
        // no pool probe, no counting allocator in unit tests: these stay unknown, not 0
        assert_eq!(r.memory.device_peak_bytes, None);
        assert_eq!(r.memory.host_peak_bytes, None);
    }

    #[test]
    fn timing_sees_real_time() {
        let mut m = PerformanceMonitor::new(cfg(0, 2), || {}, None);
        let r = m.measure("sleep", |_| {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        });
        let t = r.timings.unwrap();
        assert!(t.min_s >= 0.019, "{t:?}");
    }

    #[test]
    fn failed_and_panicking_variants_do_not_stop_the_others() {
        let mut m = PerformanceMonitor::new(cfg(1, 2), || {}, None);
        let mut ok_runs = 0;
        let mut fs: Vec<Workload<'_, u32>> = vec![
            Box::new(|_| anyhow::bail!("out of memory")),
            Box::new(|_| panic!("boom")),
            Box::new(|_| {
                ok_runs += 1;
                Ok(7)
            }),
        ];
        let r = m.measure_interleaved(&["err", "panic", "ok"], &mut fs);
        drop(fs);
        assert_eq!(r[0].error.as_deref(), Some("out of memory"));
        assert!(r[0].timings.is_none());
        assert!(r[1].error.as_deref().unwrap().contains("boom"));
        assert!(r[2].error.is_none());
        assert_eq!(r[2].timings.as_ref().unwrap().samples_s.len(), 2);
        assert_eq!(ok_runs, 3);
    }

    #[test]
    fn pool_probe_peak_is_kept_across_checkpoints() {
        let level = Arc::new(AtomicUsize::new(100));
        let l2 = level.clone();
        let probe: PoolProbe = Arc::new(move || {
            let v = l2.load(Ordering::SeqCst) as u64;
            Some(PoolUsage {
                in_use: v,
                reserved: v * 2,
            })
        });
        let mut m = PerformanceMonitor::new(cfg(0, 1), || {}, Some(probe));
        let r = m.measure("v", |p| {
            level.store(500, Ordering::SeqCst);
            p.checkpoint("up");
            level.store(200, Ordering::SeqCst);
            p.checkpoint("down");
            Ok(())
        });
        assert_eq!(r.memory.device_baseline_bytes, Some(100));
        assert_eq!(r.memory.device_peak_bytes, Some(500));
        assert_eq!(r.memory.device_reserved_peak_bytes, Some(1000));
        let in_use: Vec<u64> = m
            .series()
            .iter()
            .filter(|s| s.source == "device_in_use")
            .map(|s| s.bytes)
            .collect();
        assert_eq!(in_use, vec![500, 200, 200]);
    }
}
