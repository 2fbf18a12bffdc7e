//! FR-004 运行器（`bench::strategy`：优化策略由配置切换；不与 `nn::model` 重名）：按 `[optimization]` 构建组合模型（MLA / MoE / MTP 任意组合），测量预填充、
//! 贪心解码与（MTP 深度 > 0 时）自推测解码，并做一项正确性检查（不是速度判定）。
//!
//! The model is built by the one model builder ([`OptimizationConfig::decoder_config`] ->
//! [`MtpModel::new`]) from random weights (fixed seed); the MTP modules are untrained, so their
//! drafts are close to guesses and the acceptance and speculative speed figures describe this
//! untrained model only (SC-002 measures trained modules). The variants run interleaved on the
//! same random prompts: `prefill` (the prompt in chunks), `greedy` (prefill + plain cached
//! decoding) and `speculative` (MTP drafts, one verify pass of D+1 tokens per step).
//!
//! Criterion `FR-004` / `speculative_equals_greedy`: the fraction of generated tokens that are
//! identical between speculative and greedy decoding; it passes only at 1.0 (every token), and
//! only if the greedy tokens also equal the argmax of a full (uncached, one-pass) forward over
//! the same sequences. Because untrained drafts are almost always rejected, a second, untimed
//! speculative run uses oracle drafts (the greedy continuation) so that the accept path — D+1
//! tokens committed per verify pass — is checked too; the measured value is the lower of the two. With MTP depth 0 there is no speculative decoder: the measured value is
//! then that cached-decode vs full-forward agreement. Speed ratios are reported as figures in
//! the variants' metrics and in the notes, never as criteria.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Int, Tensor};

use super::RunOutput;
use crate::backend::BackendContext;
use crate::config::{ModelScenario, OptimizationConfig};
use crate::monitor::{Measurement, MonitorConfig, PerformanceMonitor, Workload};
use crate::nn::decode::{self, Drafter, SpecStats};
use crate::nn::model::{Decoder, DecoderConfig};
use crate::nn::mtp::{MtpModel, MtpPredictor};
use crate::report::{AnalyticMemory, Equivalence, VariantReport};

mod verdict;

/// Output of one timed run: tokens and (speculative only) statistics.
type Decoded = (Vec<Vec<u32>>, Option<SpecStats>);

/// Touches every parameter so that Burn's lazy initialisation happens now, in module order:
/// the weights are then fixed before any measurement (and do not depend on which experts the
/// first tokens happen to route to).
struct Materialise;

impl<B: Backend> ModuleVisitor<B> for Materialise {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

/// The next-token argmax at every generated position from ONE uncached forward over
/// `prompt + generated[..n-1]` (a fresh cache, the whole sequence as a single chunk): the
/// reference that cached step-by-step decoding must reproduce. Returns `b` rows of `n` ids.
pub fn full_forward_argmax<B: Backend>(
    main: &Decoder<B>,
    prompts: &[Vec<u32>],
    generated: &[Vec<u32>],
) -> anyhow::Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let p = prompts.first().map(Vec::len).unwrap_or(0);
    let n = generated.first().map(Vec::len).unwrap_or(0);
    anyhow::ensure!(p > 0 && n > 0, "nothing to compare");
    let rows: Vec<Vec<u32>> = prompts
        .iter()
        .zip(generated)
        .map(|(pr, g)| pr.iter().chain(&g[..n - 1]).copied().collect())
        .collect();
    let len = p + n - 1;
    let mut cache = main.new_cache(b, len);
    let h = main.forward_hidden(decode::id_tensor::<B>(&rows, &main.device()), &mut cache);
    let d = h.dims()[2];
    // position i predicts token i+1: positions p-1 .. p+n-2 predict the n generated tokens
    Ok(decode::argmax_rows(main.logits(h.slice([
        0..b,
        p - 1..len,
        0..d,
    ]))))
}

/// Fraction of positions where `a` and `b` agree (and the count of differing positions).
fn agreement(a: &[Vec<u32>], b: &[Vec<u32>]) -> (f64, usize) {
    let total: usize = a.iter().map(Vec::len).sum();
    let same: usize = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p == q).count())
        .sum();
    let shape_ok = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len());
    if total == 0 || !shape_ok {
        return (0.0, total.max(1));
    }
    (same as f64 / total as f64, total - same)
}

