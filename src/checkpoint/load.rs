//! 从 Hugging Face 检查点（safetensors，单文件或分片 + `model.safetensors.index.json`）构建
//! dsopt 的 [`Decoder`]：张量名与 transformers 的 `DeepseekV2ForCausalLM` /
//! `DeepseekV3ForCausalLM` 相同，每个张量先检查形状，再读入（不先随机初始化）。
//!
//! Weight layout (decided once, see the note of issue 28): PyTorch stores a linear weight as
//! `[out, in]`; Burn's `Linear` keeps `[in, out]`, and dsopt's CPU decode kernels stream those
//! rows. The transpose is done on the host while the tensor is loaded (one pass, one tensor at a
//! time), so a loaded model is the same kind of module as a randomly initialised one and every
//! fast path applies to it unchanged. When the run's dtype is the file's, each tensor is copied
//! (or transposed in 64 x 64 tiles on the rayon pool) straight out of the file's memory map into
//! its own freshly allocated buffer, and the map's pages are dropped behind it band by band
//! (16 MiB of the file at a time): the host holds the model plus one band of the file. A run in f32 of an f16/bf16 checkpoint widens in the
//! same single pass out of the map. Otherwise (FP8, an f32 checkpoint run in half precision,
//! bf16 <-> f16) each tensor is widened to f32 and transposed (two f32 copies of one tensor at a
//! time) before the conversion.
//!
//! Load time, 2-layer DeepSeek-V2-Lite-dimension bf16 checkpoint (2.17 GB, 2-core Xeon, warm
//! page cache): 0.86-0.98 s, 2.5-3.4x a plain read of its files in the same run (was 1.7-2.0 s
//! with positioned reads into a scratch buffer and a memset allocation); in f32 1.4-1.7 s (was
//! 11.4 s: fresh memory for every intermediate copy is slow to fault in on this VM). What is left is mostly
//! the first touch of 2.17 GB of fresh memory (page faults; transparent huge pages were slower on
//! this VM) and the transpose's memory traffic; only kernels that read `[out, in]` rows would
//! let a same-dtype load skip both (a map-backed model, no copy at all).

use std::collections::BTreeMap;

use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Param;
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use serde::Serialize;

use super::model::{DeepseekConfig, ModelType};
use super::safetensors::{dequantize_fp8, SafeFile, StDtype};
use crate::error::DsoptError;
use crate::nn::attention::mla::{LowRankQuery, MlaAttention, QueryProjection};
use crate::nn::attention::{Attention, AttentionConfig, AttentionKind, MlaImpl};
use crate::nn::ffn::SwiGlu;
use crate::nn::model::{Block, Decoder, DecoderConfig, Ffn};
use crate::nn::moe::{MoeConfig, MoeLayer, MoeRouter, RouterConfig, TopkMethod};
use crate::nn::mtp::{MtpModule, MtpPredictor};

impl DeepseekConfig {
    /// The decoder this description defines (MLA in `mla_impl`, dense-first MoE layers).
    pub fn decoder_config(&self, mla_impl: MlaImpl) -> DecoderConfig {
        let attention = AttentionConfig {
            kind: AttentionKind::Mla,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_attention_heads,
            head_dim: self.v_head_dim,
            kv_lora_rank: self.kv_lora_rank,
            q_lora_rank: self.q_lora_rank.unwrap_or(0),
            qk_nope_head_dim: self.qk_nope_head_dim,
            qk_rope_head_dim: self.qk_rope_head_dim,
            v_head_dim: self.v_head_dim,
            mla_impl,
            key_block: 512,
            mscale: 1.0,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling,
            shape_buckets: false,
        };
        let moe = self.moe.as_ref().map(|m| MoeConfig {
            dim: self.hidden_size,
            moe_inter_dim: m.moe_intermediate_size,
            n_shared_experts: m.n_shared_experts,
            router: RouterConfig {
                n_routed_experts: m.n_routed_experts,
                num_experts_per_tok: m.num_experts_per_tok,
                score_func: m.scoring_func,
                topk_method: m.topk_method,
                n_group: m.n_group,
                topk_group: m.topk_group,
                route_scale: m.routed_scaling_factor,
                // transformers' DeepseekV2 router never normalises (the published V2 configs
                // say false); DeepseekV3's follows the key
                norm_topk_prob: m.norm_topk_prob && self.model_type != ModelType::DeepseekV2,
                bias_update_speed: 0.0,
            },
            shape_buckets: false,
        });
        DecoderConfig {
            vocab_size: self.vocab_size,
            hidden: self.hidden_size,
            n_layers: self.num_hidden_layers,
            ffn_hidden: self.intermediate_size,
            attention,
            moe,
            first_k_dense_replace: self.first_k_dense_replace,
            first_dense_ffn_hidden: None,
            rms_norm_eps: self.rms_norm_eps,
        }
    }
}

/// The ε of the latent norms `q_a_layernorm` and `kv_a_layernorm`: transformers (and DeepSeek's
/// `inference/model.py`) build them with the default 1e-6 whatever `rms_norm_eps` says.
const LATENT_EPS: f64 = 1e-6;

/// The band of a mapped tensor moved (and then released from the map) at a time, and the
/// largest positioned read when a file is not mapped (the scratch a transposing read needs).
pub const READ_CHUNK: usize = 16 << 20;

/// The safetensors files of a checkpoint directory, and which file holds each tensor.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafeFile>,
    index: BTreeMap<String, usize>,
    fp8_block: Option<usize>,
}

