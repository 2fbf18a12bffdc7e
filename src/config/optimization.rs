//! 优化配置（`OptimizationConfig`，FR-004 / FR-006）：用一个配置节开关 DeepSeek 的三项推理优化。
//!
//! 一个 `[optimization]` 节描述模型用哪种注意力（MHA / GQA / MLA，MLA 可选朴素或吸收实现）、
//! 哪种 FFN（稠密 SwiGLU / DeepSeekMoE）、多少个 MTP 模块，以及数值类型与分块大小。
//! **每个键都有默认值**：空节或缺省的节就是标准模型（FR-006：MHA、稠密 FFN、MTP 深度 0、f32），
//! 与本项目其余部分默认构建的模型完全相同（测试证明两者得到同一个 [`DecoderConfig`]）。
//!
//! ```toml
//! [optimization]
//! attention = "mla"          # mha | gqa | mla（默认 mha）
//! ffn = "moe"                # dense | moe（默认 dense）
//! dtype = "f32"              # f32 | f16 | bf16（flex 与 CUDA 三种都有；wgpu 有 f16）
//! prefill_chunk = 256        # 分块预填充每块的查询 token 数
//! key_block = 512            # 注意力按键分块的块大小（在线 softmax）
//!
//! [optimization.gqa]
//! n_kv_heads = 2             # attention = "gqa" 时必填：真除 model.num_attention_heads 的 KV 头数
//!
//! [optimization.mla]
//! impl = "absorbed"          # naive | absorbed
//! kv_lora_rank = 512
//! q_lora_rank = 1536         # 缺省 = 不压缩查询（V2-Lite）
//! qk_nope_head_dim = 128
//! qk_rope_head_dim = 64
//! v_head_dim = 128
//!
//! [optimization.moe]
//! n_routed_experts = 256
//! n_shared_experts = 1
//! num_experts_per_tok = 8
//! moe_intermediate_size = 2048
//! scoring_func = "sigmoid"
//! n_group = 8
//! topk_group = 4
//! routed_scaling_factor = 2.5
//!
//! [optimization.mtp]
//! num_nextn_predict_layers = 0
//! ```
//!
//! 模型维度的键名与 Hugging Face `config.json` 相同（旧名如 `moe_inter_dim`、`depth` 以退出码 2
//! 报出新名，见 [`renamed`](super::renamed)）。YaRN 不在这里：它属于模型（场景 `[model.rope_scaling]`，
//! 其 `mscale` / `mscale_all_dim` 是 config.json 的系数 m，不是算好的因子）。
//!
//! 该节可以写在 `kind = "model"` 的场景文件里，也可以单独成文件（[`OptimizationConfig::load`]：
//! 顶层是 `[optimization]` 表，或者直接是上面这些键），供 `--config FILE` 替换场景中的同名节。
//! 所有节都拒绝未知键；取值与组合在 [`validate`](super::validate) 中检查，错误给出文件、行号、
//! 键名与修改办法（退出码 2）。

use serde::{Deserialize, Serialize};

use super::dtype::Dtype;
use crate::nn::attention::{AttentionConfig, AttentionKind, MlaImpl};
use crate::nn::model::DecoderConfig;
use crate::nn::moe::ScoreFunc;
use crate::nn::moe::{MoeConfig, RouterConfig, TopkMethod};

/// FFN 种类。默认是稠密 SwiGLU（FR-006：标准行为保持为默认）。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    /// 稠密 SwiGLU FFN，中间维度为 `model.intermediate_size`。
    #[default]
    Dense,
    /// DeepSeekMoE：细粒度路由专家 + 常驻共享专家（每层都换成 MoE）。
    Moe,
}

