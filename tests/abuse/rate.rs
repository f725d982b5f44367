//! Rate limits under attack (issue 9 point 3), each on a cluster-backed node with a
//! [`Bystander`] of another tenant watching.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttbytes::v4::{Packet, Publish};
use mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::broker::{Backend, TestEnv, TestNode};
use crate::{metric, Bystander, RawClient};
use lorabroker::auth::{generate, Rights};
use lorabroker::limits::Rate;
use lorabroker::topic::{DeviceRef, Id};

/// Calls of Redis command `cmd` so far, from the test's own redis-server.
async fn redis_calls(env: &TestEnv, cmd: &str) -> u64 {
    let info: String = env
        .redis
        .as_ref()
        .expect("cluster backend")
        .query(&["INFO", "commandstats"])
        .await;
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accept_flood_from_one_ip_is_closed_before_any_read() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| c.limits.accepts_per_ip = Rate::new(10.0, 20))
        .await;
    let bystander = Bystander::start(&node).await;
    let started = Instant::now();
    let mut sockets = Vec::new();
    for _ in 0..300 {
        sockets.push(
            RawClient::open_from(node.mqtt_addr, "127.0.0.2")
                .await
                .unwrap(),
        );
    }
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut closed_at_once = 0;
    let mut held = Vec::new();
    for mut s in sockets {
        // A refused socket is closed by the server without a byte written by either side.
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(5), s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed_at_once += 1,
            Ok(Ok(_)) => panic!("the server wrote before the client did"),
            Err(_) => held.push(s),
        }
    }
    let elapsed = opened.as_secs_f64();
    let allowed = 20.0 + 10.0 * elapsed;
    eprintln!(
        "accept flood: {} of 300 served, {closed_at_once} closed at once in {elapsed:.1}s",
        held.len()
    );
    assert!(
        (held.len() as f64) <= allowed + 1.0,
        "{} served, at most {allowed:.0} allowed",
        held.len()
    );
    assert!(held.len() >= 20, "the burst is served");
    assert_eq!(
        metric(
            &node,
            "lorabroker_rate_limited_total{limit=\"accepts_per_ip\"}"
        ),
        closed_at_once
    );
    bystander.finish().await;
    drop(held);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_key_connect_storm_costs_redis_a_bounded_number_of_reads() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| {
            c.limits.failed_connects_per_ip = Rate::new(0.5, 10);
            c.limits.failed_connect_cooldown = Duration::from_secs(60);
        })
        .await;
    let app = env.app("app1");
    let user = node.username(&app);
    // The same storm against a node without the limit: one Redis GET per random key.
    let open = env.node().await;
    let before = redis_calls(&env, "get").await;
    for _ in 0..100 {
        let s = RawClient::open_from(open.mqtt_addr, "127.0.0.3")
            .await
            .unwrap();
        assert_eq!(
            RawClient::login(s, &user, &generate().key, 30)
                .await
                .connack()
                .await,
            5
        );
    }
    let unlimited = redis_calls(&env, "get").await - before;
    eprintln!("random-key storm without the limit: 100 CONNECTs, {unlimited} Redis GETs");
    assert!(
        unlimited >= 100,
        "each random key is a Redis read without the limit"
    );
    open.shutdown().await;
    let bystander = Bystander::start(&node).await;
    let before = redis_calls(&env, "get").await;
    let mut codes = [0usize; 256];
    for _ in 0..300 {
        let s = RawClient::open_from(node.mqtt_addr, "127.0.0.3")
            .await
            .unwrap();
        let mut c = RawClient::login(s, &user, &generate().key, 30).await;
        codes[c.connack().await as usize] += 1;
    }
    let gets = redis_calls(&env, "get").await - before;
    eprintln!("random-key storm: 300 CONNECTs, {gets} Redis GETs");
    assert_eq!(codes[5], 300, "every one refused with CONNACK 5");
    assert!(gets <= 15, "{gets} Redis GETs for 300 random keys");
    // A valid key from the banned address waits for the cool-down too (documented); the
    // same key from another address gets in.
    let key = node.key(&app, Rights::DEFAULT).await;
    let s = RawClient::open_from(node.mqtt_addr, "127.0.0.3")
        .await
        .unwrap();
    assert_eq!(
        RawClient::login(s, &user, &key, 30).await.connack().await,
        5
    );
    let s = RawClient::open_from(node.mqtt_addr, "127.0.0.4")
        .await
        .unwrap();
    assert_eq!(
        RawClient::login(s, &user, &key, 30).await.connack().await,
        0
    );
    assert!(
        metric(
            &node,
            "lorabroker_rate_limited_total{limit=\"failed_connects_per_ip\"}"
        ) >= 280
    );
    bystander.finish().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_storm_with_one_key_is_refused_past_its_rate() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| c.limits.connects_per_key = Rate::new(1.0, 5))
        .await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let bystander = Bystander::start(&node).await;
    let started = Instant::now();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..100 {
        let mut c = RawClient::connect(node.mqtt_addr, &node.username(&app), &key, 30).await;
        match c.connack().await {
            0 => accepted += 1,
            3 => refused += 1,
            other => panic!("CONNACK {other}"),
        }
    }
    let allowed = 5.0 + started.elapsed().as_secs_f64();
    eprintln!("connect storm per key: {accepted} of 100 accepted, {refused} CONNACK 3");
    assert!(
        accepted >= 5 && (accepted as f64) <= allowed + 1.0,
        "{accepted} accepted"
    );
    assert_eq!(
        metric(
            &node,
            "lorabroker_rate_limited_total{limit=\"connects_per_key\"}"
        ),
        refused
    );
    bystander.finish().await;
    node.shutdown().await;
}