/// What loading took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Tensors read.
    pub tensors: usize,
    /// Bytes read from the files.
    pub bytes_read: u64,
    /// Wall time of the whole load, seconds.
    pub seconds: f64,
    /// Bytes of the loaded parameters in the run's dtype.
    pub model_bytes: u64,
    /// The largest parameter, bytes in the run's dtype.
    pub largest_tensor_bytes: u64,
    /// Host heap peak during the load above the heap before it (`None` without the counting
    /// allocator, i.e. outside the `dsopt` binary).
    pub host_peak_bytes: Option<u64>,
}

fn model_err(source: &Path, key: Option<&str>, message: String, fix: &str) -> DsoptError {
    DsoptError::Model {
        source_name: source.display().to_string(),
        key: key.map(str::to_string),
        message,
        fix: fix.to_string(),
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards that `dir/model.safetensors.index.json`
    /// names (each checked; a missing shard or a tensor the index places in a shard that lacks
    /// it exits 2).
    pub fn open(dir: &Path, config: &DeepseekConfig) -> Result<Checkpoint, DsoptError> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| {
                model_err(
                    &index_path,
                    None,
                    format!("cannot be read: {e}"),
                    "check the file",
                )
            })?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                model_err(
                    &index_path,
                    None,
                    format!("is not JSON: {e}"),
                    "download it again",
                )
            })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    model_err(
                        &index_path,
                        Some("weight_map"),
                        "is missing or not an object".into(),
                        "download the index again",
                    )
                })?;
            let mut shard_of: BTreeMap<String, usize> = BTreeMap::new();
            for (tensor, shard) in map {
                let shard = shard.as_str().ok_or_else(|| {
                    model_err(
                        &index_path,
                        Some(tensor),
                        "maps to something that is not a file name".into(),
                        "download the index again",
                    )
                })?;
                if shard.contains('/') || shard.contains("..") {
                    return Err(model_err(
                        &index_path,
                        Some(tensor),
                        format!("maps to `{shard}`, outside the checkpoint folder"),
                        "download the index again",
                    ));
                }
                let i = match shard_of.get(shard) {
                    Some(&i) => i,
                    None => {
                        let p = dir.join(shard);
                        if !p.is_file() {
                            return Err(model_err(
                                &p,
                                None,
                                format!("is missing (the index places `{tensor}` in it)"),
                                "download every shard the index names into the checkpoint folder",
                            ));
                        }
                        files.push(SafeFile::open(&p)?);
                        shard_of.insert(shard.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if files[i].info(tensor).is_none() {
                    return Err(model_err(
                        files[i].path(),
                        Some(tensor),
                        "is not in this shard, where the index places it".into(),
                        "download the shard and the index again (they are of different versions)",
                    ));
                }
                index.insert(tensor.clone(), i);
            }
        } else if single.is_file() {
            let f = SafeFile::open(&single)?;
            for name in f.tensors().keys() {
                index.insert(name.clone(), 0);
            }
            files.push(f);
        } else {
            return Err(model_err(
                dir,
                None,
                "has neither model.safetensors nor model.safetensors.index.json".into(),
                "point --model at a Hugging Face checkpoint folder, or use a preset name for random weights",
            ));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
            fp8_block: config.quantization.map(|q| q.block[0]),
        })
    }

    /// Total size of the checkpoint's files in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| std::fs::metadata(f.path()).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Whether the checkpoint has tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Whether tensors `a` and `b` hold the same dtype, shape and bytes (read in chunks).
    pub fn same_bytes(&self, a: &str, b: &str) -> Result<bool, DsoptError> {
        let (fa, fb) = (self.file_of(a)?, self.file_of(b)?);
        let (ia, ib) = (fa.info(a).expect("indexed"), fb.info(b).expect("indexed"));
        if ia.dtype != ib.dtype || ia.shape != ib.shape {
            return Ok(false);
        }
        let len = ia.end - ia.start;
        let mut off = 0;
        let (mut x, mut y) = (vec![0u8; READ_CHUNK], vec![0u8; READ_CHUNK]);
        while off < len {
            let n = (len - off).min(READ_CHUNK as u64) as usize;
            fa.read_range(a, off, &mut x[..n])?;
            fb.read_range(b, off, &mut y[..n])?;
            if x[..n] != y[..n] {
                return Ok(false);
            }
            off += n as u64;
        }
        Ok(true)
    }

    fn file_of(&self, name: &str) -> Result<&SafeFile, DsoptError> {
        self.index
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| {
                model_err(
                    &self.dir,
                    Some(name),
                    "is not in the checkpoint".into(),
                    "the checkpoint is incomplete or its config.json describes another model",
                )
            })
    }

    /// Tensor `name` as stored, when its dtype is `dtype` and its shape `shape` (checked):
    /// `[rows, cols]` transposed to `[cols, rows]` when `transpose`. The bytes go straight into
    /// the buffer the tensor keeps (out of the file's map in bands of [`READ_CHUNK`], or by
    /// positioned reads of at most that when the file is not mapped), so the host holds no other
    /// copy. `None` when the stored dtype is another.
    pub fn read_as_stored(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        transpose: bool,
    ) -> Result<Option<(TensorData, u64)>, DsoptError> {
        let f = self.file_of(name)?;
        let info = f.info(name).expect("indexed").clone();
        let stored = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            _ => return Ok(None),
        };
        if stored != dtype {
            return Ok(None);
        }
        self.check_shape(f, name, &info.shape, shape)?;
        let bytes = info.end - info.start;
        let [rows, cols] = match shape {
            &[r, c] if transpose => [r, c],
            _ => [1, shape.iter().product()],
        };
        let shape = if transpose && shape.len() == 2 {
            vec![cols, rows]
        } else {
            shape.to_vec()
        };
        let d = match stored {
            DType::F32 => {
                TensorData::new(read_typed::<f32>(f, name, rows, cols, transpose)?, shape)
            }
            DType::F16 => TensorData::new(
                read_typed::<half::f16>(f, name, rows, cols, transpose)?,
                shape,
            ),
            _ => TensorData::new(
                read_typed::<half::bf16>(f, name, rows, cols, transpose)?,
                shape,
            ),
        };
        Ok(Some((d, bytes)))
    }

    /// Tensor `name` (stored as F32, F16 or BF16) widened to f32 with the shape `shape`
    /// (checked), `[rows, cols]` transposed to `[cols, rows]` when `transpose`: one pass out of the
    /// file's memory map. `None` for another stored dtype or an unmapped file.
    pub fn read_widened(
        &self,
        name: &str,
        shape: &[usize],
        transpose: bool,
    ) -> Result<Option<(TensorData, u64)>, DsoptError> {
        let f = self.file_of(name)?;
        let info = f.info(name).expect("indexed").clone();
        if !matches!(info.dtype, StDtype::F32 | StDtype::F16 | StDtype::BF16) {
            return Ok(None);
        }
        self.check_shape(f, name, &info.shape, shape)?;
        let (v, out_shape) = match *shape {
            [r, c] if transpose => (widen_mapped(f, name, info.dtype, r, c, true), vec![c, r]),
            _ => (
                widen_mapped(f, name, info.dtype, 1, shape.iter().product(), false),
                shape.to_vec(),
            ),
        };
        let Some(v) = v else {
            return Ok(None);
        };
        Ok(Some((TensorData::new(v, out_shape), info.end - info.start)))
    }

    /// Tensor `name` of PyTorch shape `shape` in `dtype`, transposed (`[out, in]` to
    /// `[in, out]`) when `transpose`: read as stored when the dtypes agree, widened in one pass
    /// for f32, else widened to f32, transposed and converted one tensor at a time. Returns the
    /// data and the bytes read from the files.
    pub fn data(
        &self,
        name: &str,
        shape: &[usize],
        transpose: bool,
        dtype: DType,
    ) -> Result<(TensorData, u64), DsoptError> {
        if let Some(r) = self.read_as_stored(name, shape, dtype, transpose)? {
            return Ok(r);
        }
        if dtype == DType::F32 {
            if let Some(r) = self.read_widened(name, shape, transpose)? {
                return Ok(r);
            }
        }
        let (v, bytes) = self.read(name, shape)?;
        if !transpose || shape.len() != 2 {
            return Ok((
                TensorData::new(v, shape.to_vec()).convert_dtype(dtype),
                bytes,
            ));
        }
        let [out, inp] = [shape[0], shape[1]];
        let mut t: Vec<f32> = host_vec(v.len());
        transpose_into(&v, &mut t, out, inp);
        drop(v);
        Ok((TensorData::new(t, [inp, out]).convert_dtype(dtype), bytes))
    }

    /// Routed expert `e` of model layer `layer` as dsopt's expert file stores it: `w1` (gate),
    /// `w2` (down), `w3` (up) in Burn's `[in, out]` layout (`[dim, inter]`, `[inter, dim]`,
    /// `[dim, inter]`), in `dtype`, little-endian, one after the other.
    pub fn routed_expert_bytes(
        &self,
        layer: usize,
        e: usize,
        dim: usize,
        inter: usize,
        dtype: DType,
    ) -> Result<Vec<u8>, DsoptError> {
        let p = format!("model.layers.{layer}.mlp.experts.{e}");
        let mut out = Vec::with_capacity(3 * dim * inter * dtype.size());
        for (w, shape) in [
            ("gate_proj", [inter, dim]),
            ("down_proj", [dim, inter]),
            ("up_proj", [inter, dim]),
        ] {
            let (d, _) = self.data(&format!("{p}.{w}.weight"), &shape, true, dtype)?;
            out.extend_from_slice(d.as_bytes());
        }
        Ok(out)
    }

    /// What identifies this checkpoint's weights for a cache keyed on them: its folder and
    /// its `config.json`'s and every weight file's name, size and modification time.
    pub fn identity(&self) -> String {
        let mut id = self
            .dir
            .canonicalize()
            .unwrap_or_else(|_| self.dir.clone())
            .display()
            .to_string();
        let paths = std::iter::once(self.dir.join("config.json"))
            .chain(self.files.iter().map(|f| f.path().to_path_buf()));
        for path in paths {
            let meta = std::fs::metadata(&path).ok();
            let size = meta.as_ref().map(|m| m.len()).unwrap_or(0);
            let mtime = meta
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            id.push_str(&format!("|{name}:{size}:{mtime}"));
        }
        id
    }

    fn check_shape(
        &self,
        f: &SafeFile,
        name: &str,
        have: &[usize],
        want: &[usize],
    ) -> Result<(), DsoptError> {
        if have != want {
            return Err(model_err(
                f.path(),
                Some(name),
                format!("has shape {have:?}; config.json implies {want:?}"),
                "the checkpoint and its config.json disagree: use the config.json it was saved with",
            ));
        }
        Ok(())
    }

    /// Tensor `name` as f32 with the shape `shape` (checked); FP8 weights dequantised with their
    /// `{name}_scale_inv` block scales. Returns the values and the bytes read.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<(Vec<f32>, u64), DsoptError> {
        let f = self.file_of(name)?;
        let info = f.info(name).expect("indexed").clone();
        self.check_shape(f, name, &info.shape, shape)?;
        let bytes = info.end - info.start;
        if info.dtype == StDtype::F8E4M3 {
            let Some(bs) = self.fp8_block else {
                return Err(model_err(
                    f.path(),
                    Some(name),
                    "is FP8 but config.json has no quantization_config".into(),
                    "use the config.json the checkpoint was saved with",
                ));
            };
            let [rows, cols] = [shape[0], shape.get(1).copied().unwrap_or(1)];
            let sname = format!("{name}_scale_inv");
            let sshape = [rows.div_ceil(bs), cols.div_ceil(bs)];
            let sf = self.file_of(&sname)?;
            if sf.info(&sname).expect("indexed").dtype == StDtype::F8E4M3 {
                return Err(model_err(
                    sf.path(),
                    Some(&sname),
                    "is FP8; block scales are F32 (or BF16)".into(),
                    "the checkpoint is not in DeepSeek-V3's FP8 format: download it again",
                ));
            }
            let (scale, sbytes) = self.read(&sname, &sshape)?;
            let q = f.read_bytes(name)?;
            return Ok((dequantize_fp8(&q, rows, cols, &scale, bs), bytes + sbytes));
        }
        Ok((f.read_f32(name)?, bytes))
    }
}

