//! 报告导出器：每种输出格式一个，实现同一个小 trait（JSON、CSV、内存 CSV、Markdown、终端表格）。
//!
//! The file writer ([`super::write::write_all`]) and the terminal output of `dsopt bench` /
//! `dsopt run` go through these; each format's rendering lives in its own module
//! ([`super::write`] for JSON/CSV/Markdown, [`super::table`] for the terminal) and is pinned by
//! a snapshot test below (`src/report/snapshots/`; `DSOPT_UPDATE_SNAPSHOTS=1` rewrites them).

use super::schema::Report;

/// One output format of a report.
pub trait Exporter {
    /// The format's name (`json`, `csv`, …).
    fn name(&self) -> &'static str;
    /// What follows the report's file stem when written next to the others (`.json`,
    /// `-memory.csv`); `None` for a format that only goes to the terminal.
    fn file_suffix(&self) -> Option<&'static str>;
    /// The report in this format.
    fn render(&self, report: &Report) -> anyhow::Result<String>;
}

/// Pretty JSON: the full report (the schema).
pub struct Json;
/// CSV: one row per variant x metric and one per criterion.
pub struct Csv;
/// CSV: the memory time series.
pub struct MemoryCsv;
/// Markdown with Chinese headings (chart links are appended by the writer).
pub struct Markdown;
/// The terminal verdict tables.
pub struct TerminalTable;

impl Exporter for Json {
    fn name(&self) -> &'static str {
        "json"
    }
    fn file_suffix(&self) -> Option<&'static str> {
        Some(".json")
    }
    fn render(&self, report: &Report) -> anyhow::Result<String> {
        super::write::to_json(report)
    }
}

impl Exporter for Csv {
    fn name(&self) -> &'static str {
        "csv"
    }
    fn file_suffix(&self) -> Option<&'static str> {
        Some(".csv")
    }
    fn render(&self, report: &Report) -> anyhow::Result<String> {
        Ok(String::from_utf8(super::write::to_csv(report)?)?)
    }
}

impl Exporter for MemoryCsv {
    fn name(&self) -> &'static str {
        "memory-csv"
    }
    fn file_suffix(&self) -> Option<&'static str> {
        Some("-memory.csv")
    }
    fn render(&self, report: &Report) -> anyhow::Result<String> {
        Ok(String::from_utf8(super::write::memory_csv(report)?)?)
    }
}

impl Exporter for Markdown {
    fn name(&self) -> &'static str {
        "markdown"
    }
    fn file_suffix(&self) -> Option<&'static str> {
        Some(".md")
    }
    fn render(&self, report: &Report) -> anyhow::Result<String> {
        Ok(super::write::to_markdown(report))
    }
}

impl Exporter for TerminalTable {
    fn name(&self) -> &'static str {
        "table"
    }
    fn file_suffix(&self) -> Option<&'static str> {
        None
    }
    fn render(&self, report: &Report) -> anyhow::Result<String> {
        Ok(super::table::render(report))
    }
}

