//! 基准运行器：每种场景一个运行器，产出变体结果与验收标准判定，再组装成报告。

pub mod calibrate;
pub mod mla;
pub mod moe;
pub mod mtp;
pub mod roofline;
pub mod strategy;

use std::time::Instant;

use crate::backend::machine::{MachineInfo, ToolInfo};
use crate::backend::{BackendContext, BackendKind, SelectedBackend};
use crate::config::Scenario;
use crate::monitor::{MemorySample, MonitorConfig};
use crate::report::spec::OperatingPoint;
use crate::report::{
    BackendReport, Criterion, Report, ReportSeries, VariantReport, Verdict, SCHEMA_VERSION,
};

/// What a runner returns: variants, criteria, run-level notes and the memory time series.
#[derive(Debug, Default)]
pub struct RunOutput {
    /// Variant results.
    pub variants: Vec<VariantReport>,
    /// Criteria verdicts.
    pub criteria: Vec<Criterion>,
    /// Notes (scale, tuning state, what the baseline is).
    pub notes: Vec<String>,
    /// Memory time series.
    pub memory_series: Vec<MemorySample>,
    /// Typed per-kind series (capacity probes, sweep points).
    pub series: ReportSeries,
    /// MoE: the whole model's active-parameter fraction of the MoE variant as built (part of
    /// SC-003a's operating point).
    pub active_fraction: Option<f64>,
}

/// What a timing ratio rests on: the fewer timed samples of its two sides and its noise band,
/// 2 x the larger coefficient of variation of the two sides x the ratio (in the ratio's
/// units; for `1 - ratio` the same band applies).
#[derive(Debug, Clone, Copy, Default)]
pub struct Evidence {
    /// Timed samples on the fewer side (0 when a side was not timed).
    pub samples: usize,
    /// The noise band; `None` when a side has no spread estimate (one sample).
    pub uncertainty: Option<f64>,
}

impl Evidence {
    /// The evidence of `ratio` = (a side over another) from the two sides' timings.
    pub fn of(
        a: Option<&crate::monitor::Timings>,
        b: Option<&crate::monitor::Timings>,
        ratio: Option<f64>,
    ) -> Evidence {
        let n = |t: Option<&crate::monitor::Timings>| t.map(|t| t.samples_s.len()).unwrap_or(0);
        let cv = a
            .and_then(|t| t.cv)
            .zip(b.and_then(|t| t.cv))
            .map(|(x, y)| x.max(y));
        Evidence {
            samples: n(a).min(n(b)),
            uncertainty: cv.zip(ratio).map(|(cv, r)| 2.0 * cv * r.abs()),
        }
    }
}

/// The run's numeric type for report notes: what is stored in `dtype`, what stays in f32.
pub fn dtype_note(dtype: crate::config::Dtype) -> String {
    match dtype {
        crate::config::Dtype::F32 => "f32".into(),
        d => format!(
            "{} (parameters, KV cache, activations; attention softmax statistics and router \
             scores in f32)",
            d.as_str()
        ),
    }
}

/// Tolerance of a same-weights equivalence check (optimised variant vs its standard twin)
/// done inside a benchmark run: `f32_abs` in f32; in half precision 16 machine epsilons
/// (f16 2^-10, bf16 2^-7) relative to the largest reference magnitude (at least 1), since the
/// two forms round differently at every layer. The exact-equality proofs are the f32 tests.
pub fn equivalence_tolerance(dtype: crate::config::Dtype, f32_abs: f64, reference: &[f32]) -> f64 {
    let scale = reference.iter().map(|x| x.abs() as f64).fold(1.0, f64::max);
    match dtype {
        crate::config::Dtype::F32 => f32_abs,
        crate::config::Dtype::F16 => 16.0 * 2f64.powi(-10) * scale,
        crate::config::Dtype::Bf16 => 16.0 * 2f64.powi(-7) * scale,
    }
}

