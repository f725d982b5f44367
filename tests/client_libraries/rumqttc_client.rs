//! The client side of each scenario with rumqttc, driven the way applications drive it: an
//! event loop polled in a task of its own, which reconnects by itself after an error.

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, LastWill, MqttOptions, Packet, QoS,
};
use tokio::sync::mpsc;

use crate::common::broker::TestClient;
use crate::common::services::unique;
use crate::common::shell::correlation_ids;
use crate::harness::{downlink, Target};

/// What one expected event may take.
const WAIT: Duration = Duration::from_secs(10);

fn options(t: &Target, port: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(unique("rumqttc"), t.mqtt.ip().to_string(), port);
    opts.set_credentials(t.username.clone(), t.key.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts
}

/// What the event loop saw.
#[derive(Debug)]
enum Seen {
    ConnAck(ConnectReturnCode),
    PubAck,
    PubComp,
    SubAck,
    Publish(String, Vec<u8>),
    Error(String),
}

/// A client whose event loop runs in a task, reconnecting after errors (as rumqttc does
/// when polled on), and reporting everything it sees.
struct Client {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    connacks: usize,
    errors: Vec<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    fn start(opts: MqttOptions) -> Client {
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(pump(eventloop, tx));
        Client {
            client,
            seen,
            connacks: 0,
            errors: Vec::new(),
            task,
        }
    }

    /// The next event that `pick` accepts, counting CONNACKs and errors on the way.
    async fn until<T>(&mut self, what: &str, mut pick: impl FnMut(&Seen) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = tokio::time::timeout_at(deadline, self.seen.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "rumqttc: no {what} within {WAIT:?} (errors: {:?})",
                        self.errors
                    )
                })
                .expect("the event loop task runs");
            match &seen {
                Seen::ConnAck(_) => self.connacks += 1,
                Seen::Error(e) => self.errors.push(e.clone()),
                _ => {}
            }
            if let Some(found) = pick(&seen) {
                return found;
            }
        }
    }

    async fn connected(&mut self) {
        let code = self
            .until("CONNACK", |s| match s {
                Seen::ConnAck(code) => Some(*code),
                _ => None,
            })
            .await;
        assert_eq!(code, ConnectReturnCode::Success);
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .expect("subscribe request");
        self.until("SUBACK", |s| matches!(s, Seen::SubAck).then_some(()))
            .await;
    }

    async fn publish(&mut self, topic: &str, payload: String, qos: QoS) {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .expect("publish request");
        match qos {
            QoS::AtLeastOnce => {
                self.until("PUBACK", |s| matches!(s, Seen::PubAck).then_some(()))
                    .await
            }
            QoS::ExactlyOnce => {
                self.until("PUBCOMP", |s| matches!(s, Seen::PubComp).then_some(()))
                    .await
            }
            QoS::AtMostOnce => {}
        }
    }

    async fn message_on(&mut self, suffix: &str) -> serde_json::Value {
        self.until(&format!("message on …{suffix}"), |s| match s {
            Seen::Publish(topic, payload) if topic.ends_with(suffix) => {
                Some(serde_json::from_slice(payload).expect("JSON payload"))
            }
            _ => None,
        })
        .await
    }

    fn assert_stayed_connected(&self) {
        assert!(
            self.connacks == 1 && self.errors.is_empty(),
            "rumqttc: the connection did not stay up: {} CONNACKs, errors {:?}",
            self.connacks,
            self.errors
        );
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Seen>) {
    loop {
        let seen = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => Seen::ConnAck(ack.code),
            Ok(Event::Incoming(Packet::PubAck(_))) => Seen::PubAck,
            Ok(Event::Incoming(Packet::PubComp(_))) => Seen::PubComp,
            Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
            Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish(p.topic, p.payload.to_vec()),
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(Seen::Error(e.to_string()));
                // Polling on reconnects, as an application's loop does; not at once.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if tx.send(seen).is_err() {
            return;
        }
    }
}