/// Tensor `name` of `rows x cols` elements of type `T` (as stored, little-endian), transposed to
/// `cols x rows` when `transpose`: out of the file's memory map when it has one
/// ([`from_mapped`]), else by positioned reads in chunks ([`read_chunked`]).
fn read_typed<T: bytemuck::Pod + burn::tensor::Element>(
    f: &SafeFile,
    name: &str,
    rows: usize,
    cols: usize,
    transpose: bool,
) -> Result<Vec<T>, DsoptError> {
    match from_mapped(f, name, rows, cols, transpose) {
        Some(v) => Ok(v),
        None => read_chunked(f, name, rows, cols, transpose, READ_CHUNK),
    }
}

/// A zeroed host vector for a loaded tensor: `calloc`'s fresh pages, no memset; the first
/// writes fault them in, in parallel where the writes are. (Measured on this VM and not kept:
/// transparent huge pages made a first load 2.5-6x slower — the 2 MiB blocks are the ones the
/// hypervisor had taken back — and `MADV_POPULATE_WRITE` ahead of the writes was 10-20 % slower.)
fn host_vec<T: bytemuck::Pod>(n: usize) -> Vec<T> {
    bytemuck::allocation::zeroed_vec(n)
}

/// Tensor `name` of file `f` (`rows x cols` little-endian elements of `T`, any alignment) out of
/// the file's memory map as a `Vec<T>`, transposed to `cols x rows` when `transpose`
/// ([`Mover::run`]); `None` when the file is not mapped.
fn from_mapped<T: bytemuck::Pod>(
    f: &SafeFile,
    name: &str,
    rows: usize,
    cols: usize,
    transpose: bool,
) -> Option<Vec<T>> {
    let src = f.mapped(name)?;
    let mut dest: Vec<T> = host_vec(rows * cols);
    let out: &mut [u8] = bytemuck::cast_slice_mut(&mut dest);
    debug_assert_eq!(out.len(), src.len());
    let m = Mover {
        f,
        name,
        rows,
        cols,
        transpose,
    };
    match std::mem::size_of::<T>() {
        2 => m.run::<[u8; 2], _, _>(src, bytemuck::cast_slice_mut(out), |x| x),
        4 => m.run::<[u8; 4], _, _>(src, bytemuck::cast_slice_mut(out), |x| x),
        n => unreachable!("{n}-byte elements are widened before loading"),
    }
    Some(dest)
}

