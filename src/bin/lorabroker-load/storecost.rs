//! `store-cost`: what one stored QoS 1 message costs while its persistent subscriber is
//! away. A subscriber connects with clean_session=0, subscribes at QoS 1, receives a
//! warm-up probe and disconnects (its session stays); the upstream then publishes N
//! messages; the JetStream stream that holds them (lorabroker's
//! `lorabroker-sessions-{tenant}`, or nats-server's `$MQTT_msgs`) is read before and after
//! (`$JS.API.STREAM.INFO`: messages, bytes), with the storing process's RSS and the bytes
//! allocated under its store directory. Then the subscriber comes back and is replayed
//! what it missed, acknowledging each message (replayed count, duplicates, msg/s), and
//! its session is discarded.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::BytesMut;
use mqttbytes::QoS;

use crate::payload::{self, now_us, Kind};
use crate::report::{rss_bytes, Latency, Report};
use crate::target::Target;
use crate::traffic::connect_retrying;
use crate::wire::{encode_puback, Conn, Frame, Login};

/// How long warm-up may take.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the stream to hold every published message.
const STORE_TIMEOUT: Duration = Duration::from_secs(120);
/// Replay ends after this long without a delivery.
const REPLAY_IDLE: Duration = Duration::from_secs(5);

/// What `store-cost` measures.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Messages published while the subscriber is away.
    pub messages: u64,
    /// Payload size in bytes.
    pub payload: usize,
    /// Devices the upstream rotates over.
    pub devices: usize,
    /// The subscriber's client ID.
    pub client_id: String,
    /// NATS URL of the JetStream that stores the messages (default: the target's
    /// `--nats-url`); `None` and no `--nats-url`: no stream figures.
    pub js_url: Option<String>,
    /// The stream (default for lorabroker: `lorabroker-sessions-{tenant}`).
    pub stream: Option<String>,
    /// The process that stores the messages (its RSS is read before and after).
    pub store_pid: Option<u32>,
    /// Its store directory (bytes allocated under it, before and after).
    pub store_dir: Option<PathBuf>,
    /// An MQTT upstream's unacknowledged QoS 1 PUBLISHes at most.
    pub upstream_window: usize,
    /// Wait this long after publishing before reading the figures.
    pub settle: Duration,
}

/// One reading of the store.
#[derive(Clone, Copy, Debug, Default)]
struct Reading {
    messages: Option<u64>,
    bytes: Option<u64>,
    rss: Option<u64>,
    disk: Option<u64>,
}

