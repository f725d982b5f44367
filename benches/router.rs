//! Fan-out (`src/router.rs`): one bus message of one application delivered to its local
//! subscribers, while other applications' clients are connected to the same node; and what
//! one subscription costs.
//!
//! `router/dispatch/*` measures the router alone (match, encode once, push to every
//! matching outbox) through [`Router::dispatch`]; `router/bus/*` goes through the embedded
//! bus and the application's delivery task, as traffic does in `lorabroker dev`.
//! `router/subscribe/*` and `router/unsubscribe/*` time granting one filter
//! ([`Filter::grant`] and [`Router::subscribe`], what a SUBSCRIBE costs per filter) and
//! removing it ([`Router::unsubscribe`]) next to N existing filters: of the same connection
//! (`connection/N`), of N other connections on N devices (`app_devices/N`), and of N other
//! connections on the same device (`app_same_device/N`). Issue 9 wants these flat in N.
//!
//! `cargo bench --bench router` (`-- router/subscribe` for one group)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lorabroker::bus::{Bus, BusMessage, EmbeddedBus};
use lorabroker::metrics::Metrics;
use lorabroker::mqtt::outbox::Outbox;
use lorabroker::router::Router;
use lorabroker::topic::{AppRef, Filter, Id, Tenancy};

/// No filter limit: the benches set up more filters than a connection may have.
const NO_LIMIT: usize = usize::MAX;
use tokio::runtime::Runtime;

/// Messages dispatched between two drains of the outboxes.
const CHUNK: u64 = 128;
/// Clients of other applications on the node: 10 applications of 100 `#` subscribers.
const OTHER_APPS: usize = 10;
const OTHER_CLIENTS: usize = 100;

fn app(name: &str) -> AppRef {
    AppRef::new(Id::parse("tenant1").unwrap(), Id::parse(name).unwrap())
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A node with other applications' subscribers and `filters.len()` subscribers of `app1`,
/// the i-th with filter `filters[i]`.
struct Node {
    bus: Arc<EmbeddedBus>,
    router: Router,
    outboxes: Vec<Arc<Outbox>>,
    app: AppRef,
}

impl Node {
    fn new(rt: &Runtime, filters: &[String]) -> Self {
        let bus = Arc::new(EmbeddedBus::new());
        let router = Router::new(bus.clone(), Tenancy::Multi, Arc::new(Metrics::default()));
        let mut next_id = 0;
        let mut outboxes = Vec::new();
        let mut join = |app: &AppRef, filter: &str, keep: bool| {
            let outbox = Arc::new(Outbox::new(16 << 20));
            let filter = Filter::rewrite(&Tenancy::Multi, app, filter).unwrap();
            rt.block_on(router.subscribe(app, next_id, &outbox, &filter, NO_LIMIT))
                .unwrap();
            next_id += 1;
            if keep {
                outboxes.push(outbox);
            }
        };
        for a in 0..OTHER_APPS {
            let other = app(&format!("other{a}"));
            for _ in 0..OTHER_CLIENTS {
                join(&other, "#", false);
            }
        }
        let target = app("app1");
        for f in filters {
            join(&target, f, true);
        }
        Node {
            bus,
            router,
            outboxes,
            app: target,
        }
    }

    fn drain(&self) -> usize {
        let mut out = Vec::with_capacity(CHUNK as usize);
        let mut n = 0;
        for o in &self.outboxes {
            o.take(&mut out);
            n += out.len();
            out.clear();
        }
        n
    }
}

fn message(device: &str) -> BusMessage {
    BusMessage {
        subject: format!("v3.tenant1.app1.devices.{device}.up"),
        payload: Bytes::from(vec![b'x'; 200]),
    }
}

/// Times `iters` dispatches of `msg` and nothing else (draining the outboxes is not timed).
fn time_dispatch(node: &Node, msg: &BusMessage, expect: u64, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(CHUNK);
        let start = Instant::now();
        for _ in 0..n {
            let delivered = node.router.dispatch(&node.app, msg);
            debug_assert_eq!(delivered, expect);
        }
        total += start.elapsed();
        assert_eq!(node.drain() as u64, n * expect);
        left -= n;
    }
    total
}

fn bench_dispatch(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("router/dispatch");
    // Every subscriber wants everything (`#`): one encode, N pushes.
    for n in [1usize, 10, 100, 1000] {
        let node = Node::new(&rt, &vec!["#".to_owned(); n]);
        let msg = message("dev1");
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("fanout_all/{n}"), |b| {
            b.iter_custom(|iters| time_dispatch(&node, &msg, n as u64, iters))
        });
    }
    // One subscriber per device: a message reaches exactly one of them.
    for n in [100usize, 1000, 10_000] {
        let filters: Vec<String> = (0..n).map(|i| format!("v3/+/devices/dev{i}/#")).collect();
        let node = Node::new(&rt, &filters);
        let msg = message(&format!("dev{}", n / 2));
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("per_device/{n}"), |b| {
            b.iter_custom(|iters| time_dispatch(&node, &msg, 1, iters))
        });
    }
    // Per-device subscribers plus a few dashboards watching every device's uplinks.
    let mut filters: Vec<String> = (0..1000)
        .map(|i| format!("v3/app1@tenant1/devices/dev{i}/up"))
        .collect();
    filters.extend((0..10).map(|_| "v3/+/devices/+/up".to_owned()));
    let node = Node::new(&rt, &filters);
    let msg = message("dev500");
    g.throughput(Throughput::Elements(11));
    g.bench_function("per_device_plus_10_wildcards/1000", |b| {
        b.iter_custom(|iters| time_dispatch(&node, &msg, 11, iters))
    });
    g.finish();
}

