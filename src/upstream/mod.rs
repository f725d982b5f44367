//! The upstream side: what The Things Stack's Application Server does around lorabroker.
//!
//! [`Upstream`] publishes device traffic on the bus and drains downlink queues, through the
//! same [`Bus`] and [`DownlinkQueue`] traits the broker uses, so the simulated fleet of
//! `lorabroker dev` and `lorabroker simulate` is a real client of the backends, not a
//! shortcut inside the broker.

pub mod fleet;
pub mod messages;

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::bus::{Bus, BusError};
use crate::downlink::{DownlinkQueue, QueueError};
use crate::topic::{DeviceRef, Event};

pub use fleet::{run_fleet, FleetConfig};
pub use messages::SimDevice;

/// Why an upstream operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Publishing on the bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The downlink queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// A queued item is not a JSON document (it was written by something else).
    #[error("queued downlink is not JSON: {0}")]
    Corrupt(String),
}

/// Publishes device events and takes queued downlinks.
#[derive(Clone)]
pub struct Upstream {
    bus: Arc<dyn Bus>,
    queue: Arc<dyn DownlinkQueue>,
}

impl Upstream {
    /// An upstream over the given backends.
    pub fn new(bus: Arc<dyn Bus>, queue: Arc<dyn DownlinkQueue>) -> Self {
        Self { bus, queue }
    }

    /// Publishes `payload` as `event` of `device`; subscribers receive these bytes.
    pub async fn publish(
        &self,
        device: &DeviceRef,
        event: Event,
        payload: Bytes,
    ) -> Result<(), BusError> {
        self.bus.publish(device.subject(event), payload).await
    }

    /// Publishes a JSON document as `event` of `device`.
    pub async fn publish_json(
        &self,
        device: &DeviceRef,
        event: Event,
        doc: &Value,
    ) -> Result<(), BusError> {
        self.publish(device, event, Bytes::from(doc.to_string()))
            .await
    }

    /// Takes the oldest queued downlink of `device`, if any.
    pub async fn next_downlink(&self, device: &DeviceRef) -> Result<Option<Value>, UpstreamError> {
        match self.queue.pop(device).await? {
            None => Ok(None),
            Some(item) => serde_json::from_str(&item)
                .map(Some)
                .map_err(|e| UpstreamError::Corrupt(e.to_string())),
        }
    }

    /// Makes sure everything published so far has left this process.
    pub async fn flush(&self) -> Result<(), BusError> {
        self.bus.flush().await
    }
}
