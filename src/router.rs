//! The [`Router`]: per-node fan-out from the bus to local MQTT subscriptions (DESIGN §1).
//!
//! A node holds one bus subscription per (tenant, application) with at least one
//! subscribed client on the node: taken when the first client of that application
//! subscribes, dropped when the last one leaves. What an application loses is counted for
//! it where it is lost: on the bus when its subscription falls behind
//! (`lorabroker_bus_slow_consumer_dropped_total`), in a client's outbox when that client
//! reads too slowly (`lorabroker_dropped_messages_total`); one application's flood never
//! costs another application's messages. Each bus message is parsed once, its
//! subscribers are found through the application's [`Index`] (one device bucket plus the
//! any-device subscribers, never a scan of every filter), it is encoded as a PUBLISH once
//! (only if someone matches), and the same bytes are handed to every matching client's
//! outbox.
//!
//! Subscriptions cost what one filter costs (issue 9): the node-wide map of applications is
//! locked only to find or insert an application's state, never across index work; each
//! application's index has its own lock, held for the one filter added or removed. So one
//! connection's SUBSCRIBE, however many filters it carries, never waits on or delays
//! another application's subscriptions or deliveries.

mod index;
mod refusals;

pub use index::{Index, Removed, TooManyFilters};
pub use refusals::{Refusal, Refusals};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use tokio::task::AbortHandle;

use crate::bus::{Bus, BusError, BusMessage, Subscription};
use crate::events::{AppCounters, TrafficStats};
use crate::log::Bounded;
use crate::metrics::{AppLabels, Metrics, ReasonLabels};
use crate::mqtt::codec::encode_publish;
use crate::mqtt::outbox::Outbox;
use crate::topic::{parse_subject_rest, AppRef, Filter, Tenancy};

/// Why [`Router::subscribe`] refused a filter.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The connection is at `mqtt.max_subscriptions`.
    #[error(transparent)]
    TooManyFilters(#[from] TooManyFilters),
    /// The application's bus subscription could not be taken.
    #[error("bus unavailable: {0}")]
    Bus(#[from] BusError),
}

impl SubscribeError {
    /// The `reason` label of `lorabroker_subscriptions_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            SubscribeError::TooManyFilters(_) => "max_subscriptions",
            SubscribeError::Bus(_) => "bus_unavailable",
        }
    }
}

/// One application's local subscribers and its bus subscription task.
struct AppState {
    index: RwLock<Index>,
    /// Set, under the index lock, when the last member left: this state is out of the
    /// node's map (or about to be) and takes no new member.
    closed: AtomicBool,
    /// Set once the delivery task runs: later subscribers need not wait on `task`.
    delivering: AtomicBool,
    /// The delivery task, once subscribed; serialises the first subscribe.
    task: tokio::sync::Mutex<Option<AbortHandle>>,
    /// `v3.{tenant}.{app}.`
    prefix: String,
    /// `v3/{app uid}/`
    topic_prefix: String,
    labels: AppLabels,
    /// The application's message counters for `/stats` (none over their bound).
    counters: Option<Arc<AppCounters>>,
}

/// Per-node fan-out from bus subjects to local subscribers.
pub struct Router {
    bus: Arc<dyn Bus>,
    tenancy: Tenancy,
    metrics: Arc<Metrics>,
    stats: Arc<TrafficStats>,
    apps: Mutex<HashMap<AppRef, Arc<AppState>>>,
}

impl Router {
    /// A router over `bus`.
    pub fn new(bus: Arc<dyn Bus>, tenancy: Tenancy, metrics: Arc<Metrics>) -> Self {
        Self {
            bus,
            tenancy,
            metrics,
            stats: Arc::new(TrafficStats::new(0)),
            apps: Mutex::default(),
        }
    }

    /// The router counting messages per application in `stats` (nowhere by default).
    pub fn with_stats(self, stats: Arc<TrafficStats>) -> Self {
        Self { stats, ..self }
    }