fn bench_bus(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("router/bus");
    for n in [10usize, 1000] {
        let node = Node::new(&rt, &vec!["#".to_owned(); n]);
        let msg = message("dev1");
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("fanout_all/{n}"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (node, msg) = (&node, &msg);
                async move {
                    let probe = &node.outboxes[0];
                    let mut got = Vec::new();
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let k = left.min(CHUNK);
                        let start = Instant::now();
                        for _ in 0..k {
                            node.bus
                                .publish(msg.subject.clone(), msg.payload.clone())
                                .await
                                .unwrap();
                        }
                        // The delivery task runs on this thread: when the probe has the
                        // last message, every subscriber has it.
                        while (got.len() as u64) < k {
                            probe.ready().await;
                            probe.take(&mut got);
                        }
                        total += start.elapsed();
                        got.clear();
                        node.drain();
                        left -= k;
                    }
                    total
                }
            })
        });
    }
    g.finish();
}

/// Where the N existing filters are.
#[derive(Clone, Copy)]
enum Existing {
    /// N per-device filters of the measured connection.
    Connection,
    /// One per-device filter on each of N other connections, N devices.
    AppDevices,
    /// The same device's filter on N other connections.
    AppSameDevice,
}

/// The connection that holds the N filters of [`Existing::Connection`].
const CROWDED: u64 = u64::MAX;

impl Existing {
    const ALL: [Existing; 3] = [
        Existing::Connection,
        Existing::AppDevices,
        Existing::AppSameDevice,
    ];

    fn name(self) -> &'static str {
        match self {
            Existing::Connection => "connection",
            Existing::AppDevices => "app_devices",
            Existing::AppSameDevice => "app_same_device",
        }
    }

    /// The i-th existing filter: its connection and text.
    fn existing(self, i: usize) -> (u64, String) {
        match self {
            Existing::Connection => (CROWDED, format!("v3/+/devices/dev-{i}/up")),
            Existing::AppDevices => (i as u64, format!("v3/+/devices/dev-{i}/up")),
            Existing::AppSameDevice => (i as u64, "v3/+/devices/dev-shared/up".to_owned()),
        }
    }

    /// The i-th measured filter: another filter of the crowded connection, or a new
    /// connection's filter of a new device or of the shared one.
    fn measured(self, i: usize) -> (u64, String) {
        let newcomer = CROWDED - 1 - i as u64;
        match self {
            Existing::Connection => (CROWDED, format!("v3/+/devices/dev-new-{i}/up")),
            Existing::AppDevices => (newcomer, format!("v3/+/devices/dev-new-{i}/up")),
            Existing::AppSameDevice => (newcomer, "v3/+/devices/dev-shared/up".to_owned()),
        }
    }
}

/// A router whose `app1` holds `n` filters placed as `existing` says.
fn subscribed(rt: &Runtime, existing: Existing, n: usize) -> (Router, Arc<Outbox>) {
    let bus = Arc::new(EmbeddedBus::new());
    let router = Router::new(bus, Tenancy::Multi, Arc::new(Metrics::default()));
    let a = app("app1");
    let outbox = Arc::new(Outbox::new(1 << 20));
    rt.block_on(async {
        // Keeps the application's state (and delivery task) alive across the measurements.
        let keep = std::iter::once((0, "v3/+/devices/dev-keep/up".to_owned()));
        for (id, f) in keep.chain((0..n).map(|i| existing.existing(i))) {
            let filter = Filter::rewrite(&Tenancy::Multi, &a, &f).unwrap();
            router
                .subscribe(&a, id, &outbox, &filter, NO_LIMIT)
                .await
                .unwrap();
        }
    });
    (router, outbox)
}

/// Adds the first `k` measured filters; timed when `timed`.
async fn add_measured(
    router: &Router,
    outbox: &Arc<Outbox>,
    existing: Existing,
    k: usize,
) -> Duration {
    let a = app("app1");
    let measured: Vec<(u64, String)> = (0..k).map(|i| existing.measured(i)).collect();
    let start = Instant::now();
    for (id, f) in &measured {
        // What a SUBSCRIBE costs per filter: the grant checks, then the router.
        let filter = Filter::grant(&Tenancy::Multi, &a, f, 256).unwrap();
        router
            .subscribe(&a, *id, outbox, &filter, NO_LIMIT)
            .await
            .unwrap();
    }
    start.elapsed()
}

/// Removes the first `k` measured filters; returns the time it took.
fn remove_measured(router: &Router, existing: Existing, k: usize) -> Duration {
    let a = app("app1");
    let measured: Vec<(u64, String)> = (0..k).map(|i| existing.measured(i)).collect();
    let start = Instant::now();
    for (id, f) in &measured {
        router.unsubscribe(&a, *id, f);
    }
    start.elapsed()
}

fn bench_subscribe(c: &mut Criterion) {
    let rt = runtime();
    for (group, timing_add) in [("router/subscribe", true), ("router/unsubscribe", false)] {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(1));
        for existing in Existing::ALL {
            for n in [10usize, 100, 1000, 10_000] {
                let (router, outbox) = subscribed(&rt, existing, n);
                g.bench_function(format!("{}/{n}", existing.name()), |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        let mut left = iters;
                        while left > 0 {
                            let k = left.min(CHUNK) as usize;
                            let added = rt.block_on(add_measured(&router, &outbox, existing, k));
                            let removed = remove_measured(&router, existing, k);
                            total += if timing_add { added } else { removed };
                            left -= k as u64;
                        }
                        total
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = common::config(Duration::from_secs(2), 20);
    targets = bench_dispatch, bench_bus
}
criterion_group! {
    name = subscriptions;
    config = common::config(Duration::from_secs(1), 20);
    targets = bench_subscribe
}
criterion_main!(benches, subscriptions);
