//! 报告模式，版本 2（`schema_version: 2`；版本 1 的报告仍能读入，按"不在规格工作点"对待）。
//! 结构体即 JSON 模式：`Option` 表示"未测量"（`null`）。
//!
//! 每个字段的含义、单位与 `null` 的语义见 docs/reports.md；可以增加字段，不可改名或删除。

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backend::machine::{MachineInfo, ToolInfo};
use crate::monitor::{MeasuredMemory, MemorySample, Timings};

/// 本工具写出的报告模式版本（版本 2 加了 `spec` 与标准的 `spec_id`、`depends_on`、`off_spec`）。
pub const SCHEMA_VERSION: u32 = 2;

/// 本工具还能读入的最早的模式版本（版本 1：没有工作点，门禁按不在规格工作点对待）。
pub const OLDEST_READABLE_SCHEMA: u32 = 1;

/// 一次运行的完整报告。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// 模式版本（2）。
    pub schema_version: u32,
    /// 工具名称、版本、git 提交。
    pub tool: ToolInfo,
    /// 创建时间（UTC，RFC 3339）。
    pub created_at: String,
    /// 整个运行的墙钟时间（秒）。
    pub wall_time_s: f64,
    /// 机器信息。
    pub machine: MachineInfo,
    /// 后端。
    pub backend: BackendReport,
    /// 场景文件路径（内置场景为其仓库路径）。
    pub scenario_file: String,
    /// 场景（应用命令行覆盖之后）。
    pub scenario: serde_json::Value,
    /// 每个变体的结果。
    pub variants: Vec<VariantReport>,
    /// 每个验收标准的判定。
    pub criteria: Vec<Criterion>,
    /// 总判定。
    pub verdict: Verdict,
    /// 运行级警告与说明（规模缩放、自动调优是否预热等）。
    #[serde(default)]
    pub notes: Vec<String>,
    /// 内存时间序列。
    #[serde(default)]
    pub memory_series: Vec<MemorySample>,
    /// 按种类的类型化序列（容量探测、MTP 扫描点）：图表与表格直接读取；`notes` 只写给人看。
    #[serde(default, skip_serializing_if = "ReportSeries::is_empty")]
    pub series: ReportSeries,
    /// 与规格的关系：工作点、是否与规格一致、每一处偏差（版本 1 的报告没有，为 null）。
    #[serde(default)]
    pub spec: Option<super::spec::SpecStatus>,
}

/// 按种类的类型化数据序列（空的序列不写入 JSON）。
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReportSeries {
    /// MLA（SC-001b）：每次容量探测，按探测顺序（倍增，然后二分）。
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capacity_probes: Vec<CapacityProbe>,
    /// MLA：容量探测所比较的内存预算（字节）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_budget_bytes: Option<u64>,
    /// MTP（SC-002）：草稿深度 D × 批大小扫描的每个点。
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mtp_sweep: Vec<MtpSweepPoint>,
}

impl ReportSeries {
    /// Whether no series holds anything.
    pub fn is_empty(&self) -> bool {
        self.capacity_probes.is_empty()
            && self.capacity_budget_bytes.is_none()
            && self.mtp_sweep.is_empty()
    }
}

/// 一次容量探测：某个变体在某个序列长度下的实测内存与是否放得下预算。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CapacityProbe {
    /// 变体名。
    pub variant: String,
    /// 探测的序列长度（token）。
    pub seq: usize,
    /// 实测解码峰值减去加载模型之前的水平（权重 + 缓存 + 解码工作区）；未运行或无法测量为 null。
    pub measured_peak_bytes: Option<u64>,
    /// 设备内存池在探测峰值时**保留**的字节数减去加载模型之前的使用量（池后端：分配器真正
    /// 占用的、保守的数；主机分配器逐字节计数，没有这一项，为 null）。
    #[serde(default)]
    pub reserved_peak_bytes: Option<u64>,
    /// 与预算比较的数：池后端为保留字节（没有时为使用字节），主机上为使用字节；合成缓存的探测
    /// 再加上实测的预填充工作区，真实预填充的探测已经包含它。
    pub total_bytes: Option<u64>,
    /// 这次探测是一次真实的分块预填充（确认找到的容量，池后端），而不是合成缓存加解码步。
    #[serde(default)]
    pub real_prefill: bool,
    /// 是否放得下预算。
    pub fits: bool,
    /// 说明（为什么没有运行、用了哪个内存来源）。
    pub note: String,
}

