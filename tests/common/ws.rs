//! MQTT over WebSocket for tests: a raw MQTT client over plain TCP or over a real
//! WebSocket client (tokio-tungstenite, over TCP or over TLS for `wss://`), which sends the
//! bytes it is given in the binary frames the test asks for, and reads MQTT packets back.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use mqttbytes::v4::{self, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use lorabroker::transport::{Duplex, Kind};

use super::broker::TestNode;

/// How long a raw client waits for a packet or for the close.
pub const WAIT: Duration = Duration::from_secs(5);

/// The `ws://` URL of a node's WebSocket listener at `path`.
pub fn ws_url(node: &TestNode, path: &str) -> String {
    format!("ws://{}{path}", ws_addr(node))
}

/// The address of a node's WebSocket listener.
pub fn ws_addr(node: &TestNode) -> SocketAddr {
    node.mqtt_listeners
        .iter()
        .find(|(k, _)| *k == Kind::Ws)
        .map(|(_, a)| *a)
        .expect("the node has a WebSocket listener")
}

/// Runs a WebSocket client handshake to `url` offering `protocols` (the
/// `Sec-WebSocket-Protocol` value) and sending `origin`; the HTTP status on refusal.
pub async fn ws_handshake(
    url: &str,
    protocols: Option<&str>,
    origin: Option<&str>,
) -> Result<(WebSocketStream<Box<dyn Duplex>>, Option<String>), u16> {
    let mut request = url.into_client_request().expect("a valid ws:// URL");
    if let Some(p) = protocols {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(p).expect("a header value"),
        );
    }
    if let Some(o) = origin {
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(o).expect("a header value"));
    }
    let host = request
        .uri()
        .authority()
        .expect("a host")
        .as_str()
        .to_owned();
    let tcp = TcpStream::connect(&host)
        .await
        .expect("the ws port accepts");
    upgrade(request, Box::new(tcp)).await
}

/// [`ws_handshake`] over an established `stream` (a TLS client for `wss://`), offering
/// subprotocol `mqtt`.
pub async fn wss_handshake(
    url: &str,
    stream: Box<dyn Duplex>,
) -> Result<(WebSocketStream<Box<dyn Duplex>>, Option<String>), u16> {
    let mut request = url.into_client_request().expect("a valid wss:// URL");
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    upgrade(request, stream).await
}

async fn upgrade(
    request: tungstenite::handshake::client::Request,
    stream: Box<dyn Duplex>,
) -> Result<(WebSocketStream<Box<dyn Duplex>>, Option<String>), u16> {
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((ws, response)) => {
            let chosen = response
                .headers()
                .get("Sec-WebSocket-Protocol")
                .map(|v| v.to_str().expect("ASCII").to_owned());
            Ok((ws, chosen))
        }
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("the upgrade neither succeeds nor is refused with a status: {e}"),
    }
}

/// A raw MQTT connection over TCP or WebSocket.
pub enum Raw {
    /// Plain TCP.
    Tcp(TcpStream, BytesMut),
    /// A WebSocket client.
    Ws(Box<WebSocketStream<Box<dyn Duplex>>>, BytesMut),
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// TCP FIN or reset.
    Eof,
    /// A WebSocket close frame with this code.
    Close(u16),
}

/// What to connect a [`Raw`] over.
#[derive(Clone, Debug)]
pub enum Connector {
    /// MQTT over TCP at this address.
    Tcp(SocketAddr),
    /// MQTT over WebSocket at this `ws://` URL (subprotocol `mqtt`).
    Ws(String),
    /// MQTT over WebSocket over TLS at this address, trusting these CAs (PEM): `wss://localhost:PORT/mqtt`.
    Wss(SocketAddr, Vec<String>),
}

impl Connector {
    /// The listener of `kind` of `node`.
    pub fn of(node: &TestNode, kind: Kind) -> Connector {
        match kind {
            Kind::Tcp => Connector::Tcp(node.mqtt_addr),
            Kind::Ws => Connector::Ws(ws_url(node, "/mqtt")),
            other => panic!("no raw connector for {other:?}"),
        }
    }

