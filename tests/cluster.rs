//! Several nodes on one NATS and one Redis behaving like one server (issue 3, DESIGN §1, §3,
//! §7): traffic, downlinks, revocation through the CLI, expiry, client-ID takeover, tenant
//! isolation and the per-application NATS subscription, across three in-process nodes;
//! then nodes whose Redis or NATS really stops and starts again.
//!
//! Each test has its own [`TestEnv`]: its own Redis and NATS processes (or, with
//! `LORABROKER_TEST_*_URL`, shared servers kept apart by a unique key prefix and tenant).
//! The failure tests stop and restart those servers, so they need processes the fixture
//! started itself and fail, saying so, when only URLs are given.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use rumqttc::{ConnectReturnCode, QoS, SubscribeReasonCode};
use serde_json::Value;

use common::broker::{Backend, Seen, TestClient, TestEnv, TestNode, WAIT};
use common::http;
use common::services::unique;
use common::wait::eventually;
use lorabroker::app::Backends;
use lorabroker::auth::Rights;
use lorabroker::topic::{AppRef, DeviceRef, Event, Id};
use lorabroker::upstream::Upstream;

const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtMostOnce);
/// How long "nothing arrives" is watched.
const SILENCE: Duration = Duration::from_millis(300);
/// The bound of revocation and takeover (DESIGN §3, issue 3 points 3 and 5).
const ONE_SECOND: Duration = Duration::from_secs(1);
/// How long a node may take to notice that a restarted backend is back.
const RECOVERY: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Helpers.

/// Three nodes of one environment.
async fn three_nodes(env: &TestEnv) -> [TestNode; 3] {
    let (a, b, c) = tokio::join!(env.node(), env.node(), env.node());
    [a, b, c]
}

fn device(app: &AppRef, dev: &str) -> DeviceRef {
    DeviceRef::new(app.clone(), Id::parse(dev).expect("valid device ID"))
}

/// The key ID (middle part) of an API key.
fn key_id(key: &str) -> &str {
    key.split('.').nth(1).expect("NNSXS.<ID>.<SECRET>")
}

/// An upstream with NATS and Redis connections of its own, as `lorabroker simulate` has.
async fn upstream(env: &TestEnv) -> Upstream {
    let backends = Backends::from_config(&env.config(), "test-upstream")
        .await
        .expect("upstream backends");
    let upstream = Upstream::from_backends(&backends);
    eventually("upstream connected to NATS", WAIT, || async {
        upstream.flush().await
    })
    .await;
    upstream
}

/// Waits until the server closes `client`, no later than `limit` after `since` (which may
/// lie ahead).
async fn closed_by(client: &mut TestClient, since: Instant, limit: Duration, what: &str) {
    let deadline = tokio::time::Instant::from_std(since + limit);
    if tokio::time::timeout_at(deadline, client.expect_closed())
        .await
        .is_err()
    {
        panic!("{what}: still connected {limit:?} later");
    }
}

/// Waits until every client in `clients` is closed by the server, no later than `limit`
/// after `since`; the panic names the node (the client's position, from 1).
async fn all_closed_by(clients: &mut [TestClient], since: Instant, limit: Duration, what: &str) {
    for (i, c) in clients.iter_mut().enumerate() {
        closed_by(c, since, limit, &format!("{what} (node {})", i + 1)).await;
    }
}

/// Polls `/readyz` until it answers `status`, within `limit`; returns the body.
async fn readiness(node: &TestNode, status: u16, limit: Duration, what: &str) -> String {
    eventually(what, limit, || async {
        match http::get(node.http_addr, "/readyz").await {
            (s, body) if s == status => Ok(body),
            other => Err(other),
        }
    })
    .await
}

/// The connect refusal code, `None` when accepted.
async fn refusal(node: &TestNode, app: &AppRef, key: &str) -> Option<ConnectReturnCode> {
    TestClient::connect(node.mqtt_addr, &node.username(app), key, &unique("c"))
        .await
        .err()
}

