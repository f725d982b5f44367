//! Subscriptions cost what one filter costs, and are bounded (issue 9, point 1), against a
//! real node: `mqtt.max_subscriptions` and `mqtt.max_filter_length` refuse with SUBACK 0x80
//! and move `lorabroker_subscriptions_refused_total`; filters that can never match get 0x80;
//! and a SUBSCRIBE (then an UNSUBSCRIBE) of thousands of filters leaves another tenant's
//! PINGREQ round trip and uplinks on the same node as they were.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttbytes::v4::{
    self, Connect, Login, Packet, PingReq, Subscribe, SubscribeFilter, SubscribeReasonCode,
    Unsubscribe,
};
use mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::broker::{Backend, TestEnv, TestNode, WAIT};
use common::services::unique;
use lorabroker::auth::Rights;
use lorabroker::topic::{AppRef, DeviceRef, Event, Id};

const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtMostOnce);
const REFUSED: SubscribeReasonCode = SubscribeReasonCode::Failure;

/// A raw MQTT 3.1.1 connection: one SUBSCRIBE packet can carry thousands of filters, and a
/// PINGREQ round trip is timed without a client library's scheduling in between.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
    next_pkid: u16,
}

impl Raw {
    async fn connect(node: &TestNode, app: &AppRef, key: &str) -> Raw {
        let stream = TcpStream::connect(node.mqtt_addr).await.expect("MQTT port");
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
            next_pkid: 1,
        };
        let mut connect = Connect::new(unique("raw"));
        connect.keep_alive = 60;
        connect.login = Some(Login::new(node.username(app), key.to_owned()));
        let mut b = BytesMut::new();
        connect.write(&mut b).unwrap();
        raw.send(&b).await;
        match raw.read().await {
            Packet::ConnAck(ack) => assert_eq!(ack.code, v4::ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next packet, within [`WAIT`].
    async fn read(&mut self) -> Packet {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match v4::read(&mut self.buf, 1 << 24) {
                Ok(p) => return p,
                Err(mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("unreadable packet: {e:?}"),
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .expect("a packet within WAIT")
                .expect("read");
            assert!(n > 0, "connection closed");
        }
    }

    fn pkid(&mut self) -> u16 {
        let id = self.next_pkid;
        self.next_pkid = self.next_pkid % u16::MAX + 1;
        id
    }

    /// Subscribes to `filters` in one packet; the SUBACK's codes.
    async fn subscribe(&mut self, filters: &[String]) -> Vec<SubscribeReasonCode> {
        let mut s = Subscribe::new_many(
            filters
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtMostOnce)),
        );
        s.pkid = self.pkid();
        let mut b = BytesMut::new();
        s.write(&mut b).unwrap();
        self.send(&b).await;
        loop {
            match self.read().await {
                Packet::SubAck(ack) if ack.pkid == s.pkid => return ack.return_codes,
                Packet::Publish(_) => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// Unsubscribes from `filters` in one packet and waits for the UNSUBACK.
    async fn unsubscribe(&mut self, filters: &[String]) {
        let mut u = Unsubscribe::new("unused");
        u.topics = filters.to_vec();
        u.pkid = self.pkid();
        let mut b = BytesMut::new();
        u.write(&mut b).unwrap();
        self.send(&b).await;
        loop {
            match self.read().await {
                Packet::UnsubAck(ack) if ack.pkid == u.pkid => return,
                Packet::Publish(_) => continue,
                other => panic!("expected UNSUBACK, got {other:?}"),
            }
        }
    }

    /// One PINGREQ → PINGRESP round trip.
    async fn ping(&mut self) -> Duration {
        let mut b = BytesMut::new();
        PingReq.write(&mut b).unwrap();
        let start = Instant::now();
        self.send(&b).await;
        loop {
            match self.read().await {
                Packet::PingResp => return start.elapsed(),
                Packet::Publish(_) => continue,
                other => panic!("expected PINGRESP, got {other:?}"),
            }
        }
    }
}

/// The value of the `lorabroker_subscriptions_refused_total` series of `reason`.
async fn refused(node: &TestNode, reason: &str) -> u64 {
    node.metric(&format!(
        "lorabroker_subscriptions_refused_total{{reason=\"{reason}\"}}"
    ))
    .await
}

fn per_device(uid: &str, n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| format!("v3/{uid}/devices/{tag}-{i:05}/up"))
        .collect()
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Embedded).await })*
        }
        mod cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Cluster).await })*
        }
    };
}

suite!(
    limits_refuse_with_0x80_and_are_counted_by_reason,
    filters_that_can_never_match_are_refused,
);

