//! [`DownlinkService`]: what happens to a `down/push` or `down/replace` publish.
//!
//! Validate the whole body, check that the device is registered (with
//! `downlink.require_known_device`), add the server's correlation ID to each item, write
//! the queue in one all-or-nothing operation within every limit, then tell the application:
//! one `down/queued` event per item, or **one** `down/failed` event for the whole rejected
//! request (DESIGN §5).
//!
//! No amplification (DESIGN §9): a `down/failed` event is an envelope (device IDs, time,
//! the first error, at most [`MAX_EVENT_ENVELOPE`] bytes) plus what it echoes of the
//! request (the first rejected item, the errors by item index, the items), and the echo is
//! held to [`ECHO_FACTOR`] times the bytes received: whatever a client sends, a rejected
//! request publishes at most 5× its bytes plus one envelope. An accepted request publishes
//! one `down/queued` per item, as The Things Stack does: each is an envelope plus the item
//! (twice its correlation IDs), so at most 5× the bytes received plus one envelope per
//! queued item, and a request has at most `downlink.max_items_per_request` items.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::error::DownlinkError;
use super::queue::{DownlinkQueue, QueueError};
use super::validate::{parse_request, Rejection, RequestLimits};
use crate::bus::Bus;
use crate::config::DownlinkConfig;
use crate::devices::DeviceRegistry;
use crate::message::{correlation_ids, document, end_device_ids};
use crate::topic::{DeviceRef, DownlinkOp, Event};

/// Largest `down/failed` event without its echo of the request: the envelope (IDs of at
/// most 36 characters, the time) and one error object (its message at most
/// [`super::error::MAX_MESSAGE_LEN`] bytes, JSON escaping included).
pub const MAX_EVENT_ENVELOPE: usize = 1024;

/// What a `down/failed` event may echo of a rejected request, per byte received.
pub const ECHO_FACTOR: usize = 4;

/// How the service checks requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceSettings {
    /// Bounds of a request and its items.
    pub limits: RequestLimits,
    /// Refuse downlinks to devices the registry does not know.
    pub require_known_device: bool,
}

impl ServiceSettings {
    /// The settings of `[downlink]`.
    pub fn from_config(config: &DownlinkConfig) -> Self {
        Self {
            limits: RequestLimits::from_config(config),
            require_known_device: config.require_known_device,
        }
    }
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self::from_config(&DownlinkConfig::default())
    }
}

/// Validates downlink requests, queues them and publishes their events on the bus.
#[derive(Clone)]
pub struct DownlinkService {
    queue: Arc<dyn DownlinkQueue>,
    devices: Arc<dyn DeviceRegistry>,
    bus: Arc<dyn Bus>,
    settings: ServiceSettings,
}

impl DownlinkService {
    /// A service writing to `queue`, checking devices in `devices` and publishing events
    /// on `bus`.
    pub fn new(
        queue: Arc<dyn DownlinkQueue>,
        devices: Arc<dyn DeviceRegistry>,
        bus: Arc<dyn Bus>,
        settings: ServiceSettings,
    ) -> Self {
        Self {
            queue,
            devices,
            bus,
            settings,
        }
    }

    /// Handles one publish to `device`'s `down/push` or `down/replace` topic. Returns the
    /// number of items queued; on error nothing was queued and one `down/failed` was sent.
    pub async fn handle(
        &self,
        device: &DeviceRef,
        op: DownlinkOp,
        body: &[u8],
    ) -> Result<usize, DownlinkError> {
        let items = match parse_request(body, &self.settings.limits) {
            Ok(items) => items,
            Err(rejection) => return Err(self.reject(device, body.len(), rejection).await),
        };
        let items: Vec<Value> = items
            .into_iter()
            .map(|item| Value::Object(with_server_id(item)))
            .collect();
        if let Err(error) = self.check_device(device).await {
            return Err(self.reject_all(device, body.len(), error, items).await);
        }
        let encoded: Vec<String> = items.iter().map(Value::to_string).collect();
        let result = match op {
            DownlinkOp::Push => self.queue.push(device, &encoded).await,
            DownlinkOp::Replace => self.queue.replace(device, &encoded).await,
        };
        if let Err(e) = result {
            return Err(self.reject_all(device, body.len(), e.into(), items).await);
        }
        for item in items {
            let ids = correlation_ids(&item);
            let doc = document(end_device_ids(device), ids, "downlink_queued", item);
            self.publish(device, Event::DownQueued, &doc).await;
        }
        Ok(encoded.len())
    }

