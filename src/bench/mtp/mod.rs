//! SC-002 运行器：训练好的 MTP 模块做自推测解码，对比普通贪心自回归解码（同一批提示、
//! 同一次运行、交替测量）。两者输出必须逐 token 相同，否则自推测变体判为失败。

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;

use crate::backend::BackendContext;
use crate::bench::{Evidence, RunOutput};
use crate::config::scenario::MtpScenario;
use crate::monitor::{Measurement, MonitorConfig, PerformanceMonitor, Workload};
use crate::nn::decode::{self, Drafter, SpecStats};
use crate::nn::mtp::{MtpModel, MtpPredictor};
use crate::nn::{Decoder, DecoderConfig};
use crate::report::{AnalyticMemory, Comparison, Criterion, Equivalence, VariantReport};
use crate::train;

mod checkpoint;
mod sweep;
use sweep::sweep;

/// Prefill chunk used by both decoders.
const PREFILL_CHUNK: usize = 256;

/// Output of one timed decode: tokens and (speculative only) statistics.
type Decoded = (Vec<Vec<u32>>, Option<SpecStats>);

/// Mean seconds of `reps` calls of `f` (after one untimed call), synchronised.
fn time_mean<B: Backend>(dev: &B::Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    B::sync(dev).ok();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    B::sync(dev).ok();
    t.elapsed().as_secs_f64() / reps.max(1) as f64
}

/// The scenario's checkpoint: the given folder, or the default cache's (trained now when it
/// is missing). Returns its folder, metadata, whether it was trained in this call, and the
/// held-out text the prompts come from.
fn checkpoint(
    s: &MtpScenario,
    progress: bool,
) -> anyhow::Result<(PathBuf, train::CheckpointMeta, bool, Vec<u8>)> {
    Ok(match &s.train.checkpoint {
        Some(dir) => {
            let (meta, heldout) = train::open_checkpoint(s, dir)?;
            (dir.clone(), meta, false, heldout)
        }
        None => {
            let corpus = train::corpus::load(
                s.train.corpus.as_deref(),
                s.train.holdout_fraction,
                train::MAX_CORPUS_BYTES,
            )
            .map_err(|e| crate::DsoptError::Usage(format!("{e:#}")))?;
            let cache_dir = train::default_cache_dir();
            let (dir, meta, trained) = train::ensure_checkpoint(s, &cache_dir, &corpus, progress)?;
            (dir, meta, trained, corpus.heldout)
        }
    })
}

