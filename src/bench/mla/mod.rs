//! SC-001 运行器：MHA / GQA / MLA（吸收、朴素）的内存、速度与上下文容量。
//!
//! For each variant: load the model (memory after loading = the weights-loaded baseline),
//! prefill `run.seq` tokens in chunks and decode `run.decode_tokens` steps, measuring time and
//! peak memory (host counting allocator on flex, CubeCL pool on wgpu/CUDA, NVML where present).
//! Then probe the longest context that fits the memory budget: each probe is a real run that
//! allocates a cache of that length, fills it with synthetic values, decodes real steps at that
//! length, and adds the measured prefill workspace.

use std::time::Instant;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use super::RunOutput;
use crate::backend::BackendContext;
use crate::config::{MlaScenario, MlaVariant};
use crate::monitor::{alloc, Measurement, MonitorConfig, PerformanceMonitor, PoolProbe};
use crate::nn::attention::MlaImpl;
use crate::nn::model::{Decoder, DecoderConfig};
use crate::report::{AnalyticMemory, CapacityProbe, ReportSeries, VariantReport};

mod capacity;
mod verdict;

use capacity::probe_slope;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// One untimed prefill of a short prefix (two chunks at most) and one decode step: kernel
/// compilation / autotune on the CubeCL backends, thread pools and scratch buffers everywhere.
fn warm_up<B: Backend>(model: &Decoder<B>, s: &MlaScenario, dev: &B::Device) {
    let (batch, chunk) = (s.run.batch, s.attention.prefill_chunk);
    let n = s.run.seq.min(2 * chunk);
    let mut c = model.new_cache(batch, n + 1);
    let l = model.prefill(
        super::token_tensor::<B>(batch, n, s.model.vocab_size, 1, dev),
        &mut c,
        chunk,
        |_| {},
    );
    let _ = model.decode_step(l.argmax(2).reshape([batch, 1]), &mut c);
    B::sync(dev).ok();
}

/// Memory "now" from the best source of this backend: the device pool, else the host counter.
fn memory_now(pool: &Option<PoolProbe>) -> Option<u64> {
    match pool {
        Some(p) => p().map(|u| u.in_use),
        None => alloc::current(),
    }
}

struct VariantRun {
    variant: MlaVariant,
    report: VariantReport,
    prefill_logits: Option<Vec<f32>>,
    decoded: Option<Vec<i64>>,
    runtime_peak: Option<u64>,
    total_peak: Option<u64>,
    workspace: Option<u64>,
    capacity: Option<usize>,
    capped: bool,
}

/// The notes that describe the run (dimensions, attention blocking, where memory is read),
/// and the memory source the criteria use.
fn setup_notes(s: &MlaScenario, pooled: bool) -> (Vec<String>, &'static str) {
    let (batch, seq, steps) = (s.run.batch, s.run.seq, s.run.decode_tokens);
    let chunk = s.attention.prefill_chunk;
    let source = if pooled {
        "device pool (CubeCL)"
    } else {
        "host allocator"
    };
    let mut notes = vec![format!(
        "dims: hidden {}, {} layers, {} heads x {} (MHA/GQA), GQA {} KV heads, MLA kv_lora_rank {}, \
         q_lora_rank {}, nope {}, rope {}, v {}; vocab {}, FFN {}; batch {batch}, seq {seq}, \
         {steps} decode steps; {}",
        s.model.hidden, s.model.n_layers, s.model.n_heads, s.attention.head_dim,
        s.attention.gqa_kv_heads, s.attention.kv_lora_rank,
        s.attention.q_lora_rank.map_or("none".to_string(), |r| r.to_string()),
        s.attention.qk_nope_head_dim, s.attention.qk_rope_head_dim, s.attention.v_head_dim,
        s.model.vocab_size, s.model.ffn_hidden, super::dtype_note(s.run.dtype)
    ), format!(
        "attention: query chunks of {chunk} tokens x key blocks of {chunk} (online softmax): the \
         workspace does not grow with the sequence; memory source for the criteria: {source}"
    )];
    if pooled {
        notes.push(
            "device pool usage is sampled at sync points (after each prefill chunk and decode \
             step): transient attention buffers freed inside a chunk are not seen, so peaks and \
             the prefill workspace are lower bounds on this backend (NVML, where present, reads \
             the driver's figure every 10 ms); so capacity (SC-001b) is decided on the pool's \
             reserved bytes and confirmed by a real prefill"
                .into(),
        );
    }
    (notes, source)
}

