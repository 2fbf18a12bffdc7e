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
        Some(v) if (u64::from(OLDEST_READABLE_SCHEMA)..=u64::from(SCHEMA_VERSION)).contains(&v) => {
        }
        Some(v) => {
            return Err(bad(format!(
                "unknown schema_version {v} (this dsopt reads {OLDEST_READABLE_SCHEMA} to \
                 {SCHEMA_VERSION}); use the dsopt version that wrote it"
            )))
        }
        None => return Err(bad("no schema_version: not a dsopt report".into())),
    }
    serde_json::from_value(value)
        .map_err(|e| bad(format!("does not match schema {SCHEMA_VERSION}: {e}")))
}

/// Why report `r` of scenario kind `kind` is not at the spec's operating point, recomputed
/// from what it records (its operating point, its criteria's ids and thresholds) — the stored
/// `conformant` flag is not trusted. Empty for a conformant report and for kinds without spec
/// criteria (calibrate, model).
pub fn off_spec_reasons(kind: &str, r: &Report) -> Vec<String> {
    let spec_ids = super::spec::ids(kind);
    if spec_ids.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    match &r.spec {
        None => out.push(format!(
            "a schema-version-{} report: it records no operating point",
            r.schema_version
        )),
        Some(st) => {
            out.extend(
                super::spec::operating_deviations(kind, &st.operating_point)
                    .into_iter()
                    .map(|(_, d)| d),
            );
            if !st.conformant && st.deviations.is_empty() {
                out.push("the report marks itself not conformant".into());
            }
        }
    }
    out.extend(
        r.criteria
            .iter()
            .filter_map(super::spec::threshold_deviation)
            .map(|(_, d)| d),
    );
    if out.is_empty() && !r.criteria.iter().any(|c| spec_ids.contains(&c.id.as_str())) {
        let held: Vec<&str> = r.criteria.iter().map(|c| c.id.as_str()).collect();
        out.push(format!(
            "it holds none of the spec's {kind} criteria ({}), only: {}",
            spec_ids.join(", "),
            if held.is_empty() {
                "none".to_string()
            } else {
                held.join(", ")
            }
        ));
    }
    out.dedup();
    out
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
    /// What the verdict column shows when it is not plain PASS/FAIL (`PASS (marginal)`,
    /// `INCONCLUSIVE`, `NOT MEASURED`, `N/A`).
    pub label: Option<String>,
}

/// The gate's decision.
#[derive(Debug, Clone)]
pub struct GateOutcome {
    /// Every row, criteria then regressions.
    pub rows: Vec<GateRow>,
    /// Human descriptions of regressions found against the baseline.
    pub regressions: Vec<String>,
    /// Criteria present in a report but not gated (left out by `--require`, or off the spec's
    /// operating point), each with the reason (printed).
    pub not_checked: Vec<String>,
    /// Deviations from the spec's operating point that `--allow-off-spec` let through
    /// (printed).
    pub off_spec_allowed: Vec<String>,
    /// Equivalence dependencies `--require` added (printed).
    pub added: Vec<String>,
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
    /// Gate a report measured off the spec's operating point (its deviations printed) instead
    /// of failing it; its `@` criteria then stand for the spec ids they measure.
    pub allow_off_spec: bool,
    /// Fail marginal passes (closer to the threshold than the run's own noise) too.
    pub strict: bool,
}

