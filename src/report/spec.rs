//! 规格表：规格（SC-001..003）每条验收标准的比较方向、规格阈值、等价性依赖与工作点。
//!
//! 一份报告的标准只有在规格的工作点上、用规格的阈值测得时才带规格的编号（`SC-001a`）；
//! 换了工作点、放宽了阈值或标为冒烟（`smoke = true`）的场景照样运行，但它的标准改名为
//! `<规格编号>@<标签>`（例如 `SC-002b@batch1`），报告写明与规格的每一处偏差。门禁（gate）
//! 由报告里记下的工作点与各标准的阈值**重新**推出这些偏差，不信任存着的结论。
//!
//! 这一层不读场景、不跑基准：工作点由运行器在组装报告时填好（`bench::assemble`），这里只做
//! 纯函数的判定，门禁与运行器共用。

use serde::{Deserialize, Serialize};

use super::schema::{Comparison, Criterion};

/// 规格的一条验收标准。
#[derive(Debug, Clone, Copy)]
pub struct SpecCriterion {
    /// 规格编号，例如 `SC-001a`。
    pub id: &'static str,
    /// 所属场景种类（`mla`、`mtp`、`moe`）。
    pub kind: &'static str,
    /// 比较方向。
    pub comparison: Comparison,
    /// 规格给出的阈值；等价性标准的容差取决于数值类型，不是规格的数，为 `None`（不检查放宽）。
    pub threshold: Option<f64>,
    /// 这条标准通过的前提：这些等价性标准都通过（优化变体算的必须与标准变体相同，速度才算数）。
    pub depends_on: &'static [&'static str],
    /// 是否为计时标准（由重复计时的中位数得出）。
    pub timing: bool,
    /// 规格原话的要点。
    pub claim: &'static str,
}

const fn sc(
    id: &'static str,
    kind: &'static str,
    comparison: Comparison,
    threshold: Option<f64>,
    depends_on: &'static [&'static str],
    timing: bool,
    claim: &'static str,
) -> SpecCriterion {
    SpecCriterion {
        id,
        kind,
        comparison,
        threshold,
        depends_on,
        timing,
        claim,
    }
}

use Comparison::{AtLeast, AtMost};

/// 规格表。
pub const SPEC: &[SpecCriterion] = &[
    sc(
        "SC-001a",
        "mla",
        AtLeast,
        Some(0.40),
        &["SC-001-eq", "SC-001-eq-tokens"],
        false,
        "MLA cuts memory for 8192-token sequences by >= 40 % (absorbed MLA vs MHA of the same heads)",
    ),
    sc(
        "SC-001b",
        "mla",
        AtLeast,
        Some(2.0),
        &["SC-001-eq", "SC-001-eq-tokens"],
        false,
        "MLA fits >= 2x longer sequences in the same memory budget",
    ),
    sc(
        "SC-001-eq",
        "mla",
        AtMost,
        None,
        &[],
        false,
        "absorbed MLA computes what naive MLA computes (logits)",
    ),
    sc(
        "SC-001-eq-tokens",
        "mla",
        AtLeast,
        None,
        &[],
        false,
        "absorbed MLA chooses the tokens naive MLA chooses",
    ),
    sc(
        "SC-002a",
        "mtp",
        AtLeast,
        Some(0.25),
        &["SC-002-eq"],
        true,
        "MTP predicting 4 tokens at batch 8 cuts generation time by >= 25 % against greedy",
    ),
    sc(
        "SC-002b",
        "mtp",
        AtLeast,
        Some(1.3),
        &["SC-002-eq"],
        true,
        "MTP predicting 4 tokens at batch 8 raises throughput by >= 30 % against greedy",
    ),
    sc(
        "SC-002-eq",
        "mtp",
        AtLeast,
        Some(1.0),
        &[],
        false,
        "speculative decoding generates greedy's tokens",
    ),
    sc(
        "SC-003a-prefill",
        "moe",
        AtLeast,
        Some(1.3),
        &[],
        true,
        "a ~10 %-active MoE is >= 30 % faster than dense of equal total size (prefill)",
    ),
    sc(
        "SC-003a-decode",
        "moe",
        AtLeast,
        Some(1.3),
        &[],
        true,
        "a ~10 %-active MoE is >= 30 % faster than dense of equal total size (decode)",
    ),
    sc(
        "SC-003b",
        "moe",
        AtLeast,
        Some(2.0),
        &["SC-003b-eq"],
        false,
        "a model that needs 2x the budget (16 GB vs 8 GB) runs within the budget",
    ),
    sc(
        "SC-003b-peak",
        "moe",
        AtMost,
        Some(1.0),
        &["SC-003b-eq"],
        false,
        "the offloaded run's peak stays within the budget",
    ),
    sc(
        "SC-003b-eq",
        "moe",
        AtMost,
        None,
        &[],
        false,
        "the offloaded model computes what the resident twin computes",
    ),
];

