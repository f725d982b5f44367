//! Attacks against real nodes (issue 9), each asserting its bound while a second tenant's
//! client on the same node — the [`Bystander`] — keeps a normal PINGREQ round trip and keeps
//! receiving its uplinks; the worst gaps it saw are printed and bounded.
//!
//! One test binary, one module per attack surface under `tests/abuse/`; this file holds only
//! the module lines and the helpers they share.

#[path = "common/mod.rs"]
mod common;

#[path = "abuse/before_auth.rs"]
mod before_auth;
#[path = "abuse/bus.rs"]
mod bus;
#[path = "abuse/http.rs"]
mod http;
#[path = "abuse/logs.rs"]
mod logs;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use mqttbytes::v4::{self, Connect, Packet, Subscribe};
use mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use common::broker::TestNode;
use common::services::unique;
use lorabroker::auth::Rights;
use lorabroker::topic::{AppRef, DeviceRef, Event, Id};

/// The most a bystander's PINGREQ round trip or uplink may take while a node is attacked:
/// far above the milliseconds they take on an idle node, far below the seconds an
/// unbounded attack cost before (issue 9).
pub const NORMAL: Duration = Duration::from_millis(1000);

/// The value of one sample of `/metrics`, e.g. `lorabroker_connects_total{outcome="x"}`
/// (0 when absent).
pub async fn metric(node: &TestNode, sample: &str) -> u64 {
    let (_, body) = common::http::get(node.http_addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A CONNECT packet with a login.
pub fn connect_packet(client_id: &str, username: &str, password: &str) -> Vec<u8> {
    let mut c = Connect::new(client_id);
    c.keep_alive = 30;
    c.set_login(username, password);
    let mut b = BytesMut::new();
    c.write(&mut b).unwrap();
    b.to_vec()
}

/// Whether the server closes `stream` within `wait` (a reset counts as a close).
pub async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// The worst a [`Bystander`] saw.
#[derive(Debug)]
pub struct Gaps {
    /// Slowest PINGREQ → PINGRESP.
    pub ping: Duration,
    /// Slowest uplink, bus publish → PUBLISH received.
    pub uplink: Duration,
    /// Round trips done.
    pub pings: u32,
    /// Uplinks received.
    pub uplinks: u32,
}

/// A client of another tenant on the attacked node: a raw MQTT connection subscribed to its
/// own uplinks, sending a PINGREQ and having an uplink published every 50 ms, timing both.
pub struct Bystander {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Gaps>,
}

impl Bystander {
    /// Connects and subscribes a client of a tenant of its own on `node`.
    pub async fn start(node: &TestNode) -> Bystander {
        if std::env::var("ABUSE_DEBUG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .try_init();
        }
        let tenant = Id::parse(&unique("bystander")).unwrap();
        let app = AppRef::new(tenant, Id::parse("app1").unwrap());
        let key = node.key(&app, Rights::DEFAULT).await;
        let mut stream = TcpStream::connect(node.mqtt_addr).await.unwrap();
        let uid = node.username(&app);
        stream
            .write_all(&connect_packet(&unique("b"), &uid, &key))
            .await
            .unwrap();
        let mut read = BytesMut::new();
        let ack = next_packet(&mut stream, &mut read).await;
        assert!(matches!(ack, Packet::ConnAck(_)), "{ack:?}");
        let mut sub = BytesMut::new();
        let mut subscribe = Subscribe::new(format!("v3/{uid}/devices/+/up"), QoS::AtMostOnce);
        subscribe.pkid = 1;
        subscribe.write(&mut sub).unwrap();
        stream.write_all(&sub).await.unwrap();
        let ack = next_packet(&mut stream, &mut read).await;
        assert!(matches!(ack, Packet::SubAck(_)), "{ack:?}");
        let device = DeviceRef::new(app, Id::parse("dev1").unwrap());
        let (bus, stop) = (node.app.bus.clone(), CancellationToken::new());
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let base = Instant::now();
            let mut gaps = Gaps {
                ping: Duration::ZERO,
                uplink: Duration::ZERO,
                pings: 0,
                uplinks: 0,
            };
            // Waits for one PINGRESP and one uplink, noting every uplink on the way.
            while !until.is_cancelled() {
                let sent = Instant::now();
                let stamp = (sent - base).as_nanos() as u64;
                bus.publish(device.subject(Event::Up), Bytes::from(stamp.to_string()))
                    .await
                    .unwrap();
                stream.write_all(&[0xc0, 0x00]).await.unwrap();
                let (mut pong, mut up) = (false, false);
                while !(pong && up) {
                    let p = tokio::time::timeout(
                        Duration::from_secs(10),
                        next_packet(&mut stream, &mut read),
                    )
                    .await
                    .expect("the bystander got neither its PINGRESP nor its uplink in 10 s");
                    match p {
                        Packet::PingResp => {
                            pong = true;
                            gaps.ping = gaps.ping.max(sent.elapsed());
                            gaps.pings += 1;
                        }
                        Packet::Publish(p) => {
                            let at: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
                            let delay =
                                (Instant::now() - base).saturating_sub(Duration::from_nanos(at));
                            gaps.uplink = gaps.uplink.max(delay);
                            gaps.uplinks += 1;
                            up |= at == stamp;
                        }
                        other => panic!("the bystander got {other:?}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            gaps
        });
        Bystander { stop, task }
    }

    /// Stops; asserts that the round trips and uplinks stayed [`NORMAL`] and went on
    /// during the attack; returns the gaps (printed for the report).
    pub async fn finish(self, attack: &str) -> Gaps {
        // At least a few rounds, however short the attack was.
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.cancel();
        let gaps = self.task.await.expect("bystander task");
        println!("{attack}: bystander {gaps:?}");
        assert!(gaps.pings >= 2 && gaps.uplinks >= 2, "{attack}: {gaps:?}");
        assert!(
            gaps.ping < NORMAL && gaps.uplink < NORMAL,
            "{attack}: the bystander's worst PINGREQ round trip or uplink was not normal: {gaps:?}"
        );
        gaps
    }
}

async fn next_packet(stream: &mut TcpStream, read: &mut BytesMut) -> Packet {
    loop {
        match v4::read(read, 1 << 20) {
            Ok(p) => return p,
            Err(mqttbytes::Error::InsufficientBytes(_)) => {
                let n = stream.read_buf(read).await.expect("bystander socket");
                assert!(n > 0, "the bystander's connection was closed");
            }
            Err(e) => panic!("malformed packet from the server: {e:?}"),
        }
    }
}
