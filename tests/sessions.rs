//! QoS 1 subscriptions and persistent sessions (issue 14, DESIGN §11), on both backends:
//! the embedded node keeps sessions in memory, a cluster in NATS JetStream shared by every
//! node. Real rumqttc clients, manual acknowledgements where the window is tested.

mod common;

use std::time::Duration;

use rumqttc::{QoS, SubscribeReasonCode};

use common::broker::{Backend, TestEnv, TestNode};
use common::persistent::{detached, device, number, receive_all, sessions_on, uplinks, Login};
use common::services::unique;
use lorabroker::auth::Rights;
use lorabroker::config::Config;
use lorabroker::topic::{AppRef, Event as DeviceEvent};
use lorabroker::transport::Kind;

async fn world(backend: Backend) -> (TestEnv, TestNode, AppRef, String) {
    world_with(backend, |_| {}).await
}

/// As [`world`], with the node's configuration adjusted by `tweak` after [`sessions_on`].
async fn world_with(
    backend: Backend,
    tweak: impl FnOnce(&mut Config),
) -> (TestEnv, TestNode, AppRef, String) {
    let env = TestEnv::new(backend).await;
    let node = env
        .node_with(|c| {
            sessions_on(c);
            tweak(c);
        })
        .await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    (env, node, app, key)
}

/// A SUBSCRIBE at QoS 1 or 2 is granted QoS 1 and delivered as QoS 1 with packet IDs,
/// within `mqtt.max_inflight`; PUBACKs make room for the rest, in order.
async fn qos1_window(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node_with(|c| c.mqtt.max_inflight = 5).await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let mut sub = login.connect(&unique("c"), true, true).await;
    let mut raw = common::broker::TestClient::connect(
        node.addr(Kind::Tcp),
        &node.username(&app),
        &key,
        &unique("c"),
    )
    .await
    .unwrap();
    assert_eq!(
        raw.subscribe("v3/+/devices/+/up").await,
        SubscribeReasonCode::Success(QoS::AtMostOnce),
        "QoS 0 stays QoS 0"
    );
    sub.client
        .subscribe("v3/+/devices/+/up", QoS::ExactlyOnce)
        .await
        .unwrap();
    // A QoS 0 subscriber beside it sees the SUBACK came back (the router holds both).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dev = device(&app, "dev1");
    uplinks(&node, &dev, 0..20).await;
    let mut held = Vec::new();
    for i in 0..5 {
        let p = sub.next().await;
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_ne!(p.pkid, 0);
        assert!(!p.dup);
        assert_eq!(number(&p), i);
        held.push(p);
    }
    sub.expect_silence().await;
    assert_eq!(node.metric("lorabroker_inflight_messages").await, 5);
    // The QoS 0 subscriber is not held back by the other's window.
    for i in 0..20 {
        let (_, payload) = raw.next_publish().await;
        assert_eq!(payload, i.to_string());
    }
    // Each PUBACK lets one more go, in order.
    sub.client.ack(&held.remove(0)).await.unwrap();
    let fifth = sub.next().await;
    assert_eq!(number(&fifth), 5);
    sub.expect_silence().await;
    held.push(fifth);
    for p in held.drain(..) {
        sub.client.ack(&p).await.unwrap();
    }
    let mut next = 6;
    while next < 20 {
        let p = sub.next().await;
        assert_eq!(number(&p), next);
        sub.client.ack(&p).await.unwrap();
        next += 1;
    }
    node.metric_becomes(
        "every PUBLISH acknowledged",
        "lorabroker_inflight_messages",
        0,
    )
    .await;
    node.shutdown().await;
}

