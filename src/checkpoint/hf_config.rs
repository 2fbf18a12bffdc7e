//! Hugging Face `config.json` 的解析与检查：得到 [`DeepseekConfig`]。
//!
//! 只读取会改变计算的键，并逐个检查；不改变计算的键（`architectures`、`bos_token_id`、
//! `initializer_range` …）一律忽略。不支持的取值、缺少的键、与其他键矛盾的尺寸、荒谬的尺寸
//! （例如 10^12 个专家）都以退出码 2 报错，写明文件、键与修改办法；在检查之前不按声明的尺寸
//! 分配任何东西（参数量用 u128 解析计算）。
//!
//! 两种 RoPE 写法都接受：旧的 `rope_theta` + `rope_scaling`（`type` 或 `rope_type`），以及较新
//! transformers 保存的 `rope_parameters`（`rope_theta` 与 `rope_type` 都在里面）。较新的保存还写
//! `"head_dim": <qk_rope_head_dim>`（RoPE 宽度，不是每头宽度）与 `dtype`（代替 `torch_dtype`）。

use serde_json::{Map, Value};

use super::model::{DeepseekConfig, Fp8Blocks, ModelType, MoeSpec, TopkMethod};
use crate::config::Dtype;
use crate::error::DsoptError;
use crate::nn::moe::ScoreFunc;
use crate::nn::rope::Yarn;

/// The largest `config.json` read (a real one is a few KB).
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Upper bounds on sizes, far above every published model (V3: hidden 7168, 61 layers, 256
/// experts, vocabulary 129280): a value past them is a damaged or hostile file.
const LIMITS: &[(&str, u64)] = &[
    ("vocab_size", 4_194_304),
    ("hidden_size", 65_536),
    ("intermediate_size", 1_048_576),
    ("moe_intermediate_size", 1_048_576),
    ("num_hidden_layers", 1_024),
    ("num_attention_heads", 1_024),
    ("q_lora_rank", 65_536),
    ("kv_lora_rank", 65_536),
    ("qk_nope_head_dim", 4_096),
    ("qk_rope_head_dim", 4_096),
    ("v_head_dim", 4_096),
    ("n_routed_experts", 65_536),
    ("n_shared_experts", 1_024),
    ("num_experts_per_tok", 65_536),
    ("n_group", 65_536),
    ("topk_group", 65_536),
    ("first_k_dense_replace", 1_024),
    ("num_nextn_predict_layers", 16),
    ("max_position_embeddings", 1 << 30),
];

/// Reads a checkpoint's `config.json`.
pub fn read_config_file(path: &std::path::Path) -> Result<DeepseekConfig, DsoptError> {
    let name = path.display().to_string();
    let err = |message: String, fix: &str| DsoptError::Model {
        source_name: name.clone(),
        key: None,
        message,
        fix: fix.into(),
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        err(
            format!("cannot read: {e}"),
            "point --model at a folder holding the checkpoint's config.json",
        )
    })?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(err(
            format!(
                "is {} bytes; a config.json is a few KB (at most {MAX_CONFIG_BYTES} read)",
                meta.len()
            ),
            "check that this is the model's config.json",
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read: {e}"), "check the file's permissions"))?;
    parse_config(&name, &text)
}

/// Parses and checks `config.json` text; `source` names it in errors.
pub fn parse_config(source: &str, text: &str) -> Result<DeepseekConfig, DsoptError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DsoptError::Model {
        source_name: source.into(),
        key: None,
        message: format!("is not valid JSON: {e}"),
        fix: "use the config.json saved with the checkpoint".into(),
    })?;
    let Value::Object(obj) = value else {
        return Err(DsoptError::Model {
            source_name: source.into(),
            key: None,
            message: "is not a JSON object".into(),
            fix: "use the config.json saved with the checkpoint".into(),
        });
    };
    let r = Reader { source, obj: &obj };
    let cfg = r.config()?;
    cfg.check()
        .map_err(|(key, message, fix)| r.fail(&key, message, &fix))?;
    Ok(cfg)
}