/// `{"downlinks":[…]}` with one confirmed item carrying `correlation_id`.
fn push_body(f_port: u8, correlation_id: &str) -> String {
    format!(
        r#"{{"downlinks":[{{"f_port":{f_port},"frm_payload":"vu8=","priority":"NORMAL","confirmed":true,"correlation_ids":["{correlation_id}"]}}]}}"#
    )
}

fn correlation_ids(doc: &Value) -> Vec<String> {
    doc["correlation_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The Redis list of `dev`'s downlink queue, read with a raw command behind the broker's
/// back, under the documented name `{prefix}:{t:<tenant>}:down:<app>:<dev>`.
async fn redis_queue(env: &TestEnv, dev: &DeviceRef) -> Vec<Value> {
    let list = format!(
        "{}:{{t:{}}}:down:{}:{}",
        env.prefix, dev.app.tenant, dev.app.app, dev.device
    );
    let redis = env.redis.as_ref().expect("the cluster backend has Redis");
    let items: Vec<String> = redis.query(&["LRANGE", &list, "0", "-1"]).await;
    items
        .iter()
        .map(|i| serde_json::from_str(i).expect("queued items are JSON"))
        .collect()
}

/// Runs the `lorabroker` binary against this environment's NATS and Redis (flags) and key
/// prefix (environment variable), as an operator would.
async fn cli(env: &TestEnv, args: &[&str]) -> Output {
    let config = env.config();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_lorabroker"))
        .args(args)
        .args([
            "--nats-url",
            &config.nats.url,
            "--redis-url",
            &config.redis.url,
        ])
        .env("LORABROKER_REDIS__KEY_PREFIX", &env.prefix)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .expect("the lorabroker binary runs")
}

// ---------------------------------------------------------------------------------------
// The fixture itself.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_one_env_share_nats_redis_and_prefix_and_envs_are_isolated() {
    let env = TestEnv::new(Backend::Cluster).await;
    let [n1, n2, n3] = three_nodes(&env).await;
    for n in [&n2, &n3] {
        assert_eq!(n.app.config.nats.url, n1.app.config.nats.url);
        assert_eq!(n.app.config.redis.url, n1.app.config.redis.url);
        assert_eq!(n.app.config.redis.key_prefix, env.prefix);
        assert!(!n.app.config.nats.url.is_empty() && !n.app.config.redis.url.is_empty());
    }
    let app = env.app("app1");
    // Shared Redis and prefix: a key stored through node 1 opens node 3.
    let key = n1.key(&app, Rights::DEFAULT).await;
    let mut sub = n3.client(&app, &key).await;
    assert_eq!(sub.subscribe("#").await, GRANTED);
    // Shared NATS: what node 2's bus carries reaches node 3's subscriber.
    n2.upstream()
        .publish(&device(&app, "dev1"), Event::Up, "via-node-2".into())
        .await
        .unwrap();
    assert_eq!(sub.next_publish().await.1, "via-node-2");

    let other = TestEnv::new(Backend::Cluster).await;
    assert_ne!(other.prefix, env.prefix);
    assert_ne!(other.tenant, env.tenant);
    let foreign = other.node().await;
    assert_eq!(
        refusal(&foreign, &app, &key).await,
        Some(ConnectReturnCode::NotAuthorized),
        "another environment does not know this environment's keys"
    );
    let other_app = other.app("app1");
    let other_key = foreign.key(&other_app, Rights::DEFAULT).await;
    let mut stranger = foreign.client(&other_app, &other_key).await;
    assert_eq!(stranger.subscribe("#").await, GRANTED);
    n1.upstream()
        .publish(&device(&app, "dev1"), Event::Up, "env-one-only".into())
        .await
        .unwrap();
    assert_eq!(sub.next_publish().await.1, "env-one-only");
    stranger.expect_silence(SILENCE).await;
}

// ---------------------------------------------------------------------------------------
// Three nodes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplinks_reach_subscribers_on_every_node() {
    let env = TestEnv::new(Backend::Cluster).await;
    let nodes = three_nodes(&env).await;
    let app = env.app("app1");
    let key = nodes[0].key(&app, Rights::DEFAULT).await;
    let mut subs = Vec::new();
    for n in &nodes {
        let mut c = n.client(&app, &key).await;
        assert_eq!(c.subscribe("v3/+/devices/+/up").await, GRANTED);
        subs.push(c);
    }
    let upstream = upstream(&env).await;
    let doc = br#"{"end_device_ids":{"device_id":"dev1"},"uplink_message":{"f_port":1}}"#;
    upstream
        .publish(
            &device(&app, "dev1"),
            Event::Up,
            bytes::Bytes::from_static(doc),
        )
        .await
        .unwrap();
    for (i, sub) in subs.iter_mut().enumerate() {
        let (topic, payload) = sub.next_publish().await;
        assert_eq!(topic, format!("v3/app1@{}/devices/dev1/up", env.tenant));
        assert_eq!(&payload[..], &doc[..], "node {}: bytes unchanged", i + 1);
    }
    // Each node delivers exactly once: one subscription per application and node.
    upstream
        .publish(&device(&app, "dev2"), Event::Up, "second".into())
        .await
        .unwrap();
    for sub in &mut subs {
        assert_eq!(sub.next_publish().await.1, "second");
        sub.expect_silence(SILENCE).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downlink_pushed_on_node_1_lands_in_redis_and_is_queued_on_node_3() {
    let env = TestEnv::new(Backend::Cluster).await;
    let [n1, _n2, n3] = three_nodes(&env).await;
    let app = env.app("app1");
    let key = n1.key(&app, Rights::DEFAULT).await;
    let mut watcher = n3.client(&app, &key).await;
    assert_eq!(watcher.subscribe("#").await, GRANTED);
    let pusher = n1.client(&app, &key).await;
    let uid = n1.username(&app);
    pusher
        .publish(
            &format!("v3/{uid}/devices/dev1/down/push"),
            push_body(15, "my-correlation-id"),
        )
        .await;

    let queued = watcher.next_on("/devices/dev1/down/queued").await;
    let ids = correlation_ids(&queued);
    assert!(ids.contains(&"my-correlation-id".to_owned()), "{queued}");
    let server_id = ids
        .iter()
        .find(|i| i.starts_with("as:downlink:"))
        .unwrap_or_else(|| panic!("server correlation ID in {queued}"))
        .clone();
    assert_eq!(queued["downlink_queued"]["f_port"], 15);

    let stored = redis_queue(&env, &device(&app, "dev1")).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["f_port"], 15);
    assert_eq!(stored[0]["frm_payload"], "vu8=");
    assert_eq!(stored[0]["confirmed"], true);
    assert_eq!(
        correlation_ids(&stored[0]),
        ["my-correlation-id".to_owned(), server_id],
        "the queued item is the one announced"
    );
    assert!(redis_queue(&env, &device(&app, "dev2")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_revocation_disconnects_the_key_on_every_node_within_a_second() {
    let env = TestEnv::new(Backend::Cluster).await;
    let nodes = three_nodes(&env).await;
    let app = env.app("app1");
    let revoked = nodes[0].key(&app, Rights::DEFAULT).await;
    let kept = nodes[1].key(&app, Rights::DEFAULT).await;
    let mut doomed = Vec::new();
    let mut survivors = Vec::new();
    for n in &nodes {
        let mut d = n.client(&app, &revoked).await;
        assert_eq!(d.subscribe("#").await, GRANTED);
        doomed.push(d);
        let mut s = n.client(&app, &kept).await;
        assert_eq!(s.subscribe("#").await, GRANTED);
        survivors.push(s);
    }

    let out = cli(&env, &["keys", "revoke", key_id(&revoked)]).await;
    let done = Instant::now();
    assert!(
        out.status.success(),
        "keys revoke failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(key_id(&revoked)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    all_closed_by(&mut doomed, done, ONE_SECOND, "revoked key's client").await;
    eprintln!(
        "all three revoked clients closed {:?} after `keys revoke` returned",
        done.elapsed()
    );

    // The other key's clients are still connected and served on every node.
    nodes[2]
        .upstream()
        .publish(&device(&app, "dev1"), Event::Up, "after-revocation".into())
        .await
        .unwrap();
    for s in &mut survivors {
        assert_eq!(s.next_publish().await.1, "after-revocation");
    }
    // And the revoked key is refused everywhere, cached or not.
    for n in &nodes {
        assert_eq!(
            refusal(n, &app, &revoked).await,
            Some(ConnectReturnCode::NotAuthorized)
        );
    }
    // Revoking an unknown key fails loudly.
    let again = cli(&env, &["keys", "revoke", key_id(&revoked)]).await;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_expiring_while_connected_is_disconnected_on_every_node() {
    let env = TestEnv::new(Backend::Cluster).await;
    let nodes = three_nodes(&env).await;
    let app = env.app("app1");
    let key = nodes[0]
        .key_expiring(&app, Rights::DEFAULT, Some(Duration::from_secs(3)))
        .await;
    let expires_at = nodes[0]
        .app
        .keys
        .get(key_id(&key))
        .await
        .unwrap()
        .expect("stored")
        .expires_at
        .expect("an expiring key");
    let lasting = nodes[0].key(&app, Rights::DEFAULT).await;
    let mut expiring = Vec::new();
    let mut lasting_clients = Vec::new();
    for n in &nodes {
        let mut c = n.client(&app, &key).await;
        assert_eq!(c.subscribe("#").await, GRANTED, "usable before expiry");
        expiring.push(c);
        let mut l = n.client(&app, &lasting).await;
        assert_eq!(l.subscribe("#").await, GRANTED);
        lasting_clients.push(l);
    }
    let expiry = std::time::UNIX_EPOCH + Duration::from_secs(expires_at);
    let until_expiry = expiry
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let expires = Instant::now() + until_expiry;
    all_closed_by(&mut expiring, expires, ONE_SECOND, "expired key's client").await;
    for n in &nodes {
        assert_eq!(
            refusal(n, &app, &key).await,
            Some(ConnectReturnCode::NotAuthorized)
        );
    }
    nodes[0]
        .upstream()
        .publish(&device(&app, "dev1"), Event::Up, "still-here".into())
        .await
        .unwrap();
    for l in &mut lasting_clients {
        assert_eq!(l.next_publish().await.1, "still-here");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_takeover_across_nodes() {
    let env = TestEnv::new(Backend::Cluster).await;
    let [n1, n2, n3] = three_nodes(&env).await;
    let app = env.app("app1");
    let uid = n1.username(&app);
    let key = n1.key(&app, Rights::DEFAULT).await;
    let client_id = unique("same-id");

    let mut first = TestClient::connect(n1.mqtt_addr, &uid, &key, &client_id)
        .await
        .unwrap();
    assert_eq!(first.subscribe("#").await, GRANTED);
    let mut second = TestClient::connect(n2.mqtt_addr, &uid, &key, &client_id)
        .await
        .unwrap();
    let connected = Instant::now();
    closed_by(
        &mut first,
        connected,
        ONE_SECOND,
        "the older connection on node 1",
    )
    .await;

    // The same client ID in another application, or in the same application ID of
    // another tenant, is another client: nobody is taken over.
    let app2 = env.app("app2");
    let key2 = n3.key(&app2, Rights::DEFAULT).await;
    let _other_app = TestClient::connect(n3.mqtt_addr, &n3.username(&app2), &key2, &client_id)
        .await
        .unwrap();
    let stranger_app = AppRef::new(Id::parse(&unique("tenant")).unwrap(), app.app.clone());
    let stranger_key = n3.key(&stranger_app, Rights::DEFAULT).await;
    let _stranger = TestClient::connect(
        n3.mqtt_addr,
        &n3.username(&stranger_app),
        &stranger_key,
        &client_id,
    )
    .await
    .unwrap();

    // The new connection keeps working, well past the takeover.
    assert_eq!(second.subscribe("#").await, GRANTED);
    second.expect_silence(ONE_SECOND).await;
    n3.upstream()
        .publish(&device(&app, "dev1"), Event::Up, "to-the-new-one".into())
        .await
        .unwrap();
    assert_eq!(second.next_publish().await.1, "to-the-new-one");
    second
        .publish(
            &format!("v3/{uid}/devices/dev1/down/push"),
            push_body(2, "from-the-new-one"),
        )
        .await;
    let queued = second.next_on("/down/queued").await;
    assert!(correlation_ids(&queued).contains(&"from-the-new-one".to_owned()));

    // And it is taken over in turn from a third node.
    let _third = TestClient::connect(n3.mqtt_addr, &uid, &key, &client_id)
        .await
        .unwrap();
    let connected = Instant::now();
    closed_by(
        &mut second,
        connected,
        ONE_SECOND,
        "the connection on node 2",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_with_the_same_application_id_never_meet_across_nodes() {
    let env = TestEnv::new(Backend::Cluster).await;
    let [n1, n2, n3] = three_nodes(&env).await;
    let one = env.app("app1");
    let two = AppRef::new(Id::parse(&unique("tenant")).unwrap(), one.app.clone());
    let key_one = n1.key(&one, Rights::DEFAULT).await;
    let key_two = n2.key(&two, Rights::DEFAULT).await;

    let mut one_on_1 = n1.client(&one, &key_one).await;
    let mut two_on_2 = n2.client(&two, &key_two).await;
    let mut one_on_3 = n3.client(&one, &key_one).await;
    let mut two_on_3 = n3.client(&two, &key_two).await;
    for c in [&mut one_on_1, &mut two_on_2, &mut one_on_3, &mut two_on_3] {
        assert_eq!(c.subscribe("#").await, GRANTED);
    }
    // A filter naming the other tenant's application is refused.
    assert_eq!(
        one_on_3
            .subscribe(&format!("v3/app1@{}/#", two.tenant))
            .await,
        SubscribeReasonCode::Failure
    );
    // A key of one tenant does not open the same application ID of the other, anywhere.
    for n in [&n1, &n2, &n3] {
        assert_eq!(
            refusal(n, &two, &key_one).await,
            Some(ConnectReturnCode::NotAuthorized)
        );
    }

    let upstream = upstream(&env).await;
    upstream
        .publish(&device(&two, "dev1"), Event::Up, "for-two".into())
        .await
        .unwrap();
    upstream
        .publish(&device(&one, "dev1"), Event::Up, "for-one".into())
        .await
        .unwrap();
    for (c, tenant, payload) in [
        (&mut one_on_1, &one.tenant, "for-one"),
        (&mut one_on_3, &one.tenant, "for-one"),
        (&mut two_on_2, &two.tenant, "for-two"),
        (&mut two_on_3, &two.tenant, "for-two"),
    ] {
        let (topic, got) = c.next_publish().await;
        assert_eq!(topic, format!("v3/app1@{tenant}/devices/dev1/up"));
        assert_eq!(got, payload);
        c.expect_silence(SILENCE).await;
    }

    // A downlink of tenant two, pushed on node 3: its queue, its events, nobody else's.
    two_on_3
        .publish(
            &format!("v3/app1@{}/devices/dev1/down/push", two.tenant),
            push_body(3, "two-only"),
        )
        .await;
    for c in [&mut two_on_2, &mut two_on_3] {
        let queued = c.next_on("/devices/dev1/down/queued").await;
        assert!(correlation_ids(&queued).contains(&"two-only".to_owned()));
    }
    one_on_1.expect_silence(SILENCE).await;
    one_on_3.expect_silence(SILENCE).await;
    assert_eq!(redis_queue(&env, &device(&two, "dev1")).await.len(), 1);
    assert!(redis_queue(&env, &device(&one, "dev1")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_is_subscribed_on_nats_from_the_first_subscribe_to_the_last_leave() {
    let env = TestEnv::new(Backend::Cluster).await;
    let nats = env.nats.as_ref().expect("the cluster backend has NATS");
    let [n1, n2, _n3] = three_nodes(&env).await;
    let app = env.app("app1");
    let sibling = env.app("app2");
    // Matches the application's subscription `v3.{tenant}.app1.>`, but is no device
    // event, so the probes never reach an MQTT client.
    let probe = format!("v3.{}.app1.probe", env.tenant);
    let sibling_probe = format!("v3.{}.app2.probe", env.tenant);
    let interest = |subject: String, want: bool, what: &'static str| async move {
        eventually(what, WAIT, || async {
            (nats.has_interest(&subject).await == want)
                .then_some(())
                .ok_or(if want {
                    "no interest"
                } else {
                    "still subscribed"
                })
        })
        .await
    };
    let key = n1.key(&app, Rights::DEFAULT).await;

    // Connected is not subscribed.
    let mut a = n1.client(&app, &key).await;
    assert!(!nats.has_interest(&probe).await, "no SUBSCRIBE yet");
    assert_eq!(n1.app.router.subscribed_apps(), 0);
    // The first SUBSCRIBE takes the subscription, at the server before its SUBACK.
    assert_eq!(a.subscribe("#").await, GRANTED);
    assert!(nats.has_interest(&probe).await, "subscribed by SUBACK time");
    assert_eq!(n1.app.router.subscribed_apps(), 1);
    // A second client of the application on the node shares it.
    let mut b = n1.client(&app, &key).await;
    assert_eq!(b.subscribe("v3/+/devices/+/up").await, GRANTED);
    assert_eq!(n1.app.router.subscribed_apps(), 1);
    // Another application has its own.
    let sibling_key = n1.key(&sibling, Rights::DEFAULT).await;
    let mut s = n1.client(&sibling, &sibling_key).await;
    assert_eq!(s.subscribe("#").await, GRANTED);
    assert_eq!(n1.app.router.subscribed_apps(), 2);

    // One of two leaving keeps it.
    drop(a);
    eventually("node 1 saw the first client go", WAIT, || async {
        (n1.app.registry.len() == 2)
            .then_some(())
            .ok_or(n1.app.registry.len())
    })
    .await;
    assert!(nats.has_interest(&probe).await);
    assert_eq!(n1.app.router.subscribed_apps(), 2);

    // A subscriber of the application on node 2 holds node 2's own subscription.
    let mut c = n2.client(&app, &key).await;
    assert_eq!(c.subscribe("#").await, GRANTED);
    // The last client on node 1 unsubscribing drops node 1's subscription only.
    b.client.unsubscribe("v3/+/devices/+/up").await.unwrap();
    eventually("node 1 dropped the application", WAIT, || async {
        (n1.app.router.subscribed_apps() == 1)
            .then_some(())
            .ok_or(n1.app.router.subscribed_apps())
    })
    .await;
    assert!(nats.has_interest(&probe).await, "node 2 still subscribed");
    n1.upstream()
        .publish(&device(&app, "dev1"), Event::Up, "node-2-only".into())
        .await
        .unwrap();
    assert_eq!(c.next_publish().await.1, "node-2-only");
    b.expect_silence(SILENCE).await;

    // The last client of the application in the cluster leaves: no interest at all.
    drop(c);
    interest(
        probe.clone(),
        false,
        "interest removed after the last leave",
    )
    .await;
    assert!(
        nats.has_interest(&sibling_probe).await,
        "the other application keeps its subscription"
    );
    drop(s);
    interest(sibling_probe, false, "sibling interest removed").await;
    assert_eq!(n1.app.router.subscribed_apps(), 0);

    // And a new first SUBSCRIBE takes it again.
    assert_eq!(b.subscribe("#").await, GRANTED);
    interest(probe, true, "subscribed again").await;
    n2.upstream()
        .publish(&device(&app, "dev1"), Event::Up, "again".into())
        .await
        .unwrap();
    assert_eq!(b.next_publish().await.1, "again");
}

// ---------------------------------------------------------------------------------------
// Backends that fail, at the node level. These stop and restart the servers of their own
// environment, which only works for servers the fixture started (never for URLs).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_cached_keys_connect_others_get_3_downlinks_fail_then_all_recovers() {
    let mut env = TestEnv::new(Backend::Cluster).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let cached = node.key(&app, Rights::DEFAULT).await;
    let uncached = node.key(&app, Rights::DEFAULT).await;
    let mut watcher = node.client(&app, &cached).await;
    assert_eq!(watcher.subscribe("#").await, GRANTED);
    let pusher = node.client(&app, &cached).await;
    assert_eq!(http::get(node.http_addr, "/readyz").await.0, 200);

    env.redis.as_mut().expect("Redis").stop().await;

    let asked = Instant::now();
    let (status, body) = http::get(node.http_addr, "/readyz").await;
    eprintln!(
        "/readyz answered {status} in {:?} with Redis down",
        asked.elapsed()
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("key store unavailable"), "{body}");
    assert!(body.contains("downlink queue unavailable"), "{body}");
    // A key this node has verified still opens it.
    let mut again = node.client(&app, &cached).await;
    assert_eq!(again.subscribe("#").await, GRANTED);
    // One it has never seen cannot be verified: CONNACK 3, server unavailable.
    let asked = Instant::now();
    assert_eq!(
        refusal(&node, &app, &uncached).await,
        Some(ConnectReturnCode::ServiceUnavailable)
    );
    eprintln!("CONNACK 3 in {:?} with Redis down", asked.elapsed());
    // A two-item push fails as a whole and says why, in one event carrying both items.
    pusher
        .publish(
            &format!("v3/{uid}/devices/dev1/down/push"),
            r#"{"downlinks":[{"f_port":1,"frm_payload":"AQ==","correlation_ids":["first"]},{"f_port":2,"frm_payload":"Ag==","correlation_ids":["second"]}]}"#,
        )
        .await;
    let failed = watcher.next_on("/devices/dev1/down/failed").await;
    let error = &failed["downlink_failed"]["error"];
    assert_eq!(error["name"], "queue_unavailable", "{failed}");
    assert_eq!(error["code"], 14, "{failed}");
    assert!(
        correlation_ids(&failed).contains(&"first".to_owned()),
        "{failed}"
    );
    let items = &failed["downlink_failed"]["downlinks"];
    assert_eq!(items[1]["correlation_ids"][0], "second", "{failed}");
    // The clients connected before the outage are still connected.
    watcher.expect_silence(SILENCE).await;

    env.redis.as_mut().expect("Redis").restart().await;
    let restarted = Instant::now();
    readiness(&node, 200, RECOVERY, "ready again").await;
    eprintln!("node ready {:?} after Redis restarted", restarted.elapsed());
    assert!(
        redis_queue(&env, &device(&app, "dev1")).await.is_empty(),
        "nothing of the failed push was written"
    );
    // The same node, not restarted: the uncached key opens it, and downlinks queue.
    let mut late = node.client(&app, &uncached).await;
    assert_eq!(late.subscribe("#").await, GRANTED);
    pusher
        .publish(
            &format!("v3/{uid}/devices/dev1/down/push"),
            push_body(3, "after-redis"),
        )
        .await;
    let queued = watcher.next_on("/devices/dev1/down/queued").await;
    assert!(correlation_ids(&queued).contains(&"after-redis".to_owned()));
    let stored = redis_queue(&env, &device(&app, "dev1")).await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["f_port"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_node_keeps_its_clients_reports_not_ready_and_resumes_by_itself() {
    let mut env = TestEnv::new(Backend::Cluster).await;
    let node = env.node().await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut subs = Vec::new();
    for _ in 0..2 {
        let mut c = node.client(&app, &key).await;
        assert_eq!(c.subscribe("#").await, GRANTED);
        subs.push(c);
    }
    // A client of another application, connected but not subscribed yet.
    let app2 = env.app("app2");
    let mut late = node
        .client(&app2, &node.key(&app2, Rights::DEFAULT).await)
        .await;
    let upstream = upstream(&env).await;
    upstream
        .publish(&device(&app, "dev1"), Event::Up, "before".into())
        .await
        .unwrap();
    for s in &mut subs {
        assert_eq!(s.next_publish().await.1, "before");
    }
    readiness(&node, 200, WAIT, "ready with NATS up").await;

    env.nats.as_mut().expect("NATS").stop().await;
    let body = readiness(&node, 503, RECOVERY, "not ready while NATS is down").await;
    assert!(body.contains("bus not connected"), "{body}");
    // The MQTT clients stay connected and served: a new filter of an application the node
    // already subscribed needs no bus round trip...
    for s in &mut subs {
        assert_eq!(s.subscribe("v3/+/devices/+/up").await, GRANTED);
    }
    // ...and the first filter of another application is granted too (DESIGN §4 refuses
    // only foreign filters and keys without the read right): its NATS subscription is sent
    // when the connection is back.
    assert_eq!(late.subscribe("#").await, GRANTED);
    assert_eq!(node.app.registry.len(), 3);

    env.nats.as_mut().expect("NATS").restart().await;
    let restarted = Instant::now();
    readiness(&node, 200, RECOVERY, "ready again").await;
    // The node resubscribed by itself: uplinks reach the same, still-connected clients.
    publish_until_received(&upstream, &device(&app, "dev1"), &mut subs[0]).await;
    eprintln!(
        "uplinks flow again {:?} after NATS restarted",
        restarted.elapsed()
    );
    // The subscription taken during the outage was sent once NATS was back.
    publish_until_received(&upstream, &device(&app2, "dev1"), &mut late).await;
    // Both subscribers receive the same stream from there on, without reconnecting.
    upstream
        .publish(&device(&app, "dev1"), Event::Up, "steady".into())
        .await
        .unwrap();
    for s in &mut subs {
        loop {
            let (_, payload) = s.next_publish().await;
            if payload == "steady" {
                break;
            }
            assert!(payload.starts_with(b"after-"), "{payload:?}");
        }
    }
    assert_eq!(node.app.registry.len(), 3, "nobody reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_while_nats_is_down_is_disconnected_when_it_is_back() {
    let mut env = TestEnv::new(Backend::Cluster).await;
    let (n1, n2) = tokio::join!(env.node(), env.node());
    let app = env.app("app1");
    let revoked = n1.key(&app, Rights::DEFAULT).await;
    let kept = n1.key(&app, Rights::DEFAULT).await;
    let mut doomed = Vec::new();
    for n in [&n1, &n2] {
        let mut c = n.client(&app, &revoked).await;
        assert_eq!(c.subscribe("#").await, GRANTED);
        doomed.push(c);
    }
    let mut survivor = n2.client(&app, &kept).await;
    assert_eq!(survivor.subscribe("#").await, GRANTED);

    env.nats.as_mut().expect("NATS").stop().await;
    for n in [&n1, &n2] {
        eventually("node sees NATS gone", RECOVERY, || async {
            (!n.app.bus.is_ready())
                .then_some(())
                .ok_or("still connected")
        })
        .await;
    }
    // The key is deleted, but no node can be told.
    let out = cli(&env, &["keys", "revoke", key_id(&revoked)]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("revocation signal could not be sent"),
        "{stderr}"
    );
    assert_eq!(n1.app.keys.get(key_id(&revoked)).await.unwrap(), None);

    env.nats.as_mut().expect("NATS").restart().await;
    let restarted = Instant::now();
    // Each node catches up from Redis on reconnecting.
    all_closed_by(
        &mut doomed,
        restarted,
        RECOVERY,
        "revoked key's client after NATS returned",
    )
    .await;
    eprintln!(
        "clients of a key revoked during the outage closed {:?} after NATS restarted",
        restarted.elapsed()
    );
    for n in [&n1, &n2] {
        assert_eq!(
            refusal(n, &app, &revoked).await,
            Some(ConnectReturnCode::NotAuthorized),
            "the cached key was forgotten"
        );
    }
    let upstream = upstream(&env).await;
    publish_until_received(&upstream, &device(&app, "dev1"), &mut survivor).await;
}

/// Publishes uplinks of `dev` every 100 ms until `client` receives one (core NATS is
/// at-most-once: what is published before a resubscription lands is lost).
async fn publish_until_received(upstream: &Upstream, dev: &DeviceRef, client: &mut TestClient) {
    let deadline = Instant::now() + RECOVERY;
    for i in 0.. {
        assert!(
            Instant::now() < deadline,
            "no uplink of {dev:?} reached the subscriber after NATS restarted"
        );
        upstream
            .publish(dev, Event::Up, format!("after-{i}").into())
            .await
            .ok();
        if let Ok(Some(Seen::Publish { payload, .. })) =
            tokio::time::timeout(Duration::from_millis(100), client.next()).await
        {
            assert!(payload.starts_with(b"after-"), "{payload:?}");
            return;
        }
    }
}
