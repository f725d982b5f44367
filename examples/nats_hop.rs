//! Latency of the NATS hop alone (upstream → nats-server → subscriber), paced like
//! `lorabroker-load`'s upstream, to split lorabroker's latency tail (benches/RESULTS.md).
//!
//! `cargo run --release --example nats_hop -- nats://127.0.0.1:PORT [RATE] [SECS] [SUBS] [BYTES]`
//! (defaults 5000 msg/s, 5 s, 1 subscriber, 200 bytes). Publisher and subscribers are
//! separate connections in one process; the send time (µs, one monotonic clock) is in the
//! first 8 bytes of each payload. Prints one JSON line with p50/p90/p99/p999/max in µs.

use std::time::{Duration, Instant};

use futures::StreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args.first().map_or("nats://127.0.0.1:4222", String::as_str);
    let arg = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (rate, secs, subs, bytes) = (arg(1, 5000), arg(2, 5), arg(3, 1), arg(4, 200));
    let base = Instant::now();
    let subject = "bench.hop.up";
    let mut receivers = Vec::new();
    for _ in 0..subs {
        let client = async_nats::connect(url).await?;
        let mut sub = client.subscribe(subject).await?;
        client.flush().await?;
        receivers.push(tokio::spawn(async move {
            let _client = client;
            let mut hist = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
                let sent = u64::from_le_bytes(m.payload[..8].try_into().expect("8 bytes"));
                hist.record(base.elapsed().as_micros() as u64 - sent).ok();
            }
            hist
        }));
    }
    let up = async_nats::connect(url).await?;
    let mut payload = vec![b'x'; bytes.max(8) as usize];
    let start = Instant::now();
    let mut published = 0u64;
    // Same pacing as lorabroker-load's upstream: publish what is due, flush, sleep 1 ms.
    while start.elapsed() < Duration::from_secs(secs) {
        let due = (rate as f64 * start.elapsed().as_secs_f64()) as u64;
        while published < due {
            let t = base.elapsed().as_micros() as u64;
            payload[..8].copy_from_slice(&t.to_le_bytes());
            up.publish(subject, payload.clone().into()).await?;
            published += 1;
        }
        up.flush().await?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut all = hdrhistogram::Histogram::<u64>::new(3)?;
    for r in receivers {
        all.add(r.await?)?;
    }
    println!(
        r#"{{"published":{published},"delivered":{},"p50":{},"p90":{},"p99":{},"p999":{},"max":{}}}"#,
        all.len(),
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.9),
        all.value_at_quantile(0.99),
        all.value_at_quantile(0.999),
        all.max()
    );
    Ok(())
}
