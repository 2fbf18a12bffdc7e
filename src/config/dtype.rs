//! 数值类型：场景文件的 `dtype` 键与 `--dtype` 选项（配置里最底层的叶子类型）。

use serde::{Deserialize, Serialize};

/// 数值类型（参数、KV 缓存与激活；softmax 统计量与路由分数总在 f32 中算）。
/// CPU 后端 flex 支持 `f32`、`f16`、`bf16`（bf16 矩阵乘在 flex 里每次转成 f32 计算，较慢）；wgpu 支持 `f16`（适配器有 SHADER_F16 时，Mesa lavapipe 有）；CUDA 支持
/// `f16` 与 `bf16`。
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32 位浮点（默认）。
    #[default]
    F32,
    /// 16 位浮点。
    F16,
    /// bfloat16。
    Bf16,
}

impl Dtype {
    /// Lowercase name (as in scenario files).
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}
