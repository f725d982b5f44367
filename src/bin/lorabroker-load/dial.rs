//! How the load generator reaches a broker's MQTT listener: plain TCP, TLS, WebSocket or
//! WebSocket over TLS (`--transport`). Every connection becomes the library's
//! [`lorabroker::transport::Stream`], so plain TCP stays an unboxed `TcpStream` read and
//! written directly, and only TLS and WebSocket go through a boxed layer: rustls (ring
//! provider) for TLS, tokio-tungstenite's client (`client_async`: binary, masked frames,
//! subprotocol `mqtt`) wrapped in the library's [`WsStream`] for WebSocket. With
//! `--source-addrs` the TCP sockets are bound to several source addresses in turn (see
//! `oslimits.rs`), and a failed connect says which limit it hit.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use lorabroker::transport::ws::WsStream;
use lorabroker::transport::{Duplex, Stream};
use prometheus_client::metrics::family::Family;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::oslimits::{self, DialError};

/// What carries MQTT between the load generator and the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP (ALPN `mqtt` offered).
    Tls,
    /// WebSocket over TCP (`ws://`).
    Ws,
    /// WebSocket over TLS (`wss://`, ALPN `http/1.1` offered).
    Wss,
}

impl TransportKind {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Tls => "tls",
            TransportKind::Ws => "ws",
            TransportKind::Wss => "wss",
        }
    }

    fn uses_tls(self) -> bool {
        matches!(self, TransportKind::Tls | TransportKind::Wss)
    }

    fn uses_ws(self) -> bool {
        matches!(self, TransportKind::Ws | TransportKind::Wss)
    }
}

/// Opens connections to a broker over one transport.
#[derive(Clone)]
pub struct Dialer {
    kind: TransportKind,
    /// The TLS client and the name the broker's certificate must carry (TLS and WSS).
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// The HTTP path of the WebSocket upgrade (WS and WSS).
    ws_path: String,
    /// Source addresses the TCP sockets are bound to, round-robin (empty: unbound).
    sources: Arc<[IpAddr]>,
    /// How many sockets chose a source address so far (shared by the clones).
    next_source: Arc<AtomicUsize>,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialer")
            .field("kind", &self.kind)
            .field("server_name", &self.tls.as_ref().map(|(_, n)| n))
            .field("ws_path", &self.ws_path)
            .field("sources", &self.sources)
            .finish()
    }
}

impl Dialer {
    /// A dialer for `kind`: TLS and WSS trust the certificates in `cafile` (required for
    /// them) and expect `server_name`; WS and WSS upgrade at `ws_path`.
    pub fn new(
        kind: TransportKind,
        cafile: Option<&Path>,
        server_name: &str,
        ws_path: &str,
    ) -> anyhow::Result<Self> {
        let tls = if kind.uses_tls() {
            let Some(cafile) = cafile else {
                bail!("--transport {} needs --cafile", kind.as_str());
            };
            let name = ServerName::try_from(server_name.to_owned())
                .with_context(|| format!("--server-name {server_name:?}"))?;
            let alpn: &[u8] = if kind.uses_ws() { b"http/1.1" } else { b"mqtt" };
            Some((connector(cafile, alpn)?, name))
        } else {
            None
        };
        if kind.uses_ws() {
            check_ws_path(ws_path)?;
        }
        Ok(Self {
            kind,
            tls,
            ws_path: ws_path.to_owned(),
            sources: Arc::from([]),
            next_source: Arc::default(),
        })
    }

    /// This dialer, binding each TCP socket to the next of `sources` in turn (see
    /// [`oslimits::connect_from`]); none: the kernel chooses.
    pub fn with_sources(mut self, sources: Vec<IpAddr>) -> Self {
        self.sources = sources.into();
        self
    }

    /// The source addresses sockets are bound to (empty when unbound).
    pub fn sources(&self) -> &[IpAddr] {
        &self.sources
    }