/// Naive MLA's greedy tokens as `steps` columns `[batch, 1]`, for absorbed MLA to decode
/// teacher-forced on them (None when naive MLA did not run or decoded a different count).
fn forced_tokens<B: Backend>(
    runs: &[VariantRun],
    batch: usize,
    steps: usize,
    dev: &B::Device,
) -> Option<Vec<Tensor<B, 2, Int>>> {
    runs.iter()
        .find(|r| r.variant == MlaVariant::MlaNaive)
        .and_then(|r| r.decoded.as_ref())
        .filter(|ids| ids.len() == batch * steps)
        .map(|ids| {
            (0..steps)
                .map(|i| {
                    let col: Vec<i64> = (0..batch).map(|b| ids[b * steps + i]).collect();
                    Tensor::from_data(TensorData::new(col, [batch, 1]), dev)
                })
                .collect()
        })
}

/// One timed run's figures: prefill seconds, decode seconds, KV-cache tensor bytes, host
/// bytes allocated during the decode loop.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Split {
    prefill_s: f64,
    decode_s: f64,
    cache_bytes: u64,
    decode_alloc: Option<u64>,
}

/// Speed figures of one variant from its timed runs (medians), with the roofline of a decode
/// step at the mean context of the timed steps (step j attends to seq + j keys) and of the
/// whole prefill, set against the measured GEMM limit (the read limits are set in
/// [`read_rooflines`], after the read limit is measured a second time).
fn speed_metrics(
    cfg: &DecoderConfig,
    s: &MlaScenario,
    split: &[Split],
    limits: &super::roofline::Limits,
) -> Vec<(&'static str, Option<f64>)> {
    let (batch, seq, steps) = (s.run.batch, s.run.seq, s.run.decode_tokens);
    let eb = s.run.dtype.bytes();
    let med = |f: fn(&Split) -> f64| -> Option<f64> {
        let xs: Vec<f64> = split.iter().map(f).collect();
        crate::monitor::stats::median(&xs)
    };
    let (prefill_s, decode_s) = (med(|x| x.prefill_s), med(|x| x.decode_s));
    let step = super::roofline::decode_step(cfg, batch, seq + steps.div_ceil(2), eb);
    let prefill_flops = super::roofline::prefill_flops(cfg, batch, seq);
    let prefill_gflops = prefill_s.map(|t| prefill_flops / t / 1e9);
    vec![
        ("prefill_s", prefill_s),
        (
            "prefill_tokens_per_s",
            prefill_s.map(|t| (batch * seq) as f64 / t),
        ),
        ("decode_s", decode_s),
        (
            "decode_tokens_per_s",
            decode_s.map(|t| (batch * steps) as f64 / t),
        ),
        ("decode_bytes_per_step", Some(step.bytes())),
        ("decode_weight_bytes_per_step", Some(step.weight_bytes)),
        ("decode_kv_bytes_per_step", Some(step.kv_bytes)),
        ("decode_flops_per_step", Some(step.flops)),
        (
            "decode_gb_per_s",
            decode_s.map(|t| step.bytes() * steps as f64 / t / 1e9),
        ),
        (
            "decode_gflop_per_s",
            decode_s.map(|t| step.flops * steps as f64 / t / 1e9),
        ),
        ("prefill_flops", Some(prefill_flops)),
        ("prefill_gflop_per_s", prefill_gflops),
        (
            "prefill_gemm_fraction",
            super::roofline::fraction(prefill_gflops, limits.gemm_gflop_per_s),
        ),
        ("limit_gemm_gflop_per_s", limits.gemm_gflop_per_s),
    ]
}

/// A variant's model and the memory levels around its loading.
struct Loaded<B: Backend> {
    model: Decoder<B>,
    /// memory before the model was loaded (the baseline of the total peak and the probes)
    before_load: Option<u64>,
    /// memory with the weights loaded (the baseline of the runtime peak)
    loaded: Option<u64>,
}