/// Parameters used per token by the main model (all of them for a dense FFN).
/// Parameters a token passes through (for an MoE model: shared + the top-k routed experts).
pub(crate) fn active_params(cfg: &DecoderConfig) -> usize {
    match &cfg.moe {
        Some(m) => {
            let moe_layers = (0..cfg.n_layers).filter(|&i| cfg.is_moe_layer(i)).count();
            cfg.params() - moe_layers * (m.total_params() - m.active_params())
        }
        None => cfg.params(),
    }
}

/// KV-cache bytes per token over all layers at `eb` bytes per element.
fn kv_bytes_per_token(cfg: &DecoderConfig, eb: usize) -> usize {
    cfg.n_layers * cfg.attention.kv_elements_per_token() * eb
}

/// Greedy decoding against the argmax of one uncached full forward over prompt + generated
/// tokens: the greedy variant's equivalence (it fails on any differing token). Returns the
/// (agreement fraction, differing tokens); None when not checked.
fn check_greedy<B: Backend>(
    main: &Decoder<B>,
    prompts: &[Vec<u32>],
    greedy_out: Option<&Vec<Vec<u32>>>,
    n: usize,
    v: &mut VariantReport,
) -> Option<verdict::Agreement> {
    let batch = prompts.len();
    // the untimed checks are isolated like the measured runs: a failure marks the variant
    let ff = match greedy_out {
        Some(g) => match full_forward_argmax(main, prompts, g) {
            Ok(f) => Some(f),
            Err(e) => {
                v.fail(format!("the full-forward reference could not run: {e:#}"));
                None
            }
        },
        None => None,
    };
    let ff_cmp = greedy_out.zip(ff.as_ref()).map(|(g, f)| agreement(g, f));
    let ff_ok = ff_cmp.map(|(_, diff)| diff == 0);
    v.equivalence = Equivalence {
        checked: ff_cmp.is_some(),
        reference: Some(
            "argmax of one uncached full forward over prompt + generated tokens (token for token)"
                .into(),
        ),
        max_abs_diff: ff_cmp.map(|(_, d)| d as f64),
        tolerance: Some(0.0),
        passed: ff_ok,
    };
    if ff_ok == Some(false) {
        let d = ff_cmp.map(|c| c.1).unwrap_or(0);
        v.fail(format!(
            "cached greedy decoding differs from the full forward in {d} of {} tokens",
            batch * n
        ));
    }
    ff_cmp
}

/// The notes that describe the model (attention, FFN, MTP depth, dtype), the untrained
/// weights, the prompts and the analytic figures against the standard model of this shape.
fn describe(
    s: &ModelScenario,
    cfg: &DecoderConfig,
    standard: &DecoderConfig,
    mtp_params: usize,
    kv_tok: usize,
    kv_tok_std: usize,
) -> Vec<String> {
    let o = &s.optimization;
    let depth = o.mtp_depth();
    let (batch, plen, n) = (s.run.batch, s.run.prompt_len, s.run.new_tokens);
    let chunk = o.prefill_chunk;
    let a = &cfg.attention;
    let attn = match a.kind {
        crate::nn::AttentionKind::Mha => format!("MHA {} heads x {}", a.n_heads, a.head_dim),
        crate::nn::AttentionKind::Gqa => format!(
            "GQA {} query heads, {} K/V heads x {}",
            a.n_heads, a.n_kv_heads, a.head_dim
        ),
        crate::nn::AttentionKind::Mla => format!(
            "MLA {:?} ({} heads, kv_lora_rank {}, q_lora_rank {}, nope {}, rope {}, v {})",
            a.mla_impl,
            a.n_heads,
            a.kv_lora_rank,
            a.q_lora_rank,
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim
        ),
    };
    let ffn = match &cfg.moe {
        Some(m) => format!(
            "DeepSeekMoE in every layer: {} routed + {} shared experts of width {}, top-{}, {:?} \
             scores, {} group(s) keep {}",
            m.router.n_routed_experts,
            m.n_shared_experts,
            m.moe_inter_dim,
            m.router.num_experts_per_tok,
            m.router.score_func,
            m.router.n_group,
            m.router.topk_group
        ),
        None => format!("dense SwiGLU FFN {}", cfg.ffn_hidden),
    };
    vec![
        format!(
            "model `{label}`: hidden {hidden}, {layers} layers, vocab {vocab}; {attn}; {ffn}; \
             MTP depth {depth}; {dtype}; prefill chunk {chunk}, key block {key_block}",
            label = o.label(),
            dtype = super::dtype_note(o.dtype),
            hidden = cfg.hidden,
            layers = cfg.n_layers,
            vocab = cfg.vocab_size,
            key_block = a.key_block
        ),
        format!(
            "weights random (seed {}), nothing trained: the MTP modules are untrained, so their \
             drafts are close to guesses; acceptance and speculative speed here describe this \
             untrained model, not a trained one (SC-002 measures trained MTP modules). The MoE \
             router is untrained too",
            s.run.seed
        ),
        format!(
            "prompts: {batch} random sequences of {plen} tokens (seed {}); {n} new tokens each, \
             greedy both ways; variants interleaved",
            s.run.seed
        ),
        format!(
            "analytic: parameters {} main ({} active per token{}), {} in the MTP modules; \
             standard model of this shape (MHA, dense, no MTP): {} parameters. KV cache {} \
             bytes/token over all layers at {} vs {} for the standard model ({:.3}x)",
            cfg.params(),
            active_params(cfg),
            if cfg.moe.is_some() {
                format!(
                    ", {:.1} %",
                    100.0 * active_params(cfg) as f64 / cfg.params() as f64
                )
            } else {
                String::new()
            },
            mtp_params,
            standard.params(),
            kv_tok,
            o.dtype.as_str(),
            kv_tok_std,
            kv_tok as f64 / kv_tok_std as f64
        ),
    ]
}

