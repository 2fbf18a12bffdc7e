//! Equivalence tests for the model: absorbed == naive MLA, cached decode == full forward,
//! chunked prefill == unchunked, analytic sizes == actual tensors.

use burn::backend::Flex;
use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use super::attention::{AttentionConfig, AttentionKind, MlaImpl};
use super::model::{Decoder, DecoderConfig};

type B = Flex;

fn config(kind: AttentionKind, mla_impl: MlaImpl) -> DecoderConfig {
    let mut a = AttentionConfig::mha(4, 8);
    a.kind = kind;
    a.n_kv_heads = if kind == AttentionKind::Gqa { 2 } else { 4 };
    a.kv_lora_rank = 16;
    a.qk_nope_head_dim = 8;
    a.qk_rope_head_dim = 4;
    a.v_head_dim = 6;
    a.mla_impl = mla_impl;
    a.key_block = 4;
    DecoderConfig {
        first_k_dense_replace: 0,
        first_dense_ffn_hidden: None,
        rms_norm_eps: crate::nn::model::default_rms_norm_eps(),
        vocab_size: 32,
        hidden: 32,
        n_layers: 2,
        ffn_hidden: 48,
        attention: a,
        moe: None,
    }
}

fn model(c: &DecoderConfig) -> Decoder<B> {
    let dev = Default::default();
    B::seed(&dev, 7);
    c.init(&dev)
}

fn tokens(b: usize, s: usize, seed: i64) -> Tensor<B, 2, Int> {
    let v: Vec<i64> = (0..(b * s) as i64)
        .map(|i| (i * 7 + seed * 13) % 32)
        .collect();
    Tensor::from_data(TensorData::new(v, [b, s]), &Default::default())
}

fn max_diff(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
    (a - b).abs().max().into_scalar()
}

const VARIANTS: [(AttentionKind, MlaImpl); 4] = [
    (AttentionKind::Mha, MlaImpl::Absorbed),
    (AttentionKind::Gqa, MlaImpl::Absorbed),
    (AttentionKind::Mla, MlaImpl::Naive),
    (AttentionKind::Mla, MlaImpl::Absorbed),
];

#[test]
fn cached_step_by_step_decode_equals_full_forward_for_every_variant() {
    let (b, s) = (2, 9);
    for (kind, imp) in VARIANTS {
        let c = config(kind, imp);
        let m = model(&c);
        let toks = tokens(b, s, 1);
        let mut full_cache = m.new_cache(b, s);
        let full = m.logits(m.forward_hidden(toks.clone(), &mut full_cache)); // [b, s, v]
        let mut cache = m.new_cache(b, s);
        for i in 0..s {
            let step = m.decode_step(toks.clone().slice([0..b, i..i + 1]), &mut cache);
            let want = full.clone().slice([0..b, i..i + 1, 0..32]);
            let d = max_diff(step, want);
            assert!(d < 1e-4, "{kind:?}/{imp:?} position {i}: max |diff| {d}");
        }
        assert_eq!(cache.len, s);
    }
}

#[test]
fn chunked_prefill_equals_unchunked() {
    let (b, s) = (1, 11);
    for (kind, imp) in VARIANTS {
        let c = config(kind, imp);
        let m = model(&c);
        let toks = tokens(b, s, 2);
        let mut c1 = m.new_cache(b, s + 2);
        let whole = m.prefill(toks.clone(), &mut c1, s, |_| {});
        let mut c2 = m.new_cache(b, s + 2);
        let mut seen = vec![];
        let chunked = m.prefill(toks.clone(), &mut c2, 3, |e| seen.push(e));
        assert_eq!(seen, vec![3, 6, 9, 11]);
        let d = max_diff(whole, chunked);
        assert!(d < 1e-4, "{kind:?}/{imp:?}: max |diff| {d}");
        // and decoding after either prefill gives the same next logits
        let next = tokens(b, 1, 3);
        let d = max_diff(
            m.decode_step(next.clone(), &mut c1),
            m.decode_step(next, &mut c2),
        );
        assert!(d < 1e-4, "{kind:?}/{imp:?} decode after prefill: {d}");
    }
}

