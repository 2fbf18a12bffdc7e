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
use crate::monitor::{alloc, MonitorConfig, PerformanceMonitor, PoolProbe};
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
type Split = (f64, f64, u64, Option<u64>);

/// Speed figures of one variant from its timed runs (medians), with the roofline of a decode
/// step at the mean context of the timed steps (step j attends to seq + j keys) and of the
/// whole prefill, set against the measured limits.
fn speed_metrics(
    cfg: &DecoderConfig,
    s: &MlaScenario,
    split: &[Split],
    limits: &super::roofline::Limits,
) -> Vec<(&'static str, Option<f64>)> {
    let (batch, seq, steps) = (s.run.batch, s.run.seq, s.run.decode_tokens);
    let eb = s.run.dtype.bytes();
    let med = |i: usize| -> Option<f64> {
        let xs: Vec<f64> = split
            .iter()
            .map(|x| if i == 0 { x.0 } else { x.1 })
            .collect();
        crate::monitor::stats::median(&xs)
    };
    let (prefill_s, decode_s) = (med(0), med(1));
    let step = super::roofline::decode_step(cfg, batch, seq + steps.div_ceil(2), eb);
    let prefill_flops = super::roofline::prefill_flops(cfg, batch, seq);
    let decode_gbps = decode_s.map(|t| step.bytes() * steps as f64 / t / 1e9);
    let prefill_gflops = prefill_s.map(|t| prefill_flops / t / 1e9);
    let frac = |x: Option<f64>, lim: Option<f64>| x.zip(lim).map(|(x, l)| x / l);
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
        ("decode_gb_per_s", decode_gbps),
        (
            "decode_gflop_per_s",
            decode_s.map(|t| step.flops * steps as f64 / t / 1e9),
        ),
        ("prefill_flops", Some(prefill_flops)),
        ("prefill_gflop_per_s", prefill_gflops),
        (
            "prefill_gemm_fraction",
            frac(prefill_gflops, limits.gemm_gflop_per_s),
        ),
        ("limit_gemm_gflop_per_s", limits.gemm_gflop_per_s),
    ]
}