    /// Opens a connection (no MQTT sent yet).
    pub async fn open(&self) -> Raw {
        match self {
            Connector::Tcp(addr) => Raw::Tcp(
                TcpStream::connect(addr).await.expect("MQTT port accepts"),
                BytesMut::new(),
            ),
            Connector::Ws(url) => {
                let (ws, chosen) = ws_handshake(url, Some("mqtt"), None)
                    .await
                    .expect("the upgrade succeeds");
                assert_eq!(chosen.as_deref(), Some("mqtt"));
                Raw::Ws(Box::new(ws), BytesMut::new())
            }
            Connector::Wss(addr, roots) => {
                let tls = super::tls::tls_connect_alpn(*addr, roots, None, b"http/1.1")
                    .await
                    .expect("the TLS handshake succeeds");
                let url = format!("wss://localhost:{}/mqtt", addr.port());
                let (ws, chosen) = wss_handshake(&url, Box::new(tls))
                    .await
                    .expect("the upgrade succeeds");
                assert_eq!(chosen.as_deref(), Some("mqtt"));
                Raw::Ws(Box::new(ws), BytesMut::new())
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
    let publish = v4::Publish::new(topic, mqttbytes::QoS::AtMostOnce, payload.to_vec());
    let mut out = BytesMut::new();
    publish.write(&mut out).expect("PUBLISH encodes");
    out.to_vec()
}

impl Raw {
    /// Sends `bytes` (in one binary frame over WebSocket).
    pub async fn send(&mut self, bytes: &[u8]) {
        self.send_frames(&[bytes]).await
    }

    /// Sends each part in a binary frame of its own (one write per part over TCP).
    pub async fn send_frames(&mut self, parts: &[&[u8]]) {
        for part in parts {
            match self {
                Raw::Tcp(tcp, _) => tcp.write_all(part).await.expect("write"),
                Raw::Ws(ws, _) => ws
                    .send(Message::Binary(Bytes::copy_from_slice(part)))
                    .await
                    .expect("send a binary frame"),
            }
        }
    }

    /// Sends a WebSocket message of another kind (ping, text, close).
    pub async fn send_message(&mut self, message: Message) {
        match self {
            Raw::Ws(ws, _) => ws.send(message).await.expect("send"),
            Raw::Tcp(..) => panic!("not a WebSocket"),
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
            let buf = match self {
                Raw::Tcp(_, b) | Raw::Ws(_, b) => b,
            };
            match v4::read(buf, 1 << 20) {
                Ok(packet) => return Ok(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("the server sent a malformed packet: {e:?}"),
            }
            match self {
                Raw::Tcp(tcp, buf) => match tcp.read_buf(buf).await {
                    Ok(0) | Err(_) => return Err(Ended::Eof),
                    Ok(_) => {}
                },
                Raw::Ws(ws, buf) => match ws.next().await {
                    Some(Ok(Message::Binary(b))) => buf.extend_from_slice(&b),
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
        match self {
            Raw::Ws(ws, _) => tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("a message within the wait")
                .and_then(Result::ok),
            Raw::Tcp(..) => panic!("not a WebSocket"),
        }
    }

    /// Waits for the end of the connection, skipping packets; panics after `within`.
    pub async fn closed(&mut self, within: Duration) -> Ended {
        tokio::time::timeout(within, async {
            loop {
                if let Err(end) = self.next_unbounded().await {
                    return end;
                }
            }
        })
        .await
        .expect("the connection closes within the wait")
    }

    /// CONNECT and the CONNACK return code.
    pub async fn connect(&mut self, username: &str, password: &str) -> u8 {
        self.send(&connect_packet(username, password, 60)).await;
        match self.next().await {
            Ok(Packet::ConnAck(ack)) => ack.code as u8,
            other => panic!("CONNACK expected: {other:?}"),
        }
    }

    /// The next PUBLISH whose topic ends with `suffix` (others skipped).
    pub async fn next_publish_on(&mut self, suffix: &str) -> (String, Bytes) {
        loop {
            match self.next().await {
                Ok(Packet::Publish(p)) if p.topic.ends_with(suffix) => return (p.topic, p.payload),
                Ok(_) => {}
                Err(end) => panic!("closed ({end:?}) before a PUBLISH on …{suffix}"),
            }
        }
    }
}
