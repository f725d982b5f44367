//! Shared subscriptions, `$share/{group}/{filter}` (issue 14): each message of the share
//! goes to exactly one member, across nodes; the filter is rewritten inside the client's
//! own application; the group name is checked; at QoS 1 with persistent sessions, what a
//! member did not acknowledge goes to another member. On both backends, with real rumqttc
//! clients.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use rumqttc::{QoS, SubscribeReasonCode};

use common::broker::{Backend, TestEnv, TestNode, WAIT};
use common::persistent::{detached, device, number, uplinks, Client, Login, SILENCE};
use common::raw::Connector;
use common::services::unique;
use lorabroker::auth::Rights;
use lorabroker::config::Config;
use lorabroker::topic::AppRef;
use lorabroker::transport::Kind;

const SHARE: &str = "$share/workers/v3/+/devices/+/up";

fn granted(qos: QoS) -> SubscribeReasonCode {
    SubscribeReasonCode::Success(qos)
}

/// Persistent sessions on, with a short ack wait (what a member's node held unhanded goes
/// to another member after it).
fn persistent(c: &mut Config) {
    c.sessions.enabled = true;
    c.sessions.storage = "memory".into();
    c.sessions.ack_wait = Duration::from_secs(1);
    // Small pulls: JetStream hands a share's messages to its members' pulls in turn.
    c.mqtt.max_inflight = 5;
}

/// Receives until `want` messages arrived at `members` together (each taking what comes
/// while the others wait); returns the numbers each one got.
async fn share_out(members: &mut [&mut Client], want: usize) -> Vec<Vec<u32>> {
    let mut got = vec![Vec::new(); members.len()];
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    while total < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {total} of {want} messages reached the members: {got:?}"
        );
        for (i, m) in members.iter_mut().enumerate() {
            while let Some(p) = m.try_next(Duration::from_millis(20)).await {
                got[i].push(number(&p));
                total += 1;
            }
        }
    }
    got
}

/// Asserts that `got` holds each of `0..want` exactly once over all members, and that
/// every member took part.
fn exactly_once(got: &[Vec<u32>], want: u32) {
    let mut seen = HashSet::new();
    for n in got.iter().flatten() {
        assert!(seen.insert(*n), "message {n} reached two members: {got:?}");
    }
    assert_eq!(seen, (0..want).collect::<HashSet<_>>());
    for (i, g) in got.iter().enumerate() {
        assert!(!g.is_empty(), "member {i} got nothing: {got:?}");
    }
}

async fn world(backend: Backend, tweak: fn(&mut Config)) -> (TestEnv, TestNode, AppRef, String) {
    let env = TestEnv::new(backend).await;
    let node = env.node_with(tweak).await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    (env, node, app, key)
}

/// Three members of one group share the uplinks, each one to exactly one of them, while a
/// plain subscriber and a member of another group each get all of them.
async fn each_message_goes_to_one_member(backend: Backend) {
    let (_env, node, app, key) = world(backend, |_| {}).await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut m = login.connect(&unique("w"), true, false).await;
        assert_eq!(
            m.subscribe_acked(SHARE, QoS::AtMostOnce).await,
            granted(QoS::AtMostOnce)
        );
        members.push(m);
    }
    let mut plain = login.connect(&unique("p"), true, false).await;
    plain
        .subscribe_acked("v3/+/devices/+/up", QoS::AtMostOnce)
        .await;
    let mut other = login.connect(&unique("o"), true, false).await;
    other
        .subscribe_acked("$share/auditors/v3/+/devices/+/up", QoS::AtMostOnce)
        .await;
    uplinks(&node, &device(&app, "dev1"), 0..300).await;
    let mut refs: Vec<&mut Client> = members.iter_mut().collect();
    let got = share_out(&mut refs, 300).await;
    exactly_once(&got, 300);
    for c in [&mut plain, &mut other] {
        for i in 0..300 {
            assert_eq!(number(&c.next().await), i, "a full copy, in order");
        }
    }
    for m in &mut members {
        m.expect_silence().await;
    }
}

