//! [`Publisher`]: how a node emits live events without ever slowing a session. An event
//! passes the application's token bucket (`events.per_application_per_second`), is encoded
//! and put on a bounded channel (`events.queue_capacity`) with `try_send`; one task per
//! node ([`Publisher::run`]) publishes from it on the bus. Whatever does not fit is
//! dropped and counted in `lorabroker_events_dropped_total` by reason.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::config::EventsConfig;
use super::event::{subject, Event};
use crate::bus::Bus;
use crate::limits::{KeyedRate, Rate};
use crate::metrics::ReasonLabels;
use crate::topic::AppRef;

/// An encoded event on its way to the bus.
pub struct Outgoing {
    subject: String,
    payload: Bytes,
}

/// Emits the events of one node.
pub struct Publisher {
    origin: String,
    rate: KeyedRate<AppRef>,
    tx: mpsc::Sender<Outgoing>,
    rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    dropped: Family<ReasonLabels, Counter>,
    published: Counter,
}

impl Publisher {
    /// A publisher for the node named `origin`, counting in `dropped` and `published`;
    /// `max_tracked` bounds the applications its rate limiter remembers.
    pub fn new(
        config: &EventsConfig,
        origin: &str,
        max_tracked: usize,
        dropped: Family<ReasonLabels, Counter>,
        published: Counter,
    ) -> Self {
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let rate = Rate::new(
            config.per_application_per_second,
            config.per_application_burst,
        );
        Self {
            origin: origin.to_owned(),
            rate: KeyedRate::new(rate, max_tracked),
            tx,
            rx: Mutex::new(Some(rx)),
            dropped,
            published,
        }
    }

    fn drop_one(&self, reason: &'static str) {
        self.dropped.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Emits the event `name` of `app` with `data`, or drops it (rate limit, full queue):
    /// never waits.
    pub fn emit(&self, app: &AppRef, name: &str, data: Map<String, Value>) {
        // Checked first: an event over the rate costs no encoding.
        if !self.rate.check(app) {
            return self.drop_one("rate_limited");
        }
        let event = Event::new(name, app, &self.origin, data);
        let outgoing = Outgoing {
            subject: subject(app),
            payload: Bytes::from(event.to_json()),
        };
        if self.tx.try_send(outgoing).is_err() {
            self.drop_one("queue_full");
        }
    }

    /// Publishes queued events until the publisher is dropped; runs once per node (a second
    /// call returns at once). Forgets idle applications of the rate limiter meanwhile.
    pub async fn run(self: Arc<Self>, bus: Arc<dyn Bus>, sweep: std::time::Duration) {
        let Some(mut rx) = self.rx.lock().take() else {
            return;
        };
        let mut tick = tokio::time::interval(sweep);
        loop {
            tokio::select! {
                next = rx.recv() => {
                    let Some(o) = next else { return };
                    match bus.publish(o.subject, o.payload).await {
                        Ok(()) => {
                            self.published.inc();
                        }
                        Err(_) => self.drop_one("bus_unavailable"),
                    }
                }
                _ = tick.tick() => self.rate.sweep(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::EmbeddedBus;
    use crate::topic::Id;
    use futures::StreamExt;

    fn app(a: &str) -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse(a).unwrap())
    }

    fn publisher(config: &EventsConfig) -> (Arc<Publisher>, Family<ReasonLabels, Counter>) {
        let dropped = Family::<ReasonLabels, Counter>::default();
        let p = Publisher::new(config, "node", 100, dropped.clone(), Counter::default());
        (Arc::new(p), dropped)
    }

    fn count(family: &Family<ReasonLabels, Counter>, reason: &'static str) -> u64 {
        family.get_or_create(&ReasonLabels { reason }).get()
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_is_per_application_and_refills() {
        let config = EventsConfig {
            per_application_per_second: 2.0,
            per_application_burst: 3,
            ..EventsConfig::default()
        };
        let (p, dropped) = publisher(&config);
        for _ in 0..10 {
            p.emit(&app("app1"), "as.mqtt.connect", Map::new());
        }
        assert_eq!(count(&dropped, "rate_limited"), 7, "a burst of 3 passes");
        p.emit(&app("app2"), "as.mqtt.connect", Map::new());
        assert_eq!(
            count(&dropped, "rate_limited"),
            7,
            "another application has its own"
        );
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        p.emit(&app("app1"), "as.mqtt.connect", Map::new());
        assert_eq!(
            count(&dropped, "rate_limited"),
            7,
            "one more after half a second"
        );
        p.emit(&app("app1"), "as.mqtt.connect", Map::new());
        assert_eq!(count(&dropped, "rate_limited"), 8);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_the_task_publishes_on_the_application_subject() {
        let config = EventsConfig {
            per_application_per_second: 0.0,
            queue_capacity: 2,
            ..EventsConfig::default()
        };
        let (p, dropped) = publisher(&config);
        for _ in 0..5 {
            p.emit(&app("app1"), "as.mqtt.connect", Map::new());
        }
        assert_eq!(count(&dropped, "queue_full"), 3);
        assert_eq!(count(&dropped, "rate_limited"), 0, "rate 0 is off");
        let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::new());
        let mut sub = bus
            .subscribe("lorabroker.events.tenant1.app1".into())
            .await
            .unwrap();
        let task = tokio::spawn(p.clone().run(bus, std::time::Duration::from_secs(10)));
        for _ in 0..2 {
            let msg = sub.next().await.unwrap();
            let e: Event = serde_json::from_slice(&msg.payload).unwrap();
            assert_eq!(e.name, "as.mqtt.connect");
            assert_eq!(e.origin, "node");
        }
        task.abort();
    }
}