/// The notes that describe the model: dimensions, corpus, checkpoint, held-out accuracy,
/// self-distillation and prompts.
fn model_notes(
    s: &MtpScenario,
    ckpt: &Path,
    meta: &train::CheckpointMeta,
    trained_now: bool,
) -> Vec<String> {
    let depth = s.mtp.depth;
    let (batch, plen, n) = (s.run.batch, s.run.prompt_len, s.run.new_tokens);
    let sm = &meta.summary;
    vec![
        format!(
            "dims: hidden {}, {} layers, {} heads (MHA), FFN {}, byte-level vocab {}; MTP depth D = {} \
             (\"predicting 4 tokens\" = the main token + D = 3 drafts), modules trained to depth {} (in f32; run in {})",
            s.model.hidden, s.model.n_layers, s.model.n_heads, s.model.ffn_hidden,
            s.model.vocab_size, depth, meta.depth, super::dtype_note(s.run.dtype)
        ),
        format!("corpus: {}", sm.corpus),
        format!(
            "checkpoint {} ({}): {} steps of batch {} x {} bytes on {} in {:.1} s ({:.0} tokens/s); \
             loss {:.3} -> {:.3}",
            ckpt.display(),
            if trained_now { "trained in this run" } else { "reused, not retrained" },
            sm.steps, s.train.batch, s.train.seq_len, sm.backend, sm.wall_s, sm.tokens_per_s,
            sm.first_loss, sm.last_loss
        ),
        format!(
            "held-out (teacher-forced): main loss {:.3}, accuracy {:.3}; draft accuracy per depth {}",
            sm.after.main_loss,
            sm.after.main_accuracy,
            sm.after
                .depth_accuracies
                .iter()
                .enumerate()
                .map(|(k, a)| format!("d{}={a:.3}", k + 1))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        match &sm.distill {
            Some(d) => format!(
                "self-distillation: {} steps training only the MTP modules (main model frozen) on \
                 {} of the main model's own greedy continuations of training prompts, {:.1} s \
                 ({:.1} s generating); agreement with the main model's greedy tokens on held-out \
                 prompts (teacher-forced, per depth) before -> after: {}",
                d.steps,
                d.sequences,
                d.wall_s,
                d.generate_s,
                d.agreement_before
                    .iter()
                    .zip(&d.agreement_after)
                    .enumerate()
                    .map(|(k, (a, b))| format!("d{}={a:.3}->{b:.3}", k + 1))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => "self-distillation: none (train.distill_steps = 0): the modules learned the \
                     data, not the main model's own continuations"
                .into(),
        },
        format!(
            "prompts: {batch} held-out windows of {plen} bytes (never trained on); {n} new tokens per sequence; \
             greedy decoding both ways"
        ),
    ]
}

/// The cost of one verify step (D+1 tokens) against one plain step at the same batch and
/// context, on the uniform-start path, and both against the machine's measured limits
/// (metrics of the speculative variant, and a note). Returns the plain and the verify step's
/// seconds.
fn step_costs<B: Backend>(
    s: &MtpScenario,
    main: &Decoder<B>,
    model: &DecoderConfig,
    ctx: &BackendContext<B>,
    variants: &mut [VariantReport],
    notes: &mut Vec<String>,
) -> (f64, f64) {
    let dev = &ctx.device;
    let depth = s.mtp.depth;
    let (batch, plen, n) = (s.run.batch, s.run.prompt_len, s.run.new_tokens);
    let eb = s.run.dtype.bytes();
    // the cost of one verify step (D+1 tokens) against one plain step, same batch and context
    let ctx_len = plen + n / 2;
    let (one, verify) = {
        let mut c1 = main.new_cache(batch, ctx_len + depth + 2);
        c1.fill_synthetic(ctx_len, 0.01);
        let ids1 = decode::id_tensor::<B>(&vec![vec![1u32]; batch], dev);
        let idsk = decode::id_tensor::<B>(&vec![vec![1u32; depth + 1]; batch], dev);
        let starts = vec![ctx_len; batch];
        let one = time_mean::<B>(dev, 8, || {
            let h = main.forward_trunk(ids1.clone(), &mut c1, &starts, None);
            let _ = main.logits(main.final_norm(h)).argmax(2).into_data();
        });
        let verify = time_mean::<B>(dev, 8, || {
            let h = main.forward_trunk(idsk.clone(), &mut c1, &starts, None);
            let _ = main.logits(main.final_norm(h)).argmax(2).into_data();
        });
        (one, verify)
    };
    // the same two steps against the machine's measured limits (streaming read, GEMM)
    let limits = super::roofline::measure(ctx);
    let plain_t = super::roofline::decode_step(model, batch, ctx_len, eb);
    let rows = batch * (depth + 1);
    // D+1 query rows per sequence: D+1 times the FLOPs, the same weights and cache read once
    let verify_flops = plain_t.flops * (depth + 1) as f64;
    let frac = |x: f64, limit: Option<f64>| limit.filter(|l| *l > 0.0).map(|l| x / l);
    let plain_gb = plain_t.bytes() / one / 1e9;
    let verify_gflop = verify_flops / verify / 1e9;
    // a plain step reads the same weights and cache every step: where they fit in the CPU's
    // caches it can read them faster than the streaming limit, so the bounds below take the
    // faster of the two (the tighter ceiling: a faster plain step leaves less to gain)
    let ws_read =
        super::roofline::working_set_read_gb_per_s(ctx, plain_t.bytes().max(1.0) as usize);
    let read = match (limits.read_gb_per_s, ws_read) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    // rows at which a weight-streaming step turns compute-bound: 2·rows·W flops vs W·eb bytes
    let ridge = limits
        .gemm_gflop_per_s
        .zip(read)
        .map(|(f, r)| f * eb as f64 / (2.0 * r));
    // the best speculative decoding could do on this machine: D+1 tokens from every verify
    // step (every draft accepted), drafting free, both steps at the measured limits — an upper
    // bound from the limits and the counted bytes and FLOPs, not a measurement
    let k = (depth + 1) as f64;
    let ceiling = limits
        .gemm_gflop_per_s
        .zip(read)
        .filter(|(f, r)| *f > 0.0 && *r > 0.0)
        .map(|(f, r)| speedup_ceiling(plain_t.bytes(), plain_t.flops, r, f, k));
    if let Some(v) = variants.get_mut(1) {
        v.metrics
            .insert("speedup_ceiling_at_roofline".into(), ceiling);
        v.metrics
            .insert("plain_step_gb_per_s".into(), Some(plain_gb));
        v.metrics.insert(
            "plain_step_read_fraction".into(),
            frac(plain_gb, limits.read_gb_per_s),
        );
        v.metrics
            .insert("verify_step_gflop_per_s".into(), Some(verify_gflop));
        v.metrics.insert(
            "verify_step_gemm_fraction".into(),
            frac(verify_gflop, limits.gemm_gflop_per_s),
        );
        v.metrics.insert("verify_rows".into(), Some(rows as f64));
        v.metrics.insert("ridge_rows".into(), ridge);
        v.metrics
            .insert("limit_read_gb_per_s".into(), limits.read_gb_per_s);
        v.metrics
            .insert("limit_read_working_set_gb_per_s".into(), ws_read);
        v.metrics
            .insert("limit_gemm_gflop_per_s".into(), limits.gemm_gflop_per_s);
    }
    notes.push(format!(
        "roofline: a plain step (batch {batch}, context {ctx_len}) reads {:.2} MB of weights and \
         cache and does {:.1} MFLOP, measured {plain_gb:.1} GB/s = {} of the read limit; a verify \
         step has {rows} query rows ({verify_gflop:.1} GFLOP/s = {} of the GEMM limit). The ridge \
         (rows at which streaming the weights once stops being the bound) is {} rows here: a \
         verify step with more rows than that cannot cost the same as a plain step even at the \
         roofline, and steps far below both limits are bound by per-operation overhead instead. \
         Read rate of a working set this size, read again and again (`limit_read_working_set_\
         gb_per_s`; on the CPU it sits in the caches when it fits): {} GB/s; the ridge and the \
         ceiling use the faster of that and the streaming limit. Ceiling: with every draft \
         accepted ({k} tokens per verify step), drafting free and both steps at these limits, \
         speculative decoding would be at most {}x greedy here (`speedup_ceiling_at_roofline`: a \
         bound from the measured limits and the counted bytes and FLOPs, not a measurement). {}",
        plain_t.bytes() / 1e6,
        plain_t.flops / 1e6,
        super::fmt_opt(frac(plain_gb, limits.read_gb_per_s), 3),
        super::fmt_opt(frac(verify_gflop, limits.gemm_gflop_per_s), 3),
        super::fmt_opt(ridge, 1),
        super::fmt_opt(ws_read, 1),
        super::fmt_opt(ceiling, 2),
        limits.note()
    ));
    if let Some(v) = variants.get_mut(1) {
        v.metrics.insert("plain_step_s".into(), Some(one));
        v.metrics
            .insert(format!("verify_step_s_{}_tokens", depth + 1), Some(verify));
        v.metrics
            .insert("verify_over_plain_step".into(), Some(verify / one));
    }
    (one, verify)
}

/// Compares the two decoders' tokens: SC-002-eq's figures and the speculative variant's
/// equivalence (it fails when the tokens differ), the repetition of greedy's text, and the
/// speculative statistics. Returns (identical, identical fraction, statistics).
fn compare_outputs(
    ms: &[Measurement<Decoded>],
    prompts: &[Vec<u32>],
    variants: &mut [VariantReport],
    notes: &mut Vec<String>,
) -> anyhow::Result<(Option<bool>, Option<f64>, Option<SpecStats>)> {
    let batch = prompts.len();
    let greedy_out = ms[0].output.as_ref().map(|o| o.0.clone());
    let spec = ms[1].output.as_ref();
    // diagnostics: the generated tokens of both decoders, for comparing backends
    if let Some(path) = std::env::var_os("DSOPT_DUMP_TOKENS") {
        let dump = serde_json::json!({
            "prompts": prompts,
            "greedy": greedy_out,
            "speculative": spec.map(|s| &s.0),
        });
        std::fs::write(&path, dump.to_string())?;
    }
    let identical = greedy_out.as_ref().zip(spec).map(|(g, sp)| g == &sp.0);
    // the fraction of sequences whose speculative output equals greedy's (SC-002-eq)
    let identical_fraction = greedy_out.as_ref().zip(spec).map(|(g, sp)| {
        let same = g.iter().zip(&sp.0).filter(|(a, b)| a == b).count();
        same as f64 / g.len().max(1) as f64
    });
    let stats = spec.and_then(|sp| sp.1.clone());
    // a model that loops on itself is easy to draft for: say how repetitive greedy's text is
    let distinct4 = greedy_out
        .as_ref()
        .and_then(|g| distinct_ngram_fraction(g, 4));
    if let Some(v) = variants.get_mut(0) {
        v.metrics
            .insert("distinct_4gram_fraction".into(), distinct4);
    }
    notes.push(format!(
        "repetition: {} of the 4-grams of greedy's generated tokens are distinct (pooled over the \
         {batch} sequences; 1.0 = no 4-gram repeats; a model stuck in a loop scores near 0 and \
         would make drafting easy)",
        super::fmt_opt(distinct4, 3)
    ));
    if let Some(v) = variants.get_mut(1) {
        let mismatched = greedy_out
            .as_ref()
            .zip(spec)
            .map(|(g, sp)| g.iter().zip(&sp.0).filter(|(a, b)| a != b).count());
        v.equivalence = Equivalence {
            checked: identical.is_some(),
            reference: Some("greedy: token-for-token identical generated tokens".into()),
            max_abs_diff: mismatched.map(|m| m as f64),
            tolerance: Some(0.0),
            passed: identical,
        };
        if identical == Some(false) {
            v.fail(format!(
                "speculative output differs from greedy in {} of {batch} sequences",
                mismatched.unwrap_or(0)
            ));
        }
        if let Some(st) = &stats {
            st.insert_metrics(&mut v.metrics);
        }
    }

    Ok((identical, identical_fraction, stats))
}

/// SC-002a (end-to-end time), SC-002b (decode throughput) and SC-002-eq (identical tokens);
/// `values` are SC-002a's and SC-002b's measured figures, `evidence` their samples and noise.
fn criteria(
    s: &MtpScenario,
    values: [Option<f64>; 2],
    evidence: [Evidence; 2],
    identical: Option<bool>,
    identical_fraction: Option<f64>,
) -> Vec<Criterion> {
    let depth = s.mtp.depth;
    let (batch, n) = (s.run.batch, s.run.new_tokens);
    let same = match identical {
        Some(true) => "outputs identical to greedy",
        Some(false) => "FAIL: outputs differ from greedy",
        None => "outputs not compared (a variant failed)",
    };
    vec![
        Criterion::timing(
            "SC-002a",
            "generation_time_reduction",
            Comparison::AtLeast,
            s.thresholds.time_reduction,
            values[0],
            format!(
                "1 - t(speculative)/t(greedy), end to end: prefill of the {batch} prompts + {n} new \
                 tokens each, D = {depth}; {same}"
            ),
            evidence[0].samples,
            evidence[0].uncertainty,
        ),
        Criterion::timing(
            "SC-002b",
            "throughput_ratio",
            Comparison::AtLeast,
            s.thresholds.throughput_ratio,
            values[1],
            format!(
                "steady-state decode throughput, speculative over greedy: median decode-phase \
                 time of greedy / of speculative (prefill excluded: the phases are timed inside \
                 every interleaved run, the first generated token counts to the prefill); {same}"
            ),
            evidence[1].samples,
            evidence[1].uncertainty,
        ),
        // equivalence first: a speedup from a decoder that generates other tokens is a bug
        Criterion::evaluate(
            "SC-002-eq",
            "identical_sequence_fraction_speculative_vs_greedy",
            Comparison::AtLeast,
            1.0,
            identical_fraction,
            format!(
                "sequences (of {batch}) whose speculative tokens equal greedy's token for token"
            ),
        ),
    ]
}

/// Runs SC-002: on dsopt's own trained byte-level model, or (`--model DIR`) on a checkpoint's
/// main model and MTP layer.
pub fn run<B: Backend>(
    s: &MtpScenario,
    ctx: &BackendContext<B>,
    monitor_cfg: MonitorConfig,
) -> anyhow::Result<RunOutput> {
    let dev = &ctx.device;
    // before training or loading: an unsupported dtype fails at once
    crate::backend::use_float_dtype::<B>(dev, s.run.dtype)?;
    if let Some(origin) = &s.model_origin {
        return checkpoint::run(s, origin, ctx, monitor_cfg);
    }
    if let Some(p) = s.run.prompts.as_ref().or(s.run.prompt_text.as_ref()) {
        return Err(crate::DsoptError::Usage(format!(
            "run.prompts / run.prompt_text {}: prompts are for a checkpoint (`--model DIR`); \
             dsopt's own byte-level model takes its prompts from held-out text: drop them",
            p.display()
        ))
        .into());
    }
    let (ckpt, meta, trained_now, heldout) = checkpoint(s, monitor_cfg.progress)?;
    let full: MtpModel<B> = train::load(&ckpt, &meta, ctx.shape_buckets(), dev)?;
    let (batch, plen) = (s.run.batch, s.run.prompt_len);
    let notes = model_notes(s, &ckpt, &meta, trained_now);
    let main = &full.main;
    let mtp = full.mtp.clone().truncated(s.mtp.depth);
    let prompts = train::heldout_prompts(&heldout, batch, plen);
    let mut out = measure(
        s,
        Models {
            main,
            mtp: &mtp,
            mtp_params: burn::module::Module::num_params(&mtp),
            config: &meta.model,
            prompts: &prompts,
        },
        ctx,
        monitor_cfg,
        notes,
    )?;
    if let Some(sw) = &s.sweep {
        sweep(
            s,
            main,
            &full,
            &heldout,
            sw,
            dev,
            &mut out.variants,
            &mut out.notes,
            &mut out.series.mtp_sweep,
        );
    }
    Ok(out)
}

/// The two decoders' models and the prompts they decode.
pub(crate) struct Models<'a, B: Backend> {
    /// The main model (greedy decoding, and the verifier of the speculative one).
    pub main: &'a Decoder<B>,
    /// The drafting MTP modules (depth = the scenario's D).
    pub mtp: &'a MtpPredictor<B>,
    /// Distinct parameters of the drafting modules (a checkpoint's one MTP layer chained D times
    /// holds one module's weights).
    pub mtp_params: usize,
    /// The main model's configuration (analytic cache sizes, step costs).
    pub config: &'a DecoderConfig,
    /// `batch` prompts of `prompt_len` tokens.
    pub prompts: &'a [Vec<u32>],
}

/// Per variant (greedy, speculative) the phases of every timed run, warm-up rounds first.
type Phases = [std::cell::RefCell<Vec<decode::PhaseTimes>>; 2];

/// Both decoders on the same prompts, interleaved rounds; each run also records its prefill
/// and decode phases (SC-002a is the whole job, SC-002b the decode phase alone).
fn timed<B: Backend>(
    m: &Models<'_, B>,
    n: usize,
    monitor: &mut PerformanceMonitor,
    phases: &Phases,
) -> Vec<crate::monitor::Measurement<Decoded>> {
    let (main, mtp, prompts) = (m.main, m.mtp, m.prompts);
    let mut workloads: Vec<Workload<'_, Decoded>> = vec![
        Box::new(|probe| {
            let (out, ph) = decode::greedy_timed(main, prompts, n, PREFILL_CHUNK);
            phases[0].borrow_mut().push(ph);
            probe.checkpoint("decoded");
            Ok((out, None))
        }),
        Box::new(|probe| {
            let (out, st) =
                decode::speculative(main, &Drafter::Mtp(mtp), prompts, n, PREFILL_CHUNK);
            phases[1].borrow_mut().push(st.phases);
            probe.checkpoint("decoded");
            Ok((out, Some(st)))
        }),
    ];
    monitor.measure_interleaved(&["greedy", "speculative"], &mut workloads)
}

