//! QoS 1 delivery to one connection (issue 14): packet IDs, the bounded in-flight window
//! (`mqtt.max_inflight`) and what waits for room in it.
//!
//! The router hands every subscriber the same QoS 0 PUBLISH bytes; a connection that holds
//! a QoS 1 grant for the topic turns its copy into a QoS 1 PUBLISH with a packet ID of its
//! own ([`to_qos1`]), so the QoS 0 fast path stays what it was. A message of a persistent
//! session carries the store's sequence number, acknowledged to the store on PUBACK.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::put_remaining_length;

/// Where a stored message came from: the feed of the connection's persistent session
/// (its own, or a share's) and the message's number there, acknowledged on PUBACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tag {
    /// The feed: 0 for the session's own, another number for a share's.
    pub feed: u32,
    /// The store's number of the message in that feed.
    pub seq: u64,
}

/// One QoS 1 PUBLISH waiting for room in the window.
pub(super) struct Waiting {
    /// The QoS 0 PUBLISH to send as QoS 1.
    pub packet: Bytes,
    /// The stored message it is, for a persistent session.
    pub seq: Option<Tag>,
    /// Whether it goes out with DUP=1.
    pub dup: bool,
}

/// The QoS 1 PUBLISHes of one connection between PUBLISH and PUBACK.
pub(super) struct Inflight {
    max: usize,
    next_id: u16,
    /// Sent and not acknowledged: packet ID and the store's number, in sending order.
    sent: VecDeque<(u16, Option<Tag>)>,
    /// Waiting for room, oldest first, at most `max_waiting_bytes` of packets.
    waiting: VecDeque<Waiting>,
    waiting_bytes: usize,
    max_waiting_bytes: usize,
}

/// The waiting queue is full: the message was dropped.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Overflow;

impl Inflight {
    /// A window of `max` PUBLISHes; up to `max_waiting_bytes` more wait for room.
    pub(super) fn new(max: usize, max_waiting_bytes: usize) -> Self {
        Self {
            max: max.max(1),
            next_id: 0,
            sent: VecDeque::new(),
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            max_waiting_bytes,
        }
    }

    /// Whether another PUBLISH may be sent now.
    pub(super) fn has_room(&self) -> bool {
        self.sent.len() < self.max
    }

    /// How many are in flight.
    pub(super) fn len(&self) -> usize {
        self.sent.len()
    }

    /// Sends `w` now if there is room (returns the QoS 1 packet), else queues it behind
    /// the others; `Err` when the queue is over its bytes.
    pub(super) fn offer(&mut self, w: Waiting) -> Result<Option<Bytes>, Overflow> {
        if self.has_room() && self.waiting.is_empty() {
            return Ok(self.send(w));
        }
        if self.waiting_bytes + w.packet.len() > self.max_waiting_bytes {
            return Err(Overflow);
        }
        self.waiting_bytes += w.packet.len();
        self.waiting.push_back(w);
        Ok(None)
    }

    /// Assigns a packet ID to `w` and records it as sent; `None` for a packet that is no
    /// QoS 0 PUBLISH (never: the router makes them).
    fn send(&mut self, w: Waiting) -> Option<Bytes> {
        let id = self.free_id();
        let packet = to_qos1(&w.packet, id, w.dup)?;
        self.sent.push_back((id, w.seq));
        Some(packet)
    }

    /// A packet ID not in flight (there are at most 65535 in flight: `max` is bounded).
    fn free_id(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            let id = self.next_id;
            if !self.sent.iter().any(|(i, _)| *i == id) {
                return id;
            }
        }
    }

    /// A PUBACK for `id`: `Some(store number)` when it was in flight (the number is `None`
    /// for a message of no store), `None` for an ID not in flight (a stray, ignored).
    pub(super) fn acked(&mut self, id: u16) -> Option<Option<Tag>> {
        // Acknowledgements come in order: the front is the usual match.
        let at = self.sent.iter().position(|(i, _)| *i == id)?;
        self.sent.remove(at).map(|(_, seq)| seq)
    }

    /// The waiting PUBLISHes that fit in the window now, as QoS 1 packets.
    pub(super) fn release(&mut self, out: &mut Vec<Bytes>) {
        while self.has_room() {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            self.waiting_bytes -= w.packet.len();
            if let Some(p) = self.send(w) {
                out.push(p);
            }
        }
    }

    /// How many PUBLISHes are waiting.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// The topic of an encoded QoS 0 PUBLISH, if `packet` is one.
