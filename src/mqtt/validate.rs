//! The MQTT 3.1.1 rules on a packet's form that mqttbytes' v4 reader does not check, and
//! the protocol name and level of a CONNECT, read before mqttbytes parses the rest (an
//! MQTT 5 CONNECT carries properties that a v4 reader would misread as the client ID).
//!
//! [`frame`] runs over the raw bytes of one whole frame, before parsing, for what parsing
//! throws away (fixed-header flags, reserved bits, SUBSCRIBE options); [`packet`] runs over
//! the parsed packet for the rules on its fields (packet ID 0, empty or missing filters,
//! U+0000, wildcards in a topic name). A violation closes the connection (§4.8: "the
//! Server MUST close the Network Connection"). Like the codec, this module knows bytes and
//! packet fields, not topics of applications, sessions or rights.

use mqttbytes::v4::Packet;

/// Why a packet is malformed. Each has a short [`Malformed::reason`] for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The remaining length takes more than 4 bytes.
    #[error("remaining length longer than 4 bytes")]
    RemainingLength,
    /// Packet type 0 or 15.
    #[error("reserved packet type {0}")]
    PacketType(u8),
    /// Fixed-header flags other than the ones the packet type requires (MQTT-2.2.2-2).
    #[error("{kind} with fixed-header flags {flags:#06b}")]
    Flags {
        /// The packet type.
        kind: &'static str,
        /// The low four bits of the first byte.
        flags: u8,
    },
    /// QoS 3 in a PUBLISH, a will or a SUBSCRIBE option (MQTT-3.3.1-4, MQTT-3.8.3-4).
    #[error("QoS 3 in {0}")]
    Qos(&'static str),
    /// A reserved bit set: CONNECT flag bit 0 (MQTT-3.1.2-3) or the upper six bits of a
    /// SUBSCRIBE option byte (MQTT-3.8.3-4).
    #[error("reserved bit set in {0}")]
    ReservedBit(&'static str),
    /// Will QoS or retain without the will flag (MQTT-3.1.2-11, -13, -15).
    #[error("CONNECT will QoS or retain set without a will")]
    WillFlags,
    /// Packet identifier 0 where one is required (MQTT-2.3.1-1).
    #[error("{0} with packet ID 0")]
    PacketIdZero(&'static str),
    /// SUBSCRIBE or UNSUBSCRIBE without any topic filter (MQTT-3.8.3-3, MQTT-3.10.3-2).
    #[error("{0} without topic filters")]
    NoFilters(&'static str),
    /// A topic filter of zero characters (MQTT-4.7.3-1).
    #[error("empty topic filter in {0}")]
    EmptyFilter(&'static str),
    /// A PUBLISH topic name of zero characters (MQTT-4.7.3-1).
    #[error("empty topic name")]
    EmptyTopic,
    /// U+0000 in a string (MQTT-1.5.3-2).
    #[error("U+0000 in the {0}")]
    NullCharacter(&'static str),
    /// `+` or `#` in a PUBLISH topic name (MQTT-3.3.2-2).
    #[error("wildcard in a PUBLISH topic name")]
    WildcardTopic,
    /// A string that is not UTF-8 (MQTT-1.5.3-1).
    #[error("a string is not UTF-8")]
    NotUtf8,
    /// The fields do not fit the remaining length (too short, too long, or a length prefix
    /// that crosses the end of the packet).
    #[error("{0}: fields do not match the remaining length")]
    Length(&'static str),
}

impl Malformed {
    /// Short snake_case name for the `reason` label of
    /// `lorabroker_malformed_packets_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Malformed::RemainingLength => "remaining_length",
            Malformed::PacketType(_) => "packet_type",
            Malformed::Flags { .. } => "fixed_header_flags",
            Malformed::Qos(_) => "qos",
            Malformed::ReservedBit(_) => "reserved_bit",
            Malformed::WillFlags => "will_flags",
            Malformed::PacketIdZero(_) => "packet_id_zero",
            Malformed::NoFilters(_) => "no_filters",
            Malformed::EmptyFilter(_) => "empty_filter",
            Malformed::EmptyTopic => "empty_topic",
            Malformed::NullCharacter(_) => "null_character",
            Malformed::WildcardTopic => "wildcard_in_topic",
            Malformed::NotUtf8 => "not_utf8",
            Malformed::Length(_) => "length",
        }
    }

    /// The malformation an error of mqttbytes' v4 reader stands for, once the frame is
    /// known to be whole (so a short read is a length error, not a need for more bytes).
    pub(super) fn from_mqttbytes(e: mqttbytes::Error, kind: &'static str) -> Malformed {
        use mqttbytes::Error as E;
        match e {
            E::MalformedRemainingLength => Malformed::RemainingLength,
            E::InvalidPacketType(t) => Malformed::PacketType(t),
            E::InvalidQoS(_) => Malformed::Qos(kind),
            E::PacketIdZero => Malformed::PacketIdZero(kind),
            E::TopicNotUtf8 => Malformed::NotUtf8,
            E::IncorrectPacketFormat if kind == "CONNECT" => Malformed::WillFlags,
            _ => Malformed::Length(kind),
        }
    }
}

/// The protocol a CONNECT names in its variable header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// `MQTT`, level 4.
    V311,
    /// `MQIsdp`, level 3: parsed with the same rules as 3.1.1 (the variable header differs
    /// only in the protocol name).
    V31,
}

/// What [`connect_version`] found in a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// A version we speak.
    Supported(Version),
    /// Any other name or level (MQTT 5 included): answered with CONNACK 0x01
    /// (MQTT-3.1.2-2). The text names it, bounded and printable.
    Unsupported(String),
}

/// Longest protocol name quoted in an [`Protocol::Unsupported`] description.
const MAX_QUOTED_NAME: usize = 16;

/// Reads the protocol name and level at the start of a CONNECT's body. Only needs those
/// bytes, so it works for any version's CONNECT, whatever follows.
pub fn connect_version(body: &[u8]) -> Result<Protocol, Malformed> {
    let short = Malformed::Length("CONNECT");
    let len = usize::from(u16::from_be_bytes([
        *body.first().ok_or(short)?,
        *body.get(1).ok_or(short)?,
    ]));
    let name = body.get(2..2 + len).ok_or(short)?;
    let level = *body.get(2 + len).ok_or(short)?;
    Ok(match (name, level) {
        (b"MQTT", 4) => Protocol::Supported(Version::V311),
        (b"MQIsdp", 3) => Protocol::Supported(Version::V31),
        _ => {
            let quoted: String = String::from_utf8_lossy(name)
                .chars()
                .take(MAX_QUOTED_NAME)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            Protocol::Unsupported(format!("protocol {quoted:?} level {level}"))
        }
    })
}

/// The name of packet type `t` (the upper four bits of the first byte).
pub fn kind(t: u8) -> &'static str {
    match t {
        1 => "CONNECT",
        2 => "CONNACK",
        3 => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        _ => "reserved",
    }
}

/// Checks one whole frame's first byte and body (the bytes after the remaining length)
/// for the rules that parsing loses. A CONNECT's protocol must already be known to be
/// supported ([`connect_version`]).
pub fn frame(first: u8, body: &[u8]) -> Result<(), Malformed> {
    let (t, flags) = (first >> 4, first & 0x0f);
    let kind = kind(t);
    let required = match t {
        0 | 15 => return Err(Malformed::PacketType(t)),
        // PUBLISH flags are DUP, QoS and RETAIN; QoS 3 is refused by the parser.
        3 => flags,
        // MQTT-3.6.1-1, MQTT-3.8.1-1, MQTT-3.10.1-1.
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != required {
        return Err(Malformed::Flags { kind, flags });
    }
    match t {
        1 => connect_flags(body),
        // Client-to-server packets of a fixed size; anything else is a length error.
        4..=7 if body.len() != 2 => Err(Malformed::Length(kind)),
        12 | 14 if !body.is_empty() => Err(Malformed::Length(kind)),
        8 => subscribe_options(body),
        _ => Ok(()),
    }
}

/// The connect flags byte after the protocol name and level: the reserved bit and the
/// will QoS (mqttbytes checks the will flag's consistency).
fn connect_flags(body: &[u8]) -> Result<(), Malformed> {
    let short = Malformed::Length("CONNECT");
    let name_len = usize::from(u16::from_be_bytes([
        *body.first().ok_or(short)?,
        *body.get(1).ok_or(short)?,
    ]));
    let flags = *body.get(2 + name_len + 1).ok_or(short)?;
    if flags & 0x01 != 0 {
        return Err(Malformed::ReservedBit("CONNECT flags"));
    }
    if (flags >> 3) & 0b11 == 3 {
        return Err(Malformed::Qos("CONNECT will"));
    }
    Ok(())
}

/// Walks a SUBSCRIBE body (packet ID, then filter + options pairs) for the option bytes,
/// whose upper six bits mqttbytes masks away.
fn subscribe_options(body: &[u8]) -> Result<(), Malformed> {
    let short = Malformed::Length("SUBSCRIBE");
    let mut rest = body.get(2..).ok_or(short)?;
    while !rest.is_empty() {
        let len = usize::from(u16::from_be_bytes([rest[0], *rest.get(1).ok_or(short)?]));
        let options = *rest.get(2 + len).ok_or(short)?;
        if options & 0xfc != 0 {
            return Err(Malformed::ReservedBit("SUBSCRIBE options"));
        }
        if options & 0b11 == 3 {
            return Err(Malformed::Qos("SUBSCRIBE"));
        }
        rest = &rest[2 + len + 1..];
    }
    Ok(())
}

/// Checks the fields of a parsed packet.
pub fn packet(packet: &Packet) -> Result<(), Malformed> {
    match packet {
        Packet::Connect(c) => {
            no_null(&c.client_id, "client ID")?;
            if let Some(login) = &c.login {
                no_null(&login.username, "user name")?;
            }
            if let Some(will) = &c.last_will {
                no_null(&will.topic, "will topic")?;
            }
        }
        Packet::Publish(p) => {
            if p.topic.is_empty() {
                return Err(Malformed::EmptyTopic);
            }
            no_null(&p.topic, "topic name")?;
            if p.topic.contains(['+', '#']) {
                return Err(Malformed::WildcardTopic);
            }
        }
        Packet::Subscribe(s) => {
            filters(
                "SUBSCRIBE",
                s.pkid,
                s.filters.iter().map(|f| f.path.as_str()),
            )?;
        }
        Packet::Unsubscribe(u) => {
            filters("UNSUBSCRIBE", u.pkid, u.topics.iter().map(String::as_str))?;
        }
        Packet::PubAck(p) => nonzero(p.pkid, "PUBACK")?,
        Packet::PubRec(p) => nonzero(p.pkid, "PUBREC")?,
        Packet::PubRel(p) => nonzero(p.pkid, "PUBREL")?,
        Packet::PubComp(p) => nonzero(p.pkid, "PUBCOMP")?,
        _ => {}
    }
    Ok(())
}

fn filters<'a>(
    kind: &'static str,
    pkid: u16,
    filters: impl ExactSizeIterator<Item = &'a str>,
) -> Result<(), Malformed> {
    nonzero(pkid, kind)?;
    if filters.len() == 0 {
        return Err(Malformed::NoFilters(kind));
    }
    for f in filters {
        if f.is_empty() {
            return Err(Malformed::EmptyFilter(kind));
        }
        no_null(f, "topic filter")?;
    }
    Ok(())
}

fn nonzero(pkid: u16, kind: &'static str) -> Result<(), Malformed> {
    if pkid == 0 {
        return Err(Malformed::PacketIdZero(kind));
    }
    Ok(())
}

fn no_null(s: &str, what: &'static str) -> Result<(), Malformed> {
    if s.contains('\0') {
        return Err(Malformed::NullCharacter(what));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_header_flags_per_packet_type() {
        assert_eq!(frame(0x82, &[0, 1, 0, 1, b'#', 0]), Ok(()));
        assert_eq!(frame(0xa2, &[0, 1, 0, 1, b'#']), Ok(()));
        assert_eq!(frame(0x62, &[0, 1]), Ok(()));
        assert_eq!(frame(0xc0, &[]), Ok(()));
        for (first, body) in [
            (0x80u8, &[0u8, 1, 0, 1, b'#', 0][..]),
            (0x83, &[0, 1, 0, 1, b'#', 0]),
            (0xa0, &[0, 1, 0, 1, b'#']),
            (0x60, &[0, 1]),
            (0x40 | 2, &[0, 1]),
            (0xc1, &[]),
            (0xe8, &[]),
        ] {
            assert!(
                matches!(frame(first, body), Err(Malformed::Flags { .. })),
                "{first:#04x}"
            );
        }
        assert_eq!(frame(0x00, &[]), Err(Malformed::PacketType(0)));
        assert_eq!(frame(0xf0, &[]), Err(Malformed::PacketType(15)));
        // Every PUBLISH flag combination passes here; QoS 3 is the parser's.
        for flags in 0..16 {
            assert_eq!(frame(0x30 | flags, &[0, 1, b'a']), Ok(()));
        }
    }

    #[test]
    fn fixed_sizes_of_acks_ping_and_disconnect() {
        assert_eq!(frame(0x40, &[0, 1, 2]), Err(Malformed::Length("PUBACK")));
        assert_eq!(frame(0x70, &[0]), Err(Malformed::Length("PUBCOMP")));
        assert_eq!(frame(0xc0, &[0]), Err(Malformed::Length("PINGREQ")));
        assert_eq!(frame(0xe0, &[0]), Err(Malformed::Length("DISCONNECT")));
    }

    #[test]
    fn subscribe_option_bits() {
        let with = |options: u8| frame(0x82, &[0, 1, 0, 1, b'#', options]);
        assert_eq!(with(0), Ok(()));
        assert_eq!(with(2), Ok(()));
        assert_eq!(with(3), Err(Malformed::Qos("SUBSCRIBE")));
        for reserved in [0x04, 0x08, 0x80, 0xfc] {
            assert_eq!(
                with(reserved),
                Err(Malformed::ReservedBit("SUBSCRIBE options"))
            );
        }
        // The second of two filters is checked too.
        assert_eq!(
            frame(0x82, &[0, 1, 0, 1, b'a', 0, 0, 1, b'b', 0x10]),
            Err(Malformed::ReservedBit("SUBSCRIBE options"))
        );
        // A filter without its options byte.
        assert_eq!(
            frame(0x82, &[0, 1, 0, 1, b'#']),
            Err(Malformed::Length("SUBSCRIBE"))
        );
    }

    /// A CONNECT body up to and including the flags byte.
    fn connect_head(name: &[u8], level: u8, flags: u8) -> Vec<u8> {
        let mut b = vec![0, name.len() as u8];
        b.extend_from_slice(name);
        b.extend_from_slice(&[level, flags, 0, 30]);
        b
    }

    #[test]
    fn connect_names_levels_and_flags() {
        use Protocol::*;
        let v = |name: &[u8], level| connect_version(&connect_head(name, level, 2));
        assert_eq!(v(b"MQTT", 4), Ok(Supported(Version::V311)));
        assert_eq!(v(b"MQIsdp", 3), Ok(Supported(Version::V31)));
        for (name, level) in [
            (&b"MQTT"[..], 5u8),
            (b"MQTT", 3),
            (b"MQIsdp", 4),
            (b"XY", 4),
        ] {
            assert!(
                matches!(v(name, level), Ok(Unsupported(_))),
                "{name:?} {level}"
            );
        }
        // Short bodies are length errors, never a panic.
        for n in 0..7 {
            let head = connect_head(b"MQTT", 5, 2);
            assert_eq!(
                connect_version(&head[..n]),
                Err(Malformed::Length("CONNECT"))
            );
        }
        // The description is bounded and printable.
        let long = vec![b'\n'; 300];
        let Ok(Unsupported(text)) = connect_version(&connect_head(&long[..255], 4, 0)) else {
            panic!("a long name is unsupported");
        };
        assert!(text.len() < 64 && !text.contains('\n'), "{text}");

        assert_eq!(frame(0x10, &connect_head(b"MQTT", 4, 0xc2)), Ok(()));
        assert_eq!(
            frame(0x10, &connect_head(b"MQTT", 4, 0x03)),
            Err(Malformed::ReservedBit("CONNECT flags"))
        );
        assert_eq!(
            frame(0x10, &connect_head(b"MQTT", 4, 0x1e)),
            Err(Malformed::Qos("CONNECT will"))
        );
        assert_eq!(
            frame(0x11, &connect_head(b"MQTT", 4, 2)),
            Err(Malformed::Flags {
                kind: "CONNECT",
                flags: 1
            })
        );
    }

    #[test]
    fn packet_fields() {
        use mqttbytes::v4::{Connect, Publish, Subscribe, Unsubscribe};
        use mqttbytes::QoS;
        let publish =
            |topic: &str| packet(&Packet::Publish(Publish::new(topic, QoS::AtMostOnce, "")));
        assert_eq!(publish("v3/a/devices/d/down/push"), Ok(()));
        assert_eq!(publish(""), Err(Malformed::EmptyTopic));
        assert_eq!(publish("a/+/b"), Err(Malformed::WildcardTopic));
        assert_eq!(publish("a/#"), Err(Malformed::WildcardTopic));
        assert_eq!(publish("a\0b"), Err(Malformed::NullCharacter("topic name")));

        let subscribe = |pkid, filters: &[&str]| {
            let mut s = Subscribe::empty_subscribe();
            s.pkid = pkid;
            for f in filters {
                s.add((*f).to_owned(), QoS::AtMostOnce);
            }
            packet(&Packet::Subscribe(s))
        };
        assert_eq!(subscribe(1, &["#"]), Ok(()));
        assert_eq!(
            subscribe(0, &["#"]),
            Err(Malformed::PacketIdZero("SUBSCRIBE"))
        );
        assert_eq!(subscribe(1, &[]), Err(Malformed::NoFilters("SUBSCRIBE")));
        assert_eq!(
            subscribe(1, &["#", ""]),
            Err(Malformed::EmptyFilter("SUBSCRIBE"))
        );
        assert_eq!(
            subscribe(1, &["a\0"]),
            Err(Malformed::NullCharacter("topic filter"))
        );

        let unsubscribe = |pkid, topics: &[&str]| {
            packet(&Packet::Unsubscribe(Unsubscribe {
                pkid,
                topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            }))
        };
        assert_eq!(unsubscribe(1, &["#"]), Ok(()));
        assert_eq!(
            unsubscribe(0, &["#"]),
            Err(Malformed::PacketIdZero("UNSUBSCRIBE"))
        );
        assert_eq!(
            unsubscribe(1, &[]),
            Err(Malformed::NoFilters("UNSUBSCRIBE"))
        );
        assert_eq!(
            unsubscribe(1, &[""]),
            Err(Malformed::EmptyFilter("UNSUBSCRIBE"))
        );

        let mut connect = Connect::new("a\0b");
        assert_eq!(
            packet(&Packet::Connect(connect.clone())),
            Err(Malformed::NullCharacter("client ID"))
        );
        connect.client_id = "ok".into();
        connect.set_login("app\0", "key");
        assert_eq!(
            packet(&Packet::Connect(connect)),
            Err(Malformed::NullCharacter("user name"))
        );
        assert_eq!(
            packet(&Packet::PubRel(mqttbytes::v4::PubRel::new(0))),
            Err(Malformed::PacketIdZero("PUBREL"))
        );
    }
}
