//! The MQTT protocol edge of DESIGN §4 (issue 8) byte by byte: raw TCP sockets write exact
//! packets and read exact answers from a node of `tests/common`, on the embedded backends
//! and, where a backend takes part (queues, events, a Redis that stops), on NATS + Redis.
//!
//! Pipelining behind CONNECT, MQTT 5 refused with CONNACK 0x01, MQTT 3.1 served like 3.1.1,
//! every malformed-packet rule closing, QoS 2 exactly-once, forbidden publishes
//! acknowledged and explained, wills on unwritable topics ignored, and downlinks
//! acknowledged only once stored.

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqttbytes::v4::{self, Connect, LastWill, Packet, PubRel, Publish, Subscribe};
use mqttbytes::QoS;
use rumqttc::{AsyncClient, Event, MqttOptions, SubscribeReasonCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::broker::{Backend, TestClient, TestEnv, TestNode, WAIT};
use common::http;
use common::services::unique;
use common::wait::eventually;
use lorabroker::auth::Rights;
use lorabroker::mqtt::codec::put_remaining_length;
use lorabroker::topic::{DeviceRef, Event as Traffic, Id};

const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce);
/// How long "nothing arrives" is watched.
const SILENCE: Duration = Duration::from_millis(300);

const CONNACK_OK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
const CONNACK_PROTOCOL: [u8; 4] = [0x20, 0x02, 0x00, 0x01];
const PINGREQ: [u8; 2] = [0xc0, 0x00];
const PINGRESP: [u8; 2] = [0xd0, 0x00];

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
    packets_behind_connect_are_answered_in_order_without_more_bytes,
    mqtt_31_clients_connect_subscribe_receive_and_push,
    qos2_duplicates_are_acknowledged_but_queued_once,
    forbidden_publishes_are_acknowledged_dropped_and_explained,
    validation_errors_are_acknowledged_with_down_failed,
    wills_on_unwritable_topics_are_accepted_and_never_published,
);

// ---------------------------------------------------------------------------------------
// Bytes.

/// `first`, the remaining length, `body`.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    put_remaining_length(&mut f, body.len());
    f.extend_from_slice(body);
    f
}

/// An MQTT string or binary field: a two-byte length, then the bytes.
fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn written(write: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut b = BytesMut::new();
    write(&mut b);
    b.to_vec()
}

/// A 3.1.1 CONNECT with a login, keepalive 30 s, clean session.
fn connect(client_id: &str, uid: &str, key: &str, will: Option<LastWill>) -> Vec<u8> {
    let mut c = Connect::new(client_id);
    c.keep_alive = 30;
    c.set_login(uid, key);
    c.last_will = will;
    written(|b| {
        c.write(b).unwrap();
    })
}

/// A CONNECT body by hand: protocol `name`, `level`, `flags`, keepalive 30, then `rest`.
fn connect_raw(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    let mut body = string(name);
    body.extend_from_slice(&[level, flags, 0, 30]);
    body.extend_from_slice(rest);
    frame(0x10, &body)
}

/// Client ID, user name and password fields, for [`connect_raw`] with flags 0xc2.
fn login_fields(client_id: &[u8], uid: &str, key: &str) -> Vec<u8> {
    [
        string(client_id),
        string(uid.as_bytes()),
        string(key.as_bytes()),
    ]
    .concat()
}

fn subscribe(pkid: u16, filter: &str) -> Vec<u8> {
    let mut s = Subscribe::new(filter, QoS::AtMostOnce);
    s.pkid = pkid;
    written(|b| {
        s.write(b).unwrap();
    })
}

fn publish(topic: &str, qos: QoS, pkid: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    let mut p = Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    p.dup = dup;
    written(|b| {
        p.write(b).unwrap();
    })
}

fn pubrel(pkid: u16) -> Vec<u8> {
    written(|b| {
        PubRel::new(pkid).write(b).unwrap();
    })
}

fn ack(kind: u8, pkid: u16) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    vec![kind, 0x02, hi, lo]
}

fn puback(pkid: u16) -> Vec<u8> {
    ack(0x40, pkid)
}
fn pubrec(pkid: u16) -> Vec<u8> {
    ack(0x50, pkid)
}
fn pubcomp(pkid: u16) -> Vec<u8> {
    ack(0x70, pkid)
}

// ---------------------------------------------------------------------------------------
// A raw client.

/// A socket that writes exact bytes and reads exact bytes.
struct Raw {
    stream: TcpStream,
    read: BytesMut,
}

impl Raw {
    async fn open(node: &TestNode) -> Raw {
        Raw {
            stream: TcpStream::connect(node.mqtt_addr).await.unwrap(),
            read: BytesMut::new(),
        }
    }

    /// Opens a connection and logs in with a plain 3.1.1 CONNECT.
    async fn login(node: &TestNode, uid: &str, key: &str) -> Raw {
        let mut raw = Raw::open(node).await;
        raw.send(&connect(&unique("raw"), uid, key, None)).await;
        raw.expect(&CONNACK_OK).await;
        raw
    }