/// MTP 扫描的一个点：同一批提示上贪心与投机解码交替计时（中位数）。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MtpSweepPoint {
    /// 草稿深度 D。
    pub depth: usize,
    /// 批大小。
    pub batch: usize,
    /// 贪心解码生成速度（token/s）。
    pub greedy_tokens_per_s: Option<f64>,
    /// 投机解码生成速度（token/s）。
    pub speculative_tokens_per_s: Option<f64>,
    /// 平均每步接受的 token 数。
    pub tokens_per_step: Option<f64>,
    /// 投机输出与贪心输出逐 token 相同。
    pub identical: bool,
}

impl MtpSweepPoint {
    /// speculative / greedy tokens per second; `None` unless both are measured, positive and
    /// the outputs are identical (a differing output's speed is not a valid speedup).
    pub fn speedup(&self) -> Option<f64> {
        let (g, s) = (self.greedy_tokens_per_s?, self.speculative_tokens_per_s?);
        (self.identical && g > 0.0)
            .then_some(s / g)
            .filter(|r| r.is_finite())
    }
}

/// 后端信息。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendReport {
    /// `flex`、`wgpu` 或 `cuda`。
    pub name: String,
    /// 设备描述（wgpu 为适配器名称与类型）。
    pub device: String,
    /// 打开的特性（autotune、fusion、simd、multi-threads）。
    pub features: Vec<String>,
}

/// 变体状态。
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VariantStatus {
    /// 正常完成。
    Ok,
    /// 失败（错误、内存不足、输出含 NaN、等价性不成立……），见 `error`。
    Failed,
    /// 跳过（例如该后端不适用），见 `error`。
    Skipped,
}

/// 一个变体的结果。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VariantReport {
    /// 变体名。
    pub name: String,
    /// 状态。
    pub status: VariantStatus,
    /// 失败或跳过的原因。
    #[serde(default)]
    pub error: Option<String>,
    /// 计时（失败时为 null）。
    pub timings: Option<Timings>,
    /// 内存（各来源分开）。
    pub memory: MemoryReport,
    /// 与种类相关的指标（tokens_per_s、acceptance……）；null 表示未测量。
    #[serde(default)]
    pub metrics: BTreeMap<String, Option<f64>>,
    /// 与标准变体的等价性检查。
    pub equivalence: Equivalence,
    /// 警告（带补救办法）。
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// 内存报告：测量值（各来源）与解析估算。
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MemoryReport {
    /// 测量值。
    #[serde(flatten)]
    pub measured: MeasuredMemory,
    /// 解析估算（与测量值并列，不替代测量值）。
    #[serde(default)]
    pub analytic: Option<AnalyticMemory>,
}

/// 解析内存分解（字节）。
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AnalyticMemory {
    /// 权重。
    pub weights_bytes: u64,
    /// KV 缓存。
    pub kv_cache_bytes: u64,
    /// 激活（工作区）；没有估算为 null（不是 0）。
    #[serde(default)]
    pub activations_bytes: Option<u64>,
}

/// 等价性检查结果。
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Equivalence {
    /// 是否做了检查。
    pub checked: bool,
    /// 参照（标准变体或主机参考实现）。
    pub reference: Option<String>,
    /// 最大绝对误差。
    pub max_abs_diff: Option<f64>,
    /// 容差。
    #[serde(default)]
    pub tolerance: Option<f64>,
    /// 是否通过（未检查为 null）。
    pub passed: Option<bool>,
}

/// 比较方向。
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Comparison {
    /// 测量值 >= 阈值 为通过。
    #[serde(rename = ">=")]
    AtLeast,
    /// 测量值 <= 阈值 为通过。
    #[serde(rename = "<=")]
    AtMost,
}

impl Comparison {
    /// Whether `measured` passes `threshold`.
    pub fn passes(self, measured: f64, threshold: f64) -> bool {
        match self {
            Comparison::AtLeast => measured >= threshold,
            Comparison::AtMost => measured <= threshold,
        }
    }
    /// The symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            Comparison::AtLeast => ">=",
            Comparison::AtMost => "<=",
        }
    }
}

