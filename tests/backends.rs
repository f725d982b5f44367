//! One behavioural suite for the backends behind [`KeyStore`], [`DownlinkQueue`] (with its
//! limits, quotas and idle expiry), [`DeviceRegistry`] and [`Bus`], run against the embedded implementations (memory, in-process bus) and the
//! clustered ones (Redis, NATS) so that they cannot drift apart; then the Redis and NATS
//! failure tests, which really stop and restart the server process.
//!
//! Every test uses its own tenant, Redis key prefix and subjects ([`unique`]), so the
//! suite also runs against shared servers given by `LORABROKER_TEST_REDIS_URL` /
//! `LORABROKER_TEST_NATS_URL` (except the failure tests, which need servers of their own).

mod common;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::services::{unique, NatsService, RedisService};
use common::wait::eventually;
use lorabroker::auth::redis::RedisKeyStore;
use lorabroker::auth::{generate, KeyStore, MemoryKeyStore, Rights, StoreError, StoredKey};
use lorabroker::bus::{Bus, BusError, BusMessage, EmbeddedBus, NatsBus, Subscription};
use lorabroker::devices::redis::RedisDeviceRegistry;
use lorabroker::devices::{DeviceRegistry, MemoryDeviceRegistry};
use lorabroker::downlink::redis::RedisDownlinkQueue;
use lorabroker::downlink::{
    DownlinkQueue, MemoryDownlinkQueue, QueueError, QueueLimits, QueueUsage,
};
use lorabroker::topic::{AppRef, DeviceRef, Id};

/// Per-device capacity of the queues under test.
const CAP: usize = 5;
/// The limits of the quota suite: small byte bounds, no expiry within a test.
const QUOTAS: QueueLimits = QueueLimits {
    capacity: 1000,
    device_bytes: 200,
    application_bytes: 500,
    tenant_bytes: 800,
    idle_expiry: Duration::from_secs(3600),
};
/// The limits of the expiry suite: queues idle for a second expire.
const EXPIRING: QueueLimits = QueueLimits {
    idle_expiry: Duration::from_secs(1),
    ..QUOTAS
};
/// How long a test waits for something that should happen at once.
const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits for a backend to come back after a restart.
const RECOVERY: Duration = Duration::from_secs(15);
/// What "fails fast" means here: a generous bound that only catches hangs.
const FAST: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Instantiation: every suite function runs once per backend.

/// `mod $backend { #[tokio::test] fn $test() { super::$test(super::$factory().await.0) } }`
macro_rules! instantiate {
    ($backend:ident, $factory:ident, [$($test:ident),+ $(,)?]) => {
        mod $backend {
            $(
                #[tokio::test]
                async fn $test() {
                    // The second element keeps the backing server alive for the test.
                    let (backend, _server) = super::$factory().await;
                    super::$test(backend).await;
                }
            )+
        }
    };
}

/// Runs the listed suite functions against each `module => factory`.
macro_rules! suite {
    ($tests:tt for $($backend:ident => $factory:ident),+ $(,)?) => {
        $( instantiate!($backend, $factory, $tests); )+
    };
}

suite!(
    [
        key_insert_get_remove,
        key_reinsert_replaces_record,
        key_list_in_creation_order,
        key_list_isolates_tenants_and_apps,
    ] for
    keys_memory => memory_keys,
    keys_redis => redis_keys,
);

suite!(
    [
        queue_fifo_push_pop_list,
        queue_push_over_capacity_stores_nothing,
        queue_replace_replaces_and_is_capped,
        queue_concurrent_pushes_never_exceed_capacity,
        queue_is_per_tenant_app_and_device,
        queue_items_pass_unchanged,
        queue_usage_counts_bytes_and_pop_gives_them_back,
    ] for
    queue_memory => memory_queue,
    queue_redis => redis_queue,
);

suite!(
    [
        quota_device_bytes_are_capped,
        quota_application_and_tenant_bytes_are_capped,
        quota_replace_counts_what_it_replaces,
        quota_concurrent_pushes_never_exceed_the_quotas,
    ] for
    quota_memory => memory_quota_queue,
    quota_redis => redis_quota_queue,
);

suite!(
    [expiry_idle_queues_expire_and_leave_the_quotas] for
    expiry_memory => memory_expiring_queue,
    expiry_redis => redis_expiring_queue,
);

suite!(
    [
        registry_add_contains_remove,
        registry_list_is_sorted_and_per_application,
    ] for
    registry_memory => memory_registry,
    registry_redis => redis_registry,
);

suite!(
    [
        bus_filters_match_like_nats,
        bus_rejects_invalid_subjects,
        bus_dropped_subscription_stops_delivery,
        bus_many_messages_arrive_in_order,
        bus_is_ready,
    ] for
    bus_embedded => embedded_bus,
    bus_nats => nats_bus,
);

async fn memory_keys() -> (Arc<dyn KeyStore>, Option<RedisService>) {
    (Arc::new(MemoryKeyStore::new()), None)
}

async fn redis_keys() -> (Arc<dyn KeyStore>, Option<RedisService>) {
    let redis = RedisService::start().await;
    let store = RedisKeyStore::connect(&redis.url, &unique("lbtest"))
        .await
        .expect("a parsable URL");
    (Arc::new(store), Some(redis))
}

async fn memory_queue() -> (Arc<dyn DownlinkQueue>, Option<RedisService>) {
    (Arc::new(MemoryDownlinkQueue::new(CAP)), None)
}

async fn redis_queue() -> (Arc<dyn DownlinkQueue>, Option<RedisService>) {
    let redis = RedisService::start().await;
    let queue = RedisDownlinkQueue::connect(&redis.url, &unique("lbtest"), CAP)
        .await
        .expect("a parsable URL");
    (Arc::new(queue), Some(redis))
}

async fn memory_quota_queue() -> (Arc<dyn DownlinkQueue>, Option<RedisService>) {
    (Arc::new(MemoryDownlinkQueue::with_limits(QUOTAS)), None)
}

async fn redis_quota_queue() -> (Arc<dyn DownlinkQueue>, Option<RedisService>) {
    redis_queue_with(QUOTAS).await
}

async fn memory_expiring_queue() -> (Arc<dyn DownlinkQueue>, Option<RedisService>) {
    (Arc::new(MemoryDownlinkQueue::with_limits(EXPIRING)), None)
}

async fn redis_expiring_queue() -> (Arc<dyn DownlinkQueue>, Option<RedisService>) {
    redis_queue_with(EXPIRING).await
}

async fn redis_queue_with(limits: QueueLimits) -> (Arc<dyn DownlinkQueue>, Option<RedisService>) {
    let redis = RedisService::start().await;
    let queue = RedisDownlinkQueue::connect_with(&redis.url, &unique("lbtest"), limits)
        .await
        .expect("a parsable URL");
    (Arc::new(queue), Some(redis))
}

async fn memory_registry() -> (Arc<dyn DeviceRegistry>, Option<RedisService>) {
    (Arc::new(MemoryDeviceRegistry::new()), None)
}

