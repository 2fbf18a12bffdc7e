//! Training tests: schedule, windows, checkpoints, distillation leaves the main model unchanged.

use super::*;
use crate::nn::attention::AttentionConfig;

fn tiny() -> (DecoderConfig, MtpTrain, Corpus) {
    let mut attention = AttentionConfig::mha(2, 8);
    attention.key_block = 16;
    let c = DecoderConfig {
        first_k_dense_replace: 0,
        first_dense_ffn_hidden: None,
        rms_norm_eps: crate::nn::model::default_rms_norm_eps(),
        vocab_size: 256,
        hidden: 16,
        n_layers: 1,
        ffn_hidden: 32,
        attention,
        moe: None,
    };
    let t = MtpTrain {
        steps: 30,
        batch: 4,
        seq_len: 16,
        learning_rate: 0.01,
        warmup_steps: 3,
        mtp_lambda: 0.3,
        corpus: None,
        checkpoint: None,
        holdout_fraction: 0.5,
        seed: 3,
        distill_steps: 0,
    };
    // a highly regular text: a few steps of training must learn some of it
    let text: Vec<u8> = "fn main() { let x = 1; }\n".repeat(200).into_bytes();
    let corpus = Corpus {
        train: text.clone(),
        heldout: text,
        description: "test".into(),
        files: 1,
    };
    (c, t, corpus)
}

#[test]
fn a_few_steps_lower_main_and_mtp_losses_and_checkpoints_round_trip() {
    let (c, t, corpus) = tiny();
    let (model, summary) = train(&c, 2, &t, &corpus, false);
    let (b, a) = (&summary.before, &summary.after);
    assert!(a.main_loss < b.main_loss - 0.5, "{b:?} -> {a:?}");
    for k in 0..2 {
        assert!(
            a.depth_losses[k] < b.depth_losses[k] - 0.5,
            "depth {k}: {b:?} -> {a:?}"
        );
    }
    assert!(summary.last_loss < summary.first_loss);
    let dir = tempfile::tempdir().unwrap();
    let meta = CheckpointMeta {
        version: CHECKPOINT_VERSION,
        key: "k".into(),
        model: c.clone(),
        depth: 2,
        train: t.clone(),
        summary,
    };
    save(model.clone(), &meta, &corpus.heldout, dir.path()).unwrap();
    assert_eq!(read_heldout(dir.path()).unwrap(), corpus.heldout);
    let back = read_meta(dir.path()).unwrap().expect("complete checkpoint");
    let loaded = load::<Flex>(dir.path(), &back, false, &Default::default()).unwrap();
    let e1 = evaluate(&model, &corpus, &t);
    let e2 = evaluate(&loaded, &corpus, &t);
    assert_eq!(e1, e2, "saved and loaded models score identically");
}

#[test]
fn distillation_trains_only_the_modules() {
    // the stage alone on one model (the global RNG is shared with parallel tests, so two
    // trainings need not start from the same weights): main unchanged, modules changed
    let (c, mut t, corpus) = tiny();
    t.distill_steps = 4;
    let model = MtpModel::<TrainBackend>::new(&c, 2, &Default::default());
    let before = evaluate(&model.valid(), &corpus, &t);
    let (distilled, d) = distill(model, &t, &corpus, false);
    let after = evaluate(&distilled.valid(), &corpus, &t);
    assert_eq!(
        before.main_loss, after.main_loss,
        "the main model is frozen"
    );
    assert_ne!(
        before.depth_losses, after.depth_losses,
        "the modules learned"
    );
    assert_eq!(d.steps, 4);
    assert_eq!((d.agreement_before.len(), d.agreement_after.len()), (2, 2));
    assert!(d.first_loss.is_finite() && d.last_loss.is_finite());
    // and train() runs it and reports it
    let (_, summary) = train(&c, 2, &t, &corpus, false);
    assert_eq!(summary.distill.map(|d| d.steps), Some(4));
    // settings without the stage keep their checkpoint key (the field is not serialised)
    t.distill_steps = 0;
    assert!(!serde_json::to_string(&t).unwrap().contains("distill"));
}

#[test]
fn learning_rate_warms_up_then_decays() {
    let (_, t, _) = tiny();
    assert!(learning_rate(0, &t) < learning_rate(2, &t));
    assert!((learning_rate(2, &t) - t.learning_rate).abs() < 1e-12);
    assert!(learning_rate(29, &t) < learning_rate(10, &t));
    assert!(learning_rate(29, &t) >= 0.1 * t.learning_rate - 1e-12);
}

#[test]
fn incomplete_checkpoints_are_not_used() {
    let dir = tempfile::tempdir().unwrap();
    assert!(read_meta(dir.path()).unwrap().is_none());
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    assert!(read_meta(dir.path()).unwrap().is_none(), "no model.mpk");
}
