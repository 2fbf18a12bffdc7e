//! SC-003 运行器（速度部分，SC-003a）：同一模型形状下 MoE、同总参数稠密、同激活参数稠密三者的吞吐量。
//!
//! Each variant is the same decoder (MHA attention, same hidden/layers/vocab); only the FFN
//! differs: DeepSeekMoE, a dense SwiGLU as wide as all experts together (equal TOTAL parameters),
//! and a dense SwiGLU as wide as the active experts (equal ACTIVE parameters). Throughput is
//! measured for a prefill-like forward (`prefill_batch x prefill_seq` tokens) and for decode-like
//! steps (`decode_batch` sequences, one token each). The router is untrained (random weights),
//! which spreads load evenly; the report says so.
//!
//! SC-003b (expert offload): on a backend with device memory (wgpu, CUDA) the MoE model is built
//! with its routed experts on the host and a device LRU cache of `offload.cache_experts`
//! experts; a real generation (a prefill chunk, then greedy decode steps through the LM head and
//! an argmax fed back on the device) runs under the memory budget, the device pool's peak bytes
//! are compared with it, and the outputs with the fully resident twin (same weights). On the CPU backend (flex)
//! there is no separate device memory: offload does not apply and the report says so.

use std::time::Instant;

use burn::tensor::{backend::Backend, Int, Tensor};

use super::RunOutput;
use crate::backend::BackendContext;
use crate::config::MoeScenario;
use crate::monitor::{MonitorConfig, PerformanceMonitor};
use crate::nn::attention::{AttentionConfig, MlaImpl};
use crate::nn::model::{Decoder, DecoderConfig};
use crate::nn::moe::{ExpertStore, LoadStats, MoeConfig, RouterConfig};
use crate::report::{AnalyticMemory, Comparison, Criterion, VariantReport};

/// The MoE configuration of a scenario.
pub fn moe_config(s: &MoeScenario) -> MoeConfig {
    MoeConfig {
        dim: s.model.hidden,
        moe_inter_dim: s.moe.moe_inter_dim,
        n_shared_experts: s.moe.n_shared_experts,
        router: RouterConfig {
            n_routed_experts: s.moe.n_routed_experts,
            num_experts_per_tok: s.moe.num_experts_per_tok,
            score_func: s.moe.score_func,
            n_group: s.moe.n_group,
            topk_group: s.moe.topk_group,
            route_scale: s.moe.route_scale,
            norm_topk_prob: false,
            bias_update_speed: 0.001,
        },
        shape_buckets: false,
    }
}

/// The decoder of a variant: `moe`, `dense_equal_total` or `dense_equal_active`.
pub fn decoder_config(s: &MoeScenario, variant: &str) -> DecoderConfig {
    let moe = moe_config(s);
    let heads = s.model.n_heads;
    let mut attention = AttentionConfig::mha(heads, s.model.hidden / heads);
    attention.mla_impl = MlaImpl::Absorbed;
    attention.rope_theta = s.model.rope_theta;
    let ffn_hidden = match variant {
        "dense_equal_total" => moe.dense_equal_total_width(),
        "dense_equal_active" => moe.dense_equal_active_width(),
        _ => s.model.ffn_hidden,
    };
    DecoderConfig {
        vocab_size: s.model.vocab_size,
        hidden: s.model.hidden,
        n_layers: s.model.n_layers,
        ffn_hidden,
        attention,
        moe: (variant == "moe").then_some(moe),
    }
}

