//! The traffic scenarios: fan-out (S subscribers of one application each receive every
//! uplink) and many devices (S subscribers, each on its own device's topic, the upstream
//! spreading uplinks over the devices), and fan-out at QoS 1 with persistent sessions
//! (`qos1`: subscribers connect with clean_session=0 and fixed client IDs, subscribe at
//! QoS 1 and acknowledge every PUBLISH; an MQTT upstream publishes at QoS 1).
//!
//! Each run: connect and subscribe everyone; warm up (publish probes until every
//! subscriber has received one, so that no subscription is still being set up when the
//! clock starts); publish for the given duration, either at a fixed rate or as fast as the
//! broker delivers (a bounded window of deliveries in flight, so a broker is measured
//! at the rate it sustains rather than at the rate a queue in front of it fills up); then
//! wait until everything expected arrived or nothing arrived for [`DRAIN_IDLE`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::stream::{self, StreamExt};
use mqttbytes::QoS;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clients::{close_all, connect_many};
use crate::payload::{self, now_us, Kind};
use crate::report::{Latency, Report};
use crate::target::{Target, Upstream};
use crate::wire::{encode_puback, Conn, Frame, Login};

/// How long warm-up may take before the run fails, plus [`WARMUP_PER_SUBSCRIBER`] per
/// subscriber.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Warm-up time allowed per subscriber on top of [`WARMUP_TIMEOUT`] (a hundred thousand
/// per-device probes take a while).
const WARMUP_PER_SUBSCRIBER: Duration = Duration::from_micros(500);
/// Stop waiting for stragglers after this long without a delivery.
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// In the as-fast-as-delivered mode: when nothing arrives for this long, the messages in
/// flight are taken as lost and publishing goes on.
const STALL: Duration = Duration::from_millis(250);
/// Messages published between two looks at the window.
const BURST: u64 = 32;

/// The shape of a traffic run.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Number of subscribers.
    pub subscribers: usize,
    /// `true`: subscriber `i` subscribes to device `i` only (many devices); `false`: all
    /// subscribe to the application's uplinks (fan-out).
    pub per_device: bool,
    /// Devices the fan-out upstream rotates over (per-device runs use one per subscriber).
    pub devices: usize,
    /// Payload size in bytes.
    pub payload: usize,
    /// Messages per second from the upstream; `None` publishes as fast as delivered.
    pub rate: Option<u64>,
    /// How long to publish.
    pub duration: Duration,
    /// Stop after this many messages, if sooner than `duration`.
    pub messages: Option<u64>,
    /// In the as-fast-as-delivered mode, deliveries in flight (all subscribers) at most.
    pub window: u64,
    /// Connections opened at once while setting up.
    pub concurrency: usize,
    /// QoS 1 with persistent sessions (fan-out only); `None`: QoS 0, clean sessions.
    pub qos1: Option<Qos1>,
}

/// How the `qos1` shape runs.
#[derive(Clone, Debug)]
pub struct Qos1 {
    /// Subscriber `i` connects with client ID `{client_prefix}-{i}`.
    pub client_prefix: String,
    /// An MQTT upstream's unacknowledged QoS 1 PUBLISHes at most.
    pub upstream_window: usize,
}

/// What the receivers share.
struct Shared {
    delivered: AtomicU64,
    /// QoS 1: redeliveries (DUP set), not counted as delivered.
    dups: AtomicU64,
    /// QoS 1: deliveries at QoS 0 (the broker downgraded the subscription).
    not_qos1: AtomicU64,
    last_us: AtomicU64,
    closed: AtomicU64,
    warm: Vec<AtomicBool>,
    progress: Notify,
    latency: Mutex<Latency>,
}

/// Runs one traffic scenario and reports delivered msg/s, loss and latency.
pub async fn run(target: &Target, shape: &Shape) -> anyhow::Result<Report> {
    let n = shape.subscribers;
    let logins = target.logins(1, false).await?;
    let app_filter = format!("v3/{}/devices/+/up", target.uid());
    if let Some(q) = &shape.qos1 {
        let login = logins.as_ref().and_then(|l| l.first());
        let retries = AtomicU64::new(0);
        let prefix = &q.client_prefix;
        let conns =
            connect_persistent(target, n, login, prefix, &app_filter, shape, &retries).await?;
        let report = run_on(target, shape, conns).await;
        // Leave no session behind (a clean connect discards it).
        discard_sessions(target, n, login, prefix, shape.concurrency).await?;
        let mut report = report?;
        report.set("connect_retries", retries.load(Ordering::Relaxed));
        return Ok(report);
    }
    let opened = connect_many(
        target,
        n,
        logins.as_deref(),
        |i| {
            Some(if shape.per_device {
                target.topic(&Target::device(i), "up")
            } else {
                app_filter.clone()
            })
        },
        shape.concurrency,
    )
    .await?;
    run_on(target, shape, opened.conns).await
}