/// Tensor `name` of file `f` stored as `dtype` (F32, F16 or BF16; `rows x cols`, any alignment)
/// widened to f32, transposed to `cols x rows` when `transpose`: one pass out of the map into the
/// tensor's own buffer (no widened copy in between); `None` when the file is not mapped.
fn widen_mapped(
    f: &SafeFile,
    name: &str,
    dtype: StDtype,
    rows: usize,
    cols: usize,
    transpose: bool,
) -> Option<Vec<f32>> {
    let src = f.mapped(name)?;
    let mut dest: Vec<f32> = host_vec(rows * cols);
    let m = Mover {
        f,
        name,
        rows,
        cols,
        transpose,
    };
    let bf16 = |b: [u8; 2]| f32::from_bits((u16::from_le_bytes(b) as u32) << 16);
    let f16 = |b: [u8; 2]| half::f16::from_bits(u16::from_le_bytes(b)).to_f32();
    match dtype {
        StDtype::BF16 => m.run(src, &mut dest, bf16),
        StDtype::F16 => m.run(src, &mut dest, f16),
        StDtype::F32 => m.run(src, &mut dest, f32::from_le_bytes),
        other => unreachable!("{} is not widened from the map", other.name()),
    }
    Some(dest)
}

/// One mapped tensor moved into its buffer: `rows x cols` elements of tensor `name` of `f`.
struct Mover<'a> {
    f: &'a SafeFile,
    name: &'a str,
    rows: usize,
    cols: usize,
    transpose: bool,
}

