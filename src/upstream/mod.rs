//! The upstream side: what The Things Stack's Application Server does around lorabroker.
//!
//! [`Upstream`] registers the devices it serves, publishes their traffic on the bus and
//! takes their downlinks, through the same [`Bus`], [`DownlinkQueue`] and
//! [`DeviceRegistry`] traits the broker uses, so the simulated fleet of `lorabroker dev`
//! and `lorabroker simulate` is a real client of the backends, not a shortcut inside the
//! broker. A real upstream does the same against Redis and NATS (`docs/upstream.md`).

pub mod fleet;
pub mod messages;

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use crate::app::Backends;
use crate::bus::{Bus, BusError};
use crate::devices::{DeviceRegistry, RegistryError};
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
    /// The device registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A queued item is not a JSON document (it was written by something else).
    #[error("queued downlink is not JSON: {0}")]
    Corrupt(String),
}

/// Registers devices, publishes their events and takes their queued downlinks.
#[derive(Clone)]
pub struct Upstream {
    bus: Arc<dyn Bus>,
    queue: Arc<dyn DownlinkQueue>,
    devices: Arc<dyn DeviceRegistry>,
}

impl Upstream {
    /// An upstream over the given backends.
    pub fn new(
        bus: Arc<dyn Bus>,
        queue: Arc<dyn DownlinkQueue>,
        devices: Arc<dyn DeviceRegistry>,
    ) -> Self {
        Self {
            bus,
            queue,
            devices,
        }
    }

    /// An upstream over a node's backends.
    pub fn from_backends(backends: &Backends) -> Self {
        Self::new(
            backends.bus.clone(),
            backends.queue.clone(),
            backends.devices.clone(),
        )
    }

    /// Registers `device` as served by this upstream, so that downlinks to it are accepted
    /// (`downlink.require_known_device`). Registering twice is harmless.
    pub async fn register(&self, device: &DeviceRef) -> Result<(), RegistryError> {
        self.devices.add(device).await.map(drop)
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

    /// Takes the oldest queued downlink of `device`, if any: one atomic step that also
    /// gives its bytes back to the application's and tenant's quotas.
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
