//! 从 Hugging Face 检查点（safetensors，单文件或分片 + `model.safetensors.index.json`）构建
//! dsopt 的 [`Decoder`]：张量名与 transformers 的 `DeepseekV2ForCausalLM` /
//! `DeepseekV3ForCausalLM` 相同，每个张量先检查形状，再读入（不先随机初始化）。
//!
//! Weight layout (decided once, see the note of issue 28): PyTorch stores a linear weight as
//! `[out, in]`; Burn's `Linear` keeps `[in, out]`, and dsopt's CPU decode kernels stream those
//! rows. The transpose is done on the host while the tensor is widened/converted to the run's
//! dtype (one pass, one tensor at a time), so a loaded model is the same kind of module as a
//! randomly initialised one and every fast path applies to it unchanged. The host holds at most
//! the model plus one tensor in f32 while loading.

use std::collections::BTreeMap;
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
            rms_norm_eps: self.rms_norm_eps,
        }
    }
}

/// The ε of the latent norms `q_a_layernorm` and `kv_a_layernorm`: transformers (and DeepSeek's
/// `inference/model.py`) build them with the default 1e-6 whatever `rms_norm_eps` says.
const LATENT_EPS: f64 = 1e-6;

/// The safetensors files of a checkpoint directory, and which file holds each tensor.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafeFile>,
    index: BTreeMap<String, usize>,
    fp8_block: Option<usize>,
}

/// What loading took.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Tensors read.
    pub tensors: usize,
    /// Bytes read from the files.
    pub bytes_read: u64,
    /// Wall time of the whole load, seconds.
    pub seconds: f64,
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

    /// Tensor `name` as f32 with the shape `shape` (checked); FP8 weights dequantised with their
    /// `{name}_scale_inv` block scales. Returns the values and the bytes read.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<(Vec<f32>, u64), DsoptError> {
        let f = self.file_of(name)?;
        let info = f.info(name).expect("indexed").clone();
        if info.shape != shape {
            return Err(model_err(
                f.path(),
                Some(name),
                format!("has shape {:?}; config.json implies {shape:?}", info.shape),
                "the checkpoint and its config.json disagree: use the config.json it was saved with",
            ));
        }
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
            let (scale, sbytes) = self.read(&sname, &sshape)?;
            let q = f.read_bytes(name)?;
            return Ok((dequantize_fp8(&q, rows, cols, &scale, bs), bytes + sbytes));
        }
        Ok((f.read_f32(name)?, bytes))
    }
}

/// Reads tensors into modules on one device in one dtype, counting what it read.
struct Reader<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    device: &'a B::Device,
    dtype: DType,
    report: LoadReport,
}

impl<B: Backend> Reader<'_, B> {
    fn tensor<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<B, D>, DsoptError> {
        let (v, bytes) = self.ckpt.read(name, &shape)?;
        self.report.tensors += 1;
        self.report.bytes_read += bytes;
        Ok(Tensor::from_data(
            TensorData::new(v, shape).convert_dtype(self.dtype),
            self.device,
        ))
    }

    /// A PyTorch linear weight `[out, in]` as Burn's `Linear` (`[in, out]`).
    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<Linear<B>, DsoptError> {
        let (v, bytes) = self.ckpt.read(name, &[out, inp])?;
        self.report.tensors += 1;
        self.report.bytes_read += bytes;
        let mut t = vec![0f32; v.len()];
        for (o, row) in v.chunks_exact(inp).enumerate() {
            for (i, &x) in row.iter().enumerate() {
                t[i * out + o] = x;
            }
        }
        drop(v);
        let w = TensorData::new(t, [inp, out]).convert_dtype(self.dtype);
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

    fn moe(&mut self, p: &str, m: &MoeConfig) -> Result<MoeLayer<B>, DsoptError> {
        let (d, e) = (m.dim, m.router.n_routed_experts);
        let gate = self.linear(&format!("{p}.gate.weight"), e, d)?;
        let bias = if m.router.topk_method == TopkMethod::NoauxTc {
            let (b, bytes) = self
                .ckpt
                .read(&format!("{p}.gate.e_score_correction_bias"), &[e])?;
            self.report.tensors += 1;
            self.report.bytes_read += bytes;
            b
        } else {
            vec![0.0; e]
        };
        let experts = (0..e)
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

/// Builds the decoder `c` from the checkpoint's tensors in `dtype` on `device`, reporting each
/// layer on stderr unless `quiet`.
pub fn load_decoder<B: Backend>(
    ckpt: &Checkpoint,
    c: &DecoderConfig,
    device: &B::Device,
    dtype: DType,
    quiet: bool,
) -> Result<(Decoder<B>, LoadReport), DsoptError> {
    let t0 = Instant::now();
    let mut r = Reader::<B> {
        ckpt,
        device,
        dtype,
        report: LoadReport {
            tensors: 0,
            bytes_read: 0,
            seconds: 0.0,
        },
    };
    let (d, v) = (c.hidden, c.vocab_size);
    let embed = Embedding {
        weight: Param::from_tensor(r.tensor("model.embed_tokens.weight", [v, d])?),
    };
    let mut layers = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        let attn_norm = r.norm(&format!("{p}.input_layernorm.weight"), d, c.rms_norm_eps)?;
        let attn = Attention::Mla(r.attention(&format!("{p}.self_attn"), c)?);
        let ffn_norm = r.norm(
            &format!("{p}.post_attention_layernorm.weight"),
            d,
            c.rms_norm_eps,
        )?;
        let ffn = match &c.moe {
            Some(m) if c.is_moe_layer(i) => Ffn::Moe(r.moe(&format!("{p}.mlp"), m)?),
            _ => Ffn::Dense(r.swiglu(&format!("{p}.mlp"), d, c.ffn_hidden)?),
        };
        layers.push(Block::from_parts(attn_norm, attn, ffn_norm, ffn));
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
    Ok((Decoder::from_parts(embed, layers, norm, head), report))
}
