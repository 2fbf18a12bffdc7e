//! 场景变体 = 共享的模型形状 + 一个 `OptimizationConfig`：每个运行器都经由同一个模型构建入口
//! [`OptimizationConfig::decoder_config`]（FR-004 的配置就是构建模型的唯一方式）。
//!
//! The variant names are enums ([`MlaVariant`] is parsed from the scenario file, so a typo
//! fails at parse time; [`MoeVariant`] is fixed by SC-003).

use serde::{Deserialize, Serialize};

use super::optimization::{DecoderShape, FfnKind, GqaOptions, MlaOptions, MoeOptions};
use super::scenario::{MlaScenario, ModelShape, MoeScenario, MtpScenario};
use super::OptimizationConfig;
use crate::nn::attention::{AttentionKind, MlaImpl};
use crate::nn::DecoderConfig;

/// SC-001 的一个注意力变体（`attention.variants` 的取值）。声明顺序即运行顺序：朴素 MLA 紧接着
/// 吸收 MLA，二者共享同一份权重。
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlaVariant {
    /// 标准多头注意力（基线）。
    Mha,
    /// 分组查询注意力（`gqa_kv_heads` 个 K/V 头）。
    Gqa,
    /// 朴素 MLA：缓存重建出的每头 K/V（与吸收 MLA 的等价性参照）。
    MlaNaive,
    /// 吸收 MLA：只缓存潜向量与 RoPE 键（被测的优化）。
    MlaAbsorbed,
}

impl MlaVariant {
    /// The name in scenario files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            MlaVariant::Mha => "mha",
            MlaVariant::Gqa => "gqa",
            MlaVariant::MlaNaive => "mla_naive",
            MlaVariant::MlaAbsorbed => "mla_absorbed",
        }
    }
}

impl std::fmt::Display for MlaVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SC-003 的三个变体：MoE，以及两个稠密对照（FFN 宽度分别等于 MoE 的总参数与激活参数）。
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeVariant {
    /// DeepSeekMoE FFN（被测的优化）。
    Moe,
    /// 稠密 FFN，参数量等于 MoE 的总参数（SC-003a 的基线）。
    DenseEqualTotal,
    /// 稠密 FFN，参数量等于 MoE 每个 token 的激活参数（路由开销的参照）。
    DenseEqualActive,
}

impl MoeVariant {
    /// Every variant, in the order they are measured.
    pub const ALL: [MoeVariant; 3] = [
        MoeVariant::Moe,
        MoeVariant::DenseEqualTotal,
        MoeVariant::DenseEqualActive,
    ];

    /// The name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            MoeVariant::Moe => "moe",
            MoeVariant::DenseEqualTotal => "dense_equal_total",
            MoeVariant::DenseEqualActive => "dense_equal_active",
        }
    }
}

impl ModelShape {
    /// The decoder shape of this model section with per-head width `head_dim` and dense FFN
    /// width `ffn_hidden`.
    pub fn decoder_shape(&self, head_dim: usize, ffn_hidden: usize) -> DecoderShape {
        DecoderShape {
            hidden: self.hidden,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            head_dim,
            vocab_size: self.vocab_size,
            ffn_hidden,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling,
            rms_norm_eps: self.rms_norm_eps,
        }
    }
}

impl MlaScenario {
    /// The switches of one SC-001 variant: its attention kind and MLA form, the scenario's
    /// attention dimensions, and key blocks as long as the prefill chunks.
    pub fn optimization(&self, variant: MlaVariant) -> OptimizationConfig {
        let a = &self.attention;
        let (attention, implementation) = match variant {
            MlaVariant::Mha => (AttentionKind::Mha, MlaImpl::Absorbed),
            MlaVariant::Gqa => (AttentionKind::Gqa, MlaImpl::Absorbed),
            MlaVariant::MlaNaive => (AttentionKind::Mla, MlaImpl::Naive),
            MlaVariant::MlaAbsorbed => (AttentionKind::Mla, MlaImpl::Absorbed),
        };
        OptimizationConfig {
            attention,
            dtype: self.run.dtype,
            prefill_chunk: a.prefill_chunk,
            key_block: a.prefill_chunk,
            gqa: GqaOptions {
                n_kv_heads: Some(a.gqa_kv_heads),
            },
            mla: MlaOptions {
                implementation,
                kv_lora_rank: a.kv_lora_rank,
                q_lora_rank: a.q_lora_rank,
                qk_nope_head_dim: a.qk_nope_head_dim,
                qk_rope_head_dim: a.qk_rope_head_dim,
                v_head_dim: a.v_head_dim,
            },
            ..OptimizationConfig::standard()
        }
    }

