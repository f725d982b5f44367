//! MQTT over WebSocket (plain and over TLS), as MQTT 3.1.1 §6 describes it: an HTTP
//! upgrade on one path (`mqtt.ws.path`) with the subprotocol `mqtt` (or `mqttv3.1`), then
//! MQTT bytes in binary frames, split across frames or several packets in one frame as the
//! client likes.
//!
//! The upgrade refuses, with an HTTP status and a one-line reason:
//! - another path: 404;
//! - no offered subprotocol that is `mqtt` or `mqttv3.1`: 400 (§6 says the client MUST
//!   offer `mqtt`; MQTT.js, Paho and mosquitto's clients do);
//! - an `Origin` not in `mqtt.ws.allowed_origins`, when that list is not empty: 403. A
//!   request without `Origin` is not from a browser page and is let through (an origin
//!   check protects browsers' users; other clients can send any header they like).
//!
//! After the upgrade [`WsStream`] is the byte stream the session reads: text frames close
//! the connection (status 1003), pings are answered, the client's close frame ends the
//! stream like a FIN, and our shutdown sends a close frame and waits (briefly) for the
//! answer. A frame or message larger than `mqtt.max_packet_size` plus an MQTT fixed header
//! closes the connection (1009) before it is buffered, counted in
//! `lorabroker_websocket_errors_total{reason}`.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{Sink, Stream};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, error::CapacityError, Message};
use tokio_tungstenite::WebSocketStream;

use super::Duplex;
use crate::config::MqttWsConfig;
use crate::metrics::ReasonLabels;

/// The subprotocols of MQTT over WebSocket, in the order they are chosen when a client
/// offers both: `mqtt` (3.1.1) and `mqttv3.1` (3.1, which older Paho clients send).
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Bytes tungstenite reads from the socket at once. It allocates this buffer for every
/// connection up front and keeps it, so it is small: clients send mostly small packets,
/// and a larger frame grows the buffer for as long as it takes (benches/RESULTS.md: an idle
/// WebSocket connection costs 3.9 KB with 1 KiB, 7.1 KB with 4 KiB, 2.2 KB over TCP).
const READ_BUFFER: usize = 1024;
/// Largest binary message one write makes: a batch of packets up to this size goes in one
/// frame, a longer one in several (MQTT packets may span frames). It bounds what
/// tungstenite's write buffer grows to and keeps.
const MAX_WRITE_MESSAGE: usize = 64 * 1024;
/// The most an MQTT fixed header adds to a packet's remaining length.
const FIXED_HEADER_MAX: usize = 5;
/// How long our shutdown waits for the client's answer to our close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Why a WebSocket upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The request was refused with an HTTP error status.
    #[error("refused with HTTP {status}: {why}")]
    Refused {
        /// The status sent.
        status: u16,
        /// Why, as the response body said.
        why: String,
    },
    /// The request was not a valid WebSocket upgrade, or the socket failed.
    #[error("{0}")]
    Handshake(#[from] tungstenite::Error),
}

/// The settings of WebSocket listeners (path, subprotocols, origins, frame bound).
pub struct WsSettings {
    path: String,
    allowed_origins: Vec<String>,
    /// Largest frame payload and message accepted from a client.
    max_message: usize,
    errors: Family<ReasonLabels, Counter>,
}

impl WsSettings {
    /// Settings from `[mqtt.ws]`; frames and messages are bounded by `max_packet_size`
    /// (`mqtt.max_packet_size`) plus an MQTT fixed header; `errors` counts the closes for a
    /// frame problem by reason.
    pub fn new(
        config: &MqttWsConfig,
        max_packet_size: usize,
        errors: Family<ReasonLabels, Counter>,
    ) -> Self {
        Self {
            path: config.path.clone(),
            allowed_origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            max_message: max_packet_size.saturating_add(FIXED_HEADER_MAX),
            errors,
        }
    }

    /// The largest frame payload or message a client may send.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    fn config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            // Written at once: the session already batches packets into one message.
            .write_buffer_size(0)
            .max_write_buffer_size(MAX_WRITE_MESSAGE * 2 + READ_BUFFER)
            .max_frame_size(Some(self.max_message))
            .max_message_size(Some(self.max_message))
    }

    /// Runs the server side of a WebSocket upgrade on `stream`; MQTT bytes flow in binary
    /// frames from then on.
    pub async fn accept<S: Duplex>(&self, stream: S) -> Result<Box<dyn Duplex>, WsError> {
        let check = Upgrade { settings: self };
        match tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(self.config()))
            .await
        {
            Ok(ws) => Ok(Box::new(WsStream::new(ws, self.errors.clone()))),
            Err(tungstenite::Error::Http(response)) => Err(WsError::Refused {
                status: response.status().as_u16(),
                why: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned(),
            }),
            Err(e) => Err(WsError::Handshake(e)),
        }
    }

    /// The response to an upgrade request: the chosen subprotocol, or why not.
    fn check(&self, request: &Request) -> Result<&'static str, (StatusCode, String)> {
        if request.uri().path() != self.path {
            return Err((
                StatusCode::NOT_FOUND,
                format!("MQTT over WebSocket is at {}", self.path),
            ));
        }
        if !self.allowed_origins.is_empty() {
            if let Some(origin) = request.headers().get(header::ORIGIN) {
                let origin = origin.to_str().unwrap_or("").trim_end_matches('/');
                if !self
                    .allowed_origins
                    .iter()
                    .any(|o| o.eq_ignore_ascii_case(origin))
                {
                    return Err((
                        StatusCode::FORBIDDEN,
                        "this Origin is not in mqtt.ws.allowed_origins".into(),
                    ));
                }
            }
        }
        let offered = request
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim);
        let mut chosen = None;
        for protocol in offered {
            if let Some(p) = SUBPROTOCOLS
                .iter()
                .find(|p| p.eq_ignore_ascii_case(protocol))
            {
                // The first one the client offers that we speak.
                chosen = Some(*p);
                break;
            }
        }
        chosen.ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                "offer the WebSocket subprotocol mqtt (Sec-WebSocket-Protocol: mqtt)".into(),
            )
        })
    }
}

