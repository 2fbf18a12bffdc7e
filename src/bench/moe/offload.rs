//! SC-003b：路由专家放在主机上、设备上只留 LRU 专家缓存，在预算下做一次真实生成；与全部驻留的孪生模型
//! 比较输出，并测量孪生模型的设备峰值（“需要两倍内存的模型”是实测出来的，不是假设的）。

use super::*;

/// The three SC-003b criteria, present but not applicable (with the reason): they never pass.
pub(super) fn sc003b_not_applicable(s: &MoeScenario, why: &str) -> [Criterion; 3] {
    [
        Criterion::not_applicable(
            "SC-003b",
            "resident_twin_device_peak_over_budget",
            Comparison::AtLeast,
            s.thresholds.model_to_budget_ratio,
            why,
        ),
        Criterion::not_applicable(
            "SC-003b-peak",
            "device_peak_over_budget",
            Comparison::AtMost,
            1.0,
            why,
        ),
        Criterion::not_applicable(
            "SC-003b-eq",
            "max_abs_diff_offloaded_vs_resident",
            Comparison::AtMost,
            OFFLOAD_TOLERANCE,
            why,
        ),
    ]
}

/// Prompt tokens of SC-003b's generation (one prefill chunk before the decode steps).
pub(super) const OFFLOAD_PROMPT: usize = 8;

/// One generation, SC-003b's workload: `forward` (the model's normed hidden states for new
/// tokens, appending to its cache) over the prompt, then `steps` greedy decode steps, each
/// through the LM head and an argmax fed back on the device (no read-back). `after_step` runs
/// after the prefill and after every step (memory samples). Returns the generated ids
/// `[b, steps]` and the logits of the prefill's last position and of every step,
/// `[b, steps + 1, vocab]` (a divergence of the generated tokens shows there as a logits
/// difference at the step where the argmax differed).
pub(super) fn generate<B: Backend>(
    model: &Decoder<B>,
    prompt: &Tensor<B, 2, Int>,
    steps: usize,
    mut forward: impl FnMut(Tensor<B, 2, Int>) -> anyhow::Result<Tensor<B, 3>>,
    mut after_step: impl FnMut(),
) -> anyhow::Result<(Tensor<B, 2, Int>, Tensor<B, 3>)> {
    let [b, p] = prompt.dims();
    let h = forward(prompt.clone())?;
    let d = h.dims()[2];
    let mut logits = model.logits(h.slice([0..b, p - 1..p, 0..d]));
    after_step();
    let mut out = Vec::with_capacity(steps);
    let mut all = Vec::with_capacity(steps + 1);
    for _ in 0..steps {
        let next = logits.clone().argmax(2).reshape([b, 1]);
        out.push(next.clone());
        all.push(logits);
        logits = model.logits(forward(next)?);
        after_step();
    }
    all.push(logits);
    Ok((Tensor::cat(out, 1), Tensor::cat(all, 1)))
}

/// Max |difference| allowed between the offloaded and the resident model's outputs.
pub(super) const OFFLOAD_TOLERANCE: f64 = 1e-5;

/// SC-003b-eq: the offloaded run computes what its resident twin computes — max |difference| of
/// the logits of every step of one generation, `which` saying what was compared.
pub(super) fn sc003b_eq(diff: Option<f64>, which: &str) -> Criterion {
    Criterion::evaluate(
        "SC-003b-eq",
        "max_abs_diff_offloaded_vs_resident",
        Comparison::AtMost,
        OFFLOAD_TOLERANCE,
        diff,
        format!(
            "a generation (prefill chunk, greedy decode steps through the LM head and argmax): \
             max |difference| of the logits of every step, {which}"
        ),
    )
}

