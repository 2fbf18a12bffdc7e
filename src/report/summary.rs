//! `dsopt run` 的汇总报告（与比较、扫描报告并列的聚合）：结构与 Markdown。

use serde::Serialize;

use super::schema::{BackendReport, Criterion, Verdict};
use crate::backend::machine::ToolInfo;

/// 一个场景在汇总里的一行。
#[derive(Debug, Serialize)]
pub struct SummaryEntry {
    pub scenario_file: String,
    pub id: Option<String>,
    pub verdict: Option<Verdict>,
    pub report: Option<String>,
    pub exit_code: i32,
    pub error: Option<String>,
    pub criteria: Vec<Criterion>,
}

/// `dsopt run` 的汇总：每个场景一行，加上所有场景的标准与总判定。
#[derive(Debug, Serialize)]
pub struct Summary {
    pub schema_version: u32,
    pub kind: &'static str,
    pub tool: ToolInfo,
    pub created_at: String,
    pub backend: Option<BackendReport>,
    pub scenarios: Vec<SummaryEntry>,
    pub verdict: Verdict,
    pub exit_code: i32,
}

/// The summary as Markdown (Chinese headings, as every report).
pub fn summary_markdown(s: &Summary) -> String {
    let mut m = format!(
        "# dsopt 汇总报告\n\n- 时间：{}\n- 后端：{}\n- 总判定：**{}**（退出码 {}）\n\n## 场景\n\n| 场景文件 | 编号 | 判定 | 退出码 | 错误 |\n|---|---|---|---|---|\n",
        s.created_at,
        s.backend.as_ref().map(|b| format!("{} ({})", b.name, b.device)).unwrap_or_default(),
        s.verdict.as_str(),
        s.exit_code
    );
    for e in &s.scenarios {
        m.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            e.scenario_file,
            e.id.as_deref().unwrap_or("—"),
            e.verdict.map(|v| v.as_str()).unwrap_or("—"),
            e.exit_code,
            e.error
                .as_deref()
                .unwrap_or("")
                .replace('|', "/")
                .replace('\n', " ")
        ));
    }
    m.push_str("\n## 验收标准\n\n| 编号 | 指标 | 阈值 | 测量值 | 结果 |\n|---|---|---|---|---|\n");
    for e in &s.scenarios {
        for c in &e.criteria {
            m.push_str(&format!(
                "| {} | {} | {} {} | {} | {} |\n",
                c.id,
                c.metric,
                c.comparison.symbol(),
                c.threshold,
                super::write::num_h(c.measured),
                if c.passed { "通过" } else { "未通过" }
            ));
        }
    }
    m
}
