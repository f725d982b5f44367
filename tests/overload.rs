//! Overload without silent loss (issue 13, item 2), against a real node on a real NATS:
//! past what an application's subscribers take, its messages are dropped where they are
//! lost, each counted in `/metrics` for that application (on the bus:
//! `lorabroker_bus_slow_consumer_dropped_total`; in a client's outbox:
//! `lorabroker_dropped_messages_total`), and an application whose subscriber keeps up loses
//! nothing meanwhile.
//!
//! Nothing here is timed: the flooded side is checked by accounting (published = received
//! + counted drops, once the node has settled), the other side by receiving everything.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::Mutex;

use common::broker::{Backend, Seen, TestClient, TestEnv, TestNode, WAIT};
use common::services::unique;
use common::wait::eventually;
use lorabroker::auth::Rights;
use lorabroker::bus::{Bus, NatsBus};
use lorabroker::topic::AppRef;

/// How long the accounting may take to settle once the flood is over: a stalled client
/// still has its socket buffers and outbox to read.
const SETTLE: Duration = Duration::from_secs(60);

/// An uplink payload of about the size TTS sends for a small uplink.
fn payload(seq: usize) -> Bytes {
    let mut p = format!("{seq:08}").into_bytes();
    p.resize(200, b'.');
    Bytes::from(p)
}

/// The NATS subject of an uplink of `app`'s device `dev-{n}`.
fn subject(app: &AppRef, n: usize) -> String {
    format!("{}devices.dev-{n}.up", app.subject_prefix())
}

/// What `app` lost on `node`, as /metrics counts it: (on the bus, in client outboxes).
async fn drops(node: &TestNode, app: &AppRef) -> (u64, u64) {
    let labels = format!("{{tenant=\"{}\",application=\"{}\"}}", app.tenant, app.app);
    (
        node.metric(&format!(
            "lorabroker_bus_slow_consumer_dropped_total{labels}"
        ))
        .await,
        node.metric(&format!("lorabroker_dropped_messages_total{labels}"))
            .await,
    )
}

/// Checks that the node's total of bus drops includes an application's `bus` drops.
async fn node_total_includes(node: &TestNode, bus: u64) {
    let total = node
        .metric("lorabroker_bus_dropped_total{reason=\"slow_consumer\"}")
        .await;
    assert!(
        total >= bus,
        "the node's total ({total}) includes A's {bus} bus drops"
    );
}

/// A node whose stalled clients stay connected for the whole test.
async fn node(env: &TestEnv, subscription_capacity: usize) -> TestNode {
    env.node_with(|c| {
        c.nats.subscription_capacity = subscription_capacity;
        c.mqtt.write_timeout = Duration::from_secs(600);
    })
    .await
}

/// A rumqttc client whose event loop the test polls only when it wants to read: while it
/// is not polled the node's writes to it back up (socket buffers, then its outbox).
struct Stalled {
    _client: AsyncClient,
    eventloop: EventLoop,
    received: u64,
}

impl Stalled {
    /// Connects for `app` and subscribes to all of its traffic, then stops reading.
    async fn subscribe(node: &TestNode, app: &AppRef, key: &str) -> Stalled {
        let addr = node.mqtt_addr;
        let mut opts = MqttOptions::new(unique("stalled"), addr.ip().to_string(), addr.port());
        opts.set_credentials(node.username(app), key);
        // Not polled for a while: no PINGREQ is due meanwhile.
        opts.set_keep_alive(Duration::from_secs(600));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        client
            .subscribe("#", QoS::AtMostOnce)
            .await
            .expect("subscribe request");
        loop {
            match tokio::time::timeout(WAIT, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => continue,
                other => panic!("no SUBACK: {other:?}"),
            }
        }
        Stalled {
            _client: client,
            eventloop,
            received: 0,
        }
    }

    /// Reads until nothing has come for a moment; returns the PUBLISHes received so far.
    async fn read_some(&mut self) -> u64 {
        while let Ok(polled) =
            tokio::time::timeout(Duration::from_millis(200), self.eventloop.poll()).await
        {
            match polled {
                Ok(Event::Incoming(Packet::Publish(_))) => self.received += 1,
                Ok(_) => {}
                Err(e) => panic!("the stalled client lost its connection: {e}"),
            }
        }
        self.received
    }
}

/// Reads `client`'s PUBLISHes until every one of `expected` sequence numbers has arrived;
/// panics on a duplicate or when one is missing for longer than [`WAIT`].
async fn receive_all(client: &mut TestClient, expected: usize) {
    let mut seen = HashSet::new();
    while seen.len() < expected {
        match client.next().await {
            Some(Seen::Publish { payload, .. }) => {
                let seq: usize = std::str::from_utf8(&payload[..8])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .expect("a sequence number");
                assert!(seen.insert(seq), "message {seq} delivered twice");
            }
            other => panic!(
                "the application that keeps up lost messages: {} of {expected} arrived, then {other:?}",
                seen.len()
            ),
        }
    }
}

