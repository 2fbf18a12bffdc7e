//! 注意力：配置、KV 缓存与三种实现（MHA/GQA、MLA 朴素、MLA 吸收）。

pub mod blocked;
pub mod cache_write;
pub mod fused;
pub mod mha;
pub mod mla;

use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor};
use serde::{Deserialize, Serialize};

pub use mla::MlaImpl;

/// 注意力种类。默认是 MHA（FR-006：标准行为保持为默认）。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// 多头注意力：每个头各有 K/V（n_kv_heads = n_heads）。
    #[default]
    Mha,
    /// 分组查询注意力：n_kv_heads < n_heads 个 K/V 头，由若干查询头共享。
    Gqa,
    /// 多头潜在注意力（DeepSeek-V2/V3）。
    Mla,
}

/// 注意力配置；MLA 字段沿用 DeepSeek 的参数名。
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttentionConfig {
    /// 种类。
    pub kind: AttentionKind,
    /// 查询头数 n_h。
    pub n_heads: usize,
    /// K/V 头数（MHA 等于 n_heads；GQA 更少；MLA 不用）。
    pub n_kv_heads: usize,
    /// MHA/GQA 每头维度。
    pub head_dim: usize,
    /// MLA：KV 潜向量维度 d_c。
    pub kv_lora_rank: usize,
    /// MLA：查询压缩维度（0 = 不压缩）。
    pub q_lora_rank: usize,
    /// MLA：不带 RoPE 的 q/k 每头维度。
    pub qk_nope_head_dim: usize,
    /// MLA：解耦 RoPE 维度（所有头共享一个 RoPE 键）。
    pub qk_rope_head_dim: usize,
    /// MLA：每头 value 维度。
    pub v_head_dim: usize,
    /// MLA 实现：朴素（重建并缓存每头 K/V）或吸收（只缓存潜向量）。
    pub mla_impl: MlaImpl,
    /// 注意力按键分块的块大小（在线 softmax；工作区与序列长度无关）。
    pub key_block: usize,
    /// YaRN 的 mscale（1.0 = 不用）；softmax 缩放乘以 mscale²。
    pub mscale: f64,
    /// RoPE 基数。
    pub rope_theta: f64,
    /// YaRN 长上下文缩放（config.json 的 `rope_scaling`；`None` = 普通 RoPE）。改变 RoPE 频率，
    /// 并把 softmax 缩放乘以 `mscale(s, mscale_all_dim)²`（与上面的 `mscale` 相乘）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<crate::nn::rope::Yarn>,
    /// 部分键块按桶大小读取（形状分桶）：在按形状编译内核的后端（CubeCL：wgpu、CUDA）上由运行器
    /// 打开一次（[`crate::nn::DecoderConfig::with_shape_buckets`]），CPU 后端保持关闭。
    /// 运行期属性，不属于模型形状：不写入场景、报告或检查点键。
    #[serde(skip)]
    pub shape_buckets: bool,
}

impl AttentionConfig {
    /// Standard multi-head attention (the default).
    pub fn mha(n_heads: usize, head_dim: usize) -> Self {
        AttentionConfig {
            kind: AttentionKind::Mha,
            n_heads,
            n_kv_heads: n_heads,
            head_dim,
            kv_lora_rank: 512,
            q_lora_rank: 0,
            qk_nope_head_dim: 128,
            qk_rope_head_dim: 64,
            v_head_dim: 128,
            mla_impl: MlaImpl::Absorbed,
            key_block: 512,
            mscale: 1.0,
            rope_theta: 10000.0,
            rope_scaling: None,
            shape_buckets: false,
        }
    }

    /// KV-cache elements per token per layer for this configuration (DeepSeek-V2 report, arXiv 2405.04434):
    /// MHA `2·n_h·d_h`, GQA `2·n_g·d_h`, MLA naive `n_h·(d_nope + d_rope + d_v)`,
    /// MLA absorbed `d_c + d_r`.
    pub fn kv_elements_per_token(&self) -> usize {
        match self.kind {
            AttentionKind::Mha | AttentionKind::Gqa => 2 * self.n_kv_heads * self.head_dim,
            AttentionKind::Mla => match self.mla_impl {
                MlaImpl::Naive => {
                    self.n_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)
                }
                MlaImpl::Absorbed => self.kv_lora_rank + self.qk_rope_head_dim,
            },
        }
    }

    /// YaRN mscale: `0.1·m·ln(factor) + 1` for a context-extension factor > 1, else 1.
    pub fn yarn_mscale(factor: f64, m: f64) -> f64 {
        crate::nn::rope::yarn_get_mscale(factor, m)
    }

    /// RoPE 设定（基数与可选的 YaRN）。
    pub fn rope(&self) -> crate::nn::rope::Rope {
        crate::nn::rope::Rope {
            theta: self.rope_theta,
            yarn: self.rope_scaling,
        }
    }

    /// softmax 缩放：`mscale² · rope.softmax_factor() / sqrt(qk 宽度)`。
    pub fn softmax_scale(&self, qk_width: usize) -> f64 {
        self.mscale * self.mscale * self.rope().softmax_factor() / (qk_width as f64).sqrt()
    }
}

impl AttentionConfig {
    /// 按本配置新建注意力模块（Burn 的 `XConfig::init` 习惯）：MHA/GQA 或 MLA，输入输出维度
    /// 均为模型维度 `dim`。
    ///
    /// # Shapes
    /// 模块的前向：`x: [b, s, dim] -> [b, s, dim]`
    pub fn init<B: Backend>(&self, dim: usize, device: &B::Device) -> Attention<B> {
        match self.kind {
            AttentionKind::Mha | AttentionKind::Gqa => {
                Attention::Mha(mha::MhaAttention::new(dim, self, device))
            }
            AttentionKind::Mla => Attention::Mla(mla::MlaAttention::new(dim, self, device)),
        }
    }
}

