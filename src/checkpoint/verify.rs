//! `dsopt verify`：把参考文件的 `input_ids` 送进加载好的检查点，每条计算路径的 logits 都与
//! transformers 的参考 logits 比较。
//!
//! 路径（同一组权重）：朴素 MLA 整段前向、吸收 MLA 整段前向、朴素 MLA 逐 token 缓存解码、
//! 吸收 MLA 逐 token 缓存解码。每条路径都必须在容差之内，命令才以 0 退出。

use std::path::PathBuf;

use burn::tensor::{backend::Backend, Int, Tensor};
use serde::Serialize;

use super::load::{load_decoder, load_mtp, Checkpoint, LoadReport};
use super::model::DeepseekConfig;
use super::reference::{compare, PathCheck, Reference};
use crate::backend::{burn_dtype, use_float_dtype, BackendContext, BackendJob};
use crate::config::Dtype;
use crate::error::DsoptError;
use crate::nn::attention::MlaImpl;
use crate::nn::mtp::MtpPredictor;
use crate::nn::Decoder;

/// What `dsopt verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyOutcome {
    /// The checkpoint folder.
    pub model: String,
    /// Layers run (of the checkpoint's).
    pub layers: usize,
    /// The run's dtype.
    pub dtype: Dtype,
    /// The backend.
    pub backend: String,
    /// Reference batch and sequence length.
    pub batch: usize,
    /// Sequence length.
    pub seq: usize,
    /// Loading.
    pub load: LoadReport,
    /// One entry per path.
    pub paths: Vec<PathCheck>,
    /// What was not checked, and why.
    pub notes: Vec<String>,
    /// Every path within tolerance.
    pub pass: bool,
}

/// The job: load `dir` as `config` (already cut to the reference's layers) in `dtype`, run
/// every path on the reference's prompts.
pub struct VerifyJob {
    /// Checkpoint folder.
    pub dir: PathBuf,
    /// Its description (with `--layers` applied).
    pub config: DeepseekConfig,
    /// The reference.
    pub reference: Reference,
    /// The run's dtype.
    pub dtype: Dtype,
    /// No progress on stderr.
    pub quiet: bool,
    /// The checkpoint's layer count (its MTP layer, if any, is `model.layers.{total}`; it is
    /// checked only when every layer is kept).
    pub total_layers: usize,
}

impl BackendJob for VerifyJob {
    type Output = Result<VerifyOutcome, DsoptError>;

    fn run<B: Backend>(self, ctx: BackendContext<B>) -> Self::Output {
        let buckets = ctx.shape_buckets();
        let dev = ctx.device;
        use_float_dtype::<B>(&dev, self.dtype)?;
        let ckpt = Checkpoint::open(&self.dir, &self.config)?;
        let dc = self
            .config
            .decoder_config(MlaImpl::Naive)
            .with_shape_buckets(buckets);
        let (mut model, mut load) =
            load_decoder::<B>(&ckpt, &dc, &dev, burn_dtype(self.dtype), self.quiet)?;
        // DeepSeek-V3's MTP layer follows the last layer: checked only when every layer is kept
        let mtp = if self.config.num_hidden_layers == self.total_layers {
            load_mtp::<B>(&ckpt, &dc, &dev, burn_dtype(self.dtype), &mut load)?
        } else {
            None
        };
        if !self.quiet {
            eprintln!(
                "loaded {} tensors, {:.1} MB read in {:.2} s ({:.0} MB/s); parameters {:.1} MB, \
                 host heap peak while loading {}",
                load.tensors,
                load.bytes_read as f64 / 1e6,
                load.seconds,
                load.bytes_read as f64 / 1e6 / load.seconds.max(1e-9),
                load.model_bytes as f64 / 1e6,
                load.host_peak_bytes
                    .map(|b| format!("{:.1} MB", b as f64 / 1e6))
                    .unwrap_or_else(|| "not measured".into())
            );
        }
        let r = &self.reference;
        let (b, s) = r.dims();
        let ids = r.ids_tensor::<B>(&dev);
        let mut paths = Vec::new();
        for (imp, name) in [
            (MlaImpl::Naive, "naive MLA"),
            (MlaImpl::Absorbed, "absorbed MLA"),
        ] {
            model.set_mla_impl(imp);
            let full = full_forward(&model, ids.clone(), b, s);
            paths.push(compare(
                &format!("{name}, full forward"),
                r,
                &full,
                self.dtype,
            ));
            let step = cached_decode(&model, ids.clone(), b, s);
            paths.push(compare(
                &format!("{name}, cached decode token by token"),
                r,
                &step,
                self.dtype,
            ));
        }
        let mut notes = Vec::new();
        match (r.mtp(), mtp) {
            (Some(mref), Some(mtp)) => {
                for (imp, name) in [
                    (MlaImpl::Naive, "naive MLA"),
                    (MlaImpl::Absorbed, "absorbed MLA"),
                ] {
                    model.set_mla_impl(imp);
                    let got = mtp_forward(&model, mtp.clone(), imp, ids.clone(), b, s);
                    paths.push(compare(
                        &format!("MTP layer ({name})"),
                        &mref,
                        &got,
                        self.dtype,
                    ));
                }
            }
            (Some(_), None) if self.config.num_hidden_layers < self.total_layers => notes.push(
                "the MTP layer was not checked: it follows the last layer, and --layers kept fewer"
                    .to_string(),
            ),
            (Some(_), None) => {
                return Err(DsoptError::Model {
                    source_name: self.dir.display().to_string(),
                    key: Some(format!("model.layers.{}.eh_proj.weight", self.total_layers)),
                    message: "is missing, but the reference has mtp_logits".into(),
                    fix: "use the checkpoint the reference was made from".into(),
                })
            }
            (None, Some(_)) => notes.push(
                "the checkpoint has an MTP layer, but the reference has no mtp_logits: not checked"
                    .to_string(),
            ),
            (None, None) => {}
        }
        // the routed experts served from the host through a device cache that holds half of one
        // layer's experts (misses and evictions on every layer): the offloading path on the
        // checkpoint's own weights
        if let Some((name, got)) = offloaded_decode(&mut model, ids.clone(), b, s, &dev, |_| {}) {
            paths.push(compare(&name, r, &got, self.dtype));
        }
        let pass = paths.iter().all(|p| p.pass);
        Ok(VerifyOutcome {
            model: self.dir.display().to_string(),
            layers: self.config.num_hidden_layers,
            dtype: self.dtype,
            backend: ctx.selected.kind.to_string(),
            batch: b,
            seq: s,
            load,
            paths,
            notes,
            pass,
        })
    }
}

