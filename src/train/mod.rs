//! 训练主模型与 MTP 模块（`dsopt train`，以及 `dsopt bench mtp` 缺检查点时）。
//!
//! 损失 = 主模型交叉熵 + (λ/D)·Σ_k 第 k 深度交叉熵；AdamW、线性预热后余弦衰减、梯度范数裁剪 1.0。
//! 训练在 CPU 上用 Burn 的 Autodiff<Flex> 进行（只实例化这一种 Autodiff 后端以控制编译
//! 时间）；得到的检查点（Burn 记录 + JSON 配置）可在任何后端上加载用于解码与基准。

pub mod corpus;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::{backend::Backend, ElementConversion, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::config::scenario::{MtpScenario, MtpTrain};
use crate::nn::attention::AttentionConfig;
use crate::nn::mtp::MtpModel;
use crate::nn::DecoderConfig;
pub use corpus::Corpus;

/// Held-out bytes kept with a checkpoint, for prompts when the corpus is not at hand.
const HELDOUT_KEPT: usize = 256 * 1024;
/// File name of the kept held-out text.
const HELDOUT_FILE: &str = "heldout.txt";

/// Version of the checkpoint layout (bump when the files change meaning).
const CHECKPOINT_VERSION: u32 = 1;
/// Corpus bytes read at most.
pub const MAX_CORPUS_BYTES: usize = 32 << 20;
/// Held-out windows evaluated.
const EVAL_BATCHES: usize = 4;

/// 留出集评估：主模型与每个深度的损失和 top-1 准确率（教师强制）。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Evaluation {
    /// Main model cross-entropy (nats per byte).
    pub main_loss: f64,
    /// Main model next-token accuracy.
    pub main_accuracy: f64,
    /// Module k's cross-entropy, k = 1..D.
    pub depth_losses: Vec<f64>,
    /// Module k's accuracy on token i+k+1, k = 1..D (teacher-forced draft accuracy).
    pub depth_accuracies: Vec<f64>,
    /// Tokens scored by the main model.
    pub tokens: usize,
}

/// 训练摘要，写入检查点的 `config.json` 并进入报告。
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainSummary {
    /// Optimizer steps.
    pub steps: usize,
    /// Tokens processed.
    pub tokens: u64,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// Training tokens per second.
    pub tokens_per_s: f64,
    /// Total loss of the first step and the last step.
    pub first_loss: f64,
    /// Total loss of the last step.
    pub last_loss: f64,
    /// Held-out evaluation before training (random weights).
    pub before: Evaluation,
    /// Held-out evaluation after training.
    pub after: Evaluation,
    /// Corpus description.
    pub corpus: String,
    /// Backend the training ran on.
    pub backend: String,
}

/// 检查点的配置文件（`config.json`）。
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Layout version.
    pub version: u32,
    /// Cache key (model, depth, training settings, corpus).
    pub key: String,
    /// Main model configuration.
    pub model: DecoderConfig,
    /// MTP depth trained.
    pub depth: usize,
    /// Training settings used.
    pub train: MtpTrain,
    /// What training measured.
    pub summary: TrainSummary,
}

/// The main model configuration of an MTP scenario (MHA attention, dense FFN).
pub fn model_config(s: &MtpScenario) -> DecoderConfig {
    let heads = s.model.n_heads;
    let mut attention = AttentionConfig::mha(heads, s.model.hidden / heads);
    attention.rope_theta = s.model.rope_theta;
    attention.key_block = 128;
    DecoderConfig {
        vocab_size: s.model.vocab_size,
        hidden: s.model.hidden,
        n_layers: s.model.n_layers,
        ffn_hidden: s.model.ffn_hidden,
        attention,
        moe: None,
    }
}

/// Depth to train: the scenario's D and every depth of its sweep (module k serves every D >= k).
pub fn trained_depth(s: &MtpScenario) -> usize {
    let sweep = s
        .sweep
        .as_ref()
        .and_then(|w| w.depths.iter().max().copied())
        .unwrap_or(0);
    s.mtp.depth.max(sweep)
}

