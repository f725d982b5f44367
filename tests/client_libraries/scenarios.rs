//! The scenarios, from the server's side: set up the world, let the library play the
//! client, then check what the server did (queues, events, `/metrics`).

use crate::common::broker::{Backend, Seen};
use crate::common::persistent::{options, uplinks, Client};
use crate::common::services::unique;
use crate::harness::{carries, downlink, World, FLEET_DEVICE, REFUSED_PUBLISHES};
use crate::{raw, Lib};

/// (a) A will on a topic the client may not write does not refuse the CONNECT (Home
/// Assistant sets one on `homeassistant/status` by default), and is not kept: when the
/// connection is then cut, nothing is published. A will on a writable topic, played last
/// as the control, is kept: its downlink arrives, so the others had their chance.
pub async fn will_on_a_status_topic_connects_and_is_not_kept(lib: Lib, backend: Backend) {
    let world = World::new(backend, 1, false).await;
    let mut observer = world.observer().await;
    let uid = world.uid();
    let before = world.metrics(0).await.accepted_connects();

    // Home Assistant's status will.
    let mut t = world.target("hadev");
    t.will = Some(("homeassistant/status".into(), "offline".into()));
    lib.will(&t).await;

    // A will that would be a downlink, from a key that may only read.
    let mut t = world.target("willdev");
    t.key = world.read_only.clone();
    t.will = Some((
        format!("v3/{uid}/devices/willdev/down/push"),
        downlink("will-of-a-read-only-key"),
    ));
    lib.will(&t).await;

    // The control: the same will with a key that may write it is kept.
    let mut t = world.target("ctrldev");
    t.will = Some((
        format!("v3/{uid}/devices/ctrldev/down/push"),
        downlink("kept-will"),
    ));
    lib.will(&t).await;

    loop {
        match observer.next().await {
            Some(Seen::Publish { topic, .. }) if topic.ends_with("ctrldev/down/queued") => break,
            // (A down/failed explaining an ignored will would be fine.)
            Some(Seen::Publish { topic, payload }) => assert!(
                !topic.ends_with("/down/queued"),
                "a will that is not kept was queued: {topic} {}",
                String::from_utf8_lossy(&payload)
            ),
            other => panic!("the control will was not published: {other:?}"),
        }
    }
    assert_eq!(
        world.queue("willdev").await,
        Vec::<serde_json::Value>::new()
    );
    let kept = world.queue("ctrldev").await;
    assert!(
        kept.len() == 1 && carries(&kept[0], "kept-will"),
        "{kept:?}"
    );
    let metrics = world.metrics(0).await;
    assert_eq!(
        metrics.accepted_connects() - before,
        3.0,
        "each CONNECT with a will accepted once"
    );
    assert_eq!(
        metrics.sum(REFUSED_PUBLISHES, &[("reason", "will_ignored")]),
        2.0,
        "the two wills that are not kept are counted"
    );
}

