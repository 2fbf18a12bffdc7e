//! A small decoder-only transformer whose attention is chosen by configuration.
//!
//! `embed -> [RMSNorm -> attention -> + -> RMSNorm -> SwiGLU -> +] x L -> RMSNorm -> head`.
//! Every forward goes through the KV cache: a full forward is a prefill from position 0, and
//! prefill is done in chunks of query tokens so that no `[S, S]` matrix is ever built.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{backend::Backend, Int, Tensor};
use serde::{Deserialize, Serialize};

use super::attention::mha::MhaAttention;
use super::attention::mla::{MlaAttention, MlaImpl};
use super::attention::{Attention, AttentionConfig, AttentionKind, KvCache, LayerCache};
use super::ffn::SwiGlu;
use super::moe::{ExpertStore, HostExpert, LoadStats, MoeConfig, MoeLayer, MoeRouter};

/// 解码器配置。默认注意力是 MHA（FR-006）。
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// 词表大小。
    pub vocab_size: usize,
    /// 隐藏维度。
    pub hidden: usize,
    /// 层数。
    pub n_layers: usize,
    /// FFN 中间维度。
    pub ffn_hidden: usize,
    /// 注意力配置。
    pub attention: AttentionConfig,
    /// MoE 配置：`None` = 稠密 SwiGLU FFN（默认，FR-006）；`Some` = 每层 FFN 换成 DeepSeekMoE。
    #[serde(default)]
    pub moe: Option<MoeConfig>,
    /// 有 MoE 时，前几层仍用宽度 `ffn_hidden` 的稠密 FFN（config.json 的 `first_k_dense_replace`）。
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_k_dense_replace: usize,
    /// 前 `first_k_dense_replace` 层稠密 FFN 的宽度，与 `ffn_hidden` 不同时给出（SC-003 的稠密基线：
    /// 它们的 `ffn_hidden` 是替换 MoE 层的宽度，前几层仍是模型自己的稠密层）。
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_dense_ffn_hidden: Option<usize>,
    /// 各块与最终 RMSNorm 的 ε（config.json 的 `rms_norm_eps`；MLA 的潜向量 RMSNorm 总是 1e-6，与 transformers 相同）。
    #[serde(
        default = "default_rms_norm_eps",
        skip_serializing_if = "is_default_eps"
    )]
    pub rms_norm_eps: f64,
}

// the defaults are left out of serialised configurations, so that the keys of cached MTP
// checkpoints (a hash of the configuration) stay what they were
fn is_zero(v: &usize) -> bool {
    *v == 0
}

/// Whether `v` is [`default_rms_norm_eps`] (serialisation leaves it out).
pub fn is_default_eps(v: &f64) -> bool {
    *v == default_rms_norm_eps()
}

/// The ε of DeepSeek-V2/V3's RMSNorm (Moonlight uses 1e-5).
pub fn default_rms_norm_eps() -> f64 {
    1e-6
}

impl DecoderConfig {
    /// This configuration with the shape buckets of attention key blocks and MoE expert groups
    /// switched (on for backends that compile kernels per shape, see
    /// [`crate::backend::BackendContext::shape_buckets`]; the runner sets it once).
    pub fn with_shape_buckets(mut self, on: bool) -> Self {
        self.attention.shape_buckets = on;
        if let Some(moe) = self.moe.as_mut() {
            moe.shape_buckets = on;
        }
        self
    }