/// The figures of a prefetching policy: experts fetched ahead, how many of them were used before
/// eviction, and that as a fraction.
pub(super) fn prefetch_figures(
    prefetched: u64,
    used: u64,
    accuracy: Option<f64>,
) -> [(&'static str, Option<f64>); 3] {
    [
        ("prefetched_experts", Some(prefetched as f64)),
        ("prefetch_used", Some(used as f64)),
        ("prefetch_accuracy", accuracy),
    ]
}

/// A generation's device outputs: the generated ids and every step's logits.
type DeviceOutputs<B> = (Tensor<B, 2, Int>, Tensor<B, 3>);

/// What SC-003b's three criteria are decided from on a device backend (typed, measured).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DeviceSc003bFigures {
    /// The budget (bytes).
    pub budget: u64,
    /// The resident twin's device pool peak, bytes in use (the lower of the pool's two figures,
    /// so that "it needs more" is not inflated).
    pub twin_peak: Option<u64>,
    /// The plain offloaded run's pool peak: reserved bytes (the conservative figure), in use
    /// where reserved is unknown.
    pub offloaded_peak: Option<u64>,
    /// Max |logits difference|, plain offloaded run vs twin.
    pub eq_diff: Option<f64>,
    /// The whole model's weight bytes.
    pub model_bytes: u64,
    /// Element type name.
    pub dtype: &'static str,
    /// Experts the device cache holds.
    pub cache_experts: usize,
}

impl DeviceSc003bFigures {
    /// SC-003b (twin peak / budget >= `ratio`), SC-003b-peak (offloaded peak / budget <= 1),
    /// SC-003b-eq (<= the tolerance).
    pub fn criteria(&self, ratio: f64) -> [Criterion; 3] {
        let budget = self.budget as f64;
        let mib = |b: u64| b as f64 / 1048576.0;
        [
            Criterion::evaluate(
                "SC-003b",
                "resident_twin_device_peak_over_budget",
                Comparison::AtLeast,
                ratio,
                self.twin_peak.map(|p| p as f64 / budget),
                format!(
                    "measured: the resident twin (every expert on the device) ran the same steps \
                     with a device pool peak of {} MiB (bytes in use) against a budget of {:.1} \
                     MiB (its weights alone: {:.1} MiB of {}); the offloaded model keeps routed \
                     experts on the host with a device cache of {} experts (LRU, cold at the \
                     start of each run)",
                    self.twin_peak
                        .map(|p| format!("{:.1}", mib(p)))
                        .unwrap_or_else(|| "not measured".into()),
                    mib(self.budget),
                    mib(self.model_bytes),
                    self.dtype,
                    self.cache_experts
                ),
            ),
            Criterion::evaluate(
                "SC-003b-peak",
                "device_peak_over_budget",
                Comparison::AtMost,
                1.0,
                self.offloaded_peak.map(|p| p as f64 / budget),
                "device memory-pool bytes reserved (in use where reserved is unknown) at the \
                 peak of the offloaded run without prefetch, sampled after every step, over the \
                 budget",
            ),
            // equivalence first: the offloaded model must compute what the resident twin computes
            sc003b_eq(
                self.eq_diff,
                "offloaded (no prefetch) vs all experts resident, same weights (tokens that \
                 diverge show as a logits difference at the step where the argmax differed; \
                 `identical_generated_tokens` reports it too)",
            ),
        ]
    }
}

/// The offloaded model, its host expert store and the workload every run of SC-003b shares.
struct OffloadRun<'a, B: Backend> {
    s: &'a MoeScenario,
    o: &'a crate::config::scenario::MoeOffload,
    ctx: &'a BackendContext<B>,
    cfg: DecoderConfig,
    model: Decoder<B>,
    prompt: Tensor<B, 2, Int>,
    model_bytes: u64,
    budget: u64,
}

/// One policy's measured runs: its report, the last run's outputs, its cache statistics, the
/// median seconds.
type PolicyResult<B> = (
    VariantReport,
    Option<DeviceOutputs<B>>,
    crate::nn::moe::offload::OffloadStats,
    Option<f64>,
);