    /// The transport of this dialer.
    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// Opens a connection to `addr` and runs the TLS and WebSocket handshakes, if any.
    pub async fn dial(&self, addr: SocketAddr) -> anyhow::Result<Stream> {
        let source = (!self.sources.is_empty()).then(|| {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed);
            self.sources[i % self.sources.len()]
        });
        let tcp = match source {
            None => TcpStream::connect(addr).await,
            Some(source) => oslimits::connect_from(source, addr).await,
        }
        .map_err(|e| DialError::new(e, addr, source))?;
        tcp.set_nodelay(true)?;
        let layered: Box<dyn Duplex> = match &self.tls {
            None if !self.kind.uses_ws() => return Ok(Stream::Tcp(tcp)),
            None => Box::new(tcp),
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {addr}"))?,
            ),
        };
        if !self.kind.uses_ws() {
            return Ok(Stream::Layered(layered));
        }
        let request = ws_request(addr, &self.ws_path)?;
        let (ws, response) = tokio_tungstenite::client_async(request, layered)
            .await
            .with_context(|| format!("WebSocket upgrade at {addr}{}", self.ws_path))?;
        let protocol = response.headers().get("Sec-WebSocket-Protocol");
        if protocol.is_none_or(|p| p != "mqtt") {
            bail!("the broker at {addr} did not accept WebSocket subprotocol mqtt ({protocol:?})");
        }
        // The errors counter belongs to the server side; a client has nowhere to export it.
        Ok(Stream::Layered(Box::new(WsStream::new(
            ws,
            Family::default(),
        ))))
    }
}

/// A rustls client (ring provider) trusting the certificates of the PEM file `cafile` and
/// offering ALPN `alpn`.
fn connector(cafile: &Path, alpn: &[u8]) -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(cafile)
        .with_context(|| format!("reading --cafile {}", cafile.display()))?;
    for cert in certs {
        let cert = cert.with_context(|| format!("a certificate in {}", cafile.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("a certificate in {}", cafile.display()))?;
    }
    if roots.is_empty() {
        bail!("--cafile {}: no certificate in it", cafile.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `--ws-path` must be an absolute HTTP path.
fn check_ws_path(path: &str) -> anyhow::Result<()> {
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("--ws-path {path:?}: an absolute path like /mqtt");
    }
    Ok(())
}

/// The upgrade request for `ws://{addr}{path}`, offering subprotocol `mqtt`.
fn ws_request(addr: SocketAddr, path: &str) -> anyhow::Result<Request> {
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .with_context(|| format!("--ws-path {path:?}"))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_paths_must_be_absolute() {
        assert!(check_ws_path("/mqtt").is_ok());
        assert!(check_ws_path("/a/b?x=1").is_ok());
        assert!(check_ws_path("mqtt").is_err());
        assert!(check_ws_path("").is_err());
        assert!(check_ws_path("/a b").is_err());
    }

    #[test]
    fn the_upgrade_request_offers_mqtt_at_the_path() {
        let addr: SocketAddr = "127.0.0.1:8083".parse().unwrap();
        let r = ws_request(addr, "/mqtt").unwrap();
        assert_eq!(r.uri().to_string(), "ws://127.0.0.1:8083/mqtt");
        assert_eq!(r.headers()["Sec-WebSocket-Protocol"], "mqtt");
        let v6: SocketAddr = "[::1]:9001".parse().unwrap();
        assert_eq!(
            ws_request(v6, "/ws").unwrap().uri().to_string(),
            "ws://[::1]:9001/ws"
        );
    }

    #[test]
    fn tls_needs_a_readable_cafile_and_a_valid_name() {
        let e = Dialer::new(TransportKind::Tls, None, "localhost", "/mqtt").unwrap_err();
        assert!(e.to_string().contains("--cafile"), "{e}");
        let missing = Path::new("/nonexistent/ca.pem");
        let e = Dialer::new(TransportKind::Wss, Some(missing), "localhost", "/mqtt").unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/ca.pem"), "{e:#}");
        let e = Dialer::new(TransportKind::Ws, None, "localhost", "mqtt").unwrap_err();
        assert!(e.to_string().contains("--ws-path"), "{e}");
        // Plain transports need no CA.
        assert_eq!(
            Dialer::new(TransportKind::Tcp, None, "localhost", "/mqtt")
                .unwrap()
                .kind(),
            TransportKind::Tcp
        );
    }

    #[test]
    fn transport_names_parse() {
        use clap::ValueEnum;
        for k in [
            TransportKind::Tcp,
            TransportKind::Tls,
            TransportKind::Ws,
            TransportKind::Wss,
        ] {
            assert_eq!(TransportKind::from_str(k.as_str(), false), Ok(k));
        }
        assert!(TransportKind::from_str("quic", false).is_err());
    }
}