/// 一个验收标准的判定。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Criterion {
    /// 编号，例如 `SC-001a`。
    pub id: String,
    /// 指标名。
    pub metric: String,
    /// 比较方向。
    pub comparison: Comparison,
    /// 阈值。
    pub threshold: f64,
    /// 测量值（未能测量为 null，此时不通过）。
    pub measured: Option<f64>,
    /// 是否通过。
    pub passed: bool,
    /// 说明（基线、规模、测量方式）。
    pub note: String,
    /// 不适用的原因（该后端上无法测量这一项，例如 CPU 后端没有独立的设备内存可供卸载）。
    /// 不适用的标准 `measured` 为 null、`passed` 为 false：它永远不算通过，门禁只在用户用
    /// `--require` 明确排除它时才不因它失败。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_applicable: Option<String>,
    /// 这条标准测的是哪条规格标准（`SC-002b@batch1` 的是 `SC-002b`）；规格之外的标准为 null。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_id: Option<String>,
    /// 前提：这些标准（同一份报告里的编号）都通过，这一条才能通过（速度与内存标准依赖等价性）。
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// 不在规格工作点上测得（或阈值比规格宽）的原因；此时编号为 `<规格编号>@<标签>`。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off_spec: Option<String>,
    /// 计时标准：两边中较少的一边的计时样本数（少于 3 个时不算测量到）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<usize>,
    /// 计时标准的噪声带（与测量值同单位）：2 x 两个中位数中较大的变异系数 x 比值。测量值离阈值
    /// 比这更近时，通过只是"勉强"（marginal）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncertainty: Option<f64>,
    /// 测量值只是下界（例如容量探测到上限仍放得下）：达到阈值即通过，达不到则"无定论"
    /// （inconclusive），不是未通过。
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lower_bound: bool,
}

/// 一条标准的结果（由测量值、阈值、样本数、噪声带与下界推出，不存）。
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 通过，且离阈值比噪声带远。
    Pass,
    /// 通过，但离阈值比噪声带近（`gate --strict` 不放过）。
    Marginal,
    /// 未通过。
    Fail,
    /// 下界没达到阈值：真实值可能达到，也可能达不到。
    Inconclusive,
    /// 未能测量（或计时样本不足 3 个）。
    NotMeasured,
    /// 这个后端上不适用。
    NotApplicable,
}

impl Outcome {
    /// How the terminal, Markdown and gate tables show it.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Marginal => "PASS (marginal)",
            Outcome::Fail => "FAIL",
            Outcome::Inconclusive => "INCONCLUSIVE",
            Outcome::NotMeasured => "NOT MEASURED",
            Outcome::NotApplicable => "N/A",
        }
    }
}

/// The fewest timed samples a timing criterion needs on each side.
pub const MIN_TIMING_SAMPLES: usize = 3;

impl Criterion {
    /// Evaluates a criterion; an unmeasured value never passes.
    pub fn evaluate(
        id: &str,
        metric: &str,
        comparison: Comparison,
        threshold: f64,
        measured: Option<f64>,
        note: impl Into<String>,
    ) -> Criterion {
        let measured = measured.filter(|m| m.is_finite());
        Criterion {
            id: id.into(),
            metric: metric.into(),
            comparison,
            threshold,
            passed: measured.is_some_and(|m| comparison.passes(m, threshold)),
            measured,
            note: note.into(),
            not_applicable: None,
            spec_id: None,
            depends_on: Vec::new(),
            off_spec: None,
            samples: None,
            uncertainty: None,
            lower_bound: false,
        }
    }

    /// A criterion that cannot be measured on this backend: present, unmeasured, never passed,
    /// with the reason.
    pub fn not_applicable(
        id: &str,
        metric: &str,
        comparison: Comparison,
        threshold: f64,
        reason: impl Into<String>,
    ) -> Criterion {
        let reason = reason.into();
        let mut c = Criterion::evaluate(
            id,
            metric,
            comparison,
            threshold,
            None,
            format!("not applicable: {reason}"),
        );
        c.not_applicable = Some(reason);
        c
    }

