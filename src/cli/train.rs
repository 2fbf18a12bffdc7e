//! `dsopt train`: trains (or reuses) the MTP checkpoint of a scenario.

use std::path::Path;

use anyhow::Context;

use dsopt::config::{Scenario, ScenarioKind};
use dsopt::error::{DsoptError, EXIT_PASS};

use super::bench::overrides;
use super::commands::log;
use super::OverrideArgs;

/// `dsopt train`: trains (or reuses, unless `force`) the checkpoint of an MTP scenario.
pub(super) fn train_cmd(
    scenario: Option<&Path>,
    cache_dir: Option<&Path>,
    force: bool,
    o: &OverrideArgs,
    quiet: bool,
) -> anyhow::Result<i32> {
    let (file, mut s) = match scenario {
        Some(p) => (p.display().to_string(), Scenario::load(p)?),
        None => (
            ScenarioKind::Mtp.default_scenario().0.to_string(),
            Scenario::builtin(ScenarioKind::Mtp),
        ),
    };
    s.apply(&overrides(o)?, Path::new(&file))?;
    let Scenario::Mtp(s) = s else {
        return Err(DsoptError::Usage(format!(
            "{file} is a `{}` scenario; `dsopt train` needs an `mtp` scenario",
            s.kind().as_str()
        ))
        .into());
    };
    let corpus = dsopt::train::corpus::load(
        s.train.corpus.as_deref(),
        s.train.holdout_fraction,
        dsopt::train::MAX_CORPUS_BYTES,
    )
    .map_err(|e| DsoptError::Usage(format!("{e:#}")))?;
    log(
        quiet,
        format!("dsopt train: {file}; corpus: {}", corpus.description),
    );
    let dir = cache_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(dsopt::train::default_cache_dir);
    if force {
        let key = dsopt::train::checkpoint_key(
            &dsopt::train::model_config(&s),
            dsopt::train::trained_depth(&s),
            &s.train,
            &corpus.description,
        );
        let old = dir.join(format!("mtp-{key}")).join("config.json");
        if old.exists() {
            std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    let (ckpt, meta, trained) = dsopt::train::ensure_checkpoint(&s, &dir, &corpus, !quiet)?;
    let sm = &meta.summary;
    println!(
        "checkpoint: {} ({})",
        ckpt.display(),
        if trained {
            "trained now"
        } else {
            "already trained; use --force to train again"
        }
    );
    println!(
        "training: {} steps, {} tokens in {:.1} s ({:.0} tokens/s) on {}; loss {:.4} -> {:.4}",
        sm.steps, sm.tokens, sm.wall_s, sm.tokens_per_s, sm.backend, sm.first_loss, sm.last_loss
    );
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header(vec![
        "held-out",
        "loss before",
        "loss after",
        "accuracy before",
        "accuracy after",
    ]);
    t.add_row(vec![
        "main (next token)".to_string(),
        format!("{:.4}", sm.before.main_loss),
        format!("{:.4}", sm.after.main_loss),
        format!("{:.4}", sm.before.main_accuracy),
        format!("{:.4}", sm.after.main_accuracy),
    ]);
    for k in 0..meta.depth {
        t.add_row(vec![
            format!("MTP depth {} (token +{})", k + 1, k + 2),
            format!(
                "{:.4}",
                sm.before.depth_losses.get(k).copied().unwrap_or(f64::NAN)
            ),
            format!(
                "{:.4}",
                sm.after.depth_losses.get(k).copied().unwrap_or(f64::NAN)
            ),
            format!(
                "{:.4}",
                sm.before
                    .depth_accuracies
                    .get(k)
                    .copied()
                    .unwrap_or(f64::NAN)
            ),
            format!(
                "{:.4}",
                sm.after
                    .depth_accuracies
                    .get(k)
                    .copied()
                    .unwrap_or(f64::NAN)
            ),
        ]);
    }
    println!("{t}");
    Ok(EXIT_PASS)
}
