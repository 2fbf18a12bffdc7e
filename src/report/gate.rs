//! CI 门禁：读取报告，逐条列出验收标准；可与基线报告比较，发现超出噪声的退化。
//!
//! The gate trusts nothing stored (see [`gate`]). Exit codes: 0 every expected criterion was
//! measured and passed and no regression · 1 a criterion failed, is missing, could not be measured
//! or is not applicable, a stored flag or verdict disagrees with the measured values, or a
//! regression · 2 a report is missing, unreadable, of an unknown schema or scenario kind, or a
//! baseline measured differently (unless `--allow-different-machine`).

use std::path::{Path, PathBuf};

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use super::schema::*;
use crate::error::{most_severe, DsoptError, EXIT_FAIL, EXIT_PASS};

/// The `kind` of an aggregate file (`summary`, `compare`, `sweep`) written by `dsopt run`,
/// `compare` or a sweep; `None` for a single-run report or an unreadable file (which
/// [`load`] then reports).
pub fn aggregate_kind(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let kind = v.get("kind")?.as_str()?;
    matches!(kind, "summary" | "compare" | "sweep").then(|| kind.to_string())
}

/// Reads a report, checking `schema_version` before anything else.
pub fn load(path: &Path) -> Result<Report, DsoptError> {
    let bad = |message: String| DsoptError::Report {
        file: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("not valid JSON ({e}); the file may be truncated")))?;
    match value.get("schema_version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        Some(v) => {
            return Err(bad(format!(
                "unknown schema_version {v} (this dsopt reads {SCHEMA_VERSION}); use the dsopt \
                 version that wrote it"
            )))
        }
        None => return Err(bad("no schema_version: not a dsopt report".into())),
    }
    serde_json::from_value(value).map_err(|e| bad(format!("does not match schema 1: {e}")))
}

/// One line of the gate table.
#[derive(Debug, Clone)]
pub struct GateRow {
    /// Report file.
    pub file: PathBuf,
    /// Criterion id, or `regression`.
    pub id: String,
    /// What was checked.
    pub metric: String,
    /// Threshold or baseline value.
    pub threshold: String,
    /// Measured value.
    pub measured: String,
    /// Passed?
    pub passed: bool,
}

/// The gate's decision.
#[derive(Debug, Clone)]
pub struct GateOutcome {
    /// Every row, criteria then regressions.
    pub rows: Vec<GateRow>,
    /// Human descriptions of regressions found against the baseline.
    pub regressions: Vec<String>,
    /// Criteria present in a report but left out by `--require` (printed, not gated).
    pub not_checked: Vec<String>,
    /// 0 or 1.
    pub exit_code: i32,
}

/// What the user asked the gate to check.
#[derive(Debug, Clone, Default)]
pub struct GateOptions {
    /// Gate only these criterion ids (`--require`); `None` = every criterion the scenario kind
    /// must contain. Criteria left out are listed as not checked.
    pub require: Option<Vec<String>>,
    /// Relative noise threshold for baseline regressions.
    pub noise: f64,
    /// Accept a baseline measured on another machine, backend, device or scenario settings.
    pub allow_different_machine: bool,
}