/// Runs a scenario on backend `B` and returns its runner output.
pub fn run_scenario<B: burn::tensor::backend::Backend>(
    scenario: &Scenario,
    ctx: &BackendContext<B>,
    monitor: MonitorConfig,
) -> anyhow::Result<RunOutput> {
    // a scenario starts from a device pool without the pages of scenarios run before it in the
    // same process (`dsopt run <dir>`): reserved-bytes figures are the scenario's own
    B::sync(&ctx.device).ok();
    B::memory_cleanup(&ctx.device);
    // the matmul library's per-thread buffers exist on every thread before any baseline, so a
    // peak does not depend on which worker first packed a block (see the function)
    crate::monitor::alloc::settle_thread_locals();
    match scenario {
        Scenario::Calibrate(s) => calibrate::run(s, ctx, monitor),
        Scenario::Mla(s) => mla::run(s, ctx, monitor),
        Scenario::Moe(s) => moe::run(s, ctx, monitor),
        Scenario::Mtp(s) => mtp::run(s, ctx, monitor),
        Scenario::Model(s) => strategy::run(s, ctx, monitor),
    }
}

/// Assembles a full report (machine, tool, backend, verdict) around a runner's output.
pub fn assemble(
    scenario: &Scenario,
    scenario_file: &str,
    selected: &SelectedBackend,
    started: Instant,
    mut out: RunOutput,
) -> Report {
    let kind = scenario.kind().as_str();
    let op = operating_point(scenario, &out);
    let spec = crate::report::spec::bind(kind, op, &mut out.criteria);
    if !spec.conformant {
        out.notes.push(format!(
            "not the spec's operating point — its criteria carry `@` ids, not the spec's: {}",
            spec.deviations.join("; ")
        ));
    }
    let verdict = Verdict::of(&out.criteria);
    Report {
        schema_version: SCHEMA_VERSION,
        tool: ToolInfo::current(),
        created_at: crate::report::timefmt::rfc3339(crate::report::timefmt::now_secs()),
        wall_time_s: started.elapsed().as_secs_f64(),
        machine: MachineInfo::capture(),
        backend: backend_report(selected),
        scenario_file: scenario_file.to_string(),
        scenario: scenario.to_json(),
        variants: out.variants,
        criteria: out.criteria,
        verdict,
        notes: out.notes,
        memory_series: out.memory_series,
        series: out.series,
        spec: Some(spec),
    }
}

/// The operating point of a run: the facts the spec's claims are bound to (sequence, batch,
/// tokens per step, active fraction, baseline), read from the scenario as run and, for MoE,
/// the model as built; plus the conditions that are stated but not part of it.
pub fn operating_point(scenario: &Scenario, out: &RunOutput) -> OperatingPoint {
    use crate::config::MlaVariant;
    let mut op = OperatingPoint {
        smoke: scenario.smoke(),
        ..Default::default()
    };
    match scenario {
        Scenario::Mla(s) => {
            let has = |v| s.attention.variants.contains(&v);
            op.seq = Some(s.run.seq);
            op.batch = Some(s.run.batch);
            op.baseline =
                (has(MlaVariant::Mha) && has(MlaVariant::MlaAbsorbed)).then(|| "mha".to_string());
            op.stated = vec![
                format!("batch {}", s.run.batch),
                format!("memory budget {} GiB", s.capacity.memory_budget_gib),
                format!("{} layer(s)", s.model.n_layers),
                format!("dtype {}", s.run.dtype.as_str()),
            ];
        }
        Scenario::Mtp(s) => {
            op.batch = Some(s.run.batch);
            op.tokens_per_step = Some(1 + s.mtp.depth);
            op.baseline = Some("greedy".into());
            op.stated = vec![
                format!("{} new tokens per sequence", s.run.new_tokens),
                format!("dtype {}", s.run.dtype.as_str()),
            ];
        }
        Scenario::Moe(s) => {
            op.batch = Some(s.run.decode_batch);
            op.active_fraction = out.active_fraction;
            op.baseline = Some("dense_equal_total".into());
            op.stated = vec![
                format!("decode batch {}", s.run.decode_batch),
                format!(
                    "prefill {} x {} tokens",
                    s.run.prefill_batch, s.run.prefill_seq
                ),
                format!("dtype {}", s.run.dtype.as_str()),
            ];
            if let Some(o) = &s.offload {
                op.stated
                    .push(format!("offload budget {} GiB", o.memory_budget_gib));
            }
        }
        Scenario::Model(_) | Scenario::Calibrate(_) => {}
    }
    op
}

/// The report's backend section.
pub fn backend_report(selected: &SelectedBackend) -> BackendReport {
    BackendReport {
        name: selected.kind.to_string(),
        device: selected.device.clone(),
        features: selected
            .kind
            .features()
            .into_iter()
            .map(String::from)
            .collect(),
    }
}

/// True for backends whose memory is a CubeCL device pool.
pub fn has_device_pool(kind: BackendKind) -> bool {
    matches!(kind, BackendKind::Wgpu | BackendKind::Cuda)
}

