//! 模型描述 [`DeepseekConfig`]：字段名与 Hugging Face `config.json` 的键相同，预设与检查点共用。
//!
//! 这里只有数据与由它解析算出的量（参数量、权重字节数、每 token 的 KV 缓存），不分配任何
//! 按声明尺寸的内存：一个声明了 10^12 个专家的文件在解析阶段就被拒绝，参数量用 u128 计算。

use serde::Serialize;

use crate::config::Dtype;
use crate::nn::moe::ScoreFunc;
pub use crate::nn::moe::TopkMethod;
use crate::nn::rope::{Rope, Yarn};

/// `model_type`：决定参考实现（transformers）用哪个类，从而决定路由的细节。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    /// DeepSeek-V2 / V2-Lite（softmax 打分，greedy 或 group_limited_greedy）。
    DeepseekV2,
    /// DeepSeek-V3 / R1，以及 Moonlight（sigmoid 打分，noaux_tc）。
    DeepseekV3,
    /// Kimi K2（DeepSeek-V3 的架构）。
    KimiK2,
}

/// FP8 e4m3 权重及其 `weight_scale_inv` 块缩放（V3 的格式）。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Fp8Blocks {
    /// 块大小 `[行, 列]`（只支持 128×128）。
    pub block: [usize; 2],
}

/// DeepSeekMoE 的键（`n_routed_experts` 为 null 的稠密模型没有这一部分）。
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeSpec {
    /// 路由专家数 E。
    pub n_routed_experts: usize,
    /// 共享专家数（总是激活；共享部分的宽度为 n_shared · moe_intermediate_size）。
    pub n_shared_experts: usize,
    /// 每个 token 激活的路由专家数 k。
    pub num_experts_per_tok: usize,
    /// 每个专家的中间维度。
    pub moe_intermediate_size: usize,
    /// 打分函数。
    pub scoring_func: ScoreFunc,
    /// 选择方法。
    pub topk_method: TopkMethod,
    /// 专家组数。
    pub n_group: usize,
    /// 保留的组数。
    pub topk_group: usize,
    /// 是否把选中专家的权重归一化。
    pub norm_topk_prob: bool,
    /// 门控权重的缩放。
    pub routed_scaling_factor: f64,
}

/// 一个 DeepSeek 模型的完整描述（Hugging Face `config.json` 的键名）。
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeepseekConfig {
    /// 架构。
    pub model_type: ModelType,
    /// 词表大小。
    pub vocab_size: usize,
    /// 隐藏维度。
    pub hidden_size: usize,
    /// 稠密层（前 `first_k_dense_replace` 层）的 FFN 中间维度。
    pub intermediate_size: usize,
    /// 层数（不含 MTP 层）。
    pub num_hidden_layers: usize,
    /// 注意力头数。
    pub num_attention_heads: usize,
    /// 查询压缩维度；`None` = 不压缩（V2-Lite、Moonlight 的 `q_proj`）。没有 0 这个哨兵值。
    pub q_lora_rank: Option<usize>,
    /// KV 潜向量维度 d_c。
    pub kv_lora_rank: usize,
    /// 不带 RoPE 的 q/k 每头维度。
    pub qk_nope_head_dim: usize,
    /// 解耦 RoPE 维度（所有头共享一个 RoPE 键）。
    pub qk_rope_head_dim: usize,
    /// 每头 value 维度。
    pub v_head_dim: usize,
    /// 前几层用稠密 FFN，其后每层是 MoE。
    pub first_k_dense_replace: usize,
    /// MoE 部分（稠密模型为 `None`）。
    pub moe: Option<MoeSpec>,
    /// RMSNorm 的 ε（V2/V3 1e-6，Moonlight 1e-5）。
    pub rms_norm_eps: f64,
    /// RoPE 基数。
    pub rope_theta: f64,
    /// YaRN（`None` = 普通 RoPE）。
    pub rope_scaling: Option<Yarn>,
    /// 最大位置数（不改变计算；记录用）。
    pub max_position_embeddings: Option<usize>,
    /// MTP 层数（V3：1）。
    pub num_nextn_predict_layers: usize,
    /// 检查点的数值类型（`dtype` 或 `torch_dtype`）；运行的数值类型默认取它。
    pub dtype: Option<Dtype>,
    /// FP8 块量化（`quantization_config`）。
    pub quantization: Option<Fp8Blocks>,
}

