//! 多头潜在注意力（`MlaAttention`，DeepSeek-V2/V3）。
//!
//! 键值先压缩成潜向量 `c_kv = RMSNorm(W_DKV · h)`（维度 `kv_lora_rank` = d_c），每头的
//! `k_nope = W_UK · c_kv`、`v = W_UV · c_kv`；另有一个所有头共享的解耦 RoPE 键
//! `k_pe = RoPE(W_KR · h)`（维度 `qk_rope_head_dim` = d_r）。分数为
//! `(q_nope·k_nope + q_pe·k_pe) / sqrt(d_nope + d_r)`。
//!
//! 两种实现共用同一组权重，由 [`MlaImpl`] 切换：
//! - `Naive`（朴素）：重建每头的 K/V 并缓存 `[b, h, S, d_nope + d_r]` 与 `[b, h, S, d_v]`，不省内存；
//! - `Absorbed`（吸收）：把 W_UK 并入查询（`q_nope · W_UK` 得到 d_c 维查询），只缓存潜向量与共享
//!   RoPE 键 `[b, S, d_c + d_r]`，注意力之后再乘 W_UV。每 token 每层缓存 `d_c + d_r` 个元素
//!   （DeepSeek 维度下 576，MHA 为 4096）。
//!
//! 两者数学上等价（测试证明），吸收实现每个查询-键对的算术更多、读缓存更少，适合访存受限的解码。

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use super::{append, blocked, cache_write, max_end, AttentionConfig, LayerCache};
use crate::nn::{linear, rope};

/// MLA 的实现方式。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MlaImpl {
    /// 朴素：缓存重建后的每头 K/V（参照实现，不省内存）。
    Naive,
    /// 吸收：只缓存潜向量与共享 RoPE 键（省内存的实现）。
    #[default]
    Absorbed,
}

/// 查询投影：直接投影（没有 `q_lora_rank`，内部记作 0），或先压缩再解压的低秩投影（DeepSeek-V2/V3）。
// one value per layer: the variants' size difference costs nothing, and Burn derives `Module`
// for the enum as it is
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum QueryProjection<B: Backend> {
    /// `wq`：`dim -> h·(d_nope + d_r)`。
    Direct(Linear<B>),
    /// `wq_a`、`q_norm`、`wq_b`：`dim -> q_lora_rank -> h·(d_nope + d_r)`。
    LowRank(LowRankQuery<B>),
}

/// 低秩查询投影的三部分。
#[derive(Module, Debug)]
pub struct LowRankQuery<B: Backend> {
    /// 查询压缩 `dim -> q_lora_rank`。
    wq_a: Linear<B>,
    /// 查询压缩后的 RMSNorm。
    q_norm: RmsNorm<B>,
    /// 查询解压 `q_lora_rank -> h·(d_nope + d_r)`。
    wq_b: Linear<B>,
}

impl<B: Backend> LowRankQuery<B> {
    /// From its parts (a loaded checkpoint's `q_a_proj`, `q_a_layernorm`, `q_b_proj`).
    pub fn new(wq_a: Linear<B>, q_norm: RmsNorm<B>, wq_b: Linear<B>) -> Self {
        LowRankQuery { wq_a, q_norm, wq_b }
    }
}

impl<B: Backend> QueryProjection<B> {
    /// `[b, s, dim] -> [b, s, h·(d_nope + d_r)]`
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            QueryProjection::Direct(wq) => linear::forward(wq, x),
            QueryProjection::LowRank(q) => linear::forward(
                &q.wq_b,
                crate::nn::rms_norm(&q.q_norm, linear::forward(&q.wq_a, x)),
            ),
        }
    }
}

/// 多头潜在注意力模块（参数名与 DeepSeek 一致）。
#[derive(Module, Debug)]
pub struct MlaAttention<B: Backend> {
    /// 查询投影（直接或低秩）。
    query: QueryProjection<B>,
    /// 键值下投影 `dim -> d_c + d_r`（潜向量与 RoPE 键）。
    wkv_a: Linear<B>,
    /// 潜向量 RMSNorm。
    kv_norm: RmsNorm<B>,
    /// 键值上投影 `d_c -> h·(d_nope + d_v)`（W_UK 与 W_UV 按头交错）。
    wkv_b: Linear<B>,
    /// 输出投影 `h·d_v -> dim`。
    wo: Linear<B>,
    n_heads: usize,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    key_block: usize,
    shape_buckets: bool,
    /// RoPE 设定（基数与可选的 YaRN）；不是参数。
    #[module(skip)]
    rope: rope::Rope,
    scale: f64,
    /// 当前实现（不是参数，切换不改变权重）。
    #[module(skip)]
    implementation: MlaImpl,
}