/// A share delivers at its QoS; UNSUBSCRIBE leaves the share (the rest go to the others),
/// and a connection's end leaves it too.
async fn members_leave_by_unsubscribe_and_by_disconnect(backend: Backend) {
    let (_env, node, app, key) = world(backend, |_| {}).await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let mut a = login.connect(&unique("a"), true, false).await;
    let mut b = login.connect(&unique("b"), true, false).await;
    let c = login.connect(&unique("c"), true, false).await;
    for m in [&mut a, &mut b] {
        assert_eq!(
            m.subscribe_acked(SHARE, QoS::ExactlyOnce).await,
            granted(QoS::AtLeastOnce)
        );
    }
    let mut c = c;
    c.subscribe_acked(SHARE, QoS::AtLeastOnce).await;
    c.drop_connection();
    node.metric_becomes("the closed member left", "lorabroker_subscriptions", 2)
        .await;
    let dev = device(&app, "dev1");
    uplinks(&node, &dev, 0..100).await;
    let got = share_out(&mut [&mut a, &mut b], 100).await;
    exactly_once(&got, 100);
    a.client.unsubscribe(SHARE).await.unwrap();
    node.metric_becomes("a left the share", "lorabroker_subscriptions", 1)
        .await;
    uplinks(&node, &dev, 100..150).await;
    for i in 100..150 {
        let p = b.next().await;
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_eq!(number(&p), i);
    }
    a.expect_silence().await;
}

/// A share is inside the client's application, its group name is checked, and it takes a
/// place of `mqtt.max_subscriptions` like any filter; refusals are counted by reason.
async fn shares_are_checked_and_bounded(backend: Backend) {
    let (_env, node, app, key) = world(backend, |c| c.mqtt.max_subscriptions = 2).await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    // Raw packets: rumqttc itself refuses to send some of these filters.
    let mut raw = Connector::of(&node, Kind::Tcp, &[]).open().await;
    assert_eq!(raw.connect(&node.username(&app), &key).await, 0);
    let other_app = format!("$share/g/v3/other@{}/devices/+/up", app.tenant);
    for bad in ["$share/g+/#", "$share//#", "$share/g", other_app.as_str()] {
        assert!(!raw.subscribe(bad).await, "{bad} refused");
    }
    let mut m = login.connect(&unique("m"), true, false).await;
    assert_eq!(
        node.metric(r#"lorabroker_subscriptions_refused_total{reason="invalid_share"}"#)
            .await,
        3
    );
    assert_eq!(
        m.subscribe_acked(SHARE, QoS::AtMostOnce).await,
        granted(QoS::AtMostOnce)
    );
    // The same share again takes no second place.
    assert_eq!(
        m.subscribe_acked(SHARE, QoS::AtLeastOnce).await,
        granted(QoS::AtLeastOnce)
    );
    assert_eq!(
        m.subscribe_acked("v3/+/devices/+/join", QoS::AtMostOnce)
            .await,
        granted(QoS::AtMostOnce)
    );
    assert_eq!(
        m.subscribe_acked("$share/other/#", QoS::AtMostOnce).await,
        SubscribeReasonCode::Failure
    );
    assert_eq!(
        node.metric(r#"lorabroker_subscriptions_refused_total{reason="max_subscriptions"}"#)
            .await,
        1
    );
}

/// Persistent members (QoS 1, manual acknowledgements): what one member was handed and
/// did not acknowledge goes to the other member, marked DUP, once its connection ends; the
/// share keeps what arrives while every member is away, and a member that comes back
/// (session present, its share restored from the session) gets it.
async fn unacknowledged_shared_messages_go_to_another_member(backend: Backend) {
    let (_env, node, app, key) = world(backend, persistent).await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let (id_a, id_b) = (unique("a"), unique("b"));
    let mut a = login.connect(&id_a, false, true).await;
    let mut b = login.connect(&id_b, false, true).await;
    for m in [&mut a, &mut b] {
        assert_eq!(
            m.subscribe_acked(SHARE, QoS::AtLeastOnce).await,
            granted(QoS::AtLeastOnce)
        );
    }
    // The SUBACKs say both have joined the share in the store.
    let dev = device(&app, "dev1");
    uplinks(&node, &dev, 0..40).await;
    // a takes what comes to it and acknowledges nothing (so it holds its window, and what
    // its pump took ahead of it); b acknowledges everything, until nothing more comes.
    let mut held_by_a = Vec::new();
    let mut acked = HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    let mut quiet_since = tokio::time::Instant::now();
    while held_by_a.is_empty() || quiet_since.elapsed() < SILENCE {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the uplinks stopped arriving: a {held_by_a:?}, b {acked:?}"
        );
        while let Some(p) = a.try_next(Duration::from_millis(20)).await {
            assert_eq!(p.qos, QoS::AtLeastOnce);
            held_by_a.push(number(&p));
            quiet_since = tokio::time::Instant::now();
        }
        while let Some(p) = b.try_next(Duration::from_millis(20)).await {
            acked.insert(number(&p));
            b.client.ack(&p).await.unwrap();
            quiet_since = tokio::time::Instant::now();
        }
    }
    a.drop_connection();
    // What a held comes to b again, as a redelivery.
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while acked.len() < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 40 acknowledged; a held {held_by_a:?}",
            acked.len()
        );
        if let Some(p) = b.try_next(Duration::from_millis(50)).await {
            let n = number(&p);
            if held_by_a.contains(&n) {
                assert!(p.dup, "message {n} came again without DUP");
            }
            acked.insert(n);
            b.client.ack(&p).await.unwrap();
        }
    }
    assert_eq!(acked, (0..40).collect::<HashSet<_>>());
    b.drop_connection();
    detached(&node).await;
    // Nobody is connected: the share keeps what comes.
    uplinks(&node, &dev, 40..60).await;
    let mut a = login.connect(&id_a, false, false).await;
    assert!(a.present, "a's session (with its share) was resumed");
    let mut got = HashSet::new();
    while got.len() < 20 {
        let p = a.next().await;
        let n = number(&p);
        // One acknowledged as its member left may come once more. On the embedded store it
        // carries DUP; nats-server 2.9 can undo the delivery to a member that left (the
        // share consumer's delivered sequence goes back), so there a repeat may come
        // without DUP: shown, never lost (issue 14 note).
        if n < 40 && !p.dup {
            assert_eq!(backend, Backend::Cluster, "message {n} again without DUP");
            eprintln!("JetStream repeated message {n} without DUP");
        }
        if n >= 40 {
            got.insert(n);
        }
    }
    assert_eq!(got, (40..60).collect::<HashSet<_>>());
}