/// Loads `variant`'s model — absorbed MLA reuses naive MLA's (`naive`: same weights, its
/// pre-load level is the baseline) — and reads the memory level with the weights loaded.
fn load_variant<B: Backend>(
    cfg: &DecoderConfig,
    variant: MlaVariant,
    naive: Option<(Decoder<B>, Option<u64>)>,
    ctx: &BackendContext<B>,
) -> Loaded<B> {
    let dev = &ctx.device;
    B::sync(dev).ok();
    let (model, before_load) = match (variant, naive) {
        (MlaVariant::MlaAbsorbed, Some((mut m, base))) => {
            m.set_mla_impl(MlaImpl::Absorbed);
            (m, base)
        }
        _ => {
            let base = memory_now(&ctx.pool);
            B::seed(dev, 42);
            let m = cfg.init::<B>(dev);
            // Burn initialises parameters lazily: one tiny forward materialises them all,
            // so the "weights loaded" level really holds the weights
            let mut c = m.new_cache(1, 1);
            let _ = m.decode_step(
                super::token_tensor::<B>(1, 1, cfg.vocab_size, 0, dev),
                &mut c,
            );
            (m, base)
        }
    };
    B::sync(dev).ok();
    Loaded {
        model,
        before_load,
        loaded: memory_now(&ctx.pool),
    }
}

/// The last timed run's prefill logits and decoded ids.
type FirstAndIds = (Vec<f32>, Vec<i64>);

/// The timed runs of one variant: a chunked prefill of `run.seq` tokens and `decode_tokens`
/// greedy steps (teacher-forced on `forced` where given), each run's [`Split`], and the last
/// run's first logits and decoded ids.
fn timed_runs<B: Backend>(
    model: &Decoder<B>,
    s: &MlaScenario,
    monitor: &mut PerformanceMonitor,
    variant: MlaVariant,
    forced: Option<Vec<Tensor<B, 2, Int>>>,
    dev: &B::Device,
) -> (Measurement<FirstAndIds>, Vec<Split>) {
    let (batch, seq, steps) = (s.run.batch, s.run.seq, s.run.decode_tokens);
    let chunk = s.attention.prefill_chunk;
    let mut split: Vec<Split> = Vec::new();
    let prompt = super::token_tensor::<B>(batch, seq, s.model.vocab_size, 7, dev);
    let to_vec = |d: TensorData| -> anyhow::Result<Vec<f32>> {
        d.convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let m = monitor.measure(variant.as_str(), |probe| {
        let mut cache = model.new_cache(batch, seq + steps);
        let t0 = Instant::now();
        let logits = model.prefill(prompt.clone(), &mut cache, chunk, |_| {
            probe.checkpoint("prefill_chunk")
        });
        B::sync(dev).ok();
        let prefill_s = t0.elapsed().as_secs_f64();
        let first = to_vec(logits.clone().into_data())?;
        let mut next = logits.argmax(2).reshape([batch, 1]);
        let mut decoded = Vec::new();
        let a1 = alloc::allocated();
        let t1 = Instant::now();
        for i in 0..steps {
            let input = match &forced {
                Some(cols) => cols[i].clone(),
                None => next.clone(),
            };
            let l = model.decode_step(input, &mut cache);
            probe.checkpoint("decode_step");
            decoded.push(next); // this variant's own choice for position i
            next = l.argmax(2).reshape([batch, 1]);
        }
        B::sync(dev).ok();
        split.push(Split {
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
            cache_bytes: cache.tensor_bytes(),
            decode_alloc: alloc::allocated().zip(a1).map(|(b, a)| b.saturating_sub(a)),
        });
        let ids: Vec<i64> = Tensor::cat(decoded, 1)
            .into_data()
            .convert::<i64>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok((first, ids))
    });
    (m, split)
}

/// Memory figures of one variant, from its measured peak and the levels around loading.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct MemoryFigures {
    runtime_peak: Option<u64>,
    total_peak: Option<u64>,
    weights_loaded: Option<u64>,
    cache_bytes: Option<u64>,
    workspace: Option<u64>,
    alloc_per_step: Option<f64>,
}

