//! A raw MQTT 3.1.1 client for tests, packet by packet, over every transport the broker
//! serves: plain TCP, TLS (rustls), WebSocket and WebSocket over TLS (tokio-tungstenite).
//! Tests send the bytes they choose (malformed ones too), in the WebSocket frames they
//! choose, and read packets back or see how the connection ended; one behaviour suite
//! runs over all four through a [`Connector`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use mqttbytes::v4::{self, Packet, Publish, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use lorabroker::transport::{Duplex, Kind};

use super::broker::TestNode;

/// How long a raw client waits for a packet or for the close.
pub const WAIT: Duration = Duration::from_secs(5);

/// What carries a [`Raw`] client's bytes.
enum Link {
    /// A byte stream: TCP or TLS.
    Bytes(Box<dyn Duplex>),
    /// A WebSocket client (over TCP or TLS).
    Ws(Box<WebSocketStream<Box<dyn Duplex>>>),
}

/// A raw MQTT connection.
pub struct Raw {
    link: Link,
    buf: BytesMut,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// TCP FIN or reset (or TLS close).
    Eof,
    /// A WebSocket close frame with this code.
    Close(u16),
}

/// Where and how to open a [`Raw`] connection.
#[derive(Clone, Debug)]
pub enum Connector {
    /// MQTT over TCP at this address.
    Tcp(SocketAddr),
    /// MQTT over TLS at this address as `localhost`, trusting these CAs (PEM).
    Tls(SocketAddr, Vec<String>),
    /// MQTT over WebSocket at this `ws://` URL (subprotocol `mqtt`).
    Ws(String),
    /// MQTT over WebSocket over TLS at this address (`wss://localhost:PORT/mqtt`, ALPN
    /// `http/1.1` as browsers offer it), trusting these CAs (PEM).
    Wss(SocketAddr, Vec<String>),
}

impl Connector {
    /// The listener of `kind` of `node`; `roots` (PEM) are trusted for TLS and WSS.
    pub fn of(node: &TestNode, kind: Kind, roots: &[String]) -> Connector {
        let addr = node.addr(kind);
        match kind {
            Kind::Tcp => Connector::Tcp(addr),
            Kind::Tls => Connector::Tls(addr, roots.to_vec()),
            Kind::Ws => Connector::Ws(format!("ws://{addr}/mqtt")),
            Kind::Wss => Connector::Wss(addr, roots.to_vec()),
        }
    }

    /// Opens a connection (no MQTT sent yet); panics when the transport refuses.
    pub async fn open(&self) -> Raw {
        match self {
            Connector::Tcp(addr) => {
                Raw::over(TcpStream::connect(addr).await.expect("MQTT port accepts"))
            }
            Connector::Tls(addr, roots) => Raw::over(
                super::tls::tls_connect(*addr, roots, None)
                    .await
                    .expect("the TLS handshake succeeds"),
            ),
            Connector::Ws(url) => {
                let (ws, chosen) = super::ws::ws_handshake(url, Some("mqtt"), None)
                    .await
                    .expect("the upgrade succeeds");
                assert_eq!(chosen.as_deref(), Some("mqtt"));
                Raw::ws(ws)
            }
            Connector::Wss(addr, roots) => {
                let tls = super::tls::tls_connect_alpn(*addr, roots, None, b"http/1.1")
                    .await
                    .expect("the TLS handshake succeeds");
                let url = format!("wss://localhost:{}/mqtt", addr.port());
                let (ws, chosen) = super::ws::wss_handshake(&url, Box::new(tls))
                    .await
                    .expect("the upgrade succeeds");
                assert_eq!(chosen.as_deref(), Some("mqtt"));
                Raw::ws(ws)
            }
        }
    }
}

/// The bytes of a CONNECT with `username`, `password` and `keep_alive` seconds.
pub fn connect_packet(username: &str, password: &str, keep_alive: u16) -> Vec<u8> {
    let mut connect = v4::Connect::new(super::services::unique("raw"));
    connect.keep_alive = keep_alive;
    connect.set_login(username, password);
    let mut out = BytesMut::new();
    connect.write(&mut out).expect("CONNECT encodes");
    out.to_vec()
}

/// The bytes of a SUBSCRIBE (packet ID 1) to `filter` at QoS 0.
pub fn subscribe_packet(filter: &str) -> Vec<u8> {
    let mut subscribe = v4::Subscribe::new(filter, mqttbytes::QoS::AtMostOnce);
    subscribe.pkid = 1;
    let mut out = BytesMut::new();
    subscribe.write(&mut out).expect("SUBSCRIBE encodes");
    out.to_vec()
}

/// The bytes of a QoS 0 PUBLISH.
pub fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let publish = Publish::new(topic, mqttbytes::QoS::AtMostOnce, payload.to_vec());
    let mut out = BytesMut::new();
    publish.write(&mut out).expect("PUBLISH encodes");
    out.to_vec()
}

impl Raw {
    /// A client over a connected byte stream (TCP, TLS, …).
    pub fn over(stream: impl Duplex) -> Raw {
        Raw {
            link: Link::Bytes(Box::new(stream)),
            buf: BytesMut::new(),
        }
    }

