//! `--model`（或场景 `[model]` 的 `preset` / `path`）：把一个模型放进场景。
//!
//! - `mla`（SC-001）：吸收 MLA（潜向量缓存）对 num_attention_heads 个 v_head_dim 宽的 MHA（以及约四分之一
//!   KV 头的 GQA）。检查点里没有 MHA 的权重，而内存与速度不依赖权重取值，所以权重总是随机的。每层的 FFN
//!   是 `intermediate_size` 宽的稠密 SwiGLU：MoE 层的专家不构建（SC-001 量的是注意力与 KV 缓存的
//!   运行期内存，权重之上的部分），报告里写明这一点。
//! - `moe`（SC-003）：目录里有权重时 MoE 变体就是加载的检查点，否则三个变体都是随机权重的 MHA 模型。
//! - `mtp`（SC-002）：带 MTP 层的检查点，主模型与 MTP 层都用它的权重。

use super::ModelSpec;
use crate::config::scenario::{ModelOrigin, Scenario};
use crate::error::DsoptError;

/// The model a run uses: `--model` (with `--layers`) when given, otherwise the scenario's own
/// `[model] preset` / `path` (with its `layers`, which `--layers` overrides); its dimensions go
/// into `s` through [`apply_model`]. `--layers` with no model anywhere is a usage error.
pub fn apply_model_source(
    s: &mut Scenario,
    cli_model: Option<&str>,
    cli_layers: Option<usize>,
    file: &str,
) -> Result<(), DsoptError> {
    let (name, layers, from_file) = match (cli_model, s.model_ref()) {
        (Some(m), _) => (m.to_string(), cli_layers, false),
        (None, Some(r)) => (
            r.model.clone(),
            cli_layers.or(r.layers),
            cli_layers.is_none() && r.layers.is_some(),
        ),
        (None, None) => {
            return match cli_layers {
                None => Ok(()),
                Some(_) => Err(DsoptError::Usage(format!(
                "--layers keeps the first N layers of a model, but neither --model nor {file}'s \
                     [model] (preset = … or path = …) names one; add --model deepseek-v2-lite \
                     (or another preset, or a checkpoint folder)"
            ))),
            }
        }
    };
    // a layer count written in the file is named as the file's key, not as the flag
    let named = |e: DsoptError| match e {
        DsoptError::Usage(m) if from_file => {
            DsoptError::Usage(m.replace("--layers", &format!("{file}: [model] layers")))
        }
        other => other,
    };
    let spec = super::resolve(&name, layers).map_err(named)?;
    apply_model(s, &spec, file).map_err(named)
}

/// The GQA baseline's K/V heads for `n` query heads: the largest proper divisor of `n` that is
/// at most a quarter of it (1 for up to 7 heads; 4 of 16, 2 of 14, 3 of 18).
fn gqa_heads(n: usize) -> usize {
    (1..=(n / 4).max(1))
        .rev()
        .find(|d| n.is_multiple_of(*d))
        .unwrap_or(1)
}

/// Puts the model `spec` into scenario `s` (before the command-line overrides): `mla`, `moe`
/// and `mtp` scenarios; other kinds are refused with exit 2 (not implemented yet).
pub fn apply_model(s: &mut Scenario, spec: &ModelSpec, file: &str) -> Result<(), DsoptError> {
    if let Scenario::Moe(m) = s {
        return apply_to_moe(m, spec, file);
    }
    if let Scenario::Mtp(m) = s {
        return apply_to_mtp(m, spec);
    }
    if let Scenario::Model(m) = s {
        return apply_to_model(m, spec);
    }
    let Scenario::Mla(m) = s else {
        return Err(DsoptError::Usage(format!(
            "--model: {file} is a `{}` scenario; --model is implemented for `mla` (SC-001), \
             `moe` (SC-003), `mtp` (SC-002, a checkpoint with an MTP layer) and `model` (FR-004) \
             so far",
            s.kind().as_str()
        )));
    };
    let c = &spec.config;
    set_model_shape(&mut m.model, c);
    let a = &mut m.attention;
    // SC-001's baseline: an MHA of n_heads heads of v_head_dim, and a GQA of a quarter of them
    a.head_dim = c.v_head_dim;
    a.gqa_kv_heads = gqa_heads(c.num_attention_heads);
    a.kv_lora_rank = c.kv_lora_rank;
    a.q_lora_rank = c.q_lora_rank;
    a.qk_nope_head_dim = c.qk_nope_head_dim;
    a.qk_rope_head_dim = c.qk_rope_head_dim;
    a.v_head_dim = c.v_head_dim;
    if a.gqa_kv_heads >= c.num_attention_heads {
        // one or two heads: no GQA to compare with
        a.variants.retain(|v| *v != crate::config::MlaVariant::Gqa);
    }
    let note = format!(
        "{}; every layer's FFN is dense of intermediate_size = {} (the MoE layers' experts are \
         not built: SC-001 measures the attention's runtime memory above the weights)",
        spec.describe(),
        c.intermediate_size
    );
    m.title = format!("{} — {}", m.title, spec.describe());
    m.model_origin = Some(origin(spec, m.capacity.memory_budget_gib, note));
    Ok(())
}