fn push(topic: &str, pkid: u16) -> Vec<u8> {
    let body = r#"{"downlinks":[{"f_port":1,"frm_payload":"AQ=="}]}"#;
    let mut p = Publish::new(topic, QoS::AtLeastOnce, body);
    p.pkid = pkid;
    let mut out = BytesMut::new();
    p.write(&mut out).unwrap();
    out.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downlink_flood_is_dropped_reported_once_and_then_disconnected() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| {
            c.limits.downlinks_per_key = Rate::new(5.0, 10);
            c.limits.rate_limited_reports_per_key = Rate::new(0.1, 1);
            c.limits.downlink_disconnect_after = 300;
        })
        .await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let user = node.username(&app);
    let bystander = Bystander::start(&node).await;
    // The attacker's own application watches its down/failed events.
    let mut watcher = node
        .client(&app, &node.key(&app, Rights::DEFAULT).await)
        .await;
    watcher
        .subscribe(&format!("v3/{user}/devices/+/down/failed"))
        .await;
    let mut flood = RawClient::connect(node.mqtt_addr, &user, &key, 30).await;
    assert_eq!(flood.connack().await, 0);
    let topic = format!("v3/{user}/devices/dev1/down/push");
    let started = Instant::now();
    let mut acked = 0;
    for pkid in 1..=200u16 {
        flood.stream.write_all(&push(&topic, pkid)).await.unwrap();
        match flood.packet().await {
            Packet::PubAck(a) if a.pkid == pkid => acked += 1,
            other => panic!("expected PUBACK {pkid}, got {other:?}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(acked, 200, "dropped publishes are still acknowledged");
    let device = DeviceRef::new(app.clone(), Id::parse("dev1").unwrap());
    let upstream = node.upstream();
    let mut queued = 0;
    while upstream.next_downlink(&device).await.unwrap().is_some() {
        queued += 1;
    }
    eprintln!("downlink flood: 200 pushes in {elapsed:.2}s, {queued} queued");
    assert!(
        queued >= 10 && (queued as f64) <= 10.0 + 5.0 * elapsed + 1.0,
        "{queued} queued"
    );
    let failed = watcher.next_on("/down/failed").await;
    assert_eq!(failed["downlink_failed"]["error"]["name"], "rate_limited");
    watcher.expect_silence(Duration::from_millis(500)).await;
    // Keeping on past downlink_disconnect_after closes the connection.
    let mut closed = false;
    for pkid in 201..=600u16 {
        if flood.stream.write_all(&push(&topic, pkid)).await.is_err() {
            closed = true;
            break;
        }
        match flood.try_packet().await {
            Some(Packet::PubAck(_)) => {}
            None => {
                closed = true;
                break;
            }
            Some(other) => panic!("got {other:?}"),
        }
    }
    assert!(closed, "the flood was disconnected");
    assert_eq!(
        metric(
            &node,
            "lorabroker_disconnects_total{outcome=\"rate_limited\"}"
        ),
        1
    );
    assert!(
        metric(
            &node,
            "lorabroker_rate_limited_total{limit=\"downlinks_per_key\"}"
        ) >= 180
    );
    bystander.finish().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_flood_gets_0x80_past_its_rate() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| c.limits.subscribes_per_connection = Rate::new(2.0, 5))
        .await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let user = node.username(&app);
    let bystander = Bystander::start(&node).await;
    let mut c = RawClient::connect(node.mqtt_addr, &user, &key, 30).await;
    assert_eq!(c.connack().await, 0);
    let started = Instant::now();
    let mut granted = 0;
    for i in 1..=200u16 {
        let filter = format!("v3/{user}/devices/dev{i}/up");
        if c.subscribe(i, &filter).await == 0 {
            granted += 1;
        }
    }
    let allowed = 5.0 + 2.0 * started.elapsed().as_secs_f64();
    eprintln!("subscribe flood: {granted} of 200 SUBSCRIBEs granted");
    assert!(
        granted >= 5 && (granted as f64) <= allowed + 1.0,
        "{granted}"
    );
    assert_eq!(
        metric(
            &node,
            "lorabroker_rate_limited_total{limit=\"subscribes_per_connection\"}"
        ),
        200 - granted
    );
    bystander.finish().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_zero_and_over_the_max_are_held_to_the_max() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node: TestNode = env
        .node_with(|c| c.mqtt.max_keepalive = Duration::from_secs(1))
        .await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let user = node.username(&app);
    let bystander = Bystander::start(&node).await;
    for keep_alive in [0u16, 600] {
        let mut c = RawClient::connect(node.mqtt_addr, &user, &key, keep_alive).await;
        assert_eq!(c.connack().await, 0);
        let started = Instant::now();
        let end = tokio::time::timeout(Duration::from_secs(10), c.try_packet()).await;
        assert!(matches!(end, Ok(None)), "keepalive {keep_alive}: {end:?}");
        let after = started.elapsed();
        // 1.5 × the 1 s maximum, with room for a busy machine.
        assert!(
            after >= Duration::from_millis(1400) && after < Duration::from_secs(5),
            "keepalive {keep_alive} closed after {after:?}"
        );
    }
    assert_eq!(
        metric(
            &node,
            "lorabroker_disconnects_total{outcome=\"keepalive_timeout\"}"
        ),
        2
    );
    bystander.finish().await;
    node.shutdown().await;
}