/// 优化配置：注意力、FFN、MTP 深度、数值类型与分块大小；缺省即标准模型（FR-006）。
///
/// 它只描述“开哪些优化”，不描述模型主干的大小；与主干形状 [`DecoderShape`] 合在一起，
/// 由 [`OptimizationConfig::decoder_config`] 得到本项目唯一的模型构建器所用的
/// [`DecoderConfig`]，由 [`OptimizationConfig::mtp_depth`] 得到 MTP 模块数。
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizationConfig {
    /// 注意力种类：`mha`（默认）、`gqa`（需要 `[optimization.gqa]`）、`mla`（见 `[optimization.mla]`）。
    pub attention: AttentionKind,
    /// FFN 种类：`dense`（默认）或 `moe`（见 `[optimization.moe]`）。
    pub ffn: FfnKind,
    /// 数值类型：`f32`（默认）、`f16`（flex、wgpu、CUDA）、`bf16`（flex、CUDA）；设备不支持时运行器以退出码 3 说明。
    pub dtype: Dtype,
    /// 分块预填充时每块的查询 token 数（默认 256；避免构造 `[S, S]` 分数矩阵）。
    pub prefill_chunk: usize,
    /// 注意力按键分块的块大小（默认 512；在线 softmax 的工作区与序列长度无关）。
    pub key_block: usize,
    /// GQA 设置（只在 `attention = "gqa"` 时使用）。
    pub gqa: GqaOptions,
    /// MLA 设置（只在 `attention = "mla"` 时使用；默认值是 DeepSeek-V2/V3 的维度）。
    pub mla: MlaOptions,
    /// MoE 设置（只在 `ffn = "moe"` 时使用；默认值是 DeepSeek-V3 的路由形状）。
    pub moe: MoeOptions,
    /// MTP 设置（深度 0 = 没有 MTP 模块，普通贪心解码）。
    pub mtp: MtpOptions,
}

/// GQA 设置（`[optimization.gqa]`）。
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GqaOptions {
    /// K/V 头数 n_g：必须真除 `model.num_attention_heads`（且小于它）。没有默认值可言（取决于头数），
    /// 所以 `attention = "gqa"` 时必须给出；其他注意力种类忽略它。
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<usize>,
}

/// MLA 设置（`[optimization.mla]`，沿用 DeepSeek 的参数名；默认值为 DeepSeek-V2/V3 的维度）。
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MlaOptions {
    /// 实现（TOML 键 `impl`）：`absorbed`（默认，只缓存潜向量与共享 RoPE 键）或 `naive`
    /// （重建并缓存每头 K/V，不省内存，用作参照）。两者共用同一组权重。
    #[serde(rename = "impl")]
    pub implementation: MlaImpl,
    /// KV 潜向量维度 d_c（默认 512）。
    pub kv_lora_rank: usize,
    /// 查询压缩维度 d_c'（缺省 = 不压缩，如 V2-Lite；V3 为 1536）。没有 0 这个哨兵值。
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q_lora_rank: Option<usize>,
    /// 不带 RoPE 的 q/k 每头维度（默认 128）。
    pub qk_nope_head_dim: usize,
    /// 解耦 RoPE 维度 d_r（默认 64，必须为偶数）。
    pub qk_rope_head_dim: usize,
    /// 每头 value 维度（默认 128）。
    pub v_head_dim: usize,
}

impl Default for MlaOptions {
    fn default() -> Self {
        // 与 `AttentionConfig::mha` 中（不使用的）MLA 字段维度相同，
        // 这样默认优化配置得到的恰好就是默认解码器配置
        MlaOptions {
            implementation: MlaImpl::Absorbed,
            kv_lora_rank: 512,
            q_lora_rank: None,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
        }
    }
}