/// A will (QoS 1): accepted; then the event loop is dropped, closing the socket without
/// DISCONNECT.
pub async fn will(t: &Target) {
    let (topic, payload) = t.will.clone().expect("a will");
    let mut opts = options(t, t.mqtt.port());
    opts.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, false));
    let client = TestClient::connect_with(opts)
        .await
        .unwrap_or_else(|code| panic!("rumqttc: CONNECT with a will refused: {code:?}"));
    drop(client);
}

/// QoS 1 publishes to topics the key may not write: each acknowledged, and the connection
/// stays (no error, no second CONNACK) while uplinks keep arriving.
pub async fn forbidden(t: &Target) {
    let mut c = Client::start(options(t, t.mqtt.port()));
    c.connected().await;
    c.subscribe(&format!("v3/{}/devices/{}/up", t.app, t.device))
        .await;
    for topic in &t.forbidden {
        c.publish(topic, downlink("forbidden"), QoS::AtLeastOnce)
            .await;
    }
    // Anything received before the last PUBACK is in the past; wait for a fresh uplink.
    c.message_on(&format!("/devices/{}/up", t.device)).await;
    c.subscribe(&format!("v3/{}/devices/{}/down/#", t.app, t.device))
        .await;
    c.assert_stayed_connected();
}

/// The seed's flow: `#` on the first node, a QoS 1 push through the last one.
pub async fn flow(t: &Target) {
    let mut sub = Client::start(options(t, t.mqtt.port()));
    sub.connected().await;
    sub.subscribe("#").await;
    let dev = format!("/devices/{}", t.device);
    let up = sub.message_on(&format!("{dev}/up")).await;
    assert!(up["uplink_message"]["frm_payload"].is_string(), "{up}");
    let mut publisher = Client::start(options(t, t.publish_via.port()));
    publisher.connected().await;
    publisher
        .publish(
            &format!("v3/{}{dev}/down/push", t.app),
            downlink(&t.correlation_id),
            QoS::AtLeastOnce,
        )
        .await;
    for event in ["down/queued", "down/sent", "down/ack"] {
        let doc = sub.message_on(&format!("{dev}/{event}")).await;
        assert!(
            correlation_ids(&doc["correlation_ids"]).contains(&t.correlation_id),
            "{event} without {}: {doc}",
            t.correlation_id
        );
    }
    sub.assert_stayed_connected();
    publisher.assert_stayed_connected();
}

/// rumqttc's MQTT 5 client: its first poll ends in an error, at once, never in a session.
///
/// rumqttc 0.25 reads every CONNACK as MQTT 5's, with a properties length after the code,
/// so the 3.1.1-format CONNACK 0x01 that MQTT-3.1.2-2 prescribes is too short for it: it
/// reports the close that follows (`ConnectionAborted`) rather than the refusal. It does
/// not hang and does not get a session, which is what can be asked of it; the scenario
/// checks on the server's side that the CONNECT was refused for its protocol level.
pub async fn v5(t: &Target) {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as V5Code, Packet as V5Packet};
    use rumqttc::v5::{ConnectionError, Event as V5Event, StateError};
    let mut opts =
        rumqttc::v5::MqttOptions::new(unique("rumqttc-v5"), t.mqtt.ip().to_string(), t.mqtt.port());
    opts.set_credentials(t.username.clone(), t.key.clone());
    let (_client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 8);
    let result = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(V5Event::Incoming(V5Packet::ConnAck(ack))) => return Ok(ack.code),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("rumqttc v5 hangs on the CONNACK");
    match result {
        Err(ConnectionError::ConnectionRefused(
            V5Code::RefusedProtocolVersion | V5Code::UnsupportedProtocolVersion,
        )) => {}
        Err(ConnectionError::MqttState(StateError::ConnectionAborted)) => {}
        other => panic!("rumqttc v5: neither a refusal nor the close after it: {other:?}"),
    }
}

/// A QoS 2 push: PUBREC, PUBREL, PUBCOMP.
pub async fn qos2(t: &Target) {
    let mut c = Client::start(options(t, t.mqtt.port()));
    c.connected().await;
    c.publish(
        &format!("v3/{}/devices/{}/down/push", t.app, t.device),
        downlink(&t.correlation_id),
        QoS::ExactlyOnce,
    )
    .await;
    c.assert_stayed_connected();
}
