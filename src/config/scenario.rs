//! 场景文件模式（scenario schema）。
//!
//! 一个场景文件对应一个验收标准（SC-001 / SC-002 / SC-003）或一个校准任务。顶层键 `kind`
//! 决定其余各节的结构：`mla`、`mtp`、`moe`、`model`、`calibrate`。所有节都拒绝未知键；数值在
//! [`validate`](super::validate) 中检查。命令行参数（`--seq`、`--batch`）在加载之后覆盖场景值，
//! 覆盖后再次校验。
//!
//! 示例见仓库 `scenarios/` 目录；每个字段的含义写在下面的结构体文档里。
//!
//! Why this file is over 500 lines: it is the whole file format in one place (one struct per
//! section, every field documented, no logic); loading and overrides live in `load.rs`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use super::dtype::Dtype;
use super::optimization::{DecoderShape, OptimizationConfig};
pub use super::variants::{MlaVariant, MoeVariant};
pub use crate::nn::moe::ScoreFunc;

/// 场景类型（顶层键 `kind`）。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioKind {
    /// SC-001：MLA 与标准注意力（MHA/GQA）的内存与容量对比。
    Mla,
    /// SC-002：MTP 自推测解码与普通贪心解码的速度对比。
    Mtp,
    /// SC-003：DeepSeekMoE 与稠密 FFN 的速度对比，以及专家卸载的内存对比。
    Moe,
    /// FR-004：按 `[optimization]` 组合 MLA / MoE / MTP 的完整模型（预填充、贪心与自推测解码）。
    Model,
    /// 校准：一个矩阵乘法，用于端到端检查测量与报告链路。
    Calibrate,
}

impl ScenarioKind {
    /// The lowercase name used in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ScenarioKind::Mla => "mla",
            ScenarioKind::Mtp => "mtp",
            ScenarioKind::Moe => "moe",
            ScenarioKind::Model => "model",
            ScenarioKind::Calibrate => "calibrate",
        }
    }

    /// The shipped default scenario of this kind (embedded in the binary).
    pub fn default_scenario(self) -> (&'static str, &'static str) {
        match self {
            ScenarioKind::Mla => (
                "scenarios/sc001-mla.toml",
                include_str!("../../scenarios/sc001-mla.toml"),
            ),
            ScenarioKind::Mtp => (
                "scenarios/sc002-mtp.toml",
                include_str!("../../scenarios/sc002-mtp.toml"),
            ),
            ScenarioKind::Moe => (
                "scenarios/sc003-moe.toml",
                include_str!("../../scenarios/sc003-moe.toml"),
            ),
            ScenarioKind::Model => (
                "scenarios/model-deepseek-v3-mini.toml",
                include_str!("../../scenarios/model-deepseek-v3-mini.toml"),
            ),
            ScenarioKind::Calibrate => (
                "scenarios/calibrate.toml",
                include_str!("../../scenarios/calibrate.toml"),
            ),
        }
    }
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_true() -> bool {
    true
}

// ---------------------------------------------------------------------------------------------
// SC-001 MLA

/// SC-001 场景：MLA 与 MHA/GQA 的内存与上下文容量对比。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaScenario {
    /// 验收标准编号，例如 `SC-001`。
    pub id: String,
    /// 必须为 `mla`。
    pub kind: ScenarioKind,
    /// 一行标题。
    pub title: String,
    /// 说明（可选）。
    #[serde(default)]
    pub description: Option<String>,
    /// 冒烟场景（`smoke = true`）：它的标准永远不算规格标准（编号带 `@smoke`），门禁不把它当作规格的判定。
    #[serde(default)]
    pub smoke: bool,
    /// 模型形状（解码器主干）。
    pub model: ModelShape,
    /// 注意力变体及其维度（沿用 DeepSeek 的参数名）。
    pub attention: MlaAttentionShape,
    /// 运行设置。
    pub run: MlaRun,
    /// 内存预算与容量探测（SC-001b）。
    pub capacity: MlaCapacity,
    /// 阈值。
    pub thresholds: MlaThresholds,
    /// 模型维度的来源（`--model` 给出时：预设或检查点的 `config.json`）。只由命令行设置，
    /// 不能写在场景文件里；写入报告的场景 JSON。
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub model_origin: Option<ModelOrigin>,
    /// 场景 `[model]` 里写的模型来源（`preset` / `path` / `layers`；命令行的 `--model` 优先）。
    #[serde(skip)]
    pub model_ref: Option<super::model_ref::ModelRef>,
}

