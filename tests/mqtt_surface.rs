//! The MQTT surface of DESIGN §2–§6, driven by real MQTT clients over real sockets, run
//! once on the embedded backends and once on NATS + Redis (one suite, so the two cannot
//! drift apart).

mod common;

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use rumqttc::{ConnectReturnCode, LastWill, MqttOptions, QoS, SubscribeReasonCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::broker::{Backend, TestClient, TestEnv, TestNode, WAIT};
use common::services::unique;
use lorabroker::auth::Rights;
use lorabroker::cluster::revoke_key;
use lorabroker::topic::{DeviceRef, Event, Id};

const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtMostOnce);
const SILENCE: Duration = Duration::from_millis(300);

/// Generates one `#[tokio::test]` per backend for each suite function.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Embedded).await })*
        }
        mod cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Cluster).await })*
        }
    };
}

suite!(
    uplinks_reach_only_their_application,
    subscriptions_are_rewritten_like_the_things_stack,
    connack_codes_for_bad_credentials,
    protocol_level_and_client_id_refusals,
    garbage_and_oversized_packets_close_only_that_connection,
    connect_timeout_and_keepalive_are_enforced,
    forbidden_publishes_are_acknowledged_and_dropped,
    downlink_push_and_replace_reach_the_queue_and_events,
    rejected_downlinks_publish_down_failed_and_enqueue_nothing,
    client_id_takeover_on_one_node,
    revocation_and_expiry_disconnect_clients,
    wills_are_kept_only_on_writable_topics,
    single_tenant_mode_uses_bare_application_ids,
    health_readiness_metrics_and_drain,
);

fn dev(env: &TestEnv, app: &str, dev: &str) -> DeviceRef {
    DeviceRef::new(env.app(app), Id::parse(dev).unwrap())
}

async fn uplinks_reach_only_their_application(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app1 = env.app("app1");
    let app2 = env.app("app2");
    let other_tenant =
        lorabroker::topic::AppRef::new(Id::parse(&unique("other")).unwrap(), app1.app.clone());

    let mut c1 = node
        .client(&app1, &node.key(&app1, Rights::DEFAULT).await)
        .await;
    let mut c2 = node
        .client(&app2, &node.key(&app2, Rights::DEFAULT).await)
        .await;
    let mut c3 = node
        .client(
            &other_tenant,
            &node.key(&other_tenant, Rights::DEFAULT).await,
        )
        .await;
    for c in [&mut c1, &mut c2, &mut c3] {
        assert_eq!(c.subscribe("#").await, GRANTED);
    }

    let doc = br#"{"end_device_ids":{"device_id":"dev1","application_ids":{"application_id":"app1"}},"uplink_message":{"f_port":15,"frm_payload":"VGVzdA=="}}"#;
    node.upstream()
        .publish(
            &dev(&env, "app1", "dev1"),
            Event::Up,
            bytes::Bytes::from_static(doc),
        )
        .await
        .unwrap();
    let (topic, payload) = c1.next_publish().await;
    assert_eq!(topic, format!("v3/app1@{}/devices/dev1/up", env.tenant));
    assert_eq!(&payload[..], &doc[..], "bytes are forwarded unchanged");
    c2.expect_silence(SILENCE).await;
    c3.expect_silence(SILENCE).await;

    // Every event maps to its topic.
    for event in Event::ALL {
        node.upstream()
            .publish(
                &dev(&env, "app1", "dev2"),
                event,
                bytes::Bytes::from_static(b"{}"),
            )
            .await
            .unwrap();
        let (topic, _) = c1.next_publish().await;
        assert_eq!(
            topic,
            format!(
                "v3/app1@{}/devices/dev2/{}",
                env.tenant,
                event.topic_suffix()
            )
        );
    }
}

