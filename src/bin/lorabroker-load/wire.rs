//! A minimal MQTT 3.1.1 client over one connection of any transport (see `dial.rs`; plain
//! TCP is an unboxed `TcpStream`): just enough to connect, subscribe,
//! publish at QoS 0 or 1, acknowledge QoS 1 deliveries and read PUBLISH frames, so that
//! one process can hold tens of thousands of connections. Control packets go through mqttbytes' v4 codec; the receive hot path
//! ([`Conn::read_frames`]) only splits frames and hands out PUBLISH payloads as slices,
//! without allocating per message.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{Buf, BufMut, BytesMut};
use lorabroker::transport::Stream;
use mqttbytes::v4::{self, ConnectReturnCode, Packet, SubscribeReasonCode};
use mqttbytes::QoS;

use crate::dial::Dialer;

/// Keepalive announced in CONNECT. Long enough that no scenario needs PINGREQs.
const KEEP_ALIVE_SECS: u16 = 600;
/// Largest packet accepted from a broker.
const MAX_PACKET: usize = 1 << 20;
/// How long a control exchange (CONNACK, SUBACK) may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes [`Conn::read_frames`] makes room for at once, by default: large reads for the
/// subscribers of the throughput scenarios.
const READ_CHUNK: usize = 16 * 1024;

/// Username and password of a CONNECT.
#[derive(Clone, Debug)]
pub struct Login {
    /// MQTT username (`{app}@{tenant}` for lorabroker).
    pub username: String,
    /// MQTT password (an API key for lorabroker).
    pub password: String,
}

/// One MQTT connection of the load generator.
pub struct Conn {
    stream: Stream,
    buf: BytesMut,
    /// Bytes to make room for when the buffer runs low (see [`Conn::set_read_chunk`]).
    read_chunk: usize,
}

impl Conn {
    /// Opens a connection with `dialer`, sends CONNECT (clean session, QoS 0 client) and waits for a
    /// successful CONNACK; a refusal is an error naming the return code.
    pub async fn connect(
        dialer: &Dialer,
        addr: SocketAddr,
        client_id: &str,
        login: Option<&Login>,
    ) -> anyhow::Result<Conn> {
        Ok(Self::connect_session(dialer, addr, client_id, login, true)
            .await?
            .0)
    }

    /// [`Conn::connect`] with the given clean-session flag; also returns CONNACK's
    /// session-present flag.
    pub async fn connect_session(
        dialer: &Dialer,
        addr: SocketAddr,
        client_id: &str,
        login: Option<&Login>,
        clean_session: bool,
    ) -> anyhow::Result<(Conn, bool)> {
        let stream = dialer.dial(addr).await?;
        let mut conn = Conn {
            stream,
            buf: BytesMut::with_capacity(256),
            read_chunk: READ_CHUNK,
        };
        let mut connect = v4::Connect::new(client_id);
        connect.keep_alive = KEEP_ALIVE_SECS;
        connect.clean_session = clean_session;
        if let Some(l) = login {
            connect.set_login(l.username.as_str(), l.password.as_str());
        }
        let mut out = BytesMut::with_capacity(connect.len() + 8);
        connect
            .write(&mut out)
            .map_err(|e| anyhow::anyhow!("encode CONNECT: {e:?}"))?;
        conn.stream.write_all(&out).await?;
        match conn.control_packet().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
                Ok((conn, ack.session_present))
            }
            Packet::ConnAck(ack) => bail!("connection refused: {:?}", ack.code),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    /// Subscribes to `filters` at QoS 0 and waits for the SUBACK; a refused filter is an error.
    pub async fn subscribe(&mut self, filters: &[String]) -> anyhow::Result<()> {
        self.subscribe_qos(filters, QoS::AtMostOnce).await.map(drop)
    }