/// `[b, s]` deterministic token ids in `[0, vocab)` from `seed` ([`crate::rng::token_ids`]).
pub fn token_tensor<B: burn::tensor::backend::Backend>(
    b: usize,
    s: usize,
    vocab: usize,
    seed: u64,
    dev: &B::Device,
) -> burn::tensor::Tensor<B, 2, burn::tensor::Int> {
    let v: Vec<i64> = crate::rng::token_ids(b * s, vocab, seed)
        .into_iter()
        .map(i64::from)
        .collect();
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(v, [b, s]), dev)
}

/// The prompts in `file`: one per line, ids separated by spaces or commas (`#` starts a
/// comment), or a JSON array of arrays. The first `batch` rows are used, each cut to `len` ids;
/// too few rows, a row shorter than `len`, or an id outside the vocabulary exit 2 naming the
/// file and the row.
pub fn read_prompts(
    file: &std::path::Path,
    batch: usize,
    len: usize,
    vocab: usize,
) -> Result<Vec<Vec<u32>>, crate::DsoptError> {
    let bad = |m: String| {
        crate::DsoptError::Usage(format!(
            "--prompts {}: {m}; write one prompt per line as token ids (e.g. made with the \
             checkpoint's tokenizer in Python), at least {batch} lines of {len} ids",
            file.display()
        ))
    };
    let text = std::fs::read_to_string(file).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let rows: Vec<(String, Vec<u64>)> = if text.trim_start().starts_with('[') {
        let v: Vec<Vec<u64>> = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a JSON array of arrays of token ids: {e}")))?;
        v.into_iter()
            .enumerate()
            .map(|(i, r)| (format!("prompt {}", i + 1), r))
            .collect()
    } else {
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let ids = line
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|t| !t.is_empty())
                .map(|t| {
                    t.parse::<u64>()
                        .map_err(|_| bad(format!("line {}: `{t}` is not a token id", i + 1)))
                })
                .collect::<Result<Vec<u64>, _>>()?;
            rows.push((format!("line {}", i + 1), ids));
        }
        rows
    };
    if rows.len() < batch {
        return Err(bad(format!(
            "{} prompt(s), but the run's batch is {batch}",
            rows.len()
        )));
    }
    rows.into_iter()
        .take(batch)
        .map(|(line, ids)| {
            if ids.len() < len {
                return Err(bad(format!(
                    "{line} has {} ids, fewer than the {len} the run needs",
                    ids.len()
                )));
            }
            ids.into_iter()
                .take(len)
                .map(|t| {
                    if t < vocab as u64 {
                        Ok(t as u32)
                    } else {
                        Err(bad(format!(
                            "{line}: id {t} is outside the vocabulary of {vocab}"
                        )))
                    }
                })
                .collect()
        })
        .collect()
}

/// Prompt rows given by the user, and a sentence saying where they came from.
pub type GivenPrompts = (Vec<Vec<u32>>, String);

/// The prompts of a checkpoint run: the rows of `ids` (a file of token ids, [`read_prompts`]) or
/// of `text` (one prompt per line, made into ids by `model_dir`'s own `tokenizer.json`), `batch`
/// rows of `len` ids, with a sentence saying where they came from; `None` for neither (the run
/// uses random ids). Both given: exit 2.
pub fn checkpoint_prompts(
    ids: Option<&std::path::Path>,
    text: Option<&std::path::Path>,
    model_dir: &std::path::Path,
    batch: usize,
    len: usize,
    vocab: usize,
) -> Result<Option<GivenPrompts>, crate::DsoptError> {
    match (ids, text) {
        (Some(a), Some(b)) => Err(crate::DsoptError::Usage(format!(
            "run.prompts {} and run.prompt_text {}: give the prompts once, as token ids or as \
             text",
            a.display(),
            b.display()
        ))),
        (Some(f), None) => Ok(Some((
            read_prompts(f, batch, len, vocab)?,
            format!("token ids from {}", f.display()),
        ))),
        (None, Some(f)) => Ok(Some((
            crate::checkpoint::tokenizer::text_prompts(model_dir, f, batch, len, vocab)?,
            format!(
                "text from {}, one prompt per line, made into ids by {}",
                f.display(),
                model_dir.join("tokenizer.json").display()
            ),
        ))),
        (None, None) => Ok(None),
    }
}

