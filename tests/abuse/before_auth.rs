//! Before authentication: silent sockets against logins (`mqtt.max_pending_handshakes`,
//! apart from `mqtt.max_connections`), partial CONNECTs announcing 64 KiB
//! (`mqtt.max_connect_size`), and a full node answering CONNACK 3. Real NATS and Redis: the
//! logins go through the Redis key store.

use std::time::Duration;

use rumqttc::ConnectReturnCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::broker::{Backend, TestClient, TestEnv};
use crate::common::services::unique;
use crate::{closed_within, connect_packet, metric, Bystander};
use lorabroker::auth::Rights;

/// 300 silent sockets on a node with `max_connections = 50`: before, they held every
/// connection slot and logins got no CONNACK until the connect timeout. Now they wait in
/// at most 20 pending slots, the oldest evicted for each newcomer, and logins go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_starve_logins() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| {
            c.mqtt.max_connections = 50;
            c.mqtt.max_pending_handshakes = 20;
            c.mqtt.connect_timeout = Duration::from_secs(60);
        })
        .await;
    let bystander = Bystander::start(&node).await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;

    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(node.mqtt_addr).await.unwrap());
        assert!(
            node.app.admission.pending() <= 20,
            "the pending bound holds"
        );
    }
    // Logins while the flood keeps coming: each gets its CONNACK.
    let mut clients = Vec::new();
    for i in 0..30 {
        for _ in 0..10 {
            silent.push(TcpStream::connect(node.mqtt_addr).await.unwrap());
        }
        let client =
            TestClient::connect(node.mqtt_addr, &node.username(&app), &key, &format!("l{i}"))
                .await
                .expect("a login gets in during a silent-socket flood");
        clients.push(client);
    }
    assert!(node.app.admission.pending() <= 20);
    // The evicted sockets were closed, the newest are still waiting.
    let mut closed = 0;
    for s in silent.iter_mut().take(280) {
        closed += usize::from(closed_within(s, Duration::from_secs(2)).await);
    }
    assert_eq!(closed, 280, "the oldest silent sockets were closed");
    let evicted = metric(
        &node,
        "lorabroker_connects_total{outcome=\"handshake_evicted\"}",
    )
    .await;
    assert!(evicted >= 580, "evictions counted: {evicted}");
    assert!(metric(&node, "lorabroker_pending_handshakes").await <= 20);
    bystander.finish("silent-socket flood").await;
    drop(clients);
    node.shutdown().await;
}

/// 500 sockets each announcing a 64 KiB CONNECT and sending 1 KiB of it: before, each was
/// buffered whole for the connect timeout (68.7 KiB per socket); now each is closed as soon
/// as its fixed header is read. A real CONNECT with a 3 KiB will still fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_connects_are_closed_at_their_header() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| c.mqtt.connect_timeout = Duration::from_secs(60))
        .await;
    let bystander = Bystander::start(&node).await;
    let mut partial = vec![0x10u8];
    // Remaining length 65536, then the start of a CONNECT.
    partial.extend_from_slice(&[0x80, 0x80, 0x04]);
    partial.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 30]);
    partial.resize(1024, b'x');
    let mut sockets = Vec::new();
    for _ in 0..500 {
        let mut s = TcpStream::connect(node.mqtt_addr).await.unwrap();
        s.write_all(&partial).await.unwrap();
        sockets.push(s);
    }
    for s in &mut sockets {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "a CONNECT over mqtt.max_connect_size is closed at once"
        );
    }
    assert_eq!(
        metric(
            &node,
            "lorabroker_malformed_packets_total{reason=\"connect_too_large\"}"
        )
        .await,
        500
    );
    // The limit leaves room for a real CONNECT: a 3 KiB will fits, 5 KiB does not.
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let uid = node.username(&app);
    let will = |size: usize| {
        let mut opts = rumqttc::MqttOptions::new(unique("w"), "127.0.0.1", node.mqtt_addr.port());
        opts.set_credentials(uid.clone(), key.clone());
        opts.set_last_will(rumqttc::LastWill::new(
            format!("v3/{uid}/devices/dev1/down/push"),
            vec![b'x'; size],
            rumqttc::QoS::AtMostOnce,
            false,
        ));
        opts
    };
    let _fits = TestClient::connect_with(will(3 * 1024))
        .await
        .expect("a CONNECT with a 3 KiB will fits in mqtt.max_connect_size");
    let mut big = TcpStream::connect(node.mqtt_addr).await.unwrap();
    let mut c = mqttbytes::v4::Connect::new("big");
    c.set_login(&uid, &key);
    c.last_will = Some(mqttbytes::v4::LastWill::new(
        "t",
        vec![b'x'; 5 * 1024],
        mqttbytes::QoS::AtMostOnce,
        false,
    ));
    let mut b = bytes::BytesMut::new();
    c.write(&mut b).unwrap();
    big.write_all(&b).await.unwrap();
    assert!(closed_within(&mut big, Duration::from_secs(5)).await);
    bystander.finish("partial-CONNECT flood").await;
    node.shutdown().await;
}

/// A node at `max_connections` answers a further login with CONNACK 3 (server unavailable)
/// at once, before any key lookup, and the established clients go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_answers_server_unavailable() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node_with(|c| c.mqtt.max_connections = 2).await;
    let bystander = Bystander::start(&node).await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let _one = node.client(&app, &key).await;
    let refused =
        TestClient::connect(node.mqtt_addr, &node.username(&app), &key, &unique("c")).await;
    assert_eq!(refused.err(), Some(ConnectReturnCode::ServiceUnavailable));
    // Even a CONNECT with a wrong key: no lookup is spent on a client that cannot stay.
    let mut raw = TcpStream::connect(node.mqtt_addr).await.unwrap();
    raw.write_all(&connect_packet("x", &node.username(&app), "NNSXS.WRONG"))
        .await
        .unwrap();
    let mut ack = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut raw, &mut ack)
        .await
        .unwrap();
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x03]);
    assert_eq!(
        metric(
            &node,
            "lorabroker_connects_total{outcome=\"refused_node_full\"}"
        )
        .await,
        2
    );
    bystander.finish("full node").await;
    node.shutdown().await;
}