/// (b) QoS 1 publishes to topics the key may not write are acknowledged (PUBACK), dropped
/// (nothing queued), counted in `/metrics` by reason, explained by a `down/failed` where
/// they name a device of the application, and the connection stays: the library neither
/// sees a disconnect nor reconnects, and its subscription keeps delivering.
pub async fn forbidden_publish_is_acked_dropped_and_the_client_stays(lib: Lib, backend: Backend) {
    let world = World::new(backend, 1, true).await;
    let uid = world.uid();
    let tenant = &world.env.tenant;
    let mut explained = world.nodes[0].client(&world.app, &world.key).await;
    explained.subscribe("v3/+/devices/fbdev/down/failed").await;
    let before = world.metrics(0).await;

    let mut t = world.target(FLEET_DEVICE);
    t.forbidden = vec![
        // A typo of down/push.
        format!("v3/{uid}/devices/fbdev/down/pushh"),
        // A capital letter in the device ID.
        format!("v3/{uid}/devices/Fbdev/down/push"),
        // A read topic.
        format!("v3/{uid}/devices/fbdev/up"),
        // Another application's device.
        format!("v3/app2@{tenant}/devices/fbdev/down/push"),
        // Home Assistant's status topic.
        "homeassistant/status".into(),
    ];
    lib.forbidden(&t).await;
    // down/push itself, with a key that may only read.
    let mut read_only = world.target(FLEET_DEVICE);
    read_only.key = world.read_only.clone();
    read_only.forbidden = vec![format!("v3/{uid}/devices/fbdev/down/push")];
    lib.forbidden(&read_only).await;
    let after = world.metrics(0).await;

    assert_eq!(world.queue("fbdev").await, Vec::<serde_json::Value>::new());
    // The command-line client publishes twice to each topic, on a connection per topic.
    let (per_topic, connections) = match lib {
        Lib::Mosquitto => (2.0, (t.forbidden.len() + 1) as f64),
        _ => (1.0, 2.0),
    };
    for (reason, topics) in [
        ("topic_not_writable", 2.0),
        ("invalid_device_id", 1.0),
        ("not_an_application_topic", 2.0),
        ("no_down_write_right", 1.0),
    ] {
        let labels = [("reason", reason)];
        assert_eq!(
            after.sum(REFUSED_PUBLISHES, &labels) - before.sum(REFUSED_PUBLISHES, &labels),
            per_topic * topics,
            "{REFUSED_PUBLISHES}{{reason={reason:?}}}"
        );
    }
    assert_eq!(
        after.accepted_connects() - before.accepted_connects(),
        connections,
        "no reconnect: CONNECTs accepted"
    );
    // The typo, the read topic and the read-only key's push name fbdev: each explained.
    for _ in 0..(3.0 * per_topic) as usize {
        let failed = explained.next_on("fbdev/down/failed").await;
        assert!(
            failed["downlink_failed"]["error"]["name"].is_string(),
            "{failed}"
        );
    }
}

/// (c) The seed's flow: an uplink from the upstream reaches a `#` subscriber; a confirmed
/// downlink pushed with the application's correlation ID comes back as `down/queued`,
/// `down/sent` and `down/ack` carrying it.
pub async fn seed_flow_uplink_downlink_events_with_correlation_id(lib: Lib, backend: Backend) {
    let world = World::new(backend, 1, true).await;
    lib.flow(&world.target(FLEET_DEVICE)).await;
    assert_eq!(world.metrics(0).await.refused_publishes(), 0.0);
}

/// (c) across a cluster: subscribed on one node, pushing through the other.
pub async fn seed_flow_across_two_nodes(lib: Lib, backend: Backend) {
    assert_eq!(backend, Backend::Cluster);
    let world = World::new(backend, 2, true).await;
    let t = world.target(FLEET_DEVICE);
    assert_ne!(t.mqtt, t.publish_via);
    lib.flow(&t).await;
}

/// (d) A client configured for MQTT 5 gets CONNACK 1 (in 3.1.1 format), which the library
/// reports as an unsupported protocol version, and the connection ends; nothing hangs.
pub async fn mqtt5_client_gets_a_clear_refusal(lib: Lib, backend: Backend) {
    let world = World::new(backend, 1, false).await;
    lib.v5(&world.target("v5dev")).await;
    let metrics = world.metrics(0).await;
    assert_eq!(metrics.accepted_connects(), 0.0);
    assert_eq!(
        metrics.sum(
            "lorabroker_connects_total",
            &[("outcome", "refused_protocol")]
        ),
        1.0
    );
}

/// (e) A QoS 2 downlink, sent with a duplicate (same packet ID, DUP) before PUBREL, is
/// queued exactly once.
pub async fn qos2_downlink_with_duplicate_is_queued_once(lib: Lib, backend: Backend) {
    qos2_downlink_is_queued_once(lib, backend).await;
}

