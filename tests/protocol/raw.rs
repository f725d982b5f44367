//! Bytes and a raw socket: packets built exactly (with mqttbytes' writers for the
//! well-formed ones, by hand for the rest), and a client that writes them and reads the
//! server's exact answers.

use std::time::Duration;

use bytes::BytesMut;
use mqttbytes::v4::{self, Connect, LastWill, Packet, PubRel, Publish, Subscribe};
use mqttbytes::QoS;
use rumqttc::SubscribeReasonCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::broker::{TestEnv, TestNode, WAIT};
use crate::common::http;
use crate::common::services::unique;
use lorabroker::mqtt::codec::put_remaining_length;
use lorabroker::topic::{DeviceRef, Id};

pub(crate) const GRANTED: SubscribeReasonCode =
    SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce);
/// How long "nothing arrives" is watched.
pub(crate) const SILENCE: Duration = Duration::from_millis(300);

pub(crate) const CONNACK_OK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
pub(crate) const CONNACK_PROTOCOL: [u8; 4] = [0x20, 0x02, 0x00, 0x01];
pub(crate) const PINGREQ: [u8; 2] = [0xc0, 0x00];
pub(crate) const PINGRESP: [u8; 2] = [0xd0, 0x00];

// ---------------------------------------------------------------------------------------
// Bytes.

/// `first`, the remaining length, `body`.
pub(crate) fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    put_remaining_length(&mut f, body.len());
    f.extend_from_slice(body);
    f
}

/// An MQTT string or binary field: a two-byte length, then the bytes.
pub(crate) fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

pub(crate) fn written(write: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut b = BytesMut::new();
    write(&mut b);
    b.to_vec()
}

/// A 3.1.1 CONNECT with a login, keepalive 30 s, clean session.
pub(crate) fn connect(client_id: &str, uid: &str, key: &str, will: Option<LastWill>) -> Vec<u8> {
    let mut c = Connect::new(client_id);
    c.keep_alive = 30;
    c.set_login(uid, key);
    c.last_will = will;
    written(|b| {
        c.write(b).unwrap();
    })
}

/// A CONNECT body by hand: protocol `name`, `level`, `flags`, keepalive 30, then `rest`.
pub(crate) fn connect_raw(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    let mut body = string(name);
    body.extend_from_slice(&[level, flags, 0, 30]);
    body.extend_from_slice(rest);
    frame(0x10, &body)
}

/// Client ID, user name and password fields, for [`connect_raw`] with flags 0xc2.
pub(crate) fn login_fields(client_id: &[u8], uid: &str, key: &str) -> Vec<u8> {
    [
        string(client_id),
        string(uid.as_bytes()),
        string(key.as_bytes()),
    ]
    .concat()
}

pub(crate) fn subscribe(pkid: u16, filter: &str) -> Vec<u8> {
    let mut s = Subscribe::new(filter, QoS::AtMostOnce);
    s.pkid = pkid;
    written(|b| {
        s.write(b).unwrap();
    })
}

pub(crate) fn publish(topic: &str, qos: QoS, pkid: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    let mut p = Publish::new(topic, qos, payload.to_vec());
    p.pkid = pkid;
    p.dup = dup;
    written(|b| {
        p.write(b).unwrap();
    })
}

pub(crate) fn pubrel(pkid: u16) -> Vec<u8> {
    written(|b| {
        PubRel::new(pkid).write(b).unwrap();
    })
}

pub(crate) fn ack(kind: u8, pkid: u16) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    vec![kind, 0x02, hi, lo]
}

pub(crate) fn puback(pkid: u16) -> Vec<u8> {
    ack(0x40, pkid)
}
pub(crate) fn pubrec(pkid: u16) -> Vec<u8> {
    ack(0x50, pkid)
}
pub(crate) fn pubcomp(pkid: u16) -> Vec<u8> {
    ack(0x70, pkid)
}

// ---------------------------------------------------------------------------------------
// A raw client.

/// A socket that writes exact bytes and reads exact bytes.
pub(crate) struct Raw {
    stream: TcpStream,
    read: BytesMut,
}

impl Raw {
    pub(crate) async fn open(node: &TestNode) -> Raw {
        Raw {
            stream: TcpStream::connect(node.mqtt_addr).await.unwrap(),
            read: BytesMut::new(),
        }
    }

    /// Opens a connection and logs in with a plain 3.1.1 CONNECT.
    pub(crate) async fn login(node: &TestNode, uid: &str, key: &str) -> Raw {
        let mut raw = Raw::open(node).await;
        raw.send(&connect(&unique("raw"), uid, key, None)).await;
        raw.expect(&CONNACK_OK).await;
        raw
    }

    /// Writes `bytes` in one write (the server may already have closed: that shows later).
    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads exactly `expected.len()` bytes and asserts that they are `expected`.
    pub(crate) async fn expect(&mut self, expected: &[u8]) {
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

    pub(crate) async fn fill(&mut self) {
        let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.read))
            .await
            .unwrap_or_else(|_| panic!("nothing within {WAIT:?} (have {:02x?})", &self.read[..]))
            .expect("socket readable");
        assert!(n > 0, "closed by the server (have {:02x?})", &self.read[..]);
    }

    /// The next whole packet the server sends.
    pub(crate) async fn packet(&mut self) -> Packet {
        loop {
            match v4::read(&mut self.read, 1 << 20) {
                Ok(p) => return p,
                Err(mqttbytes::Error::InsufficientBytes(_)) => self.fill().await,
                Err(e) => panic!("the server sent a malformed packet: {e:?}"),
            }
        }
    }

    /// Asserts that the server closes the connection without sending anything more.
    pub(crate) async fn expect_eof(&mut self) {
        let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.read))
            .await
            .unwrap_or_else(|_| panic!("connection still open after {WAIT:?}"))
            // A reset is a close too.
            .unwrap_or(0);
        assert_eq!(n, 0, "expected a close, got {:02x?}", &self.read[..]);
        assert!(self.read.is_empty(), "unread bytes {:02x?}", &self.read[..]);
    }

    /// A PINGREQ is answered: the connection is open and has handled what came before.
    pub(crate) async fn ping(&mut self) {
        self.send(&PINGREQ).await;
        self.expect(&PINGRESP).await;
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

pub(crate) fn dev(env: &TestEnv, app: &str, dev: &str) -> DeviceRef {
    DeviceRef::new(env.app(app), Id::parse(dev).unwrap())
}

/// The items queued for `device`, as JSON, read back from the node's queue (Redis for the
/// cluster backend).
pub(crate) async fn queued(node: &TestNode, device: &DeviceRef) -> Vec<Value> {
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
pub(crate) async fn metric(node: &TestNode, sample: &str) -> u64 {
    let (_, body) = http::get(node.http_addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

pub(crate) fn body(f_port: u8, correlation_id: &str) -> Vec<u8> {
    format!(
        r#"{{"downlinks":[{{"f_port":{f_port},"frm_payload":"vu8=","correlation_ids":["{correlation_id}"]}}]}}"#
    )
    .into_bytes()
}

pub(crate) fn has_correlation_id(doc: &Value, id: &str) -> bool {
    doc["correlation_ids"]
        .as_array()
        .is_some_and(|ids| ids.iter().any(|i| i == id))
}