/// DeepSeekMoE 设置（`[optimization.moe]`，沿用 DeepSeek 的参数名；默认值为 DeepSeek-V3 的路由形状）。
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoeOptions {
    /// 路由专家数（默认 256）。
    pub n_routed_experts: usize,
    /// 共享专家数，总是激活（默认 1）。
    pub n_shared_experts: usize,
    /// 每个 token 激活的路由专家数 top-k（默认 8）。
    pub num_experts_per_tok: usize,
    /// 每个专家的中间维度（`moe_intermediate_size`，默认 2048）。
    #[serde(rename = "moe_intermediate_size")]
    pub moe_inter_dim: usize,
    /// 打分函数（`scoring_func`）：`sigmoid`（默认，V3）或 `softmax`（V2）。
    #[serde(rename = "scoring_func")]
    pub score_func: ScoreFunc,
    /// 分组路由的组数（默认 8；1 = 不分组）；必须整除 `n_routed_experts`。
    pub n_group: usize,
    /// 保留的组数（默认 4）；不大于 `n_group`。
    pub topk_group: usize,
    /// 门控权重缩放（`routed_scaling_factor`，默认 2.5）。
    #[serde(rename = "routed_scaling_factor")]
    pub route_scale: f64,
    /// 选择方法（config.json 的 `topk_method`）；缺省：分组时 `noaux_tc`（V3 的组分数），否则 `greedy`。
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topk_method: Option<TopkMethod>,
    /// 是否把选中专家的权重归一化（`norm_topk_prob`）；缺省：sigmoid 打分时归一化。
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// 前几层用宽度为 `model.intermediate_size` 的稠密 FFN，其后每层是 MoE（config.json 的
    /// `first_k_dense_replace`；默认 0 = 每层都是 MoE）。
    #[serde(skip_serializing_if = "is_zero")]
    pub first_k_dense_replace: usize,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

impl Default for MoeOptions {
    fn default() -> Self {
        MoeOptions {
            n_routed_experts: 256,
            n_shared_experts: 1,
            num_experts_per_tok: 8,
            moe_inter_dim: 2048,
            score_func: ScoreFunc::Sigmoid,
            n_group: 8,
            topk_group: 4,
            route_scale: 2.5,
            topk_method: None,
            norm_topk_prob: None,
            first_k_dense_replace: 0,
        }
    }
}

/// MTP 设置（`[optimization.mtp]`）。
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtpOptions {
    /// MTP 模块数 = 自推测解码的草稿深度 D（config.json 的 `num_nextn_predict_layers`；
    /// 默认 0：没有模块，普通贪心解码；最大 8）。
    #[serde(rename = "num_nextn_predict_layers")]
    pub depth: usize,
}

/// 解码器主干形状（`kind = "model"` 场景的 `[model]` 节）：与优化无关的大小。
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderShape {
    /// 隐藏维度 d（config.json 的 `hidden_size`）。
    #[serde(rename = "hidden_size")]
    pub hidden: usize,
    /// 层数（`num_hidden_layers`）。
    #[serde(rename = "num_hidden_layers")]
    pub n_layers: usize,
    /// 注意力（查询）头数 n_h（`num_attention_heads`）。
    #[serde(rename = "num_attention_heads")]
    pub n_heads: usize,
    /// MHA/GQA 每头维度 d_h（偶数，RoPE 按对旋转；MLA 用 `[optimization.mla]` 的维度）。
    pub head_dim: usize,
    /// 词表大小。
    pub vocab_size: usize,
    /// 稠密 SwiGLU FFN 的中间维度（`intermediate_size`；`ffn = "moe"` 时不用）。
    #[serde(rename = "intermediate_size")]
    pub ffn_hidden: usize,
    /// RoPE 基数 θ（默认 10000）。
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// YaRN 长上下文缩放（config.json 的 `rope_scaling` 键名；缺省 = 普通 RoPE）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<crate::nn::rope::Yarn>,
    /// RMSNorm 的 ε（config.json 的 `rms_norm_eps`，默认 1e-6）。
    #[serde(
        default = "crate::nn::model::default_rms_norm_eps",
        skip_serializing_if = "crate::nn::model::is_default_eps"
    )]
    pub rms_norm_eps: f64,
}

fn default_rope_theta() -> f64 {
    10000.0
}

impl Default for OptimizationConfig {
    fn default() -> Self {
        OptimizationConfig {
            attention: AttentionKind::Mha,
            ffn: FfnKind::Dense,
            dtype: Dtype::F32,
            prefill_chunk: 256,
            key_block: 512,
            gqa: GqaOptions::default(),
            mla: MlaOptions::default(),
            moe: MoeOptions::default(),
            mtp: MtpOptions::default(),
        }
    }
}

impl OptimizationConfig {
    /// 标准模型（FR-006）：MHA、稠密 FFN、MTP 深度 0、f32。与 `default()` 相同。
    pub fn standard() -> Self {
        Self::default()
    }

    /// 没有开启任何优化时为真（MHA、稠密 FFN、MTP 深度 0）。
    pub fn is_standard(&self) -> bool {
        self.attention == AttentionKind::Mha && self.ffn == FfnKind::Dense && self.mtp.depth == 0
    }