/// The prefill and the greedy decode step against the limits measured here: bytes and FLOPs
/// per step from the configuration (an MoE step counts only the routed experts its tokens
/// picked, measured in an untimed pass of single-token steps of random ids at the run's batch),
/// fractions of the streaming and working-set read limits and of GEMM. Returns the note.
fn roofline<B: Backend>(
    s: &ModelScenario,
    cfg: &DecoderConfig,
    main: &Decoder<B>,
    ctx: &BackendContext<B>,
    variants: &mut [VariantReport],
) -> String {
    use super::roofline as rl;
    let (batch, plen, n) = (s.run.batch, s.run.prompt_len, s.run.new_tokens);
    let eb = s.optimization.dtype.bytes();
    let limits = rl::measure(ctx);
    let steps: Vec<Tensor<B, 2, Int>> = (0..n.max(1))
        .map(|i| super::token_tensor::<B>(batch, 1, cfg.vocab_size, 100 + i as u64, &ctx.device))
        .collect();
    let touched = rl::experts_touched_per_step(main, &steps, batch, steps.len());
    let n_routed = cfg.moe.as_ref().map(|m| m.router.n_routed_experts);
    let step = rl::moe_decode_step(
        cfg,
        batch,
        plen + n / 2,
        eb,
        touched.or(n_routed.map(|e| e as f64)).unwrap_or(0.0),
    );
    let ws = rl::working_set_read_gb_per_s(ctx, step.bytes().max(1.0) as usize);
    let get = |v: &VariantReport, k: &str| v.metrics.get(k).copied().flatten();
    if let Some(v) = variants.first_mut() {
        let gflops =
            get(v, "prefill_s").map(|t| rl::active_prefill_flops(cfg, batch, plen) / t / 1e9);
        v.metrics.insert("prefill_gflop_per_s".into(), gflops);
        v.metrics.insert(
            "prefill_gemm_fraction".into(),
            rl::fraction(gflops, limits.gemm_gflop_per_s),
        );
    }
    if let Some(v) = variants.get_mut(1) {
        let gbps = get(v, "decode_tokens_per_s").map(|tps| step.bytes() * tps / batch as f64 / 1e9);
        let touched_metric = [("experts_touched_per_decode_step", touched)];
        for (k, x) in rl::decode_metrics(&step, gbps, &limits, ws)
            .into_iter()
            .chain(touched_metric)
        {
            v.metrics.insert(k.into(), x);
        }
    }
    format!(
        "{}; greedy decode step: {:.2} MB, {:.2} MFLOP at batch {batch}{} (decode tokens/s \
         from the run minus the prefill)",
        limits.note(),
        step.bytes() / 1e6,
        step.flops / 1e6,
        match (touched, n_routed) {
            (Some(t), Some(e)) => format!(
                ", reading {t:.1} of {e} routed experts per MoE layer (measured in an untimed \
                 pass of {n} single-token steps of random ids)"
            ),
            _ => String::new(),
        }
    )
}