/// Publishes `n` uplinks for `app` on the bus as fast as it takes them, then makes sure the
/// NATS server has them all.
async fn flood(bus: NatsBus, app: AppRef, n: usize) {
    for i in 0..n {
        bus.publish(subject(&app, i % 16), payload(i))
            .await
            .expect("flood publish");
    }
    bus.flush().await.expect("flood flush");
}

/// Two applications on one node: A's subscriber does not read while A's uplinks flood in;
/// B's subscriber reads normally while B's uplinks flow at a modest rate. B receives every
/// message; everything A lost is counted for A, where it was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_application_loses_alone_and_every_loss_is_counted() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = node(&env, lorabroker::bus::nats::SUBSCRIPTION_CAPACITY).await;
    let nats = &env.nats.as_ref().expect("cluster backend").url;
    let (a, b) = (env.app("flooded"), env.app("steady"));
    let key_a = node.key(&a, Rights::DEFAULT).await;
    let key_b = node.key(&b, Rights::DEFAULT).await;
    let slow = Arc::new(Mutex::new(Stalled::subscribe(&node, &a, &key_a).await));
    let mut steady = node.client(&b, &key_b).await;
    assert!(matches!(
        steady.subscribe("#").await,
        rumqttc::SubscribeReasonCode::Success(_)
    ));

    // Far more than A's socket buffers and 1 MiB outbox hold.
    const FLOODED: usize = 300_000;
    // About 0.5 MB: B loses nothing only because it keeps up, not because it could not.
    const STEADY: usize = 2_000;
    let flooder = NatsBus::connect(nats, "flood").await.unwrap();
    let flood = tokio::spawn(flood(flooder, a.clone(), FLOODED));
    let trickler = NatsBus::connect(nats, "steady").await.unwrap();
    let b2 = b.clone();
    let trickle = tokio::spawn(async move {
        for i in 0..STEADY {
            trickler
                .publish(subject(&b2, i % 16), payload(i))
                .await
                .expect("steady publish");
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        trickler.flush().await.expect("steady flush");
    });
    receive_all(&mut steady, STEADY).await;
    trickle.await.unwrap();
    flood.await.unwrap();
    assert_eq!(drops(&node, &b).await, (0, 0), "B lost nothing");

    // A: once the stalled client has read what reached it, every message is accounted for.
    let (received, bus, outbox) = eventually("A's messages accounted for", SETTLE, || {
        let (slow, node, a) = (slow.clone(), &node, &a);
        async move {
            let received = slow.lock().await.read_some().await;
            let (bus, outbox) = drops(node, a).await;
            let accounted = received + bus + outbox;
            assert!(
                accounted <= FLOODED as u64,
                "more accounted than published: {received} received + {bus} + {outbox} dropped"
            );
            if accounted == FLOODED as u64 {
                Ok((received, bus, outbox))
            } else {
                Err((received, bus, outbox))
            }
        }
    })
    .await;
    assert!(outbox > 0, "the stalled client was flooded past its outbox");
    node_total_includes(&node, bus).await;
    println!(
        "A: {FLOODED} published = {received} received + {bus} dropped on the bus + {outbox} \
         dropped in the outbox; B: {STEADY} of {STEADY} received"
    );
    node.shutdown().await;
}

