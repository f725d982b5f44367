//! The [`Router`]: per-node fan-out from the bus to local MQTT subscriptions (DESIGN §1).
//!
//! A node holds one bus subscription per (tenant, application) with at least one
//! subscribed client on the node: taken when the first client of that application
//! subscribes, dropped when the last one leaves. Each bus message is parsed once, its
//! subscribers are found through the application's [`Index`] (one device bucket plus the
//! any-device subscribers, never a scan of every filter), it is encoded as a PUBLISH once
//! (only if someone matches), and the same bytes are handed to every matching client's
//! outbox.

mod index;

pub use index::{Index, Slot};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use tokio::task::AbortHandle;

use crate::bus::{Bus, BusError, BusMessage, Subscription};
use crate::log::Bounded;
use crate::metrics::{AppLabels, Metrics, ReasonLabels};
use crate::mqtt::codec::encode_publish;
use crate::mqtt::outbox::Outbox;
use crate::topic::{parse_subject_rest, AppRef, Filter, Tenancy};

/// One application's local subscribers and its bus subscription task.
struct AppState {
    index: RwLock<Index>,
    /// The delivery task, once subscribed; serialises the first subscribe.
    task: tokio::sync::Mutex<Option<AbortHandle>>,
    /// Set when the last member left; a late subscriber must not leave a task behind.
    closed: AtomicBool,
    /// `v3.{tenant}.{app}.`
    prefix: String,
    /// `v3/{app uid}/`
    topic_prefix: String,
    labels: AppLabels,
}

/// Per-node fan-out from bus subjects to local subscribers.
pub struct Router {
    bus: Arc<dyn Bus>,
    tenancy: Tenancy,
    metrics: Arc<Metrics>,
    apps: Mutex<HashMap<AppRef, Arc<AppState>>>,
}

impl Router {
    /// A router over `bus`.
    pub fn new(bus: Arc<dyn Bus>, tenancy: Tenancy, metrics: Arc<Metrics>) -> Self {
        Self {
            bus,
            tenancy,
            metrics,
            apps: Mutex::default(),
        }
    }

    /// Grants `filter` to connection `id` of `app`, delivering to `outbox` (a filter with
    /// the same requested text is replaced), and makes sure the node's bus subscription
    /// for `app` exists (and has reached the bus) before returning. On an error the filter
    /// stays granted; the caller refuses it and calls [`Router::unsubscribe`].
    pub async fn subscribe(
        &self,
        app: &AppRef,
        id: u64,
        outbox: &Arc<Outbox>,
        filter: &Filter,
    ) -> Result<(), BusError> {
        let state = {
            let mut apps = self.apps.lock();
            let state = apps
                .entry(app.clone())
                .or_insert_with(|| {
                    Arc::new(AppState {
                        index: RwLock::new(Index::new()),
                        task: tokio::sync::Mutex::new(None),
                        closed: AtomicBool::new(false),
                        prefix: app.subject_prefix(),
                        topic_prefix: format!("v3/{}/", self.tenancy.app_uid(app)),
                        labels: AppLabels {
                            tenant: app.tenant.to_string(),
                            application: app.app.to_string(),
                        },
                    })
                })
                .clone();
            state.index.write().add(id, outbox, filter);
            state
        };
        let mut task = state.task.lock().await;
        if task.is_none() && !state.closed.load(Ordering::Acquire) {
            let sub = self.bus.subscribe(app.traffic_subject_filter()).await?;
            // While the bus is down the subscription is sent when it is back (DESIGN §7);
            // the client's filter is valid, so it is granted all the same.
            if let Err(e) = self.bus.flush().await {
                if self.bus.is_ready() {
                    return Err(e);
                }
            }
            let deliver = Delivery {
                state: state.clone(),
                metrics: self.metrics.clone(),
            };
            *task = Some(tokio::spawn(deliver.run(sub)).abort_handle());
            if state.closed.load(Ordering::Acquire) {
                // Everyone left while we subscribed.
                if let Some(t) = task.take() {
                    t.abort();
                }
            }
        }
        Ok(())
    }

    /// Removes the filter `requested` of connection `id`; returns how many filters it
    /// still has. The last subscriber out drops the application's bus subscription.
    pub fn unsubscribe(&self, app: &AppRef, id: u64, requested: &str) -> usize {
        self.update(app, |index| index.remove(id, requested))
    }

    /// Removes every filter of connection `id`.
    pub fn leave(&self, app: &AppRef, id: u64) {
        self.update(app, |index| index.remove_all(id));
    }

    fn update<T: Default>(&self, app: &AppRef, change: impl FnOnce(&mut Index) -> T) -> T {
        let mut apps = self.apps.lock();
        let Some(state) = apps.get(app) else {
            return T::default();
        };
        let (result, empty) = {
            let mut index = state.index.write();
            let result = change(&mut index);
            (result, index.is_empty())
        };
        if empty {
            state.closed.store(true, Ordering::Release);
            if let Ok(mut task) = state.task.try_lock() {
                if let Some(t) = task.take() {
                    t.abort();
                }
            }
            apps.remove(app);
        }
        result
    }

