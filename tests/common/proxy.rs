//! PROXY protocol headers for tests, and a forwarder that plays the load balancer: it
//! sends a fixed header to the node, then pipes a client's bytes both ways, so that any
//! MQTT client (rumqttc) can connect to a listener with `proxy_protocol = true`.

use std::net::SocketAddr;

use ppp::v2;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The node side of every announced connection.
fn destination() -> SocketAddr {
    "10.0.0.254:1883".parse().expect("an address")
}

/// A PROXY v1 (text) header announcing `client`.
pub fn v1(client: SocketAddr) -> Vec<u8> {
    let dst = destination();
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    let dst_ip = if client.is_ipv4() {
        dst.ip().to_string()
    } else {
        "::1".to_string()
    };
    format!(
        "PROXY {family} {} {dst_ip} {} {}\r\n",
        client.ip(),
        client.port(),
        dst.port()
    )
    .into_bytes()
}

/// A PROXY v2 (binary) header announcing a TCP `client`, built by `ppp`.
pub fn v2(client: SocketAddr) -> Vec<u8> {
    let dst = if client.is_ipv4() {
        destination()
    } else {
        "[::1]:1883".parse().unwrap()
    };
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (client, dst),
    )
    .build()
    .expect("a v2 header")
}

/// A PROXY v2 `LOCAL` header (a load balancer's own connection, e.g. a health check).
pub fn v2_local() -> Vec<u8> {
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Local,
        v2::Protocol::Unspecified,
        v2::Addresses::Unspecified,
    )
    .build()
    .expect("a v2 header")
}

/// A load balancer in front of one node listener that sends `header` first on every
/// connection. Stops (listener and connections) when dropped.
pub struct ProxyForwarder {
    /// Where clients connect instead of the node.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl ProxyForwarder {
    /// Listens on a free loopback port.
    pub async fn start(target: SocketAddr, header: Vec<u8>) -> ProxyForwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = until.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                };
                let header = header.clone();
                let until = until.clone();
                tokio::spawn(async move {
                    let Ok(mut node) = TcpStream::connect(target).await else {
                        return;
                    };
                    if node.write_all(&header).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        _ = until.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut node) => {}
                    }
                });
            }
        });
        ProxyForwarder { addr, stop }
    }
}

impl Drop for ProxyForwarder {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