/// The trunk dimensions both kinds take from the model description.
fn set_model_shape(m: &mut crate::config::scenario::ModelShape, c: &super::DeepseekConfig) {
    m.hidden = c.hidden_size;
    m.n_layers = c.num_hidden_layers;
    m.n_heads = c.num_attention_heads;
    m.vocab_size = c.vocab_size;
    m.ffn_hidden = c.intermediate_size;
    m.rope_theta = c.rope_theta;
    m.rope_scaling = c.rope_scaling;
    m.rms_norm_eps = c.rms_norm_eps;
}

/// Where a scenario's model came from (random weights at `spec`'s dimensions).
fn origin(spec: &ModelSpec, runtime_budget_gib: f64, note: String) -> ModelOrigin {
    ModelOrigin {
        model: match &spec.source {
            super::ModelSource::Preset(p) => p.clone(),
            super::ModelSource::Dir(d) => d.display().to_string(),
        },
        layers: spec.config.num_hidden_layers,
        total_layers: spec.total_layers,
        weights: "random".into(),
        weights_bytes: None,
        runtime_budget_gib,
        note,
    }
}

/// SC-002 on a checkpoint's own weights: its main model and its MTP layer (DeepSeek-V3's
/// `model.layers.{L}`) read from the folder, greedy against self-speculative decoding with that
/// layer drafting. A preset is refused (random weights make acceptance meaningless), as are a
/// model without an MTP layer and `--layers` (the MTP layer reads the last layer's output).
fn apply_to_mtp(
    m: &mut crate::config::scenario::MtpScenario,
    spec: &ModelSpec,
) -> Result<(), DsoptError> {
    let c = &spec.config;
    let super::ModelSource::Dir(dir) = &spec.source else {
        return Err(DsoptError::Usage(format!(
            "--model {}: `bench mtp` measures how often a checkpoint's own MTP layer is accepted, \
             which random weights cannot tell; give a checkpoint folder (config.json + \
             safetensors) with an MTP layer, or drop --model for SC-002 on dsopt's trained model",
            spec.title
        )));
    };
    if c.num_nextn_predict_layers == 0 {
        return Err(DsoptError::Usage(format!(
            "--model {}: the checkpoint has no MTP layer (num_nextn_predict_layers = 0 in its \
             config.json), so there is nothing to draft with; use a DeepSeek-V3-style checkpoint \
             with its MTP layer, or drop --model for SC-002 on dsopt's trained model",
            dir.display()
        )));
    }
    if c.num_hidden_layers != spec.total_layers {
        return Err(DsoptError::Usage(format!(
            "--layers {}: the MTP layer drafts from the last layer's hidden state, so `bench mtp` \
             keeps all {} layers; drop --layers",
            c.num_hidden_layers, spec.total_layers
        )));
    }
    set_model_shape(&mut m.model, c);
    // dsopt loads the first MTP layer (V3 publishes one) and applies it recursively, once per
    // draft: the scenario's depth (3 by default: 4 tokens per verify step, the spec's point)
    let depth = m.mtp.depth;
    let sweep = m.sweep.take().is_some();
    let what = format!(
        "{}'s own weights ({}), {} layers",
        spec.title,
        dir.display(),
        c.num_hidden_layers
    );
    let layer = if c.num_nextn_predict_layers > 1 {
        format!(
            "the checkpoint's first MTP layer (of {})",
            c.num_nextn_predict_layers
        )
    } else {
        "the checkpoint's MTP layer".to_string()
    };
    let drafts = if depth > 1 {
        format!(
            "D = {depth} drafts per step: {layer} used at every depth with its weights tied — \
             the paper's chain of D modules (depth k reads depth k-1's hidden state and the \
             embedding of token t+k, each depth with its own cache), not the one-cache chaining \
             of serving engines (vLLM's EAGLE proposer); the layer was trained for depth 1 only, \
             so acceptance at depths 2..={depth} is expected to be lower"
        )
    } else {
        format!("D = 1 draft per step: {layer}, as it was trained")
    };
    let note = format!(
        "{what}: main model and MTP layer read from the checkpoint; {drafts}{}",
        if sweep {
            "; the scenario's depth x batch sweep is not run on a checkpoint"
        } else {
            ""
        }
    );
    m.title = format!("{} — {what}", m.title);
    let mut o = origin(spec, 0.0, note);
    o.weights = "checkpoint".into();
    m.model_origin = Some(o);
    Ok(())
}