    /// Builds the model on `device` (parameters drawn from the backend's RNG; seed it first).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Decoder<B> {
        let d = self.hidden;
        Decoder {
            embed: EmbeddingConfig::new(self.vocab_size, d).init(device),
            layers: (0..self.n_layers)
                .map(|i| Block::for_layer(self, i, device))
                .collect(),
            norm: RmsNormConfig::new(d)
                .with_epsilon(self.rms_norm_eps)
                .init(device),
            head: LinearConfig::new(d, self.vocab_size)
                .with_bias(false)
                .init(device),
        }
    }

    /// Builds the model on `device` with every routed expert on the host instead: the device
    /// model has no routed expert parameters (they are never materialised there; Burn
    /// parameters are lazy), and `host[layer][expert]` holds their weights, drawn from the
    /// Flex RNG (seed it first). Layers are indexed as in the model (dense layers get an
    /// empty list).
    /// Builds the model on `device` without routed experts (none is materialised: Burn
    /// parameters are lazy); they come from an expert source at run time
    /// ([`Decoder::forward_hidden_streamed`]).
    pub fn init_without_routed_experts<B: Backend>(&self, device: &B::Device) -> Decoder<B> {
        let mut m = self.init::<B>(device);
        for l in m.layers.iter_mut() {
            if let Some(moe) = l.moe_mut() {
                moe.experts.clear();
            }
        }
        m
    }

    /// The model layers that have routed experts (MoE layers), in order.
    pub fn moe_layer_indices(&self) -> Vec<usize> {
        (0..self.n_layers)
            .filter(|&i| self.is_moe_layer(i))
            .collect()
    }

    pub fn init_offloaded<B: Backend>(
        &self,
        device: &B::Device,
    ) -> (Decoder<B>, Vec<Vec<HostExpert>>) {
        let mut m = self.init::<B>(device);
        let host_dev = Default::default();
        // host copies in the device's dtype: the bytes copied per miss are the bytes the device holds
        let dtype: burn::tensor::DType = burn::tensor::get_device_settings::<B>(device)
            .float_dtype
            .into();
        let host = m
            .layers
            .iter_mut()
            .map(|l| match (l.moe_mut(), &self.moe) {
                (Some(moe), Some(c)) => {
                    let n = moe.experts.len();
                    moe.experts.clear(); // lazy parameters: nothing was allocated
                    (0..n)
                        .map(|_| HostExpert {
                            weights: SwiGlu::<burn::backend::Flex>::new(
                                c.dim,
                                c.moe_inter_dim,
                                &host_dev,
                            )
                            .to_data()
                            .map(|d| d.convert_dtype(dtype)),
                        })
                        .collect()
                }
                _ => Vec::new(),
            })
            .collect();
        (m, host)
    }

    /// Parameter count (analytic; a test checks it against the module).
    pub fn params(&self) -> usize {
        let d = self.hidden;
        let attn = match self.attention.kind {
            AttentionKind::Mha | AttentionKind::Gqa => {
                MhaAttention::<burn::backend::Flex>::params(d, &self.attention)
            }
            AttentionKind::Mla => MlaAttention::<burn::backend::Flex>::params(d, &self.attention),
        };
        let ffn: usize = (0..self.n_layers)
            .map(|i| match &self.moe {
                Some(m) if self.is_moe_layer(i) => m.total_params(),
                _ => SwiGlu::<burn::backend::Flex>::params(d, self.dense_ffn_hidden(i)),
            })
            .sum();
        2 * self.vocab_size * d + self.n_layers * (attn + 2 * d) + ffn + d
    }

    /// Whether layer `i` has a MoE FFN (a MoE model's first `first_k_dense_replace` layers are
    /// dense).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe.is_some() && i >= self.first_k_dense_replace
    }

    /// The width of layer `i`'s FFN when it is dense.
    pub fn dense_ffn_hidden(&self, i: usize) -> usize {
        match self.first_dense_ffn_hidden {
            Some(w) if i < self.first_k_dense_replace => w,
            _ => self.ffn_hidden,
        }
    }

    /// KV-cache bytes for `batch` sequences of `capacity` tokens at `elem_bytes` per element.
    pub fn kv_cache_bytes(&self, batch: usize, capacity: usize, elem_bytes: usize) -> u64 {
        (self.n_layers * batch * capacity * self.attention.kv_elements_per_token() * elem_bytes)
            as u64
    }
}

/// 前馈层：稠密 SwiGLU 或 DeepSeekMoE。
// one value per layer: the variants' size difference costs nothing, and Burn derives `Module`
// for the enum as it is
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Ffn<B: Backend> {
    /// 稠密 SwiGLU。
    Dense(SwiGlu<B>),
    /// DeepSeekMoE（路由专家 + 共享专家）。
    Moe(MoeLayer<B>),
}

/// 一个 pre-norm 解码块。
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    attn_norm: RmsNorm<B>,
    attn: Attention<B>,
    ffn_norm: RmsNorm<B>,
    ffn: Ffn<B>,
}