/// An application's bus subscription that falls more than `nats.subscription_capacity`
/// behind drops what does not fit, and each drop is counted for that application (and in
/// the node's total); its subscribers still get the rest, and another application on the
/// node still gets everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_bus_subscription_counts_its_drops_for_its_application() {
    let env = TestEnv::new(Backend::Cluster).await;
    // A queue this short overflows as soon as the router falls a little behind.
    let node = node(&env, 16).await;
    let nats = &env.nats.as_ref().expect("cluster backend").url;
    let (a, b) = (env.app("flooded"), env.app("quiet"));
    let key_a = node.key(&a, Rights::DEFAULT).await;
    let key_b = node.key(&b, Rights::DEFAULT).await;
    // Several stalled subscribers: each message costs A's router a push per client.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        stalled.push(Stalled::subscribe(&node, &a, &key_a).await);
    }
    let slow = Arc::new(Mutex::new(stalled));
    let mut quiet = node.client(&b, &key_b).await;
    assert!(matches!(
        quiet.subscribe("#").await,
        rumqttc::SubscribeReasonCode::Success(_)
    ));

    // Flood in rounds until the bus has dropped some of A's messages (it does at once on
    // any machine where publishing is not slower than routing).
    const ROUND: usize = 50_000;
    let flooders: Vec<NatsBus> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(NatsBus::connect(nats, &format!("flood-{i}")).await.unwrap());
        }
        v
    };
    let mut published = 0u64;
    for round in 0.. {
        assert!(round < 20, "the bus never dropped: {published} published");
        let rounds: Vec<_> = flooders
            .iter()
            .map(|bus| tokio::spawn(flood(bus.clone(), a.clone(), ROUND)))
            .collect();
        for r in rounds {
            r.await.unwrap();
        }
        published += (ROUND * flooders.len()) as u64;
        if drops(&node, &a).await.0 > 0 {
            break;
        }
    }
    // B, quiet meanwhile, gets what it is sent afterwards, one message at a time (its
    // queue of 16 would overflow on a burst, as it should).
    let upstream = NatsBus::connect(nats, "quiet").await.unwrap();
    for i in 0..100 {
        upstream.publish(subject(&b, i), payload(i)).await.unwrap();
        upstream.flush().await.unwrap();
        match quiet.next().await {
            Some(Seen::Publish { payload: p, .. }) => assert_eq!(p, payload(i)),
            other => panic!("B's message {i} did not arrive: {other:?}"),
        }
    }
    assert_eq!(drops(&node, &b).await, (0, 0), "B lost nothing");

    // Each stalled subscriber's share: what it received plus what its outbox dropped plus
    // what the bus dropped before the router (for all of them at once).
    let (bus, outbox, received) = eventually("A's messages accounted for", SETTLE, || {
        let (slow, node, a) = (slow.clone(), &node, &a);
        async move {
            let mut slow = slow.lock().await;
            let mut received = 0;
            for s in slow.iter_mut() {
                received += s.read_some().await;
            }
            let (bus, outbox) = drops(node, a).await;
            // Every message reaches all 8 subscribers or (dropped on the bus) none.
            let expected = (published - bus) * slow.len() as u64;
            assert!(
                received + outbox <= expected,
                "more accounted than published: {received} received + {outbox} outbox drops, \
                 {expected} expected"
            );
            if received + outbox == expected {
                Ok((bus, outbox, received))
            } else {
                Err((bus, outbox, received, expected))
            }
        }
    })
    .await;
    assert!(bus > 0);
    node_total_includes(&node, bus).await;
    println!(
        "A: {published} published; {bus} dropped on the bus, the rest to 8 stalled clients: \
         {received} received + {outbox} dropped in their outboxes"
    );
    node.shutdown().await;
}

/// A connection that ends with messages still queued for it (here: its writes stay
/// blocked past `mqtt.write_timeout`) counts them for its application, like the ones a full
/// outbox drops: the client gets what the kernel already took, and the rest is counted.
/// The outbox is larger than the flood, so without that count nothing would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_when_a_connection_ends_are_counted() {
    let env = TestEnv::new(Backend::Cluster).await;
    // An outbox far larger than the flood, so that nothing is dropped for being over it:
    // whatever is counted was left queued when the connection ended.
    let node = env
        .node_with(|c| {
            c.mqtt.write_timeout = Duration::from_secs(1);
            c.mqtt.outbound_buffer_bytes = 256 << 20;
        })
        .await;
    let nats = &env.nats.as_ref().expect("cluster backend").url;
    let a = env.app("ended");
    let key = node.key(&a, Rights::DEFAULT).await;
    let mut slow = Stalled::subscribe(&node, &a, &key).await;

    // About 26 MB: more than loopback's socket buffers hold on both sides.
    const FLOODED: usize = 100_000;
    flood(
        NatsBus::connect(nats, "flood").await.unwrap(),
        a.clone(),
        FLOODED,
    )
    .await;

    // The node gives up on the blocked write after a second and closes; the client then
    // reads what had reached its socket, up to the end of the stream.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut received = 0u64;
    loop {
        match tokio::time::timeout(WAIT, slow.eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => received += 1,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => panic!("the node did not close the blocked connection"),
        }
    }
    let (bus, dropped) = eventually("the unwritten messages counted", WAIT, || async {
        match drops(&node, &a).await {
            (bus, dropped) if dropped > 0 => Ok((bus, dropped)),
            other => Err(other),
        }
    })
    .await;
    assert_eq!(bus, 0, "the bus kept up: only the client was slow");
    assert!(
        received + dropped <= FLOODED as u64,
        "more accounted than published: {received} received + {dropped} dropped"
    );
    // What came after the client left had no subscriber on the node, so it is neither
    // received nor dropped: the two need not add up to the flood.
    println!("{FLOODED} published: {received} received, {dropped} counted as dropped at the end");
    node.shutdown().await;
}
