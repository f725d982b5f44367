//! The QoS 2 duplicate the command-line clients and rumqttc cannot be made to send: the same
//! PUBLISH twice, the second with DUP, before PUBREL, over a raw socket.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{downlink, Target};

const WAIT: Duration = Duration::from_secs(10);

/// A raw MQTT 3.1.1 connection.
pub struct Raw {
    stream: TcpStream,
}

impl Raw {
    /// Connects and authenticates; panics unless CONNACK 0.
    pub async fn connect(t: &Target) -> Raw {
        let stream = TcpStream::connect(t.mqtt).await.expect("MQTT port accepts");
        let mut raw = Raw { stream };
        let mut connect = mqttbytes::v4::Connect::new(crate::common::services::unique("raw"));
        connect.set_login(t.username.as_str(), t.key.as_str());
        let mut packet = BytesMut::new();
        connect.write(&mut packet).expect("CONNECT encodes");
        raw.send(&packet).await;
        assert_eq!(
            raw.read_packet().await,
            [0x20, 0x02, 0x00, 0x00],
            "CONNACK 0"
        );
        raw
    }

    /// Writes bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads one packet of the short kinds a server sends here (remaining length < 128).
    pub async fn read_packet(&mut self) -> Vec<u8> {
        let mut head = [0u8; 2];
        tokio::time::timeout(WAIT, self.stream.read_exact(&mut head))
            .await
            .expect("a packet within the wait")
            .expect("the connection stays open");
        assert!(head[1] < 0x80, "a short packet: {head:02x?}");
        let mut body = vec![0u8; usize::from(head[1])];
        tokio::time::timeout(WAIT, self.stream.read_exact(&mut body))
            .await
            .expect("the packet's body")
            .expect("the connection stays open");
        [head.to_vec(), body].concat()
    }
}

/// A QoS 2 PUBLISH of `payload` to `topic` with packet ID `pkid` (and DUP when `dup`).
pub fn qos2_publish(topic: &str, payload: &str, pkid: u16, dup: bool) -> Vec<u8> {
    let mut publish = mqttbytes::v4::Publish::new(topic, mqttbytes::QoS::ExactlyOnce, payload);
    publish.pkid = pkid;
    publish.dup = dup;
    let mut packet = BytesMut::new();
    publish.write(&mut packet).expect("PUBLISH encodes");
    packet.to_vec()
}

/// The client side: PUBLISH, the same with DUP, PUBREL; every PUBREC and the PUBCOMP come
/// back on the same connection. Then the same packet ID again after PUBCOMP, which is a new
/// message (`second_correlation_id`).
pub async fn qos2_with_duplicate(t: &Target, second_correlation_id: &str) {
    let topic = format!("v3/{}/devices/{}/down/push", t.app, t.device);
    let body = downlink(&t.correlation_id);
    let mut raw = Raw::connect(t).await;
    let [hi, lo] = 7u16.to_be_bytes();
    raw.send(&qos2_publish(&topic, &body, 7, false)).await;
    raw.send(&qos2_publish(&topic, &body, 7, true)).await;
    // MQTT-4.3.3-2: a PUBREC for the PUBLISH and again for its duplicate.
    assert_eq!(raw.read_packet().await, [0x50, 0x02, hi, lo], "PUBREC");
    assert_eq!(
        raw.read_packet().await,
        [0x50, 0x02, hi, lo],
        "PUBREC of the duplicate"
    );
    raw.send(&[0x62, 0x02, hi, lo]).await;
    assert_eq!(raw.read_packet().await, [0x70, 0x02, hi, lo], "PUBCOMP");

    // After PUBCOMP the packet ID is free: the same ID is a new downlink.
    let body = downlink(second_correlation_id);
    raw.send(&qos2_publish(&topic, &body, 7, false)).await;
    assert_eq!(raw.read_packet().await, [0x50, 0x02, hi, lo], "PUBREC");
    raw.send(&[0x62, 0x02, hi, lo]).await;
    assert_eq!(raw.read_packet().await, [0x70, 0x02, hi, lo], "PUBCOMP");
}
