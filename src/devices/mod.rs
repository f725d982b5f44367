//! The device registry (DESIGN §5): which devices of an application the upstream serves.
//!
//! The upstream (The Things Stack's side, or `lorabroker simulate` and the dev fleet)
//! registers the devices it serves; operators add and remove them with `lorabroker devices`
//! and the admin API. With `downlink.require_known_device`, a downlink to a device that is
//! not registered fails with `device_not_found` and nothing is queued, so no client can
//! make queues for devices nobody serves.
//!
//! [`DeviceRegistry`] has an in-memory implementation ([`MemoryDeviceRegistry`]) and a
//! Redis one ([`redis::RedisDeviceRegistry`]: one set per application, documented in
//! `docs/upstream.md`), which pass one behavioural suite (`tests/backends.rs`).

pub mod redis;

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use parking_lot::RwLock;

use crate::topic::{AppRef, DeviceRef, Id};

/// Why a registry operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The backend could not be reached or did not answer.
    #[error("device registry unavailable: {0}")]
    Unavailable(String),
}

/// The devices each application's upstream serves.
#[async_trait]
pub trait DeviceRegistry: Send + Sync + 'static {
    /// Registers a device; returns whether it was new.
    async fn add(&self, device: &DeviceRef) -> Result<bool, RegistryError>;
    /// Unregisters a device; returns whether it was registered.
    async fn remove(&self, device: &DeviceRef) -> Result<bool, RegistryError>;
    /// Whether a device is registered.
    async fn contains(&self, device: &DeviceRef) -> Result<bool, RegistryError>;
    /// The registered devices of one application, sorted.
    async fn list(&self, app: &AppRef) -> Result<Vec<Id>, RegistryError>;
    /// Checks that the backend answers.
    async fn ping(&self) -> Result<(), RegistryError>;
}

/// In-process registry for the embedded node and tests.
#[derive(Default)]
pub struct MemoryDeviceRegistry {
    apps: RwLock<HashMap<AppRef, BTreeSet<Id>>>,
}

impl MemoryDeviceRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl DeviceRegistry for MemoryDeviceRegistry {
    async fn add(&self, device: &DeviceRef) -> Result<bool, RegistryError> {
        Ok(self
            .apps
            .write()
            .entry(device.app.clone())
            .or_default()
            .insert(device.device.clone()))
    }

    async fn remove(&self, device: &DeviceRef) -> Result<bool, RegistryError> {
        let mut apps = self.apps.write();
        let Some(devices) = apps.get_mut(&device.app) else {
            return Ok(false);
        };
        let removed = devices.remove(&device.device);
        if devices.is_empty() {
            apps.remove(&device.app);
        }
        Ok(removed)
    }

    async fn contains(&self, device: &DeviceRef) -> Result<bool, RegistryError> {
        Ok(self
            .apps
            .read()
            .get(&device.app)
            .is_some_and(|d| d.contains(&device.device)))
    }

    async fn list(&self, app: &AppRef) -> Result<Vec<Id>, RegistryError> {
        Ok(self
            .apps
            .read()
            .get(app)
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        Ok(())
    }
}