/// 模型维度的来源（`--model`），写入报告。
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelOrigin {
    /// 预设名或检查点目录。
    pub model: String,
    /// 保留的层数。
    pub layers: usize,
    /// 完整模型的层数。
    pub total_layers: usize,
    /// 权重来源：`random`（随机权重，准确的维度；`bench mla|moe`）或 `checkpoint`（检查点的
    /// 权重；`bench mtp`）。
    pub weights: String,
    /// 该模型自己（MLA）的权重字节数（运行的数值类型下）；容量预算 = 它 + 运行期预算。
    /// 在命令行覆盖（`--dtype`）之后才确定，之前为 `None`。
    pub weights_bytes: Option<u64>,
    /// 运行期预算（GiB）：场景的 `capacity.memory_budget_gib` 原值。
    pub runtime_budget_gib: f64,
    /// 一句话说明（"random weights, DeepSeek-V2-Lite dimensions, 2 of 27 layers" 以及与真实模型的差别）。
    pub note: String,
}

/// 解码器主干形状。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// 隐藏维度 d（config.json 的 `hidden_size`）。
    #[serde(rename = "hidden_size")]
    pub hidden: usize,
    /// 层数（`num_hidden_layers`）。
    #[serde(rename = "num_hidden_layers")]
    pub n_layers: usize,
    /// 注意力头数 n_h（`num_attention_heads`）。
    #[serde(rename = "num_attention_heads")]
    pub n_heads: usize,
    /// 词表大小。
    pub vocab_size: usize,
    /// 稠密 FFN 中间维度（SwiGLU；`intermediate_size`）。
    #[serde(rename = "intermediate_size")]
    pub ffn_hidden: usize,
    /// RoPE 基数 θ（默认 10000）。
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// YaRN 长上下文缩放（config.json 的 `rope_scaling` 键名与取值：`factor`、
    /// `original_max_position_embeddings`、`beta_fast`、`beta_slow`、`mscale`、`mscale_all_dim`）；
    /// 缺省 = 普通 RoPE。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<crate::nn::rope::Yarn>,
    /// RMSNorm 的 ε（config.json 的 `rms_norm_eps`，默认 1e-6）。
    #[serde(
        default = "crate::nn::model::default_rms_norm_eps",
        skip_serializing_if = "crate::nn::model::is_default_eps"
    )]
    pub rms_norm_eps: f64,
}

/// MLA/MHA/GQA 的注意力维度。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaAttentionShape {
    /// MHA/GQA 每头维度 d_h。
    pub head_dim: usize,
    /// GQA 的 KV 头数 n_g（必须整除 n_heads，且小于 n_heads）。
    pub gqa_kv_heads: usize,
    /// KV 潜向量维度 d_c（DeepSeek: 512）。
    pub kv_lora_rank: usize,
    /// 查询压缩维度 d_c'；缺省 = 不压缩（如 V2-Lite；与 config.json 的 null 相同，没有 0 这个哨兵值）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q_lora_rank: Option<usize>,
    /// 不带 RoPE 的 q/k 每头维度（DeepSeek: 128）。
    pub qk_nope_head_dim: usize,
    /// 解耦 RoPE 维度 d_r（DeepSeek: 64）。
    pub qk_rope_head_dim: usize,
    /// 每头 value 维度（DeepSeek: 128）。
    pub v_head_dim: usize,
    /// 要运行的变体：`mha`、`gqa`、`mla_absorbed`、`mla_naive`（拼错在解析时报错）。
    pub variants: Vec<MlaVariant>,
    /// 预填充时每块查询的 token 数（分块预填充，避免 [S, S] 分数矩阵）。
    pub prefill_chunk: usize,
}