async fn limits_refuse_with_0x80_and_are_counted_by_reason(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env
        .node_with(|c| {
            c.mqtt.max_subscriptions = 3;
            c.mqtt.max_filter_length = 160;
        })
        .await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut c = Raw::connect(&node, &app, &key).await;

    // Three filters are granted, the fourth of the same packet is over the limit.
    let filters = per_device(&uid, 4, "dev");
    assert_eq!(
        c.subscribe(&filters).await,
        [GRANTED, GRANTED, GRANTED, REFUSED]
    );
    assert_eq!(refused(&node, "max_subscriptions").await, 1);
    assert_eq!(node.metric("lorabroker_subscriptions ").await, 3);
    // Subscribing again to a filter the connection has replaces it: not counted twice.
    assert_eq!(c.subscribe(&filters[..1]).await, [GRANTED]);
    assert_eq!(node.metric("lorabroker_subscriptions ").await, 3);
    assert_eq!(c.subscribe(&filters[3..]).await, [REFUSED]);
    assert_eq!(refused(&node, "max_subscriptions").await, 2);

    // Too long: refused before anything else is looked at, even with room left.
    c.unsubscribe(&filters[2..3]).await;
    let long = format!("v3/{uid}/devices/+/{}", "x/".repeat(80) + "#");
    assert!(long.len() > 160);
    assert_eq!(c.subscribe(&[long]).await, [REFUSED]);
    assert_eq!(refused(&node, "filter_too_long").await, 1);
    // The room freed by the UNSUBSCRIBE is there.
    assert_eq!(c.subscribe(&filters[3..]).await, [GRANTED]);
    assert_eq!(node.metric("lorabroker_subscriptions ").await, 3);

    // Only granted filters deliver.
    let upstream = node.upstream();
    for d in ["dev-00002", "dev-00003"] {
        let device = DeviceRef::new(app.clone(), Id::parse(d).unwrap());
        upstream
            .publish(&device, Event::Up, "{}".into())
            .await
            .unwrap();
    }
    match c.read().await {
        Packet::Publish(p) => assert!(p.topic.ends_with("/dev-00003/up"), "{}", p.topic),
        other => panic!("expected the uplink of dev-00003, got {other:?}"),
    }

    // Another application's filter and a key without the read right.
    let other = format!("v3/app2@{}/#", env.tenant);
    assert_eq!(c.subscribe(&[other]).await, [REFUSED]);
    assert_eq!(refused(&node, "not_own_application").await, 1);
    let writer = node.key(&app, Rights::TRAFFIC_DOWN_WRITE).await;
    let mut w = Raw::connect(&node, &app, &writer).await;
    assert_eq!(w.subscribe(&["#".to_owned()]).await, [REFUSED]);
    assert_eq!(refused(&node, "no_read_right").await, 1);
    // A node's gauge counts only what is granted; leaving gives it back.
    drop(c);
    common::wait::eventually("the gauge drops to 0", WAIT, || async {
        match node.metric("lorabroker_subscriptions ").await {
            0 => Ok(()),
            n => Err(n),
        }
    })
    .await;
}

async fn filters_that_can_never_match_are_refused(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut c = Raw::connect(&node, &app, &key).await;

    let never: Vec<String> = [
        "v3/+/devices/Dev1/up",              // not a device ID
        "v3/+/devices/d/up",                 // too short for one
        "v3/+/devices/dev1/upp",             // no such event
        "v3/+/devices/dev1/down/push",       // a write topic: nothing is ever sent on it
        "v3/+/devices/dev1/up/normalized/x", // too many levels
        "v3/+/devices/+/+/+/+",              // too many levels
        "v3/+/gateways/#",                   // no such topic family
        "v3/+/devices",                      // not a traffic topic
        "v3/+",                              // the application alone
    ]
    .iter()
    .map(|f| f.replace("v3/+", &format!("v3/{uid}")))
    .chain(["v3/+/devices/dev1/location/x".to_owned()])
    .collect();
    let codes = c.subscribe(&never).await;
    assert_eq!(codes, vec![REFUSED; never.len()], "{never:?}");
    assert_eq!(refused(&node, "never_matches").await, never.len() as u64);

    // Wildcards in the right places stay valid, as The Things Stack accepts them.
    let valid: Vec<String> = [
        "#",
        "v3/#",
        "v3/+/#",
        "v3/+/devices/#",
        "v3/+/devices/+/#",
        "v3/+/devices/+/up",
        "v3/+/devices/+/down/+",
        "v3/+/devices/dev1/up/normalized",
        "v3/+/devices/dev1/+/+",
        "v3/+/+/+/join",
        "v3/+/devices/dev1/location/solved",
        "v3/+/devices/dev1/service/#",
    ]
    .iter()
    .map(|f| f.to_string())
    .chain([format!("v3/{uid}/devices/dev1/down/invalidated")])
    .collect();
    assert_eq!(c.subscribe(&valid).await, vec![GRANTED; valid.len()]);
    assert_eq!(refused(&node, "never_matches").await, never.len() as u64);
}