/// Typed access to one JSON object, with errors that name the source and the key.
struct Reader<'a> {
    source: &'a str,
    obj: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn fail(&self, key: &str, message: impl Into<String>, fix: &str) -> DsoptError {
        DsoptError::Model {
            source_name: self.source.into(),
            key: Some(key.into()),
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// The value of `key`, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, DsoptError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = v.as_u64().ok_or_else(|| {
            self.fail(
                key,
                format!("is {v}, must be a whole number >= 0"),
                "use the value saved with the checkpoint",
            )
        })?;
        if let Some((_, max)) = LIMITS.iter().find(|(k, _)| *k == key) {
            if n > *max {
                return Err(self.fail(
                    key,
                    format!("is {n}, more than {max} (far above any published model)"),
                    "check that this config.json is not damaged",
                ));
            }
        }
        usize::try_from(n).map(Some).map_err(|_| {
            self.fail(
                key,
                format!("{n} does not fit this machine's word size"),
                "",
            )
        })
    }

    fn usize(&self, key: &str) -> Result<usize, DsoptError> {
        self.opt_usize(key)?.ok_or_else(|| {
            self.fail(
                key,
                "is missing",
                "add it from the model's published config.json",
            )
        })
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize, DsoptError> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, DsoptError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(self.fail(
                key,
                format!("is {v}, must be a finite number"),
                "use the value saved with the checkpoint",
            )),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, DsoptError> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, DsoptError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.fail(key, format!("is {v}, must be true or false"), "")),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>, DsoptError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.fail(key, format!("is {v}, must be a string"), "")),
        }
    }

    /// A key whose only supported value is `want` (absent = `default`).
    fn require_bool(
        &self,
        key: &str,
        default: bool,
        want: bool,
        why: &str,
    ) -> Result<(), DsoptError> {
        let v = self.opt_bool(key)?.unwrap_or(default);
        if v != want {
            return Err(self.fail(
                key,
                format!("is {v}; dsopt supports only {want} ({why})"),
                "use a DeepSeek V2/V3-family checkpoint",
            ));
        }
        Ok(())
    }

    fn config(&self) -> Result<DeepseekConfig, DsoptError> {
        let model_type =
            match self.opt_str("model_type")? {
                Some("deepseek_v2") => ModelType::DeepseekV2,
                Some("deepseek_v3") => ModelType::DeepseekV3,
                Some("kimi_k2") => ModelType::KimiK2,
                Some(other) => return Err(self.fail(
                    "model_type",
                    format!("`{other}` is not a DeepSeek architecture"),
                    "dsopt reads deepseek_v2, deepseek_v3 (also Moonlight) and kimi_k2 checkpoints",
                )),
                None => {
                    return Err(self.fail(
                        "model_type",
                        "is missing",
                        "add \"model_type\": \"deepseek_v3\" (or deepseek_v2)",
                    ))
                }
            };
        // keys that change the computation and have one supported value
        match self.opt_str("hidden_act")?.unwrap_or("silu") {
            "silu" => {}
            other => {
                return Err(self.fail(
                    "hidden_act",
                    format!("`{other}` is not supported"),
                    "DeepSeek models use silu (SwiGLU); only that is implemented",
                ))
            }
        }
        self.require_bool(
            "attention_bias",
            false,
            false,
            "DeepSeek projections have no bias",
        )?;
        self.require_bool(
            "tie_word_embeddings",
            false,
            false,
            "embedding and output head are separate tensors in every DeepSeek release",
        )?;
        self.require_bool("rope_interleave", true, true, "RoPE pairs are adjacent elements in DeepSeek's layout; half-split pairs are not implemented")?;
        let freq = self.usize_or("moe_layer_freq", 1)?;
        if freq != 1 {
            return Err(self.fail(
                "moe_layer_freq",
                format!("is {freq}; only 1 (every layer after the dense ones is MoE) is supported"),
                "every DeepSeek release uses 1",
            ));
        }
        let dtype = self.dtype()?;
        let quantization = self.quantization()?;
        let (rope_theta, rope_scaling) = self.rope()?;
        let moe = self.moe(model_type)?;
        Ok(DeepseekConfig {
            model_type,
            vocab_size: self.usize("vocab_size")?,
            hidden_size: self.usize("hidden_size")?,
            intermediate_size: self.usize("intermediate_size")?,
            num_hidden_layers: self.usize("num_hidden_layers")?,
            num_attention_heads: self.usize("num_attention_heads")?,
            q_lora_rank: self.opt_usize("q_lora_rank")?,
            kv_lora_rank: self.usize("kv_lora_rank")?,
            qk_nope_head_dim: self.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: self.usize("qk_rope_head_dim")?,
            v_head_dim: self.usize("v_head_dim")?,
            // absent keys take the defaults of transformers' config class (which makes the
            // reference logits): DeepseekV2Config 0, DeepseekV3Config 3
            first_k_dense_replace: self.usize_or(
                "first_k_dense_replace",
                if model_type == ModelType::DeepseekV2 {
                    0
                } else {
                    3
                },
            )?,
            moe,
            rms_norm_eps: self.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.opt_usize("max_position_embeddings")?,
            num_nextn_predict_layers: self.usize_or("num_nextn_predict_layers", 0)?,
            dtype,
            quantization,
        })
    }

    /// `dtype` (newer saves) or `torch_dtype`.
    fn dtype(&self) -> Result<Option<Dtype>, DsoptError> {
        let key = if self.get("dtype").is_some() {
            "dtype"
        } else {
            "torch_dtype"
        };
        Ok(match self.opt_str(key)? {
            None => None,
            Some("bfloat16") => Some(Dtype::Bf16),
            Some("float16") => Some(Dtype::F16),
            Some("float32") => Some(Dtype::F32),
            Some(other) => {
                return Err(self.fail(
                    key,
                    format!("`{other}` is not supported"),
                    "dsopt runs bfloat16, float16 or float32 (FP8 weights are declared in quantization_config)",
                ))
            }
        })
    }

    /// `quantization_config`: only FP8 e4m3 with 128x128 block scales (DeepSeek-V3's format).
    fn quantization(&self) -> Result<Option<Fp8Blocks>, DsoptError> {
        let Some(q) = self.get("quantization_config") else {
            return Ok(None);
        };
        let key = "quantization_config";
        let Value::Object(q) = q else {
            return Err(self.fail(key, format!("is {q}, must be an object"), ""));
        };
        let fix = "dsopt reads FP8 e4m3 weights with 128x128 block scales (DeepSeek-V3's format) or unquantised weights";
        let method = q.get("quant_method").and_then(Value::as_str);
        let fmt = q.get("fmt").and_then(Value::as_str).unwrap_or("e4m3");
        if method != Some("fp8") || fmt != "e4m3" {
            return Err(self.fail(
                key,
                format!("quant_method {method:?} fmt `{fmt}` is not supported"),
                fix,
            ));
        }
        let block: Option<Vec<u64>> = q
            .get("weight_block_size")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect());
        match block.as_deref() {
            Some([128, 128]) => Ok(Some(Fp8Blocks { block: [128, 128] })),
            other => Err(self.fail(
                "quantization_config.weight_block_size",
                format!("is {other:?}; only [128, 128] is supported"),
                fix,
            )),
        }
    }

    /// RoPE base and YaRN from either form (`rope_parameters`, or `rope_theta` + `rope_scaling`).
    fn rope(&self) -> Result<(f64, Option<Yarn>), DsoptError> {
        let (key, params, theta) = match self.get("rope_parameters") {
            Some(Value::Object(p)) => {
                let inner = Reader {
                    source: self.source,
                    obj: p,
                };
                let theta = inner
                    .opt_f64("rope_theta")
                    .map_err(|_| {
                        self.fail("rope_parameters.rope_theta", "must be a finite number", "")
                    })?
                    .or(self.opt_f64("rope_theta")?)
                    .unwrap_or(10000.0);
                ("rope_parameters", Some(p), theta)
            }
            Some(v) => {
                return Err(self.fail("rope_parameters", format!("is {v}, must be an object"), ""))
            }
            None => {
                let theta = self.f64_or("rope_theta", 10000.0)?;
                match self.get("rope_scaling") {
                    None => ("rope_scaling", None, theta),
                    Some(Value::Object(p)) => ("rope_scaling", Some(p), theta),
                    Some(v) => {
                        return Err(self.fail(
                            "rope_scaling",
                            format!("is {v}, must be an object or null"),
                            "",
                        ))
                    }
                }
            }
        };
        if theta.is_nan() || theta <= 0.0 {
            return Err(self.fail("rope_theta", format!("is {theta}, must be positive"), ""));
        }
        let Some(p) = params else {
            return Ok((theta, None));
        };
        let r = Reader {
            source: self.source,
            obj: p,
        };
        let kind = r
            .opt_str("rope_type")
            .ok()
            .flatten()
            .or(r.opt_str("type").ok().flatten())
            .unwrap_or("default");
        match kind {
            "default" => return Ok((theta, None)),
            "yarn" => {}
            other => return Err(self.fail(
                &format!("{key}.rope_type"),
                format!("`{other}` is not supported"),
                "DeepSeek models use yarn (or none); only default and yarn RoPE are implemented",
            )),
        }
        for unsupported in ["attention_factor", "truncate"] {
            if let Some(v) = r.get(unsupported) {
                // transformers' defaults are the only values implemented
                let default = unsupported == "truncate" && v.as_bool() == Some(true);
                if !default {
                    return Err(self.fail(
                        &format!("{key}.{unsupported}"),
                        format!("is {v}; not implemented"),
                        "no DeepSeek release sets it: remove the key",
                    ));
                }
            }
        }
        let sub = |k: &str| format!("{key}.{k}");
        let num = |k: &str| {
            r.opt_f64(k)
                .map_err(|_| self.fail(&sub(k), "must be a finite number", ""))
        };
        let factor = num("factor")?.ok_or_else(|| {
            self.fail(
                &sub("factor"),
                "is missing",
                "add the YaRN factor (DeepSeek: 40)",
            )
        })?;
        let original = r
            .opt_usize("original_max_position_embeddings")
            .map_err(|_| {
                self.fail(
                    &sub("original_max_position_embeddings"),
                    "must be a whole number",
                    "",
                )
            })?
            .ok_or_else(|| {
                self.fail(
                    &sub("original_max_position_embeddings"),
                    "is missing",
                    "add it (DeepSeek: 4096)",
                )
            })?;
        let yarn = Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast: num("beta_fast")?.unwrap_or(32.0),
            beta_slow: num("beta_slow")?.unwrap_or(1.0),
            mscale: num("mscale")?,
            mscale_all_dim: num("mscale_all_dim")?,
        };
        if yarn.factor.is_nan()
            || yarn.factor < 1.0
            || original == 0
            || !(yarn.beta_fast > yarn.beta_slow && yarn.beta_slow > 0.0)
        {
            return Err(self.fail(
                key,
                format!("YaRN needs factor >= 1, original_max_position_embeddings >= 1 and beta_fast > beta_slow > 0; got {yarn:?}"),
                "use the checkpoint's published values (DeepSeek: factor 40, 4096, 32, 1)",
            ));
        }
        Ok((theta, Some(yarn)))
    }

    /// The MoE keys; `None` for a dense model (`n_routed_experts` absent or null).
    fn moe(&self, model_type: ModelType) -> Result<Option<MoeSpec>, DsoptError> {
        let Some(n_routed_experts) = self.opt_usize("n_routed_experts")? else {
            return Ok(None);
        };
        let scoring_func = match self.opt_str("scoring_func")?.unwrap_or(match model_type {
            ModelType::DeepseekV2 => "softmax",
            _ => "sigmoid",
        }) {
            "softmax" => ScoreFunc::Softmax,
            "sigmoid" => ScoreFunc::Sigmoid,
            other => {
                return Err(self.fail(
                    "scoring_func",
                    format!("`{other}` is not supported"),
                    "use softmax (V2) or sigmoid (V3)",
                ))
            }
        };
        let topk_method = match self.opt_str("topk_method")?.unwrap_or(match model_type {
            ModelType::DeepseekV2 => "greedy",
            _ => "noaux_tc",
        }) {
            "greedy" => TopkMethod::Greedy,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            "noaux_tc" => TopkMethod::NoauxTc,
            other => {
                return Err(self.fail(
                    "topk_method",
                    format!("`{other}` is not supported"),
                    "use greedy, group_limited_greedy or noaux_tc",
                ))
            }
        };
        // transformers (which makes the reference logits) routes a deepseek_v3 model with
        // sigmoid + noaux_tc whatever these keys say, and V2 has no noaux_tc: refuse a
        // combination where dsopt and the reference would silently differ
        let v3_like = model_type != ModelType::DeepseekV2;
        if v3_like && (topk_method != TopkMethod::NoauxTc || scoring_func != ScoreFunc::Sigmoid) {
            return Err(self.fail(
                "topk_method",
                format!("{topk_method:?} with {scoring_func:?} scores in a {model_type:?} model: the reference implementation routes every deepseek_v3 model with sigmoid + noaux_tc"),
                "set \"scoring_func\": \"sigmoid\" and \"topk_method\": \"noaux_tc\", or model_type deepseek_v2",
            ));
        }
        if !v3_like && topk_method == TopkMethod::NoauxTc {
            return Err(self.fail(
                "topk_method",
                "noaux_tc is a DeepSeek-V3 routing method; deepseek_v2 has greedy and group_limited_greedy",
                "use model_type deepseek_v3 for noaux_tc routing",
            ));
        }
        if !v3_like && scoring_func == ScoreFunc::Sigmoid {
            return Err(self.fail(
                "scoring_func",
                "sigmoid in a deepseek_v2 model: the reference implementation's DeepseekV2 router always uses softmax",
                "remove the key (or set softmax), or use model_type deepseek_v3 for sigmoid routing",
            ));
        }
        // absent keys take the defaults of transformers' DeepseekV2Config / DeepseekV3Config
        let (shared, groups, keep, norm, scale) = if v3_like {
            (1, 8, 4, true, 2.5)
        } else {
            (2, 1, 1, false, 1.0)
        };
        Ok(Some(MoeSpec {
            n_routed_experts,
            n_shared_experts: self.usize_or("n_shared_experts", shared)?,
            num_experts_per_tok: self.usize("num_experts_per_tok")?,
            moe_intermediate_size: self.usize("moe_intermediate_size")?,
            scoring_func,
            topk_method,
            n_group: self.usize_or("n_group", groups)?,
            topk_group: self.usize_or("topk_group", keep)?,
            norm_topk_prob: self.opt_bool("norm_topk_prob")?.unwrap_or(norm),
            routed_scaling_factor: self.f64_or("routed_scaling_factor", scale)?,
        }))
    }
}
