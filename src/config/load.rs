//! 场景与优化配置的加载：读文件、解析 TOML、应用命令行覆盖、校验，错误给出文件、行号、键名与改法。

use std::path::Path;

use serde::Deserialize;

use super::diag::{find_key_line, toml_error, Violation};
use super::optimization::{DecoderShape, OptimizationConfig};
use super::scenario::*;
use super::validate;
use crate::error::DsoptError;

impl Scenario {
    /// Reads, parses and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, DsoptError> {
        let text = std::fs::read_to_string(path).map_err(|e| DsoptError::Scenario {
            file: path.to_path_buf(),
            key: None,
            line: None,
            message: format!("cannot read the file: {e}"),
            fix: "check the path; shipped scenarios are in scenarios/".into(),
        })?;
        Scenario::parse(path, &text)
    }

    /// Parses and validates scenario text; `path` is used in messages only.
    pub fn parse(path: &Path, text: &str) -> Result<Scenario, DsoptError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
        super::renamed::check(path, text, &table, false)?;
        let kind = match table.get("kind") {
            None => {
                return Err(DsoptError::Scenario {
                    file: path.into(),
                    key: Some("kind".into()),
                    line: None,
                    message: "missing key".into(),
                    fix: "add `kind = \"mla\"` (or mtp, moe, model, calibrate) at the top".into(),
                })
            }
            Some(toml::Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(DsoptError::Scenario {
                    file: path.into(),
                    key: Some("kind".into()),
                    line: find_key_line(text, "kind"),
                    message: "must be a string".into(),
                    fix: "use one of \"mla\", \"mtp\", \"moe\", \"model\", \"calibrate\"".into(),
                })
            }
        };
        let k = match kind.as_str() {
            "mla" => ScenarioKind::Mla,
            "mtp" => ScenarioKind::Mtp,
            "moe" => ScenarioKind::Moe,
            "model" => ScenarioKind::Model,
            "calibrate" => ScenarioKind::Calibrate,
            other => {
                return Err(DsoptError::Scenario {
                    file: path.into(),
                    key: Some("kind".into()),
                    line: find_key_line(text, "kind"),
                    message: format!("unknown kind `{other}`"),
                    fix: "use one of \"mla\", \"mtp\", \"moe\", \"model\", \"calibrate\"".into(),
                })
            }
        };
        let mut table = table;
        let model_ref = super::model_ref::take(path, text, &mut table, k)?;
        let de = |e: toml::de::Error| toml_error(path, text, &e);
        // with a model, its keys were filled in: parse the table (no spans; the keys the user
        // wrote are named all the same); otherwise the text, so that errors carry their line
        let src = match model_ref {
            Some(_) => Src::Table(table),
            None => Src::Text(text),
        };
        let scenario = match k {
            ScenarioKind::Mla => Scenario::Mla(src.parse().map_err(de)?),
            ScenarioKind::Mtp => Scenario::Mtp(src.parse().map_err(de)?),
            ScenarioKind::Moe => Scenario::Moe(src.parse().map_err(de)?),
            ScenarioKind::Model => Scenario::Model(src.parse().map_err(de)?),
            ScenarioKind::Calibrate => Scenario::Calibrate(src.parse().map_err(de)?),
        };
        let scenario = match (scenario, model_ref) {
            (Scenario::Mla(mut m), r) => {
                m.model_ref = r;
                Scenario::Mla(m)
            }
            (Scenario::Moe(mut m), r) => {
                m.model_ref = r;
                Scenario::Moe(m)
            }
            (Scenario::Model(mut m), r) => {
                m.model_ref = r;
                Scenario::Model(m)
            }
            (other, _) => other,
        };
        let mut scenario = scenario;
        // a relative prompts file is taken from the scenario file's folder, as [model] path is
        if let Some(dir) = path.parent() {
            let files = match &mut scenario {
                Scenario::Mtp(s) => [s.run.prompts.as_mut(), s.run.prompt_text.as_mut()],
                Scenario::Moe(s) => [s.run.prompts.as_mut(), s.run.prompt_text.as_mut()],
                _ => [None, None],
            };
            for p in files.into_iter().flatten().filter(|p| p.is_relative()) {
                *p = dir.join(&*p);
            }
        }
        // with a named model the model's keys are placeholders until the model is applied
        // (checkpoint::apply_model_source), which checks the scenario again
        if scenario.model_ref().is_none() {
            scenario.check(path, Some(text))?;
        }
        Ok(scenario)
    }

    /// Loads the shipped default scenario of a kind (embedded in the binary).
    pub fn builtin(kind: ScenarioKind) -> Scenario {
        let (name, text) = kind.default_scenario();
        Scenario::parse(Path::new(name), text).expect("shipped scenarios are valid (tested)")
    }

    /// Validates; on failure the first violation becomes an error naming file, key and line.
    pub fn check(&self, path: &Path, text: Option<&str>) -> Result<(), DsoptError> {
        let violations = validate::validate(self);
        match violations.into_iter().next() {
            None => Ok(()),
            Some(Violation { key, message, fix }) => Err(DsoptError::Scenario {
                file: path.into(),
                line: text.and_then(|t| find_key_line(t, &key)),
                key: Some(key),
                message,
                fix,
            }),
        }
    }

    /// Applies command-line overrides and validates again (a flag can make a scenario invalid).
    pub fn apply(&mut self, o: &Overrides, path: &Path) -> Result<(), DsoptError> {
        if let Some(file) = &o.config {
            match self {
                // the file's own errors (and its values against this model's shape) name the file
                Scenario::Model(s) => {
                    s.optimization = OptimizationConfig::load_for(file, &s.model)?;
                }
                other => {
                    return Err(DsoptError::Usage(format!(
                        "--config {} replaces the [optimization] section of a `model` scenario, \
                         but {} is a `{}` scenario; drop --config or use a model scenario",
                        file.display(),
                        path.display(),
                        other.kind().as_str()
                    )))
                }
            }
        }
        if let Some(d) = o.dtype {
            match self {
                Scenario::Mla(s) => s.run.dtype = d,
                Scenario::Mtp(s) => s.run.dtype = d,
                Scenario::Moe(s) => s.run.dtype = d,
                Scenario::Model(s) => s.optimization.dtype = d,
                Scenario::Calibrate(_) => {
                    return Err(DsoptError::Usage(format!(
                        "--dtype: {} is a calibration scenario, which always runs in f32 (it is \
                         checked against an f64 host reference); drop --dtype",
                        path.display()
                    )))
                }
            }
        }
        for (flag, p) in [("prompts", &o.prompts), ("prompt-text", &o.prompt_text)] {
            if let (Some(p), false) = (p, matches!(self, Scenario::Mtp(_) | Scenario::Moe(_))) {
                return Err(DsoptError::Usage(format!(
                    "--{flag} {}: prompts are for `bench mtp|moe --model DIR` (a checkpoint), \
                     but {} is a `{}` scenario; drop --{flag}",
                    p.display(),
                    path.display(),
                    self.kind().as_str()
                )));
            }
        }
        match self {
            Scenario::Mla(s) => {
                set(&mut s.run.seq, o.seq);
                set(&mut s.run.batch, o.batch);
                set(&mut s.run.repetitions, o.repetitions);
                set(&mut s.run.warmup, o.warmup);
            }
            Scenario::Mtp(s) => {
                set(&mut s.run.new_tokens, o.seq);
                set(&mut s.run.batch, o.batch);
                set(&mut s.run.repetitions, o.repetitions);
                set(&mut s.run.warmup, o.warmup);
                set(&mut s.train.steps, o.train_steps);
                if let Some(c) = &o.corpus {
                    s.train.corpus = Some(c.clone());
                }
                if let Some(c) = &o.checkpoint {
                    s.train.checkpoint = Some(c.clone());
                }
                if let Some(p) = &o.prompts {
                    s.run.prompts = Some(p.clone());
                    s.run.prompt_text = None;
                }
                if let Some(p) = &o.prompt_text {
                    s.run.prompt_text = Some(p.clone());
                    s.run.prompts = None;
                }
            }
            Scenario::Moe(s) => {
                if let Some(p) = &o.prompts {
                    s.run.prompts = Some(p.clone());
                    s.run.prompt_text = None;
                }
                if let Some(p) = &o.prompt_text {
                    s.run.prompt_text = Some(p.clone());
                    s.run.prompts = None;
                }
                if let Some(off) = &mut s.offload {
                    off.force = o.force;
                }
                set(&mut s.run.prefill_seq, o.seq);
                set(&mut s.run.decode_batch, o.batch);
                set(&mut s.run.repetitions, o.repetitions);
                set(&mut s.run.warmup, o.warmup);
            }
            Scenario::Model(s) => {
                set(&mut s.run.new_tokens, o.seq);
                set(&mut s.run.batch, o.batch);
                set(&mut s.run.repetitions, o.repetitions);
                set(&mut s.run.warmup, o.warmup);
            }
            Scenario::Calibrate(s) => {
                set(&mut s.workload.size, o.seq);
                set(&mut s.workload.batch, o.batch);
                set(&mut s.run.repetitions, o.repetitions);
                set(&mut s.run.warmup, o.warmup);
            }
        }
        self.check(path, None).map_err(|e| match e {
            DsoptError::Scenario {
                file,
                key,
                message,
                fix,
                ..
            } => DsoptError::Scenario {
                file,
                line: None,
                message: format!("{message} (after command-line overrides)"),
                key,
                fix,
            },
            other => other,
        })
    }
}

