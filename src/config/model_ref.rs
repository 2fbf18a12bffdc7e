//! 场景里写的模型来源：`[model] preset = "deepseek-v2-lite"` 或 `path = "…/DeepSeek-V2-Lite"`，
//! 可加 `layers = N`——与命令行的 `--model`、`--layers` 相同（命令行优先）。
//!
//! 给出模型来源时，模型的维度、RoPE 与路由键全部来自预设或检查点的 `config.json`，不能再写在
//! 场景里（写了以退出码 2 报错，免得两处的值不一致）。配置层不读检查点（那在 `checkpoint` 模块，
//! 它依赖配置层）：这里只把来源记下，并在那些键的位置填入内置场景的值作为占位，使文件能按同一个
//! 模式解析；命令行层随后解析模型并用它的维度覆盖全部占位（`checkpoint::apply_model`）。

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::diag::find_key_line;
use super::scenario::ScenarioKind;
use crate::error::DsoptError;

/// 场景 `[model]` 一节里的模型来源。
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRef {
    /// 预设名，或检查点目录（相对路径从场景文件所在目录算起，这里已是解析后的路径）。
    pub model: String,
    /// 只保留前 N 层（`layers`）。
    pub layers: Option<usize>,
}

/// The keys a model description provides, per section, for the kinds that take one.
fn provided(kind: ScenarioKind) -> &'static [(&'static str, &'static [&'static str])] {
    const MODEL: &[&str] = &[
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "intermediate_size",
        "rope_theta",
        "rope_scaling",
        "rms_norm_eps",
    ];
    match kind {
        ScenarioKind::Mla => &[
            ("model", MODEL),
            (
                "attention",
                &[
                    "head_dim",
                    "gqa_kv_heads",
                    "kv_lora_rank",
                    "q_lora_rank",
                    "qk_nope_head_dim",
                    "qk_rope_head_dim",
                    "v_head_dim",
                ],
            ),
        ],
        ScenarioKind::Model => &[
            ("model", MODEL),
            ("model", &["head_dim"]),
            (
                "optimization.mla",
                &[
                    "kv_lora_rank",
                    "q_lora_rank",
                    "qk_nope_head_dim",
                    "qk_rope_head_dim",
                    "v_head_dim",
                ],
            ),
            ("optimization.moe", MOE_ROUTING),
        ],
        ScenarioKind::Moe => &[("model", MODEL), ("moe", MOE_ROUTING)],
        _ => &[],
    }
}

/// The routing keys of an MoE section (`[moe]`, `[optimization.moe]`).
const MOE_ROUTING: &[&str] = &[
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "scoring_func",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "topk_method",
    "norm_topk_prob",
    "first_k_dense_replace",
];

/// The (possibly nested, `a.b`) table `section` of `table`, created empty when absent; `None`
/// when a part of the path is not a table.
fn section_mut<'a>(table: &'a mut toml::Table, section: &str) -> Option<&'a mut toml::Table> {
    section.split('.').try_fold(table, |t, part| {
        t.entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
    })
}

fn bad(path: &Path, text: &str, key: &str, message: String, fix: String) -> DsoptError {
    DsoptError::Scenario {
        file: path.into(),
        line: find_key_line(text, key),
        key: Some(key.into()),
        message,
        fix,
    }
}