/// One report per decoder with its whole-job figures and analytic memory (the speculative
/// decoder also holds the D modules and their caches). Returns them and the median seconds.
fn variant_reports<B: Backend>(
    s: &MtpScenario,
    m: &Models<'_, B>,
    ms: &[crate::monitor::Measurement<Decoded>],
) -> (Vec<VariantReport>, Vec<Option<f64>>) {
    use burn::module::Module;
    let eb = s.run.dtype.bytes();
    let depth = s.mtp.depth;
    let (batch, plen, n) = (s.run.batch, s.run.prompt_len, s.run.new_tokens);
    let main_params = m.main.num_params();
    let layers = m.config.n_layers.max(1);
    let per_layer = m.config.kv_cache_bytes(batch, plen + n + 2 * depth + 2, eb) / layers as u64;
    let mut variants = Vec::new();
    let mut secs = Vec::new();
    for (i, meas) in ms.iter().enumerate() {
        let mut v = VariantReport::from_measurement(meas);
        let (extra_w, extra_layers) = if i == 1 {
            (m.mtp_params, depth)
        } else {
            (0, 0)
        };
        let t = v.timings.as_ref().map(|t| t.median_s);
        v.metrics.insert("generation_s".into(), t);
        v.metrics
            .insert("tokens_per_s".into(), t.map(|t| (batch * n) as f64 / t));
        v.memory.analytic = Some(AnalyticMemory {
            weights_bytes: ((main_params + extra_w) * eb) as u64,
            kv_cache_bytes: per_layer * (layers + extra_layers) as u64,
            activations_bytes: None,
        });
        secs.push(t);
        variants.push(v);
    }
    (variants, secs)
}