/// The spec's sequence length for SC-001 (tokens).
pub const SPEC_SEQ: usize = 8192;
/// The spec's batch for SC-002.
pub const SPEC_MTP_BATCH: usize = 8;
/// The spec's tokens per decoding step for SC-002 (main + 3 drafts).
pub const SPEC_MTP_TOKENS: usize = 4;
/// The whole-model active-parameter band of SC-003a (the spec's 1.3B active of 13B total).
pub const SPEC_ACTIVE_BAND: (f64, f64) = (0.08, 0.12);

/// The spec entry of `id` (a bare spec id; `SC-001a@seq2048` is not one).
pub fn lookup(id: &str) -> Option<&'static SpecCriterion> {
    SPEC.iter().find(|s| s.id == id)
}

/// The spec ids a report of scenario kind `kind` holds at the spec's operating point.
pub fn ids(kind: &str) -> Vec<&'static str> {
    SPEC.iter()
        .filter(|s| s.kind == kind)
        .map(|s| s.id)
        .collect()
}

/// The spec id a criterion id measures: `SC-002b@batch1` → `SC-002b`; `None` for ids outside
/// the spec table (FR-004, calibration ids).
pub fn base_id(id: &str) -> Option<&'static str> {
    lookup(id.split('@').next().unwrap_or(id)).map(|s| s.id)
}

/// 工作点：一份报告的标准是在什么条件下测得的（判定规格一致性所需的事实，外加写明的条件）。
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OperatingPoint {
    /// 场景标为冒烟（`smoke = true`）：它的标准永远不是规格标准。
    #[serde(default)]
    pub smoke: bool,
    /// MLA：序列长度（token）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<usize>,
    /// 批大小（MTP 为工作点的一部分；MLA 只写明）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// MTP：每个解码步预测的 token 数（主 token + D 个草稿）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_step: Option<usize>,
    /// MoE：整个模型的激活参数比例（注意力、嵌入与输出头都计入）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_fraction: Option<f64>,
    /// 优化变体与之比较的基线（MLA：`mha`；MTP：`greedy`；MoE：`dense_equal_total`）；
    /// 没有运行基线或优化变体时为 null。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// 写明、不属于工作点的条件（预算、模型大小、数值类型……），给人看。
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stated: Vec<String>,
}

/// 报告与规格的关系（模式版本 2 起写入报告）。
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SpecStatus {
    /// 工作点。
    pub operating_point: OperatingPoint,
    /// 是否与规格一致：工作点是规格的，且没有一条规格标准的阈值被放宽。
    pub conformant: bool,
    /// 与规格的每一处偏差（一致时为空）。
    #[serde(default)]
    pub deviations: Vec<String>,
}

