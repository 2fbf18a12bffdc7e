//! DeepSeekMoE：路由器（`MoeRouter`）与 MoE 层（细粒度路由专家 + 常驻共享专家）。

mod cpu;
pub mod layer;
pub mod offload;
pub mod router;
pub mod storage;

pub use layer::{MoeConfig, MoeLayer};
pub use offload::{ExpertStore, HostExpert, OffloadStats};
pub use router::{LoadStats, MoeRouter, RouterConfig, Routing, ScoreFunc, TopkMethod};
pub use storage::{
    ExpertFile, ExpertFileSpec, ExpertSource, ResidentExperts, StreamStats, StreamedExperts,
};