    /// A timing criterion: evaluated like [`Criterion::evaluate`] from the median-based
    /// `measured`, but not measured at all with fewer than [`MIN_TIMING_SAMPLES`] samples on
    /// the fewer side (`samples`), and carrying its noise band (`uncertainty`, in the
    /// measured value's units) so that a pass closer to the threshold than the noise reads
    /// "marginal".
    #[allow(clippy::too_many_arguments)]
    pub fn timing(
        id: &str,
        metric: &str,
        comparison: Comparison,
        threshold: f64,
        measured: Option<f64>,
        note: impl Into<String>,
        samples: usize,
        uncertainty: Option<f64>,
    ) -> Criterion {
        let mut note = note.into();
        let measured = if samples < MIN_TIMING_SAMPLES {
            note = format!(
                "{note}; not measured: {samples} timed sample(s) on the fewer side, a timing \
                 criterion needs at least {MIN_TIMING_SAMPLES} (--repetitions {MIN_TIMING_SAMPLES})"
            );
            None
        } else {
            measured
        };
        let mut c = Criterion::evaluate(id, metric, comparison, threshold, measured, note);
        c.samples = Some(samples);
        c.uncertainty = uncertainty.filter(|u| u.is_finite() && *u >= 0.0);
        c
    }

    /// Marks the measured value a lower bound (the true value is at least it): an at-least
    /// criterion it does not clear is inconclusive, not failed.
    pub fn with_lower_bound(mut self, lower_bound: bool) -> Criterion {
        self.lower_bound = lower_bound;
        self
    }

    /// What `passed` must be, recomputed from the measured value, comparison and threshold
    /// (the gate trusts nothing stored): an unmeasured, non-finite or not-applicable value never
    /// passes, nor does a timing criterion with fewer than [`MIN_TIMING_SAMPLES`] samples.
    pub fn recomputed_pass(&self) -> bool {
        self.not_applicable.is_none()
            && self.samples.is_none_or(|n| n >= MIN_TIMING_SAMPLES)
            && self
                .measured
                .is_some_and(|m| m.is_finite() && self.comparison.passes(m, self.threshold))
    }

    /// The outcome, recomputed from the measured value (not from the stored flag).
    pub fn outcome(&self) -> Outcome {
        if self.not_applicable.is_some() {
            return Outcome::NotApplicable;
        }
        let Some(m) = self
            .measured
            .filter(|m| m.is_finite())
            .filter(|_| self.samples.is_none_or(|n| n >= MIN_TIMING_SAMPLES))
        else {
            return Outcome::NotMeasured;
        };
        if !self.comparison.passes(m, self.threshold) {
            // a lower bound of an at-least criterion that falls short says nothing either way
            return if self.lower_bound && self.comparison == Comparison::AtLeast {
                Outcome::Inconclusive
            } else {
                Outcome::Fail
            };
        }
        match self.uncertainty {
            Some(u) if (m - self.threshold).abs() < u => Outcome::Marginal,
            _ => Outcome::Pass,
        }
    }
}

/// The largest absolute difference between two equally long series, NaN-propagating (a NaN on
/// either side makes the result NaN, which no tolerance passes; `f64::max` would drop it).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
        let d = (*x as f64 - *y as f64).abs();
        if d.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(d)
        }
    })
}

/// The criterion ids a report of scenario `kind` must contain (`None` for an unknown kind);
/// `scenario_id` is the calibration scenario's own id.
pub fn expected_criteria(kind: &str, scenario_id: &str) -> Option<Vec<String>> {
    let ids: Vec<&str> = match kind {
        "calibrate" => return Some(vec![scenario_id.to_string()]),
        "mla" | "mtp" | "moe" => super::spec::ids(kind),
        "model" => vec!["FR-004"],
        _ => return None,
    };
    Some(ids.iter().map(|s| s.to_string()).collect())
}

/// 总判定。
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// 所有标准通过。
    Pass,
    /// 至少一个标准未通过。
    Fail,
    /// 至少一个标准无法测量（或没有标准）。
    Error,
    /// 没有未通过的，但至少一个标准的下界没达到阈值（无定论）。
    Inconclusive,
}

impl Verdict {
    /// pass if every criterion passed; error if one could not be measured (or none exist);
    /// fail if one failed; inconclusive if the only ones that did not pass are lower bounds
    /// short of their threshold.
    pub fn of(criteria: &[Criterion]) -> Verdict {
        if criteria.is_empty() || criteria.iter().any(|c| c.measured.is_none()) {
            Verdict::Error
        } else if criteria.iter().all(|c| c.passed) {
            Verdict::Pass
        } else if criteria
            .iter()
            .all(|c| c.passed || c.outcome() == Outcome::Inconclusive)
        {
            Verdict::Inconclusive
        } else {
            Verdict::Fail
        }
    }

