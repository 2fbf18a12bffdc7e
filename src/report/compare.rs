//! 多后端对比（`dsopt compare`）：同一场景在几个后端上各跑一次，并排列出时间、各来源内存与验收标准。
//!
//! 不可用的后端（未编译、没有设备、驱动缺失）是表中的一行，写明原因，不会中止整个对比；
//! 退出码只由真正运行了的后端决定（见 [`CompareReport::exit_code`]）。

use std::fmt::Write as _;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde::{Deserialize, Serialize};

pub use super::aggregate::VariantCell;
use super::aggregate::{variant_names, verdict_of, RunRow};
use super::schema::{Report, Verdict};
use super::write::{bytes_h, num_h, secs_h};
use crate::backend::machine::ToolInfo;
use crate::error::{most_severe, EXIT_CANNOT_RUN};

/// 一个后端的运行状态。
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendOutcome {
    /// 运行完成并写出了报告（判定见 `verdict`）。
    Ran,
    /// 该后端在本机不可用（未编译或没有设备），原因见 `reason`。
    Unavailable,
    /// 后端可用，但运行出错，原因见 `reason`。
    Error,
}

/// 一个后端的一行。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendEntry {
    /// 请求的后端（`flex`、`wgpu`、`cuda`、`auto`）。
    pub backend: String,
    /// 实际设备（运行了才有）。
    pub device: Option<String>,
    /// 状态。
    pub outcome: BackendOutcome,
    /// 不可用或出错的原因。
    pub reason: Option<String>,
    /// 这次运行的要点（退出码、报告、判定、变体、标准）。
    #[serde(flatten)]
    pub run: RunRow,
}

impl BackendEntry {
    /// The row of a backend that ran: its report, summarised.
    pub fn ran(backend: &str, report: &Report, report_file: Option<String>) -> BackendEntry {
        BackendEntry {
            backend: backend.to_string(),
            device: Some(report.backend.device.clone()),
            outcome: BackendOutcome::Ran,
            reason: None,
            run: RunRow::ran(report, report_file),
        }
    }

    /// The row of a backend that could not run; `unavailable` says whether it was never usable
    /// here (not compiled, no device) or failed while running.
    pub fn not_run(backend: &str, unavailable: bool, reason: String, exit_code: i32) -> Self {
        BackendEntry {
            backend: backend.to_string(),
            device: None,
            outcome: if unavailable {
                BackendOutcome::Unavailable
            } else {
                BackendOutcome::Error
            },
            reason: Some(reason),
            run: RunRow::not_run(exit_code),
        }
    }
}

/// `dsopt compare` 的报告（JSON 与 Markdown 各一份）。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompareReport {
    /// 模式版本（与单次报告相同）。
    pub schema_version: u32,
    /// 固定为 `compare`。
    pub kind: String,
    /// 工具信息。
    pub tool: ToolInfo,
    /// 创建时间（UTC）。
    pub created_at: String,
    /// 场景文件。
    pub scenario_file: String,
    /// 场景编号（如 `SC-001`）。
    pub scenario_id: String,
    /// 每个请求的后端一行，顺序同命令行。
    pub backends: Vec<BackendEntry>,
    /// 总判定：只看运行了的后端；一个都没运行时为 error。
    pub verdict: Verdict,
    /// 退出码。
    pub exit_code: i32,
}

impl CompareReport {
    /// Builds the report; the verdict and exit code come from the backends that ran (an
    /// unavailable backend is a row, not a failure), and are `error` / 3 when none ran.
    pub fn new(
        scenario_file: &str,
        scenario_id: &str,
        backends: Vec<BackendEntry>,
        created_at: String,
    ) -> CompareReport {
        let counted: Vec<&BackendEntry> = backends
            .iter()
            .filter(|b| b.outcome != BackendOutcome::Unavailable)
            .collect();
        let exit_code = if counted.is_empty() {
            EXIT_CANNOT_RUN
        } else {
            most_severe(counted.iter().map(|b| b.run.exit_code))
        };
        let verdict = verdict_of(counted.iter().map(|b| &b.run));
        CompareReport {
            schema_version: super::SCHEMA_VERSION,
            kind: "compare".into(),
            tool: ToolInfo::current(),
            created_at,
            scenario_file: scenario_file.into(),
            scenario_id: scenario_id.into(),
            backends,
            verdict,
            exit_code,
        }
    }

    /// Variant names in first-seen order over all backends.
    fn variant_names(&self) -> Vec<String> {
        variant_names(self.backends.iter().map(|b| &b.run))
    }

