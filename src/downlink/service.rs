//! [`DownlinkService`]: what happens to a `down/push` or `down/replace` publish.
//!
//! Validate the whole body, add the server's correlation ID to each item, write the queue
//! in one all-or-nothing operation, then tell the application: one `down/queued` event per
//! item, or a `down/failed` event per rejected item naming the problem (DESIGN §5).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};

use super::error::DownlinkError;
use super::queue::DownlinkQueue;
use super::validate::parse_request;
use crate::bus::Bus;
use crate::message::{correlation_ids, document, end_device_ids};
use crate::topic::{DeviceRef, DownlinkOp, Event};

/// Validates downlink requests, queues them and publishes their events on the bus.
#[derive(Clone)]
pub struct DownlinkService {
    queue: Arc<dyn DownlinkQueue>,
    bus: Arc<dyn Bus>,
}

impl DownlinkService {
    /// A service writing to `queue` and publishing events on `bus`.
    pub fn new(queue: Arc<dyn DownlinkQueue>, bus: Arc<dyn Bus>) -> Self {
        Self { queue, bus }
    }

    /// Handles one publish to `device`'s `down/push` or `down/replace` topic. Returns the
    /// number of items queued; on error nothing was queued and `down/failed` was sent.
    pub async fn handle(
        &self,
        device: &DeviceRef,
        op: DownlinkOp,
        body: &[u8],
    ) -> Result<usize, DownlinkError> {
        let items = match parse_request(body) {
            Ok(items) => items,
            Err(e) => {
                // Report against the items we could read, so the application sees which.
                let rejected = readable_items(body);
                self.publish_failed(device, &rejected, &e).await;
                return Err(e);
            }
        };
        let items: Vec<Value> = items
            .into_iter()
            .map(|item| Value::Object(with_server_id(item)))
            .collect();
        let encoded: Vec<String> = items.iter().map(Value::to_string).collect();
        let result = match op {
            DownlinkOp::Push => self.queue.push(device, &encoded).await,
            DownlinkOp::Replace => self.queue.replace(device, &encoded).await,
        };
        if let Err(e) = result {
            let e = DownlinkError::from(e);
            self.publish_failed(device, &items, &e).await;
            return Err(e);
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
    /// without the down-write right), without its items: nothing of it was read.
    pub async fn report_refused(&self, device: &DeviceRef, error: &DownlinkError) {
        self.publish_failed(device, &[], error).await;
    }

    /// One `down/failed` per rejected item (one without a downlink when none is readable).
    async fn publish_failed(&self, device: &DeviceRef, items: &[Value], error: &DownlinkError) {
        let details = error.to_error_details();
        if items.is_empty() {
            let body = serde_json::json!({ "error": details });
            let doc = document(end_device_ids(device), Vec::new(), "downlink_failed", body);
            self.publish(device, Event::DownFailed, &doc).await;
            return;
        }
        for item in items {
            let ids = correlation_ids(item);
            let body = serde_json::json!({ "downlink": item, "error": details });
            let doc = document(end_device_ids(device), ids, "downlink_failed", body);
            self.publish(device, Event::DownFailed, &doc).await;
        }
    }

    async fn publish(&self, device: &DeviceRef, event: Event, doc: &Value) {
        let payload = Bytes::from(doc.to_string());
        if let Err(e) = self.bus.publish(device.subject(event), payload).await {
            tracing::warn!(device = %device.device, ?event, error = %e, "downlink event not published");
        }
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

/// The object items of a rejected body, when it has a `downlinks` array at all.
fn readable_items(body: &[u8]) -> Vec<Value> {
    let Ok(Value::Object(mut request)) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    match request.remove("downlinks") {
        Some(Value::Array(mut items)) => {
            items.retain(Value::is_object);
            items
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::EmbeddedBus;
    use crate::downlink::MemoryDownlinkQueue;
    use crate::topic::{AppRef, Id};
    use futures::StreamExt;

    fn device() -> DeviceRef {
        DeviceRef::new(
            AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap()),
            Id::parse("dev1").unwrap(),
        )
    }

    #[tokio::test]
    async fn queued_items_carry_the_server_id_and_events_follow() {
        let bus = Arc::new(EmbeddedBus::new());
        let queue = Arc::new(MemoryDownlinkQueue::new(10));
        let service = DownlinkService::new(queue.clone(), bus.clone());
        let mut events = bus.subscribe("v3.tenant1.app1.>".into()).await.unwrap();
        let body = br#"{"downlinks":[{"f_port":1,"correlation_ids":["mine"]},{"f_port":2}]}"#;
        assert_eq!(
            service.handle(&device(), DownlinkOp::Push, body).await,
            Ok(2)
        );
        let queued = queue.list(&device()).await.unwrap();
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
    async fn rejected_bodies_enqueue_nothing_and_fail_per_item() {
        let bus = Arc::new(EmbeddedBus::new());
        let queue = Arc::new(MemoryDownlinkQueue::new(10));
        let service = DownlinkService::new(queue.clone(), bus.clone());
        let mut events = bus.subscribe("v3.>".into()).await.unwrap();
        let body = br#"{"downlinks":[{"f_port":1},{"f_port":0}]}"#;
        let err = service
            .handle(&device(), DownlinkOp::Push, body)
            .await
            .unwrap_err();
        assert_eq!(err.name(), "invalid_downlink");
        assert!(queue.list(&device()).await.unwrap().is_empty());
        for port in [1, 0] {
            let doc: Value = serde_json::from_slice(&events.next().await.unwrap().payload).unwrap();
            assert_eq!(doc["downlink_failed"]["downlink"]["f_port"], port);
            assert_eq!(doc["downlink_failed"]["error"]["name"], "invalid_downlink");
        }
        service
            .handle(&device(), DownlinkOp::Push, b"{")
            .await
            .unwrap_err();
        let doc: Value = serde_json::from_slice(&events.next().await.unwrap().payload).unwrap();
        assert_eq!(doc["downlink_failed"]["error"]["name"], "invalid_json");
        assert!(doc["downlink_failed"].get("downlink").is_none());
    }
}
