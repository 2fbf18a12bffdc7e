//! 配置：优化配置（`OptimizationConfig`）与场景文件（scenario）的模式、加载与校验。
//!
//! Scenario files are TOML; every section is parsed with `deny_unknown_fields`, and the
//! values are validated so that a mistake is reported with the file, the key, its line and a fix.

pub mod diag;
pub mod dtype;
mod load;
pub mod model_ref;
pub mod optimization;
mod renamed;
pub mod scenario;
pub mod validate;
pub mod variants;

pub use diag::{find_key_line, Violation};
pub use optimization::{
    DecoderShape, FfnKind, GqaOptions, MlaOptions, MoeOptions, MtpOptions, OptimizationConfig,
};
pub use scenario::{
    CalibrateScenario, Dtype, MlaScenario, MlaVariant, ModelRun, ModelScenario, MoeScenario,
    MoeVariant, MtpScenario, Overrides, Scenario, ScenarioKind,
};