/// The upgrade callback: path, origin and subprotocol checks.
struct Upgrade<'a> {
    settings: &'a WsSettings,
}

impl Callback for Upgrade<'_> {
    fn on_request(
        self,
        request: &Request,
        mut response: Response,
    ) -> Result<Response, ErrorResponse> {
        match self.settings.check(request) {
            Ok(protocol) => {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(protocol),
                );
                Ok(response)
            }
            Err((status, why)) => {
                let mut refusal = ErrorResponse::new(Some(why));
                *refusal.status_mut() = status;
                Err(refusal)
            }
        }
    }
}

/// An upgraded WebSocket connection as the byte stream of MQTT: binary message payloads
/// read in order, writes sent as binary messages.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message (empty while idle).
    unread: Bytes,
    /// The client closed (or the connection failed): reads return end of stream.
    ended: bool,
    /// Started by our shutdown: gives up waiting for the client's close answer.
    close_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Our close frame is queued.
    close_sent: bool,
    errors: Family<ReasonLabels, Counter>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Wraps an upgraded connection; `errors` counts closes for a frame problem.
    pub fn new(ws: WebSocketStream<S>, errors: Family<ReasonLabels, Counter>) -> Self {
        Self {
            ws,
            unread: Bytes::new(),
            ended: false,
            close_deadline: None,
            close_sent: false,
            errors,
        }
    }

    /// Counts `reason`, sends a close frame with `code` as far as the socket takes it
    /// without waiting, and gives the error the session sees.
    fn fail(
        &mut self,
        cx: &mut Context<'_>,
        reason: &'static str,
        code: CloseCode,
        why: String,
    ) -> io::Error {
        self.errors.get_or_create(&ReasonLabels { reason }).inc();
        self.ended = true;
        let frame = CloseFrame {
            code,
            reason: why.clone().into(),
        };
        if let Poll::Ready(Ok(())) = Pin::new(&mut self.ws).poll_ready(cx) {
            if Pin::new(&mut self.ws)
                .start_send(Message::Close(Some(frame)))
                .is_ok()
            {
                let _ = Pin::new(&mut self.ws).poll_flush(cx);
            }
        }
        io::Error::new(io::ErrorKind::InvalidData, why)
    }
}

fn io_error(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.unread.is_empty() {
                let n = this.unread.len().min(buf.remaining());
                buf.put_slice(&this.unread[..n]);
                this.unread.advance(n);
                if this.unread.is_empty() {
                    // Free the message now, not at the next one.
                    this.unread = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            // Reading also writes what tungstenite queued (pong, the close answer).
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(bytes))) => this.unread = bytes,
                Some(Ok(Message::Text(_))) => {
                    let why = "text frame: MQTT goes in binary frames".to_owned();
                    return Poll::Ready(Err(this.fail(
                        cx,
                        "text_frame",
                        CloseCode::Unsupported,
                        why,
                    )));
                }
                // Answered by tungstenite (a pong is queued and written by the next poll).
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                // Answered by tungstenite; the stream ends after it (`None`).
                Some(Ok(Message::Close(_))) => {}
                Some(Err(tungstenite::Error::Capacity(e))) => {
                    let reason = match e {
                        CapacityError::MessageTooLong { .. } => "too_large",
                        CapacityError::TooManyHeaders => "protocol",
                    };
                    let why = format!("{e}");
                    return Poll::Ready(Err(this.fail(cx, reason, CloseCode::Size, why)));
                }
                Some(Err(tungstenite::Error::Protocol(e))) => {
                    let why = format!("WebSocket protocol error: {e}");
                    return Poll::Ready(Err(this.fail(cx, "protocol", CloseCode::Protocol, why)));
                }
                Some(Err(
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                ))
                | None => this.ended = true,
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Err(io_error(e)));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Sends the slices, up to [`MAX_WRITE_MESSAGE`] bytes of them, as one binary message.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io_error)?;
        let mut message = BytesMut::with_capacity(total.min(MAX_WRITE_MESSAGE));
        for b in bufs {
            let room = MAX_WRITE_MESSAGE - message.len();
            message.extend_from_slice(&b[..b.len().min(room)]);
            if message.len() == MAX_WRITE_MESSAGE {
                break;
            }
        }
        let n = message.len();
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(message.freeze()))
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(io_error)
    }

    /// Sends a close frame (1000), then waits up to [`CLOSE_WAIT`] for the client's answer.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let deadline = this
            .close_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_WAIT)));
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        if !this.close_sent {
            ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(io_error)?;
            let normal = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            Pin::new(&mut this.ws)
                .start_send(Message::Close(Some(normal)))
                .map_err(io_error)?;
            this.close_sent = true;
        }
        // Flushes the close frame (tungstenite does not send a second one).
        match Pin::new(&mut this.ws).poll_close(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(io_error(e))),
            Poll::Pending => return Poll::Pending,
        }
        // Our close frame is out; read (and drop) until the client's close answer.
        loop {
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Poll::Ready(Ok(())),
            }
        }
    }
}