/// SC-001 运行设置。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaRun {
    /// 批大小。
    pub batch: usize,
    /// 预填充序列长度（`--seq` 覆盖）。
    pub seq: usize,
    /// 预填充之后解码的 token 数。
    pub decode_tokens: usize,
    /// 预热次数。
    pub warmup: usize,
    /// 重复测量次数。
    pub repetitions: usize,
    /// 数值类型。
    #[serde(default)]
    pub dtype: Dtype,
}

/// SC-001b 容量探测设置。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaCapacity {
    /// 内存预算（GiB）。
    pub memory_budget_gib: f64,
    /// 探测起点长度。
    pub min_seq: usize,
    /// 探测上限长度。
    pub max_seq: usize,
    /// 每次探测的真实解码步数。
    pub probe_decode_tokens: usize,
}

/// SC-001 阈值。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaThresholds {
    /// SC-001a：运行期峰值（峰值减去权重加载后的基线）降低比例下限，0..1（规格：0.40）。
    pub runtime_peak_reduction: f64,
    /// SC-001b：预算内可容纳的上下文长度之比 MLA/MHA 下限（规格：2.0）。
    pub capacity_ratio: f64,
}

// ---------------------------------------------------------------------------------------------
// SC-002 MTP

/// SC-002 场景：MTP 自推测解码与贪心解码对比。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtpScenario {
    /// 验收标准编号，例如 `SC-002`。
    pub id: String,
    /// 必须为 `mtp`。
    pub kind: ScenarioKind,
    /// 一行标题。
    pub title: String,
    /// 说明（可选）。
    #[serde(default)]
    pub description: Option<String>,
    /// 冒烟场景（`smoke = true`）：它的标准永远不算规格标准（编号带 `@smoke`），门禁不把它当作规格的判定。
    #[serde(default)]
    pub smoke: bool,
    /// 主模型形状（字节级分词，vocab_size 通常为 256）。
    pub model: ModelShape,
    /// MTP 设置。
    pub mtp: MtpSettings,
    /// 训练设置。
    pub train: MtpTrain,
    /// 运行设置。
    pub run: MtpRun,
    /// 扫描（可选）：深度 D 与批大小。
    #[serde(default)]
    pub sweep: Option<MtpSweep>,
    /// 阈值。
    pub thresholds: MtpThresholds,
    /// `--model DIR` 给出的检查点（带 MTP 层的 DeepSeek 模型；不是场景键：由命令行设置）。
    /// 给出时不训练：主模型与 MTP 层都从检查点读入。
    #[serde(skip_deserializing, default, skip_serializing_if = "Option::is_none")]
    pub model_origin: Option<ModelOrigin>,
}

/// MTP 模块设置。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtpSettings {
    /// MTP 模块数 = 草稿深度 D（"预测 4 个 token" = 主 token + D = 3 个草稿；config.json 的
    /// `num_nextn_predict_layers`）。
    #[serde(rename = "num_nextn_predict_layers")]
    pub depth: usize,
}

/// MTP 训练设置。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtpTrain {
    /// 训练步数。
    pub steps: usize,
    /// 训练批大小。
    pub batch: usize,
    /// 训练序列长度。
    pub seq_len: usize,
    /// 学习率峰值。
    pub learning_rate: f64,
    /// 学习率预热步数。
    pub warmup_steps: usize,
    /// MTP 损失权重 λ。
    pub mtp_lambda: f64,
    /// 语料目录或文件（缺省：本机 cargo 注册表中依赖的 Rust 源码）。
    #[serde(default)]
    pub corpus: Option<PathBuf>,
    /// 已训练好的检查点目录（给出时不训练、也不读语料：提示取自检查点里保存的留出文本）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// 留出集比例，0..1。
    pub holdout_fraction: f64,
    /// 随机种子。
    pub seed: u64,
    /// 自蒸馏步数：主模型训练完后冻结它，只训练 MTP 模块，目标是主模型自己对训练集提示的贪心续写
    /// （推测解码的接受率衡量的正是"与主模型一致"，而不是"与数据一致"）。0 = 不做（缺省）。
    #[serde(default, skip_serializing_if = "is_zero")]
    pub distill_steps: usize,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