/// Decode-phase statistics of each decoder's timed rounds (the monitor's warm-up rounds come
/// first and are skipped), by the statistics module (one median for every figure); their
/// medians and decode tokens/s go into the variants.
fn decode_phase(
    variants: &mut [VariantReport],
    phases: &Phases,
    batch: usize,
    n: usize,
) -> [Option<crate::monitor::Timings>; 2] {
    let stats = |i: usize| -> Option<crate::monitor::Timings> {
        let reps = variants
            .get(i)
            .and_then(|v: &VariantReport| v.timings.as_ref())
            .map(|t| t.samples_s.len())?;
        let all = phases[i].borrow();
        let xs: Vec<f64> = all[all.len().saturating_sub(reps)..]
            .iter()
            .map(|p| p.decode_s)
            .collect();
        crate::monitor::Timings::from_samples(xs, Vec::new())
    };
    let out = [stats(0), stats(1)];
    for (i, t) in out.iter().enumerate() {
        let d = t.as_ref().map(|t| t.median_s);
        if let Some(v) = variants.get_mut(i) {
            v.metrics.insert("decode_phase_s".into(), d);
            v.metrics.insert(
                "decode_tokens_per_s".into(),
                // the first generated token comes from the prefill: n - 1 per sequence here
                d.map(|t| (batch * n.saturating_sub(1)) as f64 / t),
            );
        }
    }
    out
}