fn to_host<B: Backend>(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Every position's logits from one forward over the whole prompt.
fn full_forward<B: Backend>(
    m: &Decoder<B>,
    ids: Tensor<B, 2, Int>,
    b: usize,
    s: usize,
) -> Vec<f32> {
    let mut cache = m.new_cache(b, s);
    let h = m.forward_hidden(ids, &mut cache);
    to_host(m.logits(h))
}

/// Every position's logits from one decode step per token (the cache carries the prefix).
pub(crate) fn cached_decode<B: Backend>(
    m: &Decoder<B>,
    ids: Tensor<B, 2, Int>,
    b: usize,
    s: usize,
) -> Vec<f32> {
    let mut cache = m.new_cache(b, s);
    let steps: Vec<Tensor<B, 3>> = (0..s)
        .map(|t| m.decode_step(ids.clone().slice([0..b, t..t + 1]), &mut cache))
        .collect();
    to_host(Tensor::cat(steps, 1))
}

/// Every position's logits from one decode step per token with absorbed MLA and the routed
/// experts moved off the model into an [`ExpertStore`] (LRU device cache of half of one layer's
/// experts); the experts are put back afterwards. `None` for a model without routed experts.
/// `edit` sees the host experts before the store is made (tests break them there).
pub(crate) fn offloaded_decode<B: Backend>(
    m: &mut Decoder<B>,
    ids: Tensor<B, 2, Int>,
    b: usize,
    s: usize,
    dev: &B::Device,
    edit: impl FnOnce(&mut Vec<Vec<crate::nn::moe::HostExpert>>),
) -> Option<(String, Vec<f32>)> {
    let mut host = m.take_routed_experts();
    edit(&mut host);
    let per_layer = host.iter().map(Vec::len).max().unwrap_or(0);
    let layers = host.iter().filter(|l| !l.is_empty()).count();
    if per_layer == 0 {
        m.set_routed_experts(Vec::new());
        return None;
    }
    let capacity = (per_layer / 2).max(1);
    let mut store = crate::nn::moe::ExpertStore::<B>::new(host, capacity, dev);
    m.set_mla_impl(MlaImpl::Absorbed);
    let mut cache = m.new_cache(b, s);
    let steps: Vec<Tensor<B, 3>> = (0..s)
        .map(|t| {
            let h = m.forward_hidden_offloaded(
                ids.clone().slice([0..b, t..t + 1]),
                &mut cache,
                &mut store,
            );
            m.logits(h)
        })
        .collect();
    let got = to_host(Tensor::cat(steps, 1));
    let st = store.stats.clone();
    m.set_routed_experts(store.all_on_device());
    Some((
        format!(
            "absorbed MLA, cached decode, routed experts offloaded (cache of {capacity} of \
             {per_layer} x {layers}: {} misses, {} evictions)",
            st.misses, st.evictions
        ),
        got,
    ))
}

/// The MTP layer's logits at positions `0..S-1`: the main model's last hidden state (before its
/// final norm) at position i and token `t_{i+1}` through module 1, whose MLA is switched to `imp`.
pub(crate) fn mtp_forward<B: Backend>(
    m: &Decoder<B>,
    mut mtp: MtpPredictor<B>,
    imp: MlaImpl,
    ids: Tensor<B, 2, Int>,
    b: usize,
    s: usize,
) -> Vec<f32> {
    mtp.set_mla_impl(imp);
    let starts = vec![0; b];
    let mut cache = m.new_cache(b, s - 1);
    let h = m.forward_trunk(
        ids.clone().slice([0..b, 0..s - 1]),
        &mut cache,
        &starts,
        None,
    );
    let mut caches = mtp.new_caches(b, s - 1);
    let h1 = mtp.forward_module(0, m, h, ids.slice([0..b, 1..s]), &starts, &mut caches[0]);
    to_host(mtp.logits(0, m, h1))
}
