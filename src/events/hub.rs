//! [`Hub`]: this node's live event streams (SSE). The streams of one application share one
//! bus subscription to `lorabroker.events.{tenant}.{app}`, taken by the first stream and
//! dropped with the last, and one broadcast buffer of `events.stream_buffer` events; a
//! reader further behind loses the oldest ones (counted, `reason="slow_reader"`), so no
//! reader makes memory grow. The same task samples the application's uplinks from its
//! traffic subject into `as.up.sample` events for the node's streams (at most
//! `events.uplink_sample_per_second`).
//!
//! Streams are bounded per node (`events.max_streams`) and per application
//! (`events.max_streams_per_application`), and all end when the node stops serving HTTP.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::config::EventsConfig;
use super::event::{bounded, data, names, subject, Event};
use crate::bus::{Bus, BusError, BusMessage};
use crate::limits::{KeyedRate, Rate};
use crate::metrics::ReasonLabels;
use crate::topic::{parse_subject_rest, AppRef};

/// How long a stream waits for the application's bus subscription another stream takes.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// One event as a stream sends it.
#[derive(Debug)]
pub struct Frame {
    /// The event name (for `?names=` filters).
    pub name: String,
    /// `event: <name>\ndata: <json>\n\n`.
    pub sse: Bytes,
}

impl Frame {
    /// The frame of `event`.
    pub fn of(event: &Event) -> Self {
        let json = event.to_json();
        let mut sse = Vec::with_capacity(json.len() + event.name.len() + 16);
        sse.extend_from_slice(b"event: ");
        sse.extend_from_slice(event.name.as_bytes());
        sse.extend_from_slice(b"\ndata: ");
        sse.extend_from_slice(&json);
        sse.extend_from_slice(b"\n\n");
        Self {
            name: event.name.clone(),
            sse: Bytes::from(sse),
        }
    }

    /// The frame of an event received from the bus, if it is one: parsed and written
    /// again, so that whatever a publisher sent, a frame is one event of valid JSON.
    pub fn from_payload(payload: &[u8]) -> Option<Self> {
        let event: Event = serde_json::from_slice(payload).ok()?;
        Event::is_valid_name(&event.name).then(|| Self::of(&event))
    }
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `events.max_streams` streams are open on this node.
    #[error("this node serves events.max_streams = {0} event streams already")]
    NodeFull(usize),
    /// `events.max_streams_per_application` streams of the application are open here.
    #[error("{0} event streams of this application are open on this node already (events.max_streams_per_application)")]
    ApplicationFull(usize),
    /// The bus subscription could not be taken.
    #[error("cannot subscribe to the application's events: {0}")]
    Bus(String),
}

struct AppStreams {
    tx: broadcast::Sender<Arc<Frame>>,
    streams: usize,
    ready: watch::Receiver<bool>,
    task: Option<AbortHandle>,
}

#[derive(Default)]
struct State {
    apps: HashMap<AppRef, AppStreams>,
    total: usize,
}

/// The event streams of one node.
pub struct Hub {
    bus: Arc<dyn Bus>,
    config: EventsConfig,
    origin: String,
    state: Mutex<State>,
    uplinks: KeyedRate<AppRef>,
    closing: CancellationToken,
    dropped: Family<ReasonLabels, Counter>,
    streams: Gauge,
}

/// One open stream: its frames, and its place in the bounds until dropped.
pub struct EventStream {
    /// The application's frames (a lagging receiver reports how many it lost).
    pub rx: broadcast::Receiver<Arc<Frame>>,
    _guard: Guard,
}

struct Guard {
    hub: Arc<Hub>,
    app: AppRef,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.hub.leave(&self.app);
    }
}

impl Hub {
    /// The streams of the node named `origin`, over `bus`.
    pub fn new(
        bus: Arc<dyn Bus>,
        config: EventsConfig,
        origin: &str,
        max_tracked: usize,
        dropped: Family<ReasonLabels, Counter>,
        streams: Gauge,
    ) -> Self {
        Self {
            uplinks: KeyedRate::new(Rate::new(config.uplink_sample_per_second, 1), max_tracked),
            bus,
            config,
            origin: origin.to_owned(),
            state: Mutex::default(),
            closing: CancellationToken::new(),
            dropped,
            streams,
        }
    }