/// A stable key for a checkpoint: everything that changes the trained weights.
pub fn checkpoint_key(
    model: &DecoderConfig,
    depth: usize,
    train: &MtpTrain,
    corpus: &str,
) -> String {
    let text = serde_json::json!({
        "v": CHECKPOINT_VERSION, "model": model, "depth": depth, "train": train, "corpus": corpus,
    })
    .to_string();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Default checkpoint cache: `$DSOPT_CACHE`, else `$XDG_CACHE_HOME/dsopt`, else `~/.cache/dsopt`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DSOPT_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("dsopt");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache").join("dsopt"))
        .unwrap_or_else(|| PathBuf::from(".dsopt-cache"))
}

/// Deterministic xorshift generator for window positions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `batch` windows of `len` bytes from `data` at positions drawn by `rng`.
fn windows<B: Backend>(
    data: &[u8],
    batch: usize,
    len: usize,
    rng: &mut Rng,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let span = data.len().saturating_sub(len).max(1) as u64;
    let mut v = Vec::with_capacity(batch * len);
    for _ in 0..batch {
        let at = (rng.next() % span) as usize;
        v.extend((0..len).map(|j| data.get(at + j).copied().unwrap_or(b'\n') as i64));
    }
    Tensor::from_data(TensorData::new(v, [batch, len]), device)
}

/// Held-out prompts: `n` rows of `len` bytes at evenly spaced offsets of held-out text.
pub fn heldout_prompts(data: &[u8], n: usize, len: usize) -> Vec<Vec<u32>> {
    let span = data.len().saturating_sub(len).max(1);
    (0..n)
        .map(|i| {
            let at = i * span / n.max(1);
            (0..len)
                .map(|j| data.get(at + j).copied().unwrap_or(b'\n') as u32)
                .collect()
        })
        .collect()
}

/// Cross-entropy and the count of correct argmax predictions for `logits` `[b, s, v]` against
/// `targets` `[b, s]`.
fn score<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> (Tensor<B, 1>, usize) {
    let [b, s, v] = logits.dims();
    let logits = logits.reshape([b * s, v]);
    let targets = targets.reshape([b * s]);
    let correct: i64 = logits
        .clone()
        .argmax(1)
        .reshape([b * s])
        .equal(targets.clone())
        .int()
        .sum()
        .into_scalar()
        .elem();
    let loss = CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits, targets);
    (loss, correct as usize)
}

/// Loss terms of one window batch: main CE, each depth's CE, and their correct counts.
#[allow(clippy::type_complexity)]
fn losses<B: Backend>(
    model: &MtpModel<B>,
    tokens: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, usize, Vec<(Tensor<B, 1>, usize)>) {
    let [b, t] = tokens.dims();
    let (main, depths) = model.forward_all(tokens.clone());
    let (main_loss, main_ok) = score(main, tokens.clone().slice([0..b, 1..t]));
    let depth_terms = depths
        .into_iter()
        .enumerate()
        .map(|(k, l)| score(l, tokens.clone().slice([0..b, k + 2..t])))
        .collect();
    (main_loss, main_ok, depth_terms)
}

/// Held-out evaluation of `model` on fixed windows (same windows every call).
pub fn evaluate<B: Backend>(model: &MtpModel<B>, corpus: &Corpus, s: &MtpTrain) -> Evaluation {
    let device = model.main.device();
    let mut rng = Rng(0x0005_eed0_e7a1 ^ s.seed);
    let depth = model.mtp.depth();
    let (mut main_loss, mut main_ok) = (0.0, 0);
    let mut depth_loss = vec![0.0; depth];
    let mut depth_ok = vec![0; depth];
    let t = s.seq_len;
    for _ in 0..EVAL_BATCHES {
        let tokens = windows::<B>(&corpus.heldout, s.batch, t, &mut rng, &device);
        let (l, ok, terms) = losses(model, tokens);
        main_loss += l.into_scalar().elem::<f64>();
        main_ok += ok;
        for (k, (l, ok)) in terms.into_iter().enumerate() {
            depth_loss[k] += l.into_scalar().elem::<f64>();
            depth_ok[k] += ok;
        }
    }
    let n = EVAL_BATCHES as f64;
    let scored = |k: usize| (EVAL_BATCHES * s.batch * t.saturating_sub(k + 1)) as f64;
    Evaluation {
        main_loss: main_loss / n,
        main_accuracy: main_ok as f64 / scored(0),
        depth_losses: depth_loss.iter().map(|l| l / n).collect(),
        depth_accuracies: depth_ok
            .iter()
            .enumerate()
            .map(|(k, &ok)| ok as f64 / scored(k + 1))
            .collect(),
        tokens: scored(0) as usize,
    }
}

