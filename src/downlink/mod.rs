//! Downlinks (DESIGN §5): validation of `down/push` and `down/replace` bodies, the
//! per-device [`DownlinkQueue`], and the events that tell the application what happened.

pub mod queue;
pub mod redis;

pub use queue::{DownlinkQueue, MemoryDownlinkQueue, QueueError};
