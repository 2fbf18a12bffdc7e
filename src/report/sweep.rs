//! 参数扫描（`--seq 1024,2048,4096`、`--batch 1,8,32`）：同一场景在一个参数的若干取值上各跑一次，
//! 每个取值一份完整报告，另写一份扫描报告（JSON + Markdown）保留每个点，并画图（SVG）：
//! 各变体内存峰值随参数的变化（MLA 场景带预算线）、各 tokens/s 指标随参数的变化。

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::aggregate::{variant_names, verdict_of, RunRow, VariantCell};
use super::chart::{Chart, Series};
use super::schema::{BackendReport, Report, Verdict};
use super::write::{bytes_h, num_h, secs_h};
use crate::backend::machine::ToolInfo;
use crate::error::most_severe;

/// 扫描中的一个点。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepPoint {
    /// 参数取值。
    pub value: usize,
    /// 出错原因（该点没有报告时）。
    pub error: Option<String>,
    /// 这次运行的要点（退出码、报告、判定、变体、标准）。
    #[serde(flatten)]
    pub run: RunRow,
}

impl SweepPoint {
    /// A point that ran: its report summarised.
    pub fn ran(value: usize, report: &Report, report_file: Option<String>) -> SweepPoint {
        SweepPoint {
            value,
            error: None,
            run: RunRow::ran(report, report_file),
        }
    }

    /// A point whose run failed (no report).
    pub fn failed(value: usize, error: String, exit_code: i32) -> SweepPoint {
        SweepPoint {
            value,
            error: Some(error),
            run: RunRow::not_run(exit_code),
        }
    }
}

/// 扫描报告。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepReport {
    /// 模式版本。
    pub schema_version: u32,
    /// 固定为 `sweep`。
    pub kind: String,
    /// 工具信息。
    pub tool: ToolInfo,
    /// 创建时间（UTC）。
    pub created_at: String,
    /// 场景文件。
    pub scenario_file: String,
    /// 场景编号。
    pub scenario_id: String,
    /// 扫描的命令行参数（`seq` 或 `batch`）。
    pub parameter: String,
    /// 它对应的场景键（如 `run.seq`）。
    pub scenario_key: String,
    /// 后端。
    pub backend: Option<BackendReport>,
    /// 内存预算（字节；MLA 场景的 `capacity.memory_budget_gib`），图中画成水平线。
    pub budget_bytes: Option<u64>,
    /// 每个取值一个点，顺序同命令行。
    pub points: Vec<SweepPoint>,
    /// 图表文件（相对扫描报告所在目录）。
    #[serde(default)]
    pub charts: Vec<String>,
    /// 总判定（所有点的所有标准）。
    pub verdict: Verdict,
    /// 退出码。
    pub exit_code: i32,
}

const MIB: f64 = 1024.0 * 1024.0;