impl Mover<'_> {
    /// `dest` = `conv` of every element of `src` (the tensor's mapped bytes), transposed when
    /// asked, in bands of about [`READ_CHUNK`] source bytes on the rayon pool (a copy in 1 MiB
    /// pieces, a transpose by [`transpose_map`]); each band's pages are dropped from the map as
    /// soon as it is written, so the process holds the model and at most one band of the file,
    /// not a whole tensor (a 400 MiB output head) beside it.
    fn run<S, D, F>(&self, src: &[u8], dest: &mut [D], conv: F)
    where
        S: bytemuck::Pod + Send + Sync,
        D: Send,
        F: Fn(S) -> D + Sync,
    {
        let es = std::mem::size_of::<S>();
        let src: &[S] = bytemuck::cast_slice(src);
        let release = |from: usize, n: usize| {
            self.f
                .release_range(self.name, (from * es) as u64, (n * es) as u64)
        };
        if self.transpose {
            let (rows, cols) = (self.rows, self.cols);
            let band = (READ_CHUNK / (cols * es).max(1)).max(1);
            for r0 in (0..rows).step_by(band) {
                let r1 = (r0 + band).min(rows);
                transpose_map(&src[r0 * cols..r1 * cols], dest, rows, cols, r0, &conv);
                release(r0 * cols, (r1 - r0) * cols);
            }
            return;
        }
        const PIECE: usize = 1 << 20;
        let band = (READ_CHUNK / es).max(1);
        for (i, (d, s)) in dest.chunks_mut(band).zip(src.chunks(band)).enumerate() {
            d.par_chunks_mut(PIECE)
                .zip(s.par_chunks(PIECE))
                .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(o, &x)| *o = conv(x)));
            release(i * band, s.len());
        }
    }
}

/// `dest` (`cols x rows`) = the transpose of `src` (`rows x cols`), on the rayon pool: each
/// task owns 64 output rows (source columns) and walks the source in 64 x 64 tiles, copying the
/// tile's 64 source row pieces (one page each) into a stack tile and writing its 64 output runs
/// from there, so a tile costs 128 page-table lookups rather than one per element. (8 x 8 SSE2
/// blocks in place of the element loop were tried and not kept: 10944 x 2048 bf16 in 10.3-12.0
/// ms either way, the memory traffic is the limit.)
fn transpose_into<E: bytemuck::Pod + Send + Sync>(
    src: &[E],
    dest: &mut [E],
    rows: usize,
    cols: usize,
) {
    transpose_map(src, dest, rows, cols, 0, |x| x);
}

/// [`transpose_into`] of the band of source rows `first..first + band.len() / cols` (`band`
/// holds those rows) into their places in `dest` (`cols x rows`), each element passed through
/// `f` on its way (widening, say).
fn transpose_map<S, D, F>(band: &[S], dest: &mut [D], rows: usize, cols: usize, first: usize, f: F)
where
    S: bytemuck::Pod + Send + Sync,
    D: Send,
    F: Fn(S) -> D + Sync,
{
    const TILE: usize = 64;
    let n = band.len() / cols;
    assert!(
        first + n <= rows && n * cols == band.len(),
        "a band of whole rows"
    );
    dest.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(t, block)| {
            let c0 = t * TILE;
            let w = block.len() / rows;
            let mut tile = [[S::zeroed(); TILE]; TILE];
            for r0 in (0..n).step_by(TILE) {
                let h = TILE.min(n - r0);
                for (dr, trow) in tile.iter_mut().enumerate().take(h) {
                    let at = (r0 + dr) * cols + c0;
                    if w == TILE {
                        *trow = band[at..at + TILE].try_into().expect("a full tile row");
                    } else {
                        trow[..w].copy_from_slice(&band[at..at + w]);
                    }
                }
                for (dc, run) in block.chunks_exact_mut(rows).enumerate() {
                    let run = &mut run[first + r0..first + r0 + h];
                    for (o, trow) in run.iter_mut().zip(&tile) {
                        *o = f(trow[dc]);
                    }
                }
            }
        });
}

/// [`read_typed`] with reads of at most `chunk_bytes` (tests use small ones).
fn read_chunked<T: bytemuck::Pod + burn::tensor::Element>(
    f: &SafeFile,
    name: &str,
    rows: usize,
    cols: usize,
    transpose: bool,
    chunk_bytes: usize,
) -> Result<Vec<T>, DsoptError> {
    let es = std::mem::size_of::<T>();
    let mut dest = vec![T::zeroed(); rows * cols];
    if !transpose {
        let per = (chunk_bytes / es).max(1);
        for (i, chunk) in dest.chunks_mut(per).enumerate() {
            f.read_range(name, (i * per * es) as u64, bytemuck::cast_slice_mut(chunk))?;
        }
        return Ok(dest);
    }
    const TILE: usize = 64;
    let per_chunk = (chunk_bytes / (cols * es).max(1)).max(1).min(rows);
    let mut buf = vec![T::zeroed(); per_chunk * cols];
    let mut r0 = 0;
    while r0 < rows {
        let n = per_chunk.min(rows - r0);
        let chunk = &mut buf[..n * cols];
        f.read_range(
            name,
            (r0 * cols * es) as u64,
            bytemuck::cast_slice_mut(chunk),
        )?;
        let chunk = &*chunk;
        // one task per TILE output rows (= source columns), on the rayon pool
        dest.par_chunks_mut(TILE * rows)
            .enumerate()
            .for_each(|(t, block)| {
                let cb = t * TILE;
                let w = block.len() / rows; // columns in this block (TILE, fewer at the edge)
                let mut tile = [[T::zeroed(); TILE]; TILE];
                for rb in (0..n).step_by(TILE) {
                    let h = TILE.min(n - rb);
                    // rows of the source tile, contiguous reads
                    for (dr, trow) in tile.iter_mut().enumerate().take(h) {
                        let at = (rb + dr) * cols + cb;
                        trow[..w].copy_from_slice(&chunk[at..at + w]);
                    }
                    // columns of the tile become contiguous runs of the output
                    for (dc, out) in block.chunks_exact_mut(rows).enumerate() {
                        let out = &mut out[r0 + rb..r0 + rb + h];
                        for (dr, o) in out.iter_mut().enumerate() {
                            *o = tile[dr][dc];
                        }
                    }
                }
            });
        r0 += n;
    }
    Ok(dest)
}

