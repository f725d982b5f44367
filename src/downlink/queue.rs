//! The [`DownlinkQueue`] trait: per-device FIFO queues of validated downlinks (DESIGN §5),
//! and the in-memory implementation. The Redis one is in [`super::redis`].
//!
//! Items are opaque JSON documents (an `ApplicationDownlink` with the server's correlation
//! ID already added); validation happens before anything reaches a queue. Push and replace
//! are all-or-nothing: either every item is stored or none is.

use std::collections::{HashMap, VecDeque};

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::topic::DeviceRef;

/// Why a queue operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The operation would take the queue past its capacity; nothing was stored.
    #[error("downlink queue full: {queued} queued + {adding} new > capacity {capacity}")]
    Full {
        /// Items queued before the operation (0 for a replace).
        queued: usize,
        /// Items the operation tried to add.
        adding: usize,
        /// The per-device capacity.
        capacity: usize,
    },
    /// The backend could not be reached; nothing was stored.
    #[error("downlink queue unavailable: {0}")]
    Unavailable(String),
}

/// Per-device downlink queues. Implementations: [`MemoryDownlinkQueue`] and
/// [`super::redis::RedisDownlinkQueue`].
#[async_trait]
pub trait DownlinkQueue: Send + Sync + 'static {
    /// Appends `items` atomically; returns the new queue length.
    async fn push(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError>;
    /// Replaces the queue with `items` atomically (empty clears it); returns the new length.
    async fn replace(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError>;
    /// Takes the oldest item (the upstream side).
    async fn pop(&self, device: &DeviceRef) -> Result<Option<String>, QueueError>;
    /// Every queued item, oldest first, without removing them.
    async fn list(&self, device: &DeviceRef) -> Result<Vec<String>, QueueError>;
    /// Checks that the backend answers.
    async fn ping(&self) -> Result<(), QueueError>;
}

/// In-process queues for the embedded node and tests.
pub struct MemoryDownlinkQueue {
    capacity: usize,
    queues: Mutex<HashMap<DeviceRef, VecDeque<String>>>,
}

impl MemoryDownlinkQueue {
    /// Queues holding at most `capacity` items per device.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            queues: Mutex::default(),
        }
    }
}

#[async_trait]
impl DownlinkQueue for MemoryDownlinkQueue {
    async fn push(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError> {
        let mut queues = self.queues.lock();
        let queued = queues.get(device).map_or(0, VecDeque::len);
        if queued + items.len() > self.capacity {
            return Err(QueueError::Full {
                queued,
                adding: items.len(),
                capacity: self.capacity,
            });
        }
        let q = queues.entry(device.clone()).or_default();
        q.extend(items.iter().cloned());
        Ok(q.len())
    }

    async fn replace(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError> {
        if items.len() > self.capacity {
            return Err(QueueError::Full {
                queued: 0,
                adding: items.len(),
                capacity: self.capacity,
            });
        }
        let mut queues = self.queues.lock();
        if items.is_empty() {
            queues.remove(device);
        } else {
            queues.insert(device.clone(), items.iter().cloned().collect());
        }
        Ok(items.len())
    }

    async fn pop(&self, device: &DeviceRef) -> Result<Option<String>, QueueError> {
        let mut queues = self.queues.lock();
        let Some(q) = queues.get_mut(device) else {
            return Ok(None);
        };
        let item = q.pop_front();
        if q.is_empty() {
            queues.remove(device);
        }
        Ok(item)
    }

    async fn list(&self, device: &DeviceRef) -> Result<Vec<String>, QueueError> {
        Ok(self
            .queues
            .lock()
            .get(device)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }
}