/// Gates `reports`, trusting nothing stored: each criterion's `passed` is recomputed from its
/// measured value, comparison and threshold and must agree with the stored flag; the report's
/// verdict must agree with its criteria; every criterion the scenario kind must contain has to
/// be present, measured and passed (a `not_applicable` one fails unless left out with
/// `--require`). With a baseline, also fails on regressions beyond `noise` (relative) and beyond
/// the measured spread.
///
/// Errors (exit 2): an unknown scenario kind, or a baseline that does not match (see
/// [`baseline_mismatch`]).
pub fn gate(
    reports: &[(PathBuf, Report)],
    baseline: Option<&Report>,
    opts: &GateOptions,
) -> Result<GateOutcome, DsoptError> {
    let mut rows = Vec::new();
    let mut regressions = Vec::new();
    let mut not_checked = Vec::new();
    for (file, r) in reports {
        let row = |id: &str, metric: String, threshold: String, measured: String, passed| GateRow {
            file: file.clone(),
            id: id.into(),
            metric,
            threshold,
            measured,
            passed,
        };
        let kind = r
            .scenario
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        let sid = r.scenario.get("id").and_then(|k| k.as_str()).unwrap_or("");
        let expected = expected_criteria(kind, sid).ok_or_else(|| DsoptError::Report {
            file: file.clone(),
            message: format!(
                "unknown scenario kind `{kind}`: the gate does not know which criteria it must \
                 contain (calibrate, mla, mtp, moe, model)"
            ),
        })?;
        let wanted: Vec<String> = match &opts.require {
            Some(ids) => ids.clone(),
            None => expected.clone(),
        };
        for c in &r.criteria {
            if !wanted.contains(&c.id) {
                not_checked.push(format!("{}: {}", file.display(), c.id));
                continue;
            }
            let recomputed = c.recomputed_pass();
            let threshold = format!("{} {}", c.comparison.symbol(), c.threshold);
            let measured = super::write::num_h(c.measured);
            let metric = if let Some(why) = &c.not_applicable {
                format!("{} — not applicable: {why}", c.metric)
            } else if recomputed != c.passed {
                format!(
                    "{} — stored passed={} disagrees with measured {} {}",
                    c.metric, c.passed, measured, threshold
                )
            } else {
                c.metric.clone()
            };
            rows.push(row(
                &c.id,
                metric,
                threshold,
                measured,
                recomputed && recomputed == c.passed,
            ));
        }
        for id in &wanted {
            if !r.criteria.iter().any(|c| &c.id == id) {
                let what = if expected.contains(id) {
                    format!("missing: a {kind} report must contain this criterion")
                } else {
                    "missing: required with --require but not in the report".into()
                };
                rows.push(row(id, what, "-".into(), "-".into(), false));
            }
        }
        // the stored verdict must be the one its criteria give
        let verdict = Verdict::of(&r.criteria);
        let agrees = verdict == r.verdict;
        if !agrees || opts.require.is_none() {
            rows.push(row(
                "verdict",
                if agrees {
                    "report verdict (recomputed from its criteria)".into()
                } else {
                    format!(
                        "stored verdict `{}` disagrees with its criteria (`{}`)",
                        r.verdict.as_str(),
                        verdict.as_str()
                    )
                },
                "pass".into(),
                r.verdict.as_str().into(),
                agrees && r.verdict == Verdict::Pass,
            ));
        }
        if let Some(base) = baseline {
            if let Some(why) = baseline_mismatch(r, base) {
                if !opts.allow_different_machine {
                    return Err(DsoptError::Report {
                        file: file.clone(),
                        message: format!(
                            "the baseline was measured differently ({why}); a regression check \
                             across them would compare unlike things — pass \
                             --allow-different-machine to compare anyway"
                        ),
                    });
                }
                eprintln!(
                    "gate: warning: baseline differs from {} ({why})",
                    file.display()
                );
            }
            for reg in compare(r, base, opts.noise) {
                rows.push(row(
                    "regression",
                    reg.clone(),
                    format!("noise {:.0} %", opts.noise * 100.0),
                    "worse".into(),
                    false,
                ));
                regressions.push(format!("{}: {reg}", file.display()));
            }
        }
    }
    let exit_code = most_severe(
        rows.iter()
            .map(|r| if r.passed { EXIT_PASS } else { EXIT_FAIL }),
    );
    Ok(GateOutcome {
        rows,
        regressions,
        not_checked,
        exit_code,
    })
}