async fn subscriptions_are_rewritten_like_the_things_stack(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;

    let mut ups = node.client(&app, &key).await;
    assert_eq!(ups.subscribe("v3/+/devices/+/up").await, GRANTED);
    let mut dev1 = node.client(&app, &key).await;
    assert_eq!(
        dev1.subscribe(&format!("v3/{uid}/devices/dev1/#")).await,
        GRANTED
    );
    let mut all = node.client(&app, &key).await;
    assert_eq!(all.subscribe("v3/#").await, GRANTED);
    for denied in [
        format!("v3/app2@{}/#", env.tenant),
        "v3/app1/#".to_owned(),
        "+/#".to_owned(),
        "v2/#".to_owned(),
        "$SYS/#".to_owned(),
    ] {
        assert_eq!(
            all.subscribe(&denied).await,
            SubscribeReasonCode::Failure,
            "{denied}"
        );
    }
    let read_less = node.key(&app, Rights::TRAFFIC_DOWN_WRITE).await;
    let mut writer = node.client(&app, &read_less).await;
    assert_eq!(writer.subscribe("#").await, SubscribeReasonCode::Failure);

    let up = node.upstream();
    up.publish(&dev(&env, "app1", "dev2"), Event::Join, "{}".into())
        .await
        .unwrap();
    up.publish(&dev(&env, "app1", "dev2"), Event::Up, "{}".into())
        .await
        .unwrap();
    up.publish(&dev(&env, "app1", "dev1"), Event::DownAck, "{}".into())
        .await
        .unwrap();

    assert!(ups.next_publish().await.0.ends_with("/devices/dev2/up"));
    ups.expect_silence(SILENCE).await;
    assert!(dev1
        .next_publish()
        .await
        .0
        .ends_with("/devices/dev1/down/ack"));
    dev1.expect_silence(SILENCE).await;
    for suffix in ["dev2/join", "dev2/up", "dev1/down/ack"] {
        assert!(all.next_publish().await.0.ends_with(suffix));
    }
    writer.expect_silence(SILENCE).await;

    // UNSUBSCRIBE stops delivery.
    all.client.unsubscribe("v3/#").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    up.publish(&dev(&env, "app1", "dev1"), Event::Up, "{}".into())
        .await
        .unwrap();
    assert!(dev1.next_publish().await.0.ends_with("/devices/dev1/up"));
    all.expect_silence(SILENCE).await;
}

async fn connect_code(
    node: &TestNode,
    username: &str,
    password: &str,
) -> Option<ConnectReturnCode> {
    TestClient::connect(node.mqtt_addr, username, password, &unique("c"))
        .await
        .err()
}

