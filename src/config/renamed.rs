//! 改名的键：场景与优化配置的模型维度键沿用 Hugging Face `config.json` 的名字（2026-12 起）。
//!
//! 旧名不再被接受：解析前在 TOML 表上查找它们，找到时以退出码 2 报出文件、行号、旧键与新键，
//! 而不是让 serde 报一个不带改法的“unknown field”。这里只有数据与一个查找函数。

use std::path::Path;

use super::diag::find_key_line;
use crate::error::DsoptError;

/// `(旧键, 新键)`：解码器主干（`[model]`）。
const MODEL: &[(&str, &str)] = &[
    ("hidden", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("ffn_hidden", "intermediate_size"),
];

/// DeepSeekMoE（`[moe]`、`[optimization.moe]`）。
const MOE: &[(&str, &str)] = &[
    ("moe_inter_dim", "moe_intermediate_size"),
    ("score_func", "scoring_func"),
    ("route_scale", "routed_scaling_factor"),
];

/// MTP（`[mtp]`、`[optimization.mtp]`）。
const MTP: &[(&str, &str)] = &[("depth", "num_nextn_predict_layers")];

/// The renamed keys of each section a file can hold: a scenario (its `[optimization]` table is
/// `optimization.…`) or, `bare`, an optimisation file without its `[optimization]` header,
/// whose sections are top-level.
fn sections(bare: bool) -> Vec<(&'static str, &'static [(&'static str, &'static str)])> {
    if bare {
        vec![("moe", MOE), ("mtp", MTP)]
    } else {
        vec![
            ("model", MODEL),
            ("moe", MOE),
            ("mtp", MTP),
            ("optimization.moe", MOE),
            ("optimization.mtp", MTP),
        ]
    }
}

fn table_at<'a>(t: &'a toml::Table, dotted: &str) -> Option<&'a toml::Table> {
    let mut cur = t;
    for part in dotted.split('.') {
        cur = cur.get(part)?.as_table()?;
    }
    Some(cur)
}

/// The first old key in `table`: `(dotted old key, message, fix)`.
fn find(table: &toml::Table, bare_optimization: bool) -> Option<(String, String, String)> {
    for (sec, pairs) in sections(bare_optimization) {
        let Some(t) = table_at(table, sec) else {
            continue;
        };
        for (old, new) in pairs.iter() {
            if t.contains_key(*old) {
                return Some((
                    format!("{sec}.{old}"),
                    format!(
                        "`{old}` is the old name of this key: dsopt's model keys are the Hugging \
                         Face config.json names"
                    ),
                    format!("rename `{old}` to `{new}` in [{sec}] (same meaning, same value)"),
                ));
            }
        }
    }
    let mla = if bare_optimization {
        "mla"
    } else {
        "optimization.mla"
    };
    if table_at(table, mla).is_some_and(|t| t.contains_key("mscale")) {
        return Some((
            format!("{mla}.mscale"),
            "`mscale` is no longer an MLA option: it held the finished softmax factor, while \
             config.json's `mscale` is YaRN's coefficient m and belongs to the model's RoPE"
                .to_string(),
            "delete it (1.0 was no change); for YaRN add a [model.rope_scaling] table with \
             config.json's keys (factor, original_max_position_embeddings, beta_fast, beta_slow, \
             mscale, mscale_all_dim)"
                .to_string(),
        ));
    }
    None
}

/// Exit 2 (a scenario error naming file, line, key and its new name) when `text` uses a
/// renamed key. `bare_optimization`: an optimisation file without its `[optimization]` header.
pub(crate) fn check(
    path: &Path,
    text: &str,
    table: &toml::Table,
    bare_optimization: bool,
) -> Result<(), DsoptError> {
    match find(table, bare_optimization) {
        None => Ok(()),
        Some((key, message, fix)) => Err(DsoptError::Scenario {
            file: path.into(),
            line: find_key_line(text, &key),
            key: Some(key),
            message,
            fix,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str, bare: bool) -> Option<(String, Option<usize>, String)> {
        let t: toml::Table = toml::from_str(text).unwrap();
        match check(Path::new("s.toml"), text, &t, bare) {
            Ok(()) => None,
            Err(DsoptError::Scenario { key, line, fix, .. }) => Some((key.unwrap(), line, fix)),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn every_old_key_names_its_new_one() {
        for (sec, pairs) in sections(false) {
            for (old, new) in pairs {
                let text = format!("id = 1\n[{sec}]\n{old} = 1\n");
                let (key, line, fix) = err(&text, false).expect(old);
                assert_eq!(key, format!("{sec}.{old}"));
                assert_eq!(line, Some(3));
                assert!(fix.contains(&format!("`{new}`")), "{fix}");
            }
        }
    }

    #[test]
    fn new_names_and_other_sections_pass() {
        let ok =
            "[model]\nhidden_size = 8\n[run]\ndepth = 3\n[optimization.mla]\nkv_lora_rank = 4\n";
        assert_eq!(err(ok, false), None);
        // a bare optimisation file's [moe] is the optimisation's own
        let (key, ..) = err("[moe]\nroute_scale = 1.0\n", true).unwrap();
        assert_eq!(key, "moe.route_scale");
        let (key, line, _) = err("attention = \"mla\"\n[mla]\nmscale = 1.0\n", true).unwrap();
        assert_eq!((key.as_str(), line), ("mla.mscale", Some(3)));
        let (key, ..) = err("[optimization.mla]\nmscale = 1.0\n", false).unwrap();
        assert_eq!(key, "optimization.mla.mscale");
        let (key, ..) = err("[optimization.mtp]\ndepth = 1\n", false).unwrap();
        assert_eq!(key, "optimization.mtp.depth");
    }
}
