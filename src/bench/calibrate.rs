//! 校准工作负载：批量矩阵乘法 `[b, n, n] x [b, n, n]`，走完整的测量与报告链路，
//! 结果与主机端 f64 参考实现比对（真实的等价性检查），并测量监控器自身的开销。

use std::time::Instant;

use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::RunOutput;
use crate::backend::BackendContext;
use crate::config::CalibrateScenario;
use crate::monitor::{MonitorConfig, PerformanceMonitor};
use crate::report::{AnalyticMemory, Comparison, Criterion, Equivalence, VariantReport};

/// Host reference: batched matmul in f64.
pub fn host_matmul(a: &[f32], b: &[f32], batch: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0f64; batch * n * n];
    for bi in 0..batch {
        let (a, b) = (&a[bi * n * n..], &b[bi * n * n..]);
        let c = &mut c[bi * n * n..(bi + 1) * n * n];
        for i in 0..n {
            for k in 0..n {
                let aik = a[i * n + k] as f64;
                let brow = &b[k * n..(k + 1) * n];
                let crow = &mut c[i * n..(i + 1) * n];
                for (cj, bkj) in crow.iter_mut().zip(brow) {
                    *cj += aik * *bkj as f64;
                }
            }
        }
    }
    c
}

/// Max |x - ref| and that divided by max |ref|.
pub fn errors(x: &[f32], reference: &[f64]) -> (f64, f64) {
    let max_abs = x
        .iter()
        .zip(reference)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(
            0.0f64,
            |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        );
    let scale = reference
        .iter()
        .fold(0.0f64, |m, r| m.max(r.abs()))
        .max(1e-30);
    (max_abs, max_abs / scale)
}

