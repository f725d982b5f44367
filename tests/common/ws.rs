//! WebSocket for tests: the client side of the upgrade (tokio-tungstenite, over TCP or
//! over TLS for `wss://`), with the subprotocols and `Origin` a test chooses. The raw MQTT
//! client that runs over it is in `raw.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
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
