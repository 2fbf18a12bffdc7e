//! Value checks for scenarios: each violation names the dotted key and how to fix it.
//!
//! Why this file is over 500 lines: it is one table of rules, a short function per scenario
//! kind, with the tests that show each rule firing; splitting it would scatter the rules.

use super::diag::Violation;
use super::optimization::{DecoderShape, FfnKind, OptimizationConfig};
use super::scenario::*;
use crate::nn::attention::AttentionKind;

/// The routing fields of an MoE section, whichever struct holds them.
struct Routing {
    n_routed_experts: usize,
    num_experts_per_tok: usize,
    moe_inter_dim: usize,
    n_group: usize,
    topk_group: usize,
    route_scale: f64,
}

struct Checker {
    out: Vec<Violation>,
}

impl Checker {
    fn fail(&mut self, key: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.out.push(Violation {
            key: key.into(),
            message: message.into(),
            fix: fix.into(),
        });
    }
    fn at_least(&mut self, key: &str, v: usize, min: usize) {
        if v < min {
            self.fail(
                key,
                format!("is {v}, must be at least {min}"),
                format!("set {} = {min} or more", leaf(key)),
            );
        }
    }
    fn at_most(&mut self, key: &str, v: usize, max: usize) {
        if v > max {
            self.fail(
                key,
                format!("is {v}, must be at most {max}"),
                format!("set {} to {max} or less", leaf(key)),
            );
        }
    }
    /// A fraction strictly inside (0, 1).
    fn fraction(&mut self, key: &str, v: f64) {
        if !(v > 0.0 && v < 1.0) {
            self.fail(
                key,
                format!("is {v}, must be a fraction strictly between 0 and 1"),
                format!("write e.g. {} = 0.40 for 40 %", leaf(key)),
            );
        }
    }
    fn positive(&mut self, key: &str, v: f64) {
        if !(v > 0.0 && v.is_finite()) {
            self.fail(
                key,
                format!("is {v}, must be a positive finite number"),
                format!("set {} to a value above 0", leaf(key)),
            );
        }
    }
    fn id(&mut self, id: &str, prefix: &str) {
        let ok = id
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .map(|n| n.len() == 3 && n.chars().all(|c| c.is_ascii_digit()))
            .unwrap_or(false);
        if !ok {
            self.fail(
                "id",
                format!("`{id}` is not a {prefix}-NNN id"),
                format!("use an id like \"{prefix}-001\""),
            );
        }
    }
    fn run_common(&mut self, warmup: usize, repetitions: usize) {
        self.at_least("run.repetitions", repetitions, 1);
        self.at_most("run.repetitions", repetitions, 10_000);
        self.at_most("run.warmup", warmup, 1_000);
    }
    /// Attention heads of width hidden / n_heads (MTP and MoE models).
    fn heads_divide_hidden(&mut self, m: &ModelShape) {
        if m.n_heads >= 1 && !m.hidden.is_multiple_of(m.n_heads) {
            self.fail(
                "model.num_attention_heads",
                format!(
                    "{} heads do not divide model.hidden_size = {}",
                    m.n_heads, m.hidden
                ),
                "choose num_attention_heads that divides hidden_size",
            );
        }
    }
    /// `q_lora_rank`: absent = no query compression; 0 is no longer a sentinel for that.
    fn q_lora_rank(&mut self, key: &str, v: Option<usize>) {
        if v == Some(0) {
            self.fail(
                key,
                "is 0: an absent q_lora_rank means no query compression (as null in config.json); \
                 0 is not a rank",
                "delete the key for no query compression (V2-Lite), or give the rank (V3: 1536)",
            );
        }
    }
    fn model(&mut self, m: &ModelShape) {
        self.at_least("model.hidden_size", m.hidden, 1);
        self.at_least("model.num_hidden_layers", m.n_layers, 1);
        self.at_least("model.num_attention_heads", m.n_heads, 1);
        self.at_least("model.vocab_size", m.vocab_size, 2);
        self.at_least("model.intermediate_size", m.ffn_hidden, 1);
        self.positive("model.rope_theta", m.rope_theta);
        self.positive("model.rms_norm_eps", m.rms_norm_eps);
        self.yarn(m.rope_scaling.as_ref());
    }

