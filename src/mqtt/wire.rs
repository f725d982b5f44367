//! The stream of one connection: lazily grown reads framed by [`super::codec`], and
//! batched `writev` writes of queued packets. It knows bytes and packets, not sessions, and
//! not which transport ([`crate::transport::Stream`]) carries them.

use std::future::poll_fn;
use std::io::IoSlice;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use mqttbytes::v4::Packet;

use super::codec::{decode, DecodeError, Decoded};
use crate::transport::Stream;

/// Why reading a packet failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("{0}")]
    Decode(DecodeError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed in the middle of a packet")]
    Truncated,
    #[error("the first packet is not CONNECT (first byte {0:#04x})")]
    NotConnect(u8),
    #[error("CONNECT of {size} bytes is larger than mqtt.max_connect_size = {max}")]
    ConnectTooLarge { size: usize, max: usize },
}

/// Most packets handed to one `writev` (Linux's `UIO_MAXIOV` is 1024).
const MAX_IOV: usize = 64;

/// The stream with its read buffer. Buffers start empty and are given back when idle, so
/// a quiet connection holds almost no memory.
pub(super) struct Wire {
    stream: Stream,
    read_buf: BytesMut,
    max_packet_size: usize,
}

impl Wire {
    pub(super) fn new(stream: Stream, max_packet_size: usize) -> Self {
        Self {
            stream,
            read_buf: BytesMut::new(),
            max_packet_size,
        }
    }

    /// The next whole packet already buffered, if any.
    pub(super) fn buffered_packet(&mut self) -> Result<Option<Packet>, ReadError> {
        match decode(&mut self.read_buf, self.max_packet_size) {
            Ok(Decoded::Packet(p)) => Ok(Some(p)),
            Ok(Decoded::Incomplete) => {
                if self.read_buf.is_empty() {
                    // Also when its capacity is 0: it may still share the allocation of
                    // the packets taken from it.
                    self.read_buf = BytesMut::new();
                }
                Ok(None)
            }
            Err(e) => Err(ReadError::Decode(e)),
        }
    }

    /// Reads whatever the socket has (`Ok(false)` at a clean end of stream), as a poll function, so that waiting for a read holds no future (the
    /// read buffer is only grown once the socket is readable).
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, ReadError>> {
        let read = if self.read_buf.is_empty() {
            // Nothing buffered: read on the stack and keep only what came, so that a
            // connection holds a buffer only while a packet is incomplete or in hand
            // (readiness is often stale, and most reads are one small packet).
            let mut chunk = [0u8; 4096];
            ready!(self.stream.poll_read_chunk(cx, &mut chunk)).inspect(|&n| {
                self.read_buf = BytesMut::from(&chunk[..n]);
            })
        } else {
            if self.read_buf.capacity() - self.read_buf.len() < 1024 {
                self.read_buf.reserve(4096);
            }
            ready!(self.stream.poll_read_buf(cx, &mut self.read_buf))
        };
        Poll::Ready(match read {
            Ok(0) if self.read_buf.is_empty() => Ok(false),
            Ok(0) => Err(ReadError::Truncated),
            Ok(_) => Ok(true),
            Err(e) => Err(e.into()),
        })
    }

    /// Reads the CONNECT packet; `None` at a clean end of stream. Anything that does not
    /// start like a CONNECT (an HTTP request, TLS, noise) is refused at its first byte
    /// instead of waiting for a packet that will never be whole, and a CONNECT announcing
    /// more than `max_size` bytes as soon as its fixed header is readable, so that an
    /// unauthenticated socket never holds more than `max_size` plus one read.
    pub(super) async fn read_connect(
        &mut self,
        max_size: usize,
    ) -> Result<Option<Packet>, ReadError> {
        loop {
            if let Some(&first) = self.read_buf.first() {
                // The packet type only: a CONNECT with wrong flags is the codec's to judge.
                if first >> 4 != 1 {
                    return Err(ReadError::NotConnect(first));
                }
            }
            match decode(&mut self.read_buf, max_size) {
                Ok(Decoded::Packet(p)) => return Ok(Some(p)),
                Ok(Decoded::Incomplete) => {}
                Err(DecodeError::TooLarge { size, max }) => {
                    return Err(ReadError::ConnectTooLarge { size, max })
                }
                Err(e) => return Err(ReadError::Decode(e)),
            }
            if !poll_fn(|cx| self.poll_fill_small(cx)).await? {
                return Ok(None);
            }
        }
    }

    /// [`Wire::poll_fill`] that grows the buffer only by the bytes that came: before
    /// authentication no room is reserved ahead (readiness is often stale, and a socket
    /// that stops half-way through its CONNECT would keep that room for the connect timeout).
    fn poll_fill_small(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, ReadError>> {
        let mut chunk = [0u8; 4096];
        Poll::Ready(match ready!(self.stream.poll_read_chunk(cx, &mut chunk)) {
            Ok(0) if self.read_buf.is_empty() => Ok(false),
            Ok(0) => Err(ReadError::Truncated),
            Ok(n) => {
                self.read_buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) => Err(e.into()),
        })
    }

    /// Shuts the stream's write side down; errors do not matter on the way out.
    pub(super) async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Writes one packet at once (CONNACK and the like, before the outbox runs).
    pub(super) async fn send_now(&mut self, bytes: Bytes) -> std::io::Result<()> {
        self.stream.write_all(&bytes).await
    }

    /// Writes `out[*start..]` with one `writev` per up to [`MAX_IOV`] packets, advancing
    /// `*start` past what was written, then flushes what a transport layer buffered. The
    /// slice array lives on the stack of one poll, not in the connection's future.
    pub(super) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut [Bytes],
        start: &mut usize,
    ) -> Poll<std::io::Result<()>> {
        while *start < out.len() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = out.len().min(*start + MAX_IOV) - *start;
            for (slice, packet) in slices.iter_mut().zip(&out[*start..]) {
                *slice = IoSlice::new(packet);
            }
            let mut written = ready!(self.stream.poll_write_vectored(cx, &slices[..n]))?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            while written > 0 {
                let first = &mut out[*start];
                if written >= first.len() {
                    written -= first.len();
                    *start += 1;
                } else {
                    first.advance(written);
                    written = 0;
                }
            }
        }
        self.stream.poll_flush(cx)
    }
}