/// [`run`] on subscribers already connected (`shape.subscribers` of them, subscriber `i`
/// on device `i`'s topic when `shape.per_device`, else on the application's uplinks);
/// closes them at the end.
pub async fn run_on(target: &Target, shape: &Shape, conns: Vec<Conn>) -> anyhow::Result<Report> {
    let n = conns.len();
    anyhow::ensure!(
        n == shape.subscribers,
        "{n} connections for {} subscribers",
        shape.subscribers
    );
    let shared = Arc::new(Shared {
        delivered: AtomicU64::new(0),
        dups: AtomicU64::new(0),
        not_qos1: AtomicU64::new(0),
        last_us: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        warm: (0..n).map(|_| AtomicBool::new(false)).collect(),
        progress: Notify::new(),
        latency: Mutex::new(Latency::new()),
    });
    let stop = CancellationToken::new();
    let receivers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, conn)| {
            tokio::spawn(receive(
                i,
                conn,
                shared.clone(),
                stop.clone(),
                shape.qos1.is_some(),
            ))
        })
        .collect();

    let devices = if shape.per_device { n } else { shape.devices };
    let window = shape.qos1.as_ref().map(|q| q.upstream_window);
    let mut up = target.upstream(devices.max(1), window).await?;
    warm_up(&mut up, &shared, shape).await?;

    let per_message = if shape.per_device { 1 } else { n as u64 };
    let cpu = target.cpu_meter();
    let start_us = now_us();
    let published = publish(&mut up, &shared, shape, devices.max(1), per_message).await?;
    let publish_secs = (now_us() - start_us) as f64 / 1e6;
    let expected = published * per_message;
    drain(&shared, expected).await;
    let cpu_end = {
        let mut r = Report::new("cpu", "");
        cpu.report(
            &mut r,
            shared.delivered.load(Ordering::Relaxed),
            "broker_cpu_us_per_delivery",
        );
        r
    };

    stop.cancel();
    let mut conns = Vec::with_capacity(n);
    for r in receivers {
        if let Ok(Some(conn)) = r.await {
            conns.push(conn);
        }
    }
    close_all(conns, shape.concurrency).await;

    let delivered = shared.delivered.load(Ordering::Relaxed);
    let last_us = shared.last_us.load(Ordering::Relaxed).max(start_us + 1);
    let secs = (last_us - start_us) as f64 / 1e6;
    let lost = expected.saturating_sub(delivered);
    let loss = if expected == 0 {
        0.0
    } else {
        lost as f64 / expected as f64
    };
    let name = if shape.qos1.is_some() {
        "qos1"
    } else if shape.per_device {
        "devices"
    } else {
        "fanout"
    };
    let mut r = Report::new(name, &target.label);
    r.set("subscribers", n as u64)
        .set("devices", devices as u64)
        .set("payload_bytes", shape.payload.max(payload::MIN_SIZE) as u64)
        .set(
            "mode",
            match shape.rate {
                Some(rate) => format!("rate {rate}/s"),
                None => format!("max (window {})", shape.window),
            },
        )
        .set("published", published)
        .rate("published_per_s", published, publish_secs)
        .set("expected", expected)
        .set("delivered", delivered)
        .set("lost", lost)
        .set("loss", (loss * 1e6).round() / 1e6)
        .rate("delivered_per_s", delivered, secs)
        .set("subscribers_closed", shared.closed.load(Ordering::Relaxed))
        .latency(&shared.latency.lock());
    if let Some(q) = &shape.qos1 {
        r.set("qos", 1u64)
            .set("clean_session", false)
            .set("dup_redeliveries", shared.dups.load(Ordering::Relaxed))
            .set(
                "not_qos1_deliveries",
                shared.not_qos1.load(Ordering::Relaxed),
            )
            .set(
                "upstream_qos",
                if target.is_lorabroker() { 0u64 } else { 1 },
            )
            .set(
                "upstream_window",
                if target.is_lorabroker() {
                    0
                } else {
                    q.upstream_window as u64
                },
            )
            .set("unexpected_pubacks", up.unexpected_acks());
    }
    r.extend(cpu_end);
    Ok(r)
}

