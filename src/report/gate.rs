//! CI 门禁：读取报告，逐条列出验收标准；可与基线报告比较，发现超出噪声的退化。
//!
//! Exit codes: 0 every criterion passed and no regression · 1 a criterion failed (or could not be
//! measured) or a regression · 2 a report is missing, unreadable or of an unknown schema.

use std::path::{Path, PathBuf};

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use super::schema::*;
use crate::error::{DsoptError, EXIT_FAIL, EXIT_PASS};

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
    /// 0 or 1.
    pub exit_code: i32,
}

/// Gates `reports`; with a `baseline`, also fails on regressions beyond `noise` (relative)
/// and beyond the measured spread.
pub fn gate(reports: &[(PathBuf, Report)], baseline: Option<&Report>, noise: f64) -> GateOutcome {
    let mut rows = Vec::new();
    let mut regressions = Vec::new();
    for (file, r) in reports {
        if r.criteria.is_empty() {
            rows.push(GateRow {
                file: file.clone(),
                id: "-".into(),
                metric: "report has no criteria".into(),
                threshold: "-".into(),
                measured: "-".into(),
                passed: false,
            });
        }
        for c in &r.criteria {
            rows.push(GateRow {
                file: file.clone(),
                id: c.id.clone(),
                metric: c.metric.clone(),
                threshold: format!("{} {}", c.comparison.symbol(), c.threshold),
                measured: super::write::num_h(c.measured),
                passed: c.passed,
            });
        }
        if let Some(base) = baseline {
            for reg in compare(r, base, noise) {
                rows.push(GateRow {
                    file: file.clone(),
                    id: "regression".into(),
                    metric: reg.clone(),
                    threshold: format!("noise {:.0} %", noise * 100.0),
                    measured: "worse".into(),
                    passed: false,
                });
                regressions.push(format!("{}: {reg}", file.display()));
            }
        }
    }
    let exit_code = if rows.iter().all(|r| r.passed) {
        EXIT_PASS
    } else {
        EXIT_FAIL
    };
    GateOutcome {
        rows,
        regressions,
        exit_code,
    }
}

/// Regressions of `cur` against `base` (same scenario id only).
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
            if t.median_s > bt.median_s * (1.0 + noise) && slower > t.stddev_s + bt.stddev_s {
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