/// 注意力：MHA/GQA 或 MLA（Burn 为枚举派生 `Module`），由 [`AttentionConfig::init`] 新建。
// one value per layer: the variants' size difference costs nothing, and Burn derives `Module`
// for the enum as it is
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Attention<B: Backend> {
    /// MHA 或 GQA（K/V 头数由配置决定）。
    Mha(mha::MhaAttention<B>),
    /// 多头潜在注意力。
    Mla(mla::MlaAttention<B>),
}

/// 一层的缓存张量，按容量预先分配。
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    /// MHA/GQA/朴素 MLA：K `[b, g, cap, dk]`；吸收 MLA：潜向量与 RoPE 键拼接 `[b, 1, cap, d_c + d_r]`。
    /// 总是存在（写入时由 [`append`] 原地更新）。
    pub k: Tensor<B, 4>,
    /// MHA/GQA/朴素 MLA：V `[b, g, cap, dv]`；吸收 MLA：无（值是潜向量的前 d_c 列）。
    pub v: Option<Tensor<B, 4>>,
    /// 吸收 MLA 预先整理的 W_UK `[h, d_nope, d_c]` 与 W_UV `[h, d_c, d_v]`（运行期状态，随缓存创建）。
    pub absorbed: Option<(Tensor<B, 3>, Tensor<B, 3>)>,
}

/// 整个模型的 KV 缓存：每层一个 [`LayerCache`]，容量固定，追加写入不复制整块缓存。
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// 每层缓存。
    pub layers: Vec<LayerCache<B>>,
    /// 已写入的 token 数。
    pub len: usize,
    /// 容量（token）。
    pub capacity: usize,
    /// 批大小。
    pub batch: usize,
}

impl<B: Backend> LayerCache<B> {
    /// Keeps only the sequences `rows` (indices into the batch, in the new batch order): one
    /// gather of K and V along the batch axis (a copy of the kept sequences' cache).
    pub fn keep_sequences(&mut self, rows: Tensor<B, 1, Int>) {
        self.k = self.k.clone().select(0, rows.clone());
        if let Some(v) = self.v.as_mut() {
            *v = v.clone().select(0, rows);
        }
    }
}

impl<B: Backend> KvCache<B> {
    /// Keeps only the sequences `rows` of the batch (speculative decoding drops sequences
    /// that have finished, see [`LayerCache::keep_sequences`]).
    pub fn keep_sequences(&mut self, rows: &[usize]) {
        let Some(first) = self.layers.first() else {
            self.batch = rows.len();
            return;
        };
        let idx = row_index::<B>(rows, &first.k.device());
        for l in &mut self.layers {
            l.keep_sequences(idx.clone());
        }
        self.batch = rows.len();
    }

    /// Bytes actually held by the cache tensors (K and V; not the absorbed weights).
    pub fn tensor_bytes(&self) -> u64 {
        let bytes = |t: &Tensor<B, 4>| (t.shape().num_elements() * t.dtype().size()) as u64;
        self.layers
            .iter()
            .map(|l| bytes(&l.k) + l.v.as_ref().map(bytes).unwrap_or(0))
            .sum()
    }

    /// Bytes of the pre-arranged absorbed MLA weights kept with the cache.
    pub fn absorbed_weight_bytes(&self) -> u64 {
        self.layers
            .iter()
            .filter_map(|l| l.absorbed.as_ref())
            .map(|(a, b)| {
                ((a.shape().num_elements() + b.shape().num_elements()) * a.dtype().size()) as u64
            })
            .sum()
    }

    /// Fills positions `0..len` with a constant (capacity probes: memory does not depend on the
    /// values) and sets the length. Writes in place; the cache is not reallocated.
    pub fn fill_synthetic(&mut self, len: usize, value: f32) {
        assert!(len <= self.capacity, "fill beyond capacity");
        // written in blocks so the temporary stays small next to the cache
        const BLOCK: usize = 1024;
        for l in &mut self.layers {
            for t in std::iter::once(&mut l.k).chain(l.v.as_mut()) {
                let [b, g, _, d] = t.dims();
                let mut i = 0;
                while i < len {
                    let e = (i + BLOCK).min(len);
                    let fill = Tensor::<B, 4>::full([b, g, e - i, d], value, &t.device());
                    append(t, fill, &vec![i; b]);
                    i = e;
                }
            }
        }
        self.len = len;
    }
}

/// Batch indices as a 1-D int tensor (for `select` along the batch axis).
pub(crate) fn row_index<B: Backend>(rows: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let data: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::from_data(burn::tensor::TensorData::new(data, [rows.len()]), device)
}

/// One past the last position written by a chunk of `s` tokens at per-sequence `starts`.
pub(crate) fn max_end(starts: &[usize], s: usize) -> usize {
    starts.iter().max().copied().unwrap_or(0) + s
}

/// Writes `new` `[b, g, s, d]` at positions `starts[i]..starts[i]+s` of sequence `i` of `slot`,
/// in place (see [`cache_write`]: one write for the whole batch, no copy of the cache).
///
/// The cache tensor is moved out of `slot` for the write, so it is uniquely owned there (what
/// lets flex write into its buffer); a handle to `new` holds the slot meanwhile (no allocation).
pub(crate) fn append<B: Backend>(slot: &mut Tensor<B, 4>, new: Tensor<B, 4>, starts: &[usize]) {
    let cache = std::mem::replace(slot, new.clone());
    *slot = cache_write::write_rows(cache, new, starts);
}