    /// Criterion ids in first-seen order over all backends.
    fn criterion_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for b in &self.backends {
            for c in &b.run.criteria {
                if !ids.contains(&c.id) {
                    ids.push(c.id.clone());
                }
            }
        }
        ids
    }

    /// Rows of the side-by-side tables, shared by the terminal and Markdown renderings:
    /// (backends rows, variant rows, criterion rows), each a header and string cells.
    fn grids(&self) -> [(Vec<String>, Vec<Vec<String>>); 3] {
        let names: Vec<String> = self.backends.iter().map(|b| b.backend.clone()).collect();
        let backends = (
            [
                "backend",
                "status",
                "device",
                "wall time",
                "verdict",
                "exit",
                "report / reason",
            ]
            .map(String::from)
            .to_vec(),
            self.backends
                .iter()
                .map(|b| {
                    vec![
                        b.backend.clone(),
                        format!("{:?}", b.outcome).to_lowercase(),
                        b.device.clone().unwrap_or_else(|| "—".into()),
                        b.run.wall_time_s.map(secs_h).unwrap_or_else(|| "—".into()),
                        b.run
                            .verdict
                            .map(|v| v.as_str().to_string())
                            .unwrap_or_else(|| "—".into()),
                        b.run.exit_code.to_string(),
                        b.reason
                            .clone()
                            .or_else(|| b.run.report_file.clone())
                            .unwrap_or_default(),
                    ]
                })
                .collect(),
        );
        let mut vh = vec!["variant".to_string(), "measure".to_string()];
        vh.extend(names.iter().cloned());
        let mut vrows = Vec::new();
        for name in self.variant_names() {
            let cell = |b: &BackendEntry| b.run.variants.iter().find(|v| v.name == name).cloned();
            let mut line = |measure: &str, f: &dyn Fn(&VariantCell) -> String| {
                let mut row = vec![name.clone(), measure.to_string()];
                row.extend(self.backends.iter().map(|b| match cell(b) {
                    Some(v) => f(&v),
                    None => "—".into(),
                }));
                vrows.push(row);
            };
            line("status", &|v| v.status.clone());
            line("median time", &|v| {
                v.median_s.map(secs_h).unwrap_or_else(|| "—".into())
            });
            line("host peak", &|v| bytes_h(v.memory.host_peak_bytes));
            line("device peak", &|v| bytes_h(v.memory.device_peak_bytes));
            line("nvml peak", &|v| bytes_h(v.memory.nvml_peak_bytes));
            let mut keys: Vec<String> = Vec::new();
            for b in &self.backends {
                if let Some(v) = cell(b) {
                    for k in v.metrics.keys() {
                        if k.contains("tokens_per_s") && !keys.contains(k) {
                            keys.push(k.clone());
                        }
                    }
                }
            }
            for k in keys {
                line(&k, &|v| num_h(v.metrics.get(&k).copied().flatten()));
            }
        }
        let mut ch = vec!["criterion".to_string(), "threshold".to_string()];
        ch.extend(names.iter().cloned());
        let mut crows = Vec::new();
        for id in self.criterion_ids() {
            let first = self
                .backends
                .iter()
                .flat_map(|b| b.run.criteria.iter())
                .find(|c| c.id == id)
                .expect("id from criteria");
            let mut row = vec![
                format!("{} ({})", id, first.metric),
                format!("{} {}", first.comparison.symbol(), first.threshold),
            ];
            row.extend(self.backends.iter().map(
                |b| match b.run.criteria.iter().find(|c| c.id == id) {
                    Some(c) => format!(
                        "{} {}",
                        num_h(c.measured),
                        if c.passed { "PASS" } else { "FAIL" }
                    ),
                    None => "—".into(),
                },
            ));
            crows.push(row);
        }
        [backends, (vh, vrows), (ch, crows)]
    }

    /// The side-by-side terminal tables.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (header, rows) in self.grids() {
            let mut t = Table::new();
            t.load_style(UTF8_FULL_CONDENSED).set_header(header);
            for r in rows {
                t.add_row(r);
            }
            let _ = writeln!(out, "{t}");
        }
        let _ = writeln!(
            out,
            "overall: {} (exit {})",
            self.verdict.as_str(),
            self.exit_code
        );
        out
    }

    /// Markdown with Chinese headings.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "# dsopt 多后端对比：{}\n\n- 时间：{}\n- 场景文件：`{}`\n- 总判定：**{}**（退出码 {}；不可用的后端只列出原因，不计入判定）\n",
            self.scenario_id,
            self.created_at,
            self.scenario_file,
            self.verdict.as_str(),
            self.exit_code
        );
        let titles = ["后端", "变体（时间与各来源内存）", "验收标准"];
        for (title, (header, rows)) in titles.iter().zip(self.grids()) {
            let _ = writeln!(s, "\n## {title}\n");
            let _ = writeln!(s, "| {} |", header.join(" | "));
            let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
            for r in rows {
                let cells: Vec<String> = r
                    .iter()
                    .map(|c| c.replace('|', "/").replace('\n', " "))
                    .collect();
                let _ = writeln!(s, "| {} |", cells.join(" | "));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{EXIT_FAIL, EXIT_PASS};
    use crate::monitor::MeasuredMemory;
    use crate::report::{Comparison, Criterion, VariantReport};

    fn report(verdict_pass: bool) -> Report {
        let mut v = VariantReport::from_measurement::<()>(&crate::monitor::Measurement {
            name: "mha".into(),
            timings: None,
            memory: MeasuredMemory::default(),
            warnings: vec![],
            output: None,
            error: None,
        });
        v.metrics.insert("decode_tokens_per_s".into(), Some(12.5));
        v.memory.measured.host_peak_bytes = Some(3 << 20);
        let c = Criterion::evaluate(
            "SC-001a",
            "runtime_peak_reduction",
            Comparison::AtLeast,
            0.4,
            Some(if verdict_pass { 0.6 } else { 0.1 }),
            "",
        );
        Report {
            schema_version: 1,
            tool: ToolInfo::current(),
            created_at: "2026-11-28T00:00:00Z".into(),
            wall_time_s: 1.5,
            machine: crate::backend::machine::MachineInfo::capture(),
            backend: crate::report::BackendReport {
                name: "flex".into(),
                device: "cpu".into(),
                features: vec![],
            },
            scenario_file: "s.toml".into(),
            scenario: serde_json::json!({"id": "SC-001"}),
            variants: vec![v],
            verdict: Verdict::of(std::slice::from_ref(&c)),
            criteria: vec![c],
            notes: vec![],
            memory_series: vec![],
            series: Default::default(),
            spec: None,
        }
    }

    #[test]
    fn unavailable_backend_is_a_row_and_does_not_decide_the_exit_code() {
        let rows = vec![
            BackendEntry::ran("flex", &report(true), Some("r.json".into())),
            BackendEntry::not_run("cuda", true, "libcuda.so.1 not found".into(), 3),
        ];
        let c = CompareReport::new("s.toml", "SC-001", rows, "now".into());
        assert_eq!(c.exit_code, EXIT_PASS);
        assert_eq!(c.verdict, Verdict::Pass);
        let text = c.render();
        assert!(text.contains("unavailable"), "{text}");
        assert!(text.contains("libcuda.so.1 not found"), "{text}");
        assert!(text.contains("0.6000 PASS"), "{text}");
        let md = c.to_markdown();
        assert!(md.contains("| cuda | unavailable |"), "{md}");
        assert!(md.contains("decode_tokens_per_s"), "{md}");
        assert!(md.contains("3.00 MiB"), "{md}");
    }

    #[test]
    fn a_failing_backend_fails_the_comparison() {
        let rows = vec![
            BackendEntry::ran("flex", &report(true), None),
            BackendEntry::ran("wgpu", &report(false), None),
        ];
        let c = CompareReport::new("s.toml", "SC-001", rows, "now".into());
        assert_eq!(c.exit_code, EXIT_FAIL);
        assert_eq!(c.verdict, Verdict::Fail);
        assert!(c.render().contains("0.1000 FAIL"));
    }

    #[test]
    fn nothing_ran_is_cannot_run_and_a_run_error_counts() {
        let none = CompareReport::new(
            "s.toml",
            "SC-001",
            vec![BackendEntry::not_run("cuda", true, "no".into(), 3)],
            "now".into(),
        );
        assert_eq!(none.exit_code, EXIT_CANNOT_RUN);
        assert_eq!(none.verdict, Verdict::Error);
        let err = CompareReport::new(
            "s.toml",
            "SC-001",
            vec![
                BackendEntry::ran("flex", &report(true), None),
                BackendEntry::not_run("wgpu", false, "out of memory".into(), 3),
            ],
            "now".into(),
        );
        assert_eq!(err.exit_code, EXIT_CANNOT_RUN);
        assert_eq!(err.verdict, Verdict::Error);
        let back: CompareReport =
            serde_json::from_str(&serde_json::to_string(&err).unwrap()).unwrap();
        assert_eq!(back, err);
    }
}
