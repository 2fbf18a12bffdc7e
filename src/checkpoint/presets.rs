//! 内置预设：已发布模型的 `config.json`（DeepSeek-V2-Lite、V2、V3 与 Moonlight 在 Hugging Face 上发布的取值），
//! 以文本嵌入二进制，并与用户的检查点走同一个解析器。没有检查点时，预设给出准确的维度，
//! 权重是随机的（报告里写明）。

use super::hf_config::parse_config;
use super::model::DeepseekConfig;

/// 一个内置预设。
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    /// `--model` 用的名字。
    pub name: &'static str,
    /// 展示用的名字。
    pub title: &'static str,
    /// 已发布的 `config.json`（只含会改变计算的键，及少量说明用的键）。
    pub config_json: &'static str,
}

/// 全部内置预设。
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "deepseek-v2-lite",
        title: "DeepSeek-V2-Lite",
        config_json: include_str!("presets/deepseek-v2-lite.json"),
    },
    Preset {
        name: "deepseek-v2",
        title: "DeepSeek-V2",
        config_json: include_str!("presets/deepseek-v2.json"),
    },
    Preset {
        name: "deepseek-v3",
        title: "DeepSeek-V3 / R1",
        config_json: include_str!("presets/deepseek-v3.json"),
    },
    Preset {
        name: "moonlight-16b-a3b",
        title: "Moonlight-16B-A3B",
        config_json: include_str!("presets/moonlight-16b-a3b.json"),
    },
];

impl Preset {
    /// The parsed model description (the embedded text is checked by the tests).
    pub fn config(&self) -> DeepseekConfig {
        parse_config(&format!("preset {}", self.name), self.config_json)
            .expect("embedded preset config parses")
    }
}

/// The preset called `name`, if any.
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// The preset names, comma-separated (for error messages and help).
pub fn names() -> String {
    PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}