    /// The bounds and intervals of the streams.
    pub fn config(&self) -> &EventsConfig {
        &self.config
    }

    /// Cancelled when the node stops serving HTTP: every stream ends.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// Counts `n` events a slow reader lost.
    pub fn lost(&self, n: u64) {
        self.dropped
            .get_or_create(&ReasonLabels {
                reason: "slow_reader",
            })
            .inc_by(n);
    }

    /// Opens a stream of `app`'s events, once the application's bus subscription is in
    /// place (events published from then on reach it).
    pub async fn open(self: &Arc<Self>, app: &AppRef) -> Result<EventStream, OpenError> {
        let (rx, mut ready, first) = {
            let mut state = self.state.lock();
            if state.total >= self.config.max_streams {
                return Err(OpenError::NodeFull(self.config.max_streams));
            }
            let per_app = self.config.max_streams_per_application;
            let mut first = None;
            let entry = state.apps.entry(app.clone()).or_insert_with(|| {
                let (ready_tx, ready) = watch::channel(false);
                first = Some(ready_tx);
                AppStreams {
                    tx: broadcast::channel(self.config.stream_buffer).0,
                    streams: 0,
                    ready,
                    task: None,
                }
            });
            if entry.streams >= per_app {
                return Err(OpenError::ApplicationFull(per_app));
            }
            entry.streams += 1;
            let opened = (entry.tx.subscribe(), entry.ready.clone(), first);
            state.total += 1;
            opened
        };
        self.streams.inc();
        let guard = Guard {
            hub: self.clone(),
            app: app.clone(),
        };
        match first {
            Some(ready_tx) => {
                let task = self
                    .start(app)
                    .await
                    .map_err(|e| OpenError::Bus(e.to_string()))?;
                let mut state = self.state.lock();
                match state.apps.get_mut(app) {
                    Some(entry) => entry.task = Some(task),
                    None => task.abort(),
                }
                let _ = ready_tx.send(true);
            }
            None => {
                let waited = tokio::time::timeout(READY_TIMEOUT, ready.wait_for(|r| *r)).await;
                if !matches!(waited, Ok(Ok(_))) {
                    return Err(OpenError::Bus(
                        "the application's event subscription is not in place".into(),
                    ));
                }
            }
        }
        Ok(EventStream { rx, _guard: guard })
    }