pub(super) fn publish_topic(packet: &[u8]) -> Option<&str> {
    if packet.first()? != &0x30 {
        return None;
    }
    let (_, header) = remaining_length(&packet[1..])?;
    let rest = packet.get(1 + header..)?;
    let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    std::str::from_utf8(rest.get(2..2 + len)?).ok()
}

/// The QoS 1 form of the QoS 0 PUBLISH `packet`, with packet ID `id` and DUP as given;
/// `None` if `packet` is no QoS 0 PUBLISH or would grow past MQTT's largest packet.
pub fn to_qos1(packet: &[u8], id: u16, dup: bool) -> Option<Bytes> {
    if packet.first()? != &0x30 {
        return None;
    }
    let (remaining, header) = remaining_length(&packet[1..])?;
    let body = packet.get(1 + header..)?;
    if body.len() != remaining || remaining + 2 > 268_435_455 {
        return None;
    }
    let topic_len = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let topic_end = 2 + topic_len;
    if topic_end > body.len() {
        return None;
    }
    let mut buf = BytesMut::with_capacity(packet.len() + 3);
    buf.put_u8(0x32 | if dup { 0x08 } else { 0 });
    put_remaining_length(&mut buf, remaining + 2);
    buf.put_slice(&body[..topic_end]);
    buf.put_u16(id);
    buf.put_slice(&body[topic_end..]);
    Some(buf.freeze())
}

/// The remaining length at the start of `bytes`, and how many bytes it took.
fn remaining_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::{decode, encode_publish, Decoded};
    use mqttbytes::v4::Packet;
    use mqttbytes::QoS;

    #[test]
    fn qos1_form_round_trips_through_mqttbytes() {
        for size in [
            0, 1, 100, 121, 122, 123, 124, 125, 126, 127, 16_380, 16_384, 300_000,
        ] {
            let payload = vec![7u8; size];
            let p = encode_publish("v3/app1@t1/", "devices.dev1.up", b'.', &payload).unwrap();
            assert_eq!(publish_topic(&p), Some("v3/app1@t1/devices/dev1/up"));
            for dup in [false, true] {
                let q = to_qos1(&p, 513, dup).unwrap();
                let mut buf = BytesMut::from(&q[..]);
                match decode(&mut buf, 1 << 20).unwrap() {
                    Decoded::Packet(Packet::Publish(p)) => {
                        assert_eq!(p.topic, "v3/app1@t1/devices/dev1/up");
                        assert_eq!(p.qos, QoS::AtLeastOnce);
                        assert_eq!(p.pkid, 513);
                        assert_eq!(p.dup, dup);
                        assert_eq!(p.payload.len(), size, "size {size}");
                    }
                    other => panic!("{other:?}"),
                }
                assert!(buf.is_empty());
            }
        }
        assert_eq!(to_qos1(b"\x32\x00", 1, false), None);
        assert_eq!(to_qos1(b"\x30\x05\x00", 1, false), None);
        assert_eq!(publish_topic(b"\x30\xff"), None);
    }

    #[test]
    fn the_window_holds_max_and_releases_in_order_on_puback() {
        let p = encode_publish("v3/a@t/", "devices.d.up", b'.', b"x").unwrap();
        let mut w = Inflight::new(2, p.len() * 2);
        let offer = |w: &mut Inflight, seq| {
            w.offer(Waiting {
                packet: p.clone(),
                seq: Some(Tag { feed: 0, seq }),
                dup: false,
            })
        };
        assert!(offer(&mut w, 1).unwrap().is_some());
        assert!(offer(&mut w, 2).unwrap().is_some());
        assert_eq!(offer(&mut w, 3), Ok(None));
        assert_eq!(offer(&mut w, 4), Ok(None));
        assert_eq!(
            offer(&mut w, 5),
            Err(Overflow),
            "waiting is bounded in bytes"
        );
        assert_eq!(w.acked(99), None, "a stray PUBACK");
        assert_eq!(w.acked(1), Some(Some(Tag { feed: 0, seq: 1 })));
        let mut out = Vec::new();
        w.release(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(w.len(), 2);
        assert_eq!(w.waiting(), 1);
        assert_eq!(w.acked(2), Some(Some(Tag { feed: 0, seq: 2 })));
        assert_eq!(w.acked(3), Some(Some(Tag { feed: 0, seq: 3 })));
        w.release(&mut out);
        assert_eq!(w.acked(4), Some(Some(Tag { feed: 0, seq: 4 })));
        assert_eq!(w.len(), 0);
    }
}