/// Measures the cost per stored message (see the module docs).
pub async fn run(target: &Target, shape: &Shape) -> anyhow::Result<Report> {
    let logins = target.logins(1, false).await?;
    let login = logins.as_ref().and_then(|l| l.first());
    let filter = format!("v3/{}/devices/+/up", target.uid());
    let id = shape.client_id.as_str();
    let js_url = shape.js_url.clone().or_else(|| target.nats_url.clone());
    let stream_name = match (&shape.stream, target.is_lorabroker()) {
        (Some(s), _) => Some(s.clone()),
        (None, true) => Some(format!("lorabroker-sessions-{}", target.tenant)),
        (None, false) => None,
    };
    let js = match (&js_url, &stream_name) {
        (Some(url), Some(_)) => Some(async_nats::jetstream::new(
            async_nats::connect(url.as_str())
                .await
                .with_context(|| format!("connecting to NATS at {url}"))?,
        )),
        _ => None,
    };

    // The session: subscribed at QoS 1, warm, then away.
    let retries = AtomicU64::new(0);
    discard(target, id, login).await?;
    let mut conn = connect_retrying(target, 0, id, login, &retries).await?.0;
    let granted = conn
        .subscribe_qos(std::slice::from_ref(&filter), QoS::AtLeastOnce)
        .await?;
    anyhow::ensure!(
        granted == [QoS::AtLeastOnce],
        "QoS 1 subscription granted {granted:?}"
    );
    let mut up = target
        .upstream(shape.devices.max(1), Some(shape.upstream_window))
        .await?;
    warm_up(&mut conn, &mut up, shape.payload).await?;
    conn.disconnect().await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let before = read(js.as_ref(), stream_name.as_deref(), shape).await?;
    let mut message = payload::build(Kind::Measured, 0, shape.payload);
    let start = Instant::now();
    for i in 0..shape.messages {
        payload::stamp(&mut message, now_us());
        up.publish(i as usize % shape.devices.max(1), &message)
            .await?;
    }
    up.settle().await?;
    let published_secs = start.elapsed().as_secs_f64();
    // NATS core publishes reach the stream asynchronously: wait until it holds them all.
    let mut stored_secs = published_secs;
    if let (Some(js), Some(name), Some(m0)) = (&js, &stream_name, before.messages) {
        let deadline = Instant::now() + STORE_TIMEOUT;
        loop {
            let (m, _) = stream_state(js, name).await?;
            if m >= m0 + shape.messages || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stored_secs = start.elapsed().as_secs_f64();
    }
    tokio::time::sleep(shape.settle).await;
    let after = read(js.as_ref(), stream_name.as_deref(), shape).await?;

    // The subscriber comes back for what it missed.
    let (mut conn, present) = connect_retrying(target, 0, id, login, &retries).await?;
    let replay = replay(&mut conn, shape.messages).await?;
    conn.disconnect().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let drained = read(js.as_ref(), stream_name.as_deref(), shape).await?;
    discard(target, id, login).await?;

    let n = shape.messages.max(1) as f64;
    let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => serde_json::Value::from(((a as f64 - b as f64) / n).round()),
        _ => serde_json::Value::Null,
    };
    let delta = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => serde_json::Value::from(a as i64 - b as i64),
        _ => serde_json::Value::Null,
    };
    let mut r = Report::new("store_cost", &target.label);
    r.set("messages", shape.messages)
        .set("payload_bytes", shape.payload.max(payload::MIN_SIZE) as u64)
        .set("stream", stream_name.clone())
        .rate("published_per_s", shape.messages, published_secs)
        .rate("stored_per_s", shape.messages, stored_secs)
        .set(
            "stream_messages_stored",
            delta(after.messages, before.messages),
        )
        .set("stream_bytes_stored", delta(after.bytes, before.bytes))
        .set("stream_bytes_per_message", per(after.bytes, before.bytes))
        .set("disk_bytes_stored", delta(after.disk, before.disk))
        .set("disk_bytes_per_message", per(after.disk, before.disk))
        .set("rss_before", before.rss)
        .set("rss_after", after.rss)
        .set("rss_bytes_per_message", per(after.rss, before.rss))
        .set("session_present", present)
        .set("connect_retries", retries.load(Ordering::Relaxed))
        .set("replayed", replay.delivered)
        .set(
            "replay_lost",
            shape.messages.saturating_sub(replay.delivered),
        )
        .set("replay_dup_redeliveries", replay.dups)
        .set("replay_not_qos1", replay.not_qos1)
        .rate("replay_per_s", replay.delivered, replay.secs)
        .set("stream_messages_after_replay", drained.messages)
        .set("rss_after_replay", drained.rss)
        .latency(&replay.latency);
    Ok(r)
}

/// Discards the session of `id` (a clean connect, then DISCONNECT).
async fn discard(target: &Target, id: &str, login: Option<&Login>) -> anyhow::Result<()> {
    Conn::connect(&target.dialer, target.addr(0), id, login)
        .await?
        .disconnect()
        .await;
    Ok(())
}

