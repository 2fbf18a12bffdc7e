//! 真实的 DeepSeek 模型：模型描述（Hugging Face `config.json` 的键名）、内置预设与
//! `config.json` 的解析。
//!
//! `--model NAME|DIR`：值是一个已存在的目录时，读取其中的 `config.json`；否则按预设名查找
//! （未知的名字列出全部预设）。`--layers N` 保留前 N 层（稠密在前的布局不变）。
//! `bench` 目前只取维度：权重总是随机的，报告里写明"随机权重、某模型的维度、N / 总层数"。
//! 检查点权重的加载（[`load`]：safetensors 单文件或分片、FP8 块缩放）由 `dsopt verify`
//! 使用（[`reference`]：与 transformers 的参考 logits 比较）。

pub mod fit;
pub mod hf_config;
pub mod load;
pub mod model;
pub mod presets;
pub mod reference;
pub mod safetensors;
mod scenario;
pub mod tokenizer;
pub mod verify;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use hf_config::{parse_config, read_config_file};
pub use model::{DeepseekConfig, Fp8Blocks, ModelType, MoeSpec, ParamCount, TopkMethod};
pub use presets::{Preset, PRESETS};
pub use scenario::{add_weights_to_budget, apply_model, apply_model_source};

use crate::config::Dtype;
use crate::error::DsoptError;

/// 模型从哪里来。
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// 内置预设（名字）。
    Preset(String),
    /// 检查点目录（只读了它的 `config.json`）。
    Dir(PathBuf),
}

/// 一个解析好的 `--model`：描述（已按 `--layers` 截断）、来源与原来的层数。
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    /// 来源。
    pub source: ModelSource,
    /// 展示用的名字（预设的标题，或目录名）。
    pub title: String,
    /// 模型描述（前 `layers` 层）。
    pub config: DeepseekConfig,
    /// 完整模型的层数。
    pub total_layers: usize,
}

impl ModelSpec {
    /// One line for reports: where the dimensions come from, how many layers, and that the
    /// weights are random.
    pub fn describe(&self) -> String {
        format!(
            "random weights, {} dimensions, {} of {} layers",
            self.title, self.config.num_hidden_layers, self.total_layers
        )
    }
}

/// Resolves `--model` (an existing directory, else a preset name) and `--layers`.
pub fn resolve(arg: &str, layers: Option<usize>) -> Result<ModelSpec, DsoptError> {
    let path = Path::new(arg);
    let (source, title, config) = if path.is_dir() {
        let config = read_config_file(&path.join("config.json"))?;
        let title = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| arg.to_string());
        (ModelSource::Dir(path.to_path_buf()), title, config)
    } else {
        let Some(p) = presets::find(arg) else {
            return Err(DsoptError::Model {
                source_name: format!("`{arg}`"),
                key: None,
                message: "is neither a directory nor a built-in preset".into(),
                fix: format!(
                    "use one of: {} (see `dsopt info`), or a folder with a config.json",
                    presets::names()
                ),
            });
        };
        (
            ModelSource::Preset(p.name.into()),
            p.title.into(),
            p.config(),
        )
    };
    let total_layers = config.num_hidden_layers;
    let config = match layers {
        None => config,
        Some(n) if n >= 1 && n <= total_layers => config.with_layers(n),
        Some(n) => {
            return Err(DsoptError::Usage(format!(
                "--layers {n}: {title} has {total_layers} layers; give 1..={total_layers}"
            )))
        }
    };
    Ok(ModelSpec {
        source,
        title,
        config,
        total_layers,
    })
}

#[cfg(test)]
mod tests;

/// Exit 3 before loading when the parameters (in the run's dtype; the MTP layer too when every
/// layer is kept) and 1 GiB for the rest exceed this machine's memory, with the largest
/// `--layers` that fits (`full` is the whole model's description, `layers` those kept;
/// `fix_for_layers(n)` says how to use n layers, at least `min_layers`; `none_fits` replaces the
/// generic advice when not even those fit). [`fit::Fit`] with the checkpoint's counts.
pub fn check_fits(
    full: &DeepseekConfig,
    layers: usize,
    min_layers: usize,
    dtype: Dtype,
    model: &str,
    fix_for_layers: impl Fn(usize) -> String,
    none_fits: Option<&str>,
) -> Result<(), DsoptError> {
    let total = full.num_hidden_layers;
    let fit = fit::Fit {
        model,
        layers,
        total_layers: total,
        min_layers,
        what: "its parameters",
        dtype,
        reserve: (fit::ONE_GIB, "1 GiB".into()),
        none_fits: none_fits.map(str::to_string),
    };
    fit.check(
        |n| {
            let counts = full.with_layers(n).param_count();
            let mtp = if n == total { counts.mtp } else { 0 };
            (counts.total + mtp) * dtype.bytes() as u128
        },
        fix_for_layers,
    )
}