    /// YaRN (`model.rope_scaling`): the factor stretches the context (>= 1), the ramp needs
    /// beta_fast > beta_slow > 0, and the original length is a length.
    fn yarn(&mut self, y: Option<&crate::nn::rope::Yarn>) {
        let Some(y) = y else { return };
        if !(y.factor >= 1.0 && y.factor.is_finite()) {
            self.fail(
                "model.rope_scaling.factor",
                format!("is {}, must be a finite number >= 1", y.factor),
                "use the checkpoint's value (DeepSeek: 40)",
            );
        }
        self.at_least(
            "model.rope_scaling.original_max_position_embeddings",
            y.original_max_position_embeddings,
            1,
        );
        self.positive("model.rope_scaling.beta_slow", y.beta_slow);
        if !(y.beta_fast > y.beta_slow && y.beta_fast.is_finite()) {
            self.fail(
                "model.rope_scaling.beta_fast",
                format!(
                    "is {}, must exceed beta_slow = {}",
                    y.beta_fast, y.beta_slow
                ),
                "use the checkpoint's values (DeepSeek: beta_fast = 32, beta_slow = 1)",
            );
        }
        for (k, v) in [("mscale", y.mscale), ("mscale_all_dim", y.mscale_all_dim)] {
            if let Some(v) = v {
                if !(v >= 0.0 && v.is_finite()) {
                    self.fail(
                        &format!("model.rope_scaling.{k}"),
                        format!("is {v}, must be a finite number >= 0"),
                        "use the checkpoint's value (V2: 0.707, V3: 1.0)",
                    );
                }
            }
        }
    }

    /// The MLA dimension rules at `prefix`: `[kv_lora_rank, qk_nope_head_dim,
    /// qk_rope_head_dim, v_head_dim]` (SC-001's `attention` section and `optimization.mla`).
    fn mla_dims(&mut self, prefix: &str, [rank, nope, rope, v]: [usize; 4]) {
        let key = |k: &str| format!("{prefix}.{k}");
        self.at_least(&key("kv_lora_rank"), rank, 1);
        self.at_least(&key("qk_nope_head_dim"), nope, 1);
        self.at_least(&key("qk_rope_head_dim"), rope, 2);
        if !rope.is_multiple_of(2) {
            self.fail(
                &key("qk_rope_head_dim"),
                "must be even (RoPE rotates pairs)",
                "use e.g. 64",
            );
        }
        self.at_least(&key("v_head_dim"), v, 1);
    }

    /// The routing rules of an MoE section at `prefix` (`moe` in SC-003 scenarios,
    /// `optimization.moe` in an optimisation config): the same rules for both.
    fn routing(&mut self, prefix: &str, m: Routing) {
        let key = |k: &str| format!("{prefix}.{k}");
        self.at_least(&key("n_routed_experts"), m.n_routed_experts, 1);
        self.at_least(&key("num_experts_per_tok"), m.num_experts_per_tok, 1);
        self.at_most(
            &key("num_experts_per_tok"),
            m.num_experts_per_tok,
            m.n_routed_experts,
        );
        self.at_least(&key("moe_intermediate_size"), m.moe_inter_dim, 1);
        self.at_least(&key("n_group"), m.n_group, 1);
        if m.n_group >= 1 && !m.n_routed_experts.is_multiple_of(m.n_group) {
            self.fail(
                &key("n_group"),
                format!(
                    "{} groups do not divide n_routed_experts = {}",
                    m.n_group, m.n_routed_experts
                ),
                "choose n_group that divides n_routed_experts (1 = no grouping)",
            );
        }
        self.at_least(&key("topk_group"), m.topk_group, 1);
        self.at_most(&key("topk_group"), m.topk_group, m.n_group);
        if m.n_group >= 1 && m.topk_group >= 1 && m.topk_group <= m.n_group {
            let per_group = m.n_routed_experts / m.n_group;
            if m.topk_group * per_group < m.num_experts_per_tok {
                self.fail(
                    &key("topk_group"),
                    format!(
                        "{} groups of {per_group} experts cannot supply num_experts_per_tok = {}",
                        m.topk_group, m.num_experts_per_tok
                    ),
                    "raise topk_group or lower num_experts_per_tok",
                );
            }
        }
        self.positive(&key("routed_scaling_factor"), m.route_scale);
    }
}