/// The timed variants, interleaved on the same prompts: `prefill`, `greedy` and (MTP depth > 0)
/// `speculative`. Returns the names and the measurements.
fn measure<B: Backend>(
    model: &MtpModel<B>,
    s: &ModelScenario,
    prompts: &[Vec<u32>],
    monitor: &mut PerformanceMonitor,
    dev: &B::Device,
) -> (Vec<&'static str>, Vec<Measurement<Decoded>>) {
    let (main, mtp) = (&model.main, &model.mtp);
    let (batch, plen, n) = (s.run.batch, s.run.prompt_len, s.run.new_tokens);
    let chunk = s.optimization.prefill_chunk;
    let drafter = Drafter::Mtp(mtp);
    let mut names = vec!["prefill", "greedy"];
    let mut workloads: Vec<Workload<'_, Decoded>> = vec![
        Box::new(|probe| {
            let mut cache = main.new_cache(batch, plen);
            let ids = decode::id_tensor::<B>(prompts, dev);
            let logits = main.prefill(ids, &mut cache, chunk, |_| {
                probe.checkpoint("prefill_chunk")
            });
            Ok((decode::argmax_rows(logits), None))
        }),
        Box::new(|probe| {
            let out = decode::greedy(main, prompts, n, chunk);
            probe.checkpoint("decoded");
            Ok((out, None))
        }),
    ];
    if s.optimization.mtp_depth() > 0 {
        names.push("speculative");
        workloads.push(Box::new(|probe| {
            let (out, st) = decode::speculative(main, &drafter, prompts, n, chunk);
            probe.checkpoint("decoded");
            Ok((out, Some(st)))
        }));
    }
    let ms = monitor.measure_interleaved(&names, &mut workloads);
    (names, ms)
}

/// The model-level figures every variant shares (analytic).
struct ModelFigures {
    weights_bytes: u64,
    params_total: usize,
    params_active: usize,
    params_mtp: usize,
    kv_bytes_per_token: usize,
}

/// One report per measured variant: analytic memory, parameter counts, and the median time as
/// prefill or generation figures; decode-only tokens/s = the run minus the median prefill (the
/// first token comes from it). Returns the reports and the median seconds of each.
fn variant_reports(
    s: &ModelScenario,
    cfg: &DecoderConfig,
    names: &[&str],
    ms: &[Measurement<Decoded>],
    mf: &ModelFigures,
) -> (Vec<VariantReport>, Vec<Option<f64>>) {
    let eb = s.optimization.dtype.bytes();
    let depth = s.optimization.mtp_depth();
    let (batch, plen, n) = (s.run.batch, s.run.prompt_len, s.run.new_tokens);
    let per_layer = |cap: usize| cfg.kv_cache_bytes(batch, cap, eb) / cfg.n_layers.max(1) as u64;
    let mut variants = Vec::new();
    let mut secs = Vec::new();
    for (name, m) in names.iter().zip(ms) {
        let mut v = VariantReport::from_measurement(m);
        let t = v.timings.as_ref().map(|t| t.median_s);
        secs.push(t);
        let kv = match *name {
            "prefill" => cfg.kv_cache_bytes(batch, plen, eb),
            "greedy" => cfg.kv_cache_bytes(batch, plen + n, eb),
            // the speculative decoder's cache has room for a verify window and the drafter's
            // padded pass, and every MTP module has a cache layer of its own
            _ => per_layer(plen + n + 2 * depth + 2) * (cfg.n_layers + depth) as u64,
        };
        v.memory.analytic = Some(AnalyticMemory {
            weights_bytes: mf.weights_bytes,
            kv_cache_bytes: kv,
            activations_bytes: None,
        });
        let timing: [(&str, Option<f64>); 2] = if *name == "prefill" {
            [
                ("prefill_s", t),
                ("prefill_tokens_per_s", t.map(|t| (batch * plen) as f64 / t)),
            ]
        } else {
            [
                ("generation_s", t),
                ("tokens_per_s", t.map(|t| (batch * n) as f64 / t)),
            ]
        };
        for (k, x) in [
            ("params_total", Some(mf.params_total as f64)),
            ("params_active", Some(mf.params_active as f64)),
            ("params_mtp", Some(mf.params_mtp as f64)),
            (
                "kv_bytes_per_token_analytic",
                Some(mf.kv_bytes_per_token as f64),
            ),
        ]
        .into_iter()
        .chain(timing)
        {
            v.metrics.insert(k.into(), x);
        }
        variants.push(v);
    }
    let t_prefill = secs[0];
    for (i, v) in variants.iter_mut().enumerate().skip(1) {
        let decode_tps = secs[i]
            .zip(t_prefill)
            .filter(|(t, p)| n > 1 && t > p)
            .map(|(t, p)| (batch * (n - 1)) as f64 / (t - p));
        v.metrics.insert("decode_tokens_per_s".into(), decode_tps);
    }
    (variants, secs)
}