/// One subscriber: counts and times measured deliveries, flags warm-up probes; at `qos1`
/// acknowledges every QoS 1 PUBLISH, counts DUP redeliveries apart (not delivered again)
/// and QoS 0 deliveries; returns its connection when stopped (`None` if the broker closed
/// it).
async fn receive(
    i: usize,
    mut conn: Conn,
    shared: Arc<Shared>,
    stop: CancellationToken,
    qos1: bool,
) -> Option<Conn> {
    let mut times: Vec<u64> = Vec::new();
    let mut warm = false;
    let mut acks = BytesMut::new();
    let (mut dups, mut not_qos1) = (0u64, 0u64);
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => return Some(conn),
            r = conn.read_packets(|f| {
                let Frame::Publish { qos, dup, pkid, payload } = f else {
                    return;
                };
                if qos1 {
                    if qos > 0 {
                        encode_puback(&mut acks, pkid);
                    } else {
                        not_qos1 += 1;
                    }
                    if dup {
                        dups += 1;
                        return;
                    }
                }
                match payload::parse(payload) {
                    Some((Kind::Measured, t)) => times.push(t),
                    Some((Kind::Warmup, _)) => warm = true,
                    None => {}
                }
            }) => r,
        };
        if !matches!(read, Ok(true)) || (!acks.is_empty() && conn.send(&acks).await.is_err()) {
            shared.closed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        acks.clear();
        if dups > 0 || not_qos1 > 0 {
            shared
                .dups
                .fetch_add(std::mem::take(&mut dups), Ordering::Relaxed);
            shared
                .not_qos1
                .fetch_add(std::mem::take(&mut not_qos1), Ordering::Relaxed);
        }
        if warm && !shared.warm[i].load(Ordering::Relaxed) {
            shared.warm[i].store(true, Ordering::Relaxed);
        }
        if !times.is_empty() {
            let now = now_us();
            {
                let mut h = shared.latency.lock();
                for &t in &times {
                    h.record(now.saturating_sub(t));
                }
            }
            shared
                .delivered
                .fetch_add(times.len() as u64, Ordering::Relaxed);
            shared.last_us.fetch_max(now, Ordering::Relaxed);
            shared.progress.notify_one();
            times.clear();
        }
    }
}

