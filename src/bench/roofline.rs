//! 屋顶线（roofline）：本机/本设备的实测上限（读带宽、GEMM 吞吐），以及每个变体每 token
//! 读多少字节、做多少浮点运算——报告里每个速度都和它所对的上限放在一起。
//!
//! Limits are measured in the run that uses them (a second or two on the CPU), never looked up:
//! - read bandwidth: on the CPU backend a plain streaming read of a host buffer much larger than
//!   the last cache level, on every thread (not the backend's own matmul, which would make the
//!   fraction self-referential); on a GPU backend a device reduction (`sum`) over a large
//!   tensor, which reads every byte once;
//! - GEMM throughput: a square matmul with the selected backend in the run's dtype.
//!
//! Bytes and FLOPs per token are analytic, from the model configuration; a unit test checks them
//! against the sizes of the real parameter and cache tensors.

use std::time::Instant;

use burn::tensor::{backend::Backend, Distribution, Int, Tensor};
use rayon::prelude::*;
use serde::Serialize;

use crate::backend::BackendContext;
use crate::nn::attention::{AttentionKind, MlaImpl};
use crate::nn::model::{Decoder, DecoderConfig};

/// 实测上限。
#[derive(Debug, Clone, Serialize, Default)]
pub struct Limits {
    /// 读带宽 GB/s（10^9 字节每秒）；未测为 None。
    pub read_gb_per_s: Option<f64>,
    /// 读带宽怎么测的。
    pub read_method: String,
    /// GEMM 吞吐 GFLOP/s；未测为 None。
    pub gemm_gflop_per_s: Option<f64>,
    /// GEMM 的规模与数值类型。
    pub gemm_method: String,
}

impl Limits {
    /// One line for the report's notes.
    pub fn note(&self) -> String {
        let f = |x: Option<f64>, unit: &str| {
            x.map(|v| format!("{v:.1} {unit}"))
                .unwrap_or_else(|| "not measured".into())
        };
        format!(
            "roofline limits measured in this run: read {} ({}); GEMM {} ({})",
            f(self.read_gb_per_s, "GB/s"),
            self.read_method,
            f(self.gemm_gflop_per_s, "GFLOP/s"),
            self.gemm_method
        )
    }
}

impl Limits {
    /// Measures the read bandwidth again (at the end of a run) and keeps the better of the two:
    /// on a shared machine one measurement can land in a slow spell (52 vs 83 GB/s seen here
    /// between runs), and a limit set too low makes a speed look like more than 100 % of it.
    pub fn remeasure_read<B: Backend>(&mut self, ctx: &BackendContext<B>) {
        let again = measure_read(ctx).0;
        if let Some(g) = again {
            if self.read_gb_per_s.is_none_or(|r| g > r) {
                self.read_gb_per_s = Some(g);
            }
            self.read_method = format!(
                "{}; best of the start and the end of the run",
                self.read_method
            );
        }
    }
}

/// The read-bandwidth measurement of [`measure`]: GB/s and how it was measured.
fn measure_read<B: Backend>(ctx: &BackendContext<B>) -> (Option<f64>, String) {
    let (read_bytes, _) = sizes(ctx);
    if ctx.pool.is_none() {
        let threads = rayon::current_num_threads();
        (
            host_read_gb_per_s(read_bytes, threads),
            format!(
                "streaming read of a {} MiB host buffer on {threads} threads ({})",
                read_bytes >> 20,
                last_level_cache_bytes()
                    .map(|l| format!(
                        "at least 4x the {} MiB last-level cache and 512 MiB",
                        l >> 20
                    ))
                    .unwrap_or_else(|| "last-level cache size unknown: 512 MiB".into())
            ),
        )
    } else {
        (
            device_read_gb_per_s::<B>(read_bytes, &ctx.device),
            format!("device sum over a {} MiB tensor (f32)", read_bytes >> 20),
        )
    }
}