/// The note on the verify step's cost and the speculative run's own figures.
fn verify_note(
    s: &MtpScenario,
    (one, verify): (f64, f64),
    stats: Option<&SpecStats>,
    spec: Option<&VariantReport>,
) -> String {
    let (batch, plen, n) = (s.run.batch, s.run.prompt_len, s.run.new_tokens);
    let stat = |k: &str| spec.and_then(|v| v.metrics.get(k).copied().flatten());
    let f = super::fmt_opt;
    format!(
        "verify step ({} tokens) costs {:.2}x a plain one-token step at batch {batch}, context {} \
         ({:.2} ms vs {:.2} ms); acceptance per draft position (given the earlier ones were accepted): {}; \
         mean tokens per verify step {}; on the real (per-sequence) path of the timed runs: \
         verify {} ms/step, drafting {} ms/step (draft/verify {}), host read-backs per step {}",
        s.mtp.depth + 1,
        verify / one,
        plen + n / 2,
        verify * 1e3,
        one * 1e3,
        stats
            .map(SpecStats::acceptance_text)
            .unwrap_or_else(|| "not measured".into()),
        f(stats.and_then(|s| s.mean_accepted_length()), 2),
        f(stat("verify_s_per_step").map(|x| x * 1e3), 2),
        f(stat("draft_s_per_step").map(|x| x * 1e3), 2),
        f(stat("draft_over_verify"), 2),
        f(stat("read_backs_per_step"), 2),
    )
}