/// Gates `reports`, trusting nothing stored: each criterion's `passed` is recomputed from its
/// measured value, comparison, threshold and equivalence dependencies and must agree with the
/// stored flag; the report's verdict must agree with its criteria; every criterion the scenario
/// kind must contain has to be present, measured and passed (a `not_applicable` one fails
/// unless left out with `--require`); a report measured off the spec's operating point fails
/// unless `--allow-off-spec`. With a baseline, also fails on regressions beyond `noise`
/// (relative) and beyond the measured spread.
///
/// Errors (exit 2): an unknown scenario kind, or a baseline that does not match (see
/// [`baseline_mismatch`]).
pub fn gate(
    reports: &[(PathBuf, Report)],
    baseline: Option<&Report>,
    opts: &GateOptions,
) -> Result<GateOutcome, DsoptError> {
    let mut out = GateOutcome {
        rows: Vec::new(),
        regressions: Vec::new(),
        not_checked: Vec::new(),
        off_spec_allowed: Vec::new(),
        added: Vec::new(),
        exit_code: EXIT_PASS,
    };
    for (file, r) in reports {
        let g = OneReport::new(file, r, opts)?;
        g.off_spec(&mut out);
        let wanted = g.wanted(&mut out.added);
        g.criteria(&wanted, &mut out);
        g.verdict(&mut out.rows);
        if let Some(base) = baseline {
            g.baseline(base, &mut out)?;
        }
    }
    out.exit_code = most_severe(
        out.rows
            .iter()
            .map(|r| if r.passed { EXIT_PASS } else { EXIT_FAIL }),
    );
    Ok(out)
}

/// The gate's work on one report.
struct OneReport<'a> {
    file: &'a Path,
    r: &'a Report,
    opts: &'a GateOptions,
    kind: &'a str,
    expected: Vec<String>,
}

impl<'a> OneReport<'a> {
    fn new(file: &'a Path, r: &'a Report, opts: &'a GateOptions) -> Result<Self, DsoptError> {
        let kind = r
            .scenario
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("");
        let sid = r.scenario.get("id").and_then(|k| k.as_str()).unwrap_or("");
        let expected = expected_criteria(kind, sid).ok_or_else(|| DsoptError::Report {
            file: file.to_path_buf(),
            message: format!(
                "unknown scenario kind `{kind}`: the gate does not know which criteria it must \
                 contain (calibrate, mla, mtp, moe, model)"
            ),
        })?;
        Ok(OneReport {
            file,
            r,
            opts,
            kind,
            expected,
        })
    }

    fn row(
        &self,
        id: &str,
        metric: String,
        threshold: String,
        measured: String,
        passed: bool,
    ) -> GateRow {
        GateRow {
            file: self.file.to_path_buf(),
            id: id.into(),
            metric,
            threshold,
            measured,
            passed,
            label: None,
        }
    }

    /// Off the spec's operating point: a failing row per deviation, or (allowed) printed.
    fn off_spec(&self, out: &mut GateOutcome) {
        for d in off_spec_reasons(self.kind, self.r) {
            if self.opts.allow_off_spec {
                out.off_spec_allowed
                    .push(format!("{}: {d}", self.file.display()));
            } else {
                out.rows.push(self.row(
                    "off-spec",
                    format!("not the spec's operating point: {d}"),
                    "spec point".into(),
                    "elsewhere".into(),
                    false,
                ));
            }
        }
    }

    /// Whether criterion `c` stands for wanted id `w`: by its id, or (off-spec allowed) by the
    /// spec id it measures.
    fn stands_for(&self, c: &Criterion, w: &str) -> bool {
        c.id == w || (self.opts.allow_off_spec && c.spec_id.as_deref() == Some(w))
    }

    /// The ids to gate: `--require`'s (with each one's equivalence dependencies, said in
    /// `added`) or every one the kind must contain.
    fn wanted(&self, added: &mut Vec<String>) -> Vec<String> {
        let Some(required) = &self.opts.require else {
            return self.expected.clone();
        };
        let mut wanted = required.clone();
        let mut i = 0;
        while i < wanted.len() {
            let deps: Vec<String> = self
                .r
                .criteria
                .iter()
                .find(|c| self.stands_for(c, &wanted[i]))
                .map(|c| c.depends_on.clone())
                .unwrap_or_default();
            for d in deps {
                // allowed off-spec, a renamed dependency is asked for by its spec id
                let d = self
                    .r
                    .criteria
                    .iter()
                    .find(|c| c.id == d)
                    .filter(|_| self.opts.allow_off_spec)
                    .and_then(|c| c.spec_id.clone())
                    .unwrap_or(d);
                if !wanted.contains(&d) {
                    added.push(format!(
                        "{}: --require {} adds its equivalence dependency {d}",
                        self.file.display(),
                        wanted[i]
                    ));
                    wanted.push(d);
                }
            }
            i += 1;
        }
        wanted
    }