    /// The exit code of a finished run with this verdict: 0 for pass, 1 for fail and for error
    /// (a run that finished but could not measure a criterion; a run that could not be done at
    /// all exits 3 through its error instead).
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Pass => crate::error::EXIT_PASS,
            Verdict::Fail | Verdict::Error | Verdict::Inconclusive => crate::error::EXIT_FAIL,
        }
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Error => "error",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

impl VariantReport {
    /// A variant report from a monitor measurement (status from its error).
    pub fn from_measurement<T>(m: &crate::monitor::Measurement<T>) -> VariantReport {
        VariantReport {
            name: m.name.clone(),
            status: if m.error.is_some() {
                VariantStatus::Failed
            } else {
                VariantStatus::Ok
            },
            error: m.error.clone(),
            timings: m.timings.clone(),
            memory: MemoryReport {
                measured: m.memory.clone(),
                analytic: None,
            },
            metrics: BTreeMap::new(),
            equivalence: Equivalence::default(),
            warnings: m.warnings.iter().map(|w| w.to_string()).collect(),
        }
    }

    /// Marks the variant failed with a reason (keeps its measurements).
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.status = VariantStatus::Failed;
        let reason = reason.into();
        self.error = Some(match self.error.take() {
            Some(prev) => format!("{prev}; {reason}"),
            None => reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criterion_evaluation() {
        let c = Criterion::evaluate("A", "m", Comparison::AtLeast, 0.4, Some(0.5), "");
        assert!(c.passed);
        let c = Criterion::evaluate("A", "m", Comparison::AtLeast, 0.4, Some(0.3), "");
        assert!(!c.passed);
        let c = Criterion::evaluate("A", "m", Comparison::AtMost, 1e-3, Some(1e-4), "");
        assert!(c.passed);
        let c = Criterion::evaluate("A", "m", Comparison::AtLeast, 0.4, None, "");
        assert!(!c.passed && c.measured.is_none());
        let c = Criterion::evaluate("A", "m", Comparison::AtLeast, 0.4, Some(f64::NAN), "");
        assert!(!c.passed && c.measured.is_none());
    }

    #[test]
    fn verdicts() {
        let p = Criterion::evaluate("A", "m", Comparison::AtLeast, 1.0, Some(2.0), "");
        let f = Criterion::evaluate("B", "m", Comparison::AtLeast, 1.0, Some(0.5), "");
        let e = Criterion::evaluate("C", "m", Comparison::AtLeast, 1.0, None, "");
        assert_eq!(Verdict::of(std::slice::from_ref(&p)), Verdict::Pass);
        assert_eq!(Verdict::of(&[p.clone(), f.clone()]), Verdict::Fail);
        assert_eq!(Verdict::of(&[p, f, e]), Verdict::Error);
        assert_eq!(Verdict::of(&[]), Verdict::Error);
    }

    #[test]
    fn recomputation_ignores_the_stored_flag_and_not_applicable_never_passes() {
        let mut c = Criterion::evaluate("A", "m", Comparison::AtLeast, 0.4, Some(0.3), "");
        c.passed = true; // doctored
        assert!(!c.recomputed_pass());
        let mut c = Criterion::evaluate("A", "m", Comparison::AtLeast, 0.4, None, "");
        c.passed = true;
        assert!(!c.recomputed_pass());
        let na = Criterion::not_applicable("B", "m", Comparison::AtMost, 1.0, "no device");
        assert!(!na.passed && !na.recomputed_pass() && na.measured.is_none());
        assert_eq!(Verdict::of(&[na]), Verdict::Error);
    }

    #[test]
    fn max_abs_diff_propagates_nan() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert!(max_abs_diff(&[1.0, f32::NAN], &[1.0, 2.0]).is_nan());
        assert!(max_abs_diff(&[f32::NAN, 1.0], &[1.0, 1.0]).is_nan());
        assert!(max_abs_diff(&[1.0], &[1.0, 2.0]).is_nan());
    }

    #[test]
    fn unmeasured_memory_serialises_as_null() {
        let m = MemoryReport::default();
        let v = serde_json::to_value(&m).unwrap();
        assert!(v["host_peak_bytes"].is_null());
        assert!(v["nvml_peak_bytes"].is_null());
        assert!(v["device_peak_bytes"].is_null());
        assert!(v["analytic"].is_null());
    }
}
