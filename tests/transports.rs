//! One MQTT behaviour suite over every transport (issue 10: "every transport passes the
//! same MQTT behaviour suite"): plain TCP, TLS, WebSocket and WebSocket over TLS, each on
//! a node that has all four listeners, with certificates made in the test. The suite
//! drives the broker with a raw client (tests/common/raw.rs), so that it can send what
//! real libraries never do: split and pipelined packets, a CONNECT of MQTT 5, a malformed
//! SUBSCRIBE.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use mqttbytes::v4::{self, Packet};

use common::broker::{Backend, TestEnv, TestNode};
use common::raw::{connect_packet, subscribe_packet, Connector, Raw};
use common::services::unique;
use common::tls::TestCa;
use lorabroker::auth::Rights;
use lorabroker::topic::{AppRef, DeviceRef, Event, Id};
use lorabroker::transport::Kind;

/// A CONNECT of protocol level 5 (MQTT 5), which gets CONNACK 1 and a close.
const CONNECT_LEVEL_5: &[u8] = b"\x10\x0d\x00\x04MQTT\x05\x02\x00\x3c\x00\x01c";
/// A SUBSCRIBE whose fixed-header flags are 0 instead of 2: malformed.
const SUBSCRIBE_BAD_FLAGS: &[u8] = &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x00];
const PINGREQ: &[u8] = &[0xC0, 0x00];
const DISCONNECT: &[u8] = &[0xE0, 0x00];
const PUSH: &[u8] = br#"{"downlinks":[{"f_port":15,"frm_payload":"vu8=","priority":"NORMAL"}]}"#;

