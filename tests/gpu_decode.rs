//! The wgpu backend computes what the CPU reference computes, in the shapes decoding uses:
//! a batched one-token step after a chunked prefill, same weights on both backends.
//!
//! Burn 0.21's kernel fusion got this wrong (every sequence in the second half of the batch,
//! errors ~0.3 in the logits; upstream tracel-ai/burn#5122 has the same signature), which is why
//! dsopt builds the GPU backends without fusion unless the `fusion` feature is asked for.
#![cfg(feature = "wgpu")]

use burn::module::Module;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use dsopt::nn::attention::{AttentionConfig, MlaImpl};
use dsopt::nn::DecoderConfig;

mod common;

type Cpu = burn::backend::Flex;
type Gpu = burn::backend::Wgpu;

fn ids<B: Backend>(b: usize, s: usize, salt: usize, dev: &B::Device) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = (0..b * s)
        .map(|i| ((i * 7 + salt * 13 + 3) % 64) as i64)
        .collect();
    Tensor::from_data(TensorData::new(v, [b, s]), dev)
}

/// Last-position logits `[b, vocab]` of (prefill `p` tokens in chunks of 4, then one decode
/// step) and of one uncached forward over the same `p + 1` tokens.
fn step_and_full<B: Backend>(
    cfg: &DecoderConfig,
    weights: Vec<u8>,
    dev: &B::Device,
    b: usize,
    p: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rec = BinBytesRecorder::<FullPrecisionSettings>::default()
        .load(weights, dev)
        .expect("weights");
    let m = cfg.init::<B>(dev).load_record(rec);
    let (prompt, next) = (ids::<B>(b, p, 0, dev), ids::<B>(b, 1, 5, dev));
    let mut c = m.new_cache(b, p + 4);
    let _ = m.prefill(prompt.clone(), &mut c, 4, |_| {});
    let step = m.decode_step(next.clone(), &mut c);
    let mut c2 = m.new_cache(b, p + 4);
    let full = m.prefill(Tensor::cat(vec![prompt, next], 1), &mut c2, 64, |_| {});
    let host = |t: Tensor<B, 3>| -> Vec<f32> { t.into_data().convert::<f32>().to_vec().unwrap() };
    (host(step), host(full))
}

/// Largest |difference| per sequence.
fn per_sequence(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    let v = a.len() / n;
    (0..n)
        .map(|i| {
            a[i * v..(i + 1) * v]
                .iter()
                .zip(&b[i * v..(i + 1) * v])
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max)
        })
        .collect()
}

fn check(cfg: DecoderConfig) {
    if !common::wgpu_available("gpu_decode") {
        return;
    }
    let cpu = Default::default();
    Cpu::seed(&cpu, 3);
    let m = cfg.init::<Cpu>(&cpu);
    // materialise the lazy parameters before recording them
    let _ = m.decode_step(ids::<Cpu>(1, 1, 0, &cpu), &mut m.new_cache(1, 2));
    let weights = BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(m.into_record(), ())
        .unwrap();
    let gpu = burn::backend::wgpu::WgpuDevice::DefaultDevice;
    for (b, p) in [(2, 8), (8, 5)] {
        let (cs, cf) = step_and_full::<Cpu>(&cfg, weights.clone(), &cpu, b, p);
        let (gs, gf) = step_and_full::<Gpu>(&cfg, weights.clone(), &gpu, b, p);
        for (what, x, y) in [
            ("cached step, wgpu vs flex", &gs, &cs),
            ("full forward, wgpu vs flex", &gf, &cf),
            ("wgpu cached step vs wgpu full forward", &gs, &gf),
        ] {
            let d = per_sequence(x, y, b);
            assert!(
                d.iter().all(|&e| e <= 1e-4),
                "{:?} batch {b} prompt {p}: {what}: max |diff| per sequence {d:?}",
                cfg.attention.kind
            );
        }
    }
}

fn small(attention: AttentionConfig) -> DecoderConfig {
    DecoderConfig {
        first_k_dense_replace: 0,
        first_dense_ffn_hidden: None,
        rms_norm_eps: dsopt::nn::model::default_rms_norm_eps(),
        vocab_size: 64,
        hidden: 64,
        n_layers: 2,
        ffn_hidden: 128,
        attention: AttentionConfig {
            key_block: 16,
            ..attention
        },
        moe: None,
    }
}

#[test]
fn batched_one_token_decode_on_wgpu_equals_the_cpu_reference_mha() {
    check(small(AttentionConfig::mha(4, 16)));
}

#[test]
fn batched_one_token_decode_on_wgpu_equals_the_cpu_reference_mla_absorbed() {
    let mut a = AttentionConfig::mha(4, 16);
    a.kind = dsopt::nn::AttentionKind::Mla;
    a.kv_lora_rank = 32;
    a.qk_nope_head_dim = 16;
    a.qk_rope_head_dim = 8;
    a.v_head_dim = 16;
    a.mla_impl = MlaImpl::Absorbed;
    check(small(a));
}
