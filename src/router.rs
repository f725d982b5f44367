//! The [`Router`]: per-node fan-out from the bus to local MQTT subscriptions (DESIGN §1).
//!
//! A node holds one bus subscription per (tenant, application) with at least one
//! subscribed client on the node: taken when the first client of that application
//! subscribes, dropped when the last one leaves. Each bus message is parsed once, encoded
//! as a PUBLISH once (only if someone matches), and the same bytes are handed to every
//! matching client's outbox.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use tokio::task::AbortHandle;

use crate::bus::{Bus, BusError, BusMessage, Subscription};
use crate::metrics::{AppLabels, Metrics};
use crate::mqtt::codec::encode_publish;
use crate::mqtt::outbox::Outbox;
use crate::topic::{parse_subject_rest, AppRef, Filter, Tenancy};

/// A subscribed client as the router sees it: where to deliver and what it wants.
pub struct Member {
    /// The connection ID (unique on this node).
    pub id: u64,
    /// Where matching messages go.
    pub outbox: Arc<Outbox>,
    filters: RwLock<Vec<Filter>>,
}

impl Member {
    /// A member with no filters yet.
    pub fn new(id: u64, outbox: Arc<Outbox>) -> Self {
        Self {
            id,
            outbox,
            filters: RwLock::new(Vec::new()),
        }
    }

    /// Adds a filter, replacing one with the same requested text (MQTT 3.1.1 §3.8.4).
    pub fn add_filter(&self, filter: Filter) {
        let mut filters = self.filters.write();
        filters.retain(|f| f.requested != filter.requested);
        filters.push(filter);
    }

    /// Removes a filter by its requested text; returns how many remain.
    pub fn remove_filter(&self, requested: &str) -> usize {
        let mut filters = self.filters.write();
        filters.retain(|f| f.requested != requested);
        filters.len()
    }

    /// Whether any filter matches `rest` (levels after `v3/{app}/`, separated by `.`).
    fn matches(&self, rest: &str) -> bool {
        self.filters.read().iter().any(|f| f.matches(rest, '.'))
    }
}

/// One application's local subscribers and its bus subscription task.
struct AppState {
    members: RwLock<Vec<Arc<Member>>>,
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

    /// Adds `member` to `app`'s subscribers and makes sure the node's bus subscription for
    /// `app` exists (and has reached the bus) before returning.
    pub async fn join(&self, app: &AppRef, member: Arc<Member>) -> Result<(), BusError> {
        let state = {
            let mut apps = self.apps.lock();
            let state = apps
                .entry(app.clone())
                .or_insert_with(|| {
                    Arc::new(AppState {
                        members: RwLock::new(Vec::new()),
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
            state.members.write().push(member);
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

    /// Removes a member; the last one out drops the application's bus subscription.
    pub fn leave(&self, app: &AppRef, member_id: u64) {
        let mut apps = self.apps.lock();
        let Some(state) = apps.get(app) else { return };
        let empty = {
            let mut members = state.members.write();
            members.retain(|m| m.id != member_id);
            members.is_empty()
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
        if parse_subject_rest(rest).is_none() {
            tracing::debug!(subject = %msg.subject, "ignoring a message on a subject that is no device event");
            return 0;
        }
        let mut encoded: Option<Bytes> = None;
        let (mut delivered, mut dropped) = (0u64, 0u64);
        for member in self.members.read().iter() {
            if !member.matches(rest) {
                continue;
            }
            let packet = match &encoded {
                Some(p) => p.clone(),
                None => {
                    let Some(p) = encode_publish(&self.topic_prefix, rest, b'.', &msg.payload)
                    else {
                        tracing::warn!(subject = %msg.subject, len = msg.payload.len(), "message too large to frame as MQTT");
                        return 0;
                    };
                    encoded.insert(p).clone()
                }
            };
            match member.outbox.push(packet) {
                Ok(()) => delivered += 1,
                Err(_) => dropped += 1,
            }
        }
        if delivered > 0 {
            metrics.delivered.inc_by(delivered);
        }
        if dropped > 0 {
            metrics.dropped.get_or_create(&self.labels).inc_by(dropped);
        }
        delivered
    }
}