/// Reads tensors into modules on one device in one dtype, counting what it read.
struct Reader<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    device: &'a B::Device,
    dtype: DType,
    report: LoadReport,
    /// Leave the MoE layers' routed experts out (they are served from elsewhere).
    skip_routed: bool,
}

impl<B: Backend> Reader<'_, B> {
    /// Tensor `name` of PyTorch shape `shape` in the run's dtype, transposed (`[out, in]` to
    /// `[in, out]`) when `transpose`: read as stored when the dtypes agree, else widened to f32,
    /// converted (and transposed) one tensor at a time.
    fn data(
        &mut self,
        name: &str,
        shape: &[usize],
        transpose: bool,
    ) -> Result<TensorData, DsoptError> {
        let d = self.read_data(name, shape, transpose)?;
        let n = d.as_bytes().len() as u64;
        self.report.tensors += 1;
        self.report.model_bytes += n;
        self.report.largest_tensor_bytes = self.report.largest_tensor_bytes.max(n);
        Ok(d)
    }

    fn read_data(
        &mut self,
        name: &str,
        shape: &[usize],
        transpose: bool,
    ) -> Result<TensorData, DsoptError> {
        let (d, bytes) = self.ckpt.data(name, shape, transpose, self.dtype)?;
        self.report.bytes_read += bytes;
        Ok(d)
    }

    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>, DsoptError> {
        let d = self.data(name, &shape, false)?;
        Ok(Tensor::from_data(d, self.device))
    }

    /// A PyTorch linear weight `[out, in]` as Burn's `Linear` (`[in, out]`).
    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear<B>, DsoptError> {
        let w = self.data(name, &[out, inp], true)?;
        Ok(Linear {
            weight: Param::from_tensor(Tensor::from_data(w, self.device)),
            bias: None,
        })
    }

    fn norm(&mut self, name: &str, d: usize, eps: f64) -> Result<RmsNorm<B>, DsoptError> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(self.tensor(name, [d])?),
            epsilon: eps,
        })
    }

    fn swiglu(&mut self, p: &str, d: usize, inter: usize) -> Result<SwiGlu<B>, DsoptError> {
        let w1 = self.linear(&format!("{p}.gate_proj.weight"), inter, d)?;
        let w3 = self.linear(&format!("{p}.up_proj.weight"), inter, d)?;
        let w2 = self.linear(&format!("{p}.down_proj.weight"), d, inter)?;
        Ok(SwiGlu::from_linears(w1, w2, w3))
    }

    fn attention(&mut self, p: &str, c: &DecoderConfig) -> Result<MlaAttention<B>, DsoptError> {
        let a = &c.attention;
        let (d, h) = (c.hidden, a.n_heads);
        let qk = a.qk_nope_head_dim + a.qk_rope_head_dim;
        let query = if a.q_lora_rank == 0 {
            QueryProjection::Direct(self.linear(&format!("{p}.q_proj.weight"), h * qk, d)?)
        } else {
            let r = a.q_lora_rank;
            QueryProjection::LowRank(LowRankQuery::new(
                self.linear(&format!("{p}.q_a_proj.weight"), r, d)?,
                self.norm(&format!("{p}.q_a_layernorm.weight"), r, LATENT_EPS)?,
                self.linear(&format!("{p}.q_b_proj.weight"), h * qk, r)?,
            ))
        };
        let wkv_a = self.linear(
            &format!("{p}.kv_a_proj_with_mqa.weight"),
            a.kv_lora_rank + a.qk_rope_head_dim,
            d,
        )?;
        let kv_norm = self.norm(
            &format!("{p}.kv_a_layernorm.weight"),
            a.kv_lora_rank,
            LATENT_EPS,
        )?;
        let wkv_b = self.linear(
            &format!("{p}.kv_b_proj.weight"),
            h * (a.qk_nope_head_dim + a.v_head_dim),
            a.kv_lora_rank,
        )?;
        let wo = self.linear(&format!("{p}.o_proj.weight"), d, h * a.v_head_dim)?;
        Ok(MlaAttention::from_parts(
            a, query, wkv_a, kv_norm, wkv_b, wo,
        ))
    }

    /// Decoder layer `i` (`model.layers.{i}`; an index past the model's layers is an MTP
    /// layer's block, MoE when the model has MoE).
    fn block(&mut self, c: &DecoderConfig, i: usize) -> Result<Block<B>, DsoptError> {
        let d = c.hidden;
        let p = format!("model.layers.{i}");
        let attn_norm = self.norm(&format!("{p}.input_layernorm.weight"), d, c.rms_norm_eps)?;
        let attn = Attention::Mla(self.attention(&format!("{p}.self_attn"), c)?);
        let ffn_norm = self.norm(
            &format!("{p}.post_attention_layernorm.weight"),
            d,
            c.rms_norm_eps,
        )?;
        let ffn = match &c.moe {
            Some(m) if c.is_moe_layer(i) => Ffn::Moe(self.moe(&format!("{p}.mlp"), m)?),
            _ => Ffn::Dense(self.swiglu(&format!("{p}.mlp"), d, c.dense_ffn_hidden(i))?),
        };
        Ok(Block::from_parts(attn_norm, attn, ffn_norm, ffn))
    }

    /// DeepSeek-V3's MTP layer `model.layers.{L}` (L = the model's layer count) as dsopt's
    /// first MTP module. Its `eh_proj` takes `[enorm(emb); hnorm(h)]` (embedding half first);
    /// dsopt's projection takes `[h; e]`, so the two input halves are exchanged on load. The
    /// layer's own copies of the embedding and output head must equal the main model's (dsopt's
    /// MTP modules share them).
    fn mtp_module(&mut self, c: &DecoderConfig) -> Result<MtpModule<B>, DsoptError> {
        let (d, l) = (c.hidden, c.n_layers);
        let p = format!("model.layers.{l}");
        for (own, main) in [
            (
                format!("{p}.embed_tokens.weight"),
                "model.embed_tokens.weight",
            ),
            (format!("{p}.shared_head.head.weight"), "lm_head.weight"),
        ] {
            if self.ckpt.has(&own) && !self.ckpt.same_bytes(&own, main)? {
                return Err(model_err(
                    &self.ckpt.dir,
                    Some(&own),
                    format!("differs from `{main}`"),
                    "dsopt's MTP modules share the main model's embedding and output head; this \
                     checkpoint's MTP layer has its own, which is not supported",
                ));
            }
        }
        let hnorm = self.norm(&format!("{p}.hnorm.weight"), d, c.rms_norm_eps)?;
        let enorm = self.norm(&format!("{p}.enorm.weight"), d, c.rms_norm_eps)?;
        let eh = self.linear(&format!("{p}.eh_proj.weight"), d, 2 * d)?;
        // Burn's [in, out]: rows 0..d take the embedding, d..2d the hidden state; dsopt's order
        // is [h; e]
        let w = eh.weight.val();
        let w = Tensor::cat(
            vec![w.clone().slice([d..2 * d, 0..d]), w.slice([0..d, 0..d])],
            0,
        );
        let proj = Linear {
            weight: Param::from_tensor(w),
            bias: None,
        };
        let block = self.block(c, l)?;
        let norm = self.norm(&format!("{p}.shared_head.norm.weight"), d, c.rms_norm_eps)?;
        Ok(MtpModule::from_parts(hnorm, enorm, proj, block, norm))
    }

    fn moe(&mut self, p: &str, m: &MoeConfig) -> Result<MoeLayer<B>, DsoptError> {
        let (d, e) = (m.dim, m.router.n_routed_experts);
        let gate = self.linear(&format!("{p}.gate.weight"), e, d)?;
        let bias = if m.router.topk_method == TopkMethod::NoauxTc {
            let (b, bytes) = self
                .ckpt
                .read(&format!("{p}.gate.e_score_correction_bias"), &[e])?;
            self.report.tensors += 1;
            self.report.bytes_read += bytes;
            self.report.model_bytes += 4 * e as u64;
            b
        } else {
            vec![0.0; e]
        };
        let n_loaded = if self.skip_routed { 0 } else { e };
        let experts = (0..n_loaded)
            .map(|j| self.swiglu(&format!("{p}.experts.{j}"), d, m.moe_inter_dim))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = (m.n_shared_experts > 0)
            .then(|| {
                self.swiglu(
                    &format!("{p}.shared_experts"),
                    d,
                    m.n_shared_experts * m.moe_inter_dim,
                )
            })
            .transpose()?;
        Ok(MoeLayer {
            router: MoeRouter::from_parts(gate, bias, m.router.clone()),
            experts,
            shared,
            shape_buckets: m.shape_buckets,
        })
    }
}