/// Parameter counts of a model description (u128: no overflow for any declared size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCount {
    /// Every parameter of the main model (embedding, layers, final norm, output head), MTP
    /// layers excluded.
    pub total: u128,
    /// Those used per token: the routed experts not chosen are left out.
    pub active: u128,
    /// The MTP layers (`num_nextn_predict_layers`), not in `total`.
    pub mtp: u128,
}

impl DeepseekConfig {
    /// Every value that must hold between keys; `(key, message, fix)` for the first that does not.
    pub fn check(&self) -> Result<(), (String, String, String)> {
        let fail = |k: &str, m: String, f: &str| Err((k.to_string(), m, f.to_string()));
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
        ] {
            if v == 0 {
                return fail(k, "is 0".into(), "use the model's published value");
            }
        }
        if self.q_lora_rank == Some(0) {
            return fail(
                "q_lora_rank",
                "is 0".into(),
                "write null (or leave it out) for no query compression",
            );
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            return fail(
                "qk_rope_head_dim",
                format!(
                    "is {}, must be even (RoPE rotates pairs)",
                    self.qk_rope_head_dim
                ),
                "DeepSeek uses 64",
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return fail(
                "rms_norm_eps",
                format!("is {}, must be in (0, 1)", self.rms_norm_eps),
                "V2/V3 use 1e-6, Moonlight 1e-5",
            );
        }
        if self.first_k_dense_replace > self.num_hidden_layers {
            return fail(
                "first_k_dense_replace",
                format!(
                    "is {}, more than num_hidden_layers = {}",
                    self.first_k_dense_replace, self.num_hidden_layers
                ),
                "use the model's published value",
            );
        }
        if let Some(m) = &self.moe {
            for (k, v) in [
                ("n_routed_experts", m.n_routed_experts),
                ("num_experts_per_tok", m.num_experts_per_tok),
                ("moe_intermediate_size", m.moe_intermediate_size),
                ("n_group", m.n_group),
                ("topk_group", m.topk_group),
            ] {
                if v == 0 {
                    return fail(k, "is 0".into(), "use the model's published value");
                }
            }
            if !m.n_routed_experts.is_multiple_of(m.n_group) {
                return fail(
                    "n_group",
                    format!(
                        "{} groups do not divide {} experts",
                        m.n_group, m.n_routed_experts
                    ),
                    "use the model's published value",
                );
            }
            if m.topk_group > m.n_group {
                return fail(
                    "topk_group",
                    format!("is {}, more than n_group = {}", m.topk_group, m.n_group),
                    "use the model's published value",
                );
            }
            let reachable = m.topk_group * (m.n_routed_experts / m.n_group);
            if m.num_experts_per_tok > reachable {
                return fail(
                    "num_experts_per_tok",
                    format!(
                        "is {}, more than the {reachable} experts in topk_group = {} groups",
                        m.num_experts_per_tok, m.topk_group
                    ),
                    "use the model's published value",
                );
            }
            if m.routed_scaling_factor.is_nan() || m.routed_scaling_factor <= 0.0 {
                return fail(
                    "routed_scaling_factor",
                    format!("is {}, must be positive", m.routed_scaling_factor),
                    "use the model's published value",
                );
            }
        }
        Ok(())
    }

    /// The first `n` layers of this model (dense-first layout kept: the first
    /// `min(n, first_k_dense_replace)` stay dense). `n` must be in 1..=num_hidden_layers.
    pub fn with_layers(&self, n: usize) -> Self {
        assert!(n >= 1 && n <= self.num_hidden_layers, "layers in range");
        DeepseekConfig {
            num_hidden_layers: n,
            first_k_dense_replace: self.first_k_dense_replace.min(n),
            ..self.clone()
        }
    }