async fn redis_registry() -> (Arc<dyn DeviceRegistry>, Option<RedisService>) {
    let redis = RedisService::start().await;
    let registry = RedisDeviceRegistry::connect(&redis.url, &unique("lbtest"))
        .await
        .expect("a parsable URL");
    (Arc::new(registry), Some(redis))
}

async fn embedded_bus() -> (Arc<dyn Bus>, Option<NatsService>) {
    (Arc::new(EmbeddedBus::new()), None)
}

async fn nats_bus() -> (Arc<dyn Bus>, Option<NatsService>) {
    let nats = NatsService::start().await;
    let bus = NatsBus::connect(&nats.url, &unique("test-node"))
        .await
        .expect("a parsable URL");
    eventually("NATS bus ready", WAIT, || async {
        bus.is_ready().then_some(()).ok_or("not ready")
    })
    .await;
    (Arc::new(bus), Some(nats))
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn id(s: &str) -> Id {
    Id::parse(s).expect("a valid ID")
}

/// An application of a tenant of its own.
fn fresh_app() -> AppRef {
    AppRef::new(id(&unique("tenant")), id("app-1"))
}

fn device(app: &AppRef, dev: &str) -> DeviceRef {
    DeviceRef::new(app.clone(), id(dev))
}

fn key(app: &AppRef, created_at: u64) -> StoredKey {
    let mut k = StoredKey::new(&generate(), app, Rights::DEFAULT, "test key", None);
    k.created_at = created_at;
    k
}

fn items(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|x| (*x).to_owned()).collect()
}

/// The next message, or a panic naming what was awaited.
async fn recv(sub: &mut Subscription, what: &str) -> BusMessage {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(m)) => m,
        Ok(None) => panic!("{what}: subscription ended"),
        Err(_) => panic!("{what}: nothing within {WAIT:?}"),
    }
}

/// Payloads received up to and including `last`.
async fn payloads_until(sub: &mut Subscription, last: &str, what: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let m = recv(sub, what).await;
        let p = String::from_utf8_lossy(&m.payload).into_owned();
        got.push(p.clone());
        if p == last {
            return got;
        }
    }
}

