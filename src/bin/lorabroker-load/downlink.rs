//! The downlink scenario (lorabroker only): C clients publish `down/push` at a total rate
//! over D devices; one more client subscribes to the application's `down/queued` events.
//! Each push carries a correlation ID `lbload:<send time>`, which the broker copies into
//! the event, so push→event latency is measured; the Redis queue lengths are read at the
//! end and must add up to what was pushed. The devices are registered first, as their
//! upstream would (the cluster refuses downlinks to unregistered devices).

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use lorabroker::devices::redis::RedisDeviceRegistry;
use lorabroker::devices::DeviceRegistry;
use lorabroker::downlink::redis::list_key;
use lorabroker::topic::{AppRef, DeviceRef, Id};

use crate::clients::{close_all, connect_many};
use crate::payload::{find_correlation_time, now_us};
use crate::report::{Latency, Report};
use crate::target::Target;
use crate::wire::encode_publish;

/// Stop waiting for events after this long without one.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

/// The shape of a downlink run.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Publishing clients.
    pub clients: usize,
    /// Devices the pushes are spread over.
    pub devices: usize,
    /// Pushes per second, all clients together.
    pub rate: u64,
    /// How long to publish.
    pub duration: Duration,
}

/// Runs the downlink scenario.
pub async fn run(target: &Target, shape: &Shape) -> anyhow::Result<Report> {
    anyhow::ensure!(
        target.is_lorabroker(),
        "the downlink scenario needs a lorabroker cluster (--redis-url, --nats-url)"
    );
    register_devices(target, shape.devices.max(1)).await?;
    let logins = target.logins(1, false).await?;
    let events = format!("v3/{}/devices/+/down/queued", target.uid());
    let mut listener = connect_many(target, 1, logins.as_deref(), |_| Some(events.clone()), 1)
        .await?
        .conns
        .remove(0);
    let clients = shape.clients.max(1);
    let mut pushers = connect_many(target, clients, logins.as_deref(), |_| None, 64)
        .await?
        .conns;
    let topics: Vec<String> = (0..shape.devices.max(1))
        .map(|i| target.topic(&Target::device(i), "down/push"))
        .collect();

    let listen = tokio::spawn(async move {
        let mut latency = Latency::new();
        let mut seen = 0u64;
        let mut last = Instant::now();
        loop {
            let read = tokio::time::timeout(
                Duration::from_millis(100),
                listener.read_frames(|p| {
                    seen += 1;
                    if let Some(t) = find_correlation_time(p) {
                        latency.record(now_us().saturating_sub(t));
                    }
                }),
            )
            .await;
            match read {
                Ok(Ok(true)) => last = Instant::now(),
                Ok(_) => break,
                Err(_) if last.elapsed() >= DRAIN_IDLE => break,
                Err(_) => {}
            }
        }
        (seen, latency, listener)
    });

    let cpu = target.cpu_meter();
    let start = Instant::now();
    let mut pushed = 0u64;
    let mut batches: Vec<BytesMut> = vec![BytesMut::new(); clients];
    while start.elapsed() < shape.duration {
        let due = (shape.rate as f64 * start.elapsed().as_secs_f64()) as u64;
        while pushed < due {
            let body = format!(
                r#"{{"downlinks":[{{"f_port":1,"frm_payload":"AQID","priority":"NORMAL","correlation_ids":["lbload:{:020}"]}}]}}"#,
                now_us()
            );
            let c = pushed as usize % clients;
            encode_publish(
                &mut batches[c],
                &topics[pushed as usize % topics.len()],
                body.as_bytes(),
            );
            pushed += 1;
        }
        for (conn, batch) in pushers.iter_mut().zip(batches.iter_mut()) {
            if !batch.is_empty() {
                conn.send(batch).await?;
                batch.clear();
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let publish_secs = start.elapsed().as_secs_f64();
    let (seen, latency, listener) = listen.await.context("event listener")?;
    let mut cpu_report = Report::new("cpu", "");
    cpu.report(&mut cpu_report, pushed, "broker_cpu_us_per_push");
    let secs = publish_secs.max(start.elapsed().as_secs_f64() - DRAIN_IDLE.as_secs_f64());
    let in_redis = queue_lengths(target, shape.devices.max(1)).await?;
    pushers.push(listener);
    close_all(pushers, 64).await;

    let mut r = Report::new("downlink", &target.label);
    r.set("clients", clients as u64)
        .set("devices", shape.devices as u64)
        .set("mode", format!("rate {}/s", shape.rate))
        .set("pushed", pushed)
        .rate("pushed_per_s", pushed, publish_secs)
        .set("queued_events", seen)
        .rate("queued_events_per_s", seen, secs)
        .set("queued_in_redis", in_redis)
        .set("lost", pushed.saturating_sub(seen.min(in_redis)))
        .latency(&latency);
    r.extend(cpu_report);
    Ok(r)
}

/// The `i`-th device of the load's application.
fn device_ref(target: &Target, i: usize) -> anyhow::Result<DeviceRef> {
    let app = AppRef::new(Id::parse(&target.tenant)?, Id::parse(&target.app)?);
    Ok(DeviceRef::new(app, Id::parse(&Target::device(i))?))
}

/// Registers the load's devices in the cluster's device registry.
async fn register_devices(target: &Target, devices: usize) -> anyhow::Result<()> {
    let url = target.redis_url.as_deref().context("no Redis URL")?;
    let registry = RedisDeviceRegistry::connect(url, &target.redis_prefix).await?;
    for i in 0..devices {
        registry.add(&device_ref(target, i)?).await?;
    }
    Ok(())
}

/// Sum of the lengths of the devices' downlink queues in Redis.
async fn queue_lengths(target: &Target, devices: usize) -> anyhow::Result<u64> {
    let url = target.redis_url.as_deref().context("no Redis URL")?;
    // The library's connection: rediss:// and credentials in the URL work as for a node.
    let mut conn = lorabroker::redis_conn::RedisConn::from_url(url)?;
    // One tenant, hence one hash tag: the pipeline stays on one Redis Cluster slot.
    let mut pipe = redis::pipe();
    for i in 0..devices {
        pipe.cmd("LLEN")
            .arg(list_key(&target.redis_prefix, &device_ref(target, i)?));
    }
    let lens: Vec<u64> = pipe.query_async(&mut conn).await?;
    Ok(lens.into_iter().sum())
}