/// A persistent member's new share is kept by the store like a session: it counts
/// against `sessions.max_sessions_per_tenant`, and past it the filter gets SUBACK 0x80
/// (counted as `sessions_full`), while joining a share that exists still works.
async fn new_shares_count_against_the_tenants_sessions(backend: Backend) {
    let (_env, node, app, key) = world(backend, |c| {
        persistent(c);
        c.sessions.max_sessions_per_tenant = 2;
    })
    .await;
    let login = Login {
        node: &node,
        app: &app,
        key: &key,
    };
    let id = unique("m");
    let mut member = login.connect(&id, false, false).await;
    assert_eq!(
        member.subscribe_acked(SHARE, QoS::AtLeastOnce).await,
        granted(QoS::AtLeastOnce),
        "the session and its share: two of two"
    );
    assert_eq!(
        member
            .subscribe_acked("$share/others/v3/+/devices/+/up", QoS::AtLeastOnce)
            .await,
        SubscribeReasonCode::Failure,
        "a third would pass the bound"
    );
    assert_eq!(
        node.metric(r#"lorabroker_subscriptions_refused_total{reason="sessions_full"}"#)
            .await,
        1
    );
    drop(member);
    detached(&node).await;
    // Coming back, the session and its existing share are restored.
    let mut back = login.connect(&id, false, false).await;
    assert!(back.present);
    assert_eq!(
        back.subscribe_acked(SHARE, QoS::AtLeastOnce).await,
        granted(QoS::AtLeastOnce)
    );
    node.shutdown().await;
}

crate::on_both_backends!(
    new_shares_count_against_the_tenants_sessions,
    each_message_goes_to_one_member,
    members_leave_by_unsubscribe_and_by_disconnect,
    shares_are_checked_and_bounded,
    unacknowledged_shared_messages_go_to_another_member,
);

/// The members of one share on two nodes share its messages: each goes to exactly one
/// member, whichever node holds it (a NATS queue group), at QoS 0 and, with persistent
/// sessions, at QoS 1 from the share in JetStream.
#[tokio::test]
async fn a_share_spans_nodes() {
    let env = TestEnv::new(Backend::Cluster).await;
    let nodes = [
        env.node_with(persistent).await,
        env.node_with(persistent).await,
    ];
    let app = env.app("app1");
    let key = nodes[0].key(&app, Rights::DEFAULT).await;
    for (clean, share, first) in [
        (true, "$share/g0/v3/+/devices/+/up", 0),
        (false, "$share/g1/v3/+/devices/+/up", 200),
    ] {
        let mut members = Vec::new();
        for node in &nodes {
            let login = Login {
                node,
                app: &app,
                key: &key,
            };
            let mut m = login.connect(&unique("m"), clean, false).await;
            m.subscribe_acked(share, QoS::AtLeastOnce).await;
            members.push(m);
        }
        // The SUBACKs say each node's member is in the share (its queue group, or the
        // share's consumer in JetStream).
        uplinks(&nodes[0], &device(&app, "dev1"), first..first + 200).await;
        let mut refs: Vec<&mut Client> = members.iter_mut().collect();
        let got = share_out(&mut refs, 200).await;
        let shifted: Vec<Vec<u32>> = got
            .iter()
            .map(|g| g.iter().map(|n| n - first).collect())
            .collect();
        exactly_once(&shifted, 200);
    }
}
