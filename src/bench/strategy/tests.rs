//! FR-004 runner tests: the config switches reach the model and the equivalence checks hold.

use super::*;
use crate::backend::{select, BackendChoice};
use crate::config::optimization::{DecoderShape, FfnKind};
use crate::config::{Scenario, ScenarioKind};
use crate::nn::attention::{AttentionKind, MlaImpl};
use burn::backend::Flex;

type B = Flex;

fn shape() -> DecoderShape {
    DecoderShape {
        hidden: 32,
        n_layers: 2,
        n_heads: 4,
        head_dim: 8,
        vocab_size: 40,
        ffn_hidden: 48,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-6,
    }
}

/// A tiny optimisation config: attention x FFN x MTP depth.
fn opt(attn: AttentionKind, imp: MlaImpl, ffn: FfnKind, depth: usize) -> OptimizationConfig {
    let mut o = OptimizationConfig {
        attention: attn,
        ffn,
        prefill_chunk: 5,
        key_block: 4,
        ..Default::default()
    };
    o.gqa.n_kv_heads = Some(2);
    o.mla.implementation = imp;
    o.mla.kv_lora_rank = 16;
    o.mla.q_lora_rank = (imp != MlaImpl::Naive).then_some(12);
    o.mla.qk_nope_head_dim = 8;
    o.mla.qk_rope_head_dim = 4;
    o.mla.v_head_dim = 6;
    o.moe.n_routed_experts = 8;
    o.moe.n_shared_experts = 1;
    o.moe.num_experts_per_tok = 2;
    o.moe.moe_inter_dim = 12;
    o.moe.n_group = 2;
    o.moe.topk_group = 1;
    o.moe.route_scale = 1.0;
    o.mtp.depth = depth;
    o
}

fn build(o: &OptimizationConfig, seed: u64) -> MtpModel<B> {
    let dev = Default::default();
    B::seed(&dev, seed);
    let m = MtpModel::<B>::new(&o.decoder_config(&shape()), o.mtp_depth(), &dev);
    m.visit(&mut Materialise);
    m
}

#[test]
fn every_combination_builds_and_decodes() {
    let attns = [
        (AttentionKind::Mha, MlaImpl::Absorbed),
        (AttentionKind::Gqa, MlaImpl::Absorbed),
        (AttentionKind::Mla, MlaImpl::Naive),
        (AttentionKind::Mla, MlaImpl::Absorbed),
    ];
    let (b, p, n) = (2, 7, 6);
    let prompts = crate::rng::prompts(b, p, 40, 3);
    for (attn, imp) in attns {
        for ffn in [FfnKind::Dense, FfnKind::Moe] {
            for depth in [0, 2] {
                let o = opt(attn, imp, ffn, depth);
                assert!(o.validate_for(&shape()).is_empty(), "{}", o.label());
                let cfg = o.decoder_config(&shape());
                assert_eq!(cfg.attention.kind, attn);
                assert_eq!(cfg.moe.is_some(), ffn == FfnKind::Moe);
                let m = build(&o, 5);
                // the module holds exactly the analytic parameter counts
                assert_eq!(m.main.num_params(), cfg.params(), "{}", o.label());
                assert_eq!(m.mtp.num_params(), MtpPredictor::<B>::params(&cfg, depth));
                assert_eq!(m.mtp.depth(), depth);
                let g = decode::greedy(&m.main, &prompts, n, o.prefill_chunk);
                assert_eq!(g.len(), b);
                assert!(g.iter().all(|r| r.len() == n && r.iter().all(|&t| t < 40)));
                // cached decoding == one full forward, for every combination
                let ff = full_forward_argmax(&m.main, &prompts, &g).unwrap();
                assert_eq!(g, ff, "{}: cached greedy vs full forward", o.label());
                let (sp, st) = decode::speculative(&m.main, &Drafter::Mtp(&m.mtp), &prompts, n, 5);
                assert_eq!(sp, g, "{}: speculative vs greedy", o.label());
                if depth > 0 {
                    assert!(st.steps > 0 && st.attempted.len() == depth, "{st:?}");
                    // oracle drafts: the accept path (D+1 tokens per verify pass)
                    let f = |i: usize, seq: &[u32]| -> Vec<u32> {
                        (0..depth)
                            .map(|j| g[i].get(seq.len() - p + j).copied().unwrap_or(0))
                            .collect()
                    };
                    let planted: Drafter<'_, B> = Drafter::Planted { depth, f: &f };
                    let (sp, st) = decode::speculative(&m.main, &planted, &prompts, n, 5);
                    assert_eq!(sp, g, "{}: oracle speculative vs greedy", o.label());
                    assert!(st.accepted[0] > 0, "{}: {st:?}", o.label());
                }
            }
        }
    }
}

