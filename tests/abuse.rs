//! Issue 9's attacks, each against real nodes on a real NATS and Redis, each asserting its
//! bound while a [`Bystander`] (another tenant's client on the same node) keeps a normal
//! PINGREQ round trip and keeps receiving its uplinks.
//!
//! One module per attack: [`rate`] (accept flood, random-key CONNECT storm, CONNECT storm
//! per key, downlink flood, SUBSCRIBE flood, keepalive 0), [`quota`] (connection quotas on
//! two nodes, and the quota store suite on Redis). This file holds only the `mod` lines and
//! the shared helpers.

#[path = "common/mod.rs"]
mod common;

#[path = "abuse/quota.rs"]
mod quota;
#[path = "abuse/rate.rs"]
mod rate;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttbytes::v4::{self, Connect, Packet, Subscribe};
use mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use common::broker::TestNode;
use common::services::unique;
use lorabroker::auth::Rights;
use lorabroker::topic::{AppRef, DeviceRef, Event, Id};

/// A PINGREQ round trip slower than this, or an uplink gap longer than [`MAX_GAP`], means
/// the attack hurt another tenant.
pub const MAX_RTT: Duration = Duration::from_millis(250);
/// See [`MAX_RTT`].
pub const MAX_GAP: Duration = Duration::from_secs(1);

/// The shortest time a bystander watches.
pub const WATCH: Duration = Duration::from_secs(1);

/// What a bystander saw.
#[derive(Debug)]
pub struct Seen {
    /// PINGREQ round trips measured.
    pub pings: usize,
    /// The slowest of them.
    pub max_rtt: Duration,
    /// Uplinks received.
    pub uplinks: usize,
    /// The longest time without an uplink.
    pub max_gap: Duration,
}

/// Another tenant's client on the attacked node: it pings every 50 ms and receives an
/// uplink the upstream publishes every 50 ms, and measures both.
pub struct Bystander {
    started: Instant,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Seen>,
}

impl Bystander {
    /// Connects a client of a fresh tenant to `node` (from 127.0.0.1) and starts measuring.
    pub async fn start(node: &TestNode) -> Bystander {
        let app = AppRef::new(
            Id::parse(&unique("bystander")).unwrap(),
            Id::parse("watch").unwrap(),
        );
        let key = node.key(&app, Rights::DEFAULT).await;
        let mut socket = RawClient::connect(node.mqtt_addr, &node.username(&app), &key, 30).await;
        assert_eq!(socket.connack().await, 0, "the bystander connects");
        socket.subscribe(1, "#").await;
        let upstream = node.upstream();
        let device = DeviceRef::new(app, Id::parse("dev1").unwrap());
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut seen = Seen {
                pings: 0,
                max_rtt: Duration::ZERO,
                uplinks: 0,
                max_gap: Duration::ZERO,
            };
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut ping_sent: Option<Instant> = None;
            let mut last_uplink = Instant::now();
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {
                        upstream.publish(&device, Event::Up, "tick".into()).await.unwrap();
                        if ping_sent.is_none() {
                            socket.stream.write_all(&[0xc0, 0x00]).await.unwrap();
                            ping_sent = Some(Instant::now());
                        }
                    }
                    packet = socket.packet() => match packet {
                        Packet::PingResp => {
                            let rtt = ping_sent.take().expect("a PINGRESP answers a PINGREQ").elapsed();
                            seen.pings += 1;
                            seen.max_rtt = seen.max_rtt.max(rtt);
                        }
                        Packet::Publish(_) => {
                            seen.uplinks += 1;
                            seen.max_gap = seen.max_gap.max(last_uplink.elapsed());
                            last_uplink = Instant::now();
                        }
                        other => panic!("the bystander got {other:?}"),
                    },
                }
            }
            seen.max_gap = seen.max_gap.max(last_uplink.elapsed());
            seen
        });
        Bystander {
            started: Instant::now(),
            stop,
            task,
        }
    }

    /// Stops measuring (after at least [`WATCH`], so that a quick attack is also watched
    /// after it) and asserts that the bystander was served normally throughout.
    pub async fn finish(self) -> Seen {
        tokio::time::sleep(WATCH.saturating_sub(self.started.elapsed())).await;
        let _ = self.stop.send(());
        let seen = self.task.await.expect("the bystander ran");
        eprintln!("bystander: {seen:?}");
        assert!(seen.pings >= 10 && seen.uplinks >= 10, "{seen:?}");
        assert!(
            seen.max_rtt < MAX_RTT,
            "PINGREQ round trip {:?}",
            seen.max_rtt
        );
        assert!(seen.max_gap < MAX_GAP, "uplink gap {:?}", seen.max_gap);
        seen
    }
}

/// A raw MQTT 3.1.1 client over one socket, optionally from another loopback address.
pub struct RawClient {
    /// The socket.
    pub stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    /// Opens a TCP connection to `addr` from `from` (a loopback address like 127.0.0.2).
    pub async fn open_from(addr: SocketAddr, from: &str) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(format!("{from}:0").parse().unwrap())?;
        socket.connect(addr).await
    }

    /// Connects from 127.0.0.1 and sends a CONNECT with `keep_alive` seconds.
    pub async fn connect(addr: SocketAddr, username: &str, key: &str, keep_alive: u16) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self::login(stream, username, key, keep_alive).await
    }

    /// Sends a CONNECT on `stream`.
    pub async fn login(mut stream: TcpStream, username: &str, key: &str, keep_alive: u16) -> Self {
        let mut c = Connect::new(unique("raw"));
        c.keep_alive = keep_alive;
        c.set_login(username, key);
        let mut out = BytesMut::new();
        c.write(&mut out).unwrap();
        let _ = stream.write_all(&out).await;
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// The next packet; panics when the connection closes.
    pub async fn packet(&mut self) -> Packet {
        self.try_packet().await.expect("connection open")
    }

    /// The next packet, `None` once the server closed the connection.
    pub async fn try_packet(&mut self) -> Option<Packet> {
        loop {
            match v4::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Some(p),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from the server: {e:?}"),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The CONNACK return code, or 255 when the connection closed without one.
    pub async fn connack(&mut self) -> u8 {
        match tokio::time::timeout(Duration::from_secs(5), self.try_packet()).await {
            Ok(Some(Packet::ConnAck(ack))) => ack.code as u8,
            Ok(None) => 255,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Subscribes to one filter and returns its SUBACK code byte (0x80 refused).
    pub async fn subscribe(&mut self, pkid: u16, filter: &str) -> u8 {
        let mut s = Subscribe::new(filter, QoS::AtMostOnce);
        s.pkid = pkid;
        let mut out = BytesMut::new();
        s.write(&mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
        loop {
            match self.packet().await {
                Packet::SubAck(ack) => {
                    return match ack.return_codes[0] {
                        v4::SubscribeReasonCode::Success(_) => 0,
                        v4::SubscribeReasonCode::Failure => 0x80,
                    }
                }
                Packet::Publish(_) => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }
}

/// The value of the metric line starting with `series` in `/metrics` of `node` (0 if
/// absent).
pub fn metric(node: &TestNode, series: &str) -> u64 {
    node.app
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}
