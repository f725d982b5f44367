//! The wire: framing and parsing over mqttbytes' v4 codec, plus the one encoder we write by
//! hand, a QoS 0 PUBLISH built straight from a topic and a payload so that one encoding
//! can be shared by every subscriber of a node.
//!
//! This module knows bytes, not topics, sessions or rights.

use bytes::{BufMut, Bytes, BytesMut};
use mqttbytes::v4::{self, Packet};

pub use mqttbytes::Error as DecodeError;

/// Result of trying to take one packet off the front of a read buffer.
#[derive(Debug)]
pub enum Decoded {
    /// A whole packet.
    Packet(Packet),
    /// More bytes are needed.
    Incomplete,
}

/// Takes the next packet from `buf`, if it holds a whole one. Errors mean the stream is
/// unusable (malformed, or larger than `max_size`) and the connection must close.
pub fn decode(buf: &mut BytesMut, max_size: usize) -> Result<Decoded, DecodeError> {
    match v4::read(buf, max_size) {
        Ok(packet) => Ok(Decoded::Packet(packet)),
        Err(DecodeError::InsufficientBytes(_)) => Ok(Decoded::Incomplete),
        Err(e) => Err(e),
    }
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
            Err(DecodeError::PayloadSizeLimitExceeded(_))
        ));
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
    }
}