/// The deviations of an operating point from the spec's, for a report of `kind`, each with
/// the short tag used in renamed ids. Kinds without spec criteria have none.
pub fn operating_deviations(kind: &str, op: &OperatingPoint) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if ids(kind).is_empty() {
        return out;
    }
    if op.smoke {
        out.push((
            "smoke".to_string(),
            "a smoke scenario (`smoke = true`): its criteria are never spec criteria".to_string(),
        ));
    }
    let baseline = match kind {
        "mla" => "mha",
        "mtp" => "greedy",
        _ => "dense_equal_total",
    };
    if op.baseline.as_deref() != Some(baseline) {
        out.push((
            "no-baseline".into(),
            format!(
                "the spec compares against `{baseline}`, which this run did not measure beside \
                 the optimised variant"
            ),
        ));
    }
    match kind {
        "mla" => match op.seq {
            Some(s) if s >= SPEC_SEQ => {}
            s => out.push((
                format!("seq{}", s.unwrap_or(0)),
                format!(
                    "sequence {} tokens: the spec's claim is about {SPEC_SEQ}-token sequences",
                    s.map(|s| s.to_string()).unwrap_or("unknown".into())
                ),
            )),
        },
        "mtp" => {
            if op.batch != Some(SPEC_MTP_BATCH) {
                out.push((
                    format!("batch{}", op.batch.unwrap_or(0)),
                    format!(
                        "batch {}: the spec's claim is at batch {SPEC_MTP_BATCH}",
                        op.batch.map(|b| b.to_string()).unwrap_or("unknown".into())
                    ),
                ));
            }
            if op.tokens_per_step != Some(SPEC_MTP_TOKENS) {
                let t = op.tokens_per_step.unwrap_or(0);
                out.push((
                    format!("tokens{t}"),
                    format!(
                        "{t} tokens per step (main + {} draft(s)): the spec predicts \
                         {SPEC_MTP_TOKENS} (main + 3 drafts)",
                        t.saturating_sub(1)
                    ),
                ));
            }
        }
        "moe" => {
            let (lo, hi) = SPEC_ACTIVE_BAND;
            match op.active_fraction {
                Some(f) if (lo..=hi).contains(&f) => {}
                f => out.push((
                    format!(
                        "active{}",
                        f.map(|f| format!("{:.0}pct", f * 100.0))
                            .unwrap_or("unknown".into())
                    ),
                    format!(
                        "whole-model active fraction {}: the spec's model is 1.3B active of 13B \
                         total (10 %; accepted {:.0}-{:.0} %)",
                        f.map(|f| format!("{:.1} %", f * 100.0))
                            .unwrap_or("unknown".into()),
                        lo * 100.0,
                        hi * 100.0
                    ),
                )),
            }
        }
        _ => {}
    }
    out
}

/// Why criterion `c` (whose id is a spec id, bare or renamed) does not use the spec's
/// threshold in the spec's direction — a weaker threshold or another comparison — with its
/// tag; `None` when it does (a stricter threshold is the spec's claim and more).
pub fn threshold_deviation(c: &Criterion) -> Option<(String, String)> {
    let s = lookup(base_id(&c.id)?)?;
    let spec = s.threshold?;
    let weaker = c.comparison != s.comparison
        || match s.comparison {
            AtLeast => c.threshold < spec,
            AtMost => c.threshold > spec,
        };
    weaker.then(|| {
        (
            format!("threshold{}", c.threshold),
            format!(
                "{}: threshold {} {} is weaker than the spec's {} {spec}",
                s.id,
                c.comparison.symbol(),
                c.threshold,
                s.comparison.symbol()
            ),
        )
    })
}