    /// Delivers one bus message of `app` to the matching local subscribers right away,
    /// exactly as `app`'s delivery task does with what the bus hands it, and returns how
    /// many outboxes took it. Meant for benches and tests; nothing needs to call it.
    pub fn dispatch(&self, app: &AppRef, msg: &BusMessage) -> u64 {
        let state = self.apps.lock().get(app).cloned();
        state.map_or(0, |s| s.dispatch(msg, &self.metrics))
    }

    /// Number of applications with a live bus subscription on this node.
    pub fn subscribed_apps(&self) -> usize {
        self.apps.lock().len()
    }
}

/// The delivery loop of one application.
struct Delivery {
    state: Arc<AppState>,
    metrics: Arc<Metrics>,
}

impl Delivery {
    async fn run(self, mut sub: Subscription) {
        while let Some(msg) = sub.next().await {
            self.state.dispatch(&msg, &self.metrics);
        }
    }
}

impl AppState {
    /// Hands `msg` to every matching member; returns how many took it.
    fn dispatch(&self, msg: &BusMessage, metrics: &Metrics) -> u64 {
        metrics.bus_messages.inc();
        let Some(rest) = msg.subject.strip_prefix(self.prefix.as_str()) else {
            return 0;
        };
        let Some(event) = parse_subject_rest(rest) else {
            tracing::debug!(subject = %Bounded::id(&msg.subject), "ignoring a message on a subject that is no device event");
            return 0;
        };
        let mut encoded: Option<Bytes> = None;
        let (mut delivered, mut dropped) = (0u64, 0u64);
        let mut too_large = false;
        self.index
            .read()
            .for_each_match(event.device, event.event, |slot| {
                let packet = match &encoded {
                    Some(p) => p.clone(),
                    None if too_large => return,
                    None => match encode_publish(&self.topic_prefix, rest, b'.', &msg.payload) {
                        Some(p) => encoded.insert(p).clone(),
                        None => {
                            tracing::warn!(subject = %Bounded::id(&msg.subject), len = msg.payload.len(), "message too large to frame as MQTT");
                            metrics
                                .bus_dropped
                                .get_or_create(&ReasonLabels {
                                    reason: "too_large_for_mqtt",
                                })
                                .inc();
                            too_large = true;
                            return;
                        }
                    },
                };
                match slot.outbox.push(packet) {
                    Ok(()) => delivered += 1,
                    Err(_) => dropped += 1,
                }
            });
        if delivered > 0 {
            metrics.delivered.inc_by(delivered);
        }
        if dropped > 0 {
            metrics.dropped.get_or_create(&self.labels).inc_by(dropped);
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::EmbeddedBus;
    use crate::topic::Id;

    fn app(a: &str) -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse(a).unwrap())
    }

    fn uplink(device: &str) -> BusMessage {
        BusMessage {
            subject: format!("v3.tenant1.app1.devices.{device}.up"),
            payload: Bytes::from(vec![b'x'; 200]),
        }
    }

    /// A slow subscriber loses what exceeds its byte budget, alone; the drop is counted
    /// for its application in /metrics.
    #[tokio::test]
    async fn a_full_outbox_drops_for_its_client_only_and_is_counted() {
        let metrics = Arc::new(Metrics::default());
        let router = Router::new(
            Arc::new(EmbeddedBus::new()),
            Tenancy::Multi,
            metrics.clone(),
        );
        let a = app("app1");
        let slow = Arc::new(Outbox::new(1024));
        let fast = Arc::new(Outbox::new(1 << 20));
        let all = Filter::rewrite(&Tenancy::Multi, &a, "#").unwrap();
        router.subscribe(&a, 1, &slow, &all).await.unwrap();
        router.subscribe(&a, 2, &fast, &all).await.unwrap();
        let mut delivered = 0;
        for _ in 0..10 {
            delivered += router.dispatch(&a, &uplink("dev1"));
        }
        let (mut got_slow, mut got_fast) = (Vec::new(), Vec::new());
        slow.take(&mut got_slow);
        fast.take(&mut got_fast);
        assert_eq!(got_fast.len(), 10);
        // 1024 bytes hold four 236-byte packets.
        assert_eq!(got_slow.len(), 4);
        assert_eq!(delivered, 14);
        assert!(metrics.render().contains(
            r#"lorabroker_dropped_messages_total{tenant="tenant1",application="app1"} 6"#
        ));
        // Other applications and unmatched devices are not touched.
        assert_eq!(router.dispatch(&app("app2"), &uplink("dev1")), 0);
        router.leave(&a, 1);
        router.leave(&a, 2);
        assert_eq!(router.subscribed_apps(), 0);
    }
}