/// Runs the calibration scenario on backend `B`.
pub fn run<B: Backend>(
    s: &CalibrateScenario,
    ctx: &BackendContext<B>,
    monitor_cfg: MonitorConfig,
) -> anyhow::Result<RunOutput> {
    let (batch, n) = (s.workload.batch, s.workload.size);
    let dev = &ctx.device;
    let a_host = crate::rng::uniform(batch * n * n, 1);
    let b_host = crate::rng::uniform(batch * n * n, 2);
    let a = Tensor::<B, 3>::from_data(TensorData::new(a_host.clone(), [batch, n, n]), dev);
    let b = Tensor::<B, 3>::from_data(TensorData::new(b_host.clone(), [batch, n, n]), dev);

    let mut monitor =
        PerformanceMonitor::for_backend::<B>(monitor_cfg.clone(), dev, ctx.pool.clone());
    let m = monitor.measure("matmul", |probe| {
        let c = a.clone().matmul(b.clone());
        probe.checkpoint("matmul");
        Ok(c)
    });

    // the same work without the monitor: bare clock, one sync per run (its overhead figure)
    let mut bare = Vec::new();
    for i in 0..(monitor_cfg.warmup + monitor_cfg.repetitions) {
        let _ = B::sync(dev);
        let t = Instant::now();
        let c = a.clone().matmul(b.clone());
        let _ = B::sync(dev);
        drop(c);
        if i >= monitor_cfg.warmup {
            bare.push(t.elapsed().as_secs_f64());
        }
    }
    let bare = crate::monitor::Timings::from_samples(bare, vec![]);

    let mut v = VariantReport::from_measurement(&m);
    let elem = std::mem::size_of::<f32>() as u64;
    v.memory.analytic = Some(AnalyticMemory {
        weights_bytes: 2 * (batch * n * n) as u64 * elem,
        kv_cache_bytes: 0,
        activations_bytes: Some((batch * n * n) as u64 * elem),
    });
    let mut rel_error = None;
    if let Some(out) = m.output {
        let got: Vec<f32> = out
            .into_data()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("reading the result back: {e:?}"))?;
        let reference = host_matmul(&a_host, &b_host, batch, n);
        let (abs, rel) = errors(&got, &reference);
        let finite = got.iter().all(|x| x.is_finite());
        v.equivalence = Equivalence {
            checked: true,
            reference: Some("host f64 batched matmul".into()),
            max_abs_diff: Some(abs),
            tolerance: Some(s.thresholds.max_rel_error),
            passed: Some(finite && rel <= s.thresholds.max_rel_error),
        };
        if !finite {
            v.fail("non-finite values (NaN/inf) in the output");
        } else if rel > s.thresholds.max_rel_error {
            v.fail(format!(
                "result differs from the host reference: relative error {rel:.3e} > {:.1e}",
                s.thresholds.max_rel_error
            ));
        }
        rel_error = Some(rel);
    }
    let flops = 2.0 * (batch * n * n * n) as f64;
    let median = v.timings.as_ref().map(|t| t.median_s);
    v.metrics
        .insert("gflops".into(), median.map(|t| flops / t / 1e9));
    v.metrics.insert(
        "unmonitored_median_s".into(),
        bare.as_ref().map(|t| t.median_s),
    );
    v.metrics.insert(
        "monitor_overhead_pct".into(),
        match (median, bare.as_ref()) {
            (Some(m), Some(b)) if b.median_s > 0.0 => Some((m - b.median_s) / b.median_s * 100.0),
            _ => None,
        },
    );
    // the roofline limits of this machine/device with this backend (what `bench mla` sets its
    // speeds against): streaming read bandwidth and large-GEMM throughput
    let limits = super::roofline::measure(ctx);
    v.metrics
        .insert("read_gb_per_s".into(), limits.read_gb_per_s);
    v.metrics
        .insert("gemm_gflop_per_s".into(), limits.gemm_gflop_per_s);
    let criteria = vec![Criterion::evaluate(
        &s.id,
        "max_rel_error_vs_host_f64",
        Comparison::AtMost,
        s.thresholds.max_rel_error,
        rel_error,
        format!("batched matmul [{batch}, {n}, {n}] vs a host f64 reference"),
    )];
    Ok(RunOutput {
        variants: vec![v],
        criteria,
        notes: vec![
            format!(
                "calibration workload: {batch} x ({n} x {n}) @ ({n} x {n}), f32, {} warm-up + {} timed runs",
                monitor_cfg.warmup, monitor_cfg.repetitions
            ),
            limits.note(),
        ],
        memory_series: monitor.series().to_vec(),
        series: Default::default(),
        active_fraction: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{select, BackendChoice};
    use burn::backend::Flex;

    #[test]
    fn host_reference_is_right_on_a_hand_example() {
        // [[1,2],[3,4]] @ [[5,6],[7,8]] = [[19,22],[43,50]]
        let c = host_matmul(&[1., 2., 3., 4.], &[5., 6., 7., 8.], 1, 2);
        assert_eq!(c, vec![19., 22., 43., 50.]);
        let (abs, rel) = errors(&[19., 22., 43., 51.], &c);
        assert_eq!(abs, 1.0);
        assert!((rel - 1.0 / 50.0).abs() < 1e-12);
        let (abs, _) = errors(&[f32::NAN, 22., 43., 50.], &c);
        assert!(abs.is_infinite());
    }

    #[test]
    fn calibration_on_flex_passes_and_measures() {
        let s = match crate::config::Scenario::builtin(crate::config::ScenarioKind::Calibrate) {
            crate::config::Scenario::Calibrate(mut c) => {
                c.workload.size = 32;
                c.workload.batch = 2;
                c
            }
            _ => unreachable!(),
        };
        let ctx = BackendContext::<Flex> {
            device: Default::default(),
            selected: select(BackendChoice::Flex).unwrap(),
            pool: None,
        };
        let cfg = MonitorConfig {
            warmup: 1,
            repetitions: 3,
            ..Default::default()
        };
        let out = run(&s, &ctx, cfg).unwrap();
        let v = &out.variants[0];
        assert_eq!(v.timings.as_ref().unwrap().samples_s.len(), 3);
        assert_eq!(v.equivalence.passed, Some(true));
        assert!(out.criteria[0].passed, "{:?}", out.criteria);
        assert!(v.metrics["gflops"].unwrap() > 0.0);
        assert_eq!(
            v.memory.measured.device_peak_bytes, None,
            "flex has no device pool"
        );
    }
}