/// Untrained drafts are almost never accepted, which leaves the accept path unexercised: one
/// more (untimed) speculative run whose drafts are the greedy continuation itself, so that every
/// draft is accepted and each verify pass commits D+1 tokens at once. Returns its agreement
/// with greedy and its statistics (None without MTP, without greedy tokens, or on a panic,
/// which marks `v` failed).
fn oracle_run<B: Backend>(
    main: &Decoder<B>,
    s: &ModelScenario,
    prompts: &[Vec<u32>],
    greedy: Option<&Vec<Vec<u32>>>,
    v: Option<&mut VariantReport>,
) -> Option<(verdict::Agreement, SpecStats)> {
    let (d, plen) = (s.optimization.mtp_depth(), s.run.prompt_len);
    let g = greedy.filter(|_| d > 0)?;
    let f = |i: usize, seq: &[u32]| -> Vec<u32> {
        (0..d)
            .map(|j| g[i].get(seq.len() - plen + j).copied().unwrap_or(0))
            .collect()
    };
    let drafter: Drafter<'_, B> = Drafter::Planted { depth: d, f: &f };
    let (n, chunk) = (s.run.new_tokens, s.optimization.prefill_chunk);
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode::speculative(main, &drafter, prompts, n, chunk)
    }));
    match run {
        Ok((out, st)) => Some((agreement(g, &out), st)),
        Err(_) => {
            if let Some(v) = v {
                v.fail("the perfect-draft speculative check panicked");
            }
            None
        }
    }
}

/// The speculative variant's equivalence (both speculative runs must reproduce greedy), its
/// failure when they do not, and its figures (acceptance, oracle accepted length, speedup).
fn speculative_report(
    v: &mut VariantReport,
    f: &verdict::Fr004Figures,
    stats: Option<&SpecStats>,
    secs: &[Option<f64>],
) {
    let spec_all = f.speculative_all();
    let identical = spec_all.map(|(_, d)| d == 0);
    v.equivalence = Equivalence {
        checked: spec_all.is_some(),
        reference: Some(
            "greedy: token-for-token identical generated tokens, with the MTP drafts and with \
             oracle drafts (the greedy continuation, every draft accepted)"
                .into(),
        ),
        max_abs_diff: spec_all.map(|(_, d)| d as f64),
        tolerance: Some(0.0),
        passed: identical,
    };
    if identical == Some(false) {
        v.fail(format!(
            "speculative output differs from greedy: {} of {} tokens with MTP drafts, {} with \
             oracle drafts",
            f.speculative.map(|c| c.1).unwrap_or(0),
            f.batch * f.new_tokens,
            f.oracle.map(|o| o.1).unwrap_or(0)
        ));
    }
    if f.oracle.is_some() {
        v.metrics.insert(
            "oracle_mean_accepted_length".into(),
            f.oracle_accepted_length,
        );
    }
    let ratio = secs[1].zip(secs[2]).map(|(g, sp)| g / sp);
    v.metrics.insert("speedup_vs_greedy".into(), ratio);
    if let Some(st) = stats {
        st.insert_metrics(&mut v.metrics);
    }
}

/// The figures note: median throughputs of every variant and the speculative statistics.
fn figures_note(variants: &[VariantReport], depth: usize, stats: Option<&SpecStats>) -> String {
    let get = |i: usize, k: &str| {
        variants
            .get(i)
            .and_then(|v| v.metrics.get(k).copied().flatten())
    };
    let f = super::fmt_opt;
    format!(
        "figures (median): prefill {} tokens/s; greedy {} tokens/s end to end ({} decode-only); \
         speculative {}",
        f(get(0, "prefill_tokens_per_s"), 1),
        f(get(1, "tokens_per_s"), 1),
        f(get(1, "decode_tokens_per_s"), 1),
        if depth > 0 {
            format!(
                "{} tokens/s end to end ({} decode-only), {}x greedy; mean tokens per verify \
                 step {}; acceptance per draft position (given the earlier ones accepted) {}",
                f(get(2, "tokens_per_s"), 1),
                f(get(2, "decode_tokens_per_s"), 1),
                f(get(2, "speedup_vs_greedy"), 2),
                f(stats.and_then(|s| s.mean_accepted_length()), 2),
                stats
                    .map(SpecStats::acceptance_text)
                    .unwrap_or_else(|| "not measured".into())
            )
        } else {
            "not run (MTP depth 0)".to_string()
        }
    )
}

