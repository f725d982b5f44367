//! Hostile bytes against a live node: random streams, and valid sessions whose packets are
//! truncated, bit-flipped or spliced with noise. Nothing may panic (a panic hook counts
//! panics on every thread, including the node's tasks), and afterwards the node still
//! serves a well-behaved client. The generator is seeded, so a failure names its case.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mqttbytes::v4::{Connect, Login, PingReq, Publish, Subscribe};
use mqttbytes::QoS;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::broker::{Backend, TestEnv};
use lorabroker::auth::Rights;
use lorabroker::topic::{DeviceRef, Event, Id};

const CASES: u64 = 300;

/// A valid session's packets: CONNECT, SUBSCRIBE, a downlink PUBLISH (QoS 1), PINGREQ.
fn session(uid: &str, key: &str) -> Vec<BytesMut> {
    let mut packets = Vec::new();
    let mut connect = Connect::new(format!("fuzz-{}", rand::random::<u32>()));
    connect.keep_alive = 30;
    connect.login = Some(Login::new(uid, key));
    let mut b = BytesMut::new();
    connect.write(&mut b).unwrap();
    packets.push(b);
    let mut b = BytesMut::new();
    Subscribe::new(format!("v3/{uid}/devices/+/up"), QoS::AtMostOnce)
        .write(&mut b)
        .unwrap();
    packets.push(b);
    let mut publish = Publish::new(
        format!("v3/{uid}/devices/dev1/down/push"),
        QoS::AtLeastOnce,
        r#"{"downlinks":[{"f_port":1,"frm_payload":"AQ=="}]}"#,
    );
    publish.pkid = 7;
    let mut b = BytesMut::new();
    publish.write(&mut b).unwrap();
    packets.push(b);
    let mut b = BytesMut::new();
    PingReq.write(&mut b).unwrap();
    packets.push(b);
    packets
}

/// One hostile byte stream for case `case`.
fn hostile(rng: &mut StdRng, valid: &[BytesMut]) -> Vec<u8> {
    match rng.random_range(0..4) {
        // Pure noise, sometimes starting like a CONNECT.
        0 => {
            let mut v: Vec<u8> = (0..rng.random_range(1..600))
                .map(|_| rng.random())
                .collect();
            if rng.random_bool(0.5) {
                v[0] = 0x10;
            }
            v
        }
        // A valid session with random bytes flipped.
        1 => {
            let mut v: Vec<u8> = valid.iter().flat_map(|p| p.to_vec()).collect();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            v
        }
        // A valid prefix, then a truncated packet, then noise.
        2 => {
            let keep = rng.random_range(1..=valid.len());
            let mut v: Vec<u8> = valid[..keep - 1].iter().flat_map(|p| p.to_vec()).collect();
            let last = &valid[keep - 1];
            v.extend_from_slice(&last[..rng.random_range(0..last.len())]);
            v.extend((0..rng.random_range(0..64)).map(|_| rng.random::<u8>()));
            v
        }
        // A valid CONNECT, then packets with lying remaining lengths.
        _ => {
            let mut v = valid[0].to_vec();
            for _ in 0..rng.random_range(1..4) {
                v.push(rng.random::<u8>() & 0xf0 | 0x02);
                v.extend((0..4).map(|_| rng.random::<u8>()));
                v.extend((0..rng.random_range(0..32)).map(|_| rng.random::<u8>()));
            }
            v
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_streams_never_panic_and_the_node_keeps_serving() {
    let panics = Arc::new(AtomicUsize::new(0));
    let counted = panics.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counted.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));

    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node_with(|c| c.mqtt.max_packet_size = 1024).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let valid = session(&uid, &key);

    let mut accepted = 0;
    for case in 0..CASES {
        let mut rng = StdRng::seed_from_u64(case);
        let bytes = hostile(&mut rng, &valid);
        let mut stream = TcpStream::connect(node.mqtt_addr).await.unwrap();
        // The node may close mid-write; that is a fine answer to garbage.
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&bytes)).await;
        let _ = stream.shutdown().await;
        let mut sink = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
        assert!(
            read.is_ok(),
            "case {case}: the node neither answered nor closed within 5 s"
        );
        assert_eq!(panics.load(Ordering::SeqCst), 0, "case {case} panicked");
        if sink.starts_with(&[0x20, 0x02, 0x00, 0x00]) {
            accepted += 1;
        }
    }
    // The mutated sessions must get past authentication, or the packet paths behind it
    // were never exercised.
    assert!(
        accepted >= CASES / 10,
        "only {accepted} of {CASES} cases got a CONNACK 0"
    );
    eprintln!("{accepted} of {CASES} hostile sessions got past CONNECT");

    // A well-behaved client is served as before.
    let mut client = node.client(&app, &key).await;
    client.subscribe(&format!("v3/{uid}/devices/+/up")).await;
    let device = DeviceRef::new(app.clone(), Id::parse("dev9").unwrap());
    node.upstream()
        .publish(&device, Event::Up, "{\"ok\":true}".into())
        .await
        .unwrap();
    let (topic, payload) = client.next_publish().await;
    assert_eq!(topic, format!("v3/{uid}/devices/dev9/up"));
    assert_eq!(&payload[..], b"{\"ok\":true}");
    assert_eq!(panics.load(Ordering::SeqCst), 0);
}
