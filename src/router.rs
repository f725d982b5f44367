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
//!
//! Shared subscriptions (`$share/{group}/{filter}`, issue 14) live the same way: a node
//! holds one bus subscription per share with members on it, in the share's NATS queue
//! group, so that each message goes to one node's members, and there to one member
//! ([`ShareMembers`]).

mod index;
mod refusals;
mod share;

pub use index::{Index, Removed, TooManyFilters};
pub use refusals::{Refusal, Refusals};
pub use share::ShareMembers;

use std::collections::HashMap;
use std::hash::Hash;
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
use crate::topic::{
    parse_subject_rest, AppRef, Filter, ShareKey, SharedFilter, SubjectEvent, Tenancy,
};

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

/// The local members of one bus subscription of a node: every subscriber of an
/// application (an [`Index`]), or the members of one share ([`ShareMembers`]).
pub trait Members: Send + Sync + 'static {
    /// Whether no member is left.
    fn is_empty(&self) -> bool;
    /// Offers a message of `event` (its subject `rest` after the application's prefix) to
    /// the members it goes to: `offer(outbox, last)` pushes it to one outbox and says
    /// whether it took it; `last` says a refusal is a drop (no other member will try).
    /// Generic, not `dyn`: the fan-out calls `offer` once per subscriber, inlined.
    fn offer(
        &self,
        event: &SubjectEvent<'_>,
        rest: &str,
        offer: impl FnMut(&Arc<Outbox>, bool) -> bool,
    );
}

impl Members for Index {
    fn is_empty(&self) -> bool {
        Index::is_empty(self)
    }

    fn offer(
        &self,
        event: &SubjectEvent<'_>,
        _rest: &str,
        mut offer: impl FnMut(&Arc<Outbox>, bool) -> bool,
    ) {
        self.for_each_match(event.device, event.event, |outbox| {
            offer(outbox, true);
        });
    }
}

/// One bus subscription's local members and its delivery task.
struct Subscribed<M> {
    members: RwLock<M>,
    /// Set, under the members' lock, when the last member left: this state is out of the
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

/// The bus subscriptions of one kind on a node, by key: applications or shares.
type Subscriptions<K, M> = Mutex<HashMap<K, Arc<Subscribed<M>>>>;

/// Per-node fan-out from bus subjects to local subscribers.
pub struct Router {
    bus: Arc<dyn Bus>,
    tenancy: Tenancy,
    metrics: Arc<Metrics>,
    stats: Arc<TrafficStats>,
    apps: Subscriptions<AppRef, Index>,
    shares: Subscriptions<ShareKey, ShareMembers>,
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
            shares: Mutex::default(),
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
        let (new, joined) = self
            .join(&self.apps, app, app, Index::new, None, |index| {
                index.add(id, outbox, filter, max_filters)
            })
            .await;
        if new && joined.is_err() {
            self.unsubscribe(app, id, &filter.requested);
        }
        joined
    }

    /// Makes connection `id` of the share's application a member of `share` on this node,
    /// delivering to `outbox`: each message of the share goes to one member, on this node
    /// or another (a NATS queue group of the nodes that hold members). Joining twice is
    /// joining once.
    pub async fn join_share(
        &self,
        share: &SharedFilter,
        id: u64,
        outbox: &Arc<Outbox>,
    ) -> Result<(), SubscribeError> {
        let key = &share.key;
        let (new, joined) = self
            .join(
                &self.shares,
                key,
                &key.app,
                || ShareMembers::new(share.filter.clone()),
                Some(key.queue_group()),
                |members| Ok(members.add(id, outbox)),
            )
            .await;
        if new && joined.is_err() {
            self.leave_share(key, id);
        }
        joined
    }

    /// Ends the membership of connection `id` in `share` on this node; the last member
    /// out drops the node's place in the share's queue group.
    pub fn leave_share(&self, share: &ShareKey, id: u64) {
        let left = self.update(&self.shares, share, |members| members.remove(id));
        if left {
            self.metrics.subscriptions.dec();
        }
    }

    /// Adds a member with `add` (called once; it says whether the member is new) to the
    /// state of `key`, made with `make` if there is none, and makes sure its delivery task
    /// runs; whether a member was added, and whether all of it worked.
    async fn join<K, M>(
        &self,
        map: &Subscriptions<K, M>,
        key: &K,
        app: &AppRef,
        make: impl Fn() -> M,
        group: Option<String>,
        mut add: impl FnMut(&mut M) -> Result<bool, TooManyFilters>,
    ) -> (bool, Result<(), SubscribeError>)
    where
        K: Clone + Eq + Hash,
        M: Members,
    {
        let (state, new) = loop {
            let state = self.state(map, key, app, &make);
            let mut members = state.members.write();
            if state.closed.load(Ordering::Acquire) {
                // Its last member left since we looked it up: it is (being) removed from
                // the map; make way for a fresh one.
                drop(members);
                retire(map, key, &state);
                continue;
            }
            match add(&mut members) {
                Ok(new) => break (state.clone(), new),
                Err(e) => return (false, Err(e.into())),
            }
        };
        if new {
            self.metrics.subscriptions.inc();
        }
        let delivering = self.deliver(app, &state, group).await;
        (new, delivering.map_err(SubscribeError::from))
    }