/// DeepSeek-V3's MTP layer (`model.layers.{L}`, L = `c.n_layers`) as a one-module
/// [`MtpPredictor`], or `None` when the checkpoint has none.
/// What it read is added to `report`.
pub fn load_mtp<B: Backend>(
    ckpt: &Checkpoint,
    c: &DecoderConfig,
    device: &B::Device,
    dtype: DType,
    report: &mut LoadReport,
) -> Result<Option<MtpPredictor<B>>, DsoptError> {
    if !ckpt.has(&format!("model.layers.{}.eh_proj.weight", c.n_layers)) {
        return Ok(None);
    }
    let t0 = Instant::now();
    let mut r = Reader::<B> {
        ckpt,
        device,
        dtype,
        report: LoadReport::default(),
        skip_routed: false,
    };
    let mtp = MtpPredictor::from_modules(vec![r.mtp_module(c)?]);
    report.tensors += r.report.tensors;
    report.bytes_read += r.report.bytes_read;
    report.model_bytes += r.report.model_bytes;
    report.largest_tensor_bytes = report
        .largest_tensor_bytes
        .max(r.report.largest_tensor_bytes);
    report.seconds += t0.elapsed().as_secs_f64();
    Ok(Some(mtp))
}

/// Builds the decoder `c` from the checkpoint's tensors in `dtype` on `device`, reporting each
/// layer on stderr unless `quiet`.
pub fn load_decoder<B: Backend>(
    ckpt: &Checkpoint,
    c: &DecoderConfig,
    device: &B::Device,
    dtype: DType,
    quiet: bool,
) -> Result<(Decoder<B>, LoadReport), DsoptError> {
    load_decoder_with(ckpt, c, device, dtype, quiet, false)
}