impl MemoryFigures {
    fn new(
        peak: Option<u64>,
        before_load: Option<u64>,
        loaded: Option<u64>,
        split: &[Split],
        steps: usize,
    ) -> Self {
        let runtime_peak = peak.zip(loaded).map(|(p, l)| p.saturating_sub(l));
        let cache_bytes = split.last().map(|x| x.cache_bytes);
        MemoryFigures {
            runtime_peak,
            total_peak: peak.zip(before_load).map(|(p, b)| p.saturating_sub(b)),
            weights_loaded: loaded.zip(before_load).map(|(l, b)| l.saturating_sub(b)),
            cache_bytes,
            workspace: runtime_peak
                .zip(cache_bytes)
                .map(|(r, c)| r.saturating_sub(c)),
            alloc_per_step: split
                .last()
                .and_then(|x| x.decode_alloc)
                .map(|b| b as f64 / steps.max(1) as f64),
        }
    }

    fn metrics(&self, cfg: &DecoderConfig, eb: usize) -> [(&'static str, Option<f64>); 9] {
        let kv_per_token = cfg.attention.kv_elements_per_token() * eb * cfg.n_layers;
        let f = |b: Option<u64>| b.map(|b| b as f64);
        [
            ("runtime_peak_bytes", f(self.runtime_peak)),
            ("total_peak_bytes", f(self.total_peak)),
            ("weights_loaded_bytes", f(self.weights_loaded)),
            ("kv_cache_tensor_bytes", f(self.cache_bytes)),
            ("prefill_workspace_bytes", f(self.workspace)),
            ("kv_bytes_per_token_analytic", Some(kv_per_token as f64)),
            ("host_alloc_bytes_per_decode_step", self.alloc_per_step),
            (
                "host_alloc_per_decode_step_vs_kv_cache",
                self.alloc_per_step
                    .zip(self.cache_bytes)
                    .filter(|(_, c)| *c > 0)
                    .map(|(a, c)| a / c as f64),
            ),
            ("kv_heads", Some(cfg.attention.n_kv_heads as f64)),
        ]
    }
}

/// Runs the capacity search of one variant under the budget (none after a failed run) and,
/// on a pool backend, confirms the found length with one real chunked prefill; writes the
/// capacity metrics into `v`. Returns the capacity and whether it is only a lower bound.
fn capacity_metrics<B: Backend>(
    prober: &capacity::Prober<'_, B>,
    workspace: Option<u64>,
    v: &mut VariantReport,
    probes: &mut Vec<CapacityProbe>,
) -> (Option<usize>, bool) {
    let (capacity, capped) = if v.error.is_none() {
        prober.search(workspace.unwrap_or(0), probes)
    } else {
        (None, false)
    };
    // on a pool backend the found capacity must hold under one real chunked prefill too
    let (capacity, capped, confirmed) = match capacity {
        Some(found) if prober.ctx.pool.is_some() => {
            let c = prober.confirm(found, probes);
            (c, capped && c == Some(found), Some(c.is_some()))
        }
        other => (other, capped, None),
    };
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    v.metrics
        .insert("capacity_tokens".into(), capacity.map(|c| c as f64));
    // 1 = a real chunked prefill at capacity_tokens fit (pool backends; null: not run)
    v.metrics.insert(
        "capacity_confirmed_by_real_prefill".into(),
        confirmed.map(flag),
    );
    // 1 = still fit where the search stops (capacity::search_ceiling): only a lower bound
    v.metrics.insert(
        "capacity_is_lower_bound".into(),
        capacity.map(|_| flag(capped)),
    );
    if let Some(slope) = probe_slope(probes, prober.variant) {
        v.metrics
            .insert("measured_bytes_per_token".into(), Some(slope));
    }
    (capacity, capped)
}

/// Everything one variant shares with the others: scenario, backend, monitor settings, limits
/// and the budget.
struct Bench<'a, B: Backend> {
    s: &'a MlaScenario,
    ctx: &'a BackendContext<B>,
    monitor_cfg: MonitorConfig,
    limits: &'a super::roofline::Limits,
    budget: u64,
}

