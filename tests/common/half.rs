//! Half-precision equivalence on the CPU backend (flex), shared by `half_f16.rs` and
//! `half_bf16.rs`: Burn fixes a device's default float dtype at its first tensor, so each dtype
//! runs in its own test process.
//!
//! Tolerance (README, "半精度的容差"): max |Δ| ≤ 16 ε · max(1, max |reference|), ε = 2⁻¹⁰ (f16) or
//! 2⁻⁷ (bf16) — the bound the benchmarks' own equivalence criteria use.

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use dsopt::nn::attention::{AttentionConfig, AttentionKind, MlaImpl};
use dsopt::nn::model::{Decoder, DecoderConfig};

type B = Flex;

fn config(kind: AttentionKind, mla_impl: MlaImpl) -> DecoderConfig {
    let mut a = AttentionConfig::mha(4, 32);
    a.kind = kind;
    a.n_kv_heads = if kind == AttentionKind::Gqa { 2 } else { 4 };
    a.kv_lora_rank = 64;
    a.qk_nope_head_dim = 32;
    // key widths 32 (MHA, GQA), 64 (naive MLA: 32 + 32) and 96 (absorbed: 64 + 32), value
    // widths 32 and 64: multiples of 32, so bf16 on a CPU with AVX512_BF16 takes the attention's
    // bf16 dot products (`kernels::bf16dot`) at every variant
    a.qk_rope_head_dim = 32;
    a.v_head_dim = 32;
    a.mla_impl = mla_impl;
    a.key_block = 16;
    DecoderConfig {
        first_k_dense_replace: 0,
        first_dense_ffn_hidden: None,
        rms_norm_eps: dsopt::nn::model::default_rms_norm_eps(),
        vocab_size: 64,
        hidden: 128,
        n_layers: 2,
        ffn_hidden: 96,
        attention: a,
        moe: None,
    }
}

fn tokens(b: usize, s: usize, seed: i64) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = (0..(b * s) as i64)
        .map(|i| (i * 7 + seed * 13) % 64)
        .collect();
    Tensor::from_data(TensorData::new(v, [b, s]), &Default::default())
}

/// max |a - b| and the tolerance 16 ε · max(1, max |b|), in f32.
fn diff(a: Tensor<B, 3>, b: Tensor<B, 3>, eps: f32) -> (f32, f32) {
    let (a, b) = (
        a.cast(burn::tensor::DType::F32),
        b.cast(burn::tensor::DType::F32),
    );
    let scale: f32 = b.clone().abs().max().into_scalar();
    let d: f32 = (a - b).abs().max().into_scalar();
    (d, 16.0 * eps * scale.max(1.0))
}

/// Sets the device's dtype, then checks cached == full forward for every attention variant and
/// absorbed == naive MLA (prefill and decode steps), in that dtype.
pub fn check(dtype: dsopt::config::Dtype, eps: f32) {
    let dev = Default::default();
    dsopt::backend::use_float_dtype::<B>(&dev, dtype).expect("flex runs f16 and bf16");
    let variants = [
        (AttentionKind::Mha, MlaImpl::Absorbed),
        (AttentionKind::Gqa, MlaImpl::Absorbed),
        (AttentionKind::Mla, MlaImpl::Naive),
        (AttentionKind::Mla, MlaImpl::Absorbed),
    ];
    // batch 2 x 1 row per step: the kernels' decode paths (streaming products, fused attention)
    let (b, s) = (2, 12);
    for (kind, imp) in variants {
        <B as burn::tensor::backend::Backend>::seed(&dev, 7);
        let m: Decoder<B> = config(kind, imp).init(&dev);
        let toks = tokens(b, s, 1);
        let mut full_cache = m.new_cache(b, s);
        let full = m.logits(m.forward_hidden(toks.clone(), &mut full_cache));
        assert_eq!(full.dtype(), dtype_of(dtype));
        let mut cache = m.new_cache(b, s);
        for i in 0..s {
            let step = m.decode_step(toks.clone().slice([0..b, i..i + 1]), &mut cache);
            let want = full.clone().slice([0..b, i..i + 1, 0..64]);
            let (d, tol) = diff(step, want, eps);
            assert!(
                d <= tol,
                "{dtype:?} {kind:?}/{imp:?} position {i}: max |diff| {d} > {tol}"
            );
        }
    }
    <B as burn::tensor::backend::Backend>::seed(&dev, 8);
    let mut m: Decoder<B> = config(AttentionKind::Mla, MlaImpl::Naive).init(&dev);
    let run = |m: &Decoder<B>| {
        let mut cache = m.new_cache(b, s + 3);
        let mut outs = vec![m.prefill(tokens(b, s, 4), &mut cache, 5, |_| {})];
        for i in 0..3 {
            outs.push(m.decode_step(tokens(b, 1, 10 + i), &mut cache));
        }
        outs
    };
    let naive = run(&m);
    m.set_mla_impl(MlaImpl::Absorbed);
    let absorbed = run(&m);
    for (i, (n, a)) in naive.into_iter().zip(absorbed).enumerate() {
        let (d, tol) = diff(a, n, eps);
        assert!(
            d <= tol,
            "{dtype:?} absorbed vs naive, output {i}: max |diff| {d} > {tol}"
        );
    }
}

fn dtype_of(d: dsopt::config::Dtype) -> burn::tensor::DType {
    match d {
        dsopt::config::Dtype::F16 => burn::tensor::DType::F16,
        dsopt::config::Dtype::Bf16 => burn::tensor::DType::BF16,
        dsopt::config::Dtype::F32 => burn::tensor::DType::F32,
    }
}