impl<B: Backend> MlaAttention<B> {
    /// 为隐藏维度 `dim` 新建 MLA 模块（权重按 `c` 的维度初始化；对外的入口是
    /// [`AttentionConfig::init`]）。
    pub(super) fn new(dim: usize, c: &AttentionConfig, device: &B::Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let h = c.n_heads;
        let qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
        let query = if c.q_lora_rank == 0 {
            QueryProjection::Direct(lin(dim, h * qk))
        } else {
            QueryProjection::LowRank(LowRankQuery {
                wq_a: lin(dim, c.q_lora_rank),
                q_norm: RmsNormConfig::new(c.q_lora_rank)
                    .with_epsilon(1e-6)
                    .init(device),
                wq_b: lin(c.q_lora_rank, h * qk),
            })
        };
        Self::from_parts(
            c,
            query,
            lin(dim, c.kv_lora_rank + c.qk_rope_head_dim),
            RmsNormConfig::new(c.kv_lora_rank)
                .with_epsilon(1e-6)
                .init(device),
            lin(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim)),
            lin(h * c.v_head_dim, dim),
        )
    }

    /// 由已有的各部分组成 MLA 模块（加载的检查点；形状由调用方按 `c` 检查过）。
    pub fn from_parts(
        c: &AttentionConfig,
        query: QueryProjection<B>,
        wkv_a: Linear<B>,
        kv_norm: RmsNorm<B>,
        wkv_b: Linear<B>,
        wo: Linear<B>,
    ) -> Self {
        let qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
        MlaAttention {
            query,
            wkv_a,
            kv_norm,
            wkv_b,
            wo,
            n_heads: c.n_heads,
            kv_lora_rank: c.kv_lora_rank,
            qk_nope_head_dim: c.qk_nope_head_dim,
            qk_rope_head_dim: c.qk_rope_head_dim,
            v_head_dim: c.v_head_dim,
            key_block: c.key_block,
            shape_buckets: c.shape_buckets,
            rope: c.rope(),
            scale: c.softmax_scale(qk),
            implementation: c.mla_impl,
        }
    }

    /// 参数量（由 `dim` 与配置 `c` 解析计算）。
    pub fn params(dim: usize, c: &AttentionConfig) -> usize {
        let h = c.n_heads;
        let qk = c.qk_nope_head_dim + c.qk_rope_head_dim;
        let q = if c.q_lora_rank == 0 {
            dim * h * qk
        } else {
            dim * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * qk
        };
        q + dim * (c.kv_lora_rank + c.qk_rope_head_dim)
            + c.kv_lora_rank
            + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
            + h * c.v_head_dim * dim
    }

    /// 当前使用的实现。
    pub fn implementation(&self) -> MlaImpl {
        self.implementation
    }

    /// 在同一组权重上切换朴素/吸收实现（切换后需要新建缓存）。
    pub fn set_implementation(&mut self, i: MlaImpl) {
        self.implementation = i;
    }

    /// 为当前实现新建一个空缓存层。
    pub fn new_cache(&self, batch: usize, capacity: usize, device: &B::Device) -> LayerCache<B> {
        let h = self.n_heads;
        match self.implementation {
            MlaImpl::Naive => LayerCache {
                k: cache_write::zeros(
                    [
                        batch,
                        h,
                        capacity,
                        self.qk_nope_head_dim + self.qk_rope_head_dim,
                    ],
                    device,
                ),
                v: Some(cache_write::zeros(
                    [batch, h, capacity, self.v_head_dim],
                    device,
                )),
                absorbed: None,
            },
            MlaImpl::Absorbed => LayerCache {
                k: cache_write::zeros(
                    [
                        batch,
                        1,
                        capacity,
                        self.kv_lora_rank + self.qk_rope_head_dim,
                    ],
                    device,
                ),
                v: None,
                absorbed: Some(self.absorbed_weights()),
            },
        }
    }

    /// 从 `wkv_b` 切出 W_UK（`[h, d_nope, d_c]`）与 W_UV（`[h, d_c, d_v]`）。
    fn absorbed_weights(&self) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let (h, dc, dn, dv) = (
            self.n_heads,
            self.kv_lora_rank,
            self.qk_nope_head_dim,
            self.v_head_dim,
        );
        // Burn 的 Linear 权重形状为 [d_in, d_out] = [d_c, h·(d_nope + d_v)]
        let w = self.wkv_b.weight.val().reshape([dc, h, dn + dv]);
        let w_uk = w.clone().slice([0..dc, 0..h, 0..dn]).permute([1, 2, 0]); // [h, dn, dc]
        let w_uv = w.slice([0..dc, 0..h, dn..dn + dv]).swap_dims(0, 1); // [h, dc, dv]
        (w_uk, w_uv)
    }

    /// 先把本块追加进缓存，再让 `x` 对缓存做注意力；序列 `i` 位于位置
    /// `starts[i]..starts[i]+s`。
    ///
    /// # Shapes
    /// `x: [b, s, dim] -> [b, s, dim]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        starts: &[usize],
        cache: &mut LayerCache<B>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, dc, dn, dr, dv) = (
            self.n_heads,
            self.kv_lora_rank,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
        );
        // 查询：[b, s, h·(dn+dr)] -> [b, h, s, dn+dr]
        let q = self.query.forward(x.clone());
        let q = q.reshape([b, s, h, dn + dr]).swap_dims(1, 2);
        let q_nope = q.clone().slice([0..b, 0..h, 0..s, 0..dn]);
        let q_pe = rope::apply4(q.slice([0..b, 0..h, 0..s, dn..dn + dr]), starts, self.rope);
        // 潜向量与唯一的共享 RoPE 键：[b, s, dc + dr]
        let kv = linear::forward(&self.wkv_a, x);
        let c_kv = crate::nn::rms_norm(&self.kv_norm, kv.clone().slice([0..b, 0..s, 0..dc]));
        let k_pe = rope::apply(kv.slice([0..b, 0..s, dc..dc + dr]), starts, self.rope);

        let o = match self.implementation {
            MlaImpl::Naive => {
                // 重建每头的键和值：[b, s, h·(dn+dv)] -> [b, h, s, dn+dv]
                let kvb = linear::forward(&self.wkv_b, c_kv)
                    .reshape([b, s, h, dn + dv])
                    .swap_dims(1, 2);
                let k_nope = kvb.clone().slice([0..b, 0..h, 0..s, 0..dn]);
                let v = kvb.slice([0..b, 0..h, 0..s, dn..dn + dv]);
                let k_pe = k_pe.unsqueeze_dim::<4>(1).expand([b, h, s, dr]);
                let k = Tensor::cat(vec![k_nope, k_pe], 3); // [b, h, s, dn+dr]
                append(&mut cache.k, k, starts);
                // V is allocated with the cache ([`Self::new_cache`]); a cache made without it
                // gets it here
                let cap = cache.k.dims()[2];
                let vc = cache
                    .v
                    .get_or_insert_with(|| cache_write::zeros([b, h, cap, dv], &v.device()));
                append(vc, v, starts);
                let q = crate::nn::scale(Tensor::cat(vec![q_nope, q_pe], 3), self.scale);
                blocked::attention(
                    q,
                    &cache.k,
                    vc,
                    dv,
                    starts,
                    s,
                    max_end(starts, s),
                    self.key_block,
                    self.shape_buckets,
                ) // [b, h, s, dv]
            }
            MlaImpl::Absorbed => {
                // arranged once with the cache ([`Self::new_cache`]); a cache made without them
                // gets them here
                let (w_uk, w_uv) = cache
                    .absorbed
                    .get_or_insert_with(|| self.absorbed_weights())
                    .clone();
                // 按头计算 q_nope · W_UK：[h, b·s, dn] x [h, dn, dc] -> [h, b·s, dc]
                let q_abs =
                    linear::matmul_few(q_nope.swap_dims(0, 1).reshape([h, b * s, dn]), &w_uk);
                let q_abs = q_abs.reshape([h, b, s, dc]).swap_dims(0, 1); // [b, h, s, dc]
                                                                          // 每个（头, 位置）一行查询，所有头共享同一潜向量：[b, 1, h·s, dc+dr]
                let q = Tensor::cat(vec![q_abs, q_pe], 3);
                let q = crate::nn::scale(q, self.scale).reshape([b, 1, h * s, dc + dr]);
                let entry = Tensor::cat(vec![c_kv, k_pe], 2).unsqueeze_dim::<4>(1); // [b, 1, s, dc+dr]
                append(&mut cache.k, entry, starts);
                let latent = &cache.k;
                // 值就是同一缓存的前 dc 列
                let end = max_end(starts, s);
                let o = blocked::attention(
                    q,
                    latent,
                    latent,
                    dc,
                    starts,
                    s,
                    end,
                    self.key_block,
                    self.shape_buckets,
                );
                // 注意力之后再乘 W_UV：[h, b·s, dc] x [h, dc, dv] -> [h, b·s, dv]
                let o = o
                    .reshape([b, h, s, dc])
                    .swap_dims(0, 1)
                    .reshape([h, b * s, dc]);
                linear::matmul_few(o, &w_uv)
                    .reshape([h, b, s, dv])
                    .swap_dims(0, 1) // [b, h, s, dv]
            }
        };
        // [b, h, s, dv] -> [b, s, h·dv]
        linear::forward(&self.wo, o.swap_dims(1, 2).reshape([b, s, h * dv]))
    }
}