async fn connack_codes_for_bad_credentials(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app1 = env.app("app1");
    let app2 = env.app("app2");
    let uid = node.username(&app1);
    let key = node.key(&app1, Rights::DEFAULT).await;
    assert_eq!(connect_code(&node, &uid, &key).await, None);

    let unknown = lorabroker::auth::generate().key;
    assert_eq!(
        connect_code(&node, &uid, &unknown).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    let wrong_secret = format!(
        "{}{}",
        &key[..key.len() - 4],
        if key.ends_with("AAAA") {
            "BBBB"
        } else {
            "AAAA"
        }
    );
    assert_eq!(
        connect_code(&node, &uid, &wrong_secret).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    let other_app = node.key(&app2, Rights::DEFAULT).await;
    assert_eq!(
        connect_code(&node, &uid, &other_app).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    let no_rights = node.key(&app1, Rights::NONE).await;
    assert_eq!(
        connect_code(&node, &uid, &no_rights).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    let expired = node
        .key_expiring(&app1, Rights::DEFAULT, Some(Duration::from_secs(1)))
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        connect_code(&node, &uid, &expired).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    let revoked = node.key(&app1, Rights::DEFAULT).await;
    let revoked_id = revoked.split('.').nth(1).unwrap();
    revoke_key(node.app.keys.as_ref(), node.app.bus.as_ref(), revoked_id)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        connect_code(&node, &uid, &revoked).await,
        Some(ConnectReturnCode::NotAuthorized)
    );

    assert_eq!(
        connect_code(&node, &uid, "NNSXS.VEEBURF3KR77ZR..").await,
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(
        connect_code(&node, &uid, "").await,
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    assert_eq!(
        connect_code(&node, "app1", &key).await,
        Some(ConnectReturnCode::BadUserNamePassword),
        "multi-tenant needs app@tenant"
    );
    assert_eq!(
        connect_code(&node, "APP1@x", &key).await,
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    let mut raw = RawClient::connect(&node).await;
    raw.send(&connect_packet(4, "no-login", true, 30, None))
        .await;
    assert_eq!(raw.connack().await, Some(4), "no username/password");

    // The legitimate key still works after all of that.
    assert_eq!(connect_code(&node, &uid, &key).await, None);
}

/// A raw socket, for what a well-behaved client library will not send.
struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    async fn connect(node: &TestNode) -> Self {
        Self {
            stream: TcpStream::connect(node.mqtt_addr).await.unwrap(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed; a failed write shows up as a close later.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The CONNACK return code, or `None` if the server closed without one.
    async fn connack(&mut self) -> Option<u8> {
        let mut buf = [0u8; 4];
        match tokio::time::timeout(WAIT, self.stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {
                assert_eq!(buf[0], 0x20, "CONNACK");
                Some(buf[3])
            }
            Ok(Err(_)) => None,
            Err(_) => panic!("neither CONNACK nor close within {WAIT:?}"),
        }
    }

    /// Waits until the server closes; panics if it does not within `within`.
    async fn expect_closed(&mut self, within: Duration) {
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("connection still open after {within:?}"),
            }
        }
    }

    /// Asserts the connection stays open for `d`.
    async fn expect_open(&mut self, d: Duration) {
        let mut buf = [0u8; 1024];
        if let Ok(r) = tokio::time::timeout(d, self.stream.read(&mut buf)).await {
            match r {
                Ok(0) | Err(_) => panic!("connection closed early"),
                Ok(_) => {}
            }
        }
    }
}

/// A CONNECT packet with any protocol level, built by hand.
fn connect_packet(
    level: u8,
    client_id: &str,
    clean: bool,
    keep_alive: u16,
    login: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut body = BytesMut::new();
    let name: &[u8] = if level == 3 { b"MQIsdp" } else { b"MQTT" };
    body.put_u16(name.len() as u16);
    body.put_slice(name);
    body.put_u8(level);
    let mut flags = if clean { 0x02 } else { 0 };
    if login.is_some() {
        flags |= 0xC0;
    }
    body.put_u8(flags);
    body.put_u16(keep_alive);
    body.put_u16(client_id.len() as u16);
    body.put_slice(client_id.as_bytes());
    if let Some((u, p)) = login {
        body.put_u16(u.len() as u16);
        body.put_slice(u.as_bytes());
        body.put_u16(p.len() as u16);
        body.put_slice(p.as_bytes());
    }
    let mut packet = vec![0x10];
    lorabroker::mqtt::codec::put_remaining_length(&mut packet, body.len());
    packet.extend_from_slice(&body);
    packet
}

async fn protocol_level_and_client_id_refusals(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    for level in [5u8, 6] {
        let mut raw = RawClient::connect(&node).await;
        raw.send(&connect_packet(level, "c1", true, 30, Some((&uid, &key))))
            .await;
        assert_eq!(raw.connack().await, Some(1), "protocol level {level}");
        raw.expect_closed(WAIT).await;
    }
    // MQTT 3.1 (MQIsdp, level 3) is accepted, as The Things Stack accepts it.
    let mut raw = RawClient::connect(&node).await;
    raw.send(&connect_packet(3, "c1", true, 30, Some((&uid, &key))))
        .await;
    assert_eq!(raw.connack().await, Some(0), "MQTT 3.1");
    let mut raw = RawClient::connect(&node).await;
    raw.send(&connect_packet(4, "", false, 30, Some((&uid, &key))))
        .await;
    assert_eq!(
        raw.connack().await,
        Some(2),
        "empty client ID without clean session"
    );
    let mut raw = RawClient::connect(&node).await;
    raw.send(&connect_packet(
        4,
        &"x".repeat(300),
        true,
        30,
        Some((&uid, &key)),
    ))
    .await;
    assert_eq!(raw.connack().await, Some(2), "over-long client ID");
    // An empty client ID with a clean session gets one assigned.
    let mut raw = RawClient::connect(&node).await;
    raw.send(&connect_packet(4, "", true, 30, Some((&uid, &key))))
        .await;
    assert_eq!(raw.connack().await, Some(0));
}

async fn garbage_and_oversized_packets_close_only_that_connection(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node_with(|c| c.mqtt.max_packet_size = 1024).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut healthy = node.client(&app, &key).await;
    assert_eq!(healthy.subscribe("#").await, GRANTED);

    let garbage: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0xff; 64],
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f],
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01], // a TLS ClientHello on the plain port
    ];
    for g in garbage {
        let mut raw = RawClient::connect(&node).await;
        raw.send(g).await;
        raw.expect_closed(WAIT).await;
    }
    // Garbage after a good CONNECT.
    let mut raw = RawClient::connect(&node).await;
    raw.send(&connect_packet(4, "g1", true, 30, Some((&uid, &key))))
        .await;
    assert_eq!(raw.connack().await, Some(0));
    raw.send(&[0xf0, 0x00, 0x00]).await;
    raw.expect_closed(WAIT).await;

    // An oversized PUBLISH closes its connection, even on a writable topic.
    let mut big = node.client(&app, &key).await;
    big.publish(
        &format!("v3/{uid}/devices/dev1/down/push"),
        vec![b' '; 2000],
    )
    .await;
    big.expect_closed().await;

    // The healthy client is untouched.
    node.upstream()
        .publish(&dev(&env, "app1", "dev1"), Event::Up, "{}".into())
        .await
        .unwrap();
    assert!(healthy.next_publish().await.0.ends_with("/up"));
}

async fn connect_timeout_and_keepalive_are_enforced(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env
        .node_with(|c| c.mqtt.connect_timeout = Duration::from_millis(300))
        .await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;

    let mut silent = RawClient::connect(&node).await;
    silent.expect_closed(WAIT).await;

    // Keepalive 1 s: closed after 1.5 s of silence.
    let mut quiet = RawClient::connect(&node).await;
    quiet
        .send(&connect_packet(4, "ka1", true, 1, Some((&uid, &key))))
        .await;
    assert_eq!(quiet.connack().await, Some(0));
    quiet.expect_open(Duration::from_millis(1000)).await;
    quiet.expect_closed(WAIT).await;

    // PINGREQ keeps a connection alive past 1.5 × keepalive.
    let mut pinger = RawClient::connect(&node).await;
    pinger
        .send(&connect_packet(4, "ka2", true, 1, Some((&uid, &key))))
        .await;
    assert_eq!(pinger.connack().await, Some(0));
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        pinger.send(&[0xc0, 0x00]).await;
        let mut resp = [0u8; 2];
        tokio::time::timeout(WAIT, pinger.stream.read_exact(&mut resp))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp, [0xd0, 0x00], "PINGRESP");
    }
}