/// Connects `n` persistent subscribers (`{prefix}-{i}`, clean_session=0) on the
/// application's uplinks at QoS 1, each after a clean connect that discards what an
/// earlier run left under its client ID; fails unless QoS 1 is granted. A CONNECT refused
/// as server unavailable is tried again (up to [`CONNECT_TRIES`] times, counted in
/// `retries`): lorabroker may refuse a persistent connect that follows a clean connect of
/// the same client ID too closely.
async fn connect_persistent(
    target: &Target,
    n: usize,
    login: Option<&Login>,
    prefix: &str,
    filter: &str,
    shape: &Shape,
    retries: &AtomicU64,
) -> anyhow::Result<Vec<Conn>> {
    discard_sessions(target, n, login, prefix, shape.concurrency).await?;
    let results: Vec<anyhow::Result<Conn>> = stream::iter(0..n)
        .map(|i| async move {
            let id = format!("{prefix}-{i}");
            let (mut conn, present) = connect_retrying(target, i, &id, login, retries).await?;
            anyhow::ensure!(!present, "{id}: a session survived the clean connect");
            let granted = conn
                .subscribe_qos(&[filter.to_owned()], QoS::AtLeastOnce)
                .await?;
            anyhow::ensure!(
                granted == [QoS::AtLeastOnce],
                "{id}: QoS 1 subscription granted {granted:?}"
            );
            Ok(conn)
        })
        .buffered(shape.concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// How often [`connect_retrying`] tries.
const CONNECT_TRIES: u32 = 5;
/// How long it waits between two tries.
const CONNECT_RETRY: Duration = Duration::from_millis(250);

/// A persistent connect (clean_session=0) of `id` to the `i`-th listener, tried again when
/// refused as server unavailable; each retry is counted in `retries`.
pub async fn connect_retrying(
    target: &Target,
    i: usize,
    id: &str,
    login: Option<&Login>,
    retries: &AtomicU64,
) -> anyhow::Result<(Conn, bool)> {
    let mut tries = 0;
    loop {
        tries += 1;
        match Conn::connect_session(&target.dialer, target.addr(i), id, login, false).await {
            Err(e) if tries < CONNECT_TRIES && e.to_string().contains("ServiceUnavailable") => {
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(CONNECT_RETRY).await;
            }
            other => return other,
        }
    }
}

/// Discards the sessions of client IDs `{prefix}-0` to `{prefix}-{n-1}`: a clean connect
/// and a DISCONNECT each.
async fn discard_sessions(
    target: &Target,
    n: usize,
    login: Option<&Login>,
    prefix: &str,
    concurrency: usize,
) -> anyhow::Result<()> {
    let results: Vec<anyhow::Result<()>> = stream::iter(0..n)
        .map(|i| async move {
            let id = format!("{prefix}-{i}");
            let conn = Conn::connect(&target.dialer, target.addr(i), &id, login).await?;
            conn.disconnect().await;
            Ok(())
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// Publishes probes until every subscriber has received one: a probe to every cold
/// subscriber (one to all in fan-out), then waits while more of them turn warm, and
/// probes the rest again.
async fn warm_up(up: &mut Upstream, shared: &Shared, shape: &Shape) -> anyhow::Result<()> {
    let timeout = WARMUP_TIMEOUT + WARMUP_PER_SUBSCRIBER * shared.warm.len() as u32;
    let deadline = Instant::now() + timeout;
    let probe = payload::build(Kind::Warmup, 0, shape.payload);
    loop {
        let cold: Vec<usize> = (0..shared.warm.len())
            .filter(|&i| !shared.warm[i].load(Ordering::Relaxed))
            .collect();
        if cold.is_empty() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {} subscribers received no warm-up message within {timeout:?}",
            cold.len(),
            shared.warm.len()
        );
        let mut warm = shared.warm.len() - cold.len();
        if shape.per_device {
            for i in cold {
                up.publish(i, &probe).await?;
            }
        } else {
            up.publish(0, &probe).await?;
        }
        up.settle().await?;
        // Many probes (one per device) take a while to arrive: no probing again while
        // they still do.
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = shared
                .warm
                .iter()
                .filter(|w| w.load(Ordering::Relaxed))
                .count();
            if now == warm || now == shared.warm.len() {
                break;
            }
            warm = now;
        }
    }
    // Let late probes arrive before the clock starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// The measured publishing phase; returns how many messages were published.
async fn publish(
    up: &mut Upstream,
    shared: &Shared,
    shape: &Shape,
    devices: usize,
    per_message: u64,
) -> anyhow::Result<u64> {
    let mut message = payload::build(Kind::Measured, 0, shape.payload);
    let start = Instant::now();
    let mut published = 0u64;
    let mut written_off = 0u64;
    let limit = shape.messages.unwrap_or(u64::MAX);
    while start.elapsed() < shape.duration && published < limit {
        match shape.rate {
            Some(rate) => {
                let due = ((rate as f64 * start.elapsed().as_secs_f64()) as u64).min(limit);
                while published < due {
                    payload::stamp(&mut message, now_us());
                    up.publish(published as usize % devices, &message).await?;
                    published += 1;
                }
                up.flush().await?;
                up.pause(Duration::from_millis(1)).await?;
            }
            None => {
                let delivered = shared.delivered.load(Ordering::Relaxed);
                let in_flight = (published * per_message).saturating_sub(delivered + written_off);
                if in_flight >= shape.window.max(per_message) {
                    up.flush().await?;
                    let waited = tokio::time::timeout(STALL, shared.progress.notified()).await;
                    if waited.is_err() && shared.delivered.load(Ordering::Relaxed) == delivered {
                        written_off += in_flight;
                    }
                    continue;
                }
                for _ in 0..BURST.min(limit - published) {
                    payload::stamp(&mut message, now_us());
                    up.publish(published as usize % devices, &message).await?;
                    published += 1;
                }
            }
        }
    }
    up.settle().await?;
    Ok(published)
}

/// Waits until `expected` deliveries arrived or none arrived for [`DRAIN_IDLE`].
async fn drain(shared: &Shared, expected: u64) {
    let mut last = shared.delivered.load(Ordering::Relaxed);
    let mut idle_since = Instant::now();
    loop {
        let d = shared.delivered.load(Ordering::Relaxed);
        if d >= expected {
            return;
        }
        if d != last {
            last = d;
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= DRAIN_IDLE {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