    /// A row per wanted criterion, recomputed; missing ones fail; the rest are listed as not
    /// checked.
    fn criteria(&self, wanted: &[String], out: &mut GateOutcome) {
        for c in &self.r.criteria {
            if !wanted.iter().any(|w| self.stands_for(c, w)) {
                let why = if c.off_spec.is_some() && !self.opts.allow_off_spec {
                    "off the spec's operating point"
                } else {
                    "left out by --require"
                };
                out.not_checked
                    .push(format!("{}: {} ({why})", self.file.display(), c.id));
                continue;
            }
            out.rows.push(self.criterion_row(c));
        }
        for id in wanted {
            // a spec criterion measured off the spec's point is not missing: its off-spec rows
            // already fail the report
            let renamed = self
                .r
                .criteria
                .iter()
                .any(|c| c.spec_id.as_deref() == Some(id.as_str()));
            if !self.r.criteria.iter().any(|c| self.stands_for(c, id)) && !renamed {
                let what = if self.expected.contains(id) {
                    format!(
                        "missing: a {} report must contain this criterion",
                        self.kind
                    )
                } else {
                    "missing: required with --require but not in the report".into()
                };
                out.rows
                    .push(self.row(id, what, "-".into(), "-".into(), false));
            }
        }
    }

    /// One criterion, recomputed with its dependencies and outcome.
    fn criterion_row(&self, c: &Criterion) -> GateRow {
        let failed_deps = super::spec::failed_dependencies(c, &self.r.criteria);
        let recomputed = c.recomputed_pass() && failed_deps.is_empty();
        let threshold = format!("{} {}", c.comparison.symbol(), c.threshold);
        let measured = super::write::num_h(c.measured);
        let deps = failed_deps.join(", ");
        let metric = if let Some(why) = &c.not_applicable {
            format!("{} — not applicable: {why}", c.metric)
        } else if recomputed != c.passed {
            format!(
                "{} — stored passed={} disagrees with measured {measured} {threshold}{}",
                c.metric,
                c.passed,
                if deps.is_empty() {
                    String::new()
                } else {
                    format!(" and failed dependency {deps}")
                }
            )
        } else if !deps.is_empty() {
            format!(
                "{} — its equivalence dependency {deps} did not pass",
                c.metric
            )
        } else {
            c.metric.clone()
        };
        let outcome = c.outcome();
        let marginal_fails = self.opts.strict && outcome == Outcome::Marginal;
        let metric = if marginal_fails {
            format!(
                "{metric} — marginal: within the run's noise of the threshold (± {}), failed by \
                 --strict",
                super::write::num_h(c.uncertainty)
            )
        } else {
            metric
        };
        let passed = recomputed && recomputed == c.passed && !marginal_fails;
        let mut line = self.row(&c.id, metric, threshold, measured, passed);
        if outcome != Outcome::Pass && outcome != Outcome::Fail {
            line.label = Some(outcome.label().to_string());
        }
        line
    }

