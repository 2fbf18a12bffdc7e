//! 报告：模式（`schema_version` 2）、JSON/CSV/Markdown/终端表格写出，以及 CI 门禁（gate）。

pub mod aggregate;
pub mod chart;
pub mod compare;
pub mod export;
pub mod gate;
pub mod schema;
pub mod spec;
pub mod summary;
pub mod sweep;
pub mod table;
pub mod timefmt;
pub mod write;

pub use schema::*;