impl SweepReport {
    /// Builds the report from its points; the most severe point decides the exit code.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        scenario_file: &str,
        scenario_id: &str,
        parameter: &str,
        scenario_key: &str,
        backend: Option<BackendReport>,
        budget_bytes: Option<u64>,
        points: Vec<SweepPoint>,
        created_at: String,
    ) -> SweepReport {
        let exit_code = most_severe(points.iter().map(|p| p.run.exit_code));
        let verdict = verdict_of(points.iter().map(|p| &p.run));
        SweepReport {
            schema_version: super::SCHEMA_VERSION,
            kind: "sweep".into(),
            tool: ToolInfo::current(),
            created_at,
            scenario_file: scenario_file.into(),
            scenario_id: scenario_id.into(),
            parameter: parameter.into(),
            scenario_key: scenario_key.into(),
            backend,
            budget_bytes,
            points,
            charts: vec![],
            verdict,
            exit_code,
        }
    }

    fn variant_names(&self) -> Vec<String> {
        variant_names(self.points.iter().map(|p| &p.run))
    }

    /// One series per variant of `f(variant)` against the parameter (points where `f` is
    /// `None` are left out; a variant with no point is left out).
    fn series(&self, f: impl Fn(&VariantCell) -> Option<f64>) -> Vec<Series> {
        self.variant_names()
            .into_iter()
            .filter_map(|name| {
                let points: Vec<(f64, f64)> = self
                    .points
                    .iter()
                    .filter_map(|p| {
                        let v = p.run.variants.iter().find(|v| v.name == name)?;
                        Some((p.value as f64, f(v)?))
                    })
                    .collect();
                (!points.is_empty()).then_some(Series { name, points })
            })
            .collect()
    }

    /// The charts this sweep can draw from measured values: (file suffix, chart).
    /// Memory is the device pool peak where one was measured, else the host heap peak.
    pub fn charts(&self) -> Vec<(String, Chart)> {
        let p = &self.parameter;
        let values: Vec<usize> = self.points.iter().map(|p| p.value).collect();
        let spread = match (values.iter().min(), values.iter().max()) {
            (Some(&lo), Some(&hi)) if lo > 0 => hi as f64 / lo as f64,
            _ => 1.0,
        };
        let log_x = spread >= 8.0;
        let x_label = format!("{p} ({})", self.scenario_key);
        let mut out = Vec::new();
        let device = self.points.iter().any(|pt| {
            pt.run
                .variants
                .iter()
                .any(|v| v.memory.device_peak_bytes.is_some())
        });
        let memory = self.series(|v| {
            let m = &v.memory;
            let b = if device {
                m.device_peak_bytes
            } else {
                m.host_peak_bytes
            };
            b.map(|b| b as f64 / MIB)
        });
        if !memory.is_empty() {
            out.push((
                format!("memory-vs-{p}"),
                Chart {
                    title: format!(
                        "{}: peak memory ({}) vs {p}",
                        self.scenario_id,
                        if device { "device pool" } else { "host heap" }
                    ),
                    x_label: x_label.clone(),
                    y_label: "peak memory (MiB)".into(),
                    series: memory,
                    hlines: self
                        .budget_bytes
                        .map(|b| vec![("memory budget".to_string(), b as f64 / MIB)])
                        .unwrap_or_default(),
                    log_x,
                },
            ));
        }
        let mut metrics: Vec<String> = Vec::new();
        for pt in &self.points {
            for v in &pt.run.variants {
                for (k, val) in &v.metrics {
                    if k.ends_with("tokens_per_s") && val.is_some() && !metrics.contains(k) {
                        metrics.push(k.clone());
                    }
                }
            }
        }
        for k in metrics {
            let series = self.series(|v| v.metrics.get(&k).copied().flatten());
            out.push((
                format!("{}-vs-{p}", k.replace('_', "-")),
                Chart {
                    title: format!("{}: {k} vs {p}", self.scenario_id),
                    x_label: x_label.clone(),
                    y_label: k.clone(),
                    series,
                    hlines: vec![],
                    log_x,
                },
            ));
        }
        out
    }

    /// Terminal table: one row per point.
    pub fn render(&self) -> String {
        let mut t = comfy_table::Table::new();
        let names = self.variant_names();
        let mut header = vec![self.parameter.clone(), "verdict".into(), "wall time".into()];
        header.extend(names.iter().map(|n| format!("{n} median / peak")));
        header.push("criteria".into());
        t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED)
            .set_header(header);
        for r in self.rows(&names) {
            t.add_row(r);
        }
        format!(
            "{t}\noverall: {} (exit {})\n",
            self.verdict.as_str(),
            self.exit_code
        )
    }

    fn rows(&self, names: &[String]) -> Vec<Vec<String>> {
        self.points
            .iter()
            .map(|p| {
                let mut row = vec![
                    p.value.to_string(),
                    p.run
                        .verdict
                        .map(|v| v.as_str().to_string())
                        .unwrap_or_else(|| format!("error: {}", p.error.as_deref().unwrap_or(""))),
                    p.run.wall_time_s.map(secs_h).unwrap_or_else(|| "—".into()),
                ];
                for n in names {
                    row.push(match p.run.variants.iter().find(|v| &v.name == n) {
                        Some(v) => format!(
                            "{} / {}",
                            v.median_s.map(secs_h).unwrap_or_else(|| "—".into()),
                            bytes_h(v.memory.device_peak_bytes.or(v.memory.host_peak_bytes))
                        ),
                        None => "—".into(),
                    });
                }
                row.push(
                    p.run
                        .criteria
                        .iter()
                        .map(|c| {
                            format!(
                                "{} {} {}",
                                c.id,
                                num_h(c.measured),
                                if c.passed { "PASS" } else { "FAIL" }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                );
                row
            })
            .collect()
    }

    /// Markdown with Chinese headings; links the chart files.
    pub fn to_markdown(&self) -> String {
        let names = self.variant_names();
        let mut s = format!(
            "# dsopt 参数扫描：{} — `{}`（{}）\n\n- 时间：{}\n- 场景文件：`{}`\n- 后端：{}\n- 总判定：**{}**（退出码 {}）\n\n## 各点\n\n",
            self.scenario_id,
            self.parameter,
            self.scenario_key,
            self.created_at,
            self.scenario_file,
            self.backend
                .as_ref()
                .map(|b| format!("{} ({})", b.name, b.device))
                .unwrap_or_else(|| "—".into()),
            self.verdict.as_str(),
            self.exit_code
        );
        let mut header = vec![self.parameter.clone(), "判定".into(), "墙钟".into()];
        header.extend(names.iter().map(|n| format!("{n} 中位时间 / 峰值")));
        header.push("验收标准".into());
        let _ = writeln!(s, "| {} |", header.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
        for r in self.rows(&names) {
            let cells: Vec<String> = r.iter().map(|c| c.replace('|', "/")).collect();
            let _ = writeln!(s, "| {} |", cells.join(" | "));
        }
        let _ = writeln!(s, "\n## 报告\n");
        for p in &self.points {
            let _ = writeln!(
                s,
                "- {} = {}：{}",
                self.parameter,
                p.value,
                p.run
                    .report_file
                    .as_deref()
                    .map(|f| format!("`{f}`"))
                    .unwrap_or_else(|| "（无报告）".into())
            );
        }
        if !self.charts.is_empty() {
            let _ = writeln!(s, "\n## 图表\n");
            for c in &self.charts {
                let _ = writeln!(s, "![{c}]({c})\n");
            }
        }
        s
    }
}

/// The memory budget a report's scenario declares (`capacity.memory_budget_gib`, MLA), in bytes.
pub fn scenario_budget_bytes(report: &Report) -> Option<u64> {
    report.scenario["capacity"]["memory_budget_gib"]
        .as_f64()
        .map(|g| (g * 1024.0 * 1024.0 * 1024.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{EXIT_CANNOT_RUN, EXIT_PASS};
    use crate::monitor::MeasuredMemory;
    use std::collections::BTreeMap;

    fn cell(name: &str, peak: u64, tps: f64) -> VariantCell {
        VariantCell {
            name: name.into(),
            status: "ok".into(),
            median_s: Some(0.5),
            memory: MeasuredMemory {
                host_peak_bytes: Some(peak),
                ..Default::default()
            },
            metrics: BTreeMap::from([("decode_tokens_per_s".to_string(), Some(tps))]),
        }
    }

    fn point(value: usize) -> SweepPoint {
        SweepPoint {
            value,
            error: None,
            run: RunRow {
                report_file: Some(format!("r{value}.json")),
                exit_code: EXIT_PASS,
                verdict: Some(Verdict::Pass),
                wall_time_s: Some(1.0),
                variants: vec![
                    cell("mha", value as u64 * 4096, 100.0),
                    cell("mla_absorbed", value as u64 * 1024, 150.0),
                ],
                criteria: vec![],
            },
        }
    }

    #[test]
    fn one_point_per_value_and_charts_from_measured_values() {
        let points = vec![point(1024), point(2048), point(4096), point(8192)];
        let s = SweepReport::new(
            "s.toml",
            "SC-001",
            "seq",
            "run.seq",
            None,
            Some(64 << 20),
            points,
            "now".into(),
        );
        assert_eq!(s.points.len(), 4);
        assert_eq!(s.exit_code, EXIT_PASS);
        let charts = s.charts();
        let names: Vec<&str> = charts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["memory-vs-seq", "decode-tokens-per-s-vs-seq"]);
        let mem = &charts[0].1;
        assert!(mem.log_x);
        assert_eq!(mem.series.len(), 2);
        assert_eq!(mem.series[1].points.len(), 4);
        assert_eq!(mem.series[0].points[3], (8192.0, 32.0)); // 8192 * 4096 B = 32 MiB
        assert_eq!(mem.hlines, vec![("memory budget".to_string(), 64.0)]);
        let md = s.to_markdown();
        assert!(md.contains("| 8192 | pass |"), "{md}");
        assert!(md.contains("`r2048.json`"), "{md}");
    }

    #[test]
    fn a_failed_point_is_kept_and_decides_the_exit_code() {
        let points = vec![
            point(1),
            SweepPoint::failed(4, "out of memory".into(), EXIT_CANNOT_RUN),
        ];
        let s = SweepReport::new(
            "s.toml",
            "SC-003",
            "batch",
            "run.decode_batch",
            None,
            None,
            points,
            "now".into(),
        );
        assert_eq!(s.exit_code, EXIT_CANNOT_RUN);
        assert_eq!(s.verdict, Verdict::Error);
        assert!(s.render().contains("error: out of memory"));
        let mem = &s.charts()[0].1;
        assert!(!mem.log_x, "a 4x spread stays linear");
        assert!(mem.hlines.is_empty());
        assert_eq!(
            mem.series[0].points.len(),
            1,
            "no invented point for the failed run"
        );
    }
}
