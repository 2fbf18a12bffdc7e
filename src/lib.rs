//! dsopt：在 Burn 中实现 DeepSeek 的推理优化（MLA、MTP、MoE），并通过真实测量验证其收益。
//!
//! The library holds everything generic over `B: Backend` (models, runners, the monitor) and
//! the non-generic parts (scenarios, reports, backend discovery). The binary names the concrete
//! backends in one dispatch point.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod kernels;
pub mod monitor;
pub mod report;
pub mod rng;
pub mod train;

pub use config::Scenario;
pub use error::DsoptError;
pub use monitor::PerformanceMonitor;
pub mod nn;