/// The size of the largest CPU cache (the last level), read from Linux's sysfs
/// (`/sys/devices/system/cpu/cpu0/cache/index*/size`); `None` where it cannot be read.
pub fn last_level_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|e| {
        let text = std::fs::read_to_string(e.ok()?.path().join("size")).ok()?;
        parse_cache_size(text.trim())
    })
    .max()
}

/// `"32K"`, `"1024K"`, `"300M"` or a plain byte count as bytes.
fn parse_cache_size(t: &str) -> Option<usize> {
    let (num, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let n: usize = num.parse().ok()?;
    match unit.trim() {
        "" => Some(n),
        "K" | "KB" | "KiB" => Some(n << 10),
        "M" | "MB" | "MiB" => Some(n << 20),
        "G" | "GB" | "GiB" => Some(n << 30),
        _ => None,
    }
}

/// The streaming read limit's buffer on the host: at least 512 MiB and at least 4x the
/// last-level cache (a 300 MiB L3 would hold a good part of a 512 MiB buffer and make the
/// "memory" rate a cache rate).
pub fn host_stream_bytes(llc: Option<usize>) -> usize {
    (512usize << 20).max(llc.unwrap_or(0).saturating_mul(4))
}

/// Sizes of the limit measurements: large on real hardware, small on lavapipe (wgpu on the
/// CPU, where the figure only exercises the code path).
fn sizes<B: Backend>(ctx: &BackendContext<B>) -> (usize, usize) {
    use crate::backend::{AdapterType, BackendKind};
    match ctx.selected.kind {
        BackendKind::Flex => (host_stream_bytes(last_level_cache_bytes()), 2048),
        BackendKind::Cuda => (2 << 30, 8192),
        BackendKind::Wgpu if ctx.selected.wgpu_adapter == Some(AdapterType::Cpu) => (64 << 20, 256),
        BackendKind::Wgpu => (1 << 30, 4096),
    }
}

/// Measures the limits for this backend (best of a few repetitions, after one warm-up).
pub fn measure<B: Backend>(ctx: &BackendContext<B>) -> Limits {
    let (_, n) = sizes(ctx);
    let dev = &ctx.device;
    let (read, read_method) = measure_read(ctx);
    let a = Tensor::<B, 2>::random([n, n], Distribution::Uniform(-1.0, 1.0), dev);
    let b = Tensor::<B, 2>::random([n, n], Distribution::Uniform(-1.0, 1.0), dev);
    let dtype = a.dtype();
    let mut best = f64::INFINITY;
    for i in 0..4 {
        let _ = B::sync(dev);
        let t = Instant::now();
        let c = a.clone().matmul(b.clone());
        let _ = B::sync(dev);
        drop(c);
        if i > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    let flops = 2.0 * (n as f64).powi(3);
    Limits {
        read_gb_per_s: read,
        read_method,
        gemm_gflop_per_s: (best.is_finite() && best > 0.0).then(|| flops / best / 1e9),
        gemm_method: format!("{n} x {n} x {n} matmul, {dtype:?}, best of 3 after a warm-up"),
    }
}

/// Read bandwidth for a working set of `bytes` read again and again (a decode step's weights
/// and cache): on the CPU backend a host buffer of that size, read like [`host_read_gb_per_s`],
/// so where it fits in the caches this is the caches' rate, not memory's. `None` on device-pool
/// backends, where a reduction that small measures the launch latency rather than bandwidth.
pub fn working_set_read_gb_per_s<B: Backend>(ctx: &BackendContext<B>, bytes: usize) -> Option<f64> {
    if ctx.pool.is_some() {
        return None;
    }
    host_read_gb_per_s(bytes, rayon::current_num_threads())
}

/// Streaming read bandwidth of host memory: every thread sums its share of a buffer (written
/// first, so every page is really mapped); best of 10 after one warm-up pass (a shared machine
/// gives single passes anywhere from 45 to 66 GB/s here; the best pass is the limit).
pub fn host_read_gb_per_s(bytes: usize, threads: usize) -> Option<f64> {
    let words = bytes / 8;
    if words == 0 || threads == 0 {
        return None;
    }
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut best = f64::INFINITY;
    let mut check = 0u64;
    for i in 0..11 {
        let t = Instant::now();
        // on the rayon pool the CPU backend computes on: separate threads would compete with
        // its workers, which spin for a while after each operation
        let total: u64 = buf
            .par_chunks(chunk)
            .map(|c| crate::kernels::reduce::sum_words(crate::kernels::Level::detected(), c))
            .reduce(|| 0, u64::wrapping_add);
        let dt = t.elapsed().as_secs_f64();
        check = check.wrapping_add(total);
        if i > 0 {
            best = best.min(dt);
        }
    }
    std::hint::black_box(check);
    (best.is_finite() && best > 0.0).then(|| (words * 8) as f64 / best / 1e9)
}

/// Device read bandwidth: a reduction that reads the whole tensor once.
fn device_read_gb_per_s<B: Backend>(bytes: usize, dev: &B::Device) -> Option<f64> {
    let n = bytes / 4;
    let x = Tensor::<B, 1>::ones([n], (dev, burn::tensor::DType::F32));
    let mut best = f64::INFINITY;
    for i in 0..4 {
        let _ = B::sync(dev);
        let t = Instant::now();
        let s = x.clone().sum();
        let _ = s.into_data();
        if i > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    (best.is_finite() && best > 0.0).then(|| (n * 4) as f64 / best / 1e9)
}

/// 一次解码步（每个序列一个新 token）或一次预填充要搬运的字节与浮点运算（解析值）。
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Traffic {
    /// 读的权重字节（每步一次，整批共用；词嵌入只读用到的行）。
    pub weight_bytes: f64,
    /// 读的 KV 缓存字节（整批）。
    pub kv_bytes: f64,
    /// 浮点运算（整批）。
    pub flops: f64,
}

impl Traffic {
    /// Weights + cache.
    pub fn bytes(&self) -> f64 {
        self.weight_bytes + self.kv_bytes
    }
}

/// Parameters that a token's forward multiplies by (every linear layer: attention, FFN, head),
/// i.e. all parameters but the embedding table and the norm scales.
pub fn matmul_params(c: &DecoderConfig) -> usize {
    let norms = c.n_layers * 2 * c.hidden + c.hidden + mla_norms(c);
    c.params() - c.vocab_size * c.hidden - norms
}

/// The RMSNorm scales inside MLA (latent, and the query latent when queries are compressed).
fn mla_norms(c: &DecoderConfig) -> usize {
    let a = &c.attention;
    if a.kind == AttentionKind::Mla {
        c.n_layers * (a.kv_lora_rank + a.q_lora_rank)
    } else {
        0
    }
}

/// Attention FLOPs of one query row (one head) against `keys` keys, by variant: MHA/GQA
/// `2·d·L` (scores) + `2·d·L` (values); naive MLA `2·(d_nope+d_r)·L + 2·d_v·L`; absorbed MLA
/// scores over the 576-wide latent `2·(d_c+d_r)·L` and values in the latent `2·d_c·L`.
fn attention_flops_per_head(c: &DecoderConfig, keys: f64) -> f64 {
    let a = &c.attention;
    let per_key = match (a.kind, a.mla_impl) {
        (AttentionKind::Mha | AttentionKind::Gqa, _) => 4 * a.head_dim,
        (AttentionKind::Mla, MlaImpl::Naive) => {
            2 * (a.qk_nope_head_dim + a.qk_rope_head_dim) + 2 * a.v_head_dim
        }
        (AttentionKind::Mla, MlaImpl::Absorbed) => {
            2 * (a.kv_lora_rank + a.qk_rope_head_dim) + 2 * a.kv_lora_rank
        }
    };
    per_key as f64 * keys
}

/// One decode step of `batch` sequences, each attending over `context` cached positions
/// (the new token included), with `eb` bytes per element.
pub fn decode_step(c: &DecoderConfig, batch: usize, context: usize, eb: usize) -> Traffic {
    let w = matmul_params(c);
    let kv_elems = c.attention.kv_elements_per_token() * c.n_layers;
    let attn =
        attention_flops_per_head(c, context as f64) * (c.attention.n_heads * c.n_layers) as f64;
    Traffic {
        weight_bytes: ((w + batch * c.hidden) * eb) as f64,
        kv_bytes: (batch * context * kv_elems * eb) as f64,
        flops: batch as f64 * (2.0 * w as f64 + attn),
    }
}

/// `x / limit`, `None` unless both are known and the limit is positive.
pub fn fraction(x: Option<f64>, limit: Option<f64>) -> Option<f64> {
    x.zip(limit.filter(|l| *l > 0.0)).map(|(x, l)| x / l)
}

/// A decode step's roofline metrics: its bytes and FLOPs, the rate it read at (`gbps`, from the
/// measured step time), and that rate as fractions of the streaming read limit and of the read
/// rate of a working set the step's size (`ws`).
pub fn decode_metrics(
    step: &Traffic,
    gbps: Option<f64>,
    limits: &Limits,
    ws: Option<f64>,
) -> [(&'static str, Option<f64>); 7] {
    [
        ("decode_bytes_per_step", Some(step.bytes())),
        ("decode_flops_per_step", Some(step.flops)),
        ("decode_gb_per_s", gbps),
        ("limit_read_gb_per_s", limits.read_gb_per_s),
        (
            "decode_read_bandwidth_fraction",
            fraction(gbps, limits.read_gb_per_s),
        ),
        ("limit_working_set_read_gb_per_s", ws),
        ("decode_working_set_read_fraction", fraction(gbps, ws)),
    ]
}

/// One decode step of a model with MoE layers, whose `batch` tokens touched `touched` distinct
/// routed experts per MoE layer on average (measured): the weights read are every dense
/// parameter, the shared experts and routers, and only the touched routed experts; the FLOPs are
/// each token's own top-k experts. For a model without MoE layers, [`decode_step`].
pub fn moe_decode_step(
    c: &DecoderConfig,
    batch: usize,
    context: usize,
    eb: usize,
    touched: f64,
) -> Traffic {
    let plain = decode_step(c, batch, context, eb);
    let Some(m) = &c.moe else {
        return plain;
    };
    let moe_layers = (0..c.n_layers).filter(|&i| c.is_moe_layer(i)).count() as f64;
    let n = m.router.n_routed_experts as f64;
    let k = m.router.num_experts_per_tok as f64;
    let expert = (3 * m.dim * m.moe_inter_dim) as f64;
    let untouched = (n - touched.clamp(0.0, n)) * expert * moe_layers;
    let not_computed = (n - k) * expert * moe_layers;
    Traffic {
        weight_bytes: plain.weight_bytes - untouched * eb as f64,
        kv_bytes: plain.kv_bytes,
        flops: plain.flops - batch as f64 * 2.0 * not_computed,
    }
}

/// Useful FLOPs of a causal prefill of `seq` tokens for `batch` sequences (the masked half of
/// the score blocks is not counted).
pub fn prefill_flops(c: &DecoderConfig, batch: usize, seq: usize) -> f64 {
    let w = matmul_params(c) as f64;
    let s = seq as f64;
    // token p attends to p + 1 keys: sum over p = s(s+1)/2
    let keys = s * (s + 1.0) / 2.0;
    let attn = attention_flops_per_head(c, keys) * (c.attention.n_heads * c.n_layers) as f64;
    batch as f64 * (2.0 * w * s + attn)
}

/// The mean number of distinct routed experts each MoE layer's router picks at one decode step
/// of `batch` tokens, over `steps` steps from an empty cache (one untimed pass); `None` for a
/// model without MoE layers.
pub fn experts_touched_per_step<B: Backend>(
    model: &Decoder<B>,
    step_ids: &[Tensor<B, 2, Int>],
    batch: usize,
    steps: usize,
) -> Option<f64> {
    let mut cache = model.new_cache(batch, steps);
    let (mut sum, mut n) = (0usize, 0usize);
    for x in step_ids {
        let mut st = Vec::new();
        let _ = model.forward_hidden_stats(x.clone(), &mut cache, Some(&mut st));
        for layer in &st {
            sum += layer.tokens_per_expert.iter().filter(|&&t| t > 0).count();
            n += 1;
        }
    }
    (n > 0).then(|| sum as f64 / n as f64)
}

/// Prefill FLOPs of `cfg` for `batch` x `seq` tokens, each token computing only its own top-k
/// routed experts in the MoE layers.
pub fn active_prefill_flops(cfg: &DecoderConfig, batch: usize, seq: usize) -> f64 {
    let all = prefill_flops(cfg, batch, seq);
    let Some(m) = &cfg.moe else {
        return all;
    };
    let moe_layers = (0..cfg.n_layers).filter(|&i| cfg.is_moe_layer(i)).count();
    let skipped = (m.router.n_routed_experts - m.router.num_experts_per_tok)
        * 3
        * m.dim
        * m.moe_inter_dim
        * moe_layers;
    all - 2.0 * (batch * seq * skipped) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::attention::AttentionConfig;
    use burn::backend::Flex;
    use burn::module::Module;

    fn cfg(kind: AttentionKind, imp: MlaImpl, q_lora: usize) -> DecoderConfig {
        let mut a = AttentionConfig::mha(4, 8);
        a.kind = kind;
        a.n_kv_heads = if kind == AttentionKind::Gqa { 2 } else { 4 };
        a.kv_lora_rank = 16;
        a.q_lora_rank = q_lora;
        a.qk_nope_head_dim = 8;
        a.qk_rope_head_dim = 4;
        a.v_head_dim = 6;
        a.mla_impl = imp;
        DecoderConfig {
            first_k_dense_replace: 0,
            first_dense_ffn_hidden: None,
            rms_norm_eps: crate::nn::model::default_rms_norm_eps(),
            vocab_size: 50,
            hidden: 32,
            n_layers: 2,
            ffn_hidden: 40,
            attention: a,
            moe: None,
        }
    }

    #[test]
    fn bytes_per_token_equal_the_real_tensor_sizes() {
        let dev = Default::default();
        for (kind, imp, q) in [
            (AttentionKind::Mha, MlaImpl::Absorbed, 0),
            (AttentionKind::Gqa, MlaImpl::Absorbed, 0),
            (AttentionKind::Mla, MlaImpl::Naive, 0),
            (AttentionKind::Mla, MlaImpl::Absorbed, 0),
            (AttentionKind::Mla, MlaImpl::Absorbed, 12),
        ] {
            let c = cfg(kind, imp, q);
            let model = c.init::<Flex>(&dev);
            // every parameter tensor, minus the embedding table and the norm scales (vectors)
            let total = model.num_params();
            assert_eq!(
                total,
                c.params(),
                "{kind:?} {imp:?}: params() vs the module"
            );
            let norms = 2 * c.n_layers * c.hidden + c.hidden + mla_norms(&c);
            assert_eq!(matmul_params(&c), total - c.vocab_size * c.hidden - norms);
            // the cache read per step: exactly the tensor bytes of a cache of that length
            let (batch, ctx) = (3, 10);
            let cache = model.new_cache(batch, ctx);
            let t = decode_step(&c, batch, ctx, 4);
            assert_eq!(t.kv_bytes as u64, cache.tensor_bytes(), "{kind:?} {imp:?}");
            assert_eq!(
                t.weight_bytes as usize,
                (matmul_params(&c) + batch * c.hidden) * 4
            );
        }
    }

    #[test]
    fn flops_scale_with_context_and_absorbed_does_more_attention_arithmetic() {
        let naive = cfg(AttentionKind::Mla, MlaImpl::Naive, 0);
        let abs = cfg(AttentionKind::Mla, MlaImpl::Absorbed, 0);
        let (a1, a2) = (decode_step(&abs, 1, 100, 4), decode_step(&abs, 1, 200, 4));
        let per_key = (a2.flops - a1.flops) / 100.0;
        // 4 heads x 2 layers x (2·(16+4) + 2·16)
        assert_eq!(per_key, (4 * 2 * (2 * 20 + 2 * 16)) as f64);
        let n1 = decode_step(&naive, 1, 100, 4);
        assert!(a1.flops > n1.flops && a1.kv_bytes < n1.kv_bytes);
        // prefill: linear part 2·w per token plus the causal triangle
        let w = matmul_params(&abs) as f64;
        let p = prefill_flops(&abs, 2, 3);
        assert_eq!(p, 2.0 * (2.0 * w * 3.0 + (4 * 2 * 72) as f64 * 6.0));
    }

    #[test]
    fn an_moe_step_reads_only_the_experts_it_touches() {
        use crate::nn::moe::{MoeConfig, RouterConfig, ScoreFunc, TopkMethod};
        let mut c = cfg(AttentionKind::Mha, MlaImpl::Naive, 0);
        let dense = decode_step(&c, 8, 16, 4);
        assert_eq!(
            moe_decode_step(&c, 8, 16, 4, 3.0),
            dense,
            "no MoE: the dense step"
        );
        c.moe = Some(MoeConfig {
            dim: c.hidden,
            moe_inter_dim: 16,
            n_shared_experts: 1,
            router: RouterConfig {
                n_routed_experts: 8,
                num_experts_per_tok: 2,
                score_func: ScoreFunc::Softmax,
                topk_method: TopkMethod::Greedy,
                n_group: 1,
                topk_group: 1,
                route_scale: 1.0,
                norm_topk_prob: false,
                bias_update_speed: 0.001,
            },
            shape_buckets: false,
        });
        c.first_k_dense_replace = 0;
        let all = decode_step(&c, 8, 16, 4);
        // touching every expert reads every weight; touching k computes the same FLOPs
        assert_eq!(
            moe_decode_step(&c, 8, 16, 4, 8.0).weight_bytes,
            all.weight_bytes
        );
        let two = moe_decode_step(&c, 8, 16, 4, 2.0);
        let expert = (3 * c.hidden * 16 * 4) as f64;
        let layers = c.n_layers as f64;
        assert_eq!(all.weight_bytes - two.weight_bytes, 6.0 * expert * layers);
        assert_eq!(
            all.flops - two.flops,
            8.0 * 2.0 * 6.0 * (3 * c.hidden * 16) as f64 * layers
        );
    }

    #[test]
    fn the_stream_buffer_outgrows_a_large_last_level_cache() {
        assert_eq!(parse_cache_size("32K"), Some(32 << 10));
        assert_eq!(parse_cache_size("300M"), Some(300 << 20));
        assert_eq!(parse_cache_size("4096"), Some(4096));
        assert_eq!(parse_cache_size("x"), None);
        assert_eq!(host_stream_bytes(None), 512 << 20);
        assert_eq!(host_stream_bytes(Some(32 << 20)), 512 << 20);
        assert_eq!(host_stream_bytes(Some(300 << 20)), 1200 << 20);
    }

    #[test]
    fn host_read_bandwidth_is_measured_and_positive() {
        let g = host_read_gb_per_s(8 << 20, 2).unwrap();
        assert!(g > 0.0 && g.is_finite(), "{g}");
        assert!(host_read_gb_per_s(0, 2).is_none());
    }
}

/// The streaming read limit at a few buffer sizes, on the pool and on one thread, by hand
/// (`cargo test --release --lib -- --ignored read_probe --nocapture`).
#[cfg(test)]
mod read_probe {
    #[test]
    #[ignore]
    fn read_probe() {
        for mb in [16usize, 64, 256, 512] {
            let a = super::host_read_gb_per_s(mb << 20, rayon::current_num_threads());
            let b = super::host_read_gb_per_s(mb << 20, 1);
            println!("{mb} MiB: pool {a:?} one thread {b:?}");
        }
    }
}