impl<B: Backend> Block<B> {
    /// A block with the attention and FFN of `c`, MoE when `c` has one (the MTP modules).
    pub fn new(c: &DecoderConfig, device: &B::Device) -> Self {
        Self::build(c, c.moe.is_some(), c.ffn_hidden, device)
    }

    /// The block of layer `i` of `c` (dense before `first_k_dense_replace`).
    pub fn for_layer(c: &DecoderConfig, i: usize, device: &B::Device) -> Self {
        Self::build(c, c.is_moe_layer(i), c.dense_ffn_hidden(i), device)
    }

    fn build(c: &DecoderConfig, moe: bool, dense_width: usize, device: &B::Device) -> Self {
        let d = c.hidden;
        let norm = || {
            RmsNormConfig::new(d)
                .with_epsilon(c.rms_norm_eps)
                .init(device)
        };
        Block {
            attn_norm: norm(),
            attn: c.attention.init(d, device),
            ffn_norm: norm(),
            ffn: match (&c.moe, moe) {
                (Some(m), true) => Ffn::Moe(m.init(device)),
                _ => Ffn::Dense(SwiGlu::new(d, dense_width, device)),
            },
        }
    }

    /// A block from its parts (a loaded checkpoint).
    pub fn from_parts(
        attn_norm: RmsNorm<B>,
        attn: Attention<B>,
        ffn_norm: RmsNorm<B>,
        ffn: Ffn<B>,
    ) -> Self {
        Block {
            attn_norm,
            attn,
            ffn_norm,
            ffn,
        }
    }

    /// This block's MoE layer, if its FFN is one.
    pub fn moe(&self) -> Option<&MoeLayer<B>> {
        match &self.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        }
    }

    /// [`Block::moe`], mutable.
    pub fn moe_mut(&mut self) -> Option<&mut MoeLayer<B>> {
        match &mut self.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        }
    }

    /// An empty cache layer for this block's attention.
    pub fn new_cache(&self, batch: usize, capacity: usize, device: &B::Device) -> LayerCache<B> {
        match &self.attn {
            Attention::Mha(a) => a.new_cache(batch, capacity, device),
            Attention::Mla(a) => a.new_cache(batch, capacity, device),
        }
    }

    /// Switches an MLA attention between naive and absorbed (same weights).
    pub fn set_mla_impl(&mut self, i: MlaImpl) {
        if let Attention::Mla(m) = &mut self.attn {
            m.set_implementation(i);
        }
    }

    /// `x + attn(norm(x))`, then `+ ffn(norm(.))`; sequence `i` at positions `starts[i]..`.
    ///
    /// # Shapes
    /// `x: [b, s, d] -> [b, s, d]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        starts: &[usize],
        lc: &mut LayerCache<B>,
        stats: Option<&mut Vec<LoadStats>>,
    ) -> Tensor<B, 3> {
        self.forward_with(x, starts, lc, stats, Experts::Own)
            .expect("a layer's own experts do not fail")
    }

    /// [`Block::forward`]; an MoE FFN takes its routed experts from `experts` (its own, a
    /// device store's cache, or a streamed source). Only a streamed source can fail (a read or
    /// checksum error).
    fn forward_with(
        &self,
        x: Tensor<B, 3>,
        starts: &[usize],
        lc: &mut LayerCache<B>,
        stats: Option<&mut Vec<LoadStats>>,
        experts: Experts<'_, B>,
    ) -> anyhow::Result<Tensor<B, 3>> {
        let h = super::rms_norm(&self.attn_norm, x.clone());
        let a = match &self.attn {
            Attention::Mha(m) => m.forward(h, starts, lc),
            Attention::Mla(m) => m.forward(h, starts, lc),
        };
        let x = super::add(x, a);
        let h = super::rms_norm(&self.ffn_norm, x.clone());
        let f = match &self.ffn {
            Ffn::Dense(ffn) => ffn.forward(h),
            Ffn::Moe(moe) => {
                // tokens of every sequence routed together: [b, s, d] -> [b·s, d]
                let [b, s, d] = h.dims();
                let h = h.reshape([b * s, d]);
                let (y, routing) = match experts {
                    Experts::Device(o) => moe.forward_offloaded(h, o.layer, o.store, o.next),
                    Experts::Streamed { src, layer, next } => {
                        moe.forward_streamed(h, layer, src, next)?
                    }
                    Experts::Own => moe.forward(h),
                };
                if let Some(st) = stats {
                    st.push(routing.load);
                }
                y.reshape([b, s, d])
            }
        };
        Ok(super::add(x, f))
    }
}