/// SC-003 on a model's dimensions: its MoE layers (routing as config.json defines it) against
/// dense FFNs of equal total and equal active size; the dense layers before them
/// (`first_k_dense_replace`) are the same in every variant. The attention is the scenario's
/// standard MHA of `num_attention_heads` heads (the same in every variant: SC-003 compares FFNs).
fn apply_to_moe(
    m: &mut crate::config::scenario::MoeScenario,
    spec: &ModelSpec,
    file: &str,
) -> Result<(), DsoptError> {
    let c = &spec.config;
    let Some(moe) = &c.moe else {
        return Err(DsoptError::Usage(format!(
            "--model {}: a dense model (n_routed_experts is null) has no MoE layer for `bench moe`",
            spec.title
        )));
    };
    if c.num_hidden_layers <= c.first_k_dense_replace {
        return Err(DsoptError::Usage(format!(
            "--model {} with {} layers: its first {} layers are dense, so there is no MoE layer \
             to measure; give --layers {} or more",
            spec.title,
            c.num_hidden_layers,
            c.first_k_dense_replace,
            c.first_k_dense_replace + 1
        )));
    }
    // a folder with weights: the MoE variant is the checkpoint itself (trained router and
    // experts), the dense variants its architecture with random dense FFNs
    let weights = match &spec.source {
        super::ModelSource::Dir(d) => has_weights(d),
        super::ModelSource::Preset(_) => false,
    };
    // (SC-003b's twins, where a backend offloads, are the scenario's MHA models)
    let mha = !weights || m.offload.is_some();
    if mha && !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(DsoptError::Usage(format!(
            "--model {}: {file}'s MHA needs hidden_size ({}) divisible by num_attention_heads ({})",
            spec.title, c.hidden_size, c.num_attention_heads
        )));
    }
    set_model_shape(&mut m.model, c);
    let s = &mut m.moe;
    s.n_routed_experts = moe.n_routed_experts;
    s.n_shared_experts = moe.n_shared_experts;
    s.num_experts_per_tok = moe.num_experts_per_tok;
    s.moe_inter_dim = moe.moe_intermediate_size;
    s.score_func = moe.scoring_func;
    s.n_group = moe.n_group;
    s.topk_group = moe.topk_group;
    s.route_scale = moe.routed_scaling_factor;
    s.topk_method = Some(moe.topk_method);
    // as in the verified loader: transformers' DeepseekV2 router never normalises
    s.norm_topk_prob =
        Some(moe.norm_topk_prob && c.model_type != super::model::ModelType::DeepseekV2);
    s.first_k_dense_replace = c.first_k_dense_replace;
    let (what, attention, router) = if weights {
        (
            format!(
                "{}'s own weights, {} of {} layers",
                spec.title, c.num_hidden_layers, spec.total_layers
            ),
            format!(
                "the checkpoint's MLA attention ({} heads) in every variant: the MoE variant is \
                 the checkpoint as loaded (its router and experts), the two dense variants have \
                 its shape with random weights",
                c.num_attention_heads
            ),
            "the router is the checkpoint's own (trained, in a published checkpoint): the \
             per-expert load is what it gave on these prompts",
        )
    } else {
        (
            spec.describe(),
            format!(
                "attention is a standard MHA of {} heads in every variant (SC-003 compares FFNs, \
                 not attention)",
                c.num_attention_heads
            ),
            "random router weights spread tokens more evenly than a trained router",
        )
    };
    let note = format!(
        "{what}; the first {} layer(s) are dense (intermediate_size {}) in every variant, the \
         MoE layers' FFN is what differs; {attention}; routing: {} {} over {} experts, top-{}, {} \
         groups keep {}, routed_scaling_factor {}; {router}",
        c.first_k_dense_replace,
        c.intermediate_size,
        format!("{:?}", moe.scoring_func).to_lowercase(),
        moe.topk_method.name(),
        moe.n_routed_experts,
        moe.num_experts_per_tok,
        moe.n_group,
        moe.topk_group,
        moe.routed_scaling_factor
    );
    m.title = format!("{} — {what}", m.title);
    let mut o = origin(spec, 0.0, note);
    if weights {
        o.weights = "checkpoint".into();
    }
    m.model_origin = Some(o);
    Ok(())
}