/// A node on the embedded backend listening on TCP, TLS, WS and WSS, and how to reach it.
struct Fixture {
    env: TestEnv,
    node: TestNode,
    app: AppRef,
    key: String,
    connector: Connector,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new(kind: Kind) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("transport suite CA");
        let (cert, key_file) = ca.server().write(dir.path(), "server");
        let env = TestEnv::new(Backend::Embedded).await;
        let node = env
            .node_with(|c| {
                c.mqtt.tls.listen = "127.0.0.1:0".into();
                c.mqtt.ws.listen = "127.0.0.1:0".into();
                c.mqtt.wss.listen = "127.0.0.1:0".into();
                c.mqtt.tls.cert_file = cert.display().to_string();
                c.mqtt.tls.key_file = key_file.display().to_string();
            })
            .await;
        let app = env.app("app1");
        let key = node.key(&app, Rights::DEFAULT).await;
        let connector = Connector::of(&node, kind, &[ca.pem()]);
        Fixture {
            env,
            node,
            app,
            key,
            connector,
            _dir: dir,
        }
    }

    fn user(&self) -> String {
        self.node.username(&self.app)
    }

    fn device(&self, dev: &str) -> DeviceRef {
        DeviceRef::new(self.app.clone(), Id::parse(dev).unwrap())
    }

    /// A connection after CONNACK 0.
    async fn connected(&self) -> Raw {
        let mut raw = self.connector.open().await;
        assert_eq!(raw.connect(&self.user(), &self.key).await, 0);
        raw
    }

    /// The sum of every series of the counter `name` in the node's metrics.
    fn counter(&self, name: &str) -> f64 {
        self.node
            .app
            .metrics
            .render()
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// The bytes of a CONNECT with a chosen client ID.
fn connect_as(client_id: &str, user: &str, key: &str) -> Vec<u8> {
    let mut connect = v4::Connect::new(client_id);
    connect.keep_alive = 60;
    connect.set_login(user, key);
    let mut out = BytesMut::new();
    connect.write(&mut out).unwrap();
    out.to_vec()
}

/// The MQTT behaviours every transport must show.
async fn behaviour_suite(kind: Kind) {
    let f = Fixture::new(kind).await;
    let t = kind.as_str();
    let user = f.user();

    // CONNACK codes: 0 for a key of the application, 5 for another application's key,
    // 4 for a password that is not an API key, 1 (then a close) for MQTT 5.
    f.connected().await;
    let other = f.node.key(&f.env.app("app2"), Rights::DEFAULT).await;
    assert_eq!(
        f.connector.open().await.connect(&user, &other).await,
        5,
        "{t}"
    );
    assert_eq!(
        f.connector.open().await.connect(&user, "not-a-key").await,
        4,
        "{t}"
    );
    let mut v5 = f.connector.open().await;
    v5.send(CONNECT_LEVEL_5).await;
    assert_eq!(v5.connack().await, 1, "{t}: MQTT 5 CONNECT");
    assert!(
        v5.closed_within(Duration::from_secs(5)).await,
        "{t}: MQTT 5 left open"
    );

    // A CONNECT cut in three writes (three frames over WebSocket) is one CONNECT.
    let connect = connect_packet(&user, &f.key, 60);
    let (a, rest) = connect.split_at(1); // inside the fixed header
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut split = f.connector.open().await;
    split.send_frames(&[a, b, c]).await;
    assert_eq!(split.connack().await, 0, "{t}: split CONNECT");

    // CONNECT, SUBSCRIBE and PINGREQ in one write are answered in order.
    let mut pipelined = f.connector.open().await;
    let mut batch = connect_packet(&user, &f.key, 60);
    batch.extend_from_slice(&subscribe_packet("#"));
    batch.extend_from_slice(PINGREQ);
    pipelined.send(&batch).await;
    assert_eq!(pipelined.connack().await, 0, "{t}");
    assert!(
        matches!(pipelined.next().await, Ok(Packet::SubAck(_))),
        "{t}"
    );
    assert!(
        matches!(pipelined.next().await, Ok(Packet::PingResp)),
        "{t}"
    );

    // An uplink reaches a subscriber with its v3 topic; down/push gets down/queued.
    let mut sub = f.connected().await;
    assert!(sub.subscribe("#").await, "{t}: # granted");
    let uplink = unique(&format!("uplink-over-{t}"));
    f.node
        .upstream()
        .publish(&f.device("dev1"), Event::Up, uplink.clone().into())
        .await
        .unwrap();
    let (topic, payload) = sub.next_publish_on("/devices/dev1/up").await;
    assert_eq!(topic, format!("v3/{user}/devices/dev1/up"), "{t}");
    assert_eq!(payload, uplink.as_bytes(), "{t}");
    sub.publish(&format!("v3/{user}/devices/dev1/down/push"), PUSH)
        .await;
    let (_, queued) = sub.next_publish_on("/devices/dev1/down/queued").await;
    let queued: serde_json::Value = serde_json::from_slice(&queued).unwrap();
    assert_eq!(queued["downlink_queued"]["f_port"], 15, "{t}: {queued}");

    // A publish on another application's topic is dropped and counted; the client stays.
    let refused = f.counter("lorabroker_publishes_refused_total");
    let other_user = f.node.username(&f.env.app("app2"));
    sub.publish(&format!("v3/{other_user}/devices/dev1/down/push"), PUSH)
        .await;
    sub.send(PINGREQ).await;
    loop {
        match sub.next().await {
            Ok(Packet::PingResp) => break,
            Ok(Packet::Publish(_)) => continue,
            other => panic!("{t}: PINGRESP expected after a refused publish, got {other:?}"),
        }
    }
    assert_eq!(
        f.counter("lorabroker_publishes_refused_total"),
        refused + 1.0,
        "{t}"
    );

    // A second connection with the same client ID takes the session over.
    let id = unique("takeover");
    let mut first = f.connector.open().await;
    first.send(&connect_as(&id, &user, &f.key)).await;
    assert_eq!(first.connack().await, 0, "{t}");
    let mut second = f.connector.open().await;
    second.send(&connect_as(&id, &user, &f.key)).await;
    assert_eq!(second.connack().await, 0, "{t}");
    assert!(
        first.closed_within(Duration::from_secs(5)).await,
        "{t}: the taken-over connection stays open"
    );
    second.send(PINGREQ).await;
    assert!(matches!(second.next().await, Ok(Packet::PingResp)), "{t}");

    // Keepalive 1 s: closed after one and a half keepalives of silence, not before 1 s.
    let mut idle = f.connector.open().await;
    assert_eq!(idle.connect_with(&user, &f.key, 1).await, 0);
    assert!(
        !idle.closed_within(Duration::from_millis(900)).await,
        "{t}: closed before its keepalive"
    );
    assert!(
        idle.closed_within(Duration::from_secs(3)).await,
        "{t}: keepalive not enforced"
    );

    // A malformed packet closes the connection and is counted.
    let malformed = f.counter("lorabroker_malformed_packets_total");
    let mut bad = f.connected().await;
    bad.send(SUBSCRIBE_BAD_FLAGS).await;
    assert!(
        bad.closed_within(Duration::from_secs(5)).await,
        "{t}: malformed SUBSCRIBE left open"
    );
    assert_eq!(
        f.counter("lorabroker_malformed_packets_total"),
        malformed + 1.0,
        "{t}"
    );

    // DISCONNECT: the server closes the connection.
    let mut bye = f.connected().await;
    bye.send(DISCONNECT).await;
    assert!(
        bye.closed_within(Duration::from_secs(5)).await,
        "{t}: left open after DISCONNECT"
    );

    f.node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_behaviour_over_tcp() {
    behaviour_suite(Kind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_behaviour_over_tls() {
    behaviour_suite(Kind::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_behaviour_over_websocket() {
    behaviour_suite(Kind::Ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_behaviour_over_websocket_over_tls() {
    behaviour_suite(Kind::Wss).await;
}