/// Learning rate at `step`: linear warm-up to `peak`, then cosine decay to `peak / 10`.
pub fn learning_rate(step: usize, s: &MtpTrain) -> f64 {
    let peak = s.learning_rate;
    if step < s.warmup_steps {
        return peak * (step + 1) as f64 / s.warmup_steps as f64;
    }
    let span = s.steps.saturating_sub(s.warmup_steps).max(1) as f64;
    let t = ((step - s.warmup_steps) as f64 / span).min(1.0);
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

type TrainBackend = Autodiff<Flex>;

/// Trains a fresh model and its D MTP modules on `corpus` (CPU, Autodiff<Flex>) and
/// returns the trained model (inference backend) and a summary.
pub fn train(
    model_cfg: &DecoderConfig,
    depth: usize,
    s: &MtpTrain,
    corpus: &Corpus,
    progress: bool,
) -> (MtpModel<Flex>, TrainSummary) {
    let device = Default::default();
    TrainBackend::seed(&device, s.seed);
    let mut model = MtpModel::<TrainBackend>::new(model_cfg, depth, &device);
    let before = evaluate(&model.valid(), corpus, s);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
        .init::<TrainBackend, MtpModel<TrainBackend>>();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ s.seed.wrapping_mul(31).wrapping_add(1));
    let bar = crate::monitor::progress::bar(progress, s.steps as u64, "train");
    let started = Instant::now();
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let mut tokens = 0u64;
    let lambda = s.mtp_lambda;
    for step in 0..s.steps {
        let batch = windows::<TrainBackend>(&corpus.train, s.batch, s.seq_len, &mut rng, &device);
        let (main, _, terms) = losses(&model, batch);
        let n_terms = terms.len().max(1) as f64;
        let mut loss = main.clone();
        for (l, _) in terms {
            loss = loss + l * (lambda / n_terms);
        }
        let value: f64 = loss.clone().into_scalar().elem();
        if step == 0 {
            first_loss = value;
        }
        last_loss = value;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(learning_rate(step, s), model, grads);
        tokens += (s.batch * s.seq_len) as u64;
        let el = started.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "loss {value:.3} (main {:.3}) · {:.0} tok/s",
            main.into_scalar().elem::<f64>(),
            tokens as f64 / el
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let wall_s = started.elapsed().as_secs_f64();
    let trained = model.valid();
    let after = evaluate(&trained, corpus, s);
    let summary = TrainSummary {
        steps: s.steps,
        tokens,
        wall_s,
        tokens_per_s: tokens as f64 / wall_s.max(1e-9),
        first_loss,
        last_loss,
        before,
        after,
        corpus: corpus.description.clone(),
        backend: "flex (Autodiff, CPU)".into(),
    };
    (trained, summary)
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::<FullPrecisionSettings>::new()
}

/// Saves `model` and `meta` under `dir` (`model.mpk`, `config.json`, and up to 256 KiB of the
/// held-out text as `heldout.txt`), atomically enough that a half-written checkpoint is never
/// picked up: the config is written last, via a rename.
pub fn save<B: Backend>(
    model: MtpModel<B>,
    meta: &CheckpointMeta,
    heldout: &[u8],
    dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join(HELDOUT_FILE),
        &heldout[..heldout.len().min(HELDOUT_KEPT)],
    )
    .with_context(|| format!("writing {}", dir.join(HELDOUT_FILE).display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    model
        .save_file(dir.join("model"), &recorder())
        .with_context(|| format!("writing {}", dir.join("model.mpk").display()))?;
    let tmp = dir.join("config.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(meta)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("config.json"))?;
    Ok(())
}

/// The checkpoint's metadata, if `dir` holds a complete checkpoint.
pub fn read_meta(dir: &Path) -> anyhow::Result<Option<CheckpointMeta>> {
    let p = dir.join("config.json");
    if !p.is_file() || !dir.join("model.mpk").is_file() {
        return Ok(None);
    }
    let meta: CheckpointMeta = serde_json::from_slice(&std::fs::read(&p)?)
        .with_context(|| format!("{} is not a dsopt checkpoint config", p.display()))?;
    Ok((meta.version == CHECKPOINT_VERSION).then_some(meta))
}

/// The held-out text kept with a checkpoint.
pub fn read_heldout(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let p = dir.join(HELDOUT_FILE);
    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
}

/// Opens an existing checkpoint for scenario `s`: its metadata and kept held-out text. The
/// model shape must be the scenario's and the trained depth must cover the depths asked for.
pub fn open_checkpoint(s: &MtpScenario, dir: &Path) -> anyhow::Result<(CheckpointMeta, Vec<u8>)> {
    let meta = read_meta(dir)?.ok_or_else(|| {
        crate::DsoptError::Usage(format!(
            "{} is not a complete dsopt MTP checkpoint (config.json and model.mpk) — train one \
             with `dsopt train` or drop --checkpoint",
            dir.display()
        ))
    })?;
    let want = model_config(s);
    if meta.model != want || meta.depth < trained_depth(s) {
        return Err(crate::DsoptError::Usage(format!(
            "checkpoint {} holds a model of hidden {}, {} layers, depth {}; the scenario asks for \
             hidden {}, {} layers, depth {} — use the scenario it was trained with, or drop --checkpoint",
            dir.display(),
            meta.model.hidden,
            meta.model.n_layers,
            meta.depth,
            want.hidden,
            want.n_layers,
            trained_depth(s)
        ))
        .into());
    }
    Ok((meta, read_heldout(dir)?))
}

/// Loads a checkpoint onto `device` of backend `B`.
pub fn load<B: Backend>(
    dir: &Path,
    meta: &CheckpointMeta,
    device: &B::Device,
) -> anyhow::Result<MtpModel<B>> {
    MtpModel::<B>::new(&meta.model, meta.depth, device)
        .load_file(dir.join("model"), &recorder(), device)
        .with_context(|| format!("loading {}", dir.join("model.mpk").display()))
}

/// Trains (or reuses) the checkpoint for a scenario: returns its folder and metadata, and
/// whether it was trained in this call.
pub fn ensure_checkpoint(
    s: &MtpScenario,
    cache_dir: &Path,
    corpus: &Corpus,
    progress: bool,
) -> anyhow::Result<(PathBuf, CheckpointMeta, bool)> {
    let model = model_config(s);
    let depth = trained_depth(s);
    let key = checkpoint_key(&model, depth, &s.train, &corpus.description);
    let dir = cache_dir.join(format!("mtp-{key}"));
    if let Some(meta) = read_meta(&dir)? {
        if meta.key == key {
            // checkpoints from before heldout.txt existed get it now (same split, same bytes)
            let kept = dir.join(HELDOUT_FILE);
            if !kept.is_file() {
                let h = &corpus.heldout;
                std::fs::write(&kept, &h[..h.len().min(HELDOUT_KEPT)])
                    .with_context(|| format!("writing {}", kept.display()))?;
            }
            return Ok((dir, meta, false));
        }
    }
    let (trained, summary) = train(&model, depth, &s.train, corpus, progress);
    let meta = CheckpointMeta {
        version: CHECKPOINT_VERSION,
        key,
        model,
        depth,
        train: s.train.clone(),
        summary,
    };
    save(trained, &meta, &corpus.heldout, &dir)?;
    Ok((dir, meta, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (DecoderConfig, MtpTrain, Corpus) {
        let mut attention = AttentionConfig::mha(2, 8);
        attention.key_block = 16;
        let c = DecoderConfig {
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
        let loaded = load::<Flex>(dir.path(), &back, &Default::default()).unwrap();
        let e1 = evaluate(&model, &corpus, &t);
        let e2 = evaluate(&loaded, &corpus, &t);
        assert_eq!(e1, e2, "saved and loaded models score identically");
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
}