    /// The model of one SC-001 variant (through [`OptimizationConfig::decoder_config`]).
    pub fn decoder_config(&self, variant: MlaVariant) -> DecoderConfig {
        let shape = self
            .model
            .decoder_shape(self.attention.head_dim, self.model.ffn_hidden);
        self.optimization(variant).decoder_config(&shape)
    }
}

impl MoeScenario {
    /// The switches of SC-003's models: MHA attention, and the MoE FFN (for
    /// [`MoeVariant::Moe`]) or a dense one.
    pub fn optimization(&self, variant: MoeVariant) -> OptimizationConfig {
        let m = &self.moe;
        OptimizationConfig {
            ffn: match variant {
                MoeVariant::Moe => FfnKind::Moe,
                MoeVariant::DenseEqualTotal | MoeVariant::DenseEqualActive => FfnKind::Dense,
            },
            dtype: self.run.dtype,
            moe: MoeOptions {
                n_routed_experts: m.n_routed_experts,
                n_shared_experts: m.n_shared_experts,
                num_experts_per_tok: m.num_experts_per_tok,
                moe_inter_dim: m.moe_inter_dim,
                score_func: m.score_func,
                n_group: m.n_group,
                topk_group: m.topk_group,
                route_scale: m.route_scale,
                topk_method: m.topk_method,
                norm_topk_prob: m.norm_topk_prob,
                // the dense first layers are set by `decoder_config`, alike in every variant
                first_k_dense_replace: 0,
            },
            ..OptimizationConfig::standard()
        }
    }

    /// The model of one SC-003 variant: the dense variants' FFN width equals the MoE layer's
    /// total (or active) parameters.
    pub fn decoder_config(&self, variant: MoeVariant) -> DecoderConfig {
        let moe = self
            .optimization(MoeVariant::Moe)
            .moe_config(self.model.hidden)
            .expect("the MoE variant has an MoE FFN");
        let ffn_hidden = match variant {
            MoeVariant::DenseEqualTotal => moe.dense_equal_total_width(),
            MoeVariant::DenseEqualActive => moe.dense_equal_active_width(),
            // (every layer's FFN is the MoE; the dense width is not used)
            MoeVariant::Moe => self.model.ffn_hidden,
        };
        let heads = self.model.n_heads;
        let shape = self
            .model
            .decoder_shape(self.model.hidden / heads, ffn_hidden);
        let mut c = self.optimization(variant).decoder_config(&shape);
        // the first layers are the same dense FFN in every variant; only the MoE layers differ
        c.first_k_dense_replace = self.moe.first_k_dense_replace;
        c.first_dense_ffn_hidden =
            (self.moe.first_k_dense_replace > 0).then_some(self.model.ffn_hidden);
        c.rms_norm_eps = self.model.rms_norm_eps;
        c
    }
}

impl MtpScenario {
    /// The switches of SC-002's model: the standard model (MHA, dense FFN) with 128-key blocks.
    /// (Its MTP modules are built beside it with the trained depth.)
    pub fn optimization(&self) -> OptimizationConfig {
        OptimizationConfig {
            key_block: 128,
            dtype: self.run.dtype,
            ..OptimizationConfig::standard()
        }
    }