    /// MTP 模块数（自推测解码的草稿深度 D；0 = 没有模块）。
    pub fn mtp_depth(&self) -> usize {
        self.mtp.depth
    }

    /// 开关组合的简称，例如 `mla-absorbed+moe+mtp3` 或 `mha+dense`。
    pub fn label(&self) -> String {
        let attn = match self.attention {
            AttentionKind::Mha => "mha".to_string(),
            AttentionKind::Gqa => format!("gqa{}", self.gqa.n_kv_heads.unwrap_or(0)),
            AttentionKind::Mla => match self.mla.implementation {
                MlaImpl::Naive => "mla-naive".to_string(),
                MlaImpl::Absorbed => "mla-absorbed".to_string(),
            },
        };
        let ffn = match self.ffn {
            FfnKind::Dense => "dense",
            FfnKind::Moe => "moe",
        };
        match self.mtp.depth {
            0 => format!("{attn}+{ffn}"),
            d => format!("{attn}+{ffn}+mtp{d}"),
        }
    }

    /// 隐藏维度 `hidden` 下的 MoE 层配置（稠密 FFN 时为 `None`）。路由器设置与
    /// SC-003 运行器相同（分组时按 V3 的组分数，sigmoid 时归一化，γ = 0.001）。
    pub fn moe_config(&self, hidden: usize) -> Option<MoeConfig> {
        (self.ffn == FfnKind::Moe).then(|| {
            let m = &self.moe;
            MoeConfig {
                dim: hidden,
                moe_inter_dim: m.moe_inter_dim,
                n_shared_experts: m.n_shared_experts,
                router: RouterConfig {
                    n_routed_experts: m.n_routed_experts,
                    num_experts_per_tok: m.num_experts_per_tok,
                    score_func: m.score_func,
                    // scenarios' grouped routing is V3's (top-2 sum), and sigmoid weights are
                    // normalised, as they always were here
                    topk_method: m.topk_method.unwrap_or(if m.n_group > 1 {
                        TopkMethod::NoauxTc
                    } else {
                        TopkMethod::Greedy
                    }),
                    n_group: m.n_group,
                    topk_group: m.topk_group,
                    route_scale: m.route_scale,
                    norm_topk_prob: m
                        .norm_topk_prob
                        .unwrap_or(m.score_func == ScoreFunc::Sigmoid),
                    bias_update_speed: 0.001,
                },
                shape_buckets: false,
            }
        })
    }

