//! 聚合报告（`dsopt compare` 的后端行、扫描的点）共用的一次运行要点，以及由多行得出的判定。

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::schema::{Criterion, Report, Verdict};
use crate::monitor::MeasuredMemory;

/// 对比表中一个变体在一个后端上的要点。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VariantCell {
    /// 变体名。
    pub name: String,
    /// 状态（`ok`、`failed`、`skipped`）。
    pub status: String,
    /// 中位耗时（秒）；未测量为 null。
    pub median_s: Option<f64>,
    /// 各来源内存峰值。
    pub memory: MeasuredMemory,
    /// 与种类相关的指标（tokens/s 等）。
    pub metrics: BTreeMap<String, Option<f64>>,
}

/// 一次运行在聚合报告里的要点（没有运行时只有退出码）。
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunRow {
    /// 这次运行的退出码（与 `dsopt bench` 相同的约定）。
    pub exit_code: i32,
    /// 它的报告的 JSON 路径。
    pub report_file: Option<String>,
    /// 运行墙钟时间（秒）。
    pub wall_time_s: Option<f64>,
    /// 判定（没有报告时为 null）。
    pub verdict: Option<Verdict>,
    /// 各变体要点。
    pub variants: Vec<VariantCell>,
    /// 验收标准。
    pub criteria: Vec<Criterion>,
}

impl RunRow {
    /// A run that produced `report`, summarised.
    pub fn ran(report: &Report, report_file: Option<String>) -> RunRow {
        RunRow {
            exit_code: report.verdict.exit_code(),
            report_file,
            wall_time_s: Some(report.wall_time_s),
            verdict: Some(report.verdict),
            variants: report
                .variants
                .iter()
                .map(|v| VariantCell {
                    name: v.name.clone(),
                    status: format!("{:?}", v.status).to_lowercase(),
                    median_s: v.timings.as_ref().map(|t| t.median_s),
                    memory: v.memory.measured.clone(),
                    metrics: v.metrics.clone(),
                })
                .collect(),
            criteria: report.criteria.clone(),
        }
    }

    /// A run without a report, ending with `exit_code`.
    pub fn not_run(exit_code: i32) -> RunRow {
        RunRow {
            exit_code,
            ..Default::default()
        }
    }
}

/// The verdict of several runs: error when there is none or one has no verdict, else the
/// verdict of all their criteria together.
pub fn verdict_of<'a>(rows: impl IntoIterator<Item = &'a RunRow>) -> Verdict {
    let rows: Vec<&RunRow> = rows.into_iter().collect();
    if rows.is_empty() || rows.iter().any(|r| r.verdict.is_none()) {
        return Verdict::Error;
    }
    let all: Vec<Criterion> = rows
        .iter()
        .flat_map(|r| r.criteria.iter().cloned())
        .collect();
    Verdict::of(&all)
}

/// Variant names in first-seen order over `rows`.
pub fn variant_names<'a>(rows: impl IntoIterator<Item = &'a RunRow>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        for v in &r.variants {
            if !names.contains(&v.name) {
                names.push(v.name.clone());
            }
        }
    }
    names
}