/// Runs SC-001 on backend `B`.
pub fn run<B: Backend>(
    s: &MlaScenario,
    ctx: &BackendContext<B>,
    monitor_cfg: MonitorConfig,
) -> anyhow::Result<RunOutput> {
    let dev = &ctx.device;
    crate::backend::use_float_dtype::<B>(dev, s.run.dtype)?;
    let eb = s.run.dtype.bytes();
    let (batch, seq, steps) = (s.run.batch, s.run.seq, s.run.decode_tokens);
    let chunk = s.attention.prefill_chunk;
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
    let mut mla_model: Option<(Decoder<B>, Option<u64>)> = None;
    // One throwaway pass of the first variant before anything is measured: thread pools and the
    // GEMM library's per-thread packing buffers are process state, allocated once and kept;
    // without this pass the first variant measured would be charged for them (about 1 MiB on
    // the CPU backend, which decides the smoke scenario's tiny budget).
    if let Some(&first) = order.first() {
        let cfg = s
            .decoder_config(first)
            .with_shape_buckets(ctx.shape_buckets());
        B::seed(dev, 42);
        warm_up(&cfg.init::<B>(dev), s, dev);
    }
    for variant in order {
        let cfg = s
            .decoder_config(variant)
            .with_shape_buckets(ctx.shape_buckets());
        B::sync(dev).ok();
        let (model, before_load) = match (variant, mla_model.take()) {
            // same weights as mla_naive: its pre-load level is the baseline
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
        let loaded = memory_now(&ctx.pool);
        // warm-up on a short prefix (kernel compilation / autotune), not measured
        for _ in 0..s.run.warmup {
            warm_up(&model, s, dev);
        }
        let mut monitor = PerformanceMonitor::for_backend::<B>(
            monitor_cfg.without_warmup(),
            dev,
            ctx.pool.clone(),
        );
        // prefill s, decode s, cache bytes, host bytes allocated during the decode loop
        let mut split: Vec<Split> = Vec::new();
        let prompt = super::token_tensor::<B>(batch, seq, cfg.vocab_size, 7, dev);
        // absorbed MLA decodes teacher-forced on naive MLA's greedy tokens (same weights), so
        // its argmax is compared with naive's at every step without a cascade: one near-tie that
        // rounds the other way (half precision) changes one token, not every token after it.
        // The work per step is the same as free-running decoding.
        let forced = (variant == MlaVariant::MlaAbsorbed)
            .then(|| forced_tokens::<B>(&runs, batch, steps, dev))
            .flatten();
        let m = monitor.measure(variant.as_str(), |probe| {
            let mut cache = model.new_cache(batch, seq + steps);
            let t0 = Instant::now();
            let logits = model.prefill(prompt.clone(), &mut cache, chunk, |_| {
                probe.checkpoint("prefill_chunk")
            });
            B::sync(dev).ok();
            let t_prefill = t0.elapsed().as_secs_f64();
            let first: Vec<f32> = logits
                .clone()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
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
            let t_decode = t1.elapsed().as_secs_f64();
            let decode_alloc = alloc::allocated().zip(a1).map(|(b, a)| b.saturating_sub(a));
            split.push((t_prefill, t_decode, cache.tensor_bytes(), decode_alloc));
            let ids: Vec<i64> = Tensor::cat(decoded, 1)
                .into_data()
                .convert::<i64>()
                .to_vec()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            Ok((first, ids))
        });
        series.extend(monitor.series().iter().cloned());
        let mut v = VariantReport::from_measurement(&m);
        // peaks from the chosen source
        let peak = if ctx.pool.is_some() {
            m.memory.device_peak_bytes
        } else {
            m.memory.host_peak_bytes
        };
        let runtime_peak = peak.zip(loaded).map(|(p, l)| p.saturating_sub(l));
        let total_peak = peak.zip(before_load).map(|(p, b)| p.saturating_sub(b));
        let cache_bytes = split.last().map(|x| x.2);
        let workspace = runtime_peak
            .zip(cache_bytes)
            .map(|(r, c)| r.saturating_sub(c));
        let weights = (cfg.params() * eb) as u64;
        v.memory.analytic = Some(AnalyticMemory {
            weights_bytes: weights,
            kv_cache_bytes: cfg.kv_cache_bytes(batch, seq + steps, eb),
            activations_bytes: Some(analytic_workspace(&cfg, batch, chunk, eb)),
        });
        let speed = speed_metrics(&cfg, s, &split, &limits);
        let kv_per_token = cfg.attention.kv_elements_per_token() * eb * cfg.n_layers;
        let alloc_per_step = split
            .last()
            .and_then(|x| x.3)
            .map(|b| b as f64 / steps.max(1) as f64);
        let memory = [
            ("runtime_peak_bytes", runtime_peak.map(|b| b as f64)),
            ("total_peak_bytes", total_peak.map(|b| b as f64)),
            (
                "weights_loaded_bytes",
                loaded
                    .zip(before_load)
                    .map(|(l, b)| l.saturating_sub(b) as f64),
            ),
            ("kv_cache_tensor_bytes", cache_bytes.map(|b| b as f64)),
            ("prefill_workspace_bytes", workspace.map(|b| b as f64)),
            ("kv_bytes_per_token_analytic", Some(kv_per_token as f64)),
            ("host_alloc_bytes_per_decode_step", alloc_per_step),
            (
                "host_alloc_per_decode_step_vs_kv_cache",
                alloc_per_step
                    .zip(cache_bytes)
                    .filter(|(_, c)| *c > 0)
                    .map(|(a, c)| a / c as f64),
            ),
            ("kv_heads", Some(cfg.attention.n_kv_heads as f64)),
        ];
        for (k, x) in speed.into_iter().chain(memory) {
            v.metrics.insert(k.into(), x);
        }
        let (first, decoded) = match m.output {
            Some((f, d)) => {
                if f.iter().any(|x| !x.is_finite()) {
                    v.fail("non-finite values (NaN/inf) in the logits");
                }
                (Some(f), Some(d))
            }
            None => (None, None),
        };
        // capacity probes under the budget
        let prober = capacity::Prober {
            model: &model,
            cfg: &cfg,
            s,
            ctx,
            variant: variant.as_str(),
            before_load,
            budget,
        };
        let (capacity, capped) = if v.error.is_none() {
            prober.search(workspace.unwrap_or(0), &mut probes)
        } else {
            (None, false)
        };
        // on a pool backend the found capacity must hold under one real chunked prefill too
        let (capacity, capped, confirmed) = match capacity {
            Some(found) if ctx.pool.is_some() => {
                let c = prober.confirm(found, &mut probes);
                (c, capped && c == Some(found), Some(c.is_some()))
            }
            other => (other, capped, None),
        };
        v.metrics
            .insert("capacity_tokens".into(), capacity.map(|c| c as f64));
        // 1 = a real chunked prefill at capacity_tokens fit (pool backends; null: not run)
        v.metrics.insert(
            "capacity_confirmed_by_real_prefill".into(),
            confirmed.map(|c| if c { 1.0 } else { 0.0 }),
        );
        // 1 = still fit where the search stops (capacity::search_ceiling): only a lower bound
        v.metrics.insert(
            "capacity_is_lower_bound".into(),
            capacity.map(|_| if capped { 1.0 } else { 0.0 }),
        );
        if let Some(slope) = probe_slope(&probes, variant.as_str()) {
            v.metrics
                .insert("measured_bytes_per_token".into(), Some(slope));
        }
        runs.push(VariantRun {
            variant,
            report: v,
            prefill_logits: first,
            decoded,
            runtime_peak,
            total_peak,
            workspace,
            capacity,
            capped,
        });
        if variant == MlaVariant::MlaNaive {
            mla_model = Some((model, before_load));
        }
    }

    // the read limit once more at the end (the better of the two counts), then every variant's
    // decode bandwidth as a fraction of it
    limits.remeasure_read(ctx);
    notes.push(limits.note());
    for r in runs.iter_mut() {
        let m = &mut r.report.metrics;
        let gbps = m.get("decode_gb_per_s").copied().flatten();
        let fraction = gbps.zip(limits.read_gb_per_s).map(|(g, l)| g / l);
        m.insert("limit_read_gb_per_s".into(), limits.read_gb_per_s);
        m.insert("decode_read_bandwidth_fraction".into(), fraction);
        // beside the streaming limit, the read rate of a working set the size of this step's
        // bytes (cache-resident where it fits: the limit a step that fits can approach)
        let step_bytes = m.get("decode_bytes_per_step").copied().flatten();
        let ws = step_bytes
            .and_then(|b| super::roofline::working_set_read_gb_per_s(ctx, b.max(1.0) as usize));
        m.insert("limit_working_set_read_gb_per_s".into(), ws);
        m.insert(
            "decode_working_set_read_fraction".into(),
            gbps.zip(ws).map(|(g, l)| g / l),
        );
        if let Some(f) = fraction.filter(|f| *f > 1.0) {
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
