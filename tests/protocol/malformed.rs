//! Malformed packets (issue 8 point 9): each rule closes the connection, next to a
//! well-formed twin that is answered, and is counted by reason.

use mqttbytes::QoS;

use crate::common::broker::{Backend, TestEnv, WAIT};
use crate::raw::*;
use lorabroker::auth::Rights;

// ---------------------------------------------------------------------------------------
// Point 9: malformed packets.

/// A rule, a well-formed twin packet and its answer (empty for none), the packet that
/// breaks the rule, and its `reason` label.
type MalformedCase = (&'static str, Vec<u8>, Vec<u8>, Vec<u8>, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_packet_rule_closes_the_connection() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let push = format!("v3/{uid}/devices/dev1/down/push");

    let filter = [string(b"#"), vec![0]].concat();
    let cases: Vec<MalformedCase> = vec![
        (
            "SUBSCRIBE flags must be 0010",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x80, &[[0, 1].as_slice(), &filter].concat()),
            "fixed_header_flags",
        ),
        (
            "SUBSCRIBE flags 0011",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x83, &[[0, 1].as_slice(), &filter].concat()),
            "fixed_header_flags",
        ),
        (
            "UNSUBSCRIBE flags must be 0010",
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#")].concat()),
            vec![0xb0, 2, 0, 1],
            frame(0xa0, &[[0, 1].as_slice(), &string(b"#")].concat()),
            "fixed_header_flags",
        ),
        (
            "PUBREL flags must be 0010",
            pubrel(9),
            pubcomp(9),
            frame(0x60, &[0, 9]),
            "fixed_header_flags",
        ),
        (
            "PINGREQ flags must be 0",
            PINGREQ.to_vec(),
            PINGRESP.to_vec(),
            vec![0xc1, 0x00],
            "fixed_header_flags",
        ),
        (
            "DISCONNECT flags must be 0",
            PINGREQ.to_vec(),
            PINGRESP.to_vec(),
            vec![0xe2, 0x00],
            "fixed_header_flags",
        ),
        (
            "PUBLISH QoS 3",
            publish(&push, QoS::AtLeastOnce, 4, false, &body(1, "x")),
            puback(4),
            frame(
                0x36,
                &[string(push.as_bytes()), vec![0, 4], body(1, "x")].concat(),
            ),
            "qos",
        ),
        (
            "SUBSCRIBE option reserved bits",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x82, &[[0, 1].as_slice(), &string(b"#"), &[0x04]].concat()),
            "reserved_bit",
        ),
        (
            "SUBSCRIBE requested QoS 3",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x82, &[[0, 1].as_slice(), &string(b"#"), &[0x03]].concat()),
            "qos",
        ),
        (
            "SUBSCRIBE packet ID 0",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x82, &[[0, 0].as_slice(), &filter].concat()),
            "packet_id_zero",
        ),
        (
            "UNSUBSCRIBE packet ID 0",
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#")].concat()),
            vec![0xb0, 2, 0, 1],
            frame(0xa2, &[[0, 0].as_slice(), &string(b"#")].concat()),
            "packet_id_zero",
        ),
        (
            "QoS 1 PUBLISH packet ID 0",
            publish(&push, QoS::AtLeastOnce, 4, false, &body(1, "x")),
            puback(4),
            frame(
                0x32,
                &[string(push.as_bytes()), vec![0, 0], body(1, "x")].concat(),
            ),
            "packet_id_zero",
        ),
        (
            "PUBREL packet ID 0",
            pubrel(9),
            pubcomp(9),
            frame(0x62, &[0, 0]),
            "packet_id_zero",
        ),
        (
            "UNSUBSCRIBE without filters",
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#")].concat()),
            vec![0xb0, 2, 0, 1],
            frame(0xa2, &[0, 1]),
            "no_filters",
        ),
        (
            "SUBSCRIBE without filters",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x82, &[0, 1]),
            "no_filters",
        ),
        (
            "empty SUBSCRIBE filter (MQTT-4.7.3-1: a close, not 0x80)",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(0x82, &[[0, 1].as_slice(), &string(b""), &[0]].concat()),
            "empty_filter",
        ),
        (
            "empty UNSUBSCRIBE filter",
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#")].concat()),
            vec![0xb0, 2, 0, 1],
            frame(0xa2, &[[0, 1].as_slice(), &string(b"")].concat()),
            "empty_filter",
        ),
        (
            "U+0000 in a topic filter",
            subscribe(1, "#"),
            vec![0x90, 3, 0, 1, 0],
            frame(
                0x82,
                &[[0, 1].as_slice(), &string(b"v3/\0/#"), &[0]].concat(),
            ),
            "null_character",
        ),
        (
            "U+0000 in an UNSUBSCRIBE filter",
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#")].concat()),
            vec![0xb0, 2, 0, 1],
            frame(0xa2, &[[0, 1].as_slice(), &string(b"#\0")].concat()),
            "null_character",
        ),
        (
            "U+0000 in a PUBLISH topic",
            publish(&push, QoS::AtLeastOnce, 4, false, &body(1, "x")),
            puback(4),
            publish(
                &format!("{push}\0"),
                QoS::AtLeastOnce,
                4,
                false,
                &body(1, "x"),
            ),
            "null_character",
        ),
        (
            "+ in a PUBLISH topic",
            publish(&push, QoS::AtLeastOnce, 4, false, &body(1, "x")),
            puback(4),
            publish(
                &format!("v3/{uid}/devices/+/down/push"),
                QoS::AtLeastOnce,
                4,
                false,
                &body(1, "x"),
            ),
            "wildcard_in_topic",
        ),
        (
            "# in a PUBLISH topic",
            publish(&push, QoS::AtMostOnce, 0, false, &body(1, "x")),
            Vec::new(),
            publish(&format!("v3/{uid}/#"), QoS::AtMostOnce, 0, false, b"{}"),
            "wildcard_in_topic",
        ),
        (
            "PUBACK with a body longer than its packet ID",
            PINGREQ.to_vec(),
            PINGRESP.to_vec(),
            frame(0x40, &[0, 1, 0]),
            "length",
        ),
    ];
    let mut expected_reasons = std::collections::BTreeMap::<&str, u64>::new();
    for (rule, twin, answer, malformed, reason) in &cases {
        let mut raw = Raw::login(&node, &uid, &key).await;
        raw.send(twin).await;
        if answer.is_empty() {
            raw.ping().await;
        } else {
            raw.expect(answer).await;
        }
        raw.send(malformed).await;
        // No answer, then the close; a PINGREQ behind it must not be answered either.
        raw.send(&PINGREQ).await;
        tokio::time::timeout(WAIT, raw.expect_eof())
            .await
            .unwrap_or_else(|_| panic!("{rule}: not closed"));
        *expected_reasons.entry(reason).or_default() += 1;
    }

    // At CONNECT: closed without a CONNACK.
    let login = login_fields(b"c1", &uid, &key);
    for (rule, connect, reason) in [
        (
            "CONNECT reserved flag",
            connect_raw(b"MQTT", 4, 0xc3, &login),
            "reserved_bit",
        ),
        (
            "CONNECT flags in the fixed header",
            {
                let mut c = connect_raw(b"MQTT", 4, 0xc2, &login);
                c[0] = 0x12;
                c
            },
            "fixed_header_flags",
        ),
        (
            "U+0000 in the client ID",
            connect_raw(b"MQTT", 4, 0xc2, &login_fields(b"c\x001", &uid, &key)),
            "null_character",
        ),
        (
            "U+0000 in the user name",
            connect_raw(
                b"MQTT",
                4,
                0xc2,
                &login_fields(b"c1", &format!("{uid}\0"), &key),
            ),
            "null_character",
        ),
        (
            "will QoS without a will",
            connect_raw(b"MQTT", 4, 0xca, &login),
            "will_flags",
        ),
    ] {
        let mut raw = Raw::open(&node).await;
        raw.send(&connect).await;
        tokio::time::timeout(WAIT, raw.expect_eof())
            .await
            .unwrap_or_else(|_| panic!("{rule}: not closed"));
        *expected_reasons.entry(reason).or_default() += 1;
    }

    for (reason, count) in expected_reasons {
        let sample = format!(r#"lorabroker_malformed_packets_total{{reason="{reason}"}}"#);
        assert_eq!(metric(&node, &sample).await, count, "{sample}");
    }
    // Nothing of the malformed PUBLISHes was queued (the twins were: 5 of them).
    assert_eq!(queued(&node, &dev(&env, "app1", "dev1")).await.len(), 5);
}