/// Runs a `model` scenario on backend `B`.
pub fn run<B: Backend>(
    s: &ModelScenario,
    ctx: &BackendContext<B>,
    monitor_cfg: MonitorConfig,
) -> anyhow::Result<RunOutput> {
    let o = &s.optimization;
    let dev = &ctx.device;
    crate::backend::use_float_dtype::<B>(dev, o.dtype)?;
    let eb = o.dtype.bytes();
    let cfg = o
        .decoder_config(&s.model)
        .with_shape_buckets(ctx.shape_buckets());
    let depth = o.mtp_depth();
    B::seed(dev, s.run.seed);
    let model = MtpModel::<B>::new(&cfg, depth, dev);
    model.visit(&mut Materialise);
    B::sync(dev).ok();
    let main = &model.main;
    let prompts = crate::rng::prompts(s.run.batch, s.run.prompt_len, cfg.vocab_size, s.run.seed);
    let mut monitor = PerformanceMonitor::for_backend::<B>(monitor_cfg, dev, ctx.pool.clone());
    let (names, ms) = measure(&model, s, &prompts, &mut monitor, dev);

    let standard = OptimizationConfig::standard().decoder_config(&s.model);
    let mf = ModelFigures {
        weights_bytes: ((cfg.params() + MtpPredictor::<B>::params(&cfg, depth)) * eb) as u64,
        params_total: cfg.params(),
        params_active: active_params(&cfg),
        params_mtp: MtpPredictor::<B>::params(&cfg, depth),
        kv_bytes_per_token: kv_bytes_per_token(&cfg, eb),
    };
    let (mut variants, secs) = variant_reports(s, &cfg, &names, &ms, &mf);

    // correctness: greedy vs one full forward; speculative (MTP and oracle drafts) vs greedy
    let greedy_out = ms[1].output.as_ref().map(|o| o.0.clone());
    let n = s.run.new_tokens;
    let full_forward = check_greedy(main, &prompts, greedy_out.as_ref(), n, &mut variants[1]);
    let spec = ms.get(2).and_then(|m| m.output.as_ref());
    let stats = spec.and_then(|sp| sp.1.clone());
    let oracle = oracle_run(main, s, &prompts, greedy_out.as_ref(), variants.get_mut(2));
    let figs = verdict::Fr004Figures {
        depth,
        batch: s.run.batch,
        new_tokens: n,
        full_forward,
        speculative: greedy_out
            .as_ref()
            .zip(spec)
            .map(|(g, sp)| agreement(g, &sp.0)),
        oracle: oracle.as_ref().map(|o| o.0),
        oracle_accepted_length: oracle.as_ref().and_then(|o| o.1.mean_accepted_length()),
    };
    if let Some(v) = variants.get_mut(2) {
        speculative_report(v, &figs, stats.as_ref(), &secs);
    }

    let mut notes = describe(
        s,
        &cfg,
        &standard,
        mf.params_mtp,
        mf.kv_bytes_per_token,
        kv_bytes_per_token(&standard, eb),
    );
    notes.extend(s.model_origin.as_ref().map(|o| o.note.clone()));
    notes.push(roofline(s, &cfg, main, ctx, &mut variants));
    notes.push(figures_note(&variants, depth, stats.as_ref()));
    notes.push(
        "decode-only tokens/s = (new_tokens - 1) x batch over (run median - prefill median); \
         for speculative decoding that also charges the MTP modules' pass over the prompt"
            .into(),
    );
    notes.push(
        "the analytic memory breakdown of this kind covers weights and KV caches only: its \
         activations_bytes is not estimated (null)"
            .into(),
    );
    Ok(RunOutput {
        variants,
        criteria: vec![verdict::criterion(&figs)],
        notes,
        memory_series: monitor.series().to_vec(),
        series: Default::default(),
        active_fraction: None,
    })
}

#[cfg(test)]
mod tests;
