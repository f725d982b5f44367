//! Transports under the MQTT session (DESIGN §4): plain TCP, TLS, WebSocket and WebSocket
//! over TLS, each optionally behind a PROXY protocol header. Every listener accepts TCP;
//! its [`Transport`] turns an accepted socket into a [`Stream`] of MQTT bytes and tells the
//! client's address. One session implementation (`mqtt::session`) serves them all.
//!
//! Plain TCP stays a variant of its own so that its fast path (wait for readiness, then
//! `try_read` into a stack buffer) holds no buffer and no boxed stream while idle.

pub mod dev_ca;
pub mod proxy;
pub mod tls;
pub mod ws;

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A byte stream layered over TCP (TLS, WebSocket): what the session needs of it.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Duplex for T {}

/// The bytes of one MQTT connection, whatever carries them.
pub enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS, WebSocket or both, over TCP.
    Layered(Box<dyn Duplex>),
}

impl Stream {
    /// Reads what is available into `chunk` (0 at the end of the stream).
    pub fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(tcp) => loop {
                ready!(tcp.poll_read_ready(cx))?;
                match tcp.try_read(chunk) {
                    // Readiness was stale: poll again to register for the next one.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    read => return Poll::Ready(read),
                }
            },
            Stream::Layered(s) => {
                let mut buf = ReadBuf::new(chunk);
                ready!(Pin::new(s).poll_read(cx, &mut buf))?;
                Poll::Ready(Ok(buf.filled().len()))
            }
        }
    }

    /// Reads what is available into the spare capacity of `buf` (0 at the end of the
    /// stream); the caller reserves room first.
    pub fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(tcp) => loop {
                ready!(tcp.poll_read_ready(cx))?;
                match tcp.try_read_buf(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    read => return Poll::Ready(read),
                }
            },
            Stream::Layered(s) => tokio_util::io::poll_read_buf(Pin::new(s), cx, buf),
        }
    }

    /// Writes from `bufs`, as `AsyncWrite::poll_write_vectored`.
    pub fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Layered(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    /// Flushes what a layer buffered (TLS records, WebSocket frames); TCP buffers nothing.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(_) => Poll::Ready(Ok(())),
            Stream::Layered(s) => Pin::new(s).poll_flush(cx),
        }
    }

    /// Writes all of `bytes` and flushes.
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(tcp) => tcp.write_all(bytes).await,
            Stream::Layered(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    /// Closes the write side (TLS close_notify, WebSocket close frame, TCP FIN).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(tcp) => tcp.shutdown().await,
            Stream::Layered(s) => s.shutdown().await,
        }
    }
}

/// What a listener speaks above TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// MQTT over TCP (`mqtt.listen`).
    Tcp,
    /// MQTT over TLS (`mqtt.tls.listen`).
    Tls,
    /// MQTT over WebSocket (`mqtt.ws.listen`).
    Ws,
    /// MQTT over WebSocket over TLS (`mqtt.wss.listen`).
    Wss,
}

impl Kind {
    /// The label of the listener in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
            Kind::Ws => "ws",
            Kind::Wss => "wss",
        }
    }

    /// The configuration key of its address.
    pub fn listen_key(self) -> &'static str {
        match self {
            Kind::Tcp => "mqtt.listen",
            Kind::Tls => "mqtt.tls.listen",
            Kind::Ws => "mqtt.ws.listen",
            Kind::Wss => "mqtt.wss.listen",
        }
    }
}