    /// Subscribes to `filters` at `qos` and waits for the SUBACK; returns the granted QoS
    /// per filter (a refused filter is an error). PUBLISHes that arrive before the SUBACK
    /// are dropped (and, at QoS 1, acknowledged, so that the broker does not hold them).
    pub async fn subscribe_qos(
        &mut self,
        filters: &[String],
        qos: QoS,
    ) -> anyhow::Result<Vec<QoS>> {
        let subscribe = v4::Subscribe::new_many(
            filters
                .iter()
                .map(|f| v4::SubscribeFilter::new(f.clone(), qos)),
        );
        let mut subscribe = subscribe;
        subscribe.pkid = 1;
        let mut out = BytesMut::with_capacity(64);
        subscribe
            .write(&mut out)
            .map_err(|e| anyhow::anyhow!("encode SUBSCRIBE: {e:?}"))?;
        self.stream.write_all(&out).await?;
        loop {
            match self.control_packet().await? {
                Packet::SubAck(ack) => {
                    return ack
                        .return_codes
                        .iter()
                        .map(|c| match c {
                            SubscribeReasonCode::Success(q) => Ok(*q),
                            SubscribeReasonCode::Failure => {
                                bail!("subscription to {filters:?} refused")
                            }
                        })
                        .collect();
                }
                // A broker may already deliver before the SUBACK is read; drop it.
                Packet::Publish(p) => {
                    if p.qos != QoS::AtMostOnce {
                        let mut out = BytesMut::with_capacity(4);
                        encode_puback(&mut out, p.pkid);
                        self.stream.write_all(&out).await?;
                    }
                    continue;
                }
                other => bail!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// Makes [`Conn::read_frames`] grow its buffer by `bytes` at a time (16 KiB by default):
    /// a connection that receives a message now and then keeps a small buffer, so that a
    /// hundred thousand of them fit in the load generator's memory.
    pub fn set_read_chunk(&mut self, bytes: usize) {
        self.read_chunk = bytes.max(64);
    }

    /// Writes raw bytes (e.g. a batch of [`encode_publish`] frames).
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Sends DISCONNECT and closes; errors are ignored (the broker may be gone).
    pub async fn disconnect(mut self) {
        let _ = self.stream.write_all(&[0xE0, 0x00]).await;
        let _ = self.stream.shutdown().await;
    }

    /// Reads once from the socket and calls `on_publish` with the payload of every whole
    /// PUBLISH frame now buffered; other frames are skipped. Returns `Ok(false)` when the
    /// broker closed the connection.
    pub async fn read_frames(&mut self, mut on_publish: impl FnMut(&[u8])) -> anyhow::Result<bool> {
        self.read_packets(|f| {
            if let Frame::Publish { payload, .. } = f {
                on_publish(payload)
            }
        })
        .await
    }

    /// Like [`Conn::read_frames`], but hands out every whole frame now buffered as a
    /// [`Frame`]: PUBLISH with its QoS, DUP flag and packet ID, PUBACK with its packet ID.
    /// Cancel-safe: frames are only parsed once a read completed.
    pub async fn read_packets(
        &mut self,
        mut on_frame: impl FnMut(Frame<'_>),
    ) -> anyhow::Result<bool> {
        if self.buf.capacity() - self.buf.len() < self.read_chunk / 16 {
            self.buf.reserve(self.read_chunk);
        }
        let n = self.fill().await?;
        if n == 0 {
            return Ok(false);
        }
        while let Some((header, body_len, header_len)) = frame_header(&self.buf)? {
            if self.buf.len() < header_len + body_len {
                break;
            }
            let body = &self.buf[header_len..header_len + body_len];
            on_frame(parse_frame(header, body));
            self.buf.advance(header_len + body_len);
        }
        Ok(true)
    }

    /// Reads once into the spare capacity of the buffer (0: the broker closed). Cancel-safe,
    /// as the subscribers' `select!` needs.
    async fn fill(&mut self) -> std::io::Result<usize> {
        let Conn { stream, buf, .. } = self;
        std::future::poll_fn(|cx| stream.poll_read_buf(cx, buf)).await
    }

    /// Reads until one whole control packet is decoded, within [`CONTROL_TIMEOUT`].
    async fn control_packet(&mut self) -> anyhow::Result<Packet> {
        let read = async {
            loop {
                match v4::read(&mut self.buf, MAX_PACKET) {
                    Ok(p) => return Ok(p),
                    Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => bail!("malformed packet from broker: {e:?}"),
                }
                if self.buf.capacity() - self.buf.len() < 256 {
                    self.buf.reserve(1024);
                }
                if self.fill().await? == 0 {
                    bail!("connection closed by the broker");
                }
            }
        };
        tokio::time::timeout(CONTROL_TIMEOUT, read)
            .await
            .context("no answer from the broker")?
    }
}

/// The first byte, remaining length and header length of the frame at the front of `buf`,
/// or `None` if the header is not complete yet.
fn frame_header(buf: &[u8]) -> anyhow::Result<Option<(u8, usize, usize)>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    for (i, &b) in buf.iter().skip(1).take(4).enumerate() {
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            if len > MAX_PACKET {
                bail!("frame of {len} bytes from the broker");
            }
            return Ok(Some((first, len, i + 2)));
        }
    }
    if buf.len() >= 5 {
        bail!("malformed remaining length from the broker");
    }
    Ok(None)
}

/// One frame from the broker, as [`Conn::read_packets`] hands it out.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A PUBLISH.
    Publish {
        /// Its QoS (0, 1 or 2).
        qos: u8,
        /// Its DUP flag (a redelivery).
        dup: bool,
        /// Its packet ID (0 at QoS 0).
        pkid: u16,
        /// Its payload.
        payload: &'a [u8],
    },
    /// A PUBACK of this packet ID.
    PubAck(u16),
    /// Anything else, or a malformed PUBLISH or PUBACK.
    Other,
}

/// The frame of first byte `header` and body `body`.
fn parse_frame(header: u8, body: &[u8]) -> Frame<'_> {
    match header >> 4 {
        3 => {
            let qos = (header >> 1) & 0x3;
            let (Some(payload), Some(pkid)) =
                (publish_payload(header, body), publish_pkid(header, body))
            else {
                return Frame::Other;
            };
            Frame::Publish {
                qos,
                dup: header & 0x08 != 0,
                pkid,
                payload,
            }
        }
        4 => match body {
            [a, b] => Frame::PubAck(u16::from_be_bytes([*a, *b])),
            _ => Frame::Other,
        },
        _ => Frame::Other,
    }
}