/// (e) A QoS 2 downlink is queued exactly once.
pub async fn qos2_downlink_is_queued_once(lib: Lib, backend: Backend) {
    let world = World::new(backend, 1, false).await;
    let t = world.target("qos2dev");
    lib.qos2(&t).await;
    let queued = world.queue("qos2dev").await;
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert!(carries(&queued[0], &t.correlation_id), "{queued:?}");
}

/// (e) over a raw socket: PUBLISH and its DUP before PUBREL are one downlink; after
/// PUBCOMP the same packet ID is a new one.
pub async fn qos2_duplicate_before_pubrel_is_queued_once((): (), backend: Backend) {
    let world = World::new(backend, 1, false).await;
    let t = world.target("qos2dev");
    raw::qos2_with_duplicate(&t, "after-pubcomp").await;
    let queued = world.queue("qos2dev").await;
    assert_eq!(queued.len(), 2, "{queued:?}");
    assert!(carries(&queued[0], &t.correlation_id), "{queued:?}");
    assert!(carries(&queued[1], "after-pubcomp"), "{queued:?}");
}

/// Home Assistant's connection pattern (will + retained birth message on
/// `homeassistant/status` + clean session) connects, and the connection keeps working; the
/// will is ignored and the birth message is a refused publish, neither kept.
pub async fn home_assistant_will_birth_and_clean_session_work(lib: Lib, backend: Backend) {
    let world = World::new(backend, 1, true).await;
    let before = world.metrics(0).await;
    lib.home_assistant(&world.target(FLEET_DEVICE)).await;
    let after = world.metrics(0).await;
    assert_eq!(after.accepted_connects() - before.accepted_connects(), 1.0);
    for reason in ["will_ignored", "not_an_application_topic"] {
        let labels = [("reason", reason)];
        assert_eq!(
            after.sum(REFUSED_PUBLISHES, &labels) - before.sum(REFUSED_PUBLISHES, &labels),
            1.0,
            "{REFUSED_PUBLISHES}{{reason={reason:?}}}"
        );
    }
}

/// (g) A persistent QoS 1 session (issue 14): the library connects with `clean_session=0`
/// and a client ID, subscribes to uplinks at QoS 1 and disconnects; 200 uplinks are
/// published; it connects again (to the other node on a cluster) and receives all 200, in
/// order, its session present. Its PUBACKs count: a third connection of the session gets
/// nothing more.
pub async fn persistent_session_resumes_with_what_it_missed(lib: Lib, backend: Backend) {
    const COUNT: u32 = 200;
    let nodes = match backend {
        Backend::Embedded => 1,
        Backend::Cluster => 2,
    };
    let world = World::new_with(backend, nodes, false, |c| {
        c.sessions.enabled = true;
        c.sessions.storage = "memory".into();
    })
    .await;
    let mut t = world.target("dev1");
    let client_id = unique("paho-session");
    t.extra = vec![
        ("LB_CLIENT_ID", client_id.clone()),
        ("LB_COUNT", COUNT.to_string()),
    ];
    lib.persistent_subscribe(&t).await;
    let first = &world.nodes[0];
    first
        .metric_becomes("the session detached", "lorabroker_sessions_attached", 0)
        .await;
    uplinks(first, &world.device("dev1"), 0..COUNT).await;

    let last = &world.nodes[nodes - 1];
    t.mqtt = last.mqtt_addr;
    let out = lib.persistent_resume(&t).await;
    assert!(
        out.contains(&format!("resumed: {COUNT} uplinks in order")),
        "{out}"
    );
    last.metric_becomes(
        "the session resumed",
        r#"lorabroker_sessions_opened_total{outcome="resumed"}"#,
        1,
    )
    .await;
    last.metric_becomes("the session detached", "lorabroker_sessions_attached", 0)
        .await;

    let opts = options(
        first.mqtt_addr,
        &world.uid(),
        &world.key,
        &client_id,
        false,
        false,
    );
    let mut again = Client::connect(opts).await;
    assert!(again.present);
    again.expect_silence().await;
}
