//! Downlinks (DESIGN §5): validation of `down/push` and `down/replace` bodies, the
//! per-device [`DownlinkQueue`] with its limits and quotas (memory and Redis), and the
//! events that tell the application what happened.

pub mod class_b_c;
pub mod error;
pub mod memory;
pub mod queue;
pub mod redis;
pub mod service;
pub mod validate;

pub use error::DownlinkError;
pub use memory::MemoryDownlinkQueue;
pub use queue::{DownlinkQueue, QueueError, QueueLimits, QueueUsage};
pub use service::{DownlinkService, ServiceSettings};
