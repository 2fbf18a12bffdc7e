//! 配置：场景文件（scenario）的模式、加载与校验。
//!
//! Scenario files are TOML; every section is parsed with `deny_unknown_fields`, and the
//! values are validated so that a mistake is reported with the file, the key, its line and a fix.

pub mod scenario;
pub mod validate;

pub use scenario::{
    CalibrateScenario, Dtype, MlaScenario, MoeScenario, MtpScenario, Overrides, Scenario,
    ScenarioKind,
};
pub use validate::{find_key_line, Violation};