/// The packet ID of a PUBLISH body (0 at QoS 0), `None` when the body is too short.
fn publish_pkid(header: u8, body: &[u8]) -> Option<u16> {
    if (header >> 1) & 0x3 == 0 {
        return Some(0);
    }
    let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let at = 2 + topic_len;
    Some(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]))
}

/// The payload of a PUBLISH body (topic length, topic, packet ID if QoS > 0, payload).
fn publish_payload(header: u8, body: &[u8]) -> Option<&[u8]> {
    let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let qos = (header >> 1) & 0x3;
    let start = 2 + topic_len + if qos > 0 { 2 } else { 0 };
    body.get(start..)
}

/// Appends a QoS 0 PUBLISH frame of `payload` on `topic` to `out`.
pub fn encode_publish(out: &mut BytesMut, topic: &str, payload: &[u8]) {
    put_publish(out, topic, None, payload);
}

/// Appends a QoS 1 PUBLISH frame of `payload` on `topic` with packet ID `pkid` to `out`.
pub fn encode_publish_qos1(out: &mut BytesMut, topic: &str, pkid: u16, payload: &[u8]) {
    put_publish(out, topic, Some(pkid), payload);
}

/// A PUBLISH frame: QoS 1 with `pkid` when there is one, QoS 0 without.
fn put_publish(out: &mut BytesMut, topic: &str, pkid: Option<u16>, payload: &[u8]) {
    let id_len = if pkid.is_some() { 2 } else { 0 };
    let remaining = 2 + topic.len() + id_len + payload.len();
    out.reserve(5 + remaining);
    out.put_u8(if pkid.is_some() { 0x32 } else { 0x30 });
    lorabroker::mqtt::codec::put_remaining_length(out, remaining);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    if let Some(pkid) = pkid {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
}

/// Appends a PUBACK of `pkid` to `out`.
pub fn encode_puback(out: &mut BytesMut, pkid: u16) {
    out.put_slice(&[0x40, 0x02]);
    out.put_u16(pkid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_frame_round_trips() {
        let mut out = BytesMut::new();
        let payload = vec![b'x'; 300];
        encode_publish(&mut out, "v3/a@t/devices/d/up", &payload);
        let (header, len, hl) = frame_header(&out).unwrap().unwrap();
        assert_eq!(header, 0x30);
        assert_eq!(hl + len, out.len());
        assert_eq!(publish_payload(header, &out[hl..]).unwrap(), &payload[..]);
        match v4::read(&mut out, MAX_PACKET).unwrap() {
            Packet::Publish(p) => assert_eq!(p.topic, "v3/a@t/devices/d/up"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn qos1_publish_and_puback_frames_parse() {
        let mut out = BytesMut::new();
        encode_publish_qos1(&mut out, "v3/a@t/devices/d/up", 513, b"hello");
        let (header, len, hl) = frame_header(&out).unwrap().unwrap();
        assert_eq!(
            parse_frame(header | 0x08, &out[hl..hl + len]),
            Frame::Publish {
                qos: 1,
                dup: true,
                pkid: 513,
                payload: b"hello"
            }
        );
        match v4::read(&mut out.clone(), MAX_PACKET).unwrap() {
            Packet::Publish(p) => assert_eq!((p.qos, p.pkid), (QoS::AtLeastOnce, 513)),
            other => panic!("{other:?}"),
        }
        let mut ack = BytesMut::new();
        encode_puback(&mut ack, 513);
        let (header, len, hl) = frame_header(&ack).unwrap().unwrap();
        assert_eq!(parse_frame(header, &ack[hl..hl + len]), Frame::PubAck(513));
        // Truncated bodies are not frames.
        assert_eq!(parse_frame(0x32, &[0, 5, b'a']), Frame::Other);
        assert_eq!(parse_frame(0x40, &[1]), Frame::Other);
    }
}