/// Why `base` is not a like-for-like baseline of `cur`: the first of scenario (id, kind and
/// every value after overrides: sizes, batch, dtype), backend, device, or machine (CPU, cores)
/// that differs; `None` when they match.
pub fn baseline_mismatch(cur: &Report, base: &Report) -> Option<String> {
    let field =
        |what: &str, a: String, b: String| (a != b).then(|| format!("{what}: {a} vs baseline {b}"));
    let scenario = if cur.scenario == base.scenario {
        None
    } else {
        // name the first differing top-level section, then the key inside it
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        let mut diff = String::from("scenario");
        for k in keys(&cur.scenario).into_iter().chain(keys(&base.scenario)) {
            let (a, b) = (cur.scenario.get(&k), base.scenario.get(&k));
            if a != b {
                diff = format!("scenario.{k}");
                if let (Some(a), Some(b)) =
                    (a.and_then(|a| a.as_object()), b.and_then(|b| b.as_object()))
                {
                    if let Some(kk) = a.keys().chain(b.keys()).find(|kk| a.get(*kk) != b.get(*kk)) {
                        diff = format!(
                            "scenario.{k}.{kk}: {} vs baseline {}",
                            a.get(kk).map(|v| v.to_string()).unwrap_or("absent".into()),
                            b.get(kk).map(|v| v.to_string()).unwrap_or("absent".into())
                        );
                    }
                }
                break;
            }
        }
        Some(diff)
    };
    scenario
        .or_else(|| {
            field(
                "backend",
                cur.backend.name.clone(),
                base.backend.name.clone(),
            )
        })
        .or_else(|| {
            field(
                "device",
                cur.backend.device.clone(),
                base.backend.device.clone(),
            )
        })
        .or_else(|| {
            field(
                "machine cpu",
                cur.machine.cpu.clone(),
                base.machine.cpu.clone(),
            )
        })
        .or_else(|| {
            field(
                "machine cores",
                cur.machine.cores.to_string(),
                base.machine.cores.to_string(),
            )
        })
}

/// Regressions of `cur` against `base` (same scenario id only; [`gate`] has already refused
/// an unlike baseline).
pub fn compare(cur: &Report, base: &Report, noise: f64) -> Vec<String> {
    let mut out = Vec::new();
    if cur.scenario.get("id") != base.scenario.get("id") {
        return out;
    }
    for v in &cur.variants {
        let Some(b) = base.variants.iter().find(|b| b.name == v.name) else {
            continue;
        };
        if let (Some(t), Some(bt)) = (&v.timings, &b.timings) {
            let slower = t.median_s - bt.median_s;
            // the measured spread of both runs (none known from a single sample: 0)
            let spread = t.stddev_s.unwrap_or(0.0) + bt.stddev_s.unwrap_or(0.0);
            if t.median_s > bt.median_s * (1.0 + noise) && slower > spread {
                out.push(format!(
                    "variant {} median time {:.6} s vs baseline {:.6} s (+{:.1} %)",
                    v.name,
                    t.median_s,
                    bt.median_s,
                    slower / bt.median_s * 100.0
                ));
            }
        }
    }
    for c in &cur.criteria {
        let Some(b) = base.criteria.iter().find(|b| b.id == c.id) else {
            continue;
        };
        if let (Some(m), Some(bm)) = (c.measured, b.measured) {
            let worse = match c.comparison {
                Comparison::AtLeast => m < bm - noise * bm.abs(),
                Comparison::AtMost => m > bm + noise * bm.abs(),
            };
            if worse {
                out.push(format!(
                    "criterion {} {} = {m} vs baseline {bm}",
                    c.id, c.metric
                ));
            }
        }
    }
    out
}

/// The gate table.
pub fn table(o: &GateOutcome) -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header(vec![
        "report",
        "criterion",
        "metric",
        "threshold",
        "measured",
        "verdict",
    ]);
    for r in &o.rows {
        t.add_row(vec![
            r.file
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default(),
            r.id.clone(),
            r.metric.clone(),
            r.threshold.clone(),
            r.measured.clone(),
            if r.passed {
                "PASS".into()
            } else {
                "FAIL".into()
            },
        ]);
    }
    t
}