    /// Writes `bytes` in one write (the server may already have closed: that shows later).
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads exactly `expected.len()` bytes and asserts that they are `expected`.
    async fn expect(&mut self, expected: &[u8]) {
        while self.read.len() < expected.len() {
            self.fill().await;
        }
        let got = self.read.split_to(expected.len());
        assert_eq!(
            &got[..],
            expected,
            "expected {expected:02x?}, got {got:02x?}"
        );
    }

    async fn fill(&mut self) {
        let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.read))
            .await
            .unwrap_or_else(|_| panic!("nothing within {WAIT:?} (have {:02x?})", &self.read[..]))
            .expect("socket readable");
        assert!(n > 0, "closed by the server (have {:02x?})", &self.read[..]);
    }

    /// The next whole packet the server sends.
    async fn packet(&mut self) -> Packet {
        loop {
            match v4::read(&mut self.read, 1 << 20) {
                Ok(p) => return p,
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.fill().await,
                Err(e) => panic!("the server sent a malformed packet: {e:?}"),
            }
        }
    }

    /// Asserts that the server closes the connection without sending anything more.
    async fn expect_eof(&mut self) {
        let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.read))
            .await
            .unwrap_or_else(|_| panic!("connection still open after {WAIT:?}"))
            // A reset is a close too.
            .unwrap_or(0);
        assert_eq!(n, 0, "expected a close, got {:02x?}", &self.read[..]);
        assert!(self.read.is_empty(), "unread bytes {:02x?}", &self.read[..]);
    }

    /// A PINGREQ is answered: the connection is open and has handled what came before.
    async fn ping(&mut self) {
        self.send(&PINGREQ).await;
        self.expect(&PINGRESP).await;
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn dev(env: &TestEnv, app: &str, dev: &str) -> DeviceRef {
    DeviceRef::new(env.app(app), Id::parse(dev).unwrap())
}

/// The items queued for `device`, as JSON, read back from the node's queue (Redis for the
/// cluster backend).
async fn queued(node: &TestNode, device: &DeviceRef) -> Vec<Value> {
    node.app
        .queue
        .list(device)
        .await
        .unwrap()
        .iter()
        .map(|i| serde_json::from_str(i).unwrap())
        .collect()
}

/// The value of one sample of `/metrics`, e.g. `lorabroker_connects_total{outcome="x"}`
/// (0 when absent).
async fn metric(node: &TestNode, sample: &str) -> u64 {
    let (_, body) = http::get(node.http_addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn body(f_port: u8, correlation_id: &str) -> Vec<u8> {
    format!(
        r#"{{"downlinks":[{{"f_port":{f_port},"frm_payload":"vu8=","correlation_ids":["{correlation_id}"]}}]}}"#
    )
    .into_bytes()
}

fn has_correlation_id(doc: &Value, id: &str) -> bool {
    doc["correlation_ids"]
        .as_array()
        .is_some_and(|ids| ids.iter().any(|i| i == id))
}

// ---------------------------------------------------------------------------------------
// Point 3: pipelining.

async fn packets_behind_connect_are_answered_in_order_without_more_bytes(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;

    // CONNECT + SUBSCRIBE + PINGREQ in one write, then nothing: three answers, in order.
    let mut raw = Raw::open(&node).await;
    let pipelined = [
        connect("pipe1", &uid, &key, None),
        subscribe(1, "#"),
        PINGREQ.to_vec(),
    ]
    .concat();
    raw.send(&pipelined).await;
    raw.expect(&CONNACK_OK).await;
    raw.expect(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;
    raw.expect(&PINGRESP).await;
    // The subscription is live.
    node.upstream()
        .publish(&dev(&env, "app1", "dev1"), Traffic::Up, "pipelined".into())
        .await
        .unwrap();
    let Packet::Publish(up) = raw.packet().await else {
        panic!("expected the uplink");
    };
    assert_eq!(up.topic, format!("v3/{uid}/devices/dev1/up"));
    assert_eq!(&up.payload[..], b"pipelined");

    // CONNECT + a QoS 1 downlink: queued and acknowledged with no further byte sent.
    let mut raw = Raw::open(&node).await;
    let topic = format!("v3/{uid}/devices/dev2/down/push");
    let pipelined = [
        connect("pipe2", &uid, &key, None),
        publish(&topic, QoS::AtLeastOnce, 5, false, &body(1, "pipelined")),
    ]
    .concat();
    raw.send(&pipelined).await;
    raw.expect(&CONNACK_OK).await;
    raw.expect(&puback(5)).await;
    let items = queued(&node, &dev(&env, "app1", "dev2")).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert!(has_correlation_id(&items[0], "pipelined"), "{items:?}");
}

// ---------------------------------------------------------------------------------------
// Point 4: other protocol versions.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_and_other_levels_get_connack_1_in_311_format_then_a_close() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let login = login_fields(b"v5client", &uid, &key);

    // MQTT 5: properties (session expiry interval 60, receive maximum 10) follow the
    // keepalive, then the payload.
    let mut v5 = vec![8, 0x11, 0, 0, 0, 60, 0x21, 0, 10];
    v5.extend_from_slice(&login);
    let mut v5_no_properties = vec![0];
    v5_no_properties.extend_from_slice(&login);
    let refused = [
        connect_raw(b"MQTT", 5, 0xc2, &v5),
        connect_raw(b"MQTT", 5, 0xc2, &v5_no_properties),
        // MQTT 5 with a will: will properties come first in its payload.
        connect_raw(
            b"MQTT",
            5,
            0xc6,
            &[0, 0, 0, 2, b'c', b'1', 0, 0, 1, b't', 0, 0],
        ),
        connect_raw(b"MQTT", 3, 0xc2, &login),
        connect_raw(b"MQIsdp", 4, 0xc2, &login),
        connect_raw(b"MQTT", 6, 0xc2, &login),
        connect_raw(b"MQTT", 0, 0xc2, &login),
        connect_raw(b"mqtt", 4, 0xc2, &login),
    ];
    for packet in &refused {
        let mut raw = Raw::open(&node).await;
        raw.send(packet).await;
        raw.expect(&CONNACK_PROTOCOL).await;
        raw.expect_eof().await;
    }
    // Also when the client pipelines behind its v5 CONNECT (a v5 SUBSCRIBE here).
    let mut raw = Raw::open(&node).await;
    let pipelined = [
        connect_raw(b"MQTT", 5, 0xc2, &v5),
        frame(0x82, &[0, 1, 0, 0, 1, b'#', 0]),
    ]
    .concat();
    raw.send(&pipelined).await;
    raw.expect(&CONNACK_PROTOCOL).await;
    raw.expect_eof().await;

    // CONNECTs too short to say their protocol are closed without a CONNACK.
    for garbage in [
        frame(0x10, &[0x00]),
        frame(0x10, &[0x00, 0x04, b'M', b'Q']),
        frame(0x10, &[0x00, 0x04, b'M', b'Q', b'T', b'T']),
        frame(0x10, &[0xff, 0xff, b'M']),
    ] {
        let mut raw = Raw::open(&node).await;
        raw.send(&garbage).await;
        raw.expect_eof().await;
    }
    assert_eq!(
        metric(
            &node,
            r#"lorabroker_connects_total{outcome="refused_protocol"}"#
        )
        .await,
        refused.len() as u64 + 1
    );
    // 3.1.1 still connects.
    Raw::login(&node, &uid, &key).await.ping().await;
}

// ---------------------------------------------------------------------------------------
// Point 5: MQTT 3.1.

async fn mqtt_31_clients_connect_subscribe_receive_and_push(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;

    let mut raw = Raw::open(&node).await;
    raw.send(&connect_raw(
        b"MQIsdp",
        3,
        0xc2,
        &login_fields(b"v31", &uid, &key),
    ))
    .await;
    raw.expect(&CONNACK_OK).await;
    raw.send(&subscribe(1, "v3/+/devices/+/up")).await;
    raw.expect(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;
    raw.send(&subscribe(2, &format!("v3/app2@{}/#", env.tenant)))
        .await;
    raw.expect(&[0x90, 0x03, 0x00, 0x02, 0x80]).await;

    let doc = br#"{"uplink_message":{"f_port":15,"frm_payload":"VGVzdA=="}}"#;
    node.upstream()
        .publish(
            &dev(&env, "app1", "dev1"),
            Traffic::Up,
            Bytes::from_static(doc),
        )
        .await
        .unwrap();
    let Packet::Publish(up) = raw.packet().await else {
        panic!("expected the uplink");
    };
    assert_eq!(up.topic, format!("v3/{uid}/devices/dev1/up"));
    assert_eq!(&up.payload[..], &doc[..]);

    let topic = format!("v3/{uid}/devices/dev1/down/push");
    raw.send(&publish(
        &topic,
        QoS::AtLeastOnce,
        3,
        false,
        &body(2, "from-31"),
    ))
    .await;
    raw.expect(&puback(3)).await;
    let items = queued(&node, &dev(&env, "app1", "dev1")).await;
    assert_eq!(items.len(), 1);
    assert!(has_correlation_id(&items[0], "from-31"), "{items:?}");
    raw.ping().await;

    // Same rights as 3.1.1: a key of another application is refused with CONNACK 5, and
    // a malformed password with 4.
    let other = node.key(&env.app("app2"), Rights::DEFAULT).await;
    for (password, code) in [(other.as_str(), 5u8), ("not-a-key", 4)] {
        let mut raw = Raw::open(&node).await;
        raw.send(&connect_raw(
            b"MQIsdp",
            3,
            0xc2,
            &login_fields(b"v31b", &uid, password),
        ))
        .await;
        raw.expect(&[0x20, 0x02, 0x00, code]).await;
        raw.expect_eof().await;
    }
}

// ---------------------------------------------------------------------------------------
// Point 9: malformed packets.

/// A rule, a well-formed twin packet and its answer (empty for none), the packet that
/// breaks the rule, and its `reason` label.
type MalformedCase = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_packet_rule_closes_the_connection() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let push = format!("v3/{uid}/devices/dev1/down/push");

    let filter = [string(b"#"), vec![0]].concat();
    let cases: Vec<MalformedCase> = vec![
        (
            "SUBSCRIBE flags must be 0010",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x80, &[[0, 1].as_slice(), &filter].concat()),
            "fixed_header_flags",
        ),
        (
            "SUBSCRIBE flags 0011",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x83, &[[0, 1].as_slice(), &filter].concat()),
            "fixed_header_flags",
        ),
        (
            "UNSUBSCRIBE flags must be 0010",
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#")].concat()),
            vec![0xb0, 2, 0, 1],
            frame(0xa0, &[[0, 1].as_slice(), &string(b"#")].concat()),
            "fixed_header_flags",
        ),
        (
            "PUBREL flags must be 0010",
            pubrel(9),
            pubcomp(9),
            frame(0x60, &[0, 9]),
            "fixed_header_flags",
        ),
        (
            "PINGREQ flags must be 0",
            PINGREQ.to_vec(),
            PINGRESP.to_vec(),
            vec![0xc1, 0x00],
            "fixed_header_flags",
        ),
        (
            "DISCONNECT flags must be 0",
            PINGREQ.to_vec(),
            PINGRESP.to_vec(),
            vec![0xe2, 0x00],
            "fixed_header_flags",
        ),
        (
            "PUBLISH QoS 3",
            publish(&push, QoS::AtLeastOnce, 4, false, &body(1, "x")),
            puback(4),
            frame(
                0x36,
                &[string(push.as_bytes()), vec![0, 4], body(1, "x")].concat(),
            ),
            "qos",
        ),
        (
            "SUBSCRIBE option reserved bits",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x82, &[[0, 1].as_slice(), &string(b"#"), &[0x04]].concat()),
            "reserved_bit",
        ),
        (
            "SUBSCRIBE requested QoS 3",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x82, &[[0, 1].as_slice(), &string(b"#"), &[0x03]].concat()),
            "qos",
        ),
        (
            "SUBSCRIBE packet ID 0",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x82, &[[0, 0].as_slice(), &filter].concat()),
            "packet_id_zero",
        ),
        (
            "UNSUBSCRIBE packet ID 0",
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#")].concat()),
            vec![0xb0, 2, 0, 1],
            frame(0xa2, &[[0, 0].as_slice(), &string(b"#")].concat()),
            "packet_id_zero",
        ),
        (
            "QoS 1 PUBLISH packet ID 0",
            publish(&push, QoS::AtLeastOnce, 4, false, &body(1, "x")),
            puback(4),
            frame(
                0x32,
                &[string(push.as_bytes()), vec![0, 0], body(1, "x")].concat(),
            ),
            "packet_id_zero",
        ),
        (
            "PUBREL packet ID 0",
            pubrel(9),
            pubcomp(9),
            frame(0x62, &[0, 0]),
            "packet_id_zero",
        ),
        (
            "UNSUBSCRIBE without filters",
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#")].concat()),
            vec![0xb0, 2, 0, 1],
            frame(0xa2, &[0, 1]),
            "no_filters",
        ),
        (
            "SUBSCRIBE without filters",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x82, &[0, 1]),
            "no_filters",
        ),
        (
            "empty SUBSCRIBE filter (MQTT-4.7.3-1: a close, not 0x80)",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x82, &[[0, 1].as_slice(), &string(b""), &[0]].concat()),
            "empty_filter",
        ),
        (
            "empty UNSUBSCRIBE filter",
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#")].concat()),
            vec![0xb0, 2, 0, 1],
            frame(0xa2, &[[0, 1].as_slice(), &string(b"")].concat()),
            "empty_filter",
        ),
        (
            "U+0000 in a topic filter",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(
                0x82,
                &[[0, 1].as_slice(), &string(b"v3/\0/#"), &[0]].concat(),
            ),
            "null_character",
        ),
        (
            "U+0000 in an UNSUBSCRIBE filter",
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#")].concat()),
            vec![0xb0, 2, 0, 1],
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#\0")].concat()),
            "null_character",
        ),
        (
            "U+0000 in a PUBLISH topic",
            publish(&push, QoS::AtLeastOnce, 4, false, &body(1, "x")),
            puback(4),
            publish(
                &format!("{push}\0"),
                QoS::AtLeastOnce,
                4,
                false,
                &body(1, "x"),
            ),
            "null_character",
        ),
        (
            "+ in a PUBLISH topic",
            publish(&push, QoS::AtLeastOnce, 4, false, &body(1, "x")),
            puback(4),
            publish(
                &format!("v3/{uid}/devices/+/down/push"),
                QoS::AtLeastOnce,
                4,
                false,
                &body(1, "x"),
            ),
            "wildcard_in_topic",
        ),
        (
            "# in a PUBLISH topic",
            publish(&push, QoS::AtMostOnce, 0, false, &body(1, "x")),
            Vec::new(),
            publish(&format!("v3/{uid}/#"), QoS::AtMostOnce, 0, false, b"{}"),
            "wildcard_in_topic",
        ),
        (
            "PUBACK with a body longer than its packet ID",
            PINGREQ.to_vec(),
            PINGRESP.to_vec(),
            frame(0x40, &[0, 1, 0]),
            "length",
        ),
    ];
    let mut expected_reasons = std::collections::BTreeMap::<&str, u64>::new();
    for (rule, twin, answer, malformed, reason) in &cases {
        let mut raw = Raw::login(&node, &uid, &key).await;
        raw.send(twin).await;
        if answer.is_empty() {
            raw.ping().await;
        } else {
            raw.expect(answer).await;
        }
        raw.send(malformed).await;
        // No answer, then the close; a PINGREQ behind it must not be answered either.
        raw.send(&PINGREQ).await;
        tokio::time::timeout(WAIT, raw.expect_eof())
            .await
            .unwrap_or_else(|_| panic!("{rule}: not closed"));
        *expected_reasons.entry(reason).or_default() += 1;
    }

    // At CONNECT: closed without a CONNACK.
    let login = login_fields(b"c1", &uid, &key);
    for (rule, connect, reason) in [
        (
            "CONNECT reserved flag",
            connect_raw(b"MQTT", 4, 0xc3, &login),
            "reserved_bit",
        ),
        (
            "CONNECT flags in the fixed header",
            {
                let mut c = connect_raw(b"MQTT", 4, 0xc2, &login);
                c[0] = 0x12;
                c
            },
            "fixed_header_flags",
        ),
        (
            "U+0000 in the client ID",
            connect_raw(b"MQTT", 4, 0xc2, &login_fields(b"c\x001", &uid, &key)),
            "null_character",
        ),
        (
            "U+0000 in the user name",
            connect_raw(
                b"MQTT",
                4,
                0xc2,
                &login_fields(b"c1", &format!("{uid}\0"), &key),
            ),
            "null_character",
        ),
        (
            "will QoS without a will",
            connect_raw(b"MQTT", 4, 0xca, &login),
            "will_flags",
        ),
    ] {
        let mut raw = Raw::open(&node).await;
        raw.send(&connect).await;
        tokio::time::timeout(WAIT, raw.expect_eof())
            .await
            .unwrap_or_else(|_| panic!("{rule}: not closed"));
        *expected_reasons.entry(reason).or_default() += 1;
    }

    for (reason, count) in expected_reasons {
        let sample = format!(r#"lorabroker_malformed_packets_total{{reason="{reason}"}}"#);
        assert_eq!(metric(&node, &sample).await, count, "{sample}");
    }
    // Nothing of the malformed PUBLISHes was queued (the twins were: 5 of them).
    assert_eq!(queued(&node, &dev(&env, "app1", "dev1")).await.len(), 5);
}