/// Takes `preset` / `path` / `layers` out of `table`'s `[model]` section. With a model source,
/// refuses the keys the model provides and fills their places with the shipped scenario's
/// values (placeholders the command line replaces with the model's own), so that the file
/// parses with the usual schema. `None` when the scenario names no model.
pub(crate) fn take(
    path: &Path,
    text: &str,
    table: &mut toml::Table,
    kind: ScenarioKind,
) -> Result<Option<ModelRef>, DsoptError> {
    let Some(model) = table.get_mut("model").and_then(|v| v.as_table_mut()) else {
        return Ok(None);
    };
    let preset = model.remove("preset");
    let source_key = if preset.is_some() {
        "model.preset"
    } else {
        "model.path"
    };
    let dir = model.remove("path");
    let layers = model.remove("layers");
    let source = match (preset, dir) {
        (None, None) => return match layers {
            None => Ok(None),
            Some(_) => Err(bad(
                path,
                text,
                "model.layers",
                "keeps the first N layers of a model, but [model] names none".into(),
                "add `preset = \"deepseek-v2-lite\"` (or `path = \"folder with config.json\"`) \
                     to [model], or delete layers"
                    .into(),
            )),
        },
        (Some(_), Some(_)) => {
            return Err(bad(
                path,
                text,
                "model.path",
                "[model] has both `preset` and `path`".into(),
                "keep one: a built-in preset name or a checkpoint folder".into(),
            ))
        }
        (Some(p), None) => match p {
            toml::Value::String(s) => s,
            _ => {
                return Err(bad(
                    path,
                    text,
                    "model.preset",
                    "must be a string".into(),
                    "e.g. preset = \"deepseek-v2-lite\" (`dsopt info` lists the presets)".into(),
                ))
            }
        },
        (None, Some(d)) => {
            let Some(d) = d.as_str() else {
                return Err(bad(
                    path,
                    text,
                    "model.path",
                    "must be a string".into(),
                    "e.g. path = \"/models/DeepSeek-V2-Lite\"".into(),
                ));
            };
            let mut p = PathBuf::from(d);
            if p.is_relative() {
                if let Some(parent) = path.parent() {
                    p = parent.join(p);
                }
            }
            if !p.is_dir() {
                return Err(bad(
                    path,
                    text,
                    "model.path",
                    format!("{} is not a directory", p.display()),
                    "give the folder that holds the checkpoint's config.json (a relative path is \
                     taken from the scenario file's folder)"
                        .into(),
                ));
            }
            p.display().to_string()
        }
    };
    let layers = match layers {
        None => None,
        Some(toml::Value::Integer(n)) if n >= 1 => Some(n as usize),
        Some(_) => {
            return Err(bad(
                path,
                text,
                "model.layers",
                "must be a whole number >= 1".into(),
                "e.g. layers = 2 (the first N layers; the dense layers stay first)".into(),
            ))
        }
    };
    let sections = provided(kind);
    if sections.is_empty() {
        return Err(bad(
            path,
            text,
            source_key,
            format!(
                "a `{}` scenario cannot name a model yet: [model] preset/path is implemented for \
                 `mla` (SC-001), `moe` (SC-003) and `model` (FR-004)",
                kind.as_str()
            ),
            "write the dimensions into [model] instead".into(),
        ));
    }
    let (_, builtin) = kind.default_scenario();
    let builtin: toml::Table = toml::from_str(builtin).expect("shipped scenarios are TOML");
    for (section, keys) in sections {
        let defaults = section
            .split('.')
            .try_fold(&builtin, |t, part| t.get(part).and_then(|v| v.as_table()));
        let Some(t) = section_mut(table, section) else {
            continue; // a non-table section fails when the file is deserialised
        };
        for key in *keys {
            if t.contains_key(*key) {
                return Err(bad(
                    path,
                    text,
                    &format!("{section}.{key}"),
                    format!(
                        "comes from the model's config.json when [model] names a model \
                         (`{source}`): a second value here could disagree with it"
                    ),
                    format!("delete {key} from [{section}], or drop preset/path from [model]"),
                ));
            }
            if let Some(v) = defaults.and_then(|d| d.get(*key)) {
                t.insert(key.to_string(), v.clone());
            }
        }
    }
    Ok(Some(ModelRef {
        model: source,
        layers,
    }))
}

#[cfg(test)]
mod tests {
    use crate::config::Scenario;
    use std::path::Path;

    fn parse(text: &str) -> Result<Scenario, String> {
        Scenario::parse(Path::new("m.toml"), text).map_err(|e| e.to_string())
    }

    const MLA: &str = "id = \"SC-001\"\nkind = \"mla\"\ntitle = \"t\"\n[model]\n\
        preset = \"deepseek-v2-lite\"\nlayers = 2\n[attention]\nvariants = [\"mha\", \
        \"mla_absorbed\", \"mla_naive\"]\nprefill_chunk = 64\n[run]\nbatch = 1\nseq = 64\n\
        decode_tokens = 2\nwarmup = 0\nrepetitions = 1\n[capacity]\nmemory_budget_gib = 1.0\n\
        min_seq = 32\nmax_seq = 128\nprobe_decode_tokens = 1\n[thresholds]\n\
        runtime_peak_reduction = 0.4\ncapacity_ratio = 2.0\n";

    #[test]
    fn a_named_model_parses_with_its_keys_left_out() {
        let s = parse(MLA).unwrap();
        let r = s.model_ref().expect("the model is recorded");
        assert_eq!((r.model.as_str(), r.layers), ("deepseek-v2-lite", Some(2)));
    }

    #[test]
    fn conflicts_and_bad_values_name_the_key() {
        let e = parse(&MLA.replace("layers = 2\n", "layers = 2\nhidden_size = 8\n")).unwrap_err();
        assert!(
            e.contains("model.hidden_size") && e.contains("m.toml:7"),
            "{e}"
        );
        let e =
            parse(&MLA.replace("[attention]\n", "[attention]\nkv_lora_rank = 8\n")).unwrap_err();
        assert!(e.contains("attention.kv_lora_rank"), "{e}");
        let e = parse(&MLA.replace("layers = 2", "layers = \"2\"")).unwrap_err();
        assert!(e.contains("model.layers"), "{e}");
        let e = parse(&MLA.replace("layers = 2", "path = \"/\"")).unwrap_err();
        assert!(e.contains("both `preset` and `path`"), "{e}");
        let e = parse(&MLA.replace("preset = \"deepseek-v2-lite\"\n", "")).unwrap_err();
        assert!(
            e.contains("model.layers") && e.contains("names none"),
            "{e}"
        );
        let e = parse(&MLA.replace("preset = \"deepseek-v2-lite\"", "path = \"no/such/dir\""))
            .unwrap_err();
        assert!(e.contains("no/such/dir is not a directory"), "{e}");
        // kinds without --model support yet refuse it
        let (_, mtp) = crate::config::ScenarioKind::Mtp.default_scenario();
        let e =
            parse(&mtp.replace("[model]\n", "[model]\npreset = \"deepseek-v3\"\n")).unwrap_err();
        assert!(e.contains("cannot name a model yet"), "{e}");
    }
}