#[test]
fn absorbed_mla_equals_naive_mla_on_the_same_weights() {
    let (b, s) = (2, 10);
    let c = config(AttentionKind::Mla, MlaImpl::Naive);
    let mut m = model(&c);
    let toks = tokens(b, s, 4);
    let run = |m: &Decoder<B>| {
        let mut cache = m.new_cache(b, s + 3);
        let p = m.prefill(toks.clone(), &mut cache, 4, |_| {});
        let mut outs = vec![p];
        for i in 0..3 {
            outs.push(m.decode_step(tokens(b, 1, 10 + i), &mut cache));
        }
        outs
    };
    let naive = run(&m);
    m.set_mla_impl(MlaImpl::Absorbed);
    let absorbed = run(&m);
    for (i, (n, a)) in naive.into_iter().zip(absorbed).enumerate() {
        let d = max_diff(n, a);
        assert!(d < 1e-4, "output {i}: max |diff| {d} (tolerance 1e-4)");
    }
}

#[test]
fn analytic_kv_bytes_match_the_cache_tensors() {
    for (kind, imp) in VARIANTS {
        let c = config(kind, imp);
        let m = model(&c);
        let cache = m.new_cache(3, 17);
        assert_eq!(
            cache.tensor_bytes(),
            c.kv_cache_bytes(3, 17, 4),
            "{kind:?}/{imp:?}"
        );
    }
    // and the published per-token figures: 16 heads x 128 -> MHA 4096, MLA 512 + 64 = 576
    let mut a = AttentionConfig::mha(16, 128);
    assert_eq!(a.kv_elements_per_token(), 4096);
    a.kind = AttentionKind::Mla;
    assert_eq!(a.kv_elements_per_token(), 576);
}

#[test]
fn analytic_params_match_the_module() {
    for (kind, imp) in VARIANTS {
        let c = config(kind, imp);
        assert_eq!(model(&c).num_params(), c.params(), "{kind:?}");
    }
    let mut c = config(AttentionKind::Mla, MlaImpl::Absorbed);
    c.attention.q_lora_rank = 12;
    assert_eq!(model(&c).num_params(), c.params(), "with query compression");
}

#[test]
fn query_compression_variant_is_also_equivalent() {
    let mut c = config(AttentionKind::Mla, MlaImpl::Naive);
    c.attention.q_lora_rank = 12;
    let mut m = model(&c);
    let toks = tokens(1, 6, 5);
    let mut c1 = m.new_cache(1, 6);
    let n = m.prefill(toks.clone(), &mut c1, 6, |_| {});
    m.set_mla_impl(MlaImpl::Absorbed);
    let mut c2 = m.new_cache(1, 6);
    let a = m.prefill(toks, &mut c2, 2, |_| {});
    assert!(max_diff(n, a) < 1e-4);
}

#[test]
fn synthetic_fill_sets_length_without_reallocating() {
    let c = config(AttentionKind::Mla, MlaImpl::Absorbed);
    let m = model(&c);
    let mut cache = m.new_cache(1, 20);
    let before = cache.tensor_bytes();
    cache.fill_synthetic(15, 0.01);
    assert_eq!(cache.len, 15);
    assert_eq!(cache.tensor_bytes(), before);
    let out = m.decode_step(tokens(1, 1, 6), &mut cache);
    assert_eq!(cache.len, 16);
    let v: Vec<f32> = out.into_data().to_vec().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}

#[test]
fn mha_is_the_default_attention() {
    assert_eq!(AttentionKind::default(), AttentionKind::Mha);
    assert_eq!(AttentionConfig::mha(4, 8).kind, AttentionKind::Mha);
}

#[test]
fn yarn_mscale() {
    assert_eq!(AttentionConfig::yarn_mscale(1.0, 0.707), 1.0);
    let m = AttentionConfig::yarn_mscale(40.0, 1.0);
    assert!((m - (0.1 * 40f64.ln() + 1.0)).abs() < 1e-12);
}