    /// The stored verdict must be the one its criteria give (and, gating everything, pass).
    fn verdict(&self, rows: &mut Vec<GateRow>) {
        let r = self.r;
        let verdict = Verdict::of(&r.criteria);
        let agrees = verdict == r.verdict;
        if agrees && self.opts.require.is_some() {
            return;
        }
        rows.push(self.row(
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

    /// Regressions against `base` (refused with exit 2 when it was measured differently,
    /// unless allowed).
    fn baseline(&self, base: &Report, out: &mut GateOutcome) -> Result<(), DsoptError> {
        if let Some(why) = baseline_mismatch(self.r, base) {
            if !self.opts.allow_different_machine {
                return Err(DsoptError::Report {
                    file: self.file.to_path_buf(),
                    message: format!(
                        "the baseline was measured differently ({why}); a regression check \
                         across them would compare unlike things — pass \
                         --allow-different-machine to compare anyway"
                    ),
                });
            }
            eprintln!(
                "gate: warning: baseline differs from {} ({why})",
                self.file.display()
            );
        }
        for reg in compare(self.r, base, self.opts.noise) {
            out.rows.push(self.row(
                "regression",
                reg.clone(),
                format!("noise {:.0} %", self.opts.noise * 100.0),
                "worse".into(),
                false,
            ));
            out.regressions
                .push(format!("{}: {reg}", self.file.display()));
        }
        Ok(())
    }
}

/// Why `base` is not a like-for-like baseline of `cur`: the first of scenario (id, kind and
/// every value after overrides: sizes, batch, dtype), backend, device, or machine (CPU, cores,
/// SIMD level of the CPU kernels)
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
        .or_else(|| {
            // the CPU kernels' SIMD level (DSOPT_SIMD lowers it); a report without one (written
            // before it was recorded) is not compared on it
            match (&cur.machine.simd, &base.machine.simd) {
                (Some(c), Some(b)) => field(
                    "SIMD level",
                    compared_level(c, &cur.scenario),
                    compared_level(b, &base.scenario),
                ),
                _ => None,
            }
        })
}

/// The SIMD level as baselines compare it: `avx512bf16` counts as `avx512` for a run whose
/// scenario has no bf16 `dtype` (the two levels differ only in the attention on bf16 caches).
fn compared_level(level: &str, scenario: &serde_json::Value) -> String {
    fn has_bf16(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(o) => o
                .iter()
                .any(|(k, x)| (k == "dtype" && x.as_str() == Some("bf16")) || has_bf16(x)),
            serde_json::Value::Array(a) => a.iter().any(has_bf16),
            _ => false,
        }
    }
    if level == "avx512bf16" && !has_bf16(scenario) {
        "avx512".into()
    } else {
        level.into()
    }
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
            match (&r.label, r.passed) {
                (Some(l), true) => l.clone(),
                (Some(l), false) => format!("FAIL ({l})"),
                (None, true) => "PASS".into(),
                (None, false) => "FAIL".into(),
            },
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::machine::{MachineInfo, ToolInfo};
    use crate::report::spec::{bind, OperatingPoint};
    use Comparison::{AtLeast, AtMost};

    fn crit(id: &str, cmp: Comparison, thr: f64, m: f64) -> Criterion {
        Criterion::evaluate(id, "m", cmp, thr, Some(m), "")
    }

    fn timing(id: &str, thr: f64, m: f64, samples: usize, band: f64) -> Criterion {
        Criterion::timing(id, "t", AtLeast, thr, Some(m), "", samples, Some(band))
    }

    fn report(kind: &str, op: OperatingPoint, mut criteria: Vec<Criterion>) -> Report {
        let spec = bind(kind, op, &mut criteria);
        Report {
            schema_version: SCHEMA_VERSION,
            tool: ToolInfo::current(),
            created_at: "2026-12-06T00:00:00Z".into(),
            wall_time_s: 1.0,
            machine: MachineInfo::capture(),
            backend: BackendReport {
                name: "flex".into(),
                device: "cpu".into(),
                features: vec![],
            },
            scenario_file: "s.toml".into(),
            scenario: serde_json::json!({"id": "SC", "kind": kind}),
            variants: vec![],
            verdict: Verdict::of(&criteria),
            criteria,
            notes: vec![],
            memory_series: vec![],
            series: Default::default(),
            spec: Some(spec),
        }
    }

    fn mtp(batch: usize, eq: f64, b: Criterion) -> Report {
        let op = OperatingPoint {
            batch: Some(batch),
            tokens_per_step: Some(4),
            baseline: Some("greedy".into()),
            ..Default::default()
        };
        report(
            "mtp",
            op,
            vec![
                timing("SC-002a", 0.25, 0.40, 3, 0.02),
                b,
                crit("SC-002-eq", AtLeast, 1.0, eq),
            ],
        )
    }

    fn mla(seq: usize, smoke: bool, a_threshold: f64, b: Criterion) -> Report {
        let op = OperatingPoint {
            seq: Some(seq),
            baseline: Some("mha".into()),
            smoke,
            ..Default::default()
        };
        report(
            "mla",
            op,
            vec![
                crit("SC-001a", AtLeast, a_threshold, 0.5),
                b,
                crit("SC-001-eq", AtMost, 1e-3, 0.0),
                crit("SC-001-eq-tokens", AtLeast, 1.0, 1.0),
            ],
        )
    }

    fn good_b() -> Criterion {
        crit("SC-001b", AtLeast, 2.0, 2.4)
    }

    fn run(r: Report, opts: &GateOptions) -> GateOutcome {
        gate(&[(PathBuf::from("r.json"), r)], None, opts).unwrap()
    }

    fn opts() -> GateOptions {
        GateOptions {
            noise: 0.05,
            ..Default::default()
        }
    }

    fn allow() -> GateOptions {
        GateOptions {
            allow_off_spec: true,
            ..opts()
        }
    }

    fn off_spec_rows(o: &GateOutcome) -> Vec<String> {
        o.rows
            .iter()
            .filter(|r| r.id == "off-spec")
            .map(|r| r.metric.clone())
            .collect()
    }

    #[test]
    fn avx512bf16_is_avx512_for_a_baseline_unless_the_run_is_bf16() {
        let with = |simd: &str, dtype: &str| {
            let mut r = mla(8192, false, 0.4, good_b());
            r.machine.simd = Some(simd.into());
            r.scenario = serde_json::json!({"id": "SC", "kind": "mla", "run": {"dtype": dtype}});
            r
        };
        assert_eq!(
            baseline_mismatch(&with("avx512bf16", "f32"), &with("avx512", "f32")),
            None
        );
        let why = baseline_mismatch(&with("avx512bf16", "bf16"), &with("avx512", "bf16"));
        assert!(why.is_some_and(|w| w.contains("SIMD level")));
        assert!(baseline_mismatch(&with("avx2", "f32"), &with("avx512", "f32")).is_some());
    }

    #[test]
    fn the_spec_point_passes() {
        let o = run(mtp(8, 1.0, timing("SC-002b", 1.3, 1.6, 3, 0.05)), &opts());
        assert_eq!(o.exit_code, 0, "{:?}", o.rows);
        let o = run(mla(8192, false, 0.4, good_b()), &opts());
        assert_eq!(o.exit_code, 0, "{:?}", o.rows);
    }

    #[test]
    fn a_batch_1_mtp_report_is_refused_unless_allowed() {
        let r = mtp(1, 1.0, timing("SC-002b", 1.3, 1.6, 3, 0.05));
        assert_eq!(r.criteria[1].id, "SC-002b@batch1");
        let o = run(r.clone(), &opts());
        assert_eq!(o.exit_code, 1);
        assert!(off_spec_rows(&o)[0].contains("batch 1"), "{:?}", o.rows);
        let o = run(r.clone(), &allow());
        assert_eq!(o.exit_code, 0, "{:?}", o.rows);
        assert!(o.off_spec_allowed[0].contains("batch 1"));
        // even --require of the speed criterion alone is refused at batch 1
        let o = run(
            r,
            &GateOptions {
                require: Some(vec!["SC-002b".into()]),
                ..opts()
            },
        );
        assert_eq!(o.exit_code, 1);
    }

    #[test]
    fn a_short_sequence_a_smoke_run_and_a_weakened_threshold_are_off_spec() {
        for (r, why) in [
            (mla(2048, false, 0.4, good_b()), "sequence 2048"),
            (mla(8192, true, 0.4, good_b()), "smoke"),
            (mla(8192, false, 0.01, good_b()), "weaker than the spec's"),
        ] {
            let o = run(r.clone(), &opts());
            assert_eq!(o.exit_code, 1, "{why}");
            assert!(
                off_spec_rows(&o).iter().any(|m| m.contains(why)),
                "{why}: {:?}",
                o.rows
            );
            // allowed, the criteria are gated as measured (they pass here)
            assert_eq!(run(r, &allow()).exit_code, 0, "{why}");
        }
    }

    #[test]
    fn doctored_reports_are_recomputed() {
        // the stored flag says conformant and the ids are bare, but the point is batch 1
        let mut r = mtp(8, 1.0, timing("SC-002b", 1.3, 1.6, 3, 0.05));
        r.spec.as_mut().unwrap().operating_point.batch = Some(1);
        assert!(!off_spec_rows(&run(r, &opts())).is_empty());
        // a weakened threshold stored under the bare id
        let mut r = mla(8192, false, 0.4, good_b());
        r.criteria[0].threshold = 0.01;
        assert!(off_spec_rows(&run(r, &opts()))[0].contains("weaker"));
        // a report holding only renamed ids
        let mut r = mla(8192, false, 0.4, good_b());
        for c in &mut r.criteria {
            c.id = format!("{}@mine", c.id);
        }
        let rows = off_spec_rows(&run(r, &opts()));
        assert!(
            rows[0].contains("holds none of the spec's mla criteria"),
            "{rows:?}"
        );
        // a version-1 report records no operating point
        let mut r = mla(8192, false, 0.4, good_b());
        r.schema_version = 1;
        r.spec = None;
        let rows = off_spec_rows(&run(r, &opts()));
        assert!(rows[0].contains("schema-version-1"), "{rows:?}");
    }

    #[test]
    fn a_failed_equivalence_fails_the_required_speed_criterion() {
        let r = mtp(8, 0.5, timing("SC-002b", 1.3, 1.6, 3, 0.05));
        // the runner withheld the pass already; a doctored flag is caught as well
        assert!(!r.criteria[1].passed);
        let mut doctored = r.clone();
        doctored.criteria[1].passed = true;
        for r in [r, doctored] {
            let o = run(
                r,
                &GateOptions {
                    require: Some(vec!["SC-002a".into()]),
                    ..opts()
                },
            );
            assert_eq!(o.exit_code, 1);
            assert!(o.added[0].contains("adds its equivalence dependency SC-002-eq"));
            assert!(o.rows.iter().any(|r| r.id == "SC-002-eq" && !r.passed));
            assert!(o
                .rows
                .iter()
                .any(|r| r.id == "SC-002a" && !r.passed && r.metric.contains("SC-002-eq")));
        }
    }

    #[test]
    fn one_sample_is_not_a_measurement() {
        let b = timing("SC-002b", 1.3, 1.6, 1, 0.05);
        assert!(b.measured.is_none() && b.note.contains("at least 3"));
        let mut r = mtp(8, 1.0, b);
        assert_eq!(run(r.clone(), &opts()).exit_code, 1);
        // a value written in by hand beside samples = 1 does not count either
        r.criteria[1].measured = Some(1.6);
        r.criteria[1].passed = true;
        assert_eq!(run(r, &opts()).exit_code, 1);
    }

    #[test]
    fn a_pass_within_the_noise_is_marginal_and_strict_fails_it() {
        // 1.35 against 1.3 with a noise band of 0.1: within it
        let r = mtp(8, 1.0, timing("SC-002b", 1.3, 1.35, 3, 0.1));
        assert_eq!(r.criteria[1].outcome(), Outcome::Marginal);
        let o = run(r.clone(), &opts());
        assert_eq!(o.exit_code, 0);
        let row = o.rows.iter().find(|r| r.id == "SC-002b").unwrap();
        assert_eq!(row.label.as_deref(), Some("PASS (marginal)"));
        let strict = GateOptions {
            strict: true,
            ..opts()
        };
        assert_eq!(run(r, &strict).exit_code, 1);
        // outside the band it is a plain pass, strict or not
        let r = mtp(8, 1.0, timing("SC-002b", 1.3, 1.6, 3, 0.1));
        assert_eq!(run(r, &strict).exit_code, 0);
    }

    #[test]
    fn a_capped_capacity_below_the_threshold_is_inconclusive() {
        let b = crit("SC-001b", AtLeast, 2.0, 1.14).with_lower_bound(true);
        assert_eq!(b.outcome(), Outcome::Inconclusive);
        let r = mla(8192, false, 0.4, b);
        assert_eq!(r.verdict, Verdict::Inconclusive);
        let o = run(r, &opts());
        assert_eq!(o.exit_code, 1);
        let row = o.rows.iter().find(|r| r.id == "SC-001b").unwrap();
        assert_eq!(row.label.as_deref(), Some("INCONCLUSIVE"));
        // a lower bound that clears the threshold passes
        let b = crit("SC-001b", AtLeast, 2.0, 2.4).with_lower_bound(true);
        assert_eq!(run(mla(8192, false, 0.4, b), &opts()).exit_code, 0);
    }
}