    /// The state of `key`, created with `make` if there is none.
    fn state<K: Clone + Eq + Hash, M>(
        &self,
        map: &Subscriptions<K, M>,
        key: &K,
        app: &AppRef,
        make: impl Fn() -> M,
    ) -> Arc<Subscribed<M>> {
        let mut map = map.lock();
        if let Some(state) = map.get(key) {
            return state.clone();
        }
        let state = Arc::new(Subscribed {
            members: RwLock::new(make()),
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
        map.insert(key.clone(), state.clone());
        state
    }

    /// Makes sure `state`'s delivery task runs, subscribed on the bus (in the queue group
    /// `group` if there is one).
    async fn deliver<M: Members>(
        &self,
        app: &AppRef,
        state: &Arc<Subscribed<M>>,
        group: Option<String>,
    ) -> Result<(), BusError> {
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
        let filter = app.traffic_subject_filter();
        let sub = match group {
            Some(group) => {
                self.bus
                    .queue_subscribe_counted(filter, group, dropped)
                    .await?
            }
            None => self.bus.subscribe_counted(filter, dropped).await?,
        };
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
        let removed = self.update(&self.apps, app, |index| index.remove(id, requested));
        if removed.removed {
            self.metrics.subscriptions.dec();
        }
        removed.left
    }

    /// Removes every filter of connection `id`.
    pub fn leave(&self, app: &AppRef, id: u64) {
        let removed = self.update(&self.apps, app, |index| index.remove_all(id));
        self.metrics.subscriptions.dec_by(removed as i64);
    }

    /// How many filters connection `id` holds in `app`'s subscription (shares apart).
    pub fn filters(&self, app: &AppRef, id: u64) -> usize {
        let state = self.apps.lock().get(app).cloned();
        state.map_or(0, |s| s.members.read().filters(id))
    }

    fn update<K, M, T>(
        &self,
        map: &Subscriptions<K, M>,
        key: &K,
        change: impl FnOnce(&mut M) -> T,
    ) -> T
    where
        K: Eq + Hash,
        M: Members,
        T: Default,
    {
        let Some(state) = map.lock().get(key).cloned() else {
            return T::default();
        };
        let result = {
            let mut members = state.members.write();
            let result = change(&mut members);
            if !members.is_empty() || state.closed.load(Ordering::Acquire) {
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
        retire(map, key, &state);
        result
    }

    /// Delivers one bus message of `app` to the matching local subscribers right away,
    /// exactly as `app`'s delivery task does with what the bus hands it, and returns how
    /// many outboxes took it. Meant for benches and tests; nothing needs to call it.
    pub fn dispatch(&self, app: &AppRef, msg: &BusMessage) -> u64 {
        let state = self.apps.lock().get(app).cloned();
        state.map_or(0, |s| s.dispatch(msg, &self.metrics))
    }

    /// Like [`Router::dispatch`], for one message that the bus handed to this node's
    /// members of `share`.
    pub fn dispatch_share(&self, share: &ShareKey, msg: &BusMessage) -> u64 {
        let state = self.shares.lock().get(share).cloned();
        state.map_or(0, |s| s.dispatch(msg, &self.metrics))
    }

    /// Number of applications with a live bus subscription on this node.
    pub fn subscribed_apps(&self) -> usize {
        self.apps.lock().len()
    }

    /// Number of shares with members on this node.
    pub fn subscribed_shares(&self) -> usize {
        self.shares.lock().len()
    }
}

/// Removes the closed `state` from `map`, if it is still there.
fn retire<K: Eq + Hash, M>(map: &Subscriptions<K, M>, key: &K, state: &Arc<Subscribed<M>>) {
    let mut map = map.lock();
    if map.get(key).is_some_and(|s| Arc::ptr_eq(s, state)) {
        map.remove(key);
    }
}

/// The delivery loop of one bus subscription.
struct Delivery<M> {
    state: Arc<Subscribed<M>>,
    metrics: Arc<Metrics>,
}

impl<M: Members> Delivery<M> {
    async fn run(self, mut sub: Subscription) {
        while let Some(msg) = sub.next().await {
            self.state.dispatch(&msg, &self.metrics);
        }
    }
}

impl<M: Members> Subscribed<M> {
    /// Hands `msg` to the members it goes to; returns how many took it.
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
        self.members.read().offer(&event, rest, |outbox, last| {
            let packet = match &encoded {
                Some(p) => p.clone(),
                None if too_large => return false,
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
                        return false;
                    }
                },
            };
            match outbox.push(packet) {
                Ok(()) => {
                    delivered += 1;
                    true
                }
                Err(_) => {
                    if last {
                        dropped += 1;
                    }
                    false
                }
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