/// Binds a runner's criteria to the spec: records the operating point, renames every spec
/// criterion measured off the spec's operating point (and any whose threshold is weaker than
/// the spec's) to `<id>@<tag>`, fills in each criterion's spec id and equivalence
/// dependencies, and withholds a pass from a criterion whose dependency did not pass.
pub fn bind(kind: &str, op: OperatingPoint, criteria: &mut [Criterion]) -> SpecStatus {
    let point = operating_deviations(kind, &op);
    let mut deviations: Vec<String> = point.iter().map(|(_, d)| d.clone()).collect();
    let point_tag = point
        .iter()
        .map(|(t, _)| t.as_str())
        .collect::<Vec<_>>()
        .join("-");
    // first the names: a threshold change renames one criterion, an operating point all
    let mut renamed: Vec<(String, String)> = Vec::new();
    for c in criteria.iter_mut() {
        let Some(base) = base_id(&c.id).filter(|b| *b == c.id) else {
            continue;
        };
        c.spec_id = Some(base.to_string());
        let mut tags = Vec::new();
        let mut why = Vec::new();
        if !point.is_empty() {
            tags.push(point_tag.clone());
            why.extend(point.iter().map(|(_, d)| d.clone()));
        }
        if let Some((t, d)) = threshold_deviation(c) {
            tags.push(t);
            why.push(d.clone());
            deviations.push(d);
        }
        if !tags.is_empty() {
            let new = format!("{base}@{}", tags.join("-"));
            renamed.push((base.to_string(), new.clone()));
            c.off_spec = Some(format!(
                "not the spec's operating point: {}",
                why.join("; ")
            ));
            c.id = new;
        }
    }
    // then the dependencies, by the names they now have
    let name_of = |dep: &str| {
        renamed
            .iter()
            .find(|(b, _)| b == dep)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| dep.to_string())
    };
    for c in criteria.iter_mut() {
        if let Some(s) = c.spec_id.as_deref().and_then(lookup) {
            c.depends_on = s.depends_on.iter().map(|d| name_of(d)).collect();
        }
    }
    enforce_dependencies(criteria);
    SpecStatus {
        operating_point: op,
        conformant: deviations.is_empty(),
        deviations,
    }
}

/// The dependencies of `c` that did not pass in `criteria` (recomputed, not stored): absent
/// ones included.
pub fn failed_dependencies(c: &Criterion, criteria: &[Criterion]) -> Vec<String> {
    c.depends_on
        .iter()
        .filter(|d| !criteria.iter().any(|o| &o.id == *d && o.recomputed_pass()))
        .cloned()
        .collect()
}