/// SC-002 运行设置。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtpRun {
    /// 批大小（规格：8）。
    pub batch: usize,
    /// 提示长度（token）。
    pub prompt_len: usize,
    /// 每条序列生成的新 token 数（`--seq` 覆盖）。
    pub new_tokens: usize,
    /// 预热次数。
    pub warmup: usize,
    /// 重复测量次数。
    pub repetitions: usize,
    /// 数值类型。
    #[serde(default)]
    pub dtype: Dtype,
    /// 提示的 token id 文件（只用于检查点，`--model DIR`；每行一条提示，id 以空格或逗号分隔，
    /// 或一个 JSON 数组的数组；`--prompts` 覆盖）。缺省：固定种子的随机 id。dsopt 自己的字节级
    /// 模型的提示总取自留出文本。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<PathBuf>,
    /// 提示的文本文件（只用于检查点，`--model DIR`；每个非空行一条提示，用检查点自己的
    /// `tokenizer.json` 分词；`--prompt-text` 覆盖）。与 `prompts` 二选一。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_text: Option<PathBuf>,
}

/// 扫描设置。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtpSweep {
    /// 草稿深度列表。
    pub depths: Vec<usize>,
    /// 批大小列表。
    pub batches: Vec<usize>,
}

/// SC-002 阈值。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtpThresholds {
    /// SC-002a：总生成时间降低比例下限，0..1（规格：0.25）。
    pub time_reduction: f64,
    /// SC-002b：吞吐量之比下限（规格：1.3）。
    pub throughput_ratio: f64,
}

// ---------------------------------------------------------------------------------------------
// SC-003 MoE

/// SC-003 场景：DeepSeekMoE 与稠密 FFN 对比，以及专家卸载。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeScenario {
    /// 验收标准编号，例如 `SC-003`。
    pub id: String,
    /// 必须为 `moe`。
    pub kind: ScenarioKind,
    /// 一行标题。
    pub title: String,
    /// 说明（可选）。
    #[serde(default)]
    pub description: Option<String>,
    /// 冒烟场景（`smoke = true`）：它的标准永远不算规格标准（编号带 `@smoke`），门禁不把它当作规格的判定。
    #[serde(default)]
    pub smoke: bool,
    /// 主干形状。
    pub model: ModelShape,
    /// MoE 设置（沿用 DeepSeek 的参数名）。
    pub moe: MoeShape,
    /// 运行设置。
    pub run: MoeRun,
    /// 专家卸载（SC-003b，可选）。
    #[serde(default)]
    pub offload: Option<MoeOffload>,
    /// 阈值。
    pub thresholds: MoeThresholds,
    /// `--model` 给出的模型（不是场景键：由命令行设置）。
    #[serde(skip_deserializing, default, skip_serializing_if = "Option::is_none")]
    pub model_origin: Option<ModelOrigin>,
    /// 场景 `[model]` 里写的模型来源（`preset` / `path` / `layers`；命令行的 `--model` 优先）。
    #[serde(skip)]
    pub model_ref: Option<super::model_ref::ModelRef>,
}

/// DeepSeekMoE 形状。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeShape {
    /// 路由专家数。
    pub n_routed_experts: usize,
    /// 共享专家数（总是激活）。
    pub n_shared_experts: usize,
    /// 每个 token 激活的路由专家数 top-k。
    pub num_experts_per_tok: usize,
    /// 每个专家的中间维度（`moe_intermediate_size`）。
    #[serde(rename = "moe_intermediate_size")]
    pub moe_inter_dim: usize,
    /// 打分函数（`scoring_func`）。
    #[serde(rename = "scoring_func")]
    pub score_func: ScoreFunc,
    /// 分组路由的组数（1 = 不分组）。
    #[serde(default = "one")]
    pub n_group: usize,
    /// 保留的组数。
    #[serde(default = "one")]
    pub topk_group: usize,
    /// 门控权重缩放（`routed_scaling_factor`）。
    #[serde(default = "one_f", rename = "routed_scaling_factor")]
    pub route_scale: f64,
    /// 选择方法（`greedy`、`group_limited_greedy`、`noaux_tc`）；缺省：分组时 `noaux_tc`，否则 `greedy`。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topk_method: Option<crate::nn::moe::TopkMethod>,
    /// 是否把选中专家的权重归一化；缺省：sigmoid 打分时归一化。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_topk_prob: Option<bool>,
    /// 前几层用稠密 FFN（宽度为 `model.intermediate_size`），其后每层是 MoE（config.json 的
    /// `first_k_dense_replace`；默认 0 = 每层都是 MoE）。稠密基线只替换 MoE 层。
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_k_dense_replace: usize,
}

fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}

/// SC-003 运行设置。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeRun {
    /// 类预填充前向的批大小。
    pub prefill_batch: usize,
    /// 类预填充前向的序列长度（`--seq` 覆盖）。
    pub prefill_seq: usize,
    /// 类解码步的批大小（规格：8；`--batch` 覆盖）。
    pub decode_batch: usize,
    /// 解码步数。
    pub decode_steps: usize,
    /// 预热次数。
    pub warmup: usize,
    /// 重复测量次数。
    pub repetitions: usize,
    /// 数值类型。
    #[serde(default)]
    pub dtype: Dtype,
    /// 提示的 token id 文件（只用于带权重的检查点，`--model DIR`；`--prompts` 覆盖）：前
    /// `prefill_batch` 行的前 `prefill_seq` 个 id 是预填充，第 i 个解码步用前 `decode_batch` 行的
    /// 第 i 个 id。缺省：固定种子的随机 id。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<PathBuf>,
    /// 提示的文本文件（只用于带权重的检查点；每个非空行一条，用检查点自己的 `tokenizer.json`
    /// 分词，行的用法同 `prompts`；`--prompt-text` 覆盖）。与 `prompts` 二选一。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_text: Option<PathBuf>,
}

/// 专家卸载设置。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeOffload {
    /// 设备内存预算（GiB）。
    pub memory_budget_gib: f64,
    /// 设备端专家缓存容量（个）。
    pub cache_experts: usize,
    /// 是否另跑一遍带预取的卸载（变体 `moe_offloaded_prefetch`）：用下一个 MoE 层的门控在本层输入上
    /// 猜出下一层的专家，本层分发后先复制进来。判定以不预取的那一遍为准。
    #[serde(default = "default_true")]
    pub prefetch: bool,
    /// 只测 SC-003b：不构建 SC-003a 的三个模型（模型大到三个无法同时放进内存时，例如
    /// `scenarios/models/sc003b-deepseek-v2-lite-16l.toml`）；SC-003a 的两条标准记为未测量，判定因此是 error。
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only: bool,
    /// `--force`：CPU 上重写存储卸载的专家文件（即使缓存里已有匹配的）。不是场景键。
    #[serde(skip)]
    pub force: bool,
}

/// SC-003 阈值。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeThresholds {
    /// SC-003a：MoE 相对同总参数稠密模型的 tokens/s 倍数下限（规格：1.3）。
    pub speedup_vs_dense_total: f64,
    /// SC-003b：模型大小 / 内存预算 的下限（规格：2.0）。
    pub model_to_budget_ratio: f64,
}

// ---------------------------------------------------------------------------------------------
// FR-004 combined model