/// Why a connection failed below MQTT.
#[derive(Debug, thiserror::Error)]
pub enum EstablishError {
    /// The PROXY protocol header was missing or invalid.
    #[error("PROXY protocol: {0}")]
    Proxy(#[from] proxy::ProxyError),
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(#[from] tls::TlsError),
    /// The WebSocket upgrade failed.
    #[error("WebSocket upgrade: {0}")]
    Ws(#[from] ws::WsError),
}

impl EstablishError {
    /// The reason label of `lorabroker_transport_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            EstablishError::Proxy(_) => "proxy_protocol",
            EstablishError::Tls(_) => "tls_handshake",
            EstablishError::Ws(_) => "websocket_upgrade",
        }
    }
}

/// The layers of a listener above TCP.
enum Layers {
    Tcp,
    Tls(Arc<tls::TlsAcceptor>),
    Ws(Arc<ws::WsSettings>),
    Wss(Arc<tls::TlsAcceptor>, Arc<ws::WsSettings>),
}

/// One MQTT listener's transport: what runs between the TCP accept and the first MQTT
/// byte (a PROXY header, a TLS handshake, a WebSocket upgrade).
pub struct Transport {
    layers: Layers,
    proxy_protocol: bool,
    /// Longest time from the accept to the first MQTT byte (PROXY header, TLS handshake,
    /// upgrade); the connect timeout starts after it.
    handshake_timeout: Duration,
}

impl Transport {
    /// MQTT over TCP.
    pub fn tcp(proxy_protocol: bool, handshake_timeout: Duration) -> Self {
        Self::new(Layers::Tcp, proxy_protocol, handshake_timeout)
    }

    /// MQTT over TLS.
    pub fn tls(
        acceptor: Arc<tls::TlsAcceptor>,
        proxy_protocol: bool,
        handshake_timeout: Duration,
    ) -> Self {
        Self::new(Layers::Tls(acceptor), proxy_protocol, handshake_timeout)
    }

    /// MQTT over WebSocket.
    pub fn ws(
        settings: Arc<ws::WsSettings>,
        proxy_protocol: bool,
        handshake_timeout: Duration,
    ) -> Self {
        Self::new(Layers::Ws(settings), proxy_protocol, handshake_timeout)
    }

    /// MQTT over WebSocket over TLS.
    pub fn wss(
        acceptor: Arc<tls::TlsAcceptor>,
        settings: Arc<ws::WsSettings>,
        proxy_protocol: bool,
        handshake_timeout: Duration,
    ) -> Self {
        Self::new(
            Layers::Wss(acceptor, settings),
            proxy_protocol,
            handshake_timeout,
        )
    }

    fn new(layers: Layers, proxy_protocol: bool, handshake_timeout: Duration) -> Self {
        Self {
            layers,
            proxy_protocol,
            handshake_timeout,
        }
    }

    /// What the listener speaks.
    pub fn kind(&self) -> Kind {
        match self.layers {
            Layers::Tcp => Kind::Tcp,
            Layers::Tls(_) => Kind::Tls,
            Layers::Ws(_) => Kind::Ws,
            Layers::Wss(..) => Kind::Wss,
        }
    }

    /// Whether a PROXY protocol header must come first.
    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol
    }

    /// Longest time the layers below MQTT may take to be established.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// Whether anything runs before the first MQTT byte (plain TCP without PROXY: no).
    pub fn has_handshake(&self) -> bool {
        self.proxy_protocol || !matches!(self.layers, Layers::Tcp)
    }

    /// Runs the layers below MQTT on an accepted socket: the stream to read MQTT from and
    /// the client's address (the PROXY header's, when the listener requires one).
    pub async fn establish(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<(Stream, SocketAddr), EstablishError> {
        let peer = if self.proxy_protocol {
            proxy::read_header(&mut tcp).await?.unwrap_or(peer)
        } else {
            peer
        };
        let stream = match &self.layers {
            Layers::Tcp => Stream::Tcp(tcp),
            Layers::Tls(tls) => Stream::Layered(tls.accept(tcp).await?),
            Layers::Ws(ws) => Stream::Layered(ws.accept(tcp).await?),
            Layers::Wss(tls, ws) => Stream::Layered(ws.accept(tls.accept(tcp).await?).await?),
        };
        Ok((stream, peer))
    }
}