    /// Number of MoE layers (the layers after the dense ones; 0 for a dense model).
    pub fn moe_layers(&self) -> usize {
        match self.moe {
            Some(_) => self.num_hidden_layers - self.first_k_dense_replace,
            None => 0,
        }
    }

    /// The RoPE setting of the attention (base and YaRN).
    pub fn rope(&self) -> Rope {
        Rope {
            theta: self.rope_theta,
            yarn: self.rope_scaling,
        }
    }

    /// Parameters of one attention block (MLA) including its norms.
    fn attention_params(&self) -> u128 {
        let (h, nh) = (self.hidden_size as u128, self.num_attention_heads as u128);
        let (nope, rope, v) = (
            self.qk_nope_head_dim as u128,
            self.qk_rope_head_dim as u128,
            self.v_head_dim as u128,
        );
        let kvr = self.kv_lora_rank as u128;
        let q = match self.q_lora_rank {
            // q_a_proj, q_a_layernorm, q_b_proj
            Some(r) => h * r as u128 + r as u128 + r as u128 * nh * (nope + rope),
            None => h * nh * (nope + rope),
        };
        // kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj
        q + h * (kvr + rope) + kvr + kvr * nh * (nope + v) + nh * v * h
    }

    /// Parameters of one routed expert (gate, up, down projections).
    fn expert_params(&self) -> u128 {
        self.moe.as_ref().map_or(0, |m| {
            3 * self.hidden_size as u128 * m.moe_intermediate_size as u128
        })
    }

    /// Parameters of one MoE FFN: router gate (+ correction bias for noaux_tc), routed and
    /// shared experts.
    fn moe_ffn_params(&self) -> u128 {
        let Some(m) = &self.moe else { return 0 };
        let e = m.n_routed_experts as u128;
        let bias = if m.topk_method == TopkMethod::NoauxTc {
            e
        } else {
            0
        };
        e * self.hidden_size as u128
            + bias
            + e * self.expert_params()
            + m.n_shared_experts as u128 * self.expert_params()
    }

    /// Total, active and MTP parameter counts, from the configuration alone.
    pub fn param_count(&self) -> ParamCount {
        let (h, v) = (self.hidden_size as u128, self.vocab_size as u128);
        let norms = 2 * h;
        let dense = 3 * h * self.intermediate_size as u128;
        let moe_layers = self.moe_layers() as u128;
        let dense_layers = self.num_hidden_layers as u128 - moe_layers;
        let layer_common = norms + self.attention_params();
        let total = 2 * v * h
            + h
            + self.num_hidden_layers as u128 * layer_common
            + dense_layers * dense
            + moe_layers * self.moe_ffn_params();
        let idle = self.moe.as_ref().map_or(0, |m| {
            (m.n_routed_experts - m.num_experts_per_tok) as u128 * self.expert_params()
        });
        // V3's MTP layer: enorm, hnorm, eh_proj [h, 2h], a full (MoE) block, shared_head norm
        // and head (the embedding is shared and not stored again in the count)
        let ffn = if self.moe.is_some() {
            self.moe_ffn_params()
        } else {
            dense
        };
        let mtp_layer = 2 * h + 2 * h * h + layer_common + ffn + h + v * h;
        ParamCount {
            total,
            active: total - moe_layers * idle,
            mtp: self.num_nextn_predict_layers as u128 * mtp_layer,
        }
    }

    /// Bytes of the main model's weights in `dtype` (FP8 checkpoints are dequantised on load).
    pub fn weight_bytes(&self, dtype: Dtype) -> u128 {
        self.param_count().total * dtype.bytes() as u128
    }

    /// Absorbed MLA's KV cache per token per layer, in elements: `kv_lora_rank + qk_rope_head_dim`.
    pub fn latent_cache_elements(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// The KV cache per token per layer of an MHA with `num_attention_heads` heads of
    /// `v_head_dim` (SC-001's baseline), in elements.
    pub fn mha_cache_elements(&self) -> usize {
        2 * self.num_attention_heads * self.v_head_dim
    }
}