impl<B: Backend> Bench<'_, B> {
    /// Measures one variant: timed runs, report with speed and memory figures, capacity.
    fn variant(
        &self,
        cfg: &DecoderConfig,
        variant: MlaVariant,
        l: &Loaded<B>,
        earlier: &[VariantRun],
        probes: &mut Vec<CapacityProbe>,
        series: &mut Vec<crate::monitor::MemorySample>,
    ) -> VariantRun {
        let (s, ctx, dev) = (self.s, self.ctx, &self.ctx.device);
        let (batch, steps) = (s.run.batch, s.run.decode_tokens);
        let eb = s.run.dtype.bytes();
        // warm-up on a short prefix (kernel compilation / autotune), not measured
        for _ in 0..s.run.warmup {
            warm_up(&l.model, s, dev);
        }
        let mut monitor = PerformanceMonitor::for_backend::<B>(
            self.monitor_cfg.without_warmup(),
            dev,
            ctx.pool.clone(),
        );
        // absorbed MLA decodes teacher-forced on naive MLA's greedy tokens (same weights), so
        // its argmax is compared with naive's at every step without a cascade: one near-tie that
        // rounds the other way (half precision) changes one token, not every token after it.
        // The work per step is the same as free-running decoding.
        let forced = (variant == MlaVariant::MlaAbsorbed)
            .then(|| forced_tokens::<B>(earlier, batch, steps, dev))
            .flatten();
        let (m, split) = timed_runs(&l.model, s, &mut monitor, variant, forced, dev);
        series.extend(monitor.series().iter().cloned());
        let mut v = VariantReport::from_measurement(&m);
        // peaks from the chosen source
        let peak = if ctx.pool.is_some() {
            m.memory.device_peak_bytes
        } else {
            m.memory.host_peak_bytes
        };
        let mem = MemoryFigures::new(peak, l.before_load, l.loaded, &split, steps);
        v.memory.analytic = Some(AnalyticMemory {
            weights_bytes: (cfg.params() * eb) as u64,
            kv_cache_bytes: cfg.kv_cache_bytes(batch, s.run.seq + steps, eb),
            activations_bytes: Some(analytic_workspace(
                cfg,
                batch,
                s.attention.prefill_chunk,
                eb,
            )),
        });
        let speed = speed_metrics(cfg, s, &split, self.limits);
        for (k, x) in speed.into_iter().chain(mem.metrics(cfg, eb)) {
            v.metrics.insert(k.into(), x);
        }
        let (prefill_logits, decoded) = match m.output {
            Some((f, d)) => {
                if f.iter().any(|x| !x.is_finite()) {
                    v.fail("non-finite values (NaN/inf) in the logits");
                }
                (Some(f), Some(d))
            }
            None => (None, None),
        };
        let prober = capacity::Prober {
            model: &l.model,
            cfg,
            s,
            ctx,
            variant: variant.as_str(),
            before_load: l.before_load,
            budget: self.budget,
        };
        let (capacity, capped) = capacity_metrics(&prober, mem.workspace, &mut v, probes);
        VariantRun {
            variant,
            report: v,
            prefill_logits,
            decoded,
            runtime_peak: mem.runtime_peak,
            total_peak: mem.total_peak,
            workspace: mem.workspace,
            capacity,
            capped,
        }
    }
}

/// Every variant's decode bandwidth as a fraction of the streaming read limit and, beside it,
/// of the read rate of a working set the size of its step's bytes (cache-resident where it
/// fits: the limit a step that fits can approach); a fraction above 1 gets a note.
fn read_rooflines<B: Backend>(
    ctx: &BackendContext<B>,
    limits: &super::roofline::Limits,
    runs: &mut [VariantRun],
    notes: &mut Vec<String>,
) {
    use super::roofline::fraction;
    for r in runs.iter_mut() {
        let m = &mut r.report.metrics;
        let gbps = m.get("decode_gb_per_s").copied().flatten();
        let step_bytes = m.get("decode_bytes_per_step").copied().flatten();
        let ws = step_bytes
            .and_then(|b| super::roofline::working_set_read_gb_per_s(ctx, b.max(1.0) as usize));
        let streaming = fraction(gbps, limits.read_gb_per_s);
        for (k, x) in [
            ("limit_read_gb_per_s", limits.read_gb_per_s),
            ("decode_read_bandwidth_fraction", streaming),
            ("limit_working_set_read_gb_per_s", ws),
            ("decode_working_set_read_fraction", fraction(gbps, ws)),
        ] {
            m.insert(k.into(), x);
        }
        if let Some(f) = streaming.filter(|f| *f > 1.0) {
            notes.push(format!(
                "{}: decode reads at {:.0} % of the streaming read limit — above the measured \
                 limit: the limit was not measured at this working set ({} MB per step; its \
                 own working-set read rate: {})",
                r.report.name,
                f * 100.0,
                step_bytes
                    .map(|b| format!("{:.0}", b / 1e6))
                    .unwrap_or("?".into()),
                ws.map(|w| format!("{w:.1} GB/s"))
                    .unwrap_or("not measured".into())
            ));
        }
    }
}

