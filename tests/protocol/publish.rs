//! Inbound PUBLISH (issue 8 points 2, 6, 7): QoS 2 exactly-once and its bound, forbidden
//! topics acknowledged and explained, validation errors acknowledged, and a Redis that
//! really stops: no acknowledgement, a close, then the retransmission queued.

use std::time::Duration;

use mqttbytes::v4::LastWill;
use mqttbytes::QoS;
use rumqttc::{AsyncClient, Event, MqttOptions};

use crate::common::broker::{Backend, TestEnv, WAIT};
use crate::common::http;
use crate::common::services::unique;
use crate::common::wait::eventually;
use crate::raw::*;
use lorabroker::auth::Rights;

suite!(
    qos2_duplicates_are_acknowledged_but_queued_once,
    forbidden_publishes_are_acknowledged_dropped_and_explained,
    validation_errors_are_acknowledged_with_down_failed,
);

// ---------------------------------------------------------------------------------------
// Point 6: QoS 2.

async fn qos2_duplicates_are_acknowledged_but_queued_once(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let dev1 = dev(&env, "app1", "dev1");
    let topic = format!("v3/{uid}/devices/dev1/down/push");
    let mut raw = Raw::login(&node, &uid, &key).await;

    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        10,
        false,
        &body(1, "once"),
    ))
    .await;
    raw.expect(&pubrec(10)).await;
    // Retransmissions before PUBREL, with and without DUP: acknowledged, not queued.
    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        10,
        true,
        &body(1, "once"),
    ))
    .await;
    raw.expect(&pubrec(10)).await;
    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        10,
        false,
        &body(1, "once"),
    ))
    .await;
    raw.expect(&pubrec(10)).await;
    assert_eq!(queued(&node, &dev1).await.len(), 1);
    // Another ID meanwhile is another message.
    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        11,
        false,
        &body(2, "other"),
    ))
    .await;
    raw.expect(&pubrec(11)).await;
    assert_eq!(queued(&node, &dev1).await.len(), 2);

    // PUBREL releases the ID: the same ID afterwards is a new message.
    raw.send(&pubrel(10)).await;
    raw.expect(&pubcomp(10)).await;
    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        10,
        false,
        &body(3, "again"),
    ))
    .await;
    raw.expect(&pubrec(10)).await;
    let ports: Vec<i64> = queued(&node, &dev1)
        .await
        .iter()
        .map(|i| i["f_port"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, vec![1, 2, 3]);
    // PUBREL of an ID we do not hold still gets its PUBCOMP.
    raw.send(&pubrel(99)).await;
    raw.expect(&pubcomp(99)).await;

    // The IDs are per connection: another connection's ID 11 is its own message.
    let mut other = Raw::login(&node, &uid, &key).await;
    other
        .send(&publish(
            &topic,
            QoS::ExactlyOnce,
            11,
            false,
            &body(4, "elsewhere"),
        ))
        .await;
    other.expect(&pubrec(11)).await;
    assert_eq!(queued(&node, &dev1).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_ids_held_without_pubrel_are_bounded() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node_with(|c| c.mqtt.max_inflight_qos2 = 2).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let topic = format!("v3/{uid}/devices/dev1/down/push");

    // Releasing makes room.
    let mut raw = Raw::login(&node, &uid, &key).await;
    for pkid in [1, 2] {
        raw.send(&publish(
            &topic,
            QoS::ExactlyOnce,
            pkid,
            false,
            &body(1, "a"),
        ))
        .await;
        raw.expect(&pubrec(pkid)).await;
    }
    raw.send(&pubrel(1)).await;
    raw.expect(&pubcomp(1)).await;
    raw.send(&publish(&topic, QoS::ExactlyOnce, 3, false, &body(1, "a")))
        .await;
    raw.expect(&pubrec(3)).await;
    // A duplicate of a held ID does not count against the bound.
    raw.send(&publish(&topic, QoS::ExactlyOnce, 3, true, &body(1, "a")))
        .await;
    raw.expect(&pubrec(3)).await;
    // A third held ID closes the connection, unprocessed.
    raw.send(&publish(&topic, QoS::ExactlyOnce, 4, false, &body(1, "a")))
        .await;
    raw.expect_eof().await;
    assert_eq!(queued(&node, &dev(&env, "app1", "dev1")).await.len(), 3);
    assert_eq!(
        metric(
            &node,
            r#"lorabroker_disconnects_total{outcome="qos2_inflight_exceeded"}"#
        )
        .await,
        1
    );
}

// ---------------------------------------------------------------------------------------
// Point 2: forbidden publishes.

async fn forbidden_publishes_are_acknowledged_dropped_and_explained(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let read_only = node.key(&app, Rights::TRAFFIC_READ).await;
    let mut watcher = node.client(&app, &key).await;
    assert_eq!(watcher.subscribe("#").await, GRANTED);

    let mut raw = Raw::login(&node, &uid, &key).await;
    let payload = body(1, "forbidden");
    // (topic, whether a down/failed for a device follows)
    let cases = [
        (
            format!("v3/{uid}/devices/dev1/down/pushh"),
            Some(("dev1", "topic_not_writable")),
        ),
        (
            format!("v3/{uid}/devices/dev1/up"),
            Some(("dev1", "topic_not_writable")),
        ),
        (format!("v3/{uid}/devices/Dev1/down/push"), None),
        (
            format!("v3/app2@{}/devices/dev1/down/push", env.tenant),
            None,
        ),
        ("v3/something/else".to_owned(), None),
        ("homeassistant/status".to_owned(), None),
    ];
    let mut explained = Vec::new();
    for (pkid, (topic, failed)) in (1..).zip(&cases) {
        raw.send(&publish(topic, QoS::AtLeastOnce, pkid, false, &payload))
            .await;
        raw.expect(&puback(pkid)).await;
        raw.ping().await;
        explained.extend(*failed);
    }
    // QoS 2: PUBREC, a duplicate is not explained twice, PUBREL → PUBCOMP.
    let typo = format!("v3/{uid}/devices/dev3/down/replacee");
    raw.send(&publish(&typo, QoS::ExactlyOnce, 50, false, &payload))
        .await;
    raw.expect(&pubrec(50)).await;
    raw.send(&publish(&typo, QoS::ExactlyOnce, 50, true, &payload))
        .await;
    raw.expect(&pubrec(50)).await;
    raw.send(&pubrel(50)).await;
    raw.expect(&pubcomp(50)).await;
    explained.push(("dev3", "topic_not_writable"));
    // QoS 0: nothing to acknowledge; the connection stays.
    raw.send(&publish(&typo, QoS::AtMostOnce, 0, false, &payload))
        .await;
    raw.ping().await;
    explained.push(("dev3", "topic_not_writable"));

    // A key without the down-write right, on a real downlink topic.
    let mut reader = Raw::login(&node, &uid, &read_only).await;
    let push2 = format!("v3/{uid}/devices/dev2/down/push");
    reader
        .send(&publish(&push2, QoS::AtLeastOnce, 7, false, &payload))
        .await;
    reader.expect(&puback(7)).await;
    reader.ping().await;
    explained.push(("dev2", "no_down_write_right"));

    // One down/failed per refused publish that names a device, in order, and no other.
    for (device, name) in &explained {
        let failed = watcher.next_on("/down/failed").await;
        assert_eq!(failed["end_device_ids"]["device_id"], *device, "{failed}");
        let error = &failed["downlink_failed"]["error"];
        assert_eq!(error["namespace"], "lorabroker", "{failed}");
        assert_eq!(error["name"], *name, "{failed}");
        assert!(error["code"].is_number(), "{failed}");
        assert!(error["message_format"].is_string(), "{failed}");
    }
    watcher.expect_silence(SILENCE).await;
    for d in ["dev1", "dev2", "dev3"] {
        assert!(queued(&node, &dev(&env, "app1", d)).await.is_empty(), "{d}");
    }
    for (reason, count) in [
        ("topic_not_writable", 4),
        ("invalid_device_id", 1),
        ("not_an_application_topic", 3),
        ("no_down_write_right", 1),
    ] {
        let sample = format!(r#"lorabroker_publishes_refused_total{{reason="{reason}"}}"#);
        assert_eq!(metric(&node, &sample).await, count, "{sample}");
    }
    // Both connections are still open and served.
    raw.ping().await;
    reader.ping().await;
}

// ---------------------------------------------------------------------------------------
// Point 7: acknowledged only once stored.

async fn validation_errors_are_acknowledged_with_down_failed(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node_with(|c| c.downlink.queue_capacity = 1).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut watcher = node.client(&app, &key).await;
    assert_eq!(watcher.subscribe("#").await, GRANTED);
    let topic = format!("v3/{uid}/devices/dev1/down/push");
    let mut raw = Raw::login(&node, &uid, &key).await;

    // Retrying cannot help any of these: acknowledged, with their down/failed.
    raw.send(&publish(&topic, QoS::AtLeastOnce, 1, false, b"not json"))
        .await;
    raw.expect(&puback(1)).await;
    raw.send(&publish(
        &topic,
        QoS::ExactlyOnce,
        2,
        false,
        &body(0, "port-0"),
    ))
    .await;
    raw.expect(&pubrec(2)).await;
    raw.send(&publish(
        &topic,
        QoS::AtLeastOnce,
        3,
        false,
        &body(1, "fits"),
    ))
    .await;
    raw.expect(&puback(3)).await;
    raw.send(&publish(
        &topic,
        QoS::AtLeastOnce,
        4,
        false,
        &body(2, "full"),
    ))
    .await;
    raw.expect(&puback(4)).await;
    for name in ["invalid_json", "invalid_downlink"] {
        let failed = watcher.next_on("/down/failed").await;
        assert_eq!(failed["downlink_failed"]["error"]["name"], name, "{failed}");
    }
    assert!(has_correlation_id(
        &watcher.next_on("/down/queued").await,
        "fits"
    ));
    let failed = watcher.next_on("/down/failed").await;
    assert_eq!(failed["downlink_failed"]["error"]["name"], "queue_full");
    assert!(has_correlation_id(&failed, "full"), "{failed}");
    raw.ping().await;
    assert_eq!(queued(&node, &dev(&env, "app1", "dev1")).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_downlinks_are_not_acknowledged_and_retransmissions_are_queued() {
    let mut env = TestEnv::new(Backend::Cluster).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let dev1 = dev(&env, "app1", "dev1");
    let push = format!("v3/{uid}/devices/dev1/down/push");
    let mut watcher = node.client(&app, &key).await;
    assert_eq!(watcher.subscribe("#").await, GRANTED);

    // A rumqttc client whose event loop the test drives, connected while Redis is up.
    let mut opts = MqttOptions::new(unique("retry"), "127.0.0.1", node.mqtt_addr.port());
    opts.set_credentials(uid.clone(), key.clone());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => continue,
            other => panic!("rumqttc did not connect: {other:?}"),
        }
    }
    // A raw QoS 2 client, a QoS 0 one, and one with a will on down/push, all connected
    // while Redis is up.
    let mut qos2 = Raw::login(&node, &uid, &key).await;
    let mut qos0 = Raw::login(&node, &uid, &key).await;
    let mut with_will = Raw::open(&node).await;
    with_will
        .send(&connect(
            "will-redis-down",
            &uid,
            &key,
            Some(LastWill::new(
                &push,
                body(9, "will"),
                QoS::AtMostOnce,
                false,
            )),
        ))
        .await;
    with_will.expect(&CONNACK_OK).await;

    env.redis.as_mut().expect("Redis").stop().await;

    // QoS 1: down/failed, no PUBACK, and the connection is closed.
    client
        .publish(
            &push,
            rumqttc::QoS::AtLeastOnce,
            false,
            body(1, "qos1-retry"),
        )
        .await
        .unwrap();
    let closed = loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(rumqttc::Packet::PubAck(a)))) => {
                panic!("PUBACK {} although nothing was stored", a.pkid)
            }
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => break e,
            Err(_) => panic!("the connection stayed open without a PUBACK"),
        }
    };
    eprintln!("rumqttc saw: {closed}");
    let failed = watcher.next_on("/devices/dev1/down/failed").await;
    assert_eq!(
        failed["downlink_failed"]["error"]["name"],
        "queue_unavailable"
    );
    assert!(has_correlation_id(&failed, "qos1-retry"), "{failed}");
    // rumqttc holds the unacknowledged publish for retransmission.
    let pending = std::mem::take(&mut eventloop.pending);
    let held: Vec<u16> = pending
        .iter()
        .filter_map(|r| match r {
            rumqttc::Request::Publish(p) => Some(p.pkid),
            _ => None,
        })
        .collect();
    assert_eq!(held.len(), 1, "{pending:?}");

    // QoS 2: no PUBREC, closed.
    qos2.send(&publish(
        &push,
        QoS::ExactlyOnce,
        21,
        false,
        &body(2, "qos2-retry"),
    ))
    .await;
    qos2.expect_eof().await;
    let failed = watcher.next_on("/devices/dev1/down/failed").await;
    assert!(has_correlation_id(&failed, "qos2-retry"), "{failed}");

    // QoS 0: down/failed is all there is (nothing to retransmit); the connection stays.
    qos0.send(&publish(&push, QoS::AtMostOnce, 0, false, &body(3, "qos0")))
        .await;
    let failed = watcher.next_on("/devices/dev1/down/failed").await;
    assert!(has_correlation_id(&failed, "qos0"), "{failed}");
    qos0.ping().await;

    // A will published while Redis is down is lost, with its down/failed.
    drop(with_will);
    let failed = watcher.next_on("/devices/dev1/down/failed").await;
    assert!(has_correlation_id(&failed, "will"), "{failed}");
    assert!(
        metric(
            &node,
            r#"lorabroker_disconnects_total{outcome="queue_unavailable"}"#
        )
        .await
            >= 2
    );

    env.redis.as_mut().expect("Redis").restart().await;
    eventually("node ready again", Duration::from_secs(15), || async {
        match http::get(node.http_addr, "/readyz").await {
            (200, _) => Ok(()),
            other => Err(other),
        }
    })
    .await;

    // rumqttc reconnects and retransmits what it holds. (rumqttc 0.25 drops its held
    // publishes when the CONNACK says "no session present", which every clean session of
    // ours says; libraries that keep in-flight messages across a reconnect resend them.
    // So the test hands rumqttc's own held request back to it after the CONNACK, and
    // rumqttc resends it with its packet ID.)
    loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(rumqttc::Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) | Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => panic!("rumqttc did not reconnect"),
        }
    }
    eventloop.pending = pending;
    let acked = loop {
        match tokio::time::timeout(WAIT, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(rumqttc::Packet::PubAck(a)))) => break a.pkid,
            Ok(Ok(_)) => continue,
            other => panic!("no PUBACK for the retransmission: {other:?}"),
        }
    };
    assert_eq!(acked, held[0]);
    let queued_now = watcher.next_on("/devices/dev1/down/queued").await;
    assert!(
        has_correlation_id(&queued_now, "qos1-retry"),
        "{queued_now}"
    );

    // The QoS 2 client reconnects and retransmits with DUP, as a client library does.
    let mut qos2 = Raw::login(&node, &uid, &key).await;
    qos2.send(&publish(
        &push,
        QoS::ExactlyOnce,
        21,
        true,
        &body(2, "qos2-retry"),
    ))
    .await;
    qos2.expect(&pubrec(21)).await;
    qos2.send(&pubrel(21)).await;
    qos2.expect(&pubcomp(21)).await;

    let items = queued(&node, &dev1).await;
    assert_eq!(items.len(), 2, "{items:?}");
    assert!(has_correlation_id(&items[0], "qos1-retry"), "{items:?}");
    assert!(has_correlation_id(&items[1], "qos2-retry"), "{items:?}");
    drop(client);
}
