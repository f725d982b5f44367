//! Downlinks (DESIGN §5): validation of `down/push` and `down/replace` bodies, the
//! per-device [`DownlinkQueue`], and the events that tell the application what happened.

pub mod error;
pub mod queue;
pub mod redis;
pub mod service;
pub mod validate;

pub use error::DownlinkError;
pub use queue::{DownlinkQueue, MemoryDownlinkQueue, QueueError};
pub use service::DownlinkService;