    /// A client over an upgraded WebSocket.
    pub fn ws(ws: WebSocketStream<Box<dyn Duplex>>) -> Raw {
        Raw {
            link: Link::Ws(Box::new(ws)),
            buf: BytesMut::new(),
        }
    }

    /// Sends `bytes` (in one binary frame over WebSocket).
    pub async fn send(&mut self, bytes: &[u8]) {
        self.send_frames(&[bytes]).await
    }

    /// Sends each part in a binary frame of its own (one write per part over a byte stream).
    pub async fn send_frames(&mut self, parts: &[&[u8]]) {
        for part in parts {
            match &mut self.link {
                Link::Bytes(s) => {
                    s.write_all(part).await.expect("write");
                    s.flush().await.expect("flush");
                }
                Link::Ws(ws) => ws
                    .send(Message::Binary(Bytes::copy_from_slice(part)))
                    .await
                    .expect("send a binary frame"),
            }
        }
    }

    /// Sends a WebSocket message of another kind (ping, text, close).
    pub async fn send_message(&mut self, message: Message) {
        match &mut self.link {
            Link::Ws(ws) => ws.send(message).await.expect("send"),
            Link::Bytes(_) => panic!("not a WebSocket"),
        }
    }

    /// The next MQTT packet, or how the connection ended; panics after [`WAIT`].
    pub async fn next(&mut self) -> Result<Packet, Ended> {
        tokio::time::timeout(WAIT, self.next_unbounded())
            .await
            .expect("a packet or the end within the wait")
    }

    /// The next MQTT packet, or how the connection ended.
    pub async fn next_unbounded(&mut self) -> Result<Packet, Ended> {
        loop {
            match v4::read(&mut self.buf, 1 << 20) {
                Ok(packet) => return Ok(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("the server sent a malformed packet: {e:?}"),
            }
            match &mut self.link {
                Link::Bytes(s) => match s.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return Err(Ended::Eof),
                    Ok(_) => {}
                },
                Link::Ws(ws) => match ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                    Some(Ok(Message::Close(frame))) => {
                        return Err(Ended::Close(frame.map(|f| f.code.into()).unwrap_or(1005)))
                    }
                    Some(Ok(Message::Text(t))) => panic!("the server sent a text frame: {t}"),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Err(Ended::Eof),
                },
            }
        }
    }

    /// The next message of the WebSocket (a pong, a close), skipping nothing.
    pub async fn next_message(&mut self) -> Option<Message> {
        match &mut self.link {
            Link::Ws(ws) => tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("a message within the wait")
                .and_then(Result::ok),
            Link::Bytes(_) => panic!("not a WebSocket"),
        }
    }

    /// Waits for the end of the connection, skipping packets; panics after `within`.
    pub async fn closed(&mut self, within: Duration) -> Ended {
        tokio::time::timeout(within, self.end())
            .await
            .expect("the connection closes within the wait")
    }

    /// Whether the connection ends within `within` (packets before the end are skipped).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.end()).await.is_ok()
    }

    async fn end(&mut self) -> Ended {
        loop {
            if let Err(end) = self.next_unbounded().await {
                return end;
            }
        }
    }

    /// CONNECT with keepalive 60 s and the CONNACK return code.
    pub async fn connect(&mut self, username: &str, password: &str) -> u8 {
        self.connect_with(username, password, 60).await
    }

    /// CONNECT with `keep_alive` seconds and the CONNACK return code (255: closed without one).
    pub async fn connect_with(&mut self, username: &str, password: &str, keep_alive: u16) -> u8 {
        self.send(&connect_packet(username, password, keep_alive))
            .await;
        self.connack().await
    }

    /// The CONNACK return code (255: closed without one).
    pub async fn connack(&mut self) -> u8 {
        match self.next().await {
            Ok(Packet::ConnAck(ack)) => ack.code as u8,
            Err(_) => 255,
            Ok(other) => panic!("CONNACK expected: {other:?}"),
        }
    }

    /// Subscribes to `filter` (packet ID 1); whether the SUBACK granted it.
    pub async fn subscribe(&mut self, filter: &str) -> bool {
        self.send(&subscribe_packet(filter)).await;
        loop {
            match self.next().await {
                Ok(Packet::SubAck(ack)) => {
                    return matches!(ack.return_codes[0], SubscribeReasonCode::Success(_))
                }
                Ok(Packet::Publish(_)) => continue,
                other => panic!("SUBACK expected: {other:?}"),
            }
        }
    }

    /// Publishes `payload` on `topic` at QoS 0.
    pub async fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.send(&publish_packet(topic, payload)).await
    }

    /// The next PUBLISH whose topic ends with `suffix` (others skipped).
    pub async fn next_on(&mut self, suffix: &str) -> Publish {
        loop {
            match self.next().await {
                Ok(Packet::Publish(p)) if p.topic.ends_with(suffix) => return p,
                Ok(_) => {}
                Err(end) => panic!("closed ({end:?}) before a PUBLISH on …{suffix}"),
            }
        }
    }

    /// Topic and payload of the next PUBLISH whose topic ends with `suffix`.
    pub async fn next_publish_on(&mut self, suffix: &str) -> (String, Bytes) {
        let p = self.next_on(suffix).await;
        (p.topic, p.payload)
    }
}