    /// Grants `filter` to connection `id` of `app`, delivering to `outbox` (the same for
    /// every filter of `id`), unless `id` already has `max_filters` other filters; a filter
    /// with the same requested text replaces the old one and is not counted twice. Makes
    /// sure the node's bus subscription for `app` exists (and has reached the bus) before
    /// returning; when it cannot be taken the filter is not granted.
    pub async fn subscribe(
        &self,
        app: &AppRef,
        id: u64,
        outbox: &Arc<Outbox>,
        filter: &Filter,
        max_filters: usize,
    ) -> Result<(), SubscribeError> {
        let (state, new) = loop {
            let state = self.state(app);
            let mut index = state.index.write();
            if state.closed.load(Ordering::Acquire) {
                // Its last member left since we looked it up: it is (being) removed from
                // the map; make way for a fresh one.
                drop(index);
                self.retire(app, &state);
                continue;
            }
            let new = index.add(id, outbox, filter, max_filters)?;
            break (state.clone(), new);
        };
        if new {
            self.metrics.subscriptions.inc();
        }
        if let Err(e) = self.deliver(app, &state).await {
            if new {
                self.unsubscribe(app, id, &filter.requested);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// The state of `app`, created if there is none.
    fn state(&self, app: &AppRef) -> Arc<AppState> {
        let mut apps = self.apps.lock();
        if let Some(state) = apps.get(app) {
            return state.clone();
        }
        let state = Arc::new(AppState {
            index: RwLock::new(Index::new()),
            closed: AtomicBool::new(false),
            delivering: AtomicBool::new(false),
            task: tokio::sync::Mutex::new(None),
            prefix: app.subject_prefix(),
            topic_prefix: format!("v3/{}/", self.tenancy.app_uid(app)),
            labels: AppLabels {
                tenant: app.tenant.to_string(),
                application: app.app.to_string(),
            },
            counters: self.stats.of(app),
        });
        apps.insert(app.clone(), state.clone());
        state
    }

    /// Removes the closed `state` from the map, if it is still there.
    fn retire(&self, app: &AppRef, state: &Arc<AppState>) {
        let mut apps = self.apps.lock();
        if apps.get(app).is_some_and(|s| Arc::ptr_eq(s, state)) {
            apps.remove(app);
        }
    }

    /// Makes sure `state`'s delivery task runs, subscribed on the bus.
    async fn deliver(&self, app: &AppRef, state: &Arc<AppState>) -> Result<(), BusError> {
        if state.delivering.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut task = state.task.lock().await;
        if task.is_some() || state.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let dropped = self
            .metrics
            .bus_slow_consumer_dropped
            .get_or_create(&state.labels)
            .clone();
        let sub = self
            .bus
            .subscribe_counted(app.traffic_subject_filter(), dropped)
            .await?;
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
        state.delivering.store(true, Ordering::Release);
        if state.closed.load(Ordering::Acquire) {
            // Everyone left while we subscribed.
            if let Some(t) = task.take() {
                t.abort();
            }
        }
        Ok(())
    }

    /// Removes the filter `requested` of connection `id`; returns how many filters it
    /// still has. The last subscriber out drops the application's bus subscription.
    pub fn unsubscribe(&self, app: &AppRef, id: u64, requested: &str) -> usize {
        let removed = self.update(app, |index| index.remove(id, requested));
        if removed.removed {
            self.metrics.subscriptions.dec();
        }
        removed.left
    }

    /// Removes every filter of connection `id`.
    pub fn leave(&self, app: &AppRef, id: u64) {
        let removed = self.update(app, |index| index.remove_all(id));
        self.metrics.subscriptions.dec_by(removed as i64);
    }

    fn update<T: Default>(&self, app: &AppRef, change: impl FnOnce(&mut Index) -> T) -> T {
        let Some(state) = self.apps.lock().get(app).cloned() else {
            return T::default();
        };
        let result = {
            let mut index = state.index.write();
            let result = change(&mut index);
            if !index.is_empty() || state.closed.load(Ordering::Acquire) {
                return result;
            }
            state.closed.store(true, Ordering::Release);
            result
        };
        // A subscriber that holds the task lock sees `closed` once it has subscribed.
        if let Ok(mut task) = state.task.try_lock() {
            if let Some(t) = task.take() {
                t.abort();
            }
        }
        self.retire(app, &state);
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
            .for_each_match(event.device, event.event, |outbox| {
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
                match outbox.push(packet) {
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
        if let Some(c) = &self.counters {
            c.sent(delivered, dropped);
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::EmbeddedBus;
    use crate::topic::Id;

    const NO_LIMIT: usize = usize::MAX;

    fn app(a: &str) -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse(a).unwrap())
    }

    fn uplink(device: &str) -> BusMessage {
        BusMessage {
            subject: format!("v3.tenant1.app1.devices.{device}.up"),
            payload: Bytes::from(vec![b'x'; 200]),
        }
    }

    fn router() -> (Router, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let bus = Arc::new(EmbeddedBus::new());
        (Router::new(bus, Tenancy::Multi, metrics.clone()), metrics)
    }

    fn filter(app: &AppRef, f: &str) -> Filter {
        Filter::rewrite(&Tenancy::Multi, app, f).unwrap()
    }

    /// A slow subscriber loses what exceeds its byte budget, alone; the drop is counted
    /// for its application in /metrics.
    #[tokio::test]
    async fn a_full_outbox_drops_for_its_client_only_and_is_counted() {
        let (router, metrics) = router();
        let a = app("app1");
        let slow = Arc::new(Outbox::new(1024));
        let fast = Arc::new(Outbox::new(1 << 20));
        let all = filter(&a, "#");
        router
            .subscribe(&a, 1, &slow, &all, NO_LIMIT)
            .await
            .unwrap();
        router
            .subscribe(&a, 2, &fast, &all, NO_LIMIT)
            .await
            .unwrap();
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

    /// The filter limit is the connection's, re-subscribing is free, and the node's gauge
    /// counts granted filters only.
    #[tokio::test]
    async fn limits_and_the_subscriptions_gauge() {
        let (router, metrics) = router();
        let a = app("app1");
        let outbox = Arc::new(Outbox::new(1 << 20));
        let gauge = || {
            let text = metrics.render();
            let line = text
                .lines()
                .find(|l| l.starts_with("lorabroker_subscriptions "));
            line.and_then(|l| l.split(' ').nth(1)?.parse::<i64>().ok())
        };
        for d in ["dev1", "dev2"] {
            let f = filter(&a, &format!("v3/+/devices/{d}/up"));
            router.subscribe(&a, 1, &outbox, &f, 2).await.unwrap();
        }
        let third = filter(&a, "v3/+/devices/dev3/up");
        let refused = router.subscribe(&a, 1, &outbox, &third, 2).await;
        assert!(matches!(refused, Err(SubscribeError::TooManyFilters(_))));
        assert_eq!(refused.unwrap_err().reason(), "max_subscriptions");
        let again = filter(&a, "v3/+/devices/dev1/up");
        router.subscribe(&a, 1, &outbox, &again, 2).await.unwrap();
        // Another connection has a limit of its own.
        router.subscribe(&a, 2, &outbox, &third, 2).await.unwrap();
        assert_eq!(gauge(), Some(3));
        assert_eq!(router.unsubscribe(&a, 1, "v3/+/devices/dev1/up"), 1);
        assert_eq!(router.unsubscribe(&a, 1, "v3/+/devices/dev1/up"), 1);
        assert_eq!(gauge(), Some(2));
        router.leave(&a, 1);
        router.leave(&a, 2);
        assert_eq!(gauge(), Some(0));
        assert_eq!(router.subscribed_apps(), 0);
    }

    /// The last member out drops the application's state and bus subscription; the next
    /// subscriber gets a fresh one that the bus delivers to.
    #[tokio::test]
    async fn an_application_left_and_joined_again_is_delivered_to() {
        let bus = Arc::new(EmbeddedBus::new());
        let router = Router::new(bus.clone(), Tenancy::Multi, Arc::new(Metrics::default()));
        let a = app("app1");
        let outbox = Arc::new(Outbox::new(1 << 20));
        router
            .subscribe(&a, 1, &outbox, &filter(&a, "#"), NO_LIMIT)
            .await
            .unwrap();
        assert_eq!(router.unsubscribe(&a, 1, "#"), 0);
        assert_eq!(router.subscribed_apps(), 0);
        router
            .subscribe(&a, 1, &outbox, &filter(&a, "#"), NO_LIMIT)
            .await
            .unwrap();
        assert_eq!(router.subscribed_apps(), 1);
        let msg = uplink("dev1");
        bus.publish(msg.subject, msg.payload).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while got.is_empty() {
                outbox.ready().await;
                outbox.take(&mut got);
            }
        })
        .await
        .expect("the uplink reaches the subscriber through the new bus subscription");
        router.leave(&a, 1);
    }

    /// Members join and leave one application from many threads at once, so that the last
    /// one out often races the next one in: a member whose subscribe returned is always in
    /// the application's live state (a dispatch reaches it), and when all are gone the
    /// application is gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_joins_and_leaves_never_lose_a_member() {
        let (router, metrics) = router();
        let router = Arc::new(router);
        let a = app("app1");
        let mut tasks = Vec::new();
        for id in 0..8u64 {
            let (router, a) = (router.clone(), a.clone());
            tasks.push(tokio::spawn(async move {
                let outbox = Arc::new(Outbox::new(1 << 20));
                let f = filter(&a, &format!("v3/+/devices/dev{id}/up"));
                let mut got = Vec::new();
                for _ in 0..300 {
                    router
                        .subscribe(&a, id, &outbox, &f, NO_LIMIT)
                        .await
                        .unwrap();
                    router.dispatch(&a, &uplink(&format!("dev{id}")));
                    outbox.take(&mut got);
                    assert_eq!(got.len(), 1, "member {id} was not delivered to");
                    got.clear();
                    if id % 2 == 0 {
                        router.leave(&a, id);
                    } else {
                        assert_eq!(router.unsubscribe(&a, id, &f.requested), 0);
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(router.subscribed_apps(), 0);
        assert!(metrics.render().contains("lorabroker_subscriptions 0"));
    }
}