/// Greedy against self-speculative decoding of the same prompts, interleaved, with every
/// SC-002 criterion and the figures behind them.
pub(crate) fn measure<B: Backend>(
    s: &MtpScenario,
    m: Models<'_, B>,
    ctx: &BackendContext<B>,
    monitor_cfg: MonitorConfig,
    mut notes: Vec<String>,
) -> anyhow::Result<RunOutput> {
    let (batch, n) = (s.run.batch, s.run.new_tokens);
    let phases: Phases = Default::default();
    let mut monitor =
        PerformanceMonitor::for_backend::<B>(monitor_cfg, &ctx.device, ctx.pool.clone());
    let ms = timed(&m, n, &mut monitor, &phases);
    let (mut variants, secs) = variant_reports(s, &m, &ms);
    let (identical, identical_fraction, stats) =
        compare_outputs(&ms, m.prompts, &mut variants, &mut notes)?;
    let costs = step_costs(s, m.main, m.config, ctx, &mut variants, &mut notes);
    let (tg, ts) = (secs[0], secs[1]);
    let reduction = tg.zip(ts).map(|(g, sp)| 1.0 - sp / g);
    let [dts, dss] = decode_phase(&mut variants, &phases, batch, n);
    let ratio = dts
        .as_ref()
        .zip(dss.as_ref())
        .map(|(g, sp)| g.median_s / sp.median_s);
    let total = |i: usize| variants.get(i).and_then(|v| v.timings.clone());
    let evidence = [
        Evidence::of(
            total(0).as_ref(),
            total(1).as_ref(),
            tg.zip(ts).map(|(g, sp)| sp / g),
        ),
        Evidence::of(dts.as_ref(), dss.as_ref(), ratio),
    ];
    notes.push(verify_note(s, costs, stats.as_ref(), variants.get(1)));
    let criteria = criteria(
        s,
        [reduction, ratio],
        evidence,
        identical,
        identical_fraction,
    );
    Ok(RunOutput {
        variants,
        criteria,
        notes,
        memory_series: monitor.series().to_vec(),
        series: crate::report::ReportSeries {
            mtp_sweep: Vec::new(),
            ..Default::default()
        },
        active_fraction: None,
    })
}

