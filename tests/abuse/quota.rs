//! Connection quotas (issue 9 point 4): one tenant at its quota on a two-node cluster while
//! another connects normally, and the quota store's behavioural suite on Redis (the memory
//! store runs it in `limits::quota`'s unit tests), with a dead node's lease expiring.

use std::sync::Arc;
use std::time::Duration;

use crate::common::broker::{Backend, TestEnv};
use crate::common::services::{unique, RedisService};
use crate::common::wait::eventually;
use crate::{metric, Bystander, RawClient};
use lorabroker::auth::quota_redis::RedisQuotaStore;
use lorabroker::auth::Rights;
use lorabroker::limits::quota::suite;
use lorabroker::limits::{QuotaStore, Scope, ScopeKind};
use lorabroker::topic::{AppRef, Id};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_quota_is_refused_on_every_node_while_others_connect() {
    let env = TestEnv::new(Backend::Cluster).await;
    let quota = |c: &mut lorabroker::config::Config| {
        c.limits.max_connections_per_tenant = 3;
        c.limits.quota_refresh_interval = Duration::from_millis(500);
        c.limits.quota_lease = Duration::from_secs(2);
    };
    let (n1, n2) = (env.node_with(quota).await, env.node_with(quota).await);
    let app = env.app("app1");
    let key = n1.key(&app, Rights::DEFAULT).await;
    let user = n1.username(&app);
    let bystander = Bystander::start(&n2).await;
    let mut held = Vec::new();
    for node in [&n1, &n1, &n2] {
        let mut c = RawClient::connect(node.mqtt_addr, &user, &key, 30).await;
        assert_eq!(c.connack().await, 0);
        held.push(c);
    }
    for node in [&n1, &n2] {
        let mut c = RawClient::connect(node.mqtt_addr, &user, &key, 30).await;
        assert_eq!(c.connack().await, 3, "the tenant's fourth connection");
    }
    // Another tenant on the same node connects normally (the bystander did too).
    let other = AppRef::new(
        Id::parse(&unique("other")).unwrap(),
        Id::parse("app1").unwrap(),
    );
    let other_key = n2.key(&other, Rights::DEFAULT).await;
    let mut c = RawClient::connect(n2.mqtt_addr, &n2.username(&other), &other_key, 30).await;
    assert_eq!(c.connack().await, 0);
    assert_eq!(
        metric(&n2, "lorabroker_quota_refused_total{scope=\"tenant\"}"),
        1
    );
    // A connection that ends on node 1 frees a place for node 2.
    drop(held.remove(0));
    eventually("a place is free again", Duration::from_secs(5), || async {
        let mut c = RawClient::connect(n2.mqtt_addr, &user, &key, 30).await;
        match c.connack().await {
            0 => Ok(c),
            code => Err(code),
        }
    })
    .await;
    bystander.finish().await;
    drop(held);
    n1.shutdown().await;
    n2.shutdown().await;
}

fn store(redis: &RedisService, prefix: &str, node: &str, lease: Duration) -> RedisQuotaStore {
    RedisQuotaStore::connect(&redis.url, prefix, node, lease).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_passes_the_suite_and_a_dead_nodes_lease_expires() {
    let redis = RedisService::start().await;
    let prefix = unique("lbquota");
    let lease = Duration::from_secs(1);
    let (a, b) = (
        store(&redis, &prefix, "node-a", lease),
        store(&redis, &prefix, "node-b", lease),
    );
    suite::run(&a, &b, &unique("tenant")).await;

    let tenant = unique("tenant");
    let scope = [Scope {
        kind: ScopeKind::Tenant,
        tenant: tenant.clone(),
        id: String::new(),
        limit: 2,
    }];
    let dead = Arc::new(store(&redis, &prefix, "node-dead", lease));
    assert_eq!(dead.acquire(&scope).await.unwrap(), None);
    assert_eq!(dead.acquire(&scope).await.unwrap(), None);
    assert_eq!(
        a.acquire(&scope).await.unwrap(),
        Some(0),
        "full while the node lives"
    );
    // node-dead never renews: after its lease its connections stop counting, while a
    // living node's renewed counts stay.
    drop(dead);
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    assert_eq!(a.acquire(&scope).await.unwrap(), None);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        a.refresh().await.unwrap();
    }
    assert_eq!(b.acquire(&scope).await.unwrap(), None);
    assert_eq!(
        b.acquire(&scope).await.unwrap(),
        Some(0),
        "node-a's renewed count outlived its first lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_fails_open() {
    // A port nothing listens on: what a node sees while Redis is down.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", free.local_addr().unwrap());
    drop(free);
    let store = RedisQuotaStore::connect(&url, "x", "node", Duration::from_secs(6)).unwrap();
    let scope = [Scope {
        kind: ScopeKind::Key,
        tenant: "t1x".into(),
        id: "K".into(),
        limit: 1,
    }];
    assert!(store.acquire(&scope).await.is_err());
    let metrics = Arc::new(lorabroker::metrics::Metrics::default());
    let quotas = lorabroker::limits::ConnectionQuotas::new(
        Arc::new(store),
        lorabroker::limits::QuotaLimits {
            tenant: 1,
            application: 1,
            key: 1,
        },
        metrics.clone(),
    );
    let app = AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap());
    assert_eq!(
        quotas.acquire(&app, "K").await,
        lorabroker::limits::Admission::Uncounted
    );
    assert!(metrics
        .render()
        .contains("lorabroker_quota_unavailable_total 1"));
}