    /// Subscribes to `app`'s events and uplinks and starts forwarding them.
    async fn start(self: &Arc<Self>, app: &AppRef) -> Result<AbortHandle, BusError> {
        let events = self.bus.subscribe(subject(app)).await?;
        let uplinks = if self.uplinks.is_on() {
            let filter = format!("{}devices.*.up", app.subject_prefix());
            Some(self.bus.subscribe(filter).await?)
        } else {
            None
        };
        self.bus.flush().await?;
        let tx = match self.state.lock().apps.get(app) {
            Some(entry) => entry.tx.clone(),
            None => broadcast::channel(1).0,
        };
        let (hub, app) = (self.clone(), app.clone());
        let mut uplinks = uplinks.unwrap_or_else(|| Box::pin(futures::stream::pending()));
        let mut events = events;
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = events.next() => match msg {
                        Some(msg) => {
                            if let Some(frame) = Frame::from_payload(&msg.payload) {
                                let _ = tx.send(Arc::new(frame));
                            }
                        }
                        None => return,
                    },
                    Some(msg) = uplinks.next() => {
                        if let Some(frame) = hub.sample(&app, &msg) {
                            let _ = tx.send(Arc::new(frame));
                        }
                    }
                }
            }
        });
        Ok(task.abort_handle())
    }

    /// The `as.up.sample` of an uplink of `app`, if one is due.
    fn sample(&self, app: &AppRef, msg: &BusMessage) -> Option<Frame> {
        let rest = msg.subject.strip_prefix(app.subject_prefix().as_str())?;
        let device = parse_subject_rest(rest)?.device;
        if !self.uplinks.check(app) {
            return None;
        }
        let event = Event::new(
            names::UP_SAMPLE,
            app,
            &self.origin,
            data([
                ("device_id", bounded(device)),
                ("size", msg.payload.len().into()),
            ]),
        );
        Some(Frame::of(&event))
    }

    fn leave(&self, app: &AppRef) {
        self.streams.dec();
        let mut state = self.state.lock();
        state.total = state.total.saturating_sub(1);
        let Some(entry) = state.apps.get_mut(app) else {
            return;
        };
        entry.streams = entry.streams.saturating_sub(1);
        if entry.streams == 0 {
            if let Some(task) = entry.task.take() {
                task.abort();
            }
            state.apps.remove(app);
        }
    }

    /// Forgets idle applications of the uplink sampler.
    pub fn sweep(&self) {
        self.uplinks.sweep();
    }

    /// Streams open on this node.
    pub fn open_streams(&self) -> usize {
        self.state.lock().total
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

    fn hub(config: EventsConfig) -> (Arc<Hub>, Arc<dyn Bus>, Family<ReasonLabels, Counter>) {
        let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::new());
        let dropped = Family::<ReasonLabels, Counter>::default();
        let hub = Hub::new(
            bus.clone(),
            config,
            "n",
            100,
            dropped.clone(),
            Gauge::default(),
        );
        (Arc::new(hub), bus, dropped)
    }

    #[tokio::test]
    async fn streams_are_bounded_per_node_and_application_and_give_back_their_place() {
        let config = EventsConfig {
            max_streams: 3,
            max_streams_per_application: 2,
            ..EventsConfig::default()
        };
        let (hub, _, _) = hub(config);
        let a1 = hub.open(&app("app1")).await.unwrap();
        let _a2 = hub.open(&app("app1")).await.unwrap();
        assert!(matches!(
            hub.open(&app("app1")).await,
            Err(OpenError::ApplicationFull(2))
        ));
        let _b1 = hub.open(&app("app2")).await.unwrap();
        assert!(matches!(
            hub.open(&app("app3")).await,
            Err(OpenError::NodeFull(3))
        ));
        drop(a1);
        assert_eq!(hub.open_streams(), 2);
        let _a3 = hub.open(&app("app1")).await.unwrap();
    }

    #[tokio::test]
    async fn events_and_uplink_samples_reach_the_stream_and_garbage_does_not() {
        let (hub, bus, dropped) = hub(EventsConfig {
            stream_buffer: 2,
            ..EventsConfig::default()
        });
        let mut stream = hub.open(&app("app1")).await.unwrap();
        let e = Event::new(names::CONNECT, &app("app1"), "other", Default::default());
        bus.publish(subject(&app("app1")), e.to_json().into())
            .await
            .unwrap();
        bus.publish(
            subject(&app("app1")),
            Bytes::from_static(b"{\"name\":\"x\"}"),
        )
        .await
        .unwrap();
        bus.publish(
            "v3.tenant1.app1.devices.dev1.up".into(),
            Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
        // Two subscriptions: the event and the sample may come in either order.
        let mut frames = [
            stream.rx.recv().await.unwrap(),
            stream.rx.recv().await.unwrap(),
        ];
        frames.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(frames[0].name, "as.mqtt.connect");
        assert!(frames[0]
            .sse
            .starts_with(b"event: as.mqtt.connect\ndata: {"));
        assert!(frames[0].sse.ends_with(b"}\n\n"));
        assert_eq!(frames[1].name, "as.up.sample");
        let json = std::str::from_utf8(&frames[1].sse).unwrap();
        assert!(
            json.contains(r#""device_id":"dev1""#) && json.contains(r#""size":2"#),
            "{json}"
        );

        // A reader that falls behind loses the oldest events, and is told how many.
        for _ in 0..5 {
            bus.publish(subject(&app("app1")), e.to_json().into())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        match stream.rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => hub.lost(n),
            other => panic!("not lagged: {other:?}"),
        }
        assert_eq!(
            dropped
                .get_or_create(&ReasonLabels {
                    reason: "slow_reader"
                })
                .get(),
            3
        );
    }
}
