//! 自蒸馏：主模型冻结（其主干在内层后端上计算，不进入自动微分图），MTP 模块学习主模型自己的贪心续写，
//! 使“接受”意味着与主模型一致，而不是与数据一致。

use super::*;

/// Teacher sequences at most, generated once and sampled from for every distillation step.
const DISTILL_POOL: usize = 256;
/// Sequences generated together.
const DISTILL_GEN_BATCH: usize = 64;

/// `n` sequences of `len` tokens: a prompt of `data` (a quarter of `len`, at least 1) and the
/// main model's greedy continuation of it.
fn teacher_sequences(
    main: &crate::nn::Decoder<Flex>,
    data: &[u8],
    n: usize,
    len: usize,
    rng: &mut Rng,
) -> Vec<Vec<u32>> {
    let p = (len / 4).max(1);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let prompts = window_rows(data, DISTILL_GEN_BATCH.min(n - out.len()), p, rng);
        let cont = crate::nn::decode::greedy(main, &prompts, len - p, 256);
        out.extend(prompts.into_iter().zip(cont).map(|(mut a, b)| {
            a.extend(b);
            a
        }));
    }
    out
}

/// Per-depth teacher-forced accuracy of `model`'s modules on `seqs` (main model's own
/// continuations): the fraction of positions where module k's argmax is the sequence's token.
fn agreement(model: &MtpModel<Flex>, seqs: &[Vec<u32>]) -> Vec<f64> {
    let device = model.main.device();
    let tokens = crate::nn::decode::id_tensor::<Flex>(seqs, &device);
    let [b, t] = tokens.dims();
    let mut cache = model.main.new_cache(b, t);
    let trunk = model
        .main
        .forward_trunk(tokens.clone(), &mut cache, &vec![0; b], None);
    model
        .depth_logits(trunk, tokens.clone())
        .into_iter()
        .enumerate()
        .map(|(k, l)| {
            let (_, ok) = score(l, tokens.clone().slice([0..b, k + 2..t]));
            ok as f64 / (b * (t - k - 2)).max(1) as f64
        })
        .collect()
}

/// The self-distillation stage: the main model is frozen (its trunk runs on the inner backend,
/// outside the autodiff graph, and only the modules' gradients are applied), and the MTP modules learn the main model's greedy
/// continuations of training-set prompts — speculative acceptance is agreement with the main
/// model, not with the data.
pub(super) fn distill(
    mut model: MtpModel<TrainBackend>,
    s: &MtpTrain,
    corpus: &Corpus,
    progress: bool,
) -> (MtpModel<TrainBackend>, DistillSummary) {
    let started = Instant::now();
    let device = Default::default();
    let mut rng = Rng(0xd157_111e_5eed ^ s.seed);
    let len = s.seq_len;
    let inner = model.valid();
    let frozen = inner.main.clone();
    let pool = teacher_sequences(
        &inner.main,
        &corpus.train,
        (s.distill_steps * s.batch).min(DISTILL_POOL),
        len,
        &mut rng,
    );
    let held = teacher_sequences(&inner.main, &corpus.heldout, 16, len, &mut rng);
    let agreement_before = agreement(&inner, &held);
    let generate_s = started.elapsed().as_secs_f64();
    let schedule = MtpTrain {
        steps: s.distill_steps,
        warmup_steps: (s.distill_steps / 10).max(1),
        learning_rate: s.learning_rate * 0.5,
        ..s.clone()
    };
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
        .init::<TrainBackend, MtpModel<TrainBackend>>();
    let bar = crate::monitor::progress::bar(progress, s.distill_steps as u64, "distill");
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    for step in 0..s.distill_steps {
        let rows: Vec<Vec<u32>> = (0..s.batch)
            .map(|_| pool[(rng.next() % pool.len() as u64) as usize].clone())
            .collect();
        let tokens = crate::nn::decode::id_tensor::<TrainBackend>(&rows, &device);
        let [b, t] = tokens.dims();
        // the frozen main model's trunk on the inner backend, outside the autodiff graph (a
        // detached autodiff trunk would still record its whole graph every step, never freed
        // by a backward pass: it ran this machine out of memory)
        let mut cache = frozen.new_cache(b, t);
        let trunk = frozen.forward_trunk(
            crate::nn::decode::id_tensor::<Flex>(&rows, &Default::default()),
            &mut cache,
            &vec![0; b],
            None,
        );
        let depths = model.depth_logits(Tensor::from_inner(trunk), tokens.clone());
        let n = depths.len().max(1) as f64;
        let mut loss: Option<Tensor<TrainBackend, 1>> = None;
        for (k, l) in depths.into_iter().enumerate() {
            let (ce, _) = score(l, tokens.clone().slice([0..b, k + 2..t]));
            let ce = ce / n;
            loss = Some(match loss {
                Some(x) => x + ce,
                None => ce,
            });
        }
        let Some(loss) = loss else { break };
        let value: f64 = loss.clone().into_scalar().elem();
        if step == 0 {
            first_loss = value;
        }
        last_loss = value;
        let mut grads = loss.backward();
        // only the modules learn: the main model (embedding and head included) stays as trained
        let grads = GradientsParams::from_module(&mut grads, &model.mtp);
        model = optim.step(learning_rate(step, &schedule), model, grads);
        bar.set_message(format!("MTP loss {value:.3}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let agreement_after = agreement(&model.valid(), &held);
    let summary = DistillSummary {
        steps: s.distill_steps,
        sequences: pool.len(),
        generate_s,
        wall_s: started.elapsed().as_secs_f64(),
        first_loss,
        last_loss,
        agreement_before,
        agreement_after,
    };
    (model, summary)
}