/// `x` with `digits` decimals, or "not measured".
pub(crate) fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "not measured".into())
}

#[cfg(test)]
mod prompt_tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn prompt_files_are_read_checked_and_cut() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.txt");
        std::fs::write(&f, "# ids\n1 2 3 4\n\n5,6,7, 8 9\n").unwrap();
        assert_eq!(
            read_prompts(&f, 2, 3, 10).unwrap(),
            vec![vec![1, 2, 3], vec![5, 6, 7]]
        );
        let j = dir.path().join("p.json");
        std::fs::write(&j, "[[1, 2], [3, 4], [5, 6]]").unwrap();
        assert_eq!(read_prompts(&j, 1, 2, 10).unwrap(), vec![vec![1, 2]]);
        let err = |f: &Path, b, l, v| read_prompts(f, b, l, v).unwrap_err().to_string();
        assert!(err(&f, 3, 3, 10).contains("2 prompt(s)"));
        assert!(err(&f, 2, 5, 10).contains("line 2 has 4 ids"));
        assert!(err(&f, 2, 3, 6).contains("id 6 is outside"));
        std::fs::write(&f, "1 x 3\n").unwrap();
        assert!(err(&f, 1, 1, 10).contains("line 1: `x`"));
        assert!(err(&dir.path().join("none"), 1, 1, 10).contains("cannot read"));
    }
}

#[cfg(test)]
mod spec_tests {
    use super::*;
    use crate::config::{Scenario, ScenarioKind};
    use crate::report::spec::{bind, operating_deviations};

    /// The deviations of scenario `s` from the spec's operating point, with SC-003a's active
    /// fraction taken from the MoE variant as built (what the runner measures).
    fn deviations(s: &Scenario) -> Vec<(String, String)> {
        let active_fraction = match s {
            Scenario::Moe(m) => {
                let c = m.decoder_config(crate::config::MoeVariant::Moe);
                Some(strategy::active_params(&c) as f64 / c.params() as f64)
            }
            _ => None,
        };
        let out = RunOutput {
            active_fraction,
            ..Default::default()
        };
        operating_deviations(s.kind().as_str(), &operating_point(s, &out))
    }

    /// The shipped default scenarios are at the spec's operating point, so their reports carry
    /// the spec's ids.
    #[test]
    fn the_default_scenarios_are_spec_conformant() {
        for kind in [ScenarioKind::Mla, ScenarioKind::Mtp, ScenarioKind::Moe] {
            let s = Scenario::builtin(kind);
            assert!(deviations(&s).is_empty(), "{kind:?}: {:?}", deviations(&s));
        }
    }

    /// The GPU scenarios (`scripts/gpu-check.sh`) are at the spec's operating point too (SC-003's
    /// 13B / 1.3B model: whole-model active fraction in the 8-12 % band), except the pool smoke,
    /// which is a smoke scenario and must say so.
    #[test]
    fn the_gpu_scenarios_are_spec_conformant() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/gpu");
        let mut seen = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().and_then(|x| x.to_str()) != Some("toml") {
                continue;
            }
            let s = Scenario::load(&path).unwrap();
            let d = deviations(&s);
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .contains("smoke")
            {
                assert!(
                    d.iter().any(|(k, _)| k == "smoke"),
                    "{}: {d:?}",
                    path.display()
                );
            } else {
                assert!(d.is_empty(), "{}: {d:?}", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 2, "the SC-001 and SC-003 GPU scenarios");
    }

    /// A smoke scenario and a command-line override off the spec's point rename the criteria.
    #[test]
    fn smoke_and_overrides_leave_the_spec_point() {
        let mut s = Scenario::builtin(ScenarioKind::Mtp);
        if let Scenario::Mtp(m) = &mut s {
            m.run.batch = 1;
        }
        let mut c = vec![Criterion::evaluate(
            "SC-002b",
            "m",
            crate::report::Comparison::AtLeast,
            1.3,
            Some(1.337),
            "",
        )];
        let st = bind("mtp", operating_point(&s, &RunOutput::default()), &mut c);
        assert!(!st.conformant);
        assert_eq!(c[0].id, "SC-002b@batch1");
        let mut s = Scenario::builtin(ScenarioKind::Mla);
        if let Scenario::Mla(m) = &mut s {
            m.smoke = true;
        }
        let op = operating_point(&s, &RunOutput::default());
        assert_eq!(operating_deviations("mla", &op)[0].0, "smoke");
    }
}