    /// Publishes the one `down/failed` of a publish refused before it reached
    /// [`DownlinkService::handle`] (a topic of the device that is not writable, a key
    /// without the down-write right), without items: nothing of it was read.
    pub async fn report_refused(&self, device: &DeviceRef, error: DownlinkError) {
        self.reject_all(device, 0, error, Vec::new()).await;
    }

    /// `device_not_found` unless the device is registered (or the check is off). A
    /// registry that cannot answer counts as an unavailable queue: the client may retry.
    async fn check_device(&self, device: &DeviceRef) -> Result<(), DownlinkError> {
        if !self.settings.require_known_device {
            return Ok(());
        }
        match self.devices.contains(device).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(DownlinkError::DeviceNotFound(device.device.to_string())),
            Err(e) => Err(DownlinkError::Queue(QueueError::Unavailable(e.to_string()))),
        }
    }

    /// Rejects a whole valid request (unknown device, a limit, the backend).
    async fn reject_all(
        &self,
        device: &DeviceRef,
        received: usize,
        error: DownlinkError,
        items: Vec<Value>,
    ) -> DownlinkError {
        let rejection = Rejection {
            error,
            errors: Vec::new(),
            items,
        };
        self.reject(device, received, rejection).await
    }

    /// Publishes the one `down/failed` event of a rejected request; returns its error.
    async fn reject(
        &self,
        device: &DeviceRef,
        received: usize,
        rejection: Rejection,
    ) -> DownlinkError {
        let doc = failed_event(device, received, &rejection);
        self.publish(device, Event::DownFailed, &doc).await;
        rejection.error
    }

    async fn publish(&self, device: &DeviceRef, event: Event, doc: &Value) {
        let payload = Bytes::from(doc.to_string());
        if let Err(e) = self.bus.publish(device.subject(event), payload).await {
            tracing::warn!(device = %device.device, ?event, error = %e, "downlink event not published");
        }
    }
}

/// The `down/failed` document of a rejected request of `received` bytes, in The Things
/// Stack's `downlink_failed` shape (`downlink`: the first rejected item, `error`: its
/// error) plus `errors` (`[{"index":i,"error":{…}}]`, each failing item's error) and
/// `downlinks` (the request's items, `null` for one not echoed). What is echoed stays
/// within [`ECHO_FACTOR`] × `received` bytes; `"truncated": true` says something was left
/// out.
pub fn failed_event(device: &DeviceRef, received: usize, rejection: &Rejection) -> Value {
    let mut echo = Echo {
        left: ECHO_FACTOR.saturating_mul(received),
        truncated: false,
    };
    let mut body = Map::new();
    let mut top_ids = Vec::new();
    let first = rejection.errors.first().map_or(0, |(i, _)| *i);
    if let Some(item) = rejection.items.get(first) {
        if echo.take("downlink", item) {
            body.insert("downlink".into(), item.clone());
            let ids = correlation_ids(item);
            if echo.take("correlation_ids", &json!(ids)) {
                top_ids = ids;
            }
        }
    }
    body.insert("error".into(), rejection.error.to_error_details());
    let mut errors = Vec::new();
    for (index, error) in &rejection.errors {
        let entry = json!({ "index": index, "error": error.to_error_details() });
        if !echo.take("", &entry) {
            break;
        }
        errors.push(entry);
    }
    body.insert("errors".into(), Value::Array(errors));
    if !rejection.items.is_empty() {
        let mut downlinks = Vec::new();
        for item in &rejection.items {
            if echo.take("", item) {
                downlinks.push(item.clone());
            } else if echo.take("", &Value::Null) {
                downlinks.push(Value::Null);
            } else {
                break;
            }
        }
        body.insert("downlinks".into(), Value::Array(downlinks));
    }
    if echo.truncated {
        body.insert("truncated".into(), Value::Bool(true));
    }
    document(
        end_device_ids(device),
        top_ids,
        "downlink_failed",
        Value::Object(body),
    )
}

/// The byte budget of what a `down/failed` event echoes.
struct Echo {
    left: usize,
    truncated: bool,
}

impl Echo {
    /// Whether `value` (under `key`, with its separators) fits what is left; takes it if so.
    fn take(&mut self, key: &str, value: &Value) -> bool {
        let cost = json_len(value).saturating_add(key.len() + 4);
        if cost <= self.left {
            self.left -= cost;
            true
        } else {
            self.truncated = true;
            false
        }
    }
}

/// Length of `value` as compact JSON, without building the string.
fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