/// Withholds a pass from each criterion whose equivalence dependency did not pass, saying so
/// in its note.
pub fn enforce_dependencies(criteria: &mut [Criterion]) {
    let snapshot = criteria.to_vec();
    for c in criteria.iter_mut() {
        let failed = failed_dependencies(c, &snapshot);
        if !failed.is_empty() && c.passed {
            c.passed = false;
            c.note = format!(
                "{} — not passed: its equivalence criterion {} did not pass (a speed or memory \
                 figure of a variant that computes something else does not count)",
                c.note,
                failed.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crit(id: &str, cmp: Comparison, thr: f64, m: Option<f64>) -> Criterion {
        Criterion::evaluate(id, "m", cmp, thr, m, "")
    }

    fn mtp_point(batch: usize, tokens: usize) -> OperatingPoint {
        OperatingPoint {
            batch: Some(batch),
            tokens_per_step: Some(tokens),
            baseline: Some("greedy".into()),
            ..Default::default()
        }
    }

    fn mtp_criteria(eq: f64) -> Vec<Criterion> {
        vec![
            crit("SC-002a", AtLeast, 0.25, Some(0.3)),
            crit("SC-002b", AtLeast, 1.3, Some(1.5)),
            crit("SC-002-eq", AtLeast, 1.0, Some(eq)),
        ]
    }

    #[test]
    fn the_spec_point_keeps_the_ids_and_records_dependencies() {
        let mut c = mtp_criteria(1.0);
        let st = bind("mtp", mtp_point(8, 4), &mut c);
        assert!(st.conformant && st.deviations.is_empty());
        assert_eq!(c[0].id, "SC-002a");
        assert_eq!(c[0].depends_on, vec!["SC-002-eq".to_string()]);
        assert!(c.iter().all(|c| c.passed && c.off_spec.is_none()));
        assert_eq!(c[1].spec_id.as_deref(), Some("SC-002b"));
    }

    #[test]
    fn another_batch_renames_every_criterion_of_the_kind() {
        let mut c = mtp_criteria(1.0);
        let st = bind("mtp", mtp_point(1, 4), &mut c);
        assert!(!st.conformant);
        assert!(st.deviations[0].contains("batch 1"), "{:?}", st.deviations);
        assert_eq!(c[0].id, "SC-002a@batch1");
        assert_eq!(c[2].id, "SC-002-eq@batch1");
        // the renamed speed criterion depends on the renamed equivalence criterion
        assert_eq!(c[1].depends_on, vec!["SC-002-eq@batch1".to_string()]);
        assert_eq!(c[1].spec_id.as_deref(), Some("SC-002b"));
        assert!(c[1].off_spec.as_deref().unwrap().contains("batch 1"));
        // D = 1 (`num_nextn_predict_layers = 1`): 2 tokens per step
        let mut c = mtp_criteria(1.0);
        bind("mtp", mtp_point(8, 2), &mut c);
        assert_eq!(c[0].id, "SC-002a@tokens2");
    }

    #[test]
    fn a_weakened_threshold_renames_that_criterion_only() {
        let mut c = vec![
            crit("SC-001a", AtLeast, 0.01, Some(0.3)),
            crit("SC-001b", AtLeast, 2.0, Some(2.4)),
            crit("SC-001-eq", AtMost, 1e-3, Some(0.0)),
            crit("SC-001-eq-tokens", AtLeast, 1.0, Some(1.0)),
        ];
        let op = OperatingPoint {
            seq: Some(8192),
            baseline: Some("mha".into()),
            ..Default::default()
        };
        let st = bind("mla", op, &mut c);
        assert!(!st.conformant);
        assert_eq!(c[0].id, "SC-001a@threshold0.01");
        assert_eq!(c[1].id, "SC-001b");
        assert!(st.deviations[0].contains("weaker than the spec's >= 0.4"));
        // a stricter threshold is the spec's claim and more
        let mut c = vec![crit("SC-001b", AtLeast, 3.0, Some(3.5))];
        let op = OperatingPoint {
            seq: Some(16384),
            baseline: Some("mha".into()),
            ..Default::default()
        };
        assert!(bind("mla", op, &mut c).conformant);
    }

    #[test]
    fn a_failed_equivalence_withholds_the_speed_pass() {
        let mut c = mtp_criteria(0.5);
        bind("mtp", mtp_point(8, 4), &mut c);
        assert!(!c[0].passed && !c[1].passed && !c[2].passed);
        assert!(c[0].note.contains("SC-002-eq did not pass"));
        // a missing dependency is a failed one
        let mut c = vec![crit("SC-002a", AtLeast, 0.25, Some(0.3))];
        bind("mtp", mtp_point(8, 4), &mut c);
        assert!(!c[0].passed);
    }

    #[test]
    fn smoke_short_sequences_and_active_fractions_are_off_spec() {
        let mut op = OperatingPoint {
            seq: Some(8192),
            baseline: Some("mha".into()),
            smoke: true,
            ..Default::default()
        };
        assert_eq!(operating_deviations("mla", &op)[0].0, "smoke");
        op.smoke = false;
        op.seq = Some(2048);
        assert_eq!(operating_deviations("mla", &op)[0].0, "seq2048");
        op.seq = Some(8192);
        op.baseline = None;
        assert_eq!(operating_deviations("mla", &op)[0].0, "no-baseline");
        let moe = |f| OperatingPoint {
            active_fraction: f,
            baseline: Some("dense_equal_total".into()),
            ..Default::default()
        };
        assert!(operating_deviations("moe", &moe(Some(0.10))).is_empty());
        assert_eq!(
            operating_deviations("moe", &moe(Some(0.157)))[0].0,
            "active16pct"
        );
        assert_eq!(
            operating_deviations("moe", &moe(None))[0].0,
            "activeunknown"
        );
        // kinds without spec criteria have no operating point to miss
        assert!(operating_deviations("model", &OperatingPoint::default()).is_empty());
    }

    #[test]
    fn base_ids() {
        assert_eq!(base_id("SC-002b@batch1"), Some("SC-002b"));
        assert_eq!(base_id("SC-001-eq-tokens"), Some("SC-001-eq-tokens"));
        assert_eq!(base_id("FR-004"), None);
        assert_eq!(ids("mtp"), vec!["SC-002a", "SC-002b", "SC-002-eq"]);
    }
}
