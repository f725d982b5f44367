//! The wire: framing and parsing over mqttbytes' v4 codec, with the rules mqttbytes does
//! not check ([`super::validate`]) and MQTT 3.1 CONNECTs read as 3.1.1 ones, plus the one
//! encoder we write by hand, a QoS 0 PUBLISH built straight from a topic and a payload so
//! that one encoding can be shared by every subscriber of a node.
//!
//! This module knows bytes, not topics, sessions or rights.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqttbytes::v4::{self, Packet};

pub use super::validate::Malformed;
use super::validate::{self, Protocol, Version};

/// Result of trying to take one packet off the front of a read buffer.
#[derive(Debug)]
pub enum Decoded {
    /// A whole packet.
    Packet(Packet),
    /// More bytes are needed.
    Incomplete,
}

/// Why the stream cannot go on: the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The remaining length is above the configured maximum.
    #[error("packet of {size} bytes is larger than the maximum of {max}")]
    TooLarge {
        /// The announced remaining length.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The packet breaks a rule of MQTT 3.1.1.
    #[error("malformed packet: {0}")]
    Malformed(#[from] Malformed),
    /// A CONNECT for a protocol other than MQTT 3.1.1 or 3.1 (answered with CONNACK 0x01).
    #[error("unsupported {0}")]
    UnsupportedProtocol(String),
}

impl DecodeError {
    /// Short name for the `reason` label of `lorabroker_malformed_packets_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Malformed(m) => m.reason(),
            DecodeError::UnsupportedProtocol(_) => "unsupported_protocol",
        }
    }
}

/// Takes the next packet from `buf`, if it holds a whole one. Errors mean the stream is
/// unusable (malformed, larger than `max_size`, or a CONNECT of another protocol version)
/// and the connection must close; `buf` is then left in no particular state.
pub fn decode(buf: &mut BytesMut, max_size: usize) -> Result<Decoded, DecodeError> {
    use mqttbytes::Error as E;
    let frame_len = match mqttbytes::check(buf.iter(), max_size) {
        Ok(header) => header.frame_length(),
        Err(E::InsufficientBytes(_)) => return Ok(Decoded::Incomplete),
        Err(E::PayloadSizeLimitExceeded(size)) => {
            return Err(DecodeError::TooLarge {
                size,
                max: max_size,
            })
        }
        Err(e) => return Err(Malformed::from_mqttbytes(e, "packet").into()),
    };
    // `check` read a valid remaining length: one byte per 7 bits, the last below 0x80.
    let header_len = 1 + buf[1..].iter().take_while(|b| **b & 0x80 != 0).count() + 1;
    let (first, body) = (buf[0], &buf[header_len..frame_len]);
    let kind = validate::kind(first >> 4);
    let mut version = Version::V311;
    if first >> 4 == 1 {
        match validate::connect_version(body)? {
            Protocol::Supported(v) => version = v,
            Protocol::Unsupported(what) => return Err(DecodeError::UnsupportedProtocol(what)),
        }
    }
    validate::frame(first, body)?;
    let parsed = match version {
        Version::V311 => v4::read(buf, max_size),
        Version::V31 => {
            let mut frame = as_311_connect(body);
            buf.advance(frame_len);
            v4::read(&mut frame, usize::MAX)
        }
    };
    // The frame is whole, so every parse error (a short read included) is a malformation.
    let packet = parsed.map_err(|e| Malformed::from_mqttbytes(e, kind))?;
    validate::packet(&packet)?;
    Ok(Decoded::Packet(packet))
}

/// An MQTT 3.1 CONNECT (`MQIsdp`, level 3) body re-framed as the 3.1.1 CONNECT it means:
/// the two versions differ only in the protocol name and level of the variable header.
fn as_311_connect(body: &[u8]) -> BytesMut {
    // Name length (2) + "MQIsdp" (6) + level (1); `connect_version` saw them.
    let rest = &body[9..];
    let mut frame = BytesMut::with_capacity(5 + 7 + rest.len());
    frame.put_u8(0x10);
    put_remaining_length(&mut frame, 7 + rest.len());
    frame.put_slice(b"\x00\x04MQTT\x04");
    frame.put_slice(rest);
    frame
}