impl<B: Backend> OffloadRun<'_, B> {
    fn cap(&self) -> usize {
        OFFLOAD_PROMPT + self.s.run.decode_steps
    }

    fn tokens(&self) -> f64 {
        (self.s.run.decode_batch * self.s.run.decode_steps) as f64
    }

    /// The timed generations of one policy (`prefetch`: pre-gated prefetching), each from an
    /// empty device cache, and the variant's report with the cache figures.
    fn policy(
        &self,
        store: &mut ExpertStore<B>,
        prefetch: bool,
        monitor_cfg: &MonitorConfig,
        series: &mut Vec<crate::monitor::MemorySample>,
    ) -> PolicyResult<B> {
        let (s, o, dev) = (self.s, self.o, &self.ctx.device);
        let (db, steps, eb) = (s.run.decode_batch, s.run.decode_steps, s.run.dtype.bytes());
        store.set_prefetch(prefetch);
        let name = if prefetch {
            "moe_offloaded_prefetch"
        } else {
            "moe_offloaded"
        };
        let mut monitor = PerformanceMonitor::for_backend::<B>(
            monitor_cfg.without_warmup(),
            dev,
            self.ctx.pool.clone(),
        );
        let mut per_run = Vec::new();
        let m = monitor.measure(name, |probe| {
            store.reset(); // every run starts with an empty device cache
            let mut c = self.model.new_cache(db, self.cap());
            let out = generate(
                &self.model,
                &self.prompt,
                steps,
                |t| Ok(self.model.forward_hidden_offloaded(t, &mut c, store)),
                || probe.checkpoint("generation_step"),
            )
            .expect("a device store does not fail");
            per_run.push(store.stats.clone());
            Ok(out)
        });
        series.extend(monitor.series().iter().cloned());
        let mut v = VariantReport::from_measurement(&m);
        let stats = per_run.last().cloned().unwrap_or_default();
        let t = v.timings.as_ref().map(|t| t.median_s);
        let tokens = self.tokens();
        let mut figures = vec![
            // generated tokens over the whole job (the prefill chunk included)
            ("generated_tokens_per_s", t.map(|t| tokens / t)),
            ("hit_rate", stats.hit_rate()),
            ("hits", Some(stats.hits as f64)),
            ("misses", Some(stats.misses as f64)),
            ("evictions", Some(stats.evictions as f64)),
            (
                "bytes_copied_per_token",
                Some(stats.bytes_copied as f64 / tokens),
            ),
            ("cache_experts", Some(o.cache_experts as f64)),
            ("max_resident_experts", Some(stats.max_resident as f64)),
            ("model_bytes", Some(self.model_bytes as f64)),
            ("budget_bytes", Some(self.budget as f64)),
            ("host_expert_bytes", Some(store.host_bytes() as f64)),
        ];
        if prefetch {
            figures.extend(prefetch_figures(
                stats.prefetched,
                stats.prefetch_used,
                stats.prefetch_accuracy(),
            ));
        }
        for (k, x) in figures {
            v.metrics.insert(k.into(), x);
        }
        v.memory.analytic = Some(AnalyticMemory {
            weights_bytes: self.model_bytes - store.host_bytes()
                + o.cache_experts as u64 * store.expert_bytes(),
            kv_cache_bytes: self.cfg.kv_cache_bytes(db, steps, eb),
            activations_bytes: None,
        });
        (v, m.output, stats, t)
    }

    /// The resident twin (every expert on the device), the same generation: its outputs and its
    /// device pool peak (bytes in use, sampled after every step) — "the model that needs more
    /// than the budget", shown rather than assumed.
    fn resident_twin(&self, store: &mut ExpertStore<B>) -> (DeviceOutputs<B>, Option<u64>) {
        let dev = &self.ctx.device;
        let mut resident = self.model.clone();
        store.reset();
        resident.set_routed_experts(store.all_on_device());
        let sample = || {
            B::sync(dev).ok();
            self.ctx.pool.as_ref().and_then(|p| p()).map(|u| u.in_use)
        };
        let mut peak = sample();
        let mut c = resident.new_cache(self.s.run.decode_batch, self.cap());
        let want = generate(
            &resident,
            &self.prompt,
            self.s.run.decode_steps,
            |t| Ok(resident.forward_hidden(t, &mut c)),
            || peak = peak.max(sample()),
        )
        .expect("a resident model does not fail");
        (want, peak)
    }
}