/// A client that comes back with `clean_session=0` finds its session (CONNACK session
/// present), its subscriptions, and every message it missed, in order.
async fn missed_messages_come_back_in_order(backend: Backend) {
    let (_env, node, app, key) = world(backend).await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let id = unique("backend");
    let first = login.connect(&id, false, false).await;
    assert!(!first.present, "a new session");
    first.subscribe("v3/+/devices/+/up", QoS::AtLeastOnce).await;
    // The SUBACK comes once the filter is stored.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.client.disconnect().await.unwrap();
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;

    uplinks(&node, &device(&app, "dev1"), 0..1000).await;
    // Another device's join does not match the session's filter.
    node.upstream()
        .publish(&device(&app, "dev2"), DeviceEvent::Join, "join".into())
        .await
        .unwrap();

    let mut back = login.connect(&id, false, false).await;
    assert!(back.present, "the session is resumed");
    let (order, duplicates) = receive_all(&mut back, 1000).await;
    assert_eq!(order, (0..1000).collect::<Vec<_>>(), "in order");
    assert_eq!(
        duplicates, 0,
        "nothing was sent before, so nothing comes twice"
    );
    back.expect_silence().await;
    // New traffic flows to the resumed session without a new SUBSCRIBE.
    uplinks(&node, &device(&app, "dev3"), 1000..1001).await;
    assert_eq!(number(&back.next().await), 1000);
    assert_eq!(
        node.metric(r#"lorabroker_sessions_opened_total{outcome="resumed"}"#)
            .await,
        1
    );
    node.shutdown().await;
}

/// What a connection received and never acknowledged comes again, first, with DUP=1.
async fn unacknowledged_messages_are_redelivered_with_dup(backend: Backend) {
    let (_env, node, app, key) = world(backend).await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let id = unique("backend");
    let mut first = login.connect(&id, false, true).await;
    first.subscribe("#", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    uplinks(&node, &device(&app, "dev1"), 0..10).await;
    for i in 0..10 {
        let p = first.next().await;
        assert_eq!(number(&p), i);
        if i < 4 {
            first.client.ack(&p).await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.drop_connection();
    // Once the node saw the connection end, what comes next was never sent to anyone.
    detached(&node).await;
    uplinks(&node, &device(&app, "dev1"), 10..15).await;

    let mut back = login.connect(&id, false, false).await;
    assert!(back.present);
    for i in 4..15 {
        let p = back.next().await;
        assert_eq!(number(&p), i, "in order, from the first unacknowledged");
        assert_eq!(
            p.dup,
            i < 10,
            "message {i}: DUP only on what was sent before"
        );
        assert_eq!(p.qos, QoS::AtLeastOnce);
    }
    back.expect_silence().await;
    assert!(
        node.metric(r#"lorabroker_session_messages_total{outcome="redelivered"}"#)
            .await
            >= 6
    );
    node.shutdown().await;
}

/// A `clean_session=1` CONNECT discards the stored session and what it held.
async fn a_clean_connect_discards_the_session(backend: Backend) {
    let (_env, node, app, key) = world(backend).await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let id = unique("backend");
    let first = login.connect(&id, false, false).await;
    first.subscribe("#", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first);
    uplinks(&node, &device(&app, "dev1"), 0..5).await;
    let clean = login.connect(&id, true, false).await;
    assert!(!clean.present);
    drop(clean);
    node.metric_becomes(
        "the session discarded",
        "lorabroker_sessions_discarded_total",
        1,
    )
    .await;
    let mut again = login.connect(&id, false, false).await;
    assert!(!again.present, "the session was discarded");
    again.expect_silence().await;
    node.shutdown().await;
}

/// The common reset pattern: a clean connect, then at once a persistent one with the same
/// client ID. The second gets a new, empty session that lasts: the discard of the first
/// is done before its CONNACK, so it cannot delete the new session under it.
async fn a_persistent_connect_right_after_a_clean_one_gets_a_lasting_session(backend: Backend) {
    let (_env, node, app, key) = world(backend).await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let id = unique("backend");
    let mut old = login.connect(&id, false, false).await;
    old.subscribe_acked("#", QoS::AtLeastOnce).await;
    drop(old);
    detached(&node).await;
    uplinks(&node, &device(&app, "dev1"), 0..5).await;
    for round in 0..5 {
        drop(login.connect(&id, true, false).await);
        let mut fresh = login.connect(&id, false, false).await;
        assert!(
            !fresh.present,
            "round {round}: the clean connect discarded the session"
        );
        fresh.subscribe_acked("#", QoS::AtLeastOnce).await;
        uplinks(&node, &device(&app, "dev1"), 100..101).await;
        assert_eq!(number(&fresh.next().await), 100, "round {round}");
        fresh.expect_silence().await;
        drop(fresh);
        detached(&node).await;
        let back = login.connect(&id, false, false).await;
        assert!(back.present, "round {round}: the new session lasts");
        drop(back);
        detached(&node).await;
    }
    node.shutdown().await;
}

/// Past `sessions.max_pending_messages` the oldest stored messages are dropped, counted,
/// and announced to the application.
async fn pending_messages_are_bounded(backend: Backend) {
    let (env, node, app, key) = world_with(backend, |c| {
        c.sessions.max_pending_messages = 10;
    })
    .await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let id = unique("backend");
    let first = login.connect(&id, false, false).await;
    first.subscribe("#", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    uplinks(&node, &device(&app, "dev1"), 0..30).await;
    let mut back = login.connect(&id, false, false).await;
    assert!(back.present);
    for i in 20..30 {
        assert_eq!(number(&back.next().await), i, "the newest ten are kept");
    }
    back.expect_silence().await;
    let series = format!(
        r#"lorabroker_session_overflow_dropped_total{{tenant="{}",application="app1"}}"#,
        env.tenant
    );
    assert_eq!(node.metric(&series).await, 20);
    node.shutdown().await;
}

/// A tenant keeps at most `sessions.max_sessions_per_tenant` sessions: one more new
/// session is refused with CONNACK 3 and counted; the existing ones still resume, and a
/// discarded one makes room.
async fn sessions_per_tenant_are_bounded(backend: Backend) {
    let (_env, node, app, key) = world_with(backend, |c| {
        c.sessions.max_sessions_per_tenant = 2;
    })
    .await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let ids = [unique("a"), unique("b"), unique("c")];
    for id in &ids[..2] {
        drop(login.connect(id, false, false).await);
        detached(&node).await;
    }
    let third = persistent_connect(&node, &app, &key, &ids[2]).await;
    assert_eq!(
        third.err(),
        Some(rumqttc::ConnectReturnCode::ServiceUnavailable)
    );
    assert_eq!(
        node.metric(r#"lorabroker_connects_total{outcome="refused_sessions_full"}"#)
            .await,
        1
    );
    // A clean session needs no room, and an existing session resumes.
    drop(login.connect(&ids[2], true, false).await);
    let back = login.connect(&ids[0], false, false).await;
    assert!(back.present);
    drop(back);
    detached(&node).await;
    // Discarding one makes room for the third.
    drop(login.connect(&ids[1], true, false).await);
    let third = login.connect(&ids[2], false, false).await;
    assert!(!third.present);
    node.shutdown().await;
}

/// A `clean_session=0` CONNECT that may be refused: its CONNACK code when it is.
async fn persistent_connect(
    node: &TestNode,
    app: &AppRef,
    key: &str,
    client_id: &str,
) -> Result<common::broker::TestClient, rumqttc::ConnectReturnCode> {
    let addr = node.addr(Kind::Tcp);
    let opts = common::persistent::options(addr, &node.username(app), key, client_id, false, false);
    common::broker::TestClient::connect_with(opts).await
}

/// A session is discarded `sessions.expiry` after its connection ended.
async fn sessions_expire(backend: Backend) {
    let (_env, node, app, key) = world_with(backend, |c| {
        c.sessions.expiry = Duration::from_secs(1);
    })
    .await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let id = unique("backend");
    let first = login.connect(&id, false, false).await;
    first.subscribe("#", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first);
    // Still there within the expiry.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = login.connect(&id, false, false).await;
    assert!(again.present);
    drop(again);
    // Four times the expiry: the embedded store's timer and JetStream's inactivity check
    // both run at the expiry.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let late = login.connect(&id, false, false).await;
    assert!(!late.present, "the session expired");
    assert_eq!(node.metric("lorabroker_sessions_expired_total").await, 1);
    node.shutdown().await;
}

/// What the store keeps for a tenant is in `/metrics`: its sessions, and the messages and
/// bytes waiting for them, until they are delivered and acknowledged.
async fn what_the_store_keeps_is_in_the_metrics(backend: Backend) {
    let (env, node, app, key) = world_with(backend, |c| {
        c.sessions.usage_interval = Duration::from_millis(100);
    })
    .await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let id = unique("backend");
    let mut first = login.connect(&id, false, false).await;
    first.subscribe_acked("#", QoS::AtLeastOnce).await;
    drop(first);
    detached(&node).await;
    uplinks(&node, &device(&app, "dev1"), 0..30).await;
    let series = |name: &str| format!(r#"{name}{{tenant="{}"}}"#, env.tenant);
    node.metric_becomes(
        "the session counted",
        &series("lorabroker_sessions_stored"),
        1,
    )
    .await;
    node.metric_becomes(
        "30 messages kept",
        &series("lorabroker_session_pending_messages"),
        30,
    )
    .await;
    let bytes = node
        .metric(&series("lorabroker_session_pending_bytes"))
        .await;
    assert!(bytes >= 30, "at least the payloads are counted: {bytes}");

    let mut back = login.connect(&id, false, false).await;
    let (order, _) = receive_all(&mut back, 30).await;
    assert_eq!(order, (0..30).collect::<Vec<_>>());
    node.metric_becomes(
        "nothing kept once acknowledged",
        &series("lorabroker_session_pending_messages"),
        0,
    )
    .await;
    node.shutdown().await;
}

crate::on_both_backends!(
    what_the_store_keeps_is_in_the_metrics,
    qos1_window,
    missed_messages_come_back_in_order,
    unacknowledged_messages_are_redelivered_with_dup,
    a_clean_connect_discards_the_session,
    a_persistent_connect_right_after_a_clean_one_gets_a_lasting_session,
    pending_messages_are_bounded,
    sessions_per_tenant_are_bounded,
    sessions_expire,
);

/// Several nodes on one NATS (JetStream) and one Redis: a session left on one node is
/// resumed on another, and a second connection with the session's client ID on another
/// node takes it over.
#[tokio::test]
async fn a_session_moves_between_nodes_and_is_taken_over() {
    let env = TestEnv::new(Backend::Cluster).await;
    let (a, b) = tokio::join!(env.node_with(sessions_on), env.node_with(sessions_on));
    let app = env.app("app1");
    let key = a.key(&app, Rights::DEFAULT).await;
    let (on_a, on_b) = (
        Login {
            node: &a,
            app: &app,
            key: &key,
        },
        Login {
            node: &b,
            app: &app,
            key: &key,
        },
    );
    let id = unique("backend");
    let first = on_a.connect(&id, false, false).await;
    first.subscribe("#", QoS::AtLeastOnce).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first);
    uplinks(&a, &device(&app, "dev1"), 0..100).await;
    let mut on_node_b = on_b.connect(&id, false, false).await;
    assert!(on_node_b.present, "node B resumes node A's session");
    let (order, _) = receive_all(&mut on_node_b, 100).await;
    assert_eq!(order, (0..100).collect::<Vec<_>>());

    // Takeover: the same client ID on node A closes node B's connection.
    let mut taker = on_a.connect(&id, false, false).await;
    assert!(taker.present);
    on_node_b.expect_closed().await;
    uplinks(&b, &device(&app, "dev1"), 100..150).await;
    // What node B's client acknowledged may not all have reached the store before the
    // takeover: such messages come again, with DUP; then the new ones, in order.
    let mut new = Vec::new();
    while new.len() < 50 {
        let p = taker.next().await;
        match number(&p) {
            n if n < 100 => assert!(p.dup, "{n} came again without DUP"),
            n => new.push(n),
        }
    }
    assert_eq!(new, (100..150).collect::<Vec<_>>());
    a.shutdown().await;
    b.shutdown().await;
}