/// Encodes one control packet the server sends (CONNACK, SUBACK, …).
pub fn encode(packet: &Packet) -> Bytes {
    let mut buf = BytesMut::with_capacity(16);
    let written = match packet {
        Packet::ConnAck(p) => p.write(&mut buf),
        Packet::SubAck(p) => p.write(&mut buf),
        Packet::UnsubAck(p) => p.write(&mut buf),
        Packet::PubAck(p) => p.write(&mut buf),
        Packet::PubRec(p) => p.write(&mut buf),
        Packet::PubComp(p) => p.write(&mut buf),
        Packet::PingResp => v4::PingResp.write(&mut buf),
        Packet::Publish(p) => p.write(&mut buf),
        _ => Ok(0),
    };
    // Server packets are small and well-formed; a failure here is a programming error that
    // we turn into an empty write rather than a panic.
    if written.is_err() {
        buf.clear();
    }
    buf.freeze()
}

/// Appends MQTT's variable-length "remaining length" (1 to 4 bytes, 7 bits each).
pub fn put_remaining_length(buf: &mut impl BufMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

/// A QoS 0 PUBLISH of `payload` on the topic `prefix` + `rest` (with `rest`'s `sep`
/// characters written as `/`), encoded once. `None` if the packet cannot be framed.
pub fn encode_publish(prefix: &str, rest: &str, sep: u8, payload: &[u8]) -> Option<Bytes> {
    let topic_len = prefix.len() + rest.len();
    let remaining = 2 + topic_len + payload.len();
    if topic_len > u16::MAX as usize || remaining > 268_435_455 {
        return None;
    }
    let mut buf = BytesMut::with_capacity(1 + 4 + remaining);
    buf.put_u8(0x30);
    put_remaining_length(&mut buf, remaining);
    buf.put_u16(topic_len as u16);
    buf.put_slice(prefix.as_bytes());
    let at = buf.len();
    buf.put_slice(rest.as_bytes());
    for b in &mut buf[at..] {
        if *b == sep {
            *b = b'/';
        }
    }
    buf.put_slice(payload);
    Some(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqttbytes::QoS;
    use proptest::prelude::*;

    #[test]
    fn publish_round_trips_through_mqttbytes() {
        for size in [0, 1, 100, 127, 128, 16_383, 16_384, 300_000] {
            let payload = vec![7u8; size];
            let bytes = encode_publish("v3/app1@t1/", "devices.dev1.up", b'.', &payload).unwrap();
            let mut buf = BytesMut::from(&bytes[..]);
            match decode(&mut buf, 1 << 20).unwrap() {
                Decoded::Packet(Packet::Publish(p)) => {
                    assert_eq!(p.topic, "v3/app1@t1/devices/dev1/up");
                    assert_eq!(p.qos, QoS::AtMostOnce);
                    assert_eq!(p.payload.len(), size);
                }
                other => panic!("{other:?}"),
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn partial_and_oversized_input() {
        let bytes = encode_publish("a/", "b", b'.', b"hello").unwrap();
        let mut buf = BytesMut::from(&bytes[..3]);
        assert!(matches!(decode(&mut buf, 1024), Ok(Decoded::Incomplete)));
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(matches!(
            decode(&mut buf, 4),
            Err(DecodeError::TooLarge { size: 10, max: 4 })
        ));
    }

    /// A CONNECT with the given protocol name and level, client ID `c1` and a login.
    fn connect(name: &[u8], level: u8, extra: &[u8]) -> Vec<u8> {
        let mut body = vec![0, name.len() as u8];
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, 0xc2, 0, 30]);
        body.extend_from_slice(extra);
        body.extend_from_slice(b"\x00\x02c1\x00\x04app1\x00\x03key");
        let mut frame = vec![0x10];
        put_remaining_length(&mut frame, body.len());
        frame.extend_from_slice(&body);
        frame
    }

    #[test]
    fn mqtt_31_connects_read_as_311_and_others_are_unsupported() {
        let mut buf = BytesMut::from(&connect(b"MQIsdp", 3, &[])[..]);
        buf.extend_from_slice(&[0xc0, 0x00]);
        let Ok(Decoded::Packet(Packet::Connect(c))) = decode(&mut buf, 1024) else {
            panic!("an MQTT 3.1 CONNECT parses");
        };
        assert_eq!((c.client_id.as_str(), c.keep_alive), ("c1", 30));
        let login = c.login.unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("app1", "key")
        );
        // What follows it in the buffer is untouched.
        assert!(matches!(
            decode(&mut buf, 1024),
            Ok(Decoded::Packet(Packet::PingReq))
        ));
        assert!(buf.is_empty());

        // MQTT 5: properties (here a session expiry interval) after the keepalive.
        let v5 = connect(b"MQTT", 5, &[5, 0x11, 0, 0, 0, 10]);
        for bytes in [
            v5,
            connect(b"MQTT", 3, &[]),
            connect(b"MQIsdp", 4, &[]),
            connect(b"MQTT", 6, &[]),
        ] {
            let mut buf = BytesMut::from(&bytes[..]);
            assert!(
                matches!(
                    decode(&mut buf, 1024),
                    Err(DecodeError::UnsupportedProtocol(_))
                ),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn a_short_body_inside_a_whole_frame_is_malformed_not_incomplete() {
        // SUBSCRIBE whose filter length crosses the end of the packet.
        let mut buf = BytesMut::from(&[0x82, 5, 0, 1, 0, 9, b'#'][..]);
        assert_eq!(
            decode(&mut buf, 1024).unwrap_err(),
            DecodeError::Malformed(Malformed::Length("SUBSCRIBE"))
        );
        // PUBLISH QoS 1 without room for its packet ID.
        let mut buf = BytesMut::from(&[0x32, 3, 0, 1, b'a'][..]);
        assert_eq!(decode(&mut buf, 1024).unwrap_err().reason(), "length");
        let mut buf = BytesMut::from(&[0x36, 5, 0, 1, b'a', 0, 1][..]);
        assert_eq!(decode(&mut buf, 1024).unwrap_err().reason(), "qos");
    }

    proptest! {
        /// No byte sequence makes the decoder panic (the packet path is reachable from any
        /// socket).
        #[test]
        fn decoding_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&data[..]);
            for _ in 0..64 {
                match decode(&mut buf, 1024) {
                    Ok(Decoded::Packet(_)) => continue,
                    _ => break,
                }
            }
        }

        /// Same with a valid fixed header in front, so the packet bodies get parsed.
        #[test]
        fn decoding_framed_garbage_never_panics(kind in 1u8..16, flags in 0u8..16, body in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut data = vec![(kind << 4) | flags, body.len() as u8];
            data.extend_from_slice(&body);
            let mut buf = BytesMut::from(&data[..]);
            let _ = decode(&mut buf, 1024);
        }

        /// CONNECT-shaped input: a real protocol name and level, then anything.
        #[test]
        fn decoding_connect_garbage_never_panics(v31 in any::<bool>(), level in 0u8..8, tail in proptest::collection::vec(any::<u8>(), 0..120)) {
            let name: &[u8] = if v31 { b"MQIsdp" } else { b"MQTT" };
            let mut body = vec![0, name.len() as u8];
            body.extend_from_slice(name);
            body.push(level);
            body.extend_from_slice(&tail);
            let mut data = vec![0x10];
            put_remaining_length(&mut data, body.len());
            data.extend_from_slice(&body);
            let mut buf = BytesMut::from(&data[..]);
            let _ = decode(&mut buf, 1024);
        }
    }
}