/// What a scenario is deserialised from: its text (errors keep their spans), or the table with
/// a model's keys filled in.
enum Src<'a> {
    Text(&'a str),
    Table(toml::Table),
}

impl Src<'_> {
    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, toml::de::Error> {
        match self {
            Src::Text(t) => toml::from_str(t),
            Src::Table(t) => toml::Value::Table(t.clone()).try_into(),
        }
    }
}

fn set(slot: &mut usize, value: Option<usize>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// 带 `[optimization]` 表头的独立优化配置文件。
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wrapped {
    #[serde(default)]
    optimization: OptimizationConfig,
}

impl OptimizationConfig {
    /// 与模型形状无关的检查；违规项的键名形如 `optimization.…`。
    pub fn validate(&self) -> Vec<Violation> {
        validate::optimization(self, None)
    }

    /// 全部检查，包括与模型形状有关的检查（GQA 的 KV 头数整除 `n_heads`）。
    pub fn validate_for(&self, shape: &DecoderShape) -> Vec<Violation> {
        validate::optimization(self, Some(shape))
    }

    /// 读取并校验独立的优化配置文件（只做与形状无关的检查）。文件顶层要么是
    /// `[optimization]` 表（含其子表），要么直接是各个键。
    ///
    /// # Errors
    /// 文件无法读取、TOML 无效、含未知键或取值/组合不合法时，返回给出文件、行号与键名的
    /// [`DsoptError::Scenario`]。
    pub fn load(path: &Path) -> Result<Self, DsoptError> {
        Self::load_checked(path, None)
    }

    /// 同 [`Self::load`]，另外按 `shape` 检查；错误给出文件、行号与键名。
    ///
    /// # Errors
    /// 与 [`Self::load`] 相同，另含与形状有关的违规（例如 GQA 头数不整除 `n_heads`）。
    pub fn load_for(path: &Path, shape: &DecoderShape) -> Result<Self, DsoptError> {
        Self::load_checked(path, Some(shape))
    }

    fn load_checked(path: &Path, shape: Option<&DecoderShape>) -> Result<Self, DsoptError> {
        let text = std::fs::read_to_string(path).map_err(|e| DsoptError::Scenario {
            file: path.to_path_buf(),
            key: None,
            line: None,
            message: format!("cannot read the optimisation config: {e}"),
            fix: "check the path given to --config".into(),
        })?;
        Self::parse_checked(path, &text, shape)
    }

    /// 解析并校验独立的优化配置文本；`path` 只用于错误消息。
    ///
    /// # Errors
    /// TOML 无效、含未知键或取值/组合不合法时返回 [`DsoptError::Scenario`]。
    pub fn parse(path: &Path, text: &str) -> Result<Self, DsoptError> {
        Self::parse_checked(path, text, None)
    }

    fn parse_checked(
        path: &Path,
        text: &str,
        shape: Option<&DecoderShape>,
    ) -> Result<Self, DsoptError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
        let wrapped = table.contains_key("optimization");
        super::renamed::check(path, text, &table, !wrapped)?;
        let de = |e: toml::de::Error| toml_error(path, text, &e);
        let cfg = if wrapped {
            toml::from_str::<Wrapped>(text).map_err(de)?.optimization
        } else {
            toml::from_str::<OptimizationConfig>(text).map_err(de)?
        };
        let violations = match shape {
            Some(s) => cfg.validate_for(s),
            None => cfg.validate(),
        };
        match violations.into_iter().next() {
            None => Ok(cfg),
            Some(Violation { key, message, fix }) => {
                // 无表头的文件里键位于上一层：`mla.kv_lora_rank`、`attention`
                let local = if wrapped {
                    key.clone()
                } else {
                    key.strip_prefix("optimization.")
                        .unwrap_or(&key)
                        .to_string()
                };
                Err(DsoptError::Scenario {
                    file: path.into(),
                    line: find_key_line(text, &local),
                    key: Some(key),
                    message,
                    fix,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Scenario::parse(Path::new("t.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn every_builtin_scenario_is_valid() {
        for k in [
            ScenarioKind::Mla,
            ScenarioKind::Mtp,
            ScenarioKind::Moe,
            ScenarioKind::Model,
            ScenarioKind::Calibrate,
        ] {
            let s = Scenario::builtin(k);
            assert_eq!(s.kind(), k);
        }
    }

    #[test]
    fn unknown_key_is_named_with_line() {
        let (_, text) = ScenarioKind::Calibrate.default_scenario();
        let bad = text.replace("[run]", "[run]\nwarmpu = 3");
        let e = err(&bad);
        assert!(e.contains("warmpu"), "{e}");
        let line = bad.lines().position(|l| l.contains("warmpu")).unwrap() + 1;
        assert!(e.contains(&format!("t.toml:{line}")), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        let (_, text) = ScenarioKind::Calibrate.default_scenario();
        let bad: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("repetitions"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = err(&bad);
        assert!(e.contains("repetitions"), "{e}");
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn unknown_kind_and_missing_kind() {
        assert!(err("kind = \"gpt\"\n").contains("unknown kind `gpt`"));
        assert!(err("id = \"x\"\n").contains("`kind`"));
        assert!(err("kind = 3\n").contains("must be a string"));
        assert!(err("kind = [\n").contains("t.toml:1"));
    }

    #[test]
    fn overrides_apply_and_revalidate() {
        let mut s = Scenario::builtin(ScenarioKind::Mla);
        let o = Overrides {
            seq: Some(1024),
            batch: Some(2),
            ..Default::default()
        };
        s.apply(&o, Path::new("x")).unwrap();
        match &s {
            Scenario::Mla(m) => {
                assert_eq!(m.run.seq, 1024);
                assert_eq!(m.run.batch, 2);
            }
            _ => unreachable!(),
        }
        let zero = Overrides {
            seq: Some(0),
            ..Default::default()
        };
        let e = s.apply(&zero, Path::new("x")).unwrap_err().to_string();
        assert!(e.contains("run.seq") && e.contains("overrides"), "{e}");
        // --dtype: run.dtype, optimization.dtype for model scenarios, refused for calibration
        let bf16 = Overrides {
            dtype: Some(Dtype::Bf16),
            ..Default::default()
        };
        let mut s = Scenario::builtin(ScenarioKind::Mla);
        s.apply(&bf16, Path::new("x")).unwrap();
        assert!(matches!(&s, Scenario::Mla(m) if m.run.dtype == Dtype::Bf16));
        let mut m = Scenario::builtin(ScenarioKind::Model);
        m.apply(&bf16, Path::new("x")).unwrap();
        assert_eq!(model(&m).optimization.dtype, Dtype::Bf16);
        let mut c = Scenario::builtin(ScenarioKind::Calibrate);
        let e = c.apply(&bf16, Path::new("cal.toml")).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_BAD_INPUT);
        assert!(e.to_string().contains("cal.toml"), "{e}");
    }

    fn model(s: &Scenario) -> &ModelScenario {
        match s {
            Scenario::Model(m) => m,
            other => panic!("not a model scenario: {:?}", other.kind()),
        }
    }

    #[test]
    fn model_scenario_overrides_seq_and_batch() {
        let mut s = Scenario::builtin(ScenarioKind::Model);
        assert_eq!(s.id(), "FR-004");
        s.apply(
            &Overrides {
                seq: Some(5),
                batch: Some(3),
                ..Default::default()
            },
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(model(&s).run.new_tokens, 5);
        assert_eq!(model(&s).run.batch, 3);
        let j = s.to_json();
        assert_eq!(j["run"]["new_tokens"], 5);
        assert_eq!(j["optimization"]["attention"], "mla");
        assert_eq!(j["optimization"]["mla"]["impl"], "absorbed");
        // a missing [optimization] section is the standard model
        let (_, text) = ScenarioKind::Model.default_scenario();
        let start = text.find("\n[optimization]\n").unwrap();
        let end = text.find("\n[run]\n").unwrap();
        let bare = format!("{}{}", &text[..start], &text[end..]);
        let s = Scenario::parse(Path::new("t.toml"), &bare).unwrap();
        assert_eq!(model(&s).optimization, OptimizationConfig::standard());
    }

    #[test]
    fn config_override_replaces_the_optimization_section_and_is_checked_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("opt.toml");
        let mut s = Scenario::builtin(ScenarioKind::Model);
        assert_eq!(model(&s).optimization.mtp_depth(), 3);
        // replaces the whole section: keys not in the file fall back to the standard defaults
        std::fs::write(
            &file,
            "[optimization]\nattention = \"gqa\"\n[optimization.gqa]\nn_kv_heads = 2\n",
        )
        .unwrap();
        let o = Overrides {
            config: Some(file.clone()),
            ..Default::default()
        };
        s.apply(&o, Path::new("x")).unwrap();
        let opt = &model(&s).optimization;
        assert_eq!(opt.attention, crate::nn::AttentionKind::Gqa);
        assert_eq!(opt.gqa.n_kv_heads, Some(2));
        assert_eq!(opt.ffn, super::super::optimization::FfnKind::Dense);
        assert_eq!(opt.mtp_depth(), 0);
        assert_eq!(s.to_json()["optimization"]["attention"], "gqa");
        // valid on its own but not for this model (n_heads = 8): named in the config file
        std::fs::write(&file, "attention = \"gqa\"\n[gqa]\nn_kv_heads = 3\n").unwrap();
        let e = s.apply(&o, Path::new("x")).unwrap_err().to_string();
        assert!(
            e.contains("opt.toml:3") && e.contains("optimization.gqa.n_kv_heads"),
            "{e}"
        );
        // an unknown key in the config file is bad input too
        std::fs::write(&file, "[optimization]\nattn = \"mla\"\n").unwrap();
        let e = s.apply(&o, Path::new("x")).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_BAD_INPUT);
        assert!(e.to_string().contains("attn"), "{e}");
        // other kinds have no [optimization] section
        let mut mla = Scenario::builtin(ScenarioKind::Mla);
        std::fs::write(&file, "attention = \"mla\"\n").unwrap();
        let e = mla.apply(&o, Path::new("sc001.toml")).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::EXIT_BAD_INPUT);
        assert!(e.to_string().contains("--config"), "{e}");
    }

    #[test]
    fn json_has_the_overridden_values() {
        let mut s = Scenario::builtin(ScenarioKind::Moe);
        s.apply(
            &Overrides {
                batch: Some(3),
                ..Default::default()
            },
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(s.to_json()["run"]["decode_batch"], 3);
        assert_eq!(s.id(), "SC-003");
        assert!(!s.title().is_empty());
    }
}
