//! The CONNECT phase (issue 8 points 1, 3, 4, 5): packets pipelined behind CONNECT, MQTT 5
//! and other levels refused with CONNACK 0x01, MQTT 3.1 served like 3.1.1, wills on
//! unwritable topics ignored.

use bytes::Bytes;
use mqttbytes::v4::{LastWill, Packet};
use mqttbytes::QoS;
use rumqttc::MqttOptions;

use crate::common::broker::{Backend, TestClient, TestEnv};
use crate::common::services::unique;
use crate::raw::*;
use lorabroker::auth::Rights;
use lorabroker::topic::Event as Traffic;

suite!(
    packets_behind_connect_are_answered_in_order_without_more_bytes,
    mqtt_31_clients_connect_subscribe_receive_and_push,
    wills_on_unwritable_topics_are_accepted_and_never_published,
);

// ---------------------------------------------------------------------------------------
// Point 3: pipelining.

async fn packets_behind_connect_are_answered_in_order_without_more_bytes(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;

    // CONNECT + SUBSCRIBE + PINGREQ in one write, then nothing: three answers, in order.
    let mut raw = Raw::open(&node).await;
    let pipelined = [
        connect("pipe1", &uid, &key, None),
        subscribe(1, "#"),
        PINGREQ.to_vec(),
    ]
    .concat();
    raw.send(&pipelined).await;
    raw.expect(&CONNACK_OK).await;
    raw.expect(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;
    raw.expect(&PINGRESP).await;
    // The subscription is live.
    node.upstream()
        .publish(&dev(&env, "app1", "dev1"), Traffic::Up, "pipelined".into())
        .await
        .unwrap();
    let Packet::Publish(up) = raw.packet().await else {
        panic!("expected the uplink");
    };
    assert_eq!(up.topic, format!("v3/{uid}/devices/dev1/up"));
    assert_eq!(&up.payload[..], b"pipelined");

    // CONNECT + a QoS 1 downlink: queued and acknowledged with no further byte sent.
    let mut raw = Raw::open(&node).await;
    let topic = format!("v3/{uid}/devices/dev2/down/push");
    let pipelined = [
        connect("pipe2", &uid, &key, None),
        publish(&topic, QoS::AtLeastOnce, 5, false, &body(1, "pipelined")),
    ]
    .concat();
    raw.send(&pipelined).await;
    raw.expect(&CONNACK_OK).await;
    raw.expect(&puback(5)).await;
    let items = queued(&node, &dev(&env, "app1", "dev2")).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert!(has_correlation_id(&items[0], "pipelined"), "{items:?}");
}

// ---------------------------------------------------------------------------------------
// Point 4: other protocol versions.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_5_and_other_levels_get_connack_1_in_311_format_then_a_close() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let login = login_fields(b"v5client", &uid, &key);

    // MQTT 5: properties (session expiry interval 60, receive maximum 10) follow the
    // keepalive, then the payload.
    let mut v5 = vec![8, 0x11, 0, 0, 0, 60, 0x21, 0, 10];
    v5.extend_from_slice(&login);
    let mut v5_no_properties = vec![0];
    v5_no_properties.extend_from_slice(&login);
    let refused = [
        connect_raw(b"MQTT", 5, 0xc2, &v5),
        connect_raw(b"MQTT", 5, 0xc2, &v5_no_properties),
        // MQTT 5 with a will: will properties come first in its payload.
        connect_raw(
            b"MQTT",
            5,
            0xc6,
            &[0, 0, 0, 2, b'c', b'1', 0, 0, 1, b't', 0, 0],
        ),
        connect_raw(b"MQTT", 3, 0xc2, &login),
        connect_raw(b"MQIsdp", 4, 0xc2, &login),
        connect_raw(b"MQTT", 6, 0xc2, &login),
        connect_raw(b"MQTT", 0, 0xc2, &login),
        connect_raw(b"mqtt", 4, 0xc2, &login),
    ];
    for packet in &refused {
        let mut raw = Raw::open(&node).await;
        raw.send(packet).await;
        raw.expect(&CONNACK_PROTOCOL).await;
        raw.expect_eof().await;
    }
    // Also when the client pipelines behind its v5 CONNECT (a v5 SUBSCRIBE here).
    let mut raw = Raw::open(&node).await;
    let pipelined = [
        connect_raw(b"MQTT", 5, 0xc2, &v5),
        frame(0x82, &[0, 1, 0, 0, 1, b'#', 0]),
    ]
    .concat();
    raw.send(&pipelined).await;
    raw.expect(&CONNACK_PROTOCOL).await;
    raw.expect_eof().await;

    // CONNECTs too short to say their protocol are closed without a CONNACK.
    for garbage in [
        frame(0x10, &[0x00]),
        frame(0x10, &[0x00, 0x04, b'M', b'Q']),
        frame(0x10, &[0x00, 0x04, b'M', b'Q', b'T', b'T']),
        frame(0x10, &[0xff, 0xff, b'M']),
    ] {
        let mut raw = Raw::open(&node).await;
        raw.send(&garbage).await;
        raw.expect_eof().await;
    }
    assert_eq!(
        metric(
            &node,
            r#"lorabroker_connects_total{outcome="refused_protocol"}"#
        )
        .await,
        refused.len() as u64 + 1
    );
    // 3.1.1 still connects.
    Raw::login(&node, &uid, &key).await.ping().await;
}

