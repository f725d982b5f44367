//! The simulated fleet: devices that join, send uplinks, and take their downlinks.
//!
//! The fleet first registers its devices in the device registry (retrying while the
//! backend is away), as an upstream must before the broker accepts their downlinks. Each
//! device then runs as its own task. It joins, then every `uplink_interval` sends an uplink
//! and, like a class A device, takes its next queued downlink in the receive window after
//! it: `down/sent`, then `down/ack` when the downlink was confirmed. Devices rejoin every
//! [`REJOIN_EVERY`] uplinks, so a subscriber that arrives late still sees joins.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{SimDevice, Upstream};
use crate::topic::{AppRef, DeviceRef, Event, Id};

/// Uplinks between two joins of one device.
pub const REJOIN_EVERY: u32 = 10;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The application the devices belong to.
    pub app: AppRef,
    /// Number of devices, named `dev1`…`devN`.
    pub devices: u32,
    /// Time between two uplinks of one device.
    pub uplink_interval: Duration,
}

/// How long the fleet waits before registering again when the registry failed.
const REGISTER_RETRY: Duration = Duration::from_secs(1);

/// The devices of the fleet: `dev1`…`devN` of the application.
pub fn fleet_devices(config: &FleetConfig) -> Vec<DeviceRef> {
    (1..=config.devices)
        .filter_map(|i| Id::parse(&format!("dev{i}")).ok())
        .map(|id| DeviceRef::new(config.app.clone(), id))
        .collect()
}

/// Registers `devices`, retrying every [`REGISTER_RETRY`] while the registry is away.
/// Returns false when `stop` came first.
async fn register_all(
    upstream: &Upstream,
    devices: &[DeviceRef],
    stop: &CancellationToken,
) -> bool {
    for device in devices {
        loop {
            match upstream.register(device).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(device = %device.device, error = %e, "device not registered, retrying")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(REGISTER_RETRY) => {}
            }
        }
    }
    true
}

/// Runs the fleet until `stop` is cancelled: registers the devices, then runs them.
/// Backend errors are logged and the device carries on with its next uplink, as a real
/// network would.
pub async fn run_fleet(upstream: Upstream, config: FleetConfig, stop: CancellationToken) {
    let devices = fleet_devices(&config);
    if !register_all(&upstream, &devices, &stop).await {
        return;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (device, i) in devices.into_iter().zip(1..) {
        let device = SimDevice::new(device, i);
        // Spread the devices over one interval so uplinks do not arrive in bursts.
        let offset = config
            .uplink_interval
            .mul_f64(f64::from(i - 1) / f64::from(config.devices));
        tasks.spawn(run_device(
            upstream.clone(),
            device,
            config.uplink_interval,
            offset,
            stop.clone(),
        ));
    }
    stop.cancelled().await;
    tasks.shutdown().await;
}

async fn run_device(
    upstream: Upstream,
    mut device: SimDevice,
    interval: Duration,
    offset: Duration,
    stop: CancellationToken,
) {
    let span = tracing::info_span!("device", id = %device.device.device);
    let _enter = span.enter();
    tokio::time::sleep(offset).await;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut uplinks = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if uplinks % REJOIN_EVERY == 0 {
            let join = device.join();
            publish(&upstream, &device.device, Event::Join, &join).await;
        }
        uplinks = uplinks.wrapping_add(1);
        let up = device.uplink();
        publish(&upstream, &device.device, Event::Up, &up).await;
        serve_downlink(&upstream, &mut device).await;
    }
}

/// Takes the device's next downlink, if any, and reports it sent (and acknowledged).
async fn serve_downlink(upstream: &Upstream, device: &mut SimDevice) {
    let downlink = match upstream.next_downlink(&device.device).await {
        Ok(Some(d)) => d,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "downlink queue not readable");
            return;
        }
    };
    let sent = device.downlink_sent(&downlink);
    publish(upstream, &device.device, Event::DownSent, &sent).await;
    if downlink["confirmed"] == true {
        let ack = device.downlink_ack(&sent["downlink_sent"]);
        publish(upstream, &device.device, Event::DownAck, &ack).await;
    }
}

async fn publish(upstream: &Upstream, device: &DeviceRef, event: Event, doc: &serde_json::Value) {
    if let Err(e) = upstream.publish_json(device, event, doc).await {
        tracing::warn!(?event, error = %e, "event not published");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, EmbeddedBus};
    use crate::devices::{DeviceRegistry, MemoryDeviceRegistry};
    use crate::downlink::{DownlinkQueue, MemoryDownlinkQueue};
    use futures::StreamExt;
    use serde_json::Value;
    use std::sync::Arc;

    #[tokio::test]
    async fn devices_join_uplink_and_serve_confirmed_downlinks() {
        let bus = Arc::new(EmbeddedBus::new());
        let queue = Arc::new(MemoryDownlinkQueue::new(10));
        let devices = Arc::new(MemoryDeviceRegistry::new());
        let app = AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap());
        let dev1 = DeviceRef::new(app.clone(), Id::parse("dev1").unwrap());
        queue
            .push(
                &dev1,
                &[r#"{"f_port":15,"confirmed":true,"correlation_ids":["mine"]}"#.into()],
            )
            .await
            .unwrap();
        let mut events = bus
            .subscribe("v3.tenant1.app1.devices.dev1.>".into())
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let fleet = tokio::spawn(run_fleet(
            Upstream::new(bus.clone(), queue.clone(), devices.clone()),
            FleetConfig {
                app,
                devices: 2,
                uplink_interval: Duration::from_millis(50),
            },
            stop.clone(),
        ));
        let mut subjects = Vec::new();
        while subjects.len() < 4 {
            let msg = events.next().await.unwrap();
            let doc: Value = serde_json::from_slice(&msg.payload).unwrap();
            if msg.subject.ends_with("down.ack") {
                assert_eq!(doc["correlation_ids"][0], "mine");
            }
            subjects.push(msg.subject.rsplit_once("dev1.").unwrap().1.to_owned());
        }
        assert_eq!(subjects, ["join", "up", "down.sent", "down.ack"]);
        // The fleet registered the devices it serves.
        let registered: Vec<String> = devices
            .list(&dev1.app)
            .await
            .unwrap()
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(registered, ["dev1", "dev2"]);
        stop.cancel();
        fleet.await.unwrap();
        assert!(queue.list(&dev1).await.unwrap().is_empty());
    }
}
