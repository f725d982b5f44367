//! The [`DownlinkQueue`] trait: per-device FIFO queues of validated downlinks (DESIGN §5),
//! their [`QueueLimits`], and why an operation fails ([`QueueError`]). The implementations
//! are in [`super::memory`] and [`super::redis`].
//!
//! Items are opaque JSON documents (an `ApplicationDownlink` with the server's correlation
//! ID already added); validation happens before anything reaches a queue. Push and replace
//! are all-or-nothing: either every item is stored or none is.
//!
//! Limits, all enforced in the same atomic step as the write: items per device, bytes per
//! device, bytes per application and bytes per tenant (the quotas). The bytes of an item
//! are the length of its stored JSON. A queue nothing was written to for
//! [`QueueLimits::idle_expiry`] is deleted, and its bytes leave the quotas. The upstream
//! takes items with [`DownlinkQueue::pop`], which gives their bytes back in the same step.

use std::time::Duration;

use async_trait::async_trait;

use crate::config::DownlinkConfig;
use crate::topic::DeviceRef;

/// Why a queue operation failed. Nothing was stored in every case.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The operation would take the queue past its capacity in items.
    #[error("downlink queue full: {queued} queued + {adding} new > capacity {capacity}")]
    Full {
        /// Items queued before the operation (0 for a replace).
        queued: usize,
        /// Items the operation tried to add.
        adding: usize,
        /// The per-device capacity.
        capacity: usize,
    },
    /// The operation would take the device's queue past `downlink.max_device_queue_bytes`.
    #[error(
        "device downlink queue bytes exceeded: {queued} queued + {adding} new bytes > {limit}"
    )]
    DeviceBytes {
        /// Bytes that stay queued (0 for a replace).
        queued: u64,
        /// Bytes the operation tried to add.
        adding: u64,
        /// The per-device limit.
        limit: u64,
    },
    /// The operation would take the application past `downlink.max_application_queue_bytes`.
    #[error("application downlink quota exceeded: {queued} queued + {adding} new bytes > {limit}")]
    ApplicationQuota {
        /// Bytes that stay queued for the application.
        queued: u64,
        /// Bytes the operation tried to add.
        adding: u64,
        /// The per-application quota.
        limit: u64,
    },
    /// The operation would take the tenant past `downlink.max_tenant_queue_bytes`.
    #[error("tenant downlink quota exceeded: {queued} queued + {adding} new bytes > {limit}")]
    TenantQuota {
        /// Bytes that stay queued for the tenant.
        queued: u64,
        /// Bytes the operation tried to add.
        adding: u64,
        /// The per-tenant quota.
        limit: u64,
    },
    /// The backend could not be reached.
    #[error("downlink queue unavailable: {0}")]
    Unavailable(String),
}

/// The bounds a queue enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most items per device.
    pub capacity: usize,
    /// Most bytes per device.
    pub device_bytes: u64,
    /// Most bytes per application.
    pub application_bytes: u64,
    /// Most bytes per tenant.
    pub tenant_bytes: u64,
    /// A queue not written to for this long is deleted.
    pub idle_expiry: Duration,
}

impl QueueLimits {
    /// The limits of `[downlink]`.
    pub fn from_config(config: &DownlinkConfig) -> Self {
        Self {
            capacity: config.queue_capacity,
            device_bytes: config.max_device_queue_bytes,
            application_bytes: config.max_application_queue_bytes,
            tenant_bytes: config.max_tenant_queue_bytes,
            idle_expiry: config.queue_idle_expiry,
        }
    }

    /// The default limits with another per-device capacity in items.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::from_config(&DownlinkConfig::default())
        }
    }
}

/// What one device's queue holds and what its application and tenant use, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueUsage {
    /// Items in the device's queue.
    pub items: usize,
    /// Bytes in the device's queue.
    pub device_bytes: u64,
    /// Bytes queued for the device's application.
    pub application_bytes: u64,
    /// Bytes queued for the device's tenant.
    pub tenant_bytes: u64,
}

/// Per-device downlink queues. Implementations: [`super::MemoryDownlinkQueue`] and
/// [`super::redis::RedisDownlinkQueue`].
#[async_trait]
pub trait DownlinkQueue: Send + Sync + 'static {
    /// Appends `items` atomically, within every limit; returns the new queue length.
    async fn push(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError>;
    /// Replaces the queue with `items` atomically (empty clears it), within every limit;
    /// returns the new length.
    async fn replace(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError>;
    /// Takes the oldest item, giving its bytes back to the quotas in the same atomic step:
    /// the "take next downlink" of the upstream.
    async fn pop(&self, device: &DeviceRef) -> Result<Option<String>, QueueError>;
    /// Every queued item, oldest first, without removing them.
    async fn list(&self, device: &DeviceRef) -> Result<Vec<String>, QueueError>;
    /// What the device's queue, its application and its tenant hold.
    async fn usage(&self, device: &DeviceRef) -> Result<QueueUsage, QueueError>;
    /// Checks that the backend answers.
    async fn ping(&self) -> Result<(), QueueError>;
}

/// Bytes of a batch of items, as the queues count them.
pub(crate) fn bytes_of(items: &[String]) -> u64 {
    items.iter().map(|i| i.len() as u64).sum()
}