/// FR-004 场景（`kind = "model"`）：按 `[optimization]` 构建一个组合了 MLA / MoE / MTP 的模型，
/// 测量预填充、贪心解码与（MTP 深度 > 0 时）自推测解码，并检查自推测输出与贪心输出逐 token 相同。
/// 省略 `[optimization]` 即标准模型（FR-006）。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelScenario {
    /// 编号，例如 `FR-004`（也接受 `SC-NNN`）。
    pub id: String,
    /// 必须为 `model`。
    pub kind: ScenarioKind,
    /// 一行标题。
    pub title: String,
    /// 说明（可选）。
    #[serde(default)]
    pub description: Option<String>,
    /// 冒烟场景（`smoke = true`）：它的标准永远不算规格标准（编号带 `@smoke`），门禁不把它当作规格的判定。
    #[serde(default)]
    pub smoke: bool,
    /// 模型主干形状。
    pub model: DecoderShape,
    /// 开哪些优化（缺省 = 标准模型；`--config FILE` 整节替换）。
    #[serde(default)]
    pub optimization: OptimizationConfig,
    /// 运行设置。
    pub run: ModelRun,
    /// `--model` 给出的模型（不是场景键：由命令行设置；权重总是随机的）。
    #[serde(skip_deserializing, default, skip_serializing_if = "Option::is_none")]
    pub model_origin: Option<ModelOrigin>,
    /// 场景 `[model]` 里写的模型来源（`preset` / `path` / `layers`；命令行的 `--model` 优先）。
    #[serde(skip)]
    pub model_ref: Option<super::model_ref::ModelRef>,
}

/// FR-004 运行设置。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRun {
    /// 批大小（`--batch` 覆盖）。
    pub batch: usize,
    /// 提示长度（token；随机提示，固定种子）。
    pub prompt_len: usize,
    /// 每条序列生成的新 token 数（`--seq` 覆盖）。
    pub new_tokens: usize,
    /// 预热次数。
    pub warmup: usize,
    /// 重复测量次数。
    pub repetitions: usize,
    /// 权重与提示的随机种子（默认 7）。
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_seed() -> u64 {
    7
}

// ---------------------------------------------------------------------------------------------
// Calibrate

/// 校准场景：一个 n×n 矩阵乘法，检查测量链路，并与主机端 f64 参考结果比对。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrateScenario {
    /// 编号，例如 `CAL-001`。
    pub id: String,
    /// 必须为 `calibrate`。
    pub kind: ScenarioKind,
    /// 一行标题。
    pub title: String,
    /// 说明（可选）。
    #[serde(default)]
    pub description: Option<String>,
    /// 冒烟场景（`smoke = true`）：它的标准永远不算规格标准（编号带 `@smoke`），门禁不把它当作规格的判定。
    #[serde(default)]
    pub smoke: bool,
    /// 工作负载。
    pub workload: CalibrateWorkload,
    /// 运行设置。
    pub run: CalibrateRun,
    /// 阈值。
    pub thresholds: CalibrateThresholds,
}

/// 校准负载：`[size, size] x [size, size]` 矩阵乘法。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrateWorkload {
    /// 矩阵边长（`--seq` 覆盖）。
    pub size: usize,
    /// 批大小（`--batch` 覆盖）。
    pub batch: usize,
}

/// 校准运行设置。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrateRun {
    /// 预热次数。
    pub warmup: usize,
    /// 重复测量次数。
    pub repetitions: usize,
}

/// 校准阈值。
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrateThresholds {
    /// 与 f64 参考结果的最大相对误差（相对最大绝对值）上限。
    pub max_rel_error: f64,
}

// ---------------------------------------------------------------------------------------------

/// 已加载并校验的场景。
#[derive(Debug, Clone)]
pub enum Scenario {
    /// SC-001。
    Mla(MlaScenario),
    /// SC-002。
    Mtp(MtpScenario),
    /// SC-003。
    Moe(MoeScenario),
    /// FR-004：组合模型。
    Model(ModelScenario),
    /// 校准。
    Calibrate(CalibrateScenario),
}

