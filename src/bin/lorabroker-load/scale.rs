//! The scale scenario (issue 13, item 6): N idle connections, each subscribed to its own
//! device's uplink topic, then uplinks at a fixed rate spread over all the devices (the
//! many-devices traffic of `traffic.rs` over all of them). It reports the broker's RSS
//! before, once everyone is connected (per connection) and at its peak under traffic
//! (sampled every [`SAMPLE_EVERY`]), the broker's and its backing services' CPU (share of
//! a core and µs per delivery), loss and latency.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::clients::connect_many;
use crate::report::{rss_bytes, Report};
use crate::target::Target;
use crate::traffic;

/// How often the broker's RSS is read while traffic runs.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Read buffer growth of the scale connections: each receives a message now and then,
/// so a small buffer each keeps the load generator's own memory in bounds.
const READ_CHUNK: usize = 1024;

/// The shape of a scale run.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Subscribed connections (one device each).
    pub connections: usize,
    /// Uplinks per second, spread over the devices.
    pub rate: u64,
    /// How long to publish.
    pub duration: Duration,
    /// Payload size in bytes.
    pub payload: usize,
    /// Wait this long after the last connection before reading the connected RSS.
    pub settle: Duration,
    /// Connections opened at once while setting up.
    pub concurrency: usize,
}

/// Runs the scale scenario (needs the broker's PIDs).
pub async fn run(target: &Target, shape: &Shape) -> anyhow::Result<Report> {
    let pids = &target.broker_pids;
    anyhow::ensure!(!pids.is_empty(), "scale needs --broker-pid (one per node)");
    let n = shape.connections;
    let logins = target.logins(1, false).await?;
    let before = rss_bytes(pids)?;
    let mut opened = connect_many(
        target,
        n,
        logins.as_deref(),
        |i| Some(target.topic(&Target::device(i), "up")),
        shape.concurrency,
    )
    .await?;
    let setup = opened.elapsed.as_secs_f64();
    for conn in &mut opened.conns {
        conn.set_read_chunk(READ_CHUNK);
    }
    tokio::time::sleep(shape.settle).await;
    let connected = rss_bytes(pids)?;

    let stop = CancellationToken::new();
    let sampler = tokio::spawn(peak_rss(pids.clone(), connected, stop.clone()));
    let traffic_shape = traffic::Shape {
        subscribers: n,
        per_device: true,
        devices: n,
        payload: shape.payload,
        rate: Some(shape.rate),
        duration: shape.duration,
        messages: None,
        window: 1,
        concurrency: shape.concurrency,
        qos1: None,
    };
    let traffic = traffic::run_on(target, &traffic_shape, opened.conns).await;
    stop.cancel();
    let peak = sampler.await.unwrap_or(connected);
    let traffic = traffic?;

    let per_conn = connected.saturating_sub(before) as f64 / n.max(1) as f64;
    let mut r = Report::new("scale", &target.label);
    r.set("connections", n as u64)
        .set("setup_seconds", (setup * 1000.0).round() / 1000.0)
        .rate("connects_per_s", n as u64, setup)
        .set("rss_before_bytes", before)
        .set("rss_connected_bytes", connected)
        .set("rss_peak_bytes", peak)
        .set("bytes_per_connection", per_conn.round());
    let delivered = traffic
        .get("delivered")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let seconds = |k| traffic.get(k).and_then(Value::as_f64);
    let per_delivery = |s: f64| (s * 1e8 / delivered.max(1) as f64).round() / 100.0;
    let aux = seconds("aux_cpu_s").map(per_delivery);
    let total =
        seconds("broker_cpu_s").map(|b| per_delivery(b + seconds("aux_cpu_s").unwrap_or(0.0)));
    r.extend(traffic);
    if let Some(aux) = aux {
        r.set("aux_cpu_us_per_delivery", aux);
    }
    if let Some(total) = total {
        r.set("cpu_us_per_delivery", total);
    }
    Ok(r)
}

/// The largest RSS of `pids` seen every [`SAMPLE_EVERY`] until `stop` (at least `floor`).
async fn peak_rss(pids: Vec<u32>, floor: u64, stop: CancellationToken) -> u64 {
    let mut peak = floor;
    let mut next = Instant::now();
    loop {
        if let Ok(rss) = rss_bytes(&pids) {
            peak = peak.max(rss);
        }
        next += SAMPLE_EVERY;
        tokio::select! {
            _ = stop.cancelled() => return peak,
            _ = tokio::time::sleep_until(next.into()) => {}
        }
    }
}