fn leaf(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// Returns every violation in the scenario (empty = valid).
pub fn validate(s: &Scenario) -> Vec<Violation> {
    let mut c = Checker { out: Vec::new() };
    match s {
        Scenario::Mla(s) => mla(&mut c, s),
        Scenario::Mtp(s) => mtp(&mut c, s),
        Scenario::Moe(s) => moe(&mut c, s),
        Scenario::Model(s) => model(&mut c, s),
        Scenario::Calibrate(s) => calibrate(&mut c, s),
    }
    c.out
}

fn mla(c: &mut Checker, s: &MlaScenario) {
    c.id(&s.id, "SC");
    c.model(&s.model);
    let a = &s.attention;
    c.at_least("attention.head_dim", a.head_dim, 1);
    if !a.head_dim.is_multiple_of(2) {
        c.fail(
            "attention.head_dim",
            "must be even (RoPE rotates pairs)",
            "use e.g. 128",
        );
    }
    c.at_least("attention.gqa_kv_heads", a.gqa_kv_heads, 1);
    if a.gqa_kv_heads >= 1
        && (!s.model.n_heads.is_multiple_of(a.gqa_kv_heads) || a.gqa_kv_heads >= s.model.n_heads)
    {
        c.fail(
            "attention.gqa_kv_heads",
            format!(
                "{} KV heads must divide model.num_attention_heads = {} and be fewer than it",
                a.gqa_kv_heads, s.model.n_heads
            ),
            "use a proper divisor of num_attention_heads, e.g. a quarter of it",
        );
    }
    c.mla_dims(
        "attention",
        [
            a.kv_lora_rank,
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
        ],
    );
    c.q_lora_rank("attention.q_lora_rank", a.q_lora_rank);
    c.at_least("attention.prefill_chunk", a.prefill_chunk, 1);
    if a.variants.is_empty() {
        c.fail(
            "attention.variants",
            "is empty",
            "list e.g. [\"mha\", \"gqa\", \"mla_absorbed\"]",
        );
    }
    // (an unknown variant name is refused when the file is parsed: `MlaVariant`)
    for (needed, why) in [
        (
            MlaVariant::Mha,
            "the SC-001 criteria compare mla_absorbed with mha",
        ),
        (
            MlaVariant::MlaAbsorbed,
            "the SC-001 criteria compare mla_absorbed with mha",
        ),
        (
            MlaVariant::MlaNaive,
            "SC-001-eq checks mla_absorbed against mla_naive on the same weights; without \
             that check the absorbed variant's memory figures cannot count",
        ),
    ] {
        if !a.variants.contains(&needed) {
            c.fail(
                "attention.variants",
                format!("must include `{needed}`: {why}"),
                format!("add \"{needed}\" to the list"),
            );
        }
    }
    c.at_least("run.batch", s.run.batch, 1);
    c.at_least("run.seq", s.run.seq, 1);
    c.at_least("run.decode_tokens", s.run.decode_tokens, 1);
    c.run_common(s.run.warmup, s.run.repetitions);
    c.positive("capacity.memory_budget_gib", s.capacity.memory_budget_gib);
    c.at_least("capacity.min_seq", s.capacity.min_seq, 1);
    if s.capacity.max_seq < s.capacity.min_seq {
        c.fail(
            "capacity.max_seq",
            format!(
                "is {}, below capacity.min_seq = {}",
                s.capacity.max_seq, s.capacity.min_seq
            ),
            "set max_seq >= min_seq",
        );
    }
    c.at_least(
        "capacity.probe_decode_tokens",
        s.capacity.probe_decode_tokens,
        1,
    );
    c.fraction(
        "thresholds.runtime_peak_reduction",
        s.thresholds.runtime_peak_reduction,
    );
    c.positive("thresholds.capacity_ratio", s.thresholds.capacity_ratio);
}

fn mtp(c: &mut Checker, s: &MtpScenario) {
    c.id(&s.id, "SC");
    c.model(&s.model);
    if s.model_origin.is_none() {
        // dsopt's own MHA model; a checkpoint's MLA has its own head widths
        c.heads_divide_hidden(&s.model);
    }
    c.at_least("mtp.num_nextn_predict_layers", s.mtp.depth, 1);
    c.at_most("mtp.num_nextn_predict_layers", s.mtp.depth, 8);
    c.at_least("train.steps", s.train.steps, 1);
    c.at_least("train.batch", s.train.batch, 1);
    c.at_least("train.seq_len", s.train.seq_len, s.mtp.depth + 2);
    c.positive("train.learning_rate", s.train.learning_rate);
    c.positive("train.mtp_lambda", s.train.mtp_lambda);
    c.fraction("train.holdout_fraction", s.train.holdout_fraction);
    c.at_least("run.batch", s.run.batch, 1);
    c.at_least("run.prompt_len", s.run.prompt_len, 1);
    c.at_least("run.new_tokens", s.run.new_tokens, 1);
    c.run_common(s.run.warmup, s.run.repetitions);
    if let Some(sw) = &s.sweep {
        if sw.depths.is_empty() || sw.depths.iter().any(|&d| d == 0 || d > 8) {
            c.fail(
                "sweep.depths",
                "must list depths between 1 and 8",
                "e.g. depths = [1, 2, 3, 4]",
            );
        }
        if sw.batches.is_empty() || sw.batches.contains(&0) {
            c.fail(
                "sweep.batches",
                "must list batch sizes of at least 1",
                "e.g. batches = [1, 8, 32]",
            );
        }
    }
    c.fraction("thresholds.time_reduction", s.thresholds.time_reduction);
    c.positive("thresholds.throughput_ratio", s.thresholds.throughput_ratio);
}

fn moe(c: &mut Checker, s: &MoeScenario) {
    c.id(&s.id, "SC");
    c.model(&s.model);
    let checkpoint = s
        .model_origin
        .as_ref()
        .is_some_and(|o| o.weights == "checkpoint");
    if !checkpoint || s.offload.is_some() {
        // MHA models (a checkpoint's own MLA has its own head widths)
        c.heads_divide_hidden(&s.model);
    }
    let m = &s.moe;
    if m.first_k_dense_replace >= s.model.n_layers.max(1) {
        c.fail(
            "moe.first_k_dense_replace",
            format!(
                "is {} with model.num_hidden_layers = {}: no MoE layer would be left",
                m.first_k_dense_replace, s.model.n_layers
            ),
            format!("use at most {}", s.model.n_layers.saturating_sub(1)),
        );
    }
    c.routing(
        "moe",
        Routing {
            n_routed_experts: m.n_routed_experts,
            num_experts_per_tok: m.num_experts_per_tok,
            moe_inter_dim: m.moe_inter_dim,
            n_group: m.n_group,
            topk_group: m.topk_group,
            route_scale: m.route_scale,
        },
    );
    c.at_least("run.prefill_batch", s.run.prefill_batch, 1);
    c.at_least("run.prefill_seq", s.run.prefill_seq, 1);
    c.at_least("run.decode_batch", s.run.decode_batch, 1);
    c.at_least("run.decode_steps", s.run.decode_steps, 1);
    c.run_common(s.run.warmup, s.run.repetitions);
    if let Some(o) = &s.offload {
        c.positive("offload.memory_budget_gib", o.memory_budget_gib);
        c.at_least(
            "offload.cache_experts",
            o.cache_experts,
            m.num_experts_per_tok.max(1),
        );
    }
    c.positive(
        "thresholds.speedup_vs_dense_total",
        s.thresholds.speedup_vs_dense_total,
    );
    c.positive(
        "thresholds.model_to_budget_ratio",
        s.thresholds.model_to_budget_ratio,
    );
}

/// Checks of an [`OptimizationConfig`]; with `shape`, also those against the model (GQA heads).
/// Keys are `optimization.…`. Every sub-section is checked even when its switch is off, so a
/// mistake is caught before the switch is flipped.
pub(crate) fn optimization(o: &OptimizationConfig, shape: Option<&DecoderShape>) -> Vec<Violation> {
    let mut c = Checker { out: Vec::new() };
    c.at_least("optimization.prefill_chunk", o.prefill_chunk, 1);
    c.at_least("optimization.key_block", o.key_block, 1);
    // GQA: the head count is required when it is the chosen attention
    match (o.attention, o.gqa.n_kv_heads) {
        (AttentionKind::Gqa, None) => c.fail(
            "optimization.gqa.n_kv_heads",
            "is missing: attention = \"gqa\" needs the number of K/V heads",
            "add [optimization.gqa] with n_kv_heads = a proper divisor of model.num_attention_heads",
        ),
        (_, Some(g)) => {
            c.at_least("optimization.gqa.n_kv_heads", g, 1);
            if let (AttentionKind::Gqa, Some(m)) = (o.attention, shape) {
                if g >= 1 && (!m.n_heads.is_multiple_of(g) || g >= m.n_heads) {
                    c.fail(
                        "optimization.gqa.n_kv_heads",
                        format!(
                            "{g} K/V heads must divide model.num_attention_heads = {} and be fewer than it",
                            m.n_heads
                        ),
                        "use a proper divisor of num_attention_heads, e.g. a quarter of it (or attention = \"mha\")",
                    );
                }
            }
        }
        _ => {}
    }
    // MLA dimensions
    let a = &o.mla;
    c.mla_dims(
        "optimization.mla",
        [
            a.kv_lora_rank,
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
        ],
    );
    c.q_lora_rank("optimization.mla.q_lora_rank", a.q_lora_rank);
    // MoE routing
    let m = &o.moe;
    c.routing(
        "optimization.moe",
        Routing {
            n_routed_experts: m.n_routed_experts,
            num_experts_per_tok: m.num_experts_per_tok,
            moe_inter_dim: m.moe_inter_dim,
            n_group: m.n_group,
            topk_group: m.topk_group,
            route_scale: m.route_scale,
        },
    );
    c.at_most("optimization.mtp.num_nextn_predict_layers", o.mtp.depth, 8);
    if let (FfnKind::Moe, Some(shape)) = (o.ffn, shape) {
        if m.first_k_dense_replace >= shape.n_layers.max(1) {
            c.fail(
                "optimization.moe.first_k_dense_replace",
                format!(
                    "is {} with model.num_hidden_layers = {}: no MoE layer would be left",
                    m.first_k_dense_replace, shape.n_layers
                ),
                format!("use at most {}", shape.n_layers.saturating_sub(1)),
            );
        }
    }
    c.out
}

fn model(c: &mut Checker, s: &ModelScenario) {
    c.id(&s.id, if s.id.starts_with("SC") { "SC" } else { "FR" });
    let m = &s.model;
    c.at_least("model.hidden_size", m.hidden, 1);
    c.at_least("model.num_hidden_layers", m.n_layers, 1);
    c.at_least("model.num_attention_heads", m.n_heads, 1);
    c.at_least("model.head_dim", m.head_dim, 2);
    if !m.head_dim.is_multiple_of(2) {
        c.fail(
            "model.head_dim",
            "must be even (RoPE rotates pairs)",
            "use e.g. 64",
        );
    }
    c.at_least("model.vocab_size", m.vocab_size, 2);
    c.at_least("model.intermediate_size", m.ffn_hidden, 1);
    c.positive("model.rope_theta", m.rope_theta);
    c.positive("model.rms_norm_eps", m.rms_norm_eps);
    c.yarn(m.rope_scaling.as_ref());
    c.out.extend(optimization(&s.optimization, Some(m)));
    c.at_least("run.batch", s.run.batch, 1);
    c.at_least("run.prompt_len", s.run.prompt_len, 1);
    c.at_least("run.new_tokens", s.run.new_tokens, 1);
    c.run_common(s.run.warmup, s.run.repetitions);
}

fn calibrate(c: &mut Checker, s: &CalibrateScenario) {
    c.id(&s.id, "CAL");
    c.at_least("workload.size", s.workload.size, 1);
    c.at_most("workload.size", s.workload.size, 16_384);
    c.at_least("workload.batch", s.workload.batch, 1);
    c.run_common(s.run.warmup, s.run.repetitions);
    c.fraction("thresholds.max_rel_error", s.thresholds.max_rel_error);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse_err(kind: ScenarioKind, from: &str, to: &str) -> String {
        let (_, text) = kind.default_scenario();
        assert!(
            text.contains(from),
            "{from} not in the shipped {kind:?} scenario"
        );
        let bad = text.replacen(from, to, 1);
        Scenario::parse(Path::new("s.toml"), &bad)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn zero_heads_rejected_with_key_and_line() {
        let e = parse_err(
            ScenarioKind::Mla,
            "num_attention_heads = 16",
            "num_attention_heads = 0",
        );
        assert!(e.contains("model.num_attention_heads"), "{e}");
        assert!(e.contains("at least 1"), "{e}");
        assert!(e.contains("fix:"), "{e}");
    }

    #[test]
    fn gqa_heads_must_divide() {
        let e = parse_err(ScenarioKind::Mla, "gqa_kv_heads = 4", "gqa_kv_heads = 5");
        assert!(e.contains("attention.gqa_kv_heads"), "{e}");
    }

    #[test]
    fn heads_must_divide_width_for_mtp() {
        let e = parse_err(
            ScenarioKind::Mtp,
            "num_attention_heads = 4",
            "num_attention_heads = 7",
        );
        assert!(
            e.contains("model.num_attention_heads") && e.contains("divide"),
            "{e}"
        );
    }

    #[test]
    fn seq_zero_and_threshold_out_of_range() {
        let e = parse_err(ScenarioKind::Mla, "seq = 8192", "seq = 0");
        assert!(e.contains("run.seq"), "{e}");
        let e = parse_err(
            ScenarioKind::Mla,
            "runtime_peak_reduction = 0.40",
            "runtime_peak_reduction = 40",
        );
        assert!(
            e.contains("thresholds.runtime_peak_reduction") && e.contains("fraction"),
            "{e}"
        );
        let e = parse_err(
            ScenarioKind::Mtp,
            "time_reduction = 0.25",
            "time_reduction = -0.1",
        );
        assert!(e.contains("thresholds.time_reduction"), "{e}");
    }

    #[test]
    fn moe_topk_bounds() {
        let e = parse_err(
            ScenarioKind::Moe,
            "num_experts_per_tok = 6",
            "num_experts_per_tok = 113",
        );
        assert!(e.contains("moe.num_experts_per_tok"), "{e}");
    }

    #[test]
    fn unknown_variant_rejected() {
        // a typo fails when the file is parsed (MlaVariant), naming the key and the choices
        let e = parse_err(ScenarioKind::Mla, "\"mla_naive\"", "\"mla_fast\"");
        assert!(e.contains("mla_fast"), "{e}");
        assert!(e.contains("attention.variants"), "{e}");
        assert!(
            e.contains("`mla_naive`") && e.contains("`mla_absorbed`"),
            "{e}"
        );
    }

    #[test]
    fn bad_id_rejected() {
        let e = parse_err(ScenarioKind::Calibrate, "id = \"CAL-001\"", "id = \"cal1\"");
        assert!(e.contains("`id`") && e.contains("CAL-NNN"), "{e}");
    }
}