/// Where an MoE block's routed experts come from.
enum Experts<'a, B: Backend> {
    /// The layer's own.
    Own,
    /// A device store's cache (experts on the host).
    Device(Offload<'a, B>),
    /// A streamed source (experts on storage, or all in memory), this block's index and the
    /// next MoE block's index and router.
    Streamed {
        src: &'a mut dyn crate::nn::moe::ExpertSource,
        layer: usize,
        next: Option<(usize, &'a MoeRouter<B>)>,
    },
}

/// The offload context of one block: the expert store, this block's index, and the next MoE
/// block's index and router (for prefetching).
struct Offload<'a, B: Backend> {
    store: &'a mut ExpertStore<B>,
    layer: usize,
    next: Option<(usize, &'a MoeRouter<B>)>,
}

/// 解码器模型。
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    embed: Embedding<B>,
    layers: Vec<Block<B>>,
    norm: RmsNorm<B>,
    head: Linear<B>,
}

impl<B: Backend> Decoder<B> {
    /// A model from its parts (a loaded checkpoint).
    pub fn from_parts(
        embed: Embedding<B>,
        layers: Vec<Block<B>>,
        norm: RmsNorm<B>,
        head: Linear<B>,
    ) -> Self {
        Decoder {
            embed,
            layers,
            norm,
            head,
        }
    }