/// [`load_decoder`] without the MoE layers' routed experts (never read: they are served from an
/// expert store), as [`DecoderConfig::init_without_routed_experts`] builds a random one.
pub fn load_decoder_without_routed_experts<B: Backend>(
    ckpt: &Checkpoint,
    c: &DecoderConfig,
    device: &B::Device,
    dtype: DType,
    quiet: bool,
) -> Result<(Decoder<B>, LoadReport), DsoptError> {
    load_decoder_with(ckpt, c, device, dtype, quiet, true)
}

fn load_decoder_with<B: Backend>(
    ckpt: &Checkpoint,
    c: &DecoderConfig,
    device: &B::Device,
    dtype: DType,
    quiet: bool,
    skip_routed: bool,
) -> Result<(Decoder<B>, LoadReport), DsoptError> {
    let t0 = Instant::now();
    let heap0 = crate::monitor::alloc::reset_peak();
    let mut r = Reader::<B> {
        ckpt,
        device,
        dtype,
        report: LoadReport::default(),
        skip_routed,
    };
    let (d, v) = (c.hidden, c.vocab_size);
    let embed = Embedding {
        weight: Param::from_tensor(r.tensor("model.embed_tokens.weight", [v, d])?),
    };
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        layers.push(r.block(c, i)?);
        if !quiet {
            let s = t0.elapsed().as_secs_f64();
            eprintln!(
                "loading: layer {}/{}, {:.1} MB read, {:.0} MB/s",
                i + 1,
                c.n_layers,
                r.report.bytes_read as f64 / 1e6,
                r.report.bytes_read as f64 / 1e6 / s.max(1e-9)
            );
        }
    }
    let norm = r.norm("model.norm.weight", d, c.rms_norm_eps)?;
    let head = r.linear("lm_head.weight", v, d)?;
    let mut report = r.report;
    report.seconds = t0.elapsed().as_secs_f64();
    report.host_peak_bytes = heap0
        .zip(crate::monitor::alloc::peak())
        .map(|(a, b)| b.saturating_sub(a));
    Ok((Decoder::from_parts(embed, layers, norm, head), report))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transposing reads in chunks of a few rows and 64 x 64 tiles with cropped edges equal a
    /// plain transpose, for 2- and 4-byte elements; without a transpose the bytes are as stored;
    /// the same out of the file's memory map.
    #[test]
    fn chunked_tiled_transpose_is_a_transpose() {
        let (rows, cols) = (70, 133);
        let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let b: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
        let mut data: Vec<u8> = bytemuck::cast_slice(&v).to_vec();
        let n32 = data.len();
        data.extend_from_slice(bytemuck::cast_slice(&b));
        let n16 = data.len();
        data.extend_from_slice(bytemuck::cast_slice(&h));
        // the header's length is left unpadded: the tensors start at odd offsets
        let header = format!(
            r#"{{"a":{{"dtype":"F32","shape":[{rows},{cols}],"data_offsets":[0,{n32}]}},"b":{{"dtype":"BF16","shape":[{rows},{cols}],"data_offsets":[{n32},{n16}]}},"c":{{"dtype":"F16","shape":[{rows},{cols}],"data_offsets":[{n16},{}]}}}}"#,
            data.len()
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&data);
        std::fs::write(&p, bytes).unwrap();
        let f = SafeFile::open(&p).unwrap();
        let want: Vec<f32> = (0..cols)
            .flat_map(|c| (0..rows).map(move |r| (r * cols + c) as f32))
            .collect();
        for chunk in [1, 3 * cols * 4, 1 << 20] {
            let t: Vec<f32> = read_chunked(&f, "a", rows, cols, true, chunk).unwrap();
            assert_eq!(t, want, "f32, chunk {chunk}");
            let t: Vec<half::bf16> = read_chunked(&f, "b", rows, cols, true, chunk).unwrap();
            let t: Vec<f32> = t.iter().map(|x| x.to_f32()).collect();
            let w: Vec<f32> = want
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect();
            assert_eq!(t, w, "bf16, chunk {chunk}");
            let t: Vec<f32> = read_chunked(&f, "a", 1, rows * cols, false, chunk).unwrap();
            assert_eq!(t, v, "untransposed, chunk {chunk}");
        }
        assert!(f.mapped("a").is_some(), "the file is mapped");
        let t: Vec<f32> = read_typed(&f, "a", rows, cols, true).unwrap();
        assert_eq!(t, want, "mapped f32");
        let t: Vec<half::bf16> = read_typed(&f, "b", rows, cols, true).unwrap();
        assert!(
            t.iter()
                .zip(&want)
                .all(|(x, &w)| x.to_f32() == half::bf16::from_f32(w).to_f32()),
            "mapped bf16"
        );
        let t: Vec<f32> = read_typed(&f, "a", rows, cols, false).unwrap();
        assert_eq!(t, v, "mapped, untransposed");
        // widened to f32 on the way out of the map (the values are exact in every dtype)
        for (name, dtype) in [
            ("a", StDtype::F32),
            ("b", StDtype::BF16),
            ("c", StDtype::F16),
        ] {
            let rounded = |x: f32| match dtype {
                StDtype::BF16 => half::bf16::from_f32(x).to_f32(),
                StDtype::F16 => half::f16::from_f32(x).to_f32(),
                _ => x,
            };
            let t = widen_mapped(&f, name, dtype, rows, cols, true).unwrap();
            let w: Vec<f32> = want.iter().map(|&x| rounded(x)).collect();
            assert_eq!(t, w, "{name} widened and transposed");
            let t = widen_mapped(&f, name, dtype, rows, cols, false).unwrap();
            let w: Vec<f32> = v.iter().map(|&x| rounded(x)).collect();
            assert_eq!(t, w, "{name} widened");
        }
    }
}