/// 命令行覆盖项：加载后应用，再校验。
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--seq`：MLA 的 `run.seq`、MTP 与组合模型的 `run.new_tokens`、MoE 的 `run.prefill_seq`、校准的 `workload.size`。
    pub seq: Option<usize>,
    /// `--batch`：MLA/MTP/组合模型的 `run.batch`、MoE 的 `run.decode_batch`、校准的 `workload.batch`。
    pub batch: Option<usize>,
    /// `--repetitions`。
    pub repetitions: Option<usize>,
    /// `--warmup`。
    pub warmup: Option<usize>,
    /// `--corpus`：MTP 的 `train.corpus`（训练语料文件或目录）。
    pub corpus: Option<PathBuf>,
    /// `--train-steps`：MTP 的 `train.steps`。
    pub train_steps: Option<usize>,
    /// `--checkpoint`：MTP 的 `train.checkpoint`（用现成的检查点）。
    pub checkpoint: Option<PathBuf>,
    /// `--config FILE`：组合模型（`model`）场景的 `[optimization]` 节整节替换为该文件的
    /// [`OptimizationConfig`]（文件顶层是 `[optimization]` 表或直接是其键），替换后再次校验。
    /// 其他种类的场景没有这一节，给出时报用法错误（退出码 2）。
    pub config: Option<PathBuf>,
    /// `--prompts FILE`：MTP 与 MoE 的 `run.prompts`（只用于检查点：`bench mtp|moe --model DIR`）。
    pub prompts: Option<PathBuf>,
    /// `--prompt-text FILE`：MTP 与 MoE 的 `run.prompt_text`（同上，文本用检查点的分词器）。
    pub prompt_text: Option<PathBuf>,
    /// `--dtype`：MLA/MTP/MoE 的 `run.dtype`、组合模型的 `optimization.dtype`（在 `--config`
    /// 之后应用）。校准场景总在 f32 中运行（与 f64 主机参考比较），给出时报用法错误。
    pub dtype: Option<Dtype>,
    /// `--force`：MoE 场景在 CPU 上重写存储卸载的专家文件（[`MoeOffload::force`]）。
    pub force: bool,
}

impl Scenario {
    /// The model the scenario's `[model]` section names (`preset` / `path`), if any.
    pub fn model_ref(&self) -> Option<&super::model_ref::ModelRef> {
        match self {
            Scenario::Mla(s) => s.model_ref.as_ref(),
            Scenario::Moe(s) => s.model_ref.as_ref(),
            Scenario::Model(s) => s.model_ref.as_ref(),
            _ => None,
        }
    }

    /// The scenario's kind.
    pub fn kind(&self) -> ScenarioKind {
        match self {
            Scenario::Mla(_) => ScenarioKind::Mla,
            Scenario::Mtp(_) => ScenarioKind::Mtp,
            Scenario::Moe(_) => ScenarioKind::Moe,
            Scenario::Model(_) => ScenarioKind::Model,
            Scenario::Calibrate(_) => ScenarioKind::Calibrate,
        }
    }

    /// The criterion id (e.g. `SC-001`).
    pub fn id(&self) -> &str {
        match self {
            Scenario::Mla(s) => &s.id,
            Scenario::Mtp(s) => &s.id,
            Scenario::Moe(s) => &s.id,
            Scenario::Model(s) => &s.id,
            Scenario::Calibrate(s) => &s.id,
        }
    }

    /// Whether the scenario marks itself a smoke test (`smoke = true`).
    pub fn smoke(&self) -> bool {
        match self {
            Scenario::Mla(s) => s.smoke,
            Scenario::Mtp(s) => s.smoke,
            Scenario::Moe(s) => s.smoke,
            Scenario::Model(s) => s.smoke,
            Scenario::Calibrate(s) => s.smoke,
        }
    }

    /// The one-line title.
    pub fn title(&self) -> &str {
        match self {
            Scenario::Mla(s) => &s.title,
            Scenario::Mtp(s) => &s.title,
            Scenario::Moe(s) => &s.title,
            Scenario::Model(s) => &s.title,
            Scenario::Calibrate(s) => &s.title,
        }
    }

    /// The scenario as JSON, for the report (after overrides).
    pub fn to_json(&self) -> serde_json::Value {
        let v = match self {
            Scenario::Mla(s) => serde_json::to_value(s),
            Scenario::Mtp(s) => serde_json::to_value(s),
            Scenario::Moe(s) => serde_json::to_value(s),
            Scenario::Model(s) => serde_json::to_value(s),
            Scenario::Calibrate(s) => serde_json::to_value(s),
        };
        v.expect("scenario structs serialise")
    }
}