/// Fraction of distinct `n`-grams among all `n`-grams of `seqs` (pooled), or `None` when no
/// sequence is `n` tokens long.
pub fn distinct_ngram_fraction(seqs: &[Vec<u32>], n: usize) -> Option<f64> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0usize;
    for s in seqs {
        for w in s.windows(n.max(1)) {
            seen.insert(w.to_vec());
            total += 1;
        }
    }
    (total > 0).then(|| seen.len() as f64 / total as f64)
}

/// Greedy time over speculative time per token when a plain step (`bytes` read, `flops` done)
/// and a verify step (the same bytes, `k` times the FLOPs, `k` tokens) both run at the limits
/// (`read_gbps`, `gemm_gflops`) and drafting is free: `k · max(R, C) / max(R, k·C)`.
fn speedup_ceiling(bytes: f64, flops: f64, read_gbps: f64, gemm_gflops: f64, k: f64) -> f64 {
    let read = bytes / (read_gbps * 1e9);
    let compute = flops / (gemm_gflops * 1e9);
    k * read.max(compute) / read.max(k * compute)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roofline_ceiling_is_k_when_read_bound_and_1_when_compute_bound() {
        // 1 GB at 1 GB/s (1 s) against 1 GFLOP at 1000 GFLOP/s: read-bound even with 4x the rows
        assert!((speedup_ceiling(1e9, 1e9, 1.0, 1000.0, 4.0) - 4.0).abs() < 1e-12);
        // compute-bound already: 4 tokens cost 4 times the compute, nothing gained
        assert!((speedup_ceiling(1e6, 1e12, 1000.0, 1.0, 4.0) - 1.0).abs() < 1e-12);
        // plain step at the ridge (read time = compute time): the verify step is compute-bound
        // at k times, so again 1; halfway (read = 2 x compute): 4 x 2 / 4 = 2
        assert!((speedup_ceiling(1e9, 1e9, 1.0, 1.0, 4.0) - 1.0).abs() < 1e-12);
        assert!((speedup_ceiling(2e9, 1e9, 1.0, 1.0, 4.0) - 2.0).abs() < 1e-12);
    }

    fn scenario() -> MtpScenario {
        match crate::config::Scenario::builtin(crate::config::ScenarioKind::Mtp) {
            crate::config::Scenario::Mtp(s) => s,
            _ => unreachable!(),
        }
    }

    #[test]
    fn sc002_arithmetic_samples_and_noise_on_fixed_figures() {
        use crate::report::Outcome;
        let s = scenario();
        let ev = |samples, uncertainty| Evidence {
            samples,
            uncertainty,
        };
        let c = criteria(
            &s,
            [Some(0.31), Some(1.45)],
            [ev(3, Some(0.02)), ev(3, Some(0.05))],
            Some(true),
            Some(1.0),
        );
        let ids: Vec<&str> = c.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["SC-002a", "SC-002b", "SC-002-eq"]);
        assert!(c.iter().all(|c| c.passed), "{c:?}");
        assert_eq!(c[0].outcome(), Outcome::Pass);
        assert_eq!(c[0].samples, Some(3));
        // 1.35 against 1.3 with a noise band of 0.1: marginal
        let c = criteria(
            &s,
            [Some(0.31), Some(1.35)],
            [ev(3, Some(0.02)), ev(3, Some(0.1))],
            Some(true),
            Some(1.0),
        );
        assert_eq!(c[1].outcome(), Outcome::Marginal);
        // one sample per side: not measured, whatever the figure
        let c = criteria(
            &s,
            [Some(0.5), Some(2.0)],
            [ev(1, None), ev(1, None)],
            Some(true),
            Some(1.0),
        );
        assert!(c[0].measured.is_none() && c[1].measured.is_none());
        assert!(c[0].note.contains("at least 3"));
        // nothing measured: nothing passes
        let c = criteria(&s, [None, None], [ev(0, None), ev(0, None)], None, None);
        assert!(c.iter().all(|c| !c.passed && c.measured.is_none()));
    }

    #[test]
    fn distinct_ngrams_tell_a_loop_from_varied_text() {
        let varied = vec![(0..40).collect::<Vec<u32>>()];
        assert_eq!(distinct_ngram_fraction(&varied, 4), Some(1.0));
        let looping = vec![[1u32, 2, 3].repeat(20)];
        let f = distinct_ngram_fraction(&looping, 4).unwrap();
        assert!(f < 0.06, "{f}"); // 3 distinct of 57
        assert_eq!(distinct_ngram_fraction(&[vec![1, 2]], 4), None);
    }
}