    /// 在这些开关下 `shape` 对应的解码器配置：即 [`DecoderConfig::init`]（以及配合
    /// [`Self::mtp_depth`] 的 [`crate::nn::MtpModel::new`]）所构建的模型。
    /// 应在已校验的配置上调用（缺少 `n_kv_heads` 的 GQA 配置会退回 MHA 的头数）。
    pub fn decoder_config(&self, shape: &DecoderShape) -> DecoderConfig {
        let mut a = AttentionConfig::mha(shape.n_heads, shape.head_dim);
        a.kind = self.attention;
        a.n_kv_heads = match self.attention {
            AttentionKind::Gqa => self.gqa.n_kv_heads.unwrap_or(shape.n_heads),
            AttentionKind::Mha | AttentionKind::Mla => shape.n_heads,
        };
        let m = &self.mla;
        a.kv_lora_rank = m.kv_lora_rank;
        a.q_lora_rank = m.q_lora_rank.unwrap_or(0);
        a.qk_nope_head_dim = m.qk_nope_head_dim;
        a.qk_rope_head_dim = m.qk_rope_head_dim;
        a.v_head_dim = m.v_head_dim;
        a.mla_impl = m.implementation;
        a.key_block = self.key_block;
        a.rope_theta = shape.rope_theta;
        a.rope_scaling = shape.rope_scaling;
        // dense layers before the MoE ones (config.json's first_k_dense_replace)
        let first_dense = match self.ffn {
            FfnKind::Moe => self.moe.first_k_dense_replace,
            FfnKind::Dense => 0,
        };
        DecoderConfig {
            first_k_dense_replace: first_dense,
            first_dense_ffn_hidden: (first_dense > 0).then_some(shape.ffn_hidden),
            rms_norm_eps: shape.rms_norm_eps,
            vocab_size: shape.vocab_size,
            hidden: shape.hidden,
            n_layers: shape.n_layers,
            ffn_hidden: shape.ffn_hidden,
            attention: a,
            moe: self.moe_config(shape.hidden),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn shape() -> DecoderShape {
        DecoderShape {
            hidden: 32,
            n_layers: 2,
            n_heads: 4,
            head_dim: 8,
            vocab_size: 48,
            ffn_hidden: 64,
            rope_theta: 10000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-6,
        }
    }

    fn parse(text: &str) -> Result<OptimizationConfig, String> {
        OptimizationConfig::parse(Path::new("opt.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn default_is_the_standard_model_and_the_default_decoder_config() {
        let o = OptimizationConfig::default();
        assert_eq!(o, OptimizationConfig::standard());
        assert!(o.is_standard());
        assert_eq!(o.attention, AttentionKind::Mha);
        assert_eq!(o.ffn, FfnKind::Dense);
        assert_eq!(o.mtp_depth(), 0);
        assert_eq!(o.dtype, Dtype::F32);
        assert_eq!(o.label(), "mha+dense");
        assert!(o.validate_for(&shape()).is_empty());
        // the existing default path: `AttentionConfig::mha` with the shape's RoPE base, no MoE
        let s = shape();
        let mut a = AttentionConfig::mha(s.n_heads, s.head_dim);
        a.rope_theta = s.rope_theta;
        let want = DecoderConfig {
            first_k_dense_replace: 0,
            first_dense_ffn_hidden: None,
            rms_norm_eps: crate::nn::model::default_rms_norm_eps(),
            vocab_size: s.vocab_size,
            hidden: s.hidden,
            n_layers: s.n_layers,
            ffn_hidden: s.ffn_hidden,
            attention: a,
            moe: None,
        };
        assert_eq!(o.decoder_config(&s), want);
        // an empty file, an empty [optimization] table and an empty sub-table: all standard
        for text in [
            "",
            "[optimization]\n",
            "[optimization]\n[optimization.mtp]\n",
        ] {
            assert_eq!(parse(text).unwrap(), o, "{text:?}");
        }
    }

    #[test]
    fn switches_reach_the_decoder_config() {
        let o = parse(
            "attention = \"mla\"\nffn = \"moe\"\nkey_block = 64\n[mla]\nimpl = \"naive\"\n\
             kv_lora_rank = 16\nqk_rope_head_dim = 4\n[moe]\nn_routed_experts = 8\n\
             num_experts_per_tok = 2\nn_group = 2\ntopk_group = 1\nmoe_intermediate_size = 12\n\
             [mtp]\nnum_nextn_predict_layers = 2\n",
        )
        .unwrap();
        let c = o.decoder_config(&shape());
        assert_eq!(c.attention.kind, AttentionKind::Mla);
        assert_eq!(c.attention.mla_impl, MlaImpl::Naive);
        assert_eq!(c.attention.kv_lora_rank, 16);
        assert_eq!(c.attention.qk_rope_head_dim, 4);
        assert_eq!(c.attention.key_block, 64);
        let moe = c.moe.expect("moe on");
        assert_eq!(moe.dim, 32);
        assert_eq!(moe.moe_inter_dim, 12);
        assert_eq!(moe.router.n_routed_experts, 8);
        assert_eq!(moe.router.n_group, 2);
        assert_eq!(o.mtp_depth(), 2);
        assert_eq!(o.label(), "mla-naive+moe+mtp2");
        assert!(!o.is_standard());
        let g = parse("attention = \"gqa\"\n[gqa]\nn_kv_heads = 2\n").unwrap();
        assert_eq!(g.decoder_config(&shape()).attention.n_kv_heads, 2);
    }

    #[test]
    fn standalone_file_with_and_without_the_header_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("bare.toml");
        let wrapped = dir.path().join("wrapped.toml");
        std::fs::write(
            &bare,
            "attention = \"mla\"\n[mtp]\nnum_nextn_predict_layers = 3\n",
        )
        .unwrap();
        std::fs::write(
            &wrapped,
            "[optimization]\nattention = \"mla\"\n[optimization.mtp]\nnum_nextn_predict_layers = 3\n",
        )
        .unwrap();
        let a = OptimizationConfig::load(&bare).unwrap();
        let b = OptimizationConfig::load(&wrapped).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.attention, AttentionKind::Mla);
        assert_eq!(a.mtp_depth(), 3);
        // unknown keys, at either level, name the key and the line
        let e = parse("[optimization]\nattention = \"mla\"\nattn = 1\n").unwrap_err();
        assert!(e.contains("attn") && e.contains("opt.toml:3"), "{e}");
        let e = parse("[mla]\nkv_rank = 1\n").unwrap_err();
        assert!(e.contains("kv_rank") && e.contains("opt.toml:2"), "{e}");
        let e = parse("[optimization]\n[other]\nx = 1\n").unwrap_err();
        assert!(e.contains("other"), "{e}");
        // a bad enum value names its dotted key
        let e = parse("[optimization.mla]\nimpl = \"fast\"\n").unwrap_err();
        assert!(
            e.contains("optimization.mla.impl") && e.contains("opt.toml:2"),
            "{e}"
        );
        let e = parse("ffn = \"sparse\"\n").unwrap_err();
        assert!(e.contains("`ffn`") && e.contains("dense"), "{e}");
        let missing = dir.path().join("missing.toml");
        let e = OptimizationConfig::load(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.toml") && e.contains("--config"), "{e}");
    }

    #[test]
    fn invalid_combinations_name_the_key() {
        let s = shape();
        let first = |text: &str| {
            let o = parse(text).expect("parses; the shape check follows");
            o.validate_for(&s)
                .into_iter()
                .next()
                .map(|v| v.key)
                .unwrap_or_default()
        };
        // shape-dependent: GQA heads must properly divide n_heads (= 4)
        assert_eq!(
            first("attention = \"gqa\"\n[gqa]\nn_kv_heads = 3\n"),
            "optimization.gqa.n_kv_heads"
        );
        assert_eq!(
            first("attention = \"gqa\"\n[gqa]\nn_kv_heads = 4\n"),
            "optimization.gqa.n_kv_heads"
        );
        // shape-independent: rejected already by `parse` with key and line
        let cases = [
            ("attention = \"gqa\"\n", "optimization.gqa.n_kv_heads"),
            ("[mla]\nkv_lora_rank = 0\n", "optimization.mla.kv_lora_rank"),
            ("[mla]\nqk_rope_head_dim = 7\n", "optimization.mla.qk_rope_head_dim"),
            ("[mla]\nv_head_dim = 0\n", "optimization.mla.v_head_dim"),
            ("[mla]\nq_lora_rank = 0\n", "optimization.mla.q_lora_rank"),
            ("[mla]\nmscale = 1.0\n", "mla.mscale"),
            ("[moe]\nroute_scale = 1.0\n", "moe.route_scale"),
            (
                "[moe]\nn_group = 8\ntopk_group = 9\n",
                "optimization.moe.topk_group",
            ),
            (
                "[moe]\nn_routed_experts = 4\nn_group = 1\ntopk_group = 1\nnum_experts_per_tok = 5\n",
                "optimization.moe.num_experts_per_tok",
            ),
            (
                "[moe]\nn_routed_experts = 10\nn_group = 4\n",
                "optimization.moe.n_group",
            ),
            (
                "[mtp]\nnum_nextn_predict_layers = 9\n",
                "optimization.mtp.num_nextn_predict_layers",
            ),
            ("[mtp]\ndepth = 1\n", "mtp.depth"),
            ("prefill_chunk = 0\n", "optimization.prefill_chunk"),
            ("key_block = 0\n", "optimization.key_block"),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(&format!("`{key}`")), "{text:?}: {e}");
            assert!(e.contains("fix:"), "{e}");
        }
        // the line of a bare file's key is found without the `optimization.` prefix
        let e = parse("[moe]\nn_group = 8\ntopk_group = 9\n").unwrap_err();
        assert!(e.contains("opt.toml:3"), "{e}");
        // f16/bf16 parse (whether the backend has them is checked when the run starts)
        assert_eq!(parse("dtype = \"bf16\"\n").unwrap().dtype, Dtype::Bf16);
    }
}