// ---------------------------------------------------------------------------------------
// Point 6: QoS 2.

async fn qos2_duplicates_are_acknowledged_but_queued_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let dev1 = dev(&env, "app1", "dev1");
    let topic = format!("v3/{uid}/devices/dev1/down/push");
    let mut raw = Raw::login(&node, &uid, &key).await;

    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        10,
        false,
        &body(1, "once"),
    ))
    .await;
    raw.expect(&pubrec(10)).await;
    // Retransmissions before PUBREL, with and without DUP: acknowledged, not queued.
    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        10,
        true,
        &body(1, "once"),
    ))
    .await;
    raw.expect(&pubrec(10)).await;
    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        10,
        false,
        &body(1, "once"),
    ))
    .await;
    raw.expect(&pubrec(10)).await;
    assert_eq!(queued(&node, &dev1).await.len(), 1);
    // Another ID meanwhile is another message.
    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        11,
        false,
        &body(2, "other"),
    ))
    .await;
    raw.expect(&pubrec(11)).await;
    assert_eq!(queued(&node, &dev1).await.len(), 2);

    // PUBREL releases the ID: the same ID afterwards is a new message.
    raw.send(&pubrel(10)).await;
    raw.expect(&pubcomp(10)).await;
    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        10,
        false,
        &body(3, "again"),
    ))
    .await;
    raw.expect(&pubrec(10)).await;
    let ports: Vec<i64> = queued(&node, &dev1)
        .await
        .iter()
        .map(|i| i["f_port"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, vec![1, 2, 3]);
    // PUBREL of an ID we do not hold still gets its PUBCOMP.
    raw.send(&pubrel(99)).await;
    raw.expect(&pubcomp(99)).await;

    // The IDs are per connection: another connection's ID 11 is its own message.
    let mut other = Raw::login(&node, &uid, &key).await;
    other
        .send(&publish(
            &topic,
            QoS::ExactlyOnce,
            11,
            false,
            &body(4, "elsewhere"),
        ))
        .await;
    other.expect(&pubrec(11)).await;
    assert_eq!(queued(&node, &dev1).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_ids_held_without_pubrel_are_bounded() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node_with(|c| c.mqtt.max_inflight_qos2 = 2).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let topic = format!("v3/{uid}/devices/dev1/down/push");

    // Releasing makes room.
    let mut raw = Raw::login(&node, &uid, &key).await;
    for pkid in [1, 2] {
        raw.send(&publish(
            &topic,
            QoS::ExactlyOnce,
            pkid,
            false,
            &body(1, "a"),
        ))
        .await;
        raw.expect(&pubrec(pkid)).await;
    }
    raw.send(&pubrel(1)).await;
    raw.expect(&pubcomp(1)).await;
    raw.send(&publish(&topic, QoS::ExactlyOnce, 3, false, &body(1, "a")))
        .await;
    raw.expect(&pubrec(3)).await;
    // A duplicate of a held ID does not count against the bound.
    raw.send(&publish(&topic, QoS::ExactlyOnce, 3, true, &body(1, "a")))
        .await;
    raw.expect(&pubrec(3)).await;
    // A third held ID closes the connection, unprocessed.
    raw.send(&publish(&topic, QoS::ExactlyOnce, 4, false, &body(1, "a")))
        .await;
    raw.expect_eof().await;
    assert_eq!(queued(&node, &dev(&env, "app1", "dev1")).await.len(), 3);
    assert_eq!(
        metric(
            &node,
            r#"lorabroker_disconnects_total{outcome="qos2_inflight_exceeded"}"#
        )
        .await,
        1
    );
}

// ---------------------------------------------------------------------------------------
// Point 2: forbidden publishes.

async fn forbidden_publishes_are_acknowledged_dropped_and_explained(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let read_only = node.key(&app, Rights::TRAFFIC_READ).await;
    let mut watcher = node.client(&app, &key).await;
    assert_eq!(watcher.subscribe("#").await, GRANTED);

    let mut raw = Raw::login(&node, &uid, &key).await;
    let payload = body(1, "forbidden");
    // (topic, whether a down/failed for a device follows)
    let cases = [
        (
            format!("v3/{uid}/devices/dev1/down/pushh"),
            Some(("dev1", "topic_not_writable")),
        ),
        (
            format!("v3/{uid}/devices/dev1/up"),
            Some(("dev1", "topic_not_writable")),
        ),
        (format!("v3/{uid}/devices/Dev1/down/push"), None),
        (
            format!("v3/app2@{}/devices/dev1/down/push", env.tenant),
            None,
        ),
        ("v3/something/else".to_owned(), None),
        ("homeassistant/status".to_owned(), None),
    ];
    let mut explained = Vec::new();
    for (pkid, (topic, failed)) in (1..).zip(&cases) {
        raw.send(&publish(topic, QoS::AtLeastOnce, pkid, false, &payload))
            .await;
        raw.expect(&puback(pkid)).await;
        raw.ping().await;
        explained.extend(*failed);
    }
    // QoS 2: PUBREC, a duplicate is not explained twice, PUBREL → PUBCOMP.
    let typo = format!("v3/{uid}/devices/dev3/down/replacee");
    raw.send(&publish(&typo, QoS::ExactlyOnce, 50, false, &payload))
        .await;
    raw.expect(&pubrec(50)).await;
    raw.send(&publish(&typo, QoS::ExactlyOnce, 50, true, &payload))
        .await;
    raw.expect(&pubrec(50)).await;
    raw.send(&pubrel(50)).await;
    raw.expect(&pubcomp(50)).await;
    explained.push(("dev3", "topic_not_writable"));
    // QoS 0: nothing to acknowledge; the connection stays.
    raw.send(&publish(&typo, QoS::AtMostOnce, 0, false, &payload))
        .await;
    raw.ping().await;
    explained.push(("dev3", "topic_not_writable"));

    // A key without the down-write right, on a real downlink topic.
    let mut reader = Raw::login(&node, &uid, &read_only).await;
    let push2 = format!("v3/{uid}/devices/dev2/down/push");
    reader
        .send(&publish(&push2, QoS::AtLeastOnce, 7, false, &payload))
        .await;
    reader.expect(&puback(7)).await;
    reader.ping().await;
    explained.push(("dev2", "no_down_write_right"));

    // One down/failed per refused publish that names a device, in order, and no other.
    for (device, name) in &explained {
        let failed = watcher.next_on("/down/failed").await;
        assert_eq!(failed["end_device_ids"]["device_id"], *device, "{failed}");
        let error = &failed["downlink_failed"]["error"];
        assert_eq!(error["namespace"], "lorabroker", "{failed}");
        assert_eq!(error["name"], *name, "{failed}");
        assert!(error["code"].is_number(), "{failed}");
        assert!(error["message_format"].is_string(), "{failed}");
    }
    watcher.expect_silence(SILENCE).await;
    for d in ["dev1", "dev2", "dev3"] {
        assert!(queued(&node, &dev(&env, "app1", d)).await.is_empty(), "{d}");
    }
    for (reason, count) in [
        ("topic_not_writable", 4),
        ("invalid_device_id", 1),
        ("not_an_application_topic", 3),
        ("no_down_write_right", 1),
    ] {
        let sample = format!(r#"lorabroker_publishes_refused_total{{reason="{reason}"}}"#);
        assert_eq!(metric(&node, &sample).await, count, "{sample}");
    }
    // Both connections are still open and served.
    raw.ping().await;
    reader.ping().await;
}

// ---------------------------------------------------------------------------------------
// Point 7: acknowledged only once stored.

async fn validation_errors_are_acknowledged_with_down_failed(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node_with(|c| c.downlink.queue_capacity = 1).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut watcher = node.client(&app, &key).await;
    assert_eq!(watcher.subscribe("#").await, GRANTED);
    let topic = format!("v3/{uid}/devices/dev1/down/push");
    let mut raw = Raw::login(&node, &uid, &key).await;

    // Retrying cannot help any of these: acknowledged, with their down/failed.
    raw.send(&publish(&topic, QoS::AtLeastOnce, 1, false, b"not json"))
        .await;
    raw.expect(&puback(1)).await;
    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        2,
        false,
        &body(0, "port-0"),
    ))
    .await;
    raw.expect(&pubrec(2)).await;
    raw.send(&publish(
        &topic,
        QoS::AtLeastOnce,
        3,
        false,
        &body(1, "fits"),
    ))
    .await;
    raw.expect(&puback(3)).await;
    raw.send(&publish(
        &topic,
        QoS::AtLeastOnce,
        4,
        false,
        &body(2, "full"),
    ))
    .await;
    raw.expect(&puback(4)).await;
    for name in ["invalid_json", "invalid_downlink"] {
        let failed = watcher.next_on("/down/failed").await;
        assert_eq!(failed["downlink_failed"]["error"]["name"], name, "{failed}");
    }
    assert!(has_correlation_id(
        &watcher.next_on("/down/queued").await,
        "fits"
    ));
    let failed = watcher.next_on("/down/failed").await;
    assert_eq!(failed["downlink_failed"]["error"]["name"], "queue_full");
    assert!(has_correlation_id(&failed, "full"), "{failed}");
    raw.ping().await;
    assert_eq!(queued(&node, &dev(&env, "app1", "dev1")).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_downlinks_are_not_acknowledged_and_retransmissions_are_queued() {
    let mut env = TestEnv::new(Backend::Cluster).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let dev1 = dev(&env, "app1", "dev1");
    let push = format!("v3/{uid}/devices/dev1/down/push");
    let mut watcher = node.client(&app, &key).await;
    assert_eq!(watcher.subscribe("#").await, GRANTED);

    // A rumqttc client whose event loop the test drives, connected while Redis is up.
    let mut opts = MqttOptions::new(unique("retry"), "127.0.0.1", node.mqtt_addr.port());
    opts.set_credentials(uid.clone(), key.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => continue,
            other => panic!("rumqttc did not connect: {other:?}"),
        }
    }
    // A raw QoS 2 client, a QoS 0 one, and one with a will on down/push, all connected
    // while Redis is up.
    let mut qos2 = Raw::login(&node, &uid, &key).await;
    let mut qos0 = Raw::login(&node, &uid, &key).await;
    let mut with_will = Raw::open(&node).await;
    with_will
        .send(&connect(
            "will-redis-down",
            &uid,
            &key,
            Some(LastWill::new(
                &push,
                body(9, "will"),
                QoS::AtMostOnce,
                false,
            )),
        ))
        .await;
    with_will.expect(&CONNACK_OK).await;

    env.redis.as_mut().expect("Redis").stop().await;

    // QoS 1: down/failed, no PUBACK, and the connection is closed.
    client
        .publish(
            &push,
            rumqttc::QoS::AtLeastOnce,
            false,
            body(1, "qos1-retry"),
        )
        .await
        .unwrap();
    let closed = loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(rumqttc::Packet::PubAck(a)))) => {
                panic!("PUBACK {} although nothing was stored", a.pkid)
            }
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => break e,
            Err(_) => panic!("the connection stayed open without a PUBACK"),
        }
    };
    eprintln!("rumqttc saw: {closed}");
    let failed = watcher.next_on("/devices/dev1/down/failed").await;
    assert_eq!(
        failed["downlink_failed"]["error"]["name"],
        "queue_unavailable"
    );
    assert!(has_correlation_id(&failed, "qos1-retry"), "{failed}");
    // rumqttc holds the unacknowledged publish for retransmission.
    let pending = std::mem::take(&mut eventloop.pending);
    let held: Vec<u16> = pending
        .iter()
        .filter_map(|r| match r {
            rumqttc::Request::Publish(p) => Some(p.pkid),
            _ => None,
        })
        .collect();
    assert_eq!(held.len(), 1, "{pending:?}");

    // QoS 2: no PUBREC, closed.
    qos2.send(&publish(
        &push,
        QoS::ExactlyOnce,
        21,
        false,
        &body(2, "qos2-retry"),
    ))
    .await;
    qos2.expect_eof().await;
    let failed = watcher.next_on("/devices/dev1/down/failed").await;
    assert!(has_correlation_id(&failed, "qos2-retry"), "{failed}");

    // QoS 0: down/failed is all there is (nothing to retransmit); the connection stays.
    qos0.send(&publish(&push, QoS::AtMostOnce, 0, false, &body(3, "qos0")))
        .await;
    let failed = watcher.next_on("/devices/dev1/down/failed").await;
    assert!(has_correlation_id(&failed, "qos0"), "{failed}");
    qos0.ping().await;

    // A will published while Redis is down is lost, with its down/failed.
    drop(with_will);
    let failed = watcher.next_on("/devices/dev1/down/failed").await;
    assert!(has_correlation_id(&failed, "will"), "{failed}");
    assert!(
        metric(
            &node,
            r#"lorabroker_disconnects_total{outcome="queue_unavailable"}"#
        )
        .await
            >= 2
    );

    env.redis.as_mut().expect("Redis").restart().await;
    eventually("node ready again", Duration::from_secs(15), || async {
        match http::get(node.http_addr, "/readyz").await {
            (200, _) => Ok(()),
            other => Err(other),
        }
    })
    .await;

    // rumqttc reconnects and retransmits what it holds. (rumqttc 0.25 drops its held
    // publishes when the CONNACK says "no session present", which every clean session of
    // ours says; libraries that keep in-flight messages across a reconnect resend them.
    // So the test hands rumqttc's own held request back to it after the CONNACK, and
    // rumqttc resends it with its packet ID.)
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) | Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => panic!("rumqttc did not reconnect"),
        }
    }
    eventloop.pending = pending;
    let acked = loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(rumqttc::Packet::PubAck(a)))) => break a.pkid,
            Ok(Ok(_)) => continue,
            other => panic!("no PUBACK for the retransmission: {other:?}"),
        }
    };
    assert_eq!(acked, held[0]);
    let queued_now = watcher.next_on("/devices/dev1/down/queued").await;
    assert!(
        has_correlation_id(&queued_now, "qos1-retry"),
        "{queued_now}"
    );

    // The QoS 2 client reconnects and retransmits with DUP, as a client library does.
    let mut qos2 = Raw::login(&node, &uid, &key).await;
    qos2.send(&publish(
        &push,
        QoS::ExactlyOnce,
        21,
        true,
        &body(2, "qos2-retry"),
    ))
    .await;
    qos2.expect(&pubrec(21)).await;
    qos2.send(&pubrel(21)).await;
    qos2.expect(&pubcomp(21)).await;

    let items = queued(&node, &dev1).await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert!(has_correlation_id(&items[0], "qos1-retry"), "{items:?}");
    assert!(has_correlation_id(&items[1], "qos2-retry"), "{items:?}");
    drop(client);
}

