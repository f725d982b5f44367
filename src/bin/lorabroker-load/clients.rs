//! Opening many client connections with bounded concurrency, and the two scenarios that
//! are about connections rather than traffic: the connection storm and idle memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use crate::payload::now_us;
use crate::report::{rss_bytes, Latency, Report};
use crate::target::Target;
use crate::wire::{Conn, Login};

/// Connections opened by [`connect_many`], and how long that took.
pub struct Opened {
    /// The connections, in index order.
    pub conns: Vec<Conn>,
    /// CONNECT→CONNACK (and SUBSCRIBE→SUBACK, if any) time per connection.
    pub latency: Latency,
    /// Wall time for all of them.
    pub elapsed: Duration,
}

/// A client ID unique within this process and across concurrent load generators.
pub fn client_id(i: usize) -> String {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    format!("lbload-{}-{run}-{i}", std::process::id())
}

/// Opens `n` connections, at most `concurrency` in flight, spread over the target's
/// listeners; connection `i` logs in with `logins[i % len]` (anonymous when `None`) and
/// subscribes to `filter(i)` when that is `Some`. Fails on the first refused connection.
pub async fn connect_many(
    target: &Target,
    n: usize,
    logins: Option<&[Login]>,
    filter: impl Fn(usize) -> Option<String>,
    concurrency: usize,
) -> anyhow::Result<Opened> {
    let start = Instant::now();
    let results: Vec<anyhow::Result<(Conn, u64)>> = stream::iter(0..n)
        .map(|i| {
            let addr = target.addr(i);
            let login = logins.map(|l| l[i % l.len()].clone());
            let filter = filter(i);
            async move {
                let t0 = now_us();
                let mut conn =
                    Conn::connect(&target.dialer, addr, &client_id(i), login.as_ref()).await?;
                if let Some(f) = filter {
                    conn.subscribe(&[f]).await?;
                }
                Ok((conn, now_us() - t0))
            }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    let elapsed = start.elapsed();
    let mut latency = Latency::new();
    let mut conns = Vec::with_capacity(n);
    for (i, r) in results.into_iter().enumerate() {
        let (conn, us) = r.map_err(|e| e.context(format!("connection {i} of {n}")))?;
        latency.record(us);
        conns.push(conn);
    }
    Ok(Opened {
        conns,
        latency,
        elapsed,
    })
}

/// Closes connections, `concurrency` at a time.
pub async fn close_all(conns: Vec<Conn>, concurrency: usize) {
    stream::iter(conns)
        .for_each_concurrent(concurrency.max(1), Conn::disconnect)
        .await;
}

/// Connection storm: `n` clients connect (and stay connected until all are in), at most
/// `concurrency` in flight, then all disconnect; `rounds` times. Connects/s counts the
/// connecting phases only; the broker CPU figure covers connects and disconnects. With
/// `distinct_keys` every connection has its own API key, created beforehand, so that
/// every CONNECT misses the broker's key cache; otherwise all share one key that a first
/// connection has put in the cache. Anonymous brokers ignore keys.
pub async fn storm(
    target: &Target,
    n: usize,
    rounds: usize,
    concurrency: usize,
    distinct_keys: bool,
) -> anyhow::Result<Report> {
    let rounds = rounds.max(1);
    let logins = target.logins(n * rounds, distinct_keys).await?;
    if !distinct_keys {
        // Warm the cache (and the broker) with one connection.
        let warm = connect_many(target, 1, logins.as_deref(), |_| None, 1).await?;
        close_all(warm.conns, 1).await;
    }
    let cpu = target.cpu_meter();
    let mut secs = 0.0;
    let mut latency = Latency::new();
    for round in 0..rounds {
        let these = logins.as_ref().map(|l| {
            if distinct_keys {
                l[round * n..(round + 1) * n].to_vec()
            } else {
                l.clone()
            }
        });
        let opened = connect_many(target, n, these.as_deref(), |_| None, concurrency).await?;
        secs += opened.elapsed.as_secs_f64();
        latency.merge(&opened.latency);
        close_all(opened.conns, concurrency).await;
    }
    let total = (n * rounds) as u64;
    let mut cpu_report = Report::new("cpu", "");
    cpu.report(&mut cpu_report, total, "broker_cpu_us_per_connection");
    let cache = match (target.is_lorabroker(), distinct_keys) {
        (false, _) => "anonymous",
        (true, false) => "hit",
        (true, true) => "miss",
    };
    let mut r = Report::new("storm", &target.label);
    r.set("connections", n as u64)
        .set("rounds", rounds as u64)
        .set("concurrency", concurrency as u64)
        .set("key_cache", cache)
        .set("seconds", (secs * 1000.0).round() / 1000.0)
        .rate("connects_per_s", total, secs)
        .latency(&latency);
    r.extend(cpu_report);
    Ok(r)
}

/// Idle memory: the broker's RSS (summed over `pids`) before and after `n` clients have
/// connected and subscribed, each to its own device's uplink topic.
pub async fn idle(
    target: &Target,
    n: usize,
    concurrency: usize,
    settle: Duration,
) -> anyhow::Result<Report> {
    let pids = &target.broker_pids;
    anyhow::ensure!(!pids.is_empty(), "idle needs --broker-pid (one per node)");
    let logins = target.logins(1, false).await?;
    let before = rss_bytes(pids)?;
    let opened = connect_many(
        target,
        n,
        logins.as_deref(),
        |i| Some(target.topic(&Target::device(i), "up")),
        concurrency,
    )
    .await?;
    tokio::time::sleep(settle).await;
    let after = rss_bytes(pids)?;
    let secs = opened.elapsed.as_secs_f64();
    close_all(opened.conns, concurrency).await;
    let per_conn = after.saturating_sub(before) as f64 / n.max(1) as f64;
    let mut r = Report::new("idle", &target.label);
    r.set("connections", n as u64)
        .set("rss_before_bytes", before)
        .set("rss_after_bytes", after)
        .set("bytes_per_connection", per_conn.round())
        .set("setup_seconds", (secs * 1000.0).round() / 1000.0)
        .rate("connects_per_s", n as u64, secs)
        .latency(&opened.latency);
    Ok(r)
}