/// DESIGN §4: acknowledged and dropped as The Things Stack does, never a close (client
/// libraries would reconnect and resend forever). tests/protocol/ checks the bytes.
async fn forbidden_publishes_are_acknowledged_and_dropped(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let read_only = node.key(&app, Rights::TRAFFIC_READ).await;
    for (key, topic) in [
        (&key, format!("v3/{uid}/devices/dev1/up")),
        (
            &key,
            format!("v3/app2@{}/devices/dev1/down/push", env.tenant),
        ),
        (&key, "v3/something/else".to_owned()),
        (&key, format!("v3/{uid}/devices/dev1/down/push/extra")),
        (&read_only, format!("v3/{uid}/devices/dev1/down/push")),
    ] {
        let mut c = node.client(&app, key).await;
        c.client
            .publish(&topic, QoS::AtLeastOnce, false, r#"{"downlinks":[]}"#)
            .await
            .unwrap();
        c.publish(&topic, r#"{"downlinks":[]}"#).await;
        // Still connected, and the publishes were handled before this SUBSCRIBE.
        assert_eq!(c.subscribe("v3/+/devices/+/up").await, GRANTED, "{topic}");
        c.expect_silence(SILENCE).await;
    }
    let dev1 = dev(&env, "app1", "dev1");
    assert!(node.app.queue.list(&dev1).await.unwrap().is_empty());
}

fn push_body(items: Value) -> String {
    json!({ "downlinks": items }).to_string()
}

async fn downlink_push_and_replace_reach_the_queue_and_events(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut sub = node.client(&app, &key).await;
    assert_eq!(sub.subscribe("#").await, GRANTED);
    let publisher = node.client(&app, &key).await;
    let dev1 = dev(&env, "app1", "dev1");

    // The seed's confirmed downlink with an application correlation ID.
    publisher
        .publish(
            &format!("v3/{uid}/devices/dev1/down/push"),
            r#"{"downlinks":[{"f_port":15,"frm_payload":"vu8=","priority":"HIGH","confirmed":true,"correlation_ids":["my-correlation-id"]}]}"#,
        )
        .await;
    let queued = sub.next_on("/devices/dev1/down/queued").await;
    let ids: Vec<&str> = queued["correlation_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(ids.contains(&"my-correlation-id"), "{queued}");
    assert!(
        ids.iter().any(|i| i.starts_with("as:downlink:")),
        "{queued}"
    );
    assert_eq!(queued["downlink_queued"]["f_port"], 15);
    assert_eq!(queued["downlink_queued"]["frm_payload"], "vu8=");
    assert_eq!(queued["end_device_ids"]["device_id"], "dev1");
    assert_eq!(
        queued["end_device_ids"]["application_ids"]["application_id"],
        "app1"
    );

    // Two more in one push: one event each, queue in order.
    publisher
        .publish(
            &format!("v3/{uid}/devices/dev1/down/push"),
            push_body(json!([{"f_port": 1, "frm_payload": "AQ=="}, {"f_port": 2, "decoded_payload": {"on": true}}])),
        )
        .await;
    assert_eq!(
        sub.next_on("/down/queued").await["downlink_queued"]["f_port"],
        1
    );
    assert_eq!(
        sub.next_on("/down/queued").await["downlink_queued"]["f_port"],
        2
    );
    let queue = node.app.queue.list(&dev1).await.unwrap();
    let ports: Vec<i64> = queue
        .iter()
        .map(|i| {
            serde_json::from_str::<Value>(i).unwrap()["f_port"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ports, vec![15, 1, 2]);

    // The upstream takes them in order.
    let first = node.upstream().next_downlink(&dev1).await.unwrap().unwrap();
    assert_eq!(first["f_port"], 15);
    assert_eq!(first["confirmed"], true);

    // Replace, then replace with nothing.
    publisher
        .publish(
            &format!("v3/{uid}/devices/dev1/down/replace"),
            push_body(json!([{"f_port": 9, "frm_payload": "CQ=="}])),
        )
        .await;
    assert_eq!(
        sub.next_on("/down/queued").await["downlink_queued"]["f_port"],
        9
    );
    assert_eq!(node.app.queue.list(&dev1).await.unwrap().len(), 1);
    publisher
        .publish(
            &format!("v3/{uid}/devices/dev1/down/replace"),
            push_body(json!([])),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(node.app.queue.list(&dev1).await.unwrap().is_empty());

    // QoS 1 publishes are acknowledged (after the queue write).
    publisher
        .client
        .publish(
            &format!("v3/{uid}/devices/dev2/down/push"),
            QoS::AtLeastOnce,
            false,
            push_body(json!([{"f_port": 3, "frm_payload": "Aw=="}])),
        )
        .await
        .unwrap();
    assert_eq!(
        sub.next_on("/devices/dev2/down/queued").await["downlink_queued"]["f_port"],
        3
    );
}

async fn rejected_downlinks_publish_down_failed_and_enqueue_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node_with(|c| c.downlink.queue_capacity = 3).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut sub = node.client(&app, &key).await;
    assert_eq!(
        sub.subscribe(&format!("v3/{uid}/devices/dev1/down/#"))
            .await,
        GRANTED
    );
    let publisher = node.client(&app, &key).await;
    let topic = format!("v3/{uid}/devices/dev1/down/push");
    let dev1 = dev(&env, "app1", "dev1");

    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "json"),
        (push_body(json!([{"f_port": 1, "fport": 2}])), "fport"),
        (push_body(json!([{"f_port": 0}])), "f_port"),
        (push_body(json!([{"f_port": 234}])), "234"),
        (
            push_body(json!([{"f_port": 1, "frm_payload": "not base64!"}])),
            "base64",
        ),
        (
            push_body(
                json!([{"f_port": 1, "frm_payload": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0u8; 251])}]),
            ),
            "251",
        ),
        (
            push_body(json!([{"f_port": 1, "priority": "URGENT"}])),
            "URGENT",
        ),
        (
            json!({"downlinks": [{"f_port": 1}], "extra": 1}).to_string(),
            "extra",
        ),
    ];
    for (body, named) in cases {
        publisher.publish(&topic, body.clone()).await;
        let failed = sub.next_on("/devices/dev1/down/failed").await;
        let error = &failed["downlink_failed"]["error"];
        assert_eq!(error["namespace"], "lorabroker", "{failed}");
        let message = error["message_format"].as_str().unwrap_or_default();
        assert!(
            message.to_lowercase().contains(&named.to_lowercase()),
            "{body}: error {message:?} should name {named:?}"
        );
        assert!(
            node.app.queue.list(&dev1).await.unwrap().is_empty(),
            "{body} enqueued something"
        );
    }

    // Overflow: 2 fit, the next push of 2 is rejected whole.
    publisher
        .publish(
            &topic,
            push_body(json!([{"f_port": 1, "frm_payload": ""}, {"f_port": 2, "frm_payload": ""}])),
        )
        .await;
    sub.next_on("/down/queued").await;
    sub.next_on("/down/queued").await;
    publisher
        .publish(
            &topic,
            push_body(json!([{"f_port": 3, "frm_payload": ""}, {"f_port": 4, "frm_payload": ""}])),
        )
        .await;
    let failed = sub.next_on("/down/failed").await;
    assert!(
        failed["downlink_failed"]["error"]["message_format"]
            .as_str()
            .unwrap()
            .contains("full"),
        "{failed}"
    );
    assert_eq!(node.app.queue.list(&dev1).await.unwrap().len(), 2);
}

async fn client_id_takeover_on_one_node(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut first = TestClient::connect(node.mqtt_addr, &uid, &key, "same-id")
        .await
        .unwrap();
    let mut second = TestClient::connect(node.mqtt_addr, &uid, &key, "same-id")
        .await
        .unwrap();
    first.expect_closed().await;
    assert_eq!(second.subscribe("#").await, GRANTED);
    // The same client ID in another application is another client.
    let app2 = env.app("app2");
    let key2 = node.key(&app2, Rights::DEFAULT).await;
    let _other = TestClient::connect(node.mqtt_addr, &node.username(&app2), &key2, "same-id")
        .await
        .unwrap();
    second.expect_silence(SILENCE).await;
}

async fn revocation_and_expiry_disconnect_clients(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let keep = node.key(&app, Rights::DEFAULT).await;
    let mut a = node.client(&app, &key).await;
    let mut b = node.client(&app, &key).await;
    let mut unaffected = node.client(&app, &keep).await;
    assert_eq!(unaffected.subscribe("#").await, GRANTED);
    let id = key.split('.').nth(1).unwrap();
    revoke_key(node.app.keys.as_ref(), node.app.bus.as_ref(), id)
        .await
        .unwrap();
    a.expect_closed().await;
    b.expect_closed().await;
    unaffected.expect_silence(SILENCE).await;

    let short = node
        .key_expiring(&app, Rights::DEFAULT, Some(Duration::from_secs(2)))
        .await;
    let mut c = node.client(&app, &short).await;
    c.expect_closed().await;
}

async fn wills_are_kept_only_on_writable_topics(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;

    let mut opts = MqttOptions::new(unique("w"), "127.0.0.1", node.mqtt_addr.port());
    opts.set_credentials(uid.clone(), key.clone());
    opts.set_last_will(LastWill::new(
        format!("v3/{uid}/devices/dev1/up"),
        "x",
        QoS::AtMostOnce,
        false,
    ));
    // A will on a topic the key may not write is ignored, and the CONNECT accepted.
    let ignored = TestClient::connect_with(opts)
        .await
        .expect("accepted despite its will");
    drop(ignored);

    // A will on down/push is a downlink pushed when the client vanishes.
    let mut raw = RawClient::connect(&node).await;
    let mut packet = BytesMut::new();
    let will = mqttbytes::v4::LastWill::new(
        format!("v3/{uid}/devices/dev1/down/push"),
        br#"{"downlinks":[{"f_port":7,"frm_payload":"Bw=="}]}"#.to_vec(),
        mqttbytes::QoS::AtMostOnce,
        false,
    );
    let mut connect = mqttbytes::v4::Connect::new("will-client");
    connect.set_login(uid.as_str(), key.as_str());
    connect.last_will = Some(will);
    connect.write(&mut packet).unwrap();
    raw.send(&packet).await;
    assert_eq!(raw.connack().await, Some(0));
    drop(raw);
    let dev1 = dev(&env, "app1", "dev1");
    let mut queued = Vec::new();
    for _ in 0..50 {
        queued = node.app.queue.list(&dev1).await.unwrap();
        if !queued.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queued.len(), 1, "the will was queued");

    // A clean DISCONNECT does not publish the will.
    let mut raw = RawClient::connect(&node).await;
    raw.send(&packet).await;
    assert_eq!(raw.connack().await, Some(0));
    raw.send(&[0xe0, 0x00]).await;
    raw.expect_closed(WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(node.app.queue.list(&dev1).await.unwrap().len(), 1);
}

async fn single_tenant_mode_uses_bare_application_ids(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let tenant = env.tenant.to_string();
    let node = env
        .node_with(|c| {
            c.tenancy.mode = "single".into();
            c.tenancy.default_tenant = tenant;
        })
        .await;
    let app = env.app("app1");
    assert_eq!(node.username(&app), "app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    assert_eq!(
        connect_code(&node, &format!("app1@{}", env.tenant), &key).await,
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    let mut c = node.client(&app, &key).await;
    assert_eq!(c.subscribe("v3/app1/devices/+/up").await, GRANTED);
    assert_eq!(
        c.subscribe(&format!("v3/app1@{}/#", env.tenant)).await,
        SubscribeReasonCode::Failure
    );
    node.upstream()
        .publish(&dev(&env, "app1", "dev1"), Event::Up, "{}".into())
        .await
        .unwrap();
    assert_eq!(c.next_publish().await.0, "v3/app1/devices/dev1/up");
    c.publish(
        "v3/app1/devices/dev1/down/push",
        push_body(json!([{"f_port": 5, "frm_payload": "BQ=="}])),
    )
    .await;
    let dev1 = dev(&env, "app1", "dev1");
    for _ in 0..50 {
        if !node.app.queue.list(&dev1).await.unwrap().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("single-tenant downlink was not queued");
}

async fn health_readiness_metrics_and_drain(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env
        .node_with(|c| c.shutdown.grace_period = Duration::from_secs(2))
        .await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut c = node.client(&app, &key).await;
    assert_eq!(c.subscribe("#").await, GRANTED);

    assert_eq!(common::http::get(node.http_addr, "/healthz").await.0, 200);
    assert_eq!(common::http::get(node.http_addr, "/readyz").await.0, 200);
    let (status, metrics) = common::http::get(node.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("lorabroker_connections 1"), "{metrics}");
    assert!(metrics.contains("outcome=\"accepted\""), "{metrics}");

    node.shutdown_token().cancel();
    let mut draining = false;
    for _ in 0..40 {
        let (status, body) = common::http::get(node.http_addr, "/readyz").await;
        if status == 503 && body.contains("draining") {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(draining, "readiness goes false while draining");
    assert!(
        TcpStream::connect(node.mqtt_addr).await.is_err(),
        "the listener is closed"
    );
    c.expect_closed().await;
    node.shutdown().await;
}