#[test]
fn combined_mla_moe_mtp_speculative_equals_greedy_at_batch_3() {
    let o = opt(AttentionKind::Mla, MlaImpl::Absorbed, FfnKind::Moe, 3);
    assert_eq!(o.label(), "mla-absorbed+moe+mtp3");
    let m = build(&o, 9);
    let prompts = crate::rng::prompts(3, 9, 40, 1);
    let want = decode::greedy(&m.main, &prompts, 12, 4);
    let (got, st) = decode::speculative(&m.main, &Drafter::Mtp(&m.mtp), &prompts, 12, 4);
    assert_eq!(got, want);
    assert_eq!(st.attempted.len(), 3);
    // oracle drafts (the greedy continuation): every draft accepted, D+1 tokens per verify
    // pass through MLA + MoE, and still the greedy tokens
    let f = |i: usize, seq: &[u32]| -> Vec<u32> {
        (0..3)
            .map(|j| want[i].get(seq.len() - 9 + j).copied().unwrap_or(0))
            .collect()
    };
    let planted: Drafter<'_, B> = Drafter::Planted { depth: 3, f: &f };
    let (got, st) = decode::speculative(&m.main, &planted, &prompts, 12, 4);
    assert_eq!(got, want);
    assert_eq!(st.accepted, st.attempted, "every oracle draft accepted");
    assert!(st.mean_accepted_length().unwrap() > 3.0, "{st:?}");
    // the comparison itself can fail: one changed token is seen
    let mut bad = want.clone();
    bad[1][4] = (bad[1][4] + 1) % 40;
    assert_eq!(agreement(&want, &bad), (35.0 / 36.0, 1));
    assert_eq!(agreement(&want, &want), (1.0, 0));
    assert_eq!(
        agreement(&want, &want[..2]).1,
        36,
        "shape mismatch never agrees"
    );
}

#[test]
fn full_forward_reference_catches_a_wrong_token() {
    let o = opt(AttentionKind::Mha, MlaImpl::Absorbed, FfnKind::Dense, 0);
    let m = build(&o, 2);
    let prompts = crate::rng::prompts(2, 6, 40, 4);
    let g = decode::greedy(&m.main, &prompts, 5, 3);
    let mut wrong = g.clone();
    wrong[0][2] = (wrong[0][2] + 1) % 40;
    // the reference is recomputed from the (wrong) sequence: position 2 no longer matches
    let ff = full_forward_argmax(&m.main, &prompts, &wrong).unwrap();
    assert_ne!(ff, wrong);
    assert_eq!(full_forward_argmax(&m.main, &prompts, &g).unwrap(), g);
}

#[test]
fn smoke_scenario_runs_and_checks_equivalence_on_flex() {
    let text = include_str!("../../../scenarios/smoke/model-smoke.toml");
    let s = match Scenario::parse(std::path::Path::new("model-smoke.toml"), text).unwrap() {
        Scenario::Model(m) => m,
        _ => unreachable!(),
    };
    let ctx = BackendContext::<B> {
        device: Default::default(),
        selected: select(BackendChoice::Flex).unwrap(),
        pool: None,
    };
    let cfg = MonitorConfig {
        warmup: 0,
        repetitions: 2,
        ..Default::default()
    };
    let out = run(&s, &ctx, cfg.clone()).unwrap();
    let names: Vec<&str> = out.variants.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["prefill", "greedy", "speculative"]);
    for v in &out.variants {
        assert_eq!(v.timings.as_ref().unwrap().samples_s.len(), 2, "{}", v.name);
        assert!(v.error.is_none(), "{:?}", v.error);
    }
    assert_eq!(out.variants[1].equivalence.passed, Some(true));
    assert_eq!(out.variants[2].equivalence.passed, Some(true));
    let c = &out.criteria[0];
    assert_eq!(
        (c.id.as_str(), c.metric.as_str()),
        ("FR-004", "speculative_equals_greedy")
    );
    assert_eq!(c.measured, Some(1.0));
    assert!(c.passed, "{c:?}");
    let sp = &out.variants[2].metrics;
    assert!(sp["tokens_per_s"].unwrap() > 0.0);
    assert!(sp["speedup_vs_greedy"].is_some());
    assert!(sp.contains_key("acceptance_conditional_d2"));
    assert!(sp["oracle_mean_accepted_length"].unwrap() > 1.0);
    assert!(out.variants[0].metrics["prefill_tokens_per_s"].unwrap() > 0.0);
    assert!(out.notes.iter().any(|n| n.contains("untrained")));
    // MoE: fewer active than total parameters
    let m = &out.variants[1].metrics;
    assert!(m["params_active"].unwrap() < m["params_total"].unwrap());

    // depth 0: no speculative variant; the criterion is cached vs full forward
    let mut s0 = s.clone();
    s0.optimization.mtp.depth = 0;
    let out = run(&s0, &ctx, cfg.clone()).unwrap();
    assert_eq!(out.variants.len(), 2);
    assert!(out.criteria[0].passed && out.criteria[0].measured == Some(1.0));

    // f16 on a device this process already used in f32: exit 3 saying why (Burn fixes a
    // device's default dtype at its first tensor); f16 itself runs in its own process
    let mut s16 = s;
    s16.optimization.dtype = crate::config::Dtype::F16;
    let e = run(&s16, &ctx, cfg).unwrap_err();
    assert_eq!(crate::error::exit_code_of(&e), 3);
    let e = e.to_string();
    assert!(
        e.contains("dtype f16") && e.contains("already used the device"),
        "{e}"
    );
}

#[test]
fn shipped_default_is_mla_moe_mtp3() {
    let s = match Scenario::builtin(ScenarioKind::Model) {
        Scenario::Model(m) => m,
        _ => unreachable!(),
    };
    let o = &s.optimization;
    assert_eq!(o.attention, AttentionKind::Mla);
    assert_eq!(o.ffn, FfnKind::Moe);
    assert_eq!(o.mtp_depth(), 3);
    assert_eq!(o.mla.implementation, MlaImpl::Absorbed);
}