/// Runs SC-001 on backend `B`.
pub fn run<B: Backend>(
    s: &MlaScenario,
    ctx: &BackendContext<B>,
    monitor_cfg: MonitorConfig,
) -> anyhow::Result<RunOutput> {
    let dev = &ctx.device;
    crate::backend::use_float_dtype::<B>(dev, s.run.dtype)?;
    let budget = (s.capacity.memory_budget_gib * GIB) as u64;
    let (mut notes, source) = setup_notes(s, ctx.pool.is_some());
    // the limits every speed below is set against, measured here with this backend
    let mut limits = super::roofline::measure(ctx);
    let mut series = Vec::new();
    let mut runs: Vec<VariantRun> = Vec::new();
    let mut probes: Vec<CapacityProbe> = Vec::new();
    // naive and absorbed MLA share one model (same weights), so they are run back to back
    // (MlaVariant's order: mha, gqa, mla_naive, mla_absorbed)
    let mut order = s.attention.variants.clone();
    order.sort();
    let config = |v: MlaVariant| s.decoder_config(v).with_shape_buckets(ctx.shape_buckets());
    // One throwaway pass of the first variant before anything is measured: thread pools and the
    // GEMM library's per-thread packing buffers are process state, allocated once and kept;
    // without this pass the first variant measured would be charged for them (about 1 MiB on
    // the CPU backend, which decides the smoke scenario's tiny budget).
    if let Some(&first) = order.first() {
        B::seed(dev, 42);
        warm_up(&config(first).init::<B>(dev), s, dev);
    }
    let bench = Bench {
        s,
        ctx,
        monitor_cfg,
        limits: &limits,
        budget,
    };
    let mut naive: Option<(Decoder<B>, Option<u64>)> = None;
    for variant in order {
        let cfg = config(variant);
        let loaded = load_variant(&cfg, variant, naive.take(), ctx);
        let run = bench.variant(&cfg, variant, &loaded, &runs, &mut probes, &mut series);
        runs.push(run);
        if variant == MlaVariant::MlaNaive {
            naive = Some((loaded.model, loaded.before_load));
        }
    }
    // the read limit once more at the end (the better of the two counts), then every variant's
    // decode bandwidth as a fraction of it
    limits.remeasure_read(ctx);
    notes.push(limits.note());
    read_rooflines(ctx, &limits, &mut runs, &mut notes);
    let criteria = verdict::criteria(s, &mut runs, &probes, source, &mut notes);
    Ok(RunOutput {
        variants: runs.into_iter().map(|r| r.report).collect(),
        criteria,
        notes,
        memory_series: series,
        series: ReportSeries {
            capacity_probes: probes,
            capacity_budget_bytes: Some(budget),
            mtp_sweep: Vec::new(),
        },
        active_fraction: None,
    })
}

/// Analytic prefill workspace estimate: per-chunk activations (`eb` bytes per element) plus
/// the attention block (scores and softmax statistics in f32).
fn analytic_workspace(c: &DecoderConfig, batch: usize, chunk: usize, eb: usize) -> u64 {
    let a = &c.attention;
    let per_token = 4 * c.hidden
        + 3 * c.ffn_hidden
        + 3 * a.n_heads * (a.kv_lora_rank.max(a.head_dim) + a.qk_rope_head_dim);
    let scores = 3 * a.n_heads * chunk * chunk; // scores, probabilities, mask
    (batch * chunk * per_token * eb + batch * scores * 4) as u64
}
