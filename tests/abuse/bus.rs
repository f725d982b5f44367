//! The bus: a NATS subscription that overflows (slow consumer) loses messages, and every
//! one lost is counted in `lorabroker_bus_dropped_total{reason="slow_consumer"}` instead of
//! only being logged. Real NATS.

use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;

use crate::common::services::{unique, NatsService};
use crate::common::wait::eventually;
use lorabroker::bus::nats::SUBSCRIPTION_CAPACITY;
use lorabroker::bus::{Bus, NatsBus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_drops_are_counted() {
    let nats = NatsService::start().await;
    let consumer = NatsBus::connect(&nats.url, "slow-consumer").await.unwrap();
    let counter = Counter::default();
    consumer.count_drops_in(counter.clone());
    let producer = NatsBus::connect(&nats.url, "producer").await.unwrap();
    let subject = format!("{}.up", unique("slow"));
    // Subscribed, never read: its buffer fills.
    let _stalled = consumer.subscribe(subject.clone()).await.unwrap();
    consumer.flush().await.unwrap();
    let sent = SUBSCRIPTION_CAPACITY + 5000;
    for i in 0..sent {
        producer
            .publish(subject.clone(), Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let dropped = eventually(
        "slow-consumer drops counted",
        Duration::from_secs(10),
        || {
            let (counter, consumer) = (counter.clone(), consumer.clone());
            async move {
                // Settled: the counter holds every drop the client reported (async-nats
                // may lose some reports itself when its event queue is full, so drops are
                // at least this many).
                match (counter.get(), consumer.dropped_messages()) {
                    (n, m) if n > 0 && n == m => Ok(n),
                    other => Err(other),
                }
            }
        },
    )
    .await;
    println!("slow consumer: {dropped} of {sent} messages dropped and counted");
}
