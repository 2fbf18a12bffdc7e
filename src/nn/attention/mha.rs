//! Multi-head (MHA) and grouped-query (GQA) attention with a pre-sized KV cache.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{backend::Backend, Tensor};

use super::{append, blocked, cache_write, max_end, AttentionConfig, LayerCache};
use crate::nn::{linear, rope};

/// MHA / GQA：`n_kv_heads` 个 K/V 头，每 `n_heads / n_kv_heads` 个查询头共享一个。
#[derive(Module, Debug)]
pub struct MhaAttention<B: Backend> {
    wq: Linear<B>,
    wk: Linear<B>,
    wv: Linear<B>,
    wo: Linear<B>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    key_block: usize,
    shape_buckets: bool,
    /// RoPE 设定（基数与可选的 YaRN）；不是参数。
    #[module(skip)]
    rope: rope::Rope,
    scale: f64,
}

impl<B: Backend> MhaAttention<B> {
    /// New attention for hidden size `dim` (the public way: [`AttentionConfig::init`]).
    pub(super) fn new(dim: usize, c: &AttentionConfig, device: &B::Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let (h, g, d) = (c.n_heads, c.n_kv_heads, c.head_dim);
        MhaAttention {
            wq: lin(dim, h * d),
            wk: lin(dim, g * d),
            wv: lin(dim, g * d),
            wo: lin(h * d, dim),
            n_heads: h,
            n_kv_heads: g,
            head_dim: d,
            key_block: c.key_block,
            shape_buckets: c.shape_buckets,
            rope: c.rope(),
            scale: c.softmax_scale(d),
        }
    }

    /// Parameter count.
    pub fn params(dim: usize, c: &AttentionConfig) -> usize {
        dim * c.n_heads * c.head_dim * 2 + dim * c.n_kv_heads * c.head_dim * 2
    }

    /// An empty cache layer: K and V `[b, g, cap, d_h]`.
    pub fn new_cache(&self, batch: usize, capacity: usize, device: &B::Device) -> LayerCache<B> {
        let shape = [batch, self.n_kv_heads, capacity, self.head_dim];
        LayerCache {
            k: cache_write::zeros(shape, device),
            v: Some(cache_write::zeros(shape, device)),
            absorbed: None,
        }
    }

    /// Attends `x` to the cache after appending its K/V; sequence `i` sits at positions
    /// `starts[i]..starts[i]+s`.
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
        let (h, g, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let hpg = h / g; // query heads per K/V head
                         // [b, s, h*d] -> [b, h, s, d], rotated at absolute positions
        let q = linear::forward(&self.wq, x.clone())
            .reshape([b, s, h, d])
            .swap_dims(1, 2);
        let q = rope::apply4_scaled(q, starts, self.rope, self.scale as f32);
        let k = linear::forward(&self.wk, x.clone())
            .reshape([b, s, g, d])
            .swap_dims(1, 2);
        let k = rope::apply4(k, starts, self.rope);
        let v = linear::forward(&self.wv, x)
            .reshape([b, s, g, d])
            .swap_dims(1, 2);
        append(&mut cache.k, k, starts);
        // V is allocated with the cache ([`Self::new_cache`]); a cache made without it gets it here
        let cap = cache.k.dims()[2];
        let vc = cache
            .v
            .get_or_insert_with(|| cache_write::zeros([b, g, cap, d], &v.device()));
        append(vc, v, starts);
        // fold the heads of a group into rows: [b, h, s, d] -> [b, g, hpg*s, d]
        let q = q.reshape([b, g, hpg * s, d]);
        let o = blocked::attention(
            q,
            &cache.k,
            vc,
            d,
            starts,
            s,
            max_end(starts, s),
            self.key_block,
            self.shape_buckets,
        );
        // [b, g, hpg*s, d] -> [b, h, s, d] -> [b, s, h*d]
        let o = o
            .reshape([b, h, s, d])
            .swap_dims(1, 2)
            .reshape([b, s, h * d]);
        linear::forward(&self.wo, o)
    }
}