fn moe_config() -> DecoderConfig {
    use super::moe::{MoeConfig, RouterConfig, ScoreFunc, TopkMethod};
    let mut c = config(AttentionKind::Mha, MlaImpl::Absorbed);
    c.moe = Some(MoeConfig {
        dim: 32,
        moe_inter_dim: 8,
        n_shared_experts: 1,
        router: RouterConfig {
            n_routed_experts: 6,
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
    c
}

#[test]
fn moe_decoder_cached_decode_equals_full_forward_and_counts_params() {
    let c = moe_config();
    let m = model(&c);
    assert_eq!(m.num_params(), c.params());
    let (b, s) = (2, 6);
    let toks = tokens(b, s, 8);
    let mut full_cache = m.new_cache(b, s);
    let mut stats = Vec::new();
    let full = m.logits(m.forward_hidden_stats(toks.clone(), &mut full_cache, Some(&mut stats)));
    assert_eq!(stats.len(), 2, "one load record per MoE layer");
    assert_eq!(stats[0].tokens_per_expert.iter().sum::<usize>(), b * s * 2);
    let mut cache = m.new_cache(b, s);
    for i in 0..s {
        let step = m.decode_step(toks.clone().slice([0..b, i..i + 1]), &mut cache);
        let d = max_diff(step, full.clone().slice([0..b, i..i + 1, 0..32]));
        assert!(d < 1e-4, "position {i}: {d}");
    }
}

#[test]
fn a_cache_without_v_or_absorbed_weights_gets_them_on_first_use() {
    // V (MHA/GQA, naive MLA) and the absorbed weights (absorbed MLA) are made with the cache;
    // a cache that lacks them gets them at its first write, and computes the same logits
    for (kind, imp) in VARIANTS {
        let c = config(kind, imp);
        let m = model(&c);
        let ids = tokens(2, 5, 3);
        let mut full = m.new_cache(2, 8);
        let want = m.prefill(ids.clone(), &mut full, 2, |_| {});
        let mut bare = m.new_cache(2, 8);
        for l in &mut bare.layers {
            l.v = None;
            l.absorbed = None;
        }
        let got = m.prefill(ids, &mut bare, 2, |_| {});
        assert_eq!(max_diff(want, got), 0.0, "{kind:?} {imp:?}");
        assert_eq!(bare.tensor_bytes(), full.tensor_bytes(), "{kind:?} {imp:?}");
        assert_eq!(
            bare.absorbed_weight_bytes(),
            full.absorbed_weight_bytes(),
            "{kind:?} {imp:?}"
        );
    }
}

#[test]
fn prefill_of_an_empty_prompt_returns_no_logits() {
    let c = config(AttentionKind::Mha, MlaImpl::Absorbed);
    let m = model(&c);
    let mut cache = m.new_cache(2, 4);
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(Vec::<i64>::new(), [2, 0]),
        &Default::default(),
    );
    assert_eq!(m.prefill(ids, &mut cache, 2, |_| {}).dims(), [2, 0, 32]);
}

/// YaRN (DeepSeek-V3's rope_scaling, scaled down to the test's 4-wide RoPE and 8-token
/// original context) with query compression: absorbed == naive and cached == full forward
/// still hold, and YaRN does change the output (its frequencies and mscale² are used).
#[test]
fn yarn_with_query_compression_keeps_every_equivalence() {
    use super::rope::Yarn;
    let yarn = Yarn {
        factor: 40.0,
        original_max_position_embeddings: 8,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: Some(1.0),
        mscale_all_dim: Some(1.0),
    };
    let mut c = config(AttentionKind::Mla, MlaImpl::Naive);
    c.attention.q_lora_rank = 12;
    c.attention.rope_scaling = Some(yarn);
    let (b, s) = (2, 9);
    let toks = tokens(b, s, 3);
    let mut m = model(&c);
    let mut c1 = m.new_cache(b, s);
    let naive = m.prefill(toks.clone(), &mut c1, s, |_| {});
    m.set_mla_impl(MlaImpl::Absorbed);
    let mut c2 = m.new_cache(b, s);
    let absorbed = m.prefill(toks.clone(), &mut c2, 3, |_| {});
    assert!(max_diff(naive.clone(), absorbed.clone()) < 1e-4);
    // one token at a time
    let mut c3 = m.new_cache(b, s);
    let steps: Vec<Tensor<B, 3>> = (0..s)
        .map(|i| m.decode_step(toks.clone().slice([0..b, i..i + 1]), &mut c3))
        .collect();
    // prefill returns the last position's logits [b, 1, vocab]
    let stepped_last = steps.last().unwrap().clone();
    assert!(max_diff(absorbed.clone(), stepped_last) < 1e-4);
    // the same weights without YaRN give other logits
    let mut plain = c.clone();
    plain.attention.rope_scaling = None;
    let mut m2 = model(&plain);
    m2.set_mla_impl(MlaImpl::Absorbed);
    let mut c4 = m2.new_cache(b, s);
    let without = m2.prefill(toks, &mut c4, 3, |_| {});
    assert!(max_diff(absorbed, without) > 1e-3);
}

/// A decode-only run at `scenarios/sc001-mla.toml`'s dimensions for profiling by hand
/// (`DSOPT_PROFILE_DTYPE=bf16 DSOPT_PROFILE_KIND=mla perf record target/release/deps/dsopt-…
/// --ignored decode_profile`; one test per process: the device's dtype is set once).
#[test]
#[ignore]
fn decode_profile() {
    let dtype = match std::env::var("DSOPT_PROFILE_DTYPE").as_deref() {
        Ok("bf16") => crate::config::Dtype::Bf16,
        Ok("f16") => crate::config::Dtype::F16,
        _ => crate::config::Dtype::F32,
    };
    let dev = Default::default();
    crate::backend::use_float_dtype::<B>(&dev, dtype).unwrap();
    // DSOPT_PROFILE_KIND=mha or mla profiles one of the two alone
    let only = std::env::var("DSOPT_PROFILE_KIND").ok();
    for (kind, imp) in [
        (AttentionKind::Mha, MlaImpl::Absorbed),
        (AttentionKind::Mla, MlaImpl::Absorbed),
    ] {
        if only
            .as_deref()
            .is_some_and(|k| !format!("{kind:?}").eq_ignore_ascii_case(k))
        {
            continue;
        }
        let mut a = AttentionConfig::mha(16, 128);
        a.kind = kind;
        a.mla_impl = imp;
        a.kv_lora_rank = 512;
        a.qk_nope_head_dim = 128;
        a.qk_rope_head_dim = 64;
        a.v_head_dim = 128;
        let c = DecoderConfig {
            first_k_dense_replace: 0,
            first_dense_ffn_hidden: None,
            rms_norm_eps: crate::nn::model::default_rms_norm_eps(),
            vocab_size: 1024,
            hidden: 2048,
            n_layers: 1,
            ffn_hidden: 2048,
            attention: a,
            moe: None,
        };
        let m: Decoder<B> = c.init(&dev);
        let mut cache = m.new_cache(1, 8192 + 200);
        if std::env::var("DSOPT_PROFILE_PREFILL").is_ok() {
            let t = std::time::Instant::now();
            let _ = m
                .prefill(tokens(1, 8192, 5), &mut cache, 512, |_| {})
                .into_data();
            println!("prefill {:.2} s", t.elapsed().as_secs_f64());
        } else {
            cache.fill_synthetic(8192, 0.01);
        }
        let tok = tokens(1, 1, 3);
        let t = std::time::Instant::now();
        for _ in 0..32 {
            let _ = m.decode_step(tok.clone(), &mut cache).into_data();
        }
        println!(
            "first 32 steps: {:.3} ms per step",
            t.elapsed().as_secs_f64() * 1e3 / 32.0
        );
        let t = std::time::Instant::now();
        let n = 150;
        for _ in 0..n {
            let _ = m.decode_step(tok.clone(), &mut cache).into_data();
        }
        let dt = t.elapsed().as_secs_f64() / n as f64;
        println!(
            "{dtype:?} {kind:?}: {:.3} ms per step ({:.1} tok/s)",
            dt * 1e3,
            1.0 / dt
        );
    }
}

#[test]
fn experts_streamed_from_storage_equal_the_resident_model_through_evictions() {
    use super::ffn::SwiGlu;
    use super::moe::storage::{
        self, ExpertFileSpec, ExpertSource, ResidentExperts, StreamedExperts,
    };
    use std::sync::Arc;
    let c = moe_config(); // two MoE layers of 6 experts, top-2
    let dev = Default::default();
    let dir = tempfile::tempdir().unwrap();
    let spec = ExpertFileSpec {
        layers: c.moe_layer_indices(),
        n_experts: 6,
        dim: 32,
        inter: 8,
        dtype: crate::config::Dtype::F32,
        seed: 5,
        origin: None,
    };
    assert_eq!(spec.layers, [0, 1]);
    let (file, written) = storage::ensure(dir.path(), &spec, false, false).unwrap();
    assert!(written.is_some());
    let file = Arc::new(file);
    B::seed(&dev, 3);
    let m = c.init_without_routed_experts::<B>(&dev);
    let (b, p, steps) = (3, 4, 3);
    let ids = tokens(b, p + steps, 2);
    // a prefill chunk, then one token at a time: every step's hidden states
    let run = |src: &mut dyn ExpertSource| -> Vec<Tensor<B, 3>> {
        let mut cache = m.new_cache(b, p + steps);
        let mut out = vec![m
            .forward_hidden_streamed(ids.clone().slice([0..b, 0..p]), &mut cache, src)
            .unwrap()];
        for i in p..p + steps {
            let t = ids.clone().slice([0..b, i..i + 1]);
            out.push(m.forward_hidden_streamed(t, &mut cache, src).unwrap());
        }
        out
    };
    let mut all = ResidentExperts::load(&file).unwrap();
    let want = run(&mut all);
    for prefetch in [false, true] {
        let mut st = StreamedExperts::new(file.clone(), 2, prefetch);
        let got = run(&mut st);
        for (i, (a, w)) in got.into_iter().zip(&want).enumerate() {
            assert_eq!(max_diff(a, w.clone()), 0.0, "prefetch {prefetch}, step {i}");
        }
        let s = &st.stats;
        assert!(s.evictions > 0 && s.misses > 0, "{s:?}");
        assert!(s.max_resident <= 2, "{s:?}");
        assert!(
            s.bytes_read > 0 && s.bytes_read.is_multiple_of(spec.expert_bytes()),
            "{s:?}"
        );
        if prefetch {
            assert!(s.prefetched > 0, "{s:?}");
        }
    }
    // the same model with the file's experts as its own modules (the standard path): the same
    // hidden states (the prefill's experts go through Burn's matmul there: within rounding)
    let mut std_m = m.clone(); // parameters initialised above, so the clone shares them
    let experts: Vec<Vec<SwiGlu<B>>> = spec
        .layers
        .iter()
        .map(|&l| {
            (0..6)
                .map(|e| {
                    let [w1, w2, w3] = file.read(l, e).unwrap().to_f32();
                    SwiGlu::from_data(
                        TensorData::new(w1, [32, 8]),
                        TensorData::new(w2, [8, 32]),
                        TensorData::new(w3, [32, 8]),
                        &dev,
                    )
                })
                .collect()
        })
        .collect();
    std_m.set_routed_experts(experts);
    let mut cache = std_m.new_cache(b, p + steps);
    let mut got = vec![std_m.forward_hidden(ids.clone().slice([0..b, 0..p]), &mut cache)];
    for i in p..p + steps {
        got.push(std_m.forward_hidden(ids.clone().slice([0..b, i..i + 1]), &mut cache));
    }
    for (i, (a, w)) in got.into_iter().zip(&want).enumerate() {
        let d = max_diff(a, w.clone());
        assert!(d < 1e-5, "standard path, step {i}: {d}");
    }
}