/// The offloaded run's equivalence with the resident twin: the same generated tokens, and every
/// step's logits within the tolerance (a mismatch fails the variant). Returns max |diff|.
fn compare_with_twin<B: Backend>(
    v: &mut VariantReport,
    out: Option<DeviceOutputs<B>>,
    want: &DeviceOutputs<B>,
) -> Option<f64> {
    let host_ids = |t: Tensor<B, 2, Int>| -> Vec<i64> {
        t.into_data().convert::<i64>().to_vec().unwrap_or_default()
    };
    let same_tokens = out
        .as_ref()
        .map(|a| host_ids(a.0.clone()) == host_ids(want.0.clone()));
    v.metrics.insert(
        "identical_generated_tokens".into(),
        same_tokens.map(|x| if x { 1.0 } else { 0.0 }),
    );
    let diff = out.map(|(_, a)| {
        let d: f32 = (a - want.1.clone())
            .abs()
            .max()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map(|v| v[0])
            .unwrap_or(f32::NAN);
        d as f64
    });
    let equal = diff.map(|d| d <= OFFLOAD_TOLERANCE);
    v.equivalence = crate::report::Equivalence {
        checked: diff.is_some(),
        reference: Some("resident twin: every routed expert on the device, same weights".into()),
        max_abs_diff: diff,
        tolerance: Some(OFFLOAD_TOLERANCE),
        passed: equal,
    };
    if equal == Some(false) {
        v.fail("offloaded outputs differ from the resident model");
    }
    diff
}

/// The note of one offloaded policy's figures.
fn policy_note(
    s: &MoeScenario,
    prefetch: bool,
    t: Option<f64>,
    stats: &crate::nn::moe::offload::OffloadStats,
    diff: Option<f64>,
) -> String {
    let (db, steps) = (s.run.decode_batch, s.run.decode_steps);
    let tokens = (db * steps) as f64;
    format!(
        "SC-003b offload{}: {:.1} generated tokens/s (batch {db}: a prefill chunk of \
         {OFFLOAD_PROMPT} tokens, then {steps} greedy steps through the LM head), hit rate {}, \
         {:.2} MiB copied per token, {} misses, {} evictions{}; outputs vs resident max |diff| {}",
        if prefetch { " with prefetch" } else { "" },
        t.map(|t| tokens / t).unwrap_or(f64::NAN),
        stats
            .hit_rate()
            .map(|h| format!("{:.1} %", 100.0 * h))
            .unwrap_or_else(|| "not measured".into()),
        stats.bytes_copied as f64 / tokens / 1048576.0,
        stats.misses,
        stats.evictions,
        if prefetch {
            format!(
                ", {} experts prefetched (next layer's gate on this layer's input, same \
                 read-back), {} of them used before eviction",
                stats.prefetched, stats.prefetch_used
            )
        } else {
            String::new()
        },
        diff.map(|d| format!("{d:.2e}"))
            .unwrap_or_else(|| "not measured".into())
    )
}