/// Every exporter, files first.
pub const ALL: [&dyn Exporter; 5] = [&Json, &Csv, &MemoryCsv, &Markdown, &TerminalTable];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::machine::{MachineInfo, ToolInfo};
    use crate::monitor::{MeasuredMemory, MemorySample, Timings};
    use crate::report::*;

    /// A fixed report touching every section: two variants (one failed), measured and unmeasured
    /// criteria, a not-applicable one, notes, memory samples and typed series.
    fn fixture() -> Report {
        let timings = Timings::from_samples(vec![0.25, 0.5, 0.75], vec![1.0]).unwrap();
        let ok = VariantReport {
            name: "mla_absorbed".into(),
            status: VariantStatus::Ok,
            error: None,
            timings: Some(timings),
            memory: MemoryReport {
                measured: MeasuredMemory {
                    host_peak_bytes: Some(3 << 20),
                    host_baseline_bytes: Some(1 << 20),
                    ..Default::default()
                },
                analytic: Some(AnalyticMemory {
                    weights_bytes: 1 << 20,
                    kv_cache_bytes: 4096,
                    activations_bytes: None,
                }),
            },
            metrics: [
                ("decode_tokens_per_s".to_string(), Some(156.25)),
                ("decode_read_fraction".to_string(), Some(0.46)),
                ("prefill_tokens_per_s".to_string(), None),
            ]
            .into_iter()
            .collect(),
            equivalence: Equivalence {
                checked: true,
                reference: Some("mla_naive".into()),
                max_abs_diff: Some(5.96e-7),
                tolerance: Some(1e-3),
                passed: Some(true),
            },
            warnings: vec!["a warning, with a fix".into()],
        };
        let mut failed = ok.clone();
        failed.name = "mha".into();
        failed.fail("out of memory at 8192 tokens");
        Report {
            schema_version: SCHEMA_VERSION,
            tool: ToolInfo {
                name: "dsopt".into(),
                version: "0.0.0-test".into(),
                git_commit: Some("0123456789ab".into()),
            },
            created_at: "2026-12-02T00:00:00Z".into(),
            wall_time_s: 1.5,
            machine: MachineInfo {
                cpu: "test cpu".into(),
                cores: 2,
                ram_bytes: 24 << 30,
                os: "test os".into(),
                gpus: vec![],
                simd: Some("avx2".into()),
            },
            backend: BackendReport {
                name: "flex".into(),
                device: "cpu".into(),
                features: vec!["simd".into()],
            },
            scenario_file: "scenarios/smoke/sc001-mla-smoke.toml".into(),
            scenario: serde_json::json!({"id": "SC-001", "kind": "mla"}),
            variants: vec![failed, ok],
            criteria: vec![
                Criterion::evaluate(
                    "SC-001a",
                    "runtime_peak_reduction_mla_absorbed_vs_mha",
                    Comparison::AtLeast,
                    0.4,
                    Some(0.4938),
                    "measured",
                ),
                Criterion::evaluate(
                    "SC-001-eq",
                    "max_abs_diff_mla_absorbed_vs_naive",
                    Comparison::AtMost,
                    1e-3,
                    None,
                    "not measured",
                ),
                Criterion::not_applicable(
                    "SC-003b",
                    "device_peak_over_budget",
                    Comparison::AtMost,
                    1.0,
                    "no device pool on the CPU",
                ),
            ],
            verdict: Verdict::Error,
            notes: vec!["a note | with a pipe".into()],
            memory_series: vec![MemorySample {
                t_s: 0.25,
                variant: "mha".into(),
                source: "host".into(),
                bytes: 2 << 20,
                label: "run_end".into(),
            }],
            series: ReportSeries {
                capacity_probes: vec![CapacityProbe {
                    variant: "mha".into(),
                    seq: 1024,
                    measured_peak_bytes: Some(1 << 20),
                    reserved_peak_bytes: None,
                    total_bytes: Some(2 << 20),
                    real_prefill: false,
                    fits: true,
                    note: String::new(),
                }],
                capacity_budget_bytes: Some(16 << 20),
                mtp_sweep: vec![],
            },
            spec: Some(crate::report::spec::SpecStatus {
                operating_point: crate::report::spec::OperatingPoint {
                    seq: Some(8192),
                    batch: Some(1),
                    baseline: Some("mha".into()),
                    stated: vec!["memory budget 1 GiB".into()],
                    ..Default::default()
                },
                conformant: true,
                deviations: vec![],
            }),
        }
    }

    /// Each format of the fixture equals its stored snapshot (or rewrites it when
    /// `DSOPT_UPDATE_SNAPSHOTS` is set). A change to a format shows up as a diff here.
    #[test]
    fn every_format_matches_its_snapshot() {
        let r = fixture();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/report/snapshots");
        let update = std::env::var_os("DSOPT_UPDATE_SNAPSHOTS").is_some();
        for e in ALL {
            let got = e.render(&r).unwrap();
            let path = dir.join(format!("fixture.{}.txt", e.name()));
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &got).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|err| {
                panic!(
                    "{}: {err} (run with DSOPT_UPDATE_SNAPSHOTS=1 to create it)",
                    path.display()
                )
            });
            assert_eq!(
                got,
                want,
                "format {} differs from {}",
                e.name(),
                path.display()
            );
        }
    }

    #[test]
    fn json_round_trips_and_file_suffixes_are_distinct() {
        let r = fixture();
        let back: Report = serde_json::from_str(&Json.render(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let suffixes: Vec<&str> = ALL.iter().filter_map(|e| e.file_suffix()).collect();
        let mut dedup = suffixes.clone();
        dedup.dedup();
        assert_eq!(suffixes.len(), 4);
        assert_eq!(dedup, suffixes);
    }
}