    /// An empty KV cache of `capacity` tokens for `batch` sequences (allocated now, in full).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache<B> {
        let device = self.head.weight.device();
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| l.new_cache(batch, capacity, &device))
                .collect(),
            len: 0,
            capacity,
            batch,
        }
    }

    /// Switches every MLA layer between naive and absorbed (same weights; make a new cache).
    pub fn set_mla_impl(&mut self, i: MlaImpl) {
        for l in &mut self.layers {
            l.set_mla_impl(i);
        }
    }

    /// Hidden states after the final norm for `tokens` at positions `cache.len..`; appends to the cache.
    ///
    /// # Shapes
    /// `tokens: [b, s] -> [b, s, hidden]`
    pub fn forward_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        self.forward_hidden_stats(tokens, cache, None)
    }

    /// [`Decoder::forward_hidden`], also collecting each MoE layer's routing load statistics.
    pub fn forward_hidden_stats(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        stats: Option<&mut Vec<LoadStats>>,
    ) -> Tensor<B, 3> {
        let [b, s] = tokens.dims();
        let starts = vec![cache.len; b];
        let x = self.forward_trunk(tokens, cache, &starts, stats);
        cache.len += s;
        super::rms_norm(&self.norm, x)
    }

    /// The residual stream after the last block, before the final norm, for `tokens` `[b, s]`
    /// with sequence `i` at positions `starts[i]..starts[i]+s` (each sequence may have its own
    /// length, as in batched speculative decoding). Writes the K/V of those positions into the
    /// cache; `cache.len` is left to the caller.
    ///
    /// # Shapes
    /// `tokens: [b, s] -> [b, s, hidden]`
    pub fn forward_trunk(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        starts: &[usize],
        mut stats: Option<&mut Vec<LoadStats>>,
    ) -> Tensor<B, 3> {
        let mut x = self.embed.forward(tokens);
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, starts, lc, stats.as_deref_mut());
        }
        x
    }

    /// [`Decoder::forward_hidden`] for a model whose routed experts were moved to the host
    /// ([`DecoderConfig::init_offloaded`]): they come from `store`'s device cache.
    pub fn forward_hidden_offloaded(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        store: &mut ExpertStore<B>,
    ) -> Tensor<B, 3> {
        let [b, s] = tokens.dims();
        let starts = vec![cache.len; b];
        let mut x = self.embed.forward(tokens);
        for (i, (layer, lc)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let next = self.next_moe(i);
            let o = Offload {
                store: &mut *store,
                layer: i,
                next,
            };
            x = layer
                .forward_with(x, &starts, lc, None, Experts::Device(o))
                .expect("a device store does not fail");
        }
        cache.len += s;
        super::rms_norm(&self.norm, x)
    }

    /// The MoE layer after layer `i`: its index and router (what prefetching predicts for).
    fn next_moe(&self, i: usize) -> Option<(usize, &MoeRouter<B>)> {
        self.layers
            .iter()
            .enumerate()
            .skip(i + 1)
            .find_map(|(j, l)| l.moe().map(|m| (j, &m.router)))
    }

    /// [`Decoder::forward_hidden`] for a model built without routed experts
    /// ([`DecoderConfig::init_without_routed_experts`]) whose experts come from `src` as each
    /// MoE layer reaches them (CPU backend: storage behind a cache, or all in memory). An error
    /// is a read or checksum failure of the source.
    pub fn forward_hidden_streamed(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        src: &mut dyn crate::nn::moe::ExpertSource,
    ) -> anyhow::Result<Tensor<B, 3>> {
        let [b, s] = tokens.dims();
        let starts = vec![cache.len; b];
        let mut x = self.embed.forward(tokens);
        for (i, (layer, lc)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let experts = Experts::Streamed {
                src: &mut *src,
                layer: i,
                next: self.next_moe(i),
            };
            x = layer.forward_with(x, &starts, lc, None, experts)?;
        }
        cache.len += s;
        Ok(super::rms_norm(&self.norm, x))
    }

    /// Takes every MoE layer's routed experts off the model, read back to the host
    /// (`[layer][expert]`, empty for a dense layer): the host side of an [`ExpertStore`] over a
    /// loaded model's own weights. [`Decoder::set_routed_experts`] puts them back.
    pub fn take_routed_experts(&mut self) -> Vec<Vec<HostExpert>> {
        self.layers
            .iter_mut()
            .map(|l| match l.moe_mut() {
                Some(m) => std::mem::take(&mut m.experts)
                    .iter()
                    .map(|e| HostExpert {
                        weights: e.to_data(),
                    })
                    .collect(),
                None => Vec::new(),
            })
            .collect()
    }

    /// Gives every MoE layer the routed experts `experts[layer]` (the resident twin of an
    /// offloaded model).
    pub fn set_routed_experts(&mut self, experts: Vec<Vec<SwiGlu<B>>>) {
        for (l, e) in self.layers.iter_mut().zip(experts) {
            if let Some(m) = l.moe_mut() {
                m.experts = e;
            }
        }
    }

    /// The final RMSNorm (before the output head). `[b, s, d] -> [b, s, d]`
    pub fn final_norm(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        super::rms_norm(&self.norm, x)
    }

    /// Token embeddings (shared with the MTP modules). `[b, s] -> [b, s, d]`
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.embed.forward(tokens)
    }

    /// The device the model's parameters live on.
    pub fn device(&self) -> B::Device {
        self.head.weight.device()
    }

    /// Logits for hidden states. `[b, s, hidden] -> [b, s, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        super::linear::forward(&self.head, hidden)
    }

    /// Prefill `tokens` `[b, s]` in query chunks of `chunk` tokens; returns the last position's
    /// logits `[b, 1, vocab]` (`[b, 0, vocab]` for an empty prompt). `each_chunk` is called after every chunk (memory checkpoints).
    pub fn prefill(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut KvCache<B>,
        chunk: usize,
        mut each_chunk: impl FnMut(usize),
    ) -> Tensor<B, 3> {
        let [b, s] = tokens.dims();
        let chunk = chunk.max(1);
        let mut last = None;
        let mut i = 0;
        while i < s {
            let e = (i + chunk).min(s);
            let h = self.forward_hidden(tokens.clone().slice([0..b, i..e]), cache);
            let d = h.dims()[2];
            last = Some(h.slice([0..b, e - i - 1..e - i, 0..d]));
            each_chunk(e);
            i = e;
        }
        let last = last.unwrap_or_else(|| {
            let d = self.head.weight.dims()[0];
            Tensor::zeros([b, 0, d], &self.device())
        });
        self.logits(last)
    }

    /// One decode step for `tokens` `[b, 1]`; returns logits `[b, 1, vocab]`.
    pub fn decode_step(&self, tokens: Tensor<B, 2, Int>, cache: &mut KvCache<B>) -> Tensor<B, 3> {
        let h = self.forward_hidden(tokens, cache);
        self.logits(h)
    }
}
