//! 检查点：保存、读取元数据与留出文本、按场景打开或训练（缓存键为模型配置、深度、训练设置与语料描述的哈希）。

use super::*;

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

/// Loads a checkpoint onto `device` of backend `B` (`shape_buckets`: see
/// [`DecoderConfig::with_shape_buckets`]).
pub fn load<B: Backend>(
    dir: &Path,
    meta: &CheckpointMeta,
    shape_buckets: bool,
    device: &B::Device,
) -> anyhow::Result<MtpModel<B>> {
    let model = meta.model.clone().with_shape_buckets(shape_buckets);
    MtpModel::<B>::new(&model, meta.depth, device)
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