/// The attack of issue 9 against a node with the limits raised out of its way: two
/// connections of one tenant each SUBSCRIBE 4000 distinct per-device filters in one packet,
/// then UNSUBSCRIBE them, while a client of another tenant on the same node pings and
/// receives its uplinks. Before, this cost a minute of CPU per packet (the subscriber's
/// selection was recompiled for every filter, under the node-wide router lock); the other
/// tenant's PINGREQ waited for seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_filters_do_not_delay_another_tenant() {
    const FILTERS: usize = 4000;
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| {
            c.mqtt.max_subscriptions = 10_000;
            c.mqtt.max_packet_size = 1 << 20;
        })
        .await;
    let hostile = env.app("app1");
    let victim = AppRef::new(
        Id::parse(&unique("victim")).unwrap(),
        Id::parse("app1").unwrap(),
    );
    let hostile_key = node.key(&hostile, Rights::DEFAULT).await;
    let victim_key = node.key(&victim, Rights::DEFAULT).await;

    // The victim: one connection for pings, one receiving its uplinks.
    let mut pinger = Raw::connect(&node, &victim, &victim_key).await;
    let mut receiver = Raw::connect(&node, &victim, &victim_key).await;
    assert_eq!(receiver.subscribe(&["#".to_owned()]).await, [GRANTED]);
    let mut quiet = Duration::ZERO;
    for _ in 0..20 {
        quiet = quiet.max(pinger.ping().await);
    }

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let pings = tokio::spawn({
        let mut stop = stop.clone();
        async move {
            let mut worst = Duration::ZERO;
            let mut n = 0;
            while !*stop.borrow_and_update() {
                worst = worst.max(pinger.ping().await);
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (worst, n)
        }
    });
    let upstream = node.upstream();
    let device = DeviceRef::new(victim.clone(), Id::parse("dev1").unwrap());
    let uplinks = tokio::spawn({
        let mut stop = stop.clone();
        async move {
            let (mut worst, mut n) = (Duration::ZERO, 0u32);
            while !*stop.borrow_and_update() {
                let sent = Instant::now();
                upstream
                    .publish(&device, Event::Up, "{}".into())
                    .await
                    .unwrap();
                match receiver.read().await {
                    Packet::Publish(p) => assert!(p.topic.ends_with("/devices/dev1/up")),
                    other => panic!("expected the victim's uplink, got {other:?}"),
                }
                worst = worst.max(sent.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (worst, n, receiver)
        }
    });

    let uid = node.username(&hostile);
    let attack = |tag: &'static str| {
        let (node, hostile, key, uid) = (&node, &hostile, &hostile_key, uid.clone());
        async move {
            let mut c = Raw::connect(node, hostile, key).await;
            let filters = per_device(&uid, FILTERS, tag);
            let start = Instant::now();
            let codes = c.subscribe(&filters).await;
            let subscribed = start.elapsed();
            assert_eq!(codes, vec![GRANTED; FILTERS]);
            let start = Instant::now();
            c.unsubscribe(&filters).await;
            (subscribed, start.elapsed())
        }
    };
    let started = Instant::now();
    let (a, b) = tokio::join!(attack("a"), attack("b"));
    let attack_time = started.elapsed();
    stop_tx.send(true).unwrap();
    let (worst_ping, n_pings) = pings.await.unwrap();
    let (worst_uplink, n_uplinks, receiver) = uplinks.await.unwrap();
    eprintln!(
        "2 x {FILTERS} filters: SUBSCRIBE {:?} / {:?}, UNSUBSCRIBE {:?} / {:?} (all {attack_time:?}); \
         other tenant: PINGREQ quiet {quiet:?}, worst {worst_ping:?} over {n_pings}; \
         uplink worst {worst_uplink:?} over {n_uplinks}",
        a.0, b.0, a.1, b.1
    );
    assert!(
        worst_ping < Duration::from_millis(250),
        "another tenant's PINGREQ took {worst_ping:?} during the attack (quiet: {quiet:?})"
    );
    assert!(
        worst_uplink < Duration::from_millis(250),
        "another tenant's uplink took {worst_uplink:?} during the attack"
    );
    assert!(n_pings > 0 && n_uplinks > 0);
    // Only the victim's filter is left on the node.
    assert_eq!(node.metric("lorabroker_subscriptions ").await, 1);
    drop(receiver);
}