    /// SC-002's main model.
    pub fn decoder_config(&self) -> DecoderConfig {
        let heads = self.model.n_heads;
        let shape = self
            .model
            .decoder_shape(self.model.hidden / heads, self.model.ffn_hidden);
        self.optimization().decoder_config(&shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Scenario, ScenarioKind};
    use crate::nn::attention::AttentionConfig;

    fn builtin<T>(kind: ScenarioKind, pick: impl Fn(Scenario) -> Option<T>) -> T {
        pick(Scenario::builtin(kind)).expect("builtin scenario of that kind")
    }

    #[test]
    fn mla_variants_build_the_attention_they_name() {
        let s = builtin(ScenarioKind::Mla, |s| match s {
            Scenario::Mla(m) => Some(m),
            _ => None,
        });
        let a = &s.attention;
        for v in [
            MlaVariant::Mha,
            MlaVariant::Gqa,
            MlaVariant::MlaNaive,
            MlaVariant::MlaAbsorbed,
        ] {
            let c = s.decoder_config(v).attention;
            let (kind, kv, imp) = match v {
                MlaVariant::Mha => (AttentionKind::Mha, s.model.n_heads, MlaImpl::Absorbed),
                MlaVariant::Gqa => (AttentionKind::Gqa, a.gqa_kv_heads, MlaImpl::Absorbed),
                MlaVariant::MlaNaive => (AttentionKind::Mla, s.model.n_heads, MlaImpl::Naive),
                MlaVariant::MlaAbsorbed => (AttentionKind::Mla, s.model.n_heads, MlaImpl::Absorbed),
            };
            assert_eq!((c.kind, c.n_kv_heads, c.mla_impl), (kind, kv, imp), "{v}");
            assert_eq!(c.head_dim, a.head_dim);
            assert_eq!(c.kv_lora_rank, a.kv_lora_rank);
            assert_eq!(c.key_block, a.prefill_chunk);
            assert_eq!(c.rope_theta, s.model.rope_theta);
        }
        assert!(s.decoder_config(MlaVariant::Mha).moe.is_none());
    }

    #[test]
    fn moe_variants_differ_only_in_the_ffn() {
        let s = builtin(ScenarioKind::Moe, |s| match s {
            Scenario::Moe(m) => Some(m),
            _ => None,
        });
        let moe = s.decoder_config(MoeVariant::Moe);
        let total = s.decoder_config(MoeVariant::DenseEqualTotal);
        let active = s.decoder_config(MoeVariant::DenseEqualActive);
        let m = moe.moe.as_ref().expect("MoE FFN");
        assert_eq!(m.router.n_routed_experts, s.moe.n_routed_experts);
        assert!(!m.router.norm_topk_prob);
        assert!(total.moe.is_none() && active.moe.is_none());
        assert_eq!(total.ffn_hidden, m.dense_equal_total_width());
        assert_eq!(active.ffn_hidden, m.dense_equal_active_width());
        assert_eq!(moe.attention, total.attention);
    }

    /// The MTP model's configuration is part of the checkpoint key: it must stay what the
    /// cached checkpoints were trained with (MHA, head width hidden / heads, 128-key blocks).
    #[test]
    fn mtp_model_is_the_one_cached_checkpoints_were_trained_with() {
        let s = builtin(ScenarioKind::Mtp, |s| match s {
            Scenario::Mtp(m) => Some(m),
            _ => None,
        });
        let heads = s.model.n_heads;
        let mut attention = AttentionConfig::mha(heads, s.model.hidden / heads);
        attention.rope_theta = s.model.rope_theta;
        attention.key_block = 128;
        let want = DecoderConfig {
            first_k_dense_replace: 0,
            first_dense_ffn_hidden: None,
            rms_norm_eps: crate::nn::model::default_rms_norm_eps(),
            vocab_size: s.model.vocab_size,
            hidden: s.model.hidden,
            n_layers: s.model.n_layers,
            ffn_hidden: s.model.ffn_hidden,
            attention,
            moe: None,
        };
        assert_eq!(s.decoder_config(), want);
    }
}