// ---------------------------------------------------------------------------------------
// Point 1: wills.

async fn wills_on_unwritable_topics_are_accepted_and_never_published(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let read_only = node.key(&app, Rights::TRAFFIC_READ).await;
    let mut watcher = node.client(&app, &key).await;
    assert_eq!(watcher.subscribe("#").await, GRANTED);
    let dev1 = dev(&env, "app1", "dev1");
    let push = format!("v3/{uid}/devices/dev1/down/push");

    let ignored = [
        // Home Assistant's default status will (retained, QoS 1).
        (
            &key,
            LastWill::new("homeassistant/status", "offline", QoS::AtLeastOnce, true),
        ),
        (
            &key,
            LastWill::new(
                format!("v3/{uid}/devices/dev1/up"),
                "{}",
                QoS::AtMostOnce,
                false,
            ),
        ),
        (
            &key,
            LastWill::new(
                format!("v3/{uid}/devices/dev1/down/pushh"),
                body(1, "w"),
                QoS::AtMostOnce,
                false,
            ),
        ),
        (
            &key,
            LastWill::new(
                format!("v3/app2@{}/devices/dev1/down/push", env.tenant),
                body(1, "w"),
                QoS::AtMostOnce,
                false,
            ),
        ),
        (
            &read_only,
            LastWill::new(push.as_str(), body(1, "w"), QoS::AtMostOnce, false),
        ),
    ];
    for (i, (k, will)) in ignored.iter().enumerate() {
        let mut raw = Raw::open(&node).await;
        raw.send(&connect(&format!("will-{i}"), &uid, k, Some(will.clone())))
            .await;
        raw.expect(&CONNACK_OK).await;
        raw.ping().await;
        // An abnormal close: the socket goes away without DISCONNECT.
        drop(raw);
    }
    // A writable will, closed the same way, is published: so the silence above is not
    // for want of publishing wills at all.
    let mut raw = Raw::open(&node).await;
    raw.send(&connect(
        "will-kept",
        &uid,
        &key,
        Some(LastWill::new(
            push.as_str(),
            body(7, "kept-will"),
            QoS::AtMostOnce,
            false,
        )),
    ))
    .await;
    raw.expect(&CONNACK_OK).await;
    drop(raw);
    let first = watcher.next_on("/down/queued").await;
    assert!(has_correlation_id(&first, "kept-will"), "{first}");
    watcher.expect_silence(SILENCE).await;
    let items = queued(&node, &dev1).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(
        metric(
            &node,
            r#"lorabroker_publishes_refused_total{reason="will_ignored"}"#
        )
        .await,
        ignored.len() as u64
    );
}

/// A rumqttc client (as Home Assistant connects: will, clean session, then a retained
/// birth message on its status topic) connects and stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_assistant_style_client_connects_and_keeps_working() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut opts = MqttOptions::new(unique("ha"), "127.0.0.1", node.mqtt_addr.port());
    opts.set_credentials(uid.clone(), key.clone());
    opts.set_clean_session(true);
    opts.set_last_will(rumqttc::LastWill::new(
        "homeassistant/status",
        "offline",
        rumqttc::QoS::AtLeastOnce,
        true,
    ));
    let mut ha = TestClient::connect_with(opts).await.expect("accepted");
    ha.client
        .publish(
            "homeassistant/status",
            rumqttc::QoS::AtLeastOnce,
            true,
            "online",
        )
        .await
        .unwrap();
    assert_eq!(ha.subscribe("v3/+/devices/+/up").await, GRANTED);
    node.upstream()
        .publish(&dev(&env, "app1", "dev1"), Traffic::Up, "{}".into())
        .await
        .unwrap();
    assert_eq!(
        ha.next_publish().await.0,
        format!("v3/{uid}/devices/dev1/up")
    );
    ha.expect_silence(SILENCE).await;
}