/// Runs SC-003a on backend `B`.
pub fn run<B: Backend>(
    s: &MoeScenario,
    ctx: &BackendContext<B>,
    monitor_cfg: MonitorConfig,
) -> anyhow::Result<RunOutput> {
    let dev = &ctx.device;
    crate::backend::use_float_dtype::<B>(dev, s.run.dtype)?;
    let eb = s.run.dtype.bytes();
    let (pb, ps) = (s.run.prefill_batch, s.run.prefill_seq);
    let (db, steps) = (s.run.decode_batch, s.run.decode_steps);
    let moe = moe_config(s);
    let mut notes = vec![
        format!(
            "dims: hidden {}, {} layers, {} heads (MHA), vocab {}; MoE {} routed + {} shared experts \
             of width {}, top-{}, {:?} scores, {} group(s); dense-equal-total FFN width {}, \
             dense-equal-active width {}; {}",
            s.model.hidden, s.model.n_layers, s.model.n_heads, s.model.vocab_size,
            s.moe.n_routed_experts, s.moe.n_shared_experts, s.moe.moe_inter_dim,
            s.moe.num_experts_per_tok, s.moe.score_func, s.moe.n_group,
            moe.dense_equal_total_width(), moe.dense_equal_active_width(),
            super::dtype_note(s.run.dtype)
        ),
        {
            // both fractions: the FFN's (what routing saves) and the whole model's (what the
            // spec's "13B total / 1.3B active" means: attention, embeddings and head included)
            let whole = decoder_config(s, "moe");
            let (total, active) = (whole.params(), super::model::active_params(&whole));
            format!(
                "FFN parameters per layer: MoE total {} / active {} ({:.1} % active); whole \
                 model: {} total / {} active ({:.1} % active)",
                moe.total_params(),
                moe.active_params(),
                100.0 * moe.active_params() as f64 / moe.total_params() as f64,
                total,
                active,
                100.0 * active as f64 / total as f64
            )
        },
        "router: untrained (random weights) — load spreads evenly, which is the harder case for \
         expert caching but typical for speed"
            .into(),
    ];
    let mut series = Vec::new();
    let mut variants = Vec::new();
    let mut tps: Vec<(String, Option<f64>, Option<f64>)> = Vec::new();
    let names = ["moe", "dense_equal_total", "dense_equal_active"];
    // all three models are built first, then measured in interleaved rounds (moe, dense total,
    // dense active, moe, ...) so machine drift hits them alike; prefill and decode are two
    // separately timed workloads inside each run
    let cfgs: Vec<DecoderConfig> = names
        .iter()
        .map(|v| decoder_config(s, v).with_shape_buckets(ctx.shape_buckets()))
        .collect();
    let models: Vec<_> = cfgs
        .iter()
        .map(|cfg| {
            B::seed(dev, 11);
            let model = cfg.init::<B>(dev);
            // warm-up: materialise lazy parameters and compile kernels on the measured shapes
            for _ in 0..s.run.warmup.max(1) {
                let mut c = model.new_cache(pb, ps);
                let _ = model.forward_hidden(
                    super::token_tensor::<B>(pb, ps, cfg.vocab_size, 1, dev),
                    &mut c,
                );
                let mut c = model.new_cache(db, 2);
                let _ = model.forward_hidden(
                    super::token_tensor::<B>(db, 1, cfg.vocab_size, 2, dev),
                    &mut c,
                );
                B::sync(dev).ok();
            }
            model
        })
        .collect();
    let vocab = s.model.vocab_size;
    let prompt = super::token_tensor::<B>(pb, ps, vocab, 3, dev);
    let step_ids: Vec<Tensor<B, 2, Int>> = (0..steps)
        .map(|i| super::token_tensor::<B>(db, 1, vocab, 10 + i as u64, dev))
        .collect();
    // per variant: prefill seconds, decode seconds (every run) and the MoE's routing loads
    let times: Vec<std::cell::RefCell<(Vec<f64>, Vec<f64>)>> =
        names.iter().map(|_| Default::default()).collect();
    let loads: std::cell::RefCell<Vec<LoadStats>> = Default::default();
    let mut monitor =
        PerformanceMonitor::for_backend::<B>(monitor_cfg.without_warmup(), dev, ctx.pool.clone());
    let mut workloads: Vec<crate::monitor::Workload<'_, ()>> = Vec::new();
    for (i, model) in models.iter().enumerate() {
        let (prompt, step_ids, times, loads) = (&prompt, &step_ids, &times[i], &loads);
        let hidden = cfgs[i].hidden;
        workloads.push(Box::new(move |probe| {
            let mut cache = model.new_cache(pb, ps);
            let mut st = Vec::new();
            B::sync(dev).ok();
            let t = Instant::now();
            let h = model.forward_hidden_stats(prompt.clone(), &mut cache, Some(&mut st));
            B::sync(dev).ok();
            let prefill = t.elapsed().as_secs_f64();
            probe.checkpoint("prefill");
            let finite: Vec<f32> = h
                .slice([0..pb, ps - 1..ps, 0..hidden])
                .into_data()
                .convert::<f32>()
                .to_vec()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            anyhow::ensure!(
                finite.iter().all(|x| x.is_finite()),
                "non-finite hidden states"
            );
            if i == 0 {
                *loads.borrow_mut() = st;
            }
            // decode-like: db sequences, one token per step
            let mut dc = model.new_cache(db, steps);
            B::sync(dev).ok();
            let t = Instant::now();
            for x in step_ids {
                let _ = model.forward_hidden(x.clone(), &mut dc);
                probe.checkpoint("decode_step");
            }
            B::sync(dev).ok();
            let decode = t.elapsed().as_secs_f64();
            let mut tm = times.borrow_mut();
            tm.0.push(prefill);
            tm.1.push(decode);
            Ok(())
        }));
    }
    let ms = monitor.measure_interleaved(&names, &mut workloads);
    drop(workloads);
    series.extend(monitor.series().iter().cloned());
    let median = |xs: &[f64]| -> Option<f64> {
        let mut xs = xs.to_vec();
        xs.sort_by(f64::total_cmp);
        xs.get(xs.len() / 2).copied()
    };
    for (i, m) in ms.iter().enumerate() {
        let (variant, cfg) = (names[i], &cfgs[i]);
        let mut v = VariantReport::from_measurement(m);
        let tm = times[i].borrow();
        // the monitor keeps the timed rounds only: the last `repetitions` entries
        let reps = v.timings.as_ref().map(|t| t.samples_s.len()).unwrap_or(0);
        let timed = |xs: &[f64]| xs[xs.len().saturating_sub(reps)..].to_vec();
        let (prefill_s, decode_s) = if v.error.is_none() {
            (median(&timed(&tm.0)), median(&timed(&tm.1)))
        } else {
            (None, None)
        };
        let prefill_tps = prefill_s.map(|t| (pb * ps) as f64 / t);
        let decode_tps = decode_s.map(|t| (db * steps) as f64 / t);
        v.metrics.insert("prefill_s".into(), prefill_s);
        v.metrics.insert("prefill_tokens_per_s".into(), prefill_tps);
        v.metrics.insert("decode_s".into(), decode_s);
        v.metrics.insert("decode_tokens_per_s".into(), decode_tps);
        v.metrics.insert("params".into(), Some(cfg.params() as f64));
        let loads = loads.borrow();
        if variant == "moe" && !loads.is_empty() {
            let per_expert: Vec<usize> = (0..s.moe.n_routed_experts)
                .map(|e| loads.iter().map(|l| l.tokens_per_expert[e]).sum())
                .collect();
            let l = LoadStats::of(per_expert);
            v.metrics
                .insert("load_max_over_mean".into(), Some(l.max_over_mean));
            v.metrics
                .insert("unused_experts".into(), Some(l.unused_experts as f64));
        }
        v.memory.analytic = Some(AnalyticMemory {
            weights_bytes: (cfg.params() * eb) as u64,
            kv_cache_bytes: cfg.kv_cache_bytes(pb, ps, eb),
            activations_bytes: 0,
        });
        tps.push((variant.to_string(), prefill_tps, decode_tps));
        variants.push(v);
    }
    drop(models);
    notes.push(
        "the three variants were measured in interleaved rounds with all three models loaded, so \
         each variant's host/device peak includes the other two models' weights; prefill and \
         decode are timed separately inside every run (medians of the timed rounds)"
            .into(),
    );
    let get = |name: &str, decode: bool| {
        tps.iter()
            .find(|t| t.0 == name)
            .and_then(|t| if decode { t.2 } else { t.1 })
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let pre_total = ratio(get("moe", false), get("dense_equal_total", false));
    let dec_total = ratio(get("moe", true), get("dense_equal_total", true));
    let pre_active = ratio(get("moe", false), get("dense_equal_active", false));
    let dec_active = ratio(get("moe", true), get("dense_equal_active", true));
    if let Some(v) = variants.iter_mut().find(|v| v.name == "moe") {
        v.metrics
            .insert("prefill_speedup_vs_dense_total".into(), pre_total);
        v.metrics
            .insert("decode_speedup_vs_dense_total".into(), dec_total);
        v.metrics
            .insert("prefill_ratio_vs_dense_active".into(), pre_active);
        v.metrics
            .insert("decode_ratio_vs_dense_active".into(), dec_active);
    }
    notes.push(format!(
        "MoE vs dense-equal-active (routing overhead; below 1 = slower): prefill {}, decode {}",
        pre_active
            .map(|x| format!("{x:.2}x"))
            .unwrap_or("not measured".into()),
        dec_active
            .map(|x| format!("{x:.2}x"))
            .unwrap_or("not measured".into()),
    ));
    let mut criteria = vec![
        Criterion::evaluate(
            "SC-003a-prefill",
            "tokens_per_s_moe_over_dense_equal_total",
            Comparison::AtLeast,
            s.thresholds.speedup_vs_dense_total,
            pre_total,
            format!("prefill-like forward of {pb} x {ps} tokens; same model shape, FFN differs"),
        ),
        Criterion::evaluate(
            "SC-003a-decode",
            "tokens_per_s_moe_over_dense_equal_total",
            Comparison::AtLeast,
            s.thresholds.speedup_vs_dense_total,
            dec_total,
            format!("decode-like steps: batch {db}, one token each, {steps} steps"),
        ),
    ];
    if let Some(o) = &s.offload {
        if super::has_device_pool(ctx.selected.kind) {
            let (v, c, n) = offload::<B>(s, o, ctx, &monitor_cfg, &mut series);
            variants.extend(v);
            criteria.extend(c);
            notes.extend(n);
        } else {
            // present, unmeasured and never a pass: half of SC-003 untested is not an SC-003 pass
            let why = format!(
                "backend {} computes in host memory, so there is no separate device memory to \
                 budget; run with --backend wgpu or cuda to measure it (or gate the rest with \
                 --require SC-003a-prefill,SC-003a-decode)",
                ctx.selected.kind
            );
            notes.push(format!("SC-003b (expert offload) does not apply: {why}"));
            criteria.extend(sc003b_not_applicable(s, &why));
        }
    } else {
        criteria.extend(sc003b_not_applicable(
            s,
            "the scenario has no [offload] section",
        ));
    }
    Ok(RunOutput {
        variants,
        criteria,
        notes,
        memory_series: series,
        series: Default::default(),
    })
}

/// The three SC-003b criteria, present but not applicable (with the reason): they never pass.
fn sc003b_not_applicable(s: &MoeScenario, why: &str) -> [Criterion; 3] {
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
const OFFLOAD_PROMPT: usize = 8;

/// One generation, SC-003b's workload: `forward` (the model's normed hidden states for new
/// tokens, appending to its cache) over the prompt, then `steps` greedy decode steps, each
/// through the LM head and an argmax fed back on the device (no read-back). `after_step` runs
/// after the prefill and after every step (memory samples). Returns the generated ids
/// `[b, steps]` and the logits of the prefill's last position and of every step,
/// `[b, steps + 1, vocab]` (a divergence of the generated tokens shows there as a logits
/// difference at the step where the argmax differed).
fn generate<B: Backend>(
    model: &Decoder<B>,
    prompt: &Tensor<B, 2, Int>,
    steps: usize,
    mut forward: impl FnMut(Tensor<B, 2, Int>) -> Tensor<B, 3>,
    mut after_step: impl FnMut(),
) -> (Tensor<B, 2, Int>, Tensor<B, 3>) {
    let [b, p] = prompt.dims();
    let h = forward(prompt.clone());
    let d = h.dims()[2];
    let mut logits = model.logits(h.slice([0..b, p - 1..p, 0..d]));
    after_step();
    let mut out = Vec::with_capacity(steps);
    let mut all = Vec::with_capacity(steps + 1);
    for _ in 0..steps {
        let next = logits.clone().argmax(2).reshape([b, 1]);
        out.push(next.clone());
        all.push(logits);
        logits = model.logits(forward(next));
        after_step();
    }
    all.push(logits);
    (Tensor::cat(out, 1), Tensor::cat(all, 1))
}

/// Max |difference| allowed between the offloaded and the resident model's outputs.
const OFFLOAD_TOLERANCE: f64 = 1e-5;

/// SC-003b: the MoE model with routed experts on the host and a device LRU cache, one
/// generation ([`generate`]) under the budget; equivalence (same tokens, logits within the
/// tolerance) with the resident twin. With `prefetch = true` the same
/// steps run a second time with pre-gated prefetching (`moe_offloaded_prefetch`), so the two
/// policies are compared on one model; the criteria are decided by the plain run.
fn offload<B: Backend>(
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
    let (db, steps) = (s.run.decode_batch, s.run.decode_steps);
    let cfg = decoder_config(s, "moe").with_shape_buckets(ctx.shape_buckets());
    B::seed(dev, 11);
    <burn::backend::Flex as Backend>::seed(&Default::default(), 12);
    let (model, host) = cfg.init_offloaded::<B>(dev);
    let mut store = ExpertStore::<B>::new(host, o.cache_experts, dev);
    let eb = s.run.dtype.bytes();
    let model_bytes = (cfg.params() * eb) as u64;
    let budget = (o.memory_budget_gib * (1u64 << 30) as f64) as u64;
    // the workload is a real generation: a prefill chunk of the prompt, then `steps` greedy
    // decode steps through the LM head, each argmax fed back on the device
    let prompt = super::token_tensor::<B>(db, OFFLOAD_PROMPT, cfg.vocab_size, 10, dev);
    let cap = OFFLOAD_PROMPT + steps;
    // materialise the device-side weights before the baseline
    {
        let mut c = model.new_cache(db, cap);
        let _ = model.forward_hidden_offloaded(prompt.clone(), &mut c, &mut store);
        B::sync(dev).ok();
    }
    let tokens = (db * steps) as f64;
    let mut runs = Vec::new();
    for prefetch in [false, true] {
        if prefetch && !o.prefetch {
            continue;
        }
        store.set_prefetch(prefetch);
        let name = if prefetch {
            "moe_offloaded_prefetch"
        } else {
            "moe_offloaded"
        };
        let mut monitor = PerformanceMonitor::for_backend::<B>(
            monitor_cfg.without_warmup(),
            dev,
            ctx.pool.clone(),
        );
        let mut per_run = Vec::new();
        let m = monitor.measure(name, |probe| {
            store.reset(); // every run starts with an empty device cache
            let mut c = model.new_cache(db, cap);
            let out = generate(
                &model,
                &prompt,
                steps,
                |t| model.forward_hidden_offloaded(t, &mut c, &mut store),
                || probe.checkpoint("generation_step"),
            );
            per_run.push(store.stats.clone());
            Ok(out)
        });
        series.extend(monitor.series().iter().cloned());
        let mut v = VariantReport::from_measurement(&m);
        let stats = per_run.last().cloned().unwrap_or_default();
        let t = v.timings.as_ref().map(|t| t.median_s);
        for (k, x) in [
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
            ("model_bytes", Some(model_bytes as f64)),
            ("budget_bytes", Some(budget as f64)),
            ("host_expert_bytes", Some(store.host_bytes() as f64)),
        ] {
            v.metrics.insert(k.into(), x);
        }
        if prefetch {
            v.metrics
                .insert("prefetched_experts".into(), Some(stats.prefetched as f64));
            v.metrics
                .insert("prefetch_used".into(), Some(stats.prefetch_used as f64));
            v.metrics
                .insert("prefetch_accuracy".into(), stats.prefetch_accuracy());
        }
        v.memory.analytic = Some(AnalyticMemory {
            weights_bytes: model_bytes - store.host_bytes()
                + o.cache_experts as u64 * store.expert_bytes(),
            kv_cache_bytes: cfg.kv_cache_bytes(db, steps, eb),
            activations_bytes: 0,
        });
        runs.push((v, m.output, stats, t));
    }
    // equivalence: the resident twin (every expert on the device), same steps
    let mut resident = model.clone();
    // It is also the "model that needs more than the budget", shown rather than assumed: its
    // device pool use (bytes in use, the lower of the pool's two figures, so the claim "it
    // needs more" is not inflated) is sampled after every step of the same workload.
    store.reset();
    resident.set_routed_experts(store.all_on_device());
    let sample = || {
        B::sync(dev).ok();
        ctx.pool.as_ref().and_then(|p| p()).map(|u| u.in_use)
    };
    let mut resident_peak = sample();
    let mut c = resident.new_cache(db, cap);
    let want = Some(generate(
        &resident,
        &prompt,
        steps,
        |t| resident.forward_hidden(t, &mut c),
        || resident_peak = resident_peak.max(sample()),
    ));
    drop(c);
    drop(resident);
    let tol = OFFLOAD_TOLERANCE;
    let mut notes = Vec::new();
    let mut variants = Vec::new();
    let host_ids = |t: Tensor<B, 2, Int>| -> Vec<i64> {
        t.into_data().convert::<i64>().to_vec().unwrap_or_default()
    };
    for (mut v, out, stats, t) in runs {
        // the same generated tokens, and the last step's logits within the tolerance
        let same_tokens = out
            .as_ref()
            .zip(want.as_ref())
            .map(|(a, b)| host_ids(a.0.clone()) == host_ids(b.0.clone()));
        v.metrics.insert(
            "identical_generated_tokens".into(),
            same_tokens.map(|x| if x { 1.0 } else { 0.0 }),
        );
        let diff = out.zip(want.clone()).map(|((_, a), (_, b))| {
            let d: f32 = (a - b)
                .abs()
                .max()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .map(|v| v[0])
                .unwrap_or(f32::NAN);
            d as f64
        });
        let equal = diff.map(|d| d <= tol);
        v.equivalence = crate::report::Equivalence {
            checked: diff.is_some(),
            reference: Some(
                "resident twin: every routed expert on the device, same weights".into(),
            ),
            max_abs_diff: diff,
            tolerance: Some(tol),
            passed: equal,
        };
        if equal == Some(false) {
            v.fail("offloaded outputs differ from the resident model");
        }
        let prefetch = v.name.ends_with("prefetch");
        notes.push(format!(
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
        ));
        variants.push(v);
    }
    let plain = &variants[0];
    // "fits under the budget" is decided on the pool's reserved bytes (what the allocator
    // really holds, the conservative figure), in use where reserved is unknown
    let peak = plain
        .memory
        .measured
        .device_reserved_peak_bytes
        .or(plain.memory.measured.device_peak_bytes);
    let plain_diff = plain.equivalence.max_abs_diff;
    let criteria = vec![
        Criterion::evaluate(
            "SC-003b",
            "resident_twin_device_peak_over_budget",
            Comparison::AtLeast,
            s.thresholds.model_to_budget_ratio,
            resident_peak.map(|p| p as f64 / budget as f64),
            format!(
                "measured: the resident twin (every expert on the device) ran the same steps \
                 with a device pool peak of {} MiB (bytes in use) against a budget of {:.1} MiB \
                 (its weights alone: {:.1} MiB of {}); the offloaded model keeps routed experts \
                 on the host with a device cache of {} experts (LRU, cold at the start of each run)",
                resident_peak
                    .map(|p| format!("{:.1}", p as f64 / 1048576.0))
                    .unwrap_or_else(|| "not measured".into()),
                budget as f64 / 1048576.0,
                model_bytes as f64 / 1048576.0,
                s.run.dtype.as_str(),
                o.cache_experts
            ),
        ),
        Criterion::evaluate(
            "SC-003b-peak",
            "device_peak_over_budget",
            Comparison::AtMost,
            1.0,
            peak.map(|p| p as f64 / budget as f64),
            "device memory-pool bytes reserved (in use where reserved is unknown) at the peak of \
             the offloaded run without prefetch, sampled after every step, over the budget",
        ),
        // equivalence first: the offloaded model must compute what the resident twin computes
        Criterion::evaluate(
            "SC-003b-eq",
            "max_abs_diff_offloaded_vs_resident",
            Comparison::AtMost,
            tol,
            plain_diff,
            "a generation (prefill chunk, greedy decode steps through the LM head and argmax): \
             max |difference| of the logits of every step, offloaded (no prefetch) vs all \
             experts resident, same weights (tokens that diverge show as a logits difference \
             at the step where the argmax differed; `identical_generated_tokens` reports it too)",
        ),
    ];
    (variants, criteria, notes)
}
