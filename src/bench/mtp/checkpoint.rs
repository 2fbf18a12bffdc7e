//! SC-002 on a checkpoint's own weights (`bench mtp --model DIR`): the main model and its MTP
//! layer (DeepSeek-V3's `model.layers.{L}`) read from the folder; greedy decoding against
//! self-speculative decoding with that layer drafting D tokens per step (the scenario's
//! `[mtp] num_nextn_predict_layers`, 3 by default: the layer used at every depth, its weights
//! tied).

use std::path::Path;

use burn::tensor::backend::Backend;

use super::{measure, Models};
use crate::backend::{burn_dtype, BackendContext};
use crate::bench::RunOutput;
use crate::checkpoint::load::{load_decoder, load_mtp, Checkpoint};
use crate::config::scenario::{ModelOrigin, MtpScenario};
use crate::error::DsoptError;
use crate::monitor::MonitorConfig;
use crate::nn::attention::MlaImpl;

/// `batch` prompts of `len` token ids drawn uniformly from `[0, vocab)` (xorshift, `seed`).
pub(crate) fn random_prompts(vocab: usize, batch: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut x = seed.max(1);
    (0..batch)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % vocab.max(1) as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// Runs SC-002 on the checkpoint `origin` names.
pub(super) fn run<B: Backend>(
    s: &MtpScenario,
    origin: &ModelOrigin,
    ctx: &BackendContext<B>,
    monitor_cfg: MonitorConfig,
) -> anyhow::Result<RunOutput> {
    let dev = &ctx.device;
    let spec = crate::checkpoint::resolve(&origin.model, None)?;
    let c = &spec.config;
    // the MTP layer reads the last layer's output: every layer is kept
    crate::checkpoint::check_fits(
        c,
        c.num_hidden_layers,
        c.num_hidden_layers,
        s.run.dtype,
        &origin.model,
        |_| String::new(),
        Some("the MTP layer needs every layer: use a machine with more memory, or --dtype bf16"),
    )?;
    // the prompts first: a bad prompt file fails before minutes of loading
    let (batch, plen, n) = (s.run.batch, s.run.prompt_len, s.run.new_tokens);
    let given = crate::bench::checkpoint_prompts(
        s.run.prompts.as_deref(),
        s.run.prompt_text.as_deref(),
        Path::new(&origin.model),
        batch,
        plen,
        c.vocab_size,
    )?;
    let (prompts, prompt_note) = match given {
        Some((rows, from)) => (
            rows,
            format!("prompts: the first {plen} ids of the first {batch} prompts ({from})"),
        ),
        None => (
            random_prompts(c.vocab_size, batch, plen, s.train.seed),
            format!(
                "prompts: {batch} x {plen} random token ids (uniform over the vocabulary, seed \
                 {}): the acceptance rate on random ids says little about real text (give \
                 --prompt-text FILE with real text, or --prompts FILE with its ids)",
                s.train.seed
            ),
        ),
    };
    let ckpt = Checkpoint::open(Path::new(&origin.model), c)?;
    let dc = c
        .decoder_config(MlaImpl::Absorbed)
        .with_shape_buckets(ctx.shape_buckets());
    let dtype = burn_dtype(s.run.dtype);
    let (main, mut load) = load_decoder::<B>(&ckpt, &dc, dev, dtype, !monitor_cfg.progress)?;
    let Some(mtp) = load_mtp::<B>(&ckpt, &dc, dev, dtype, &mut load)? else {
        return Err(DsoptError::Model {
            source_name: origin.model.clone(),
            key: Some("num_nextn_predict_layers".into()),
            message: format!(
                "config.json declares {} MTP layer(s), but the checkpoint has no \
                 model.layers.{}.eh_proj.weight (transformers drops the MTP layer when it saves)",
                c.num_nextn_predict_layers, c.num_hidden_layers
            ),
            fix: "use the checkpoint as published (with its MTP layer), or drop --model".into(),
        }
        .into());
    };
    // the checkpoint's (first) MTP layer drafts D tokens per step, used at every depth
    let mtp_params = burn::module::Module::num_params(&mtp);
    let mtp = mtp.chained(s.mtp.depth);
    let notes = vec![
        origin.note.clone(),
        format!(
            "dims: hidden {}, {} layers, {} heads, MLA kv_lora_rank {}, vocab {}; the MTP layer \
             is one more block of the same shape ({} parameters), applied {} times per step; run \
             in {}",
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.kv_lora_rank,
            c.vocab_size,
            mtp_params,
            s.mtp.depth,
            super::super::dtype_note(s.run.dtype)
        ),
        format!(
            "loaded {} tensors, {:.1} MB read in {:.2} s ({:.0} MB/s)",
            load.tensors,
            load.bytes_read as f64 / 1e6,
            load.seconds,
            load.bytes_read as f64 / 1e6 / load.seconds.max(1e-9)
        ),
        format!("{prompt_note}; {n} new tokens per sequence, greedy decoding both ways"),
    ];
    measure(
        s,
        Models {
            main: &main,
            mtp: &mtp,
            mtp_params,
            config: &dc,
            prompts: &prompts,
        },
        ctx,
        monitor_cfg,
        notes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_prompts_are_reproducible_and_inside_the_vocabulary() {
        let r = random_prompts(7, 3, 5, 42);
        assert_eq!(r, random_prompts(7, 3, 5, 42));
        assert!(r.iter().flatten().all(|&t| t < 7) && r.len() == 3 && r[0].len() == 5);
    }
}