/// FR-004 on a model's dimensions (random weights, as every `model` scenario): the trunk, the
/// MLA widths into `[optimization.mla]` and the routing into `[optimization.moe]`; the
/// scenario's switches (attention kind, FFN kind, MTP depth, dtype) stay as written, so the
/// same model can be run standard or optimised. MHA/GQA use `v_head_dim`-wide heads.
fn apply_to_model(
    m: &mut crate::config::scenario::ModelScenario,
    spec: &ModelSpec,
) -> Result<(), DsoptError> {
    use crate::config::FfnKind;
    let c = &spec.config;
    let shape = &mut m.model;
    shape.hidden = c.hidden_size;
    shape.n_layers = c.num_hidden_layers;
    shape.n_heads = c.num_attention_heads;
    shape.head_dim = c.v_head_dim;
    shape.vocab_size = c.vocab_size;
    shape.ffn_hidden = c.intermediate_size;
    shape.rope_theta = c.rope_theta;
    shape.rope_scaling = c.rope_scaling;
    shape.rms_norm_eps = c.rms_norm_eps;
    let o = &mut m.optimization;
    o.mla.kv_lora_rank = c.kv_lora_rank;
    o.mla.q_lora_rank = c.q_lora_rank;
    o.mla.qk_nope_head_dim = c.qk_nope_head_dim;
    o.mla.qk_rope_head_dim = c.qk_rope_head_dim;
    o.mla.v_head_dim = c.v_head_dim;
    match (&c.moe, o.ffn) {
        (Some(moe), _) => {
            let r = &mut o.moe;
            r.n_routed_experts = moe.n_routed_experts;
            r.n_shared_experts = moe.n_shared_experts;
            r.num_experts_per_tok = moe.num_experts_per_tok;
            r.moe_inter_dim = moe.moe_intermediate_size;
            r.score_func = moe.scoring_func;
            r.n_group = moe.n_group;
            r.topk_group = moe.topk_group;
            r.route_scale = moe.routed_scaling_factor;
            r.topk_method = Some(moe.topk_method);
            r.norm_topk_prob =
                Some(moe.norm_topk_prob && c.model_type != super::model::ModelType::DeepseekV2);
            r.first_k_dense_replace = c.first_k_dense_replace;
            if o.ffn == FfnKind::Moe && c.num_hidden_layers <= c.first_k_dense_replace {
                return Err(DsoptError::Usage(format!(
                    "--model {} with {} layers: its first {} layers are dense, so ffn = \"moe\" \
                     has no MoE layer; give --layers {} or more",
                    spec.title,
                    c.num_hidden_layers,
                    c.first_k_dense_replace,
                    c.first_k_dense_replace + 1
                )));
            }
        }
        (None, FfnKind::Moe) => {
            return Err(DsoptError::Usage(format!(
                "--model {}: a dense model (n_routed_experts is null) with ffn = \"moe\"; set \
                 ffn = \"dense\" in [optimization]",
                spec.title
            )))
        }
        (None, FfnKind::Dense) => {}
    }
    let note = format!(
        "{}; the scenario's switches ({}) on the model's dimensions; MHA/GQA heads are \
         v_head_dim = {} wide; MTP modules (if any) are random blocks of the same shape",
        spec.describe(),
        o.label(),
        c.v_head_dim
    );
    m.title = format!("{} — {}", m.title, spec.describe());
    m.model_origin = Some(origin(spec, 0.0, note));
    Ok(())
}

/// A checkpoint folder with weights (`model.safetensors` or a sharded index), not only a
/// `config.json`.
pub fn has_weights(dir: &std::path::Path) -> bool {
    dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file()
}

/// After the command-line overrides (the dtype is known): the capacity budget of a model from
/// `--model` becomes its own weights (absorbed MLA's, in the run's dtype) plus the scenario's
/// runtime budget, so that "the same budget" means the same memory with the real model's
/// weights in it. Does nothing for scenarios without `--model`.
pub fn add_weights_to_budget(s: &mut Scenario) {
    let Scenario::Mla(m) = s else { return };
    let Some(origin) = m.model_origin.as_ref() else {
        return;
    };
    let runtime = origin.runtime_budget_gib;
    let weights = m
        .decoder_config(crate::config::MlaVariant::MlaAbsorbed)
        .params() as u64
        * m.run.dtype.bytes() as u64;
    let gib = (1u64 << 30) as f64;
    m.capacity.memory_budget_gib = runtime + weights as f64 / gib;
    let note = format!(
        "; capacity budget = the model's weights in {} ({:.2} GiB) + a runtime budget of {} GiB",
        m.run.dtype.as_str(),
        weights as f64 / gib,
        runtime
    );
    if let Some(o) = m.model_origin.as_mut() {
        o.weights_bytes = Some(weights);
        o.note.push_str(&note);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_gqa_baseline_divides_the_heads() {
        for (n, g) in [(1, 1), (3, 1), (8, 2), (14, 2), (16, 4), (18, 3), (128, 32)] {
            assert_eq!(super::gqa_heads(n), g, "{n} heads");
            assert!(n % g == 0);
        }
    }
}