/// Adds the server's correlation ID `as:downlink:<ULID>` to an item.
fn with_server_id(mut item: Map<String, Value>) -> Map<String, Value> {
    let id = Value::String(format!("as:downlink:{}", ulid::Ulid::new()));
    match item
        .get_mut("correlation_ids")
        .and_then(Value::as_array_mut)
    {
        Some(ids) => ids.push(id),
        None => {
            item.insert("correlation_ids".into(), Value::Array(vec![id]));
        }
    }
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::EmbeddedBus;
    use crate::devices::MemoryDeviceRegistry;
    use crate::downlink::MemoryDownlinkQueue;
    use crate::topic::{AppRef, Id};
    use futures::StreamExt;

    fn device() -> DeviceRef {
        DeviceRef::new(
            AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap()),
            Id::parse("dev1").unwrap(),
        )
    }

    struct World {
        bus: Arc<EmbeddedBus>,
        queue: Arc<MemoryDownlinkQueue>,
        devices: Arc<MemoryDeviceRegistry>,
        service: DownlinkService,
    }

    async fn world(settings: ServiceSettings) -> World {
        let bus = Arc::new(EmbeddedBus::new());
        let queue = Arc::new(MemoryDownlinkQueue::new(10));
        let devices = Arc::new(MemoryDeviceRegistry::new());
        devices.add(&device()).await.unwrap();
        let service = DownlinkService::new(queue.clone(), devices.clone(), bus.clone(), settings);
        World {
            bus,
            queue,
            devices,
            service,
        }
    }

    #[tokio::test]
    async fn queued_items_carry_the_server_id_and_events_follow() {
        let w = world(ServiceSettings::default()).await;
        let mut events = w.bus.subscribe("v3.tenant1.app1.>".into()).await.unwrap();
        let body = br#"{"downlinks":[{"f_port":1,"frm_payload":"AQ==","correlation_ids":["mine"]},{"f_port":2,"decoded_payload":{}}]}"#;
        assert_eq!(
            w.service.handle(&device(), DownlinkOp::Push, body).await,
            Ok(2)
        );
        let queued = w.queue.list(&device()).await.unwrap();
        let first: Value = serde_json::from_str(&queued[0]).unwrap();
        let ids = correlation_ids(&first);
        assert_eq!(ids[0], "mine");
        assert!(ids[1].starts_with("as:downlink:"));
        for port in [1, 2] {
            let msg = events.next().await.unwrap();
            assert_eq!(msg.subject, "v3.tenant1.app1.devices.dev1.down.queued");
            let doc: Value = serde_json::from_slice(&msg.payload).unwrap();
            assert_eq!(doc["downlink_queued"]["f_port"], port);
        }
    }

    #[tokio::test]
    async fn a_rejected_request_makes_one_event_listing_each_error() {
        let w = world(ServiceSettings::default()).await;
        let mut events = w.bus.subscribe("v3.>".into()).await.unwrap();
        // The first item is long enough for the event to echo everything (4× the body).
        let payload = "A".repeat(300);
        let body = format!(
            r#"{{"downlinks":[{{"f_port":1,"frm_payload":"{payload}"}},{{"f_port":0,"correlation_ids":["zero"]}},{{"f_port":2}}]}}"#
        );
        let err = w
            .service
            .handle(&device(), DownlinkOp::Push, body.as_bytes())
            .await
            .unwrap_err();
        assert_eq!(err.name(), "invalid_downlink");
        assert!(w.queue.list(&device()).await.unwrap().is_empty());
        let msg = events.next().await.unwrap();
        assert_eq!(msg.subject, "v3.tenant1.app1.devices.dev1.down.failed");
        let doc: Value = serde_json::from_slice(&msg.payload).unwrap();
        let failed = &doc["downlink_failed"];
        // The Things Stack's shape: the first rejected downlink and its error.
        assert_eq!(failed["downlink"]["f_port"], 0);
        assert_eq!(failed["error"]["name"], "invalid_downlink");
        assert_eq!(doc["correlation_ids"], json!(["zero"]));
        // Then every failing item by index, and the request's items.
        assert_eq!(failed["errors"][0]["index"], 1);
        assert_eq!(failed["errors"][0]["error"], failed["error"]);
        assert_eq!(failed["errors"][1]["index"], 2);
        assert_eq!(failed["errors"][1]["error"]["name"], "no_payload");
        assert_eq!(failed["errors"].as_array().unwrap().len(), 2);
        assert_eq!(failed["downlinks"].as_array().unwrap().len(), 3);
        assert!(failed.get("truncated").is_none());
        // Nothing else was published.
        w.bus
            .publish("v3.tenant1.app1.marker".into(), Bytes::new())
            .await
            .unwrap();
        assert_eq!(
            events.next().await.unwrap().subject,
            "v3.tenant1.app1.marker"
        );

        w.service
            .handle(&device(), DownlinkOp::Push, b"{")
            .await
            .unwrap_err();
        let doc: Value = serde_json::from_slice(&events.next().await.unwrap().payload).unwrap();
        assert_eq!(doc["downlink_failed"]["error"]["name"], "invalid_json");
        assert!(doc["downlink_failed"].get("downlink").is_none());
    }

    #[tokio::test]
    async fn unknown_devices_get_device_not_found_and_nothing_is_queued() {
        let w = world(ServiceSettings::default()).await;
        let stranger = DeviceRef::new(device().app, Id::parse("dev2").unwrap());
        let mut events = w.bus.subscribe("v3.>".into()).await.unwrap();
        let body = br#"{"downlinks":[{"f_port":1,"frm_payload":"AQ=="}]}"#;
        for op in [DownlinkOp::Push, DownlinkOp::Replace] {
            let err = w.service.handle(&stranger, op, body).await.unwrap_err();
            assert_eq!(err, DownlinkError::DeviceNotFound("dev2".into()));
            let msg = events.next().await.unwrap();
            assert_eq!(msg.subject, "v3.tenant1.app1.devices.dev2.down.failed");
            let doc: Value = serde_json::from_slice(&msg.payload).unwrap();
            assert_eq!(doc["downlink_failed"]["error"]["name"], "device_not_found");
            assert_eq!(doc["downlink_failed"]["error"]["code"], 5);
            assert_eq!(doc["downlink_failed"]["downlink"]["f_port"], 1);
        }
        assert!(w.queue.list(&stranger).await.unwrap().is_empty());
        // Registered: accepted. Unregistered again: refused again.
        w.devices.add(&stranger).await.unwrap();
        assert_eq!(
            w.service.handle(&stranger, DownlinkOp::Push, body).await,
            Ok(1)
        );
        w.devices.remove(&stranger).await.unwrap();
        assert!(w
            .service
            .handle(&stranger, DownlinkOp::Push, body)
            .await
            .is_err());
        // With the check off, anyone's device is fine.
        let w = world(ServiceSettings {
            require_known_device: false,
            ..ServiceSettings::default()
        })
        .await;
        assert_eq!(
            w.service.handle(&stranger, DownlinkOp::Push, body).await,
            Ok(1)
        );
    }

    #[tokio::test]
    async fn the_echo_stays_within_its_budget() {
        let d = device();
        let item =
            json!({"f_port": 1, "frm_payload": "", "decoded_payload": {"x": "y".repeat(3000)}});
        let rejection = Rejection {
            error: DownlinkError::Queue(QueueError::Full {
                queued: 10,
                adding: 5,
                capacity: 10,
            }),
            errors: Vec::new(),
            items: vec![item.clone(); 5],
        };
        // A body of 1000 bytes may echo 4000: the first item, but not all five again.
        let doc = failed_event(&d, 1000, &rejection);
        let failed = &doc["downlink_failed"];
        assert_eq!(failed["downlink"], item);
        assert_eq!(failed["truncated"], true);
        let echoed = failed["downlinks"].as_array().unwrap();
        assert!(echoed.iter().all(Value::is_null), "{echoed:?}");
        assert!(doc.to_string().len() <= 5 * 1000 + MAX_EVENT_ENVELOPE);
        // Enough received: everything is echoed.
        let doc = failed_event(&d, 20_000, &rejection);
        assert!(doc["downlink_failed"].get("truncated").is_none());
        assert_eq!(doc["downlink_failed"]["downlinks"][4], item);
        // Nothing received: only the envelope.
        let doc = failed_event(&d, 0, &rejection);
        assert!(doc["downlink_failed"].get("downlink").is_none());
        assert!(doc.to_string().len() <= MAX_EVENT_ENVELOPE);
    }

    #[test]
    fn the_largest_envelope_fits_its_bound() {
        let long = Id::parse(&"a".repeat(36)).unwrap();
        let d = DeviceRef::new(AppRef::new(long.clone(), long.clone()), long);
        // The worst message: every byte a backslash, escaped to two.
        let rejection = Rejection {
            error: DownlinkError::Invalid("\\".repeat(10_000)),
            errors: Vec::new(),
            items: Vec::new(),
        };
        let len = failed_event(&d, 0, &rejection).to_string().len();
        assert!(len <= MAX_EVENT_ENVELOPE, "{len}");
    }
}