// ---------------------------------------------------------------------------------------
// Point 5: MQTT 3.1.

async fn mqtt_31_clients_connect_subscribe_receive_and_push(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;

    let mut raw = Raw::open(&node).await;
    raw.send(&connect_raw(
        b"MQIsdp",
        3,
        0xc2,
        &login_fields(b"v31", &uid, &key),
    ))
    .await;
    raw.expect(&CONNACK_OK).await;
    raw.send(&subscribe(1, "v3/+/devices/+/up")).await;
    raw.expect(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;
    raw.send(&subscribe(2, &format!("v3/app2@{}/#", env.tenant)))
        .await;
    raw.expect(&[0x90, 0x03, 0x00, 0x02, 0x80]).await;

    let doc = br#"{"uplink_message":{"f_port":15,"frm_payload":"VGVzdA=="}}"#;
    node.upstream()
        .publish(
            &dev(&env, "app1", "dev1"),
            Traffic::Up,
            Bytes::from_static(doc),
        )
        .await
        .unwrap();
    let Packet::Publish(up) = raw.packet().await else {
        panic!("expected the uplink");
    };
    assert_eq!(up.topic, format!("v3/{uid}/devices/dev1/up"));
    assert_eq!(&up.payload[..], &doc[..]);

    let topic = format!("v3/{uid}/devices/dev1/down/push");
    raw.send(&publish(
        &topic,
        QoS::AtLeastOnce,
        3,
        false,
        &body(2, "from-31"),
    ))
    .await;
    raw.expect(&puback(3)).await;
    let items = queued(&node, &dev(&env, "app1", "dev1")).await;
    assert_eq!(items.len(), 1);
    assert!(has_correlation_id(&items[0], "from-31"), "{items:?}");
    raw.ping().await;

    // Same rights as 3.1.1: a key of another application is refused with CONNACK 5, and
    // a malformed password with 4.
    let other = node.key(&env.app("app2"), Rights::DEFAULT).await;
    for (password, code) in [(other.as_str(), 5u8), ("not-a-key", 4)] {
        let mut raw = Raw::open(&node).await;
        raw.send(&connect_raw(
            b"MQIsdp",
            3,
            0xc2,
            &login_fields(b"v31b", &uid, password),
        ))
        .await;
        raw.expect(&[0x20, 0x02, 0x00, code]).await;
        raw.expect_eof().await;
    }
}

// ---------------------------------------------------------------------------------------
// Point 1: wills.

async fn wills_on_unwritable_topics_are_accepted_and_never_published(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let read_only = node.key(&app, Rights::TRAFFIC_READ).await;
    let mut watcher = node.client(&app, &key).await;
    assert_eq!(watcher.subscribe("#").await, GRANTED);
    let dev1 = dev(&env, "app1", "dev1");
    let push = format!("v3/{uid}/devices/dev1/down/push");

    let ignored = [
        // Home Assistant's default status will (retained, QoS 1).
        (
            &key,
            LastWill::new("homeassistant/status", "offline", QoS::AtLeastOnce, true),
        ),
        (
            &key,
            LastWill::new(
                format!("v3/{uid}/devices/dev1/up"),
                "{}",
                QoS::AtMostOnce,
                false,
            ),
        ),
        (
            &key,
            LastWill::new(
                format!("v3/{uid}/devices/dev1/down/pushh"),
                body(1, "w"),
                QoS::AtMostOnce,
                false,
            ),
        ),
        (
            &key,
            LastWill::new(
                format!("v3/app2@{}/devices/dev1/down/push", env.tenant),
                body(1, "w"),
                QoS::AtMostOnce,
                false,
            ),
        ),
        (
            &read_only,
            LastWill::new(push.as_str(), body(1, "w"), QoS::AtMostOnce, false),
        ),
    ];
    for (i, (k, will)) in ignored.iter().enumerate() {
        let mut raw = Raw::open(&node).await;
        raw.send(&connect(&format!("will-{i}"), &uid, k, Some(will.clone())))
            .await;
        raw.expect(&CONNACK_OK).await;
        raw.ping().await;
        // An abnormal close: the socket goes away without DISCONNECT.
        drop(raw);
    }
    // A writable will, closed the same way, is published: so the silence above is not
    // for want of publishing wills at all.
    let mut raw = Raw::open(&node).await;
    raw.send(&connect(
        "will-kept",
        &uid,
        &key,
        Some(LastWill::new(
            push.as_str(),
            body(7, "kept-will"),
            QoS::AtMostOnce,
            false,
        )),
    ))
    .await;
    raw.expect(&CONNACK_OK).await;
    drop(raw);
    let first = watcher.next_on("/down/queued").await;
    assert!(has_correlation_id(&first, "kept-will"), "{first}");
    watcher.expect_silence(SILENCE).await;
    let items = queued(&node, &dev1).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(
        metric(
            &node,
            r#"lorabroker_publishes_refused_total{reason="will_ignored"}"#
        )
        .await,
        ignored.len() as u64
    );
}

/// A rumqttc client (as Home Assistant connects: will, clean session, then a retained
/// birth message on its status topic) connects and stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_assistant_style_client_connects_and_keeps_working() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut opts = MqttOptions::new(unique("ha"), "127.0.0.1", node.mqtt_addr.port());
    opts.set_credentials(uid.clone(), key.clone());
    opts.set_clean_session(true);
    opts.set_last_will(rumqttc::LastWill::new(
        "homeassistant/status",
        "offline",
        rumqttc::QoS::AtLeastOnce,
        true,
    ));
    let mut ha = TestClient::connect_with(opts).await.expect("accepted");
    ha.client
        .publish(
            "homeassistant/status",
            rumqttc::QoS::AtLeastOnce,
            true,
            "online",
        )
        .await
        .unwrap();
    assert_eq!(ha.subscribe("v3/+/devices/+/up").await, GRANTED);
    node.upstream()
        .publish(&dev(&env, "app1", "dev1"), Traffic::Up, "{}".into())
        .await
        .unwrap();
    assert_eq!(
        ha.next_publish().await.0,
        format!("v3/{uid}/devices/dev1/up")
    );
    ha.expect_silence(SILENCE).await;
}