/// Publishes probes until the subscriber received one (acknowledging what it receives).
async fn warm_up(
    conn: &mut Conn,
    up: &mut crate::target::Upstream,
    size: usize,
) -> anyhow::Result<()> {
    let probe = payload::build(Kind::Warmup, 0, size);
    let deadline = Instant::now() + WARMUP_TIMEOUT;
    let mut acks = BytesMut::new();
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the subscriber received no warm-up message within {WARMUP_TIMEOUT:?}"
        );
        up.publish(0, &probe).await?;
        up.settle().await?;
        let mut warm = false;
        let wait = Instant::now() + Duration::from_millis(500);
        while !warm && Instant::now() < wait {
            let read = tokio::time::timeout(
                Duration::from_millis(100),
                conn.read_packets(|f| {
                    if let Frame::Publish {
                        qos, pkid, payload, ..
                    } = f
                    {
                        if qos > 0 {
                            encode_puback(&mut acks, pkid);
                        }
                        warm |= matches!(payload::parse(payload), Some((Kind::Warmup, _)));
                    }
                }),
            )
            .await;
            if let Ok(open) = read {
                anyhow::ensure!(open?, "the broker closed the subscriber during warm-up");
            }
            if !acks.is_empty() {
                conn.send(&acks).await?;
                acks.clear();
            }
        }
        if warm {
            return Ok(());
        }
    }
}

/// What a replay received.
struct Replay {
    delivered: u64,
    dups: u64,
    not_qos1: u64,
    secs: f64,
    latency: Latency,
}

/// Receives (and acknowledges) until `expected` measured messages arrived or none for
/// [`REPLAY_IDLE`].
async fn replay(conn: &mut Conn, expected: u64) -> anyhow::Result<Replay> {
    let start = Instant::now();
    let mut last = start;
    let mut out = Replay {
        delivered: 0,
        dups: 0,
        not_qos1: 0,
        secs: 0.0,
        latency: Latency::new(),
    };
    let mut acks = BytesMut::new();
    while out.delivered < expected {
        let read = tokio::time::timeout(
            REPLAY_IDLE,
            conn.read_packets(|f| {
                let Frame::Publish {
                    qos,
                    dup,
                    pkid,
                    payload,
                } = f
                else {
                    return;
                };
                if qos > 0 {
                    encode_puback(&mut acks, pkid);
                } else {
                    out.not_qos1 += 1;
                }
                if dup {
                    out.dups += 1;
                } else if let Some((Kind::Measured, t)) = payload::parse(payload) {
                    out.delivered += 1;
                    out.latency.record(now_us().saturating_sub(t));
                }
            }),
        )
        .await;
        let Ok(open) = read else { break };
        anyhow::ensure!(open?, "the broker closed the subscriber during replay");
        if !acks.is_empty() {
            conn.send(&acks).await?;
            acks.clear();
            last = Instant::now();
        }
    }
    out.secs = (last - start).as_secs_f64();
    Ok(out)
}

/// The stream's messages and bytes, the store's RSS and disk bytes.
async fn read(
    js: Option<&async_nats::jetstream::Context>,
    stream: Option<&str>,
    shape: &Shape,
) -> anyhow::Result<Reading> {
    let mut r = Reading::default();
    if let (Some(js), Some(name)) = (js, stream) {
        let (m, b) = stream_state(js, name).await?;
        r.messages = Some(m);
        r.bytes = Some(b);
    }
    if let Some(pid) = shape.store_pid {
        r.rss = Some(rss_bytes(&[pid])?);
    }
    if let Some(dir) = &shape.store_dir {
        r.disk = Some(allocated_bytes(dir));
    }
    Ok(r)
}

/// Messages and bytes of stream `name` (`$JS.API.STREAM.INFO.{name}`).
async fn stream_state(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> anyhow::Result<(u64, u64)> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("stream {name}"))?;
    let info = stream
        .info()
        .await
        .with_context(|| format!("info of stream {name}"))?;
    Ok((info.state.messages, info.state.bytes))
}

/// Bytes allocated on disk (blocks × 512) by the files under `dir`; unreadable entries
/// count as zero.
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