/// SC-003b: the MoE model with routed experts on the host and a device LRU cache, one
/// generation ([`generate`]) under the budget; equivalence (same tokens, logits within the
/// tolerance) with the resident twin. With `prefetch = true` the same
/// steps run a second time with pre-gated prefetching (`moe_offloaded_prefetch`), so the two
/// policies are compared on one model; the criteria are decided by the plain run.
pub(super) fn offload<B: Backend>(
    s: &MoeScenario,
    o: &crate::config::scenario::MoeOffload,
    ctx: &BackendContext<B>,
    monitor_cfg: &MonitorConfig,
    series: &mut Vec<crate::monitor::MemorySample>,
) -> (Vec<VariantReport>, Vec<Criterion>, Vec<String>) {
    let dev = &ctx.device;
    // the SC-003a models are dropped by now: hand their pool pages back, so that the pool's
    // reserved bytes measured below (SC-003b-peak) belong to the offloaded run, not to models
    // measured earlier in the same process
    B::sync(dev).ok();
    B::memory_cleanup(dev);
    let cfg = s
        .decoder_config(MoeVariant::Moe)
        .with_shape_buckets(ctx.shape_buckets());
    B::seed(dev, 11);
    <burn::backend::Flex as Backend>::seed(&Default::default(), 12);
    let (model, host) = cfg.init_offloaded::<B>(dev);
    let mut store = ExpertStore::<B>::new(host, o.cache_experts, dev);
    let db = s.run.decode_batch;
    // the workload is a real generation: a prefill chunk of the prompt, then the greedy decode
    // steps through the LM head, each argmax fed back on the device
    let prompt = crate::bench::token_tensor::<B>(db, OFFLOAD_PROMPT, cfg.vocab_size, 10, dev);
    let run = OffloadRun {
        s,
        o,
        ctx,
        model_bytes: (cfg.params() * s.run.dtype.bytes()) as u64,
        budget: (o.memory_budget_gib * (1u64 << 30) as f64) as u64,
        cfg,
        model,
        prompt,
    };
    // materialise the device-side weights before the baseline
    {
        let mut c = run.model.new_cache(db, run.cap());
        let _ = run
            .model
            .forward_hidden_offloaded(run.prompt.clone(), &mut c, &mut store);
        B::sync(dev).ok();
    }
    let policies: Vec<_> = [false, true]
        .into_iter()
        .filter(|&p| o.prefetch || !p)
        .map(|p| run.policy(&mut store, p, monitor_cfg, series))
        .collect();
    let (want, twin_peak) = run.resident_twin(&mut store);
    let mut notes = Vec::new();
    let mut variants = Vec::new();
    for (mut v, out, stats, t) in policies {
        let diff = compare_with_twin(&mut v, out, &want);
        notes.push(policy_note(
            s,
            v.name.ends_with("prefetch"),
            t,
            &stats,
            diff,
        ));
        variants.push(v);
    }
    let plain = &variants[0].memory.measured;
    let figures = DeviceSc003bFigures {
        budget: run.budget,
        twin_peak,
        // "fits under the budget" is decided on the pool's reserved bytes (what the allocator
        // really holds, the conservative figure), in use where reserved is unknown
        offloaded_peak: plain.device_reserved_peak_bytes.or(plain.device_peak_bytes),
        eq_diff: variants[0].equivalence.max_abs_diff,
        model_bytes: run.model_bytes,
        dtype: s.run.dtype.as_str(),
        cache_experts: o.cache_experts,
    };
    let criteria = figures
        .criteria(s.thresholds.model_to_budget_ratio)
        .to_vec();
    (variants, criteria, notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Outcome;

    #[test]
    fn device_sc003b_arithmetic_on_fixed_figures() {
        let mib = 1u64 << 20;
        let f = |twin: Option<u64>, off: Option<u64>, eq: Option<f64>| {
            DeviceSc003bFigures {
                budget: 512 * mib,
                twin_peak: twin,
                offloaded_peak: off,
                eq_diff: eq,
                model_bytes: 1100 * mib,
                dtype: "bf16",
                cache_experts: 32,
            }
            .criteria(2.0)
        };
        let [b, p, e] = f(Some(1280 * mib), Some(400 * mib), Some(0.0));
        assert_eq!(
            (b.id.as_str(), p.id.as_str(), e.id.as_str()),
            ("SC-003b", "SC-003b-peak", "SC-003b-eq")
        );
        assert!((b.measured.unwrap() - 2.5).abs() < 1e-12);
        assert!((p.measured.unwrap() - 400.0 / 512.0).abs() < 1e-12);
        assert_eq!([b.outcome(), p.outcome(), e.outcome()], [Outcome::Pass; 3]);
        assert!(b.note.contains("1280.0 MiB") && b.note.contains("32 experts"));
        // a twin under twice the budget is not "a model that needs twice the memory"
        let [b, _, _] = f(Some(1000 * mib), Some(400 * mib), Some(0.0));
        assert_eq!(b.outcome(), Outcome::Fail);
        // the offloaded run over the budget, or outputs off by more than the tolerance: FAIL
        let [_, p, e] = f(Some(1280 * mib), Some(513 * mib), Some(2e-5));
        assert_eq!([p.outcome(), e.outcome()], [Outcome::Fail; 2]);
        // no pool figures (a backend without a pool probe) and no equivalence: not measured
        let [b, p, e] = f(None, None, None);
        assert_eq!(
            [b.outcome(), p.outcome(), e.outcome()],
            [Outcome::NotMeasured; 3]
        );
        assert!(b.note.contains("not measured"));
    }
}