/// Runs `op` and checks that it fails within [`FAST`].
async fn fails_fast<T: Debug, E: Debug>(what: &str, op: impl Future<Output = Result<T, E>>) -> E {
    let started = Instant::now();
    let result = op.await;
    let took = started.elapsed();
    assert!(took < FAST, "{what} took {took:?} to fail");
    match result {
        Ok(v) => panic!("{what} succeeded with {v:?} while the backend is down"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------------------------------
// Key store suite.

async fn key_insert_get_remove(store: Arc<dyn KeyStore>) {
    let app = fresh_app();
    let k = key(&app, 100);
    store.insert(&k).await.unwrap();
    assert_eq!(store.get(&k.id).await.unwrap(), Some(k.clone()));
    assert_eq!(store.get(&generate().id).await.unwrap(), None);
    assert_eq!(store.list(&app).await.unwrap(), vec![k.clone()]);

    assert_eq!(store.remove(&k.id).await.unwrap(), Some(k.clone()));
    assert_eq!(store.get(&k.id).await.unwrap(), None);
    assert_eq!(store.list(&app).await.unwrap(), vec![]);
    assert_eq!(store.remove(&k.id).await.unwrap(), None);
    store.ping().await.unwrap();
}

async fn key_reinsert_replaces_record(store: Arc<dyn KeyStore>) {
    let app = fresh_app();
    let mut k = key(&app, 100);
    store.insert(&k).await.unwrap();
    k.name = "renamed".into();
    k.expires_at = Some(4_000_000_000);
    store.insert(&k).await.unwrap();
    assert_eq!(store.get(&k.id).await.unwrap(), Some(k.clone()));
    assert_eq!(store.list(&app).await.unwrap(), vec![k]);
}

async fn key_list_in_creation_order(store: Arc<dyn KeyStore>) {
    let app = fresh_app();
    let late = key(&app, 300);
    let early = key(&app, 100);
    let (mut tie_a, mut tie_b) = (key(&app, 200), key(&app, 200));
    if tie_a.id > tie_b.id {
        std::mem::swap(&mut tie_a, &mut tie_b);
    }
    for k in [&late, &tie_b, &early, &tie_a] {
        store.insert(k).await.unwrap();
    }
    assert_eq!(
        store.list(&app).await.unwrap(),
        vec![early, tie_a, tie_b, late],
        "sorted by (created_at, id)"
    );
}

async fn key_list_isolates_tenants_and_apps(store: Arc<dyn KeyStore>) {
    let one = fresh_app();
    let two = AppRef::new(id(&unique("tenant")), one.app.clone());
    let sibling = AppRef::new(one.tenant.clone(), id("app-2"));
    let k1 = key(&one, 1);
    let k2 = key(&two, 2);
    let k3 = key(&sibling, 3);
    for k in [&k1, &k2, &k3] {
        store.insert(k).await.unwrap();
    }
    assert_eq!(store.list(&one).await.unwrap(), vec![k1.clone()]);
    assert_eq!(store.list(&two).await.unwrap(), vec![k2.clone()]);
    assert_eq!(store.list(&sibling).await.unwrap(), vec![k3.clone()]);

    assert_eq!(store.remove(&k1.id).await.unwrap(), Some(k1));
    assert_eq!(store.list(&one).await.unwrap(), vec![]);
    assert_eq!(store.list(&two).await.unwrap(), vec![k2]);
    assert_eq!(store.list(&sibling).await.unwrap(), vec![k3]);
}

// ---------------------------------------------------------------------------------------
// Downlink queue suite (capacity CAP = 5).

async fn queue_fifo_push_pop_list(queue: Arc<dyn DownlinkQueue>) {
    let dev = device(&fresh_app(), "dev-1");
    assert_eq!(queue.list(&dev).await.unwrap(), Vec::<String>::new());
    assert_eq!(queue.pop(&dev).await.unwrap(), None);
    assert_eq!(queue.push(&dev, &items(&["a", "b"])).await.unwrap(), 2);
    assert_eq!(queue.push(&dev, &items(&["c"])).await.unwrap(), 3);
    assert_eq!(
        queue.push(&dev, &[]).await.unwrap(),
        3,
        "an empty push adds nothing"
    );
    assert_eq!(queue.list(&dev).await.unwrap(), items(&["a", "b", "c"]));
    assert_eq!(queue.pop(&dev).await.unwrap().as_deref(), Some("a"));
    assert_eq!(queue.pop(&dev).await.unwrap().as_deref(), Some("b"));
    assert_eq!(queue.list(&dev).await.unwrap(), items(&["c"]));
    assert_eq!(queue.push(&dev, &items(&["d"])).await.unwrap(), 2);
    assert_eq!(queue.pop(&dev).await.unwrap().as_deref(), Some("c"));
    assert_eq!(queue.pop(&dev).await.unwrap().as_deref(), Some("d"));
    assert_eq!(queue.pop(&dev).await.unwrap(), None);
    assert_eq!(queue.list(&dev).await.unwrap(), Vec::<String>::new());
    queue.ping().await.unwrap();
}

async fn queue_push_over_capacity_stores_nothing(queue: Arc<dyn DownlinkQueue>) {
    let dev = device(&fresh_app(), "dev-1");
    assert_eq!(queue.push(&dev, &items(&["a", "b", "c"])).await.unwrap(), 3);
    assert_eq!(
        queue.push(&dev, &items(&["d", "e", "f"])).await,
        Err(QueueError::Full {
            queued: 3,
            adding: 3,
            capacity: CAP
        })
    );
    assert_eq!(queue.list(&dev).await.unwrap(), items(&["a", "b", "c"]));
    assert_eq!(queue.push(&dev, &items(&["d", "e"])).await.unwrap(), CAP);
    assert_eq!(
        queue.push(&dev, &items(&["f"])).await,
        Err(QueueError::Full {
            queued: CAP,
            adding: 1,
            capacity: CAP
        })
    );
    let empty = device(&fresh_app(), "dev-2");
    let too_many = items(&["1", "2", "3", "4", "5", "6"]);
    assert_eq!(
        queue.push(&empty, &too_many).await,
        Err(QueueError::Full {
            queued: 0,
            adding: 6,
            capacity: CAP
        })
    );
    assert_eq!(queue.list(&empty).await.unwrap(), Vec::<String>::new());
    assert_eq!(
        queue.list(&dev).await.unwrap(),
        items(&["a", "b", "c", "d", "e"])
    );
}

async fn queue_replace_replaces_and_is_capped(queue: Arc<dyn DownlinkQueue>) {
    let dev = device(&fresh_app(), "dev-1");
    queue.push(&dev, &items(&["a", "b"])).await.unwrap();
    assert_eq!(
        queue.replace(&dev, &items(&["x", "y", "z"])).await.unwrap(),
        3
    );
    assert_eq!(queue.list(&dev).await.unwrap(), items(&["x", "y", "z"]));
    assert_eq!(
        queue
            .replace(&dev, &items(&["1", "2", "3", "4", "5", "6"]))
            .await,
        Err(QueueError::Full {
            queued: 0,
            adding: 6,
            capacity: CAP
        })
    );
    assert_eq!(
        queue.list(&dev).await.unwrap(),
        items(&["x", "y", "z"]),
        "a replace over the cap changes nothing"
    );
    let full = items(&["1", "2", "3", "4", "5"]);
    assert_eq!(queue.replace(&dev, &full).await.unwrap(), CAP);
    assert_eq!(queue.list(&dev).await.unwrap(), full);
    assert_eq!(queue.replace(&dev, &[]).await.unwrap(), 0);
    assert_eq!(queue.list(&dev).await.unwrap(), Vec::<String>::new());
    assert_eq!(queue.pop(&dev).await.unwrap(), None);
    assert_eq!(queue.push(&dev, &items(&["after"])).await.unwrap(), 1);
}

async fn queue_concurrent_pushes_never_exceed_capacity(queue: Arc<dyn DownlinkQueue>) {
    let dev = device(&fresh_app(), "dev-1");
    let pushes = (0..10).map(|i| {
        let (queue, dev) = (queue.clone(), dev.clone());
        tokio::spawn(async move {
            let batch = vec![format!("{i}-first"), format!("{i}-second")];
            queue.push(&dev, &batch).await
        })
    });
    let results = futures::future::join_all(pushes).await;
    let stored = results
        .into_iter()
        .map(|r| r.expect("push task"))
        .filter(|r| match r {
            Ok(_) => true,
            Err(QueueError::Full { .. }) => false,
            Err(e) => panic!("unexpected {e}"),
        })
        .count();
    assert_eq!(stored, 2, "two batches of two fit in {CAP}");
    let list = queue.list(&dev).await.unwrap();
    assert_eq!(list.len(), 4);
    for pair in list.chunks(2) {
        let batch = pair[0].strip_suffix("-first").expect("batch order kept");
        assert_eq!(pair[1], format!("{batch}-second"), "a batch is never split");
    }
}

async fn queue_is_per_tenant_app_and_device(queue: Arc<dyn DownlinkQueue>) {
    let one = fresh_app();
    let two = AppRef::new(id(&unique("tenant")), one.app.clone());
    let sibling = AppRef::new(one.tenant.clone(), id("app-2"));
    let a = device(&one, "dev-1");
    let b = device(&two, "dev-1");
    let c = device(&sibling, "dev-1");
    let d = device(&one, "dev-2");
    queue.push(&a, &items(&["a1", "a2"])).await.unwrap();
    queue.push(&b, &items(&["b1"])).await.unwrap();
    queue.push(&c, &items(&["c1"])).await.unwrap();
    queue.push(&d, &items(&["d1"])).await.unwrap();
    // Each has its own capacity too: `a` can take three more, whatever the others hold.
    assert_eq!(
        queue.push(&a, &items(&["a3", "a4", "a5"])).await.unwrap(),
        5
    );
    assert_eq!(queue.list(&b).await.unwrap(), items(&["b1"]));
    assert_eq!(queue.pop(&b).await.unwrap().as_deref(), Some("b1"));
    assert_eq!(queue.replace(&c, &[]).await.unwrap(), 0);
    assert_eq!(
        queue.list(&a).await.unwrap(),
        items(&["a1", "a2", "a3", "a4", "a5"])
    );
    assert_eq!(queue.list(&b).await.unwrap(), Vec::<String>::new());
    assert_eq!(queue.list(&c).await.unwrap(), Vec::<String>::new());
    assert_eq!(queue.list(&d).await.unwrap(), items(&["d1"]));
}

async fn queue_items_pass_unchanged(queue: Arc<dyn DownlinkQueue>) {
    let dev = device(&fresh_app(), "dev-1");
    let odd = items(&[
        r#"{"f_port":1,"frm_payload":"AQI=","correlation_ids":["as:downlink:01H"]}"#,
        "",
        "line\nbreak\r\n\t\"quoted\" ☃ \u{0}",
        "1",
    ]);
    queue.push(&dev, &odd).await.unwrap();
    assert_eq!(queue.list(&dev).await.unwrap(), odd);
    queue.replace(&dev, &odd[1..]).await.unwrap();
    assert_eq!(queue.pop(&dev).await.unwrap().as_deref(), Some(""));
    assert_eq!(queue.list(&dev).await.unwrap(), odd[2..].to_vec());
}

async fn queue_usage_counts_bytes_and_pop_gives_them_back(queue: Arc<dyn DownlinkQueue>) {
    let app = fresh_app();
    let (a, b) = (device(&app, "dev-1"), device(&app, "dev-2"));
    let other = device(&AppRef::new(app.tenant.clone(), id("app-2")), "dev-1");
    assert_eq!(queue.usage(&a).await.unwrap(), QueueUsage::default());
    queue.push(&a, &items(&["aaa", "bb"])).await.unwrap();
    queue.push(&b, &items(&["c"])).await.unwrap();
    queue.push(&other, &items(&["dddd"])).await.unwrap();
    let usage = |items, device_bytes, application_bytes, tenant_bytes| QueueUsage {
        items,
        device_bytes,
        application_bytes,
        tenant_bytes,
    };
    assert_eq!(queue.usage(&a).await.unwrap(), usage(2, 5, 6, 10));
    assert_eq!(queue.usage(&other).await.unwrap(), usage(1, 4, 4, 10));
    // Take next downlink: the item's bytes leave every counter at once.
    assert_eq!(queue.pop(&a).await.unwrap().as_deref(), Some("aaa"));
    assert_eq!(queue.usage(&a).await.unwrap(), usage(1, 2, 3, 7));
    queue.replace(&b, &items(&["12345"])).await.unwrap();
    assert_eq!(queue.usage(&b).await.unwrap(), usage(1, 5, 7, 11));
    queue.replace(&b, &[]).await.unwrap();
    assert_eq!(queue.pop(&a).await.unwrap().as_deref(), Some("bb"));
    assert_eq!(queue.pop(&a).await.unwrap(), None);
    assert_eq!(queue.usage(&a).await.unwrap(), usage(0, 0, 0, 4));
    // Another tenant's counters are its own.
    let stranger = device(&fresh_app(), "dev-1");
    assert_eq!(queue.usage(&stranger).await.unwrap(), QueueUsage::default());
}

// ---------------------------------------------------------------------------------------
// Quota suite (QUOTAS: 200 bytes per device, 500 per application, 800 per tenant).

/// `n` items of `len` bytes each.
fn sized(n: usize, len: usize) -> Vec<String> {
    (0..n).map(|i| format!("{i:0len$}")).collect()
}

async fn quota_device_bytes_are_capped(queue: Arc<dyn DownlinkQueue>) {
    let dev = device(&fresh_app(), "dev-1");
    assert_eq!(queue.push(&dev, &sized(3, 50)).await.unwrap(), 3);
    assert_eq!(
        queue.push(&dev, &sized(2, 30)).await,
        Err(QueueError::DeviceBytes {
            queued: 150,
            adding: 60,
            limit: 200
        })
    );
    assert_eq!(queue.list(&dev).await.unwrap().len(), 3, "nothing stored");
    assert_eq!(
        queue.push(&dev, &sized(1, 50)).await.unwrap(),
        4,
        "exactly full"
    );
    assert!(matches!(
        queue.push(&dev, &sized(1, 1)).await,
        Err(QueueError::DeviceBytes { .. })
    ));
    // A replace is checked alone (the old items go).
    assert_eq!(
        queue.replace(&dev, &sized(1, 201)).await,
        Err(QueueError::DeviceBytes {
            queued: 0,
            adding: 201,
            limit: 200
        })
    );
    assert_eq!(queue.replace(&dev, &sized(1, 200)).await.unwrap(), 1);
    assert_eq!(queue.usage(&dev).await.unwrap().device_bytes, 200);
}

async fn quota_application_and_tenant_bytes_are_capped(queue: Arc<dyn DownlinkQueue>) {
    let app = fresh_app();
    let devs: Vec<DeviceRef> = (1..=3).map(|i| device(&app, &format!("dev-{i}"))).collect();
    for d in &devs[..2] {
        queue.push(d, &sized(1, 200)).await.unwrap();
    }
    assert_eq!(
        queue.push(&devs[2], &sized(1, 101)).await,
        Err(QueueError::ApplicationQuota {
            queued: 400,
            adding: 101,
            limit: 500
        })
    );
    assert!(queue.list(&devs[2]).await.unwrap().is_empty());
    queue.push(&devs[2], &sized(1, 100)).await.unwrap();
    // Taking a downlink makes room again.
    queue.pop(&devs[0]).await.unwrap();
    queue.push(&devs[2], &sized(1, 100)).await.unwrap();
    // The tenant: 400 more in a sibling application fit, then it is full.
    let sibling = AppRef::new(app.tenant.clone(), id("app-2"));
    let s: Vec<DeviceRef> = (1..=3)
        .map(|i| device(&sibling, &format!("dev-{i}")))
        .collect();
    queue.push(&s[0], &sized(1, 200)).await.unwrap();
    queue.push(&s[1], &sized(1, 200)).await.unwrap();
    assert_eq!(
        queue.push(&s[2], &sized(1, 1)).await,
        Err(QueueError::TenantQuota {
            queued: 800,
            adding: 1,
            limit: 800
        })
    );
    // Another tenant is not affected.
    let elsewhere = device(&fresh_app(), "dev-1");
    queue.push(&elsewhere, &sized(1, 200)).await.unwrap();
    assert_eq!(queue.usage(&elsewhere).await.unwrap().tenant_bytes, 200);
}

async fn quota_replace_counts_what_it_replaces(queue: Arc<dyn DownlinkQueue>) {
    let app = fresh_app();
    let (a, b, c) = (
        device(&app, "dev-1"),
        device(&app, "dev-2"),
        device(&app, "dev-3"),
    );
    queue.push(&a, &sized(1, 200)).await.unwrap();
    queue.push(&b, &sized(1, 200)).await.unwrap();
    queue.push(&c, &sized(1, 100)).await.unwrap();
    // The application is full, but a replace gives back what it replaces.
    assert_eq!(queue.replace(&c, &sized(2, 50)).await.unwrap(), 2);
    assert_eq!(
        queue.replace(&c, &sized(1, 101)).await,
        Err(QueueError::ApplicationQuota {
            queued: 400,
            adding: 101,
            limit: 500
        })
    );
    assert_eq!(queue.list(&c).await.unwrap(), sized(2, 50), "unchanged");
    assert_eq!(queue.replace(&c, &[]).await.unwrap(), 0);
    assert_eq!(queue.usage(&c).await.unwrap().application_bytes, 400);
}

async fn quota_concurrent_pushes_never_exceed_the_quotas(queue: Arc<dyn DownlinkQueue>) {
    let app = fresh_app();
    let sibling = AppRef::new(app.tenant.clone(), id("app-2"));
    // 60 pushes of 30 bytes at once, to 60 devices of two applications: at most 16 fit
    // in each application (500 / 30), at most 26 in the tenant (800 / 30).
    let pushes = (0..60).map(|i| {
        let queue = queue.clone();
        let app = if i % 2 == 0 { &app } else { &sibling };
        let dev = device(app, &format!("dev-{i}"));
        tokio::spawn(async move { (dev.clone(), queue.push(&dev, &sized(1, 30)).await) })
    });
    let mut stored = Vec::new();
    for result in futures::future::join_all(pushes).await {
        let (dev, result) = result.expect("push task");
        match result {
            Ok(1) => stored.push(dev),
            Err(QueueError::ApplicationQuota { .. } | QueueError::TenantQuota { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let per_app = |a: &AppRef| stored.iter().filter(|d| d.app == *a).count() as u64;
    assert!(per_app(&app) * 30 <= 500, "{}", per_app(&app));
    assert!(per_app(&sibling) * 30 <= 500, "{}", per_app(&sibling));
    assert_eq!(stored.len(), 26, "the tenant quota is filled, not exceeded");
    // The counters are exactly the bytes queued.
    let mut listed = 0;
    for i in 0..60 {
        let a = if i % 2 == 0 { &app } else { &sibling };
        listed += queue
            .list(&device(a, &format!("dev-{i}")))
            .await
            .unwrap()
            .len();
    }
    assert_eq!(listed, 26);
    let usage = queue.usage(&device(&app, "dev-0")).await.unwrap();
    assert_eq!(usage.application_bytes, per_app(&app) * 30);
    assert_eq!(usage.tenant_bytes, 26 * 30);
}

// ---------------------------------------------------------------------------------------
// Expiry suite (EXPIRING: queues idle for one second expire).

async fn expiry_idle_queues_expire_and_leave_the_quotas(queue: Arc<dyn DownlinkQueue>) {
    let app = fresh_app();
    let (a, b, c) = (
        device(&app, "dev-1"),
        device(&app, "dev-2"),
        device(&app, "dev-3"),
    );
    queue.push(&a, &sized(2, 100)).await.unwrap();
    queue.push(&b, &sized(1, 150)).await.unwrap();
    assert_eq!(queue.usage(&a).await.unwrap().application_bytes, 350);
    // Both expire after a second idle; the counters follow (Redis: within a second more).
    eventually(
        "idle queues expired and left the quotas",
        Duration::from_secs(10),
        || async {
            let usage = queue.usage(&a).await.unwrap();
            let gone = queue.list(&b).await.unwrap().is_empty();
            if usage == QueueUsage::default() && gone {
                Ok(())
            } else {
                Err(format!("{usage:?}, dev-2 gone: {gone}"))
            }
        },
    )
    .await;
    assert_eq!(queue.pop(&a).await.unwrap(), None);
    // Nothing stays inflated: a new queue counts alone, and the full quota is usable.
    queue.push(&c, &sized(1, 200)).await.unwrap();
    queue.push(&a, &sized(1, 200)).await.unwrap();
    let usage = queue.usage(&c).await.unwrap();
    assert_eq!((usage.application_bytes, usage.tenant_bytes), (400, 400));
    queue.push(&b, &sized(1, 100)).await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Device registry suite.

async fn registry_add_contains_remove(registry: Arc<dyn DeviceRegistry>) {
    let dev = device(&fresh_app(), "dev-1");
    assert!(!registry.contains(&dev).await.unwrap());
    assert!(registry.add(&dev).await.unwrap(), "new");
    assert!(!registry.add(&dev).await.unwrap(), "already there");
    assert!(registry.contains(&dev).await.unwrap());
    assert!(registry.remove(&dev).await.unwrap());
    assert!(!registry.remove(&dev).await.unwrap());
    assert!(!registry.contains(&dev).await.unwrap());
    registry.ping().await.unwrap();
}

async fn registry_list_is_sorted_and_per_application(registry: Arc<dyn DeviceRegistry>) {
    let app = fresh_app();
    let sibling = AppRef::new(app.tenant.clone(), id("app-2"));
    let other_tenant = AppRef::new(id(&unique("tenant")), app.app.clone());
    for d in ["dev-3", "dev-1", "dev-2"] {
        registry.add(&device(&app, d)).await.unwrap();
    }
    registry.add(&device(&sibling, "dev-9")).await.unwrap();
    registry.add(&device(&other_tenant, "dev-8")).await.unwrap();
    let names = |ids: Vec<Id>| ids.iter().map(Id::to_string).collect::<Vec<_>>();
    assert_eq!(
        names(registry.list(&app).await.unwrap()),
        ["dev-1", "dev-2", "dev-3"]
    );
    assert_eq!(names(registry.list(&sibling).await.unwrap()), ["dev-9"]);
    assert_eq!(
        names(registry.list(&other_tenant).await.unwrap()),
        ["dev-8"]
    );
    assert!(!registry.contains(&device(&app, "dev-9")).await.unwrap());
    assert!(!registry
        .contains(&device(&other_tenant, "dev-1"))
        .await
        .unwrap());
    // Many devices (more than one SSCAN batch) are all listed.
    let big = fresh_app();
    for i in 0..2500 {
        registry
            .add(&device(&big, &format!("dev-{i:04}")))
            .await
            .unwrap();
    }
    let listed = registry.list(&big).await.unwrap();
    assert_eq!(listed.len(), 2500);
    assert_eq!(listed[0].as_str(), "dev-0000");
    assert_eq!(listed[2499].as_str(), "dev-2499");
}

// ---------------------------------------------------------------------------------------
// Bus suite.

async fn bus_filters_match_like_nats(bus: Arc<dyn Bus>) {
    let t = unique("tenant");
    let prefix = format!("v3.{t}.app-1.devices");
    let mut star = bus.subscribe(format!("{prefix}.*.up")).await.unwrap();
    let mut rest = bus.subscribe(format!("v3.{t}.app-1.>")).await.unwrap();
    let mut exact = bus
        .subscribe(format!("{prefix}.dev-2.up.normalized"))
        .await
        .unwrap();
    let mut other_app = bus.subscribe(format!("v3.{t}.app-2.>")).await.unwrap();
    let mut other_tenant = bus
        .subscribe(format!("v3.{}.app-1.>", unique("tenant")))
        .await
        .unwrap();
    bus.flush().await.unwrap();

    let sends = [
        (format!("{prefix}.dev-1.up"), "up"),
        (format!("{prefix}.dev-2.up.normalized"), "normalized"),
        (format!("v3.{t}.app-1"), "app-subject-itself"),
        (format!("v3.{t}.app-2.devices.dev-1.up"), "end-other-app"),
        (format!("{prefix}.dev-9.up"), "end-star"),
        (format!("{prefix}.dev-2.up.normalized"), "end-exact"),
    ];
    for (subject, payload) in &sends {
        bus.publish(subject.clone(), Bytes::from(*payload))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();

    let first = recv(&mut star, "star").await;
    assert_eq!(first.subject, format!("{prefix}.dev-1.up"));
    assert_eq!(first.payload, Bytes::from("up"));
    assert_eq!(
        payloads_until(&mut star, "end-star", "star").await,
        ["end-star"]
    );
    assert_eq!(
        payloads_until(&mut rest, "end-exact", ">").await,
        ["up", "normalized", "end-star", "end-exact"],
        "`>` needs at least one more token"
    );
    assert_eq!(
        payloads_until(&mut exact, "end-exact", "exact").await,
        ["normalized", "end-exact"]
    );
    assert_eq!(
        payloads_until(&mut other_app, "end-other-app", "other app").await,
        ["end-other-app"]
    );
    // Nothing was published for the other tenant: nothing may arrive there.
    let stray = tokio::time::timeout(Duration::from_millis(200), other_tenant.next()).await;
    assert!(stray.is_err(), "other tenant received {stray:?}");
}

async fn bus_rejects_invalid_subjects(bus: Arc<dyn Bus>) {
    for subject in ["", "v3..a", "v3.*.a", "v3.>", "v3.a b"] {
        assert!(
            matches!(
                bus.publish(subject.into(), Bytes::new()).await,
                Err(BusError::InvalidSubject(_))
            ),
            "publish to {subject:?}"
        );
    }
    for filter in ["", "v3..a", "v3.>.a", "v3.a b"] {
        assert!(
            matches!(
                bus.subscribe(filter.into()).await,
                Err(BusError::InvalidSubject(_))
            ),
            "subscribe to {filter:?}"
        );
    }
}

async fn bus_dropped_subscription_stops_delivery(bus: Arc<dyn Bus>) {
    let filter = format!("v3.{}.app-1.>", unique("tenant"));
    let subject = filter.replace('>', "devices.dev-1.up");
    let mut dropped = bus.subscribe(filter.clone()).await.unwrap();
    let mut kept = bus.subscribe(filter.clone()).await.unwrap();
    bus.flush().await.unwrap();
    bus.publish(subject.clone(), "m1".into()).await.unwrap();
    assert_eq!(recv(&mut dropped, "dropped").await.payload, "m1");
    assert_eq!(recv(&mut kept, "kept").await.payload, "m1");

    drop(dropped);
    for m in ["m2", "m3"] {
        bus.publish(subject.clone(), m.into()).await.unwrap();
    }
    bus.flush().await.unwrap();
    assert_eq!(recv(&mut kept, "kept").await.payload, "m2");
    assert_eq!(recv(&mut kept, "kept").await.payload, "m3");

    drop(kept);
    bus.publish(subject.clone(), "m4".into()).await.unwrap();
    bus.flush().await.unwrap();
    // The filter itself still works for a new subscriber.
    let mut again = bus.subscribe(filter).await.unwrap();
    bus.flush().await.unwrap();
    bus.publish(subject, "m5".into()).await.unwrap();
    assert_eq!(
        recv(&mut again, "new subscriber").await.payload,
        "m5",
        "a new subscription sees only what is published after it"
    );
}

async fn bus_many_messages_arrive_in_order(bus: Arc<dyn Bus>) {
    const N: usize = 10_000;
    let filter = format!("v3.{}.app-1.>", unique("tenant"));
    let mut sub = bus.subscribe(filter.clone()).await.unwrap();
    bus.flush().await.unwrap();
    let publisher = {
        let bus = bus.clone();
        let subject = filter.replace('>', "devices.dev-1.up");
        tokio::spawn(async move {
            for i in 0..N {
                bus.publish(subject.clone(), Bytes::from(i.to_string()))
                    .await
                    .unwrap();
            }
            bus.flush().await.unwrap();
        })
    };
    for i in 0..N {
        let m = recv(&mut sub, &format!("message {i}")).await;
        assert_eq!(m.payload, Bytes::from(i.to_string()));
    }
    publisher.await.unwrap();
}

async fn bus_is_ready(bus: Arc<dyn Bus>) {
    assert!(bus.is_ready());
    bus.flush().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Redis: failures, and what only Redis can get wrong.

/// Sends one command to Redis in RESP and returns the raw reply, to tamper with records
/// behind the store's back.
async fn redis_raw(url: &str, args: &[&str]) -> String {
    let addr = url.trim_start_matches("redis://").trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(cmd.as_bytes()).await.unwrap();
    let mut buf = vec![0; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn redis_down_then_back() {
    let mut redis = RedisService::start().await;
    let prefix = unique("lbtest");
    let store = RedisKeyStore::connect(&redis.url, &prefix).await.unwrap();
    let queue = RedisDownlinkQueue::connect(&redis.url, &prefix, CAP)
        .await
        .unwrap();
    let app = fresh_app();
    let dev = device(&app, "dev-1");
    let before = key(&app, 1);
    store.insert(&before).await.unwrap();
    queue.push(&dev, &items(&["a", "b"])).await.unwrap();

    redis.stop().await;
    let during = key(&app, 2);
    // Every operation fails (concurrently, to keep the test short), and nothing is written.
    let (get, insert, list, store_ping) = tokio::join!(
        fails_fast("get", store.get(&before.id)),
        fails_fast("insert", store.insert(&during)),
        fails_fast("list", store.list(&app)),
        fails_fast("key store ping", store.ping()),
    );
    for e in [get, insert, list, store_ping] {
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    }
    let (three, one) = (items(&["c", "d", "e"]), items(&["x"]));
    let (push, replace, pop, queue_ping) = tokio::join!(
        fails_fast("push", queue.push(&dev, &three)),
        fails_fast("replace", queue.replace(&dev, &one)),
        fails_fast("pop", queue.pop(&dev)),
        fails_fast("queue ping", queue.ping()),
    );
    for e in [push, replace, pop, queue_ping] {
        assert!(matches!(e, QueueError::Unavailable(_)), "{e:?}");
    }

    redis.restart().await;
    // The same objects recover by themselves.
    let restarted = Instant::now();
    eventually("key store back", RECOVERY, || store.ping()).await;
    eventually("queue back", RECOVERY, || queue.ping()).await;
    eprintln!(
        "Redis store and queue usable {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(store.get(&before.id).await.unwrap(), Some(before.clone()));
    assert_eq!(
        store.list(&app).await.unwrap(),
        vec![before.clone()],
        "nothing of the failed insert was written"
    );
    assert_eq!(
        queue.list(&dev).await.unwrap(),
        items(&["a", "b"]),
        "nothing of the failed push or replace was written, nothing popped"
    );
    store.insert(&during).await.unwrap();
    assert_eq!(store.list(&app).await.unwrap(), vec![before, during]);
    assert_eq!(queue.push(&dev, &items(&["c"])).await.unwrap(), 3);
    assert_eq!(queue.pop(&dev).await.unwrap().as_deref(), Some("a"));
}

#[tokio::test]
async fn redis_store_and_queue_built_while_down_work_once_it_starts() {
    let mut redis = RedisService::start().await;
    redis.stop().await;
    let prefix = unique("lbtest");
    let started = Instant::now();
    let store = RedisKeyStore::connect(&redis.url, &prefix).await.unwrap();
    let queue = RedisDownlinkQueue::connect(&redis.url, &prefix, CAP)
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "construction does not wait for Redis"
    );
    let app = fresh_app();
    let dev = device(&app, "dev-1");
    let e = fails_fast("get", store.get(&generate().id)).await;
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    let e = fails_fast("push", queue.push(&dev, &items(&["a"]))).await;
    assert!(matches!(e, QueueError::Unavailable(_)), "{e:?}");

    redis.restart().await;
    eventually("key store up", RECOVERY, || store.ping()).await;
    eventually("queue up", RECOVERY, || queue.ping()).await;
    let k = key(&app, 1);
    store.insert(&k).await.unwrap();
    assert_eq!(store.get(&k.id).await.unwrap(), Some(k));
    assert_eq!(queue.push(&dev, &items(&["a"])).await.unwrap(), 1);
    assert_eq!(queue.list(&dev).await.unwrap(), items(&["a"]));
}

#[tokio::test]
async fn redis_corrupt_records_are_reported() {
    let redis = RedisService::start().await;
    let prefix = unique("lbtest");
    let store = RedisKeyStore::connect(&redis.url, &prefix).await.unwrap();
    let app = fresh_app();
    let k = key(&app, 1);
    store.insert(&k).await.unwrap();
    let record = format!("{prefix}:apikey:{}", k.id);
    assert!(redis_raw(&redis.url, &["SET", &record, "{not json"])
        .await
        .starts_with("+OK"));
    for result in [
        store.get(&k.id).await.map(|_| ()),
        store.list(&app).await.map(|_| ()),
        store.remove(&k.id).await.map(|_| ()),
    ] {
        assert!(
            matches!(&result, Err(StoreError::Corrupt { id, .. }) if *id == k.id),
            "{result:?}"
        );
    }

    // A record filed under another key's ID is corrupt too.
    let other = key(&app, 2);
    let json = serde_json::to_string(&other).unwrap();
    redis_raw(&redis.url, &["SET", &record, &json]).await;
    assert!(matches!(
        store.get(&k.id).await,
        Err(StoreError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn redis_keys_use_the_documented_layout() {
    let redis = RedisService::start().await;
    let prefix = unique("lbtest");
    let store = RedisKeyStore::connect(&redis.url, &prefix).await.unwrap();
    let queue = RedisDownlinkQueue::connect(&redis.url, &prefix, CAP)
        .await
        .unwrap();
    let app = fresh_app();
    let generated = generate();
    let k = StoredKey::new(&generated, &app, Rights::DEFAULT, "layout", None);
    store.insert(&k).await.unwrap();
    queue
        .push(&device(&app, "dev-1"), &items(&["x"]))
        .await
        .unwrap();
    let record = redis_raw(&redis.url, &["GET", &format!("{prefix}:apikey:{}", k.id)]).await;
    assert!(record.contains(&format!("\"id\":\"{}\"", k.id)), "{record}");
    let secret = generated.key.rsplit('.').next().unwrap();
    assert!(!record.contains(secret), "the secret is never stored");
    let index = format!("{prefix}:apikeys:{}:{}", app.tenant, app.app);
    assert!(redis_raw(&redis.url, &["SMEMBERS", &index])
        .await
        .contains(&k.id));
    // A tenant's downlink keys share its Redis Cluster hash tag.
    let scope = format!("{prefix}:{{t:{}}}", app.tenant);
    let list = format!("{scope}:down:{}:dev-1", app.app);
    assert_eq!(redis_raw(&redis.url, &["LLEN", &list]).await, ":1\r\n");
    let ttl = redis_raw(&redis.url, &["TTL", &list]).await;
    let ttl: i64 = ttl.trim_start_matches(':').trim().parse().unwrap();
    assert!(
        ttl > 6 * 24 * 3600,
        "the default idle expiry is 7 days: {ttl}"
    );
    let quota = format!("{scope}:quota");
    let counters = redis_raw(&redis.url, &["HGETALL", &quota]).await;
    for field in [
        "tenant",
        &format!("app:{}", app.app),
        &format!("dev:{}:dev-1", app.app),
    ] {
        assert!(counters.contains(field), "{field} in {counters}");
    }
    let queues = format!("{scope}:queues");
    assert!(redis_raw(&redis.url, &["ZRANGE", &queues, "0", "-1"])
        .await
        .contains(&format!("{}:dev-1", app.app)));
    let registry = RedisDeviceRegistry::connect(&redis.url, &prefix)
        .await
        .unwrap();
    registry.add(&device(&app, "dev-1")).await.unwrap();
    let set = format!("{scope}:devices:{}", app.app);
    assert!(redis_raw(&redis.url, &["SMEMBERS", &set])
        .await
        .contains("dev-1"));

    store.remove(&k.id).await.unwrap();
    assert_eq!(
        redis_raw(&redis.url, &["EXISTS", &index]).await,
        ":0\r\n",
        "remove deletes the index entry too"
    );
}

#[tokio::test]
async fn redis_queue_takes_batches_as_large_as_the_default_capacity() {
    const BIG: usize = 10_000;
    let redis = RedisService::start().await;
    let queue = RedisDownlinkQueue::connect(&redis.url, &unique("lbtest"), BIG)
        .await
        .unwrap();
    let dev = device(&fresh_app(), "dev-1");
    let batch: Vec<String> = (0..BIG).map(|i| format!("{{\"n\":{i}}}")).collect();
    assert_eq!(queue.push(&dev, &batch[..2_500]).await.unwrap(), 2_500);
    assert_eq!(queue.push(&dev, &batch[2_500..]).await.unwrap(), BIG);
    assert_eq!(queue.list(&dev).await.unwrap(), batch);
    assert_eq!(
        queue.push(&dev, &batch[..1]).await,
        Err(QueueError::Full {
            queued: BIG,
            adding: 1,
            capacity: BIG
        })
    );
    let mut reversed = batch.clone();
    reversed.reverse();
    assert_eq!(queue.replace(&dev, &reversed).await.unwrap(), BIG);
    assert_eq!(queue.list(&dev).await.unwrap(), reversed);
}

// ---------------------------------------------------------------------------------------
// NATS: failures.

async fn ready(bus: &NatsBus, want: bool, what: &str) {
    eventually(what, RECOVERY, || async {
        (bus.is_ready() == want).then_some(()).ok_or("not yet")
    })
    .await;
}

/// Publishes from `from` every 50 ms until `sub` receives one of those messages.
async fn publish_until_received(from: &NatsBus, subject: &str, sub: &mut Subscription) {
    let deadline = Instant::now() + RECOVERY;
    for i in 0.. {
        assert!(
            Instant::now() < deadline,
            "the subscription received nothing after the restart"
        );
        from.publish(subject.to_owned(), format!("after-{i}").into())
            .await
            .unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), sub.next()).await {
            assert!(m.payload.starts_with(b"after-"), "{m:?}");
            return;
        }
    }
}

#[tokio::test]
async fn nats_down_then_back_resubscribes() {
    let mut nats = NatsService::start().await;
    let bus = NatsBus::connect(&nats.url, "test-node").await.unwrap();
    ready(&bus, true, "connected").await;
    let filter = format!("v3.{}.app-1.>", unique("tenant"));
    let subject = filter.replace('>', "devices.dev-1.up");
    let mut sub = bus.subscribe(filter).await.unwrap();
    bus.flush().await.unwrap();
    bus.publish(subject.clone(), "before".into()).await.unwrap();
    assert_eq!(recv(&mut sub, "before").await.payload, "before");

    nats.stop().await;
    ready(&bus, false, "not ready while NATS is down").await;
    let e = fails_fast("publish", bus.publish(subject.clone(), "lost".into())).await;
    assert!(matches!(e, BusError::Unavailable(_)), "{e:?}");
    let e = fails_fast("flush", bus.flush()).await;
    assert!(matches!(e, BusError::Unavailable(_)), "{e:?}");

    nats.restart().await;
    ready(&bus, true, "ready again after the restart").await;
    // Another node publishes; the subscription taken before the outage receives it.
    let upstream = NatsBus::connect(&nats.url, "test-upstream").await.unwrap();
    ready(&upstream, true, "upstream connected").await;
    publish_until_received(&upstream, &subject, &mut sub).await;
    // And this node publishes again.
    bus.publish(subject, "own".into()).await.unwrap();
    loop {
        if recv(&mut sub, "own").await.payload == "own" {
            break;
        }
    }
}

#[tokio::test]
async fn nats_bus_built_while_down_works_once_it_starts() {
    let mut nats = NatsService::start().await;
    nats.stop().await;
    let started = Instant::now();
    let bus = NatsBus::connect(&nats.url, "test-node").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "construction does not wait for NATS"
    );
    assert!(!bus.is_ready());
    let filter = format!("v3.{}.app-1.>", unique("tenant"));
    let subject = filter.replace('>', "devices.dev-1.up");
    let mut sub = bus.subscribe(filter).await.unwrap();
    // Right after connect, a publish is buffered until the first connection (what a
    // short-lived `keys revoke` relies on).
    bus.publish(subject.clone(), "early".into()).await.unwrap();
    assert!(!bus.is_ready());

    nats.restart().await;
    ready(&bus, true, "ready once NATS is up").await;
    bus.flush().await.unwrap();
    assert_eq!(recv(&mut sub, "early").await.payload, "early");
    let upstream = NatsBus::connect(&nats.url, "test-upstream").await.unwrap();
    ready(&upstream, true, "upstream connected").await;
    publish_until_received(&upstream, &subject, &mut sub).await;
}

#[tokio::test]
async fn nats_dropping_a_subscription_removes_interest_at_the_server() {
    let nats = NatsService::start().await;
    let bus = NatsBus::connect(&nats.url, "test-node").await.unwrap();
    ready(&bus, true, "connected").await;
    let t = unique("tenant");
    let (one, two) = (format!("v3.{t}.app-1.>"), format!("v3.{t}.app-2.>"));
    let (subject_one, subject_two) = (
        one.replace('>', "devices.dev-1.up"),
        two.replace('>', "devices.dev-1.up"),
    );
    assert!(!nats.has_interest(&subject_one).await);
    let sub_one = bus.subscribe(one).await.unwrap();
    let _sub_two = bus.subscribe(two).await.unwrap();
    bus.flush().await.unwrap();
    for subject in [&subject_one, &subject_two] {
        eventually("interest registered", WAIT, || async {
            nats.has_interest(subject)
                .await
                .then_some(())
                .ok_or("no interest")
        })
        .await;
    }

    drop(sub_one);
    bus.flush().await.unwrap();
    eventually("interest removed", WAIT, || async {
        (!nats.has_interest(&subject_one).await)
            .then_some(())
            .ok_or("still subscribed")
    })
    .await;
    assert!(nats.has_interest(&subject_two).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_flush_makes_a_subscription_visible_to_other_publishers() {
    // What a SUBACK promises: once the node's subscribe + flush return, a message another
    // client publishes (the upstream, another node) reaches it. A socket flush alone
    // leaves a window in which the server has not yet read the SUB.
    let nats = NatsService::start().await;
    let node = NatsBus::connect(&nats.url, "test-node").await.unwrap();
    let upstream = NatsBus::connect(&nats.url, "test-upstream").await.unwrap();
    ready(&node, true, "node connected").await;
    ready(&upstream, true, "upstream connected").await;
    let tenant = unique("tenant");
    for i in 0..300 {
        let filter = format!("v3.{tenant}.app-{i}.>");
        let mut sub = node.subscribe(filter.clone()).await.unwrap();
        node.flush().await.unwrap();
        upstream
            .publish(filter.replace('>', "devices.dev-1.up"), "x".into())
            .await
            .unwrap();
        upstream.flush().await.unwrap();
        let got = tokio::time::timeout(WAIT, sub.next()).await;
        assert!(
            matches!(got, Ok(Some(_))),
            "subscription {i} missed a message published after its flush"
        );
    }
}

#[tokio::test]
async fn nats_slow_consumer_drops_are_counted_not_fatal() {
    let nats = NatsService::start().await;
    let bus = NatsBus::connect(&nats.url, "test-node").await.unwrap();
    ready(&bus, true, "connected").await;
    let filter = format!("v3.{}.app-1.>", unique("tenant"));
    let subject = filter.replace('>', "devices.dev-1.up");
    let mut sub = bus.subscribe(filter).await.unwrap();
    bus.flush().await.unwrap();
    // Nobody reads `sub` while more than its buffer arrives.
    let n = lorabroker::bus::nats::SUBSCRIPTION_CAPACITY + 1_000;
    for i in 0..n {
        bus.publish(subject.clone(), Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    eventually("drops counted", WAIT, || async {
        (bus.dropped_messages() > 0)
            .then_some(())
            .ok_or(bus.dropped_messages())
    })
    .await;
    // The subscription is still alive, in order, with the oldest messages kept.
    assert_eq!(recv(&mut sub, "first").await.payload, "0");
    assert_eq!(recv(&mut sub, "second").await.payload, "1");
    assert!(bus.is_ready());
}

/// A router's subscription (`subscribe_counted`) holds `nats.subscription_capacity`
/// messages, keeps the oldest, and counts every one it drops for its owner, exactly: here
/// all of them arrive (the client's own buffer takes them) before the reader reads, so its
/// queue overflows at once, and received + dropped is what was published.
#[tokio::test]
async fn nats_counted_subscription_counts_exactly_what_it_drops() {
    let nats = NatsService::start().await;
    let config = lorabroker::config::NatsConfig {
        url: nats.url.clone(),
        subscription_capacity: 100,
        ..Default::default()
    };
    let bus = NatsBus::connect_with(&config, "test-node").await.unwrap();
    ready(&bus, true, "connected").await;
    let filter = format!("v3.{}.app-1.>", unique("tenant"));
    let subject = filter.replace('>', "devices.dev-1.up");
    let dropped = prometheus_client::metrics::counter::Counter::<u64>::default();
    let mut sub = bus
        .subscribe_counted(filter, dropped.clone())
        .await
        .unwrap();
    bus.flush().await.unwrap();
    let n = 20_000u64;
    for i in 0..n {
        bus.publish(subject.clone(), Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    // The round trip comes back behind every message this connection was sent before it.
    bus.flush().await.unwrap();
    let mut received = Vec::new();
    while received.len() as u64 + dropped.get() < n {
        received.push(recv(&mut sub, "the rest").await.payload);
    }
    assert_eq!(received.len() as u64 + dropped.get(), n);
    assert!(dropped.get() > 0);
    // The oldest are kept, in order.
    for (i, p) in received.iter().take(100).enumerate() {
        assert_eq!(p, &i.to_string());
    }
    // Nothing else comes, and the node's total is this subscription's.
    assert!(tokio::time::timeout(Duration::from_millis(200), sub.next())
        .await
        .is_err());
    assert_eq!(bus.dropped_messages(), dropped.get());
    println!(
        "{n} published: {} received, {} dropped and counted",
        received.len(),
        dropped.get()
    );
}

#[tokio::test]
async fn nats_rejects_an_unparsable_url() {
    assert!(matches!(
        NatsBus::connect("nats://[::1", "test").await,
        Err(BusError::Settings(m)) if m.starts_with("nats.url: \"nats://[::1\"")
    ));
}
