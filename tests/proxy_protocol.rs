//! PROXY protocol on the MQTT listener (issue 10 point 3): raw sockets send v1 and v2
//! headers before a real CONNECT; the announced address is the one per-IP limits, the
//! failed-login ban and the logs see; bad headers are closed and counted; with the option
//! off a header is garbage; and the MQTT behaviours run unchanged behind a forwarder that
//! plays the load balancer.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqttbytes::v4::Connect;
use rumqttc::{ConnectReturnCode, QoS, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::broker::{Backend, TestClient, TestEnv, TestNode};
use common::proxy::{v1, v2, v2_local, ProxyForwarder};
use common::services::unique;
use lorabroker::auth::Rights;
use lorabroker::limits::Rate;
use lorabroker::topic::{DeviceRef, Event, Id};

const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtMostOnce);

/// Everything the test binary logged (lorabroker at DEBUG).
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    common::log_capture::captured("lorabroker=debug")
}

/// The captured log lines containing all of `needles`.
fn log_lines(needles: &[&str]) -> Vec<String> {
    let log = captured().lock().unwrap();
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The value of one sample of `/metrics` (0 when absent).
async fn metric(node: &TestNode, sample: &str) -> u64 {
    let (_, body) = common::http::get(node.http_addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits until `sample` is `want`.
async fn metric_reaches(node: &TestNode, sample: &str, want: u64) {
    common::wait::eventually(sample, Duration::from_secs(5), || async {
        match metric(node, sample).await {
            v if v == want => Ok(()),
            v => Err(v),
        }
    })
    .await;
}

const PROXY_FAILURES: &str =
    r#"lorabroker_transport_failures_total{listener="tcp",reason="proxy_protocol"}"#;
const TIMEOUTS: &str =
    r#"lorabroker_transport_failures_total{listener="tcp",reason="handshake_timeout"}"#;

/// A CONNECT packet with a login.
fn connect_packet(username: &str, password: &str) -> Vec<u8> {
    let mut c = Connect::new(unique("p"));
    c.keep_alive = 30;
    c.set_login(username, password);
    let mut b = BytesMut::new();
    c.write(&mut b).unwrap();
    b.to_vec()
}

/// A node whose plain listener requires a PROXY header, after `tweak`.
async fn proxied_node(
    env: &TestEnv,
    tweak: impl FnOnce(&mut lorabroker::config::Config),
) -> TestNode {
    captured();
    env.node_with(|c| {
        c.mqtt.proxy_protocol = true;
        tweak(c);
    })
    .await
}

/// Sends each of `chunks` in its own write (20 ms apart); the CONNACK code the node
/// answers, or `None` when it closes without one.
async fn send(node: &TestNode, chunks: &[&[u8]]) -> Option<u8> {
    let mut s = TcpStream::connect(node.mqtt_addr).await.unwrap();
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if s.write_all(chunk).await.is_err() {
            return None;
        }
    }
    connack(&mut s).await
}

/// The CONNACK code read from `s`, or `None` when it closes first (within 5 s).
async fn connack(s: &mut TcpStream) -> Option<u8> {
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf[got..])).await {
            Err(_) => panic!("neither a CONNACK nor a close within 5 s"),
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => got += n,
        }
    }
    assert_eq!(buf[..2], [0x20, 0x02], "a CONNACK");
    Some(buf[3])
}

#[tokio::test]
async fn accepts_per_ip_counts_the_announced_address() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = proxied_node(&env, |c| c.limits.accepts_per_ip = Rate::new(2.0 / 60.0, 2)).await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let login = connect_packet(&node.username(&app), &key);

    // 10.0.0.1 twice (v1 and v2), then it is over its 2 per minute.
    for header in [v1(addr("10.0.0.1:40001")), v2(addr("10.0.0.1:40002"))] {
        assert_eq!(send(&node, &[&header, &login]).await, Some(0));
    }
    assert_eq!(
        send(&node, &[&v1(addr("10.0.0.1:40003")), &login]).await,
        None
    );
    // Every socket came from 127.0.0.1: 10.0.0.2 and IPv6 clients still get in.
    assert_eq!(
        send(&node, &[&v2(addr("10.0.0.2:40004")), &login]).await,
        Some(0)
    );
    assert_eq!(
        send(&node, &[&v1(addr("[2001:db8::5]:40005")), &login]).await,
        Some(0)
    );
    assert_eq!(
        metric(
            &node,
            r#"lorabroker_connects_total{outcome="refused_accepts_per_ip"}"#
        )
        .await,
        1
    );
    // The refusal's log line carries the announced address.
    let lines = log_lines(&["peer=10.0.0.1:40003", "over limits.accepts_per_ip"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    node.shutdown().await;
}

#[tokio::test]
async fn failed_login_ban_and_refusal_logs_use_the_announced_address() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = proxied_node(&env, |c| {
        c.limits.failed_connects_per_ip = Rate::new(1.0 / 60.0, 2);
        c.limits.failed_connect_cooldown = Duration::from_secs(60);
    })
    .await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let bad = connect_packet(&uid, &lorabroker::auth::generate().key);
    for port in 1..=3 {
        let h = v2(SocketAddr::from(([10, 0, 0, 3], port)));
        assert_eq!(send(&node, &[&h, &bad]).await, Some(5));
    }
    // 10.0.0.3 is banned now, even with a good key; 10.0.0.4 is not.
    let good = connect_packet(&uid, &key);
    assert_eq!(
        send(&node, &[&v2(addr("10.0.0.3:9")), &good]).await,
        Some(5)
    );
    assert_eq!(
        send(&node, &[&v2(addr("10.0.0.4:9")), &good]).await,
        Some(0)
    );
    let lines = log_lines(&["peer=10.0.0.3:", "connection refused"]);
    assert!(
        !lines.is_empty(),
        "no refusal logged for the announced address"
    );
    let lines = log_lines(&["peer=10.0.0.3:", "too many failed logins from this address"]);
    assert!(!lines.is_empty(), "no ban logged for the announced address");
    node.shutdown().await;
}

#[tokio::test]
async fn bad_headers_are_closed_and_counted() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = proxied_node(&env, |_| {}).await;
    let app = env.app("app1");
    let login = connect_packet(&node.username(&app), &node.key(&app, Rights::DEFAULT).await);

    // No header: the CONNECT itself.
    assert_eq!(send(&node, &[&login]).await, None);
    // Garbage.
    assert_eq!(send(&node, &[b"GET / HTTP/1.1\r\n\r\n"]).await, None);
    // A v1 header that is not one.
    assert_eq!(
        send(&node, &[b"PROXY TCP4 banana 10.0.0.9 1 2\r\n", &login]).await,
        None
    );
    // Truncated: half a header, then the end of the stream.
    let mut s = TcpStream::connect(node.mqtt_addr).await.unwrap();
    s.write_all(&v2(addr("10.0.0.5:1"))[..20]).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(connack(&mut s).await, None);
    // A v2 header announcing 4 KB of TLVs.
    let mut big = v2(addr("10.0.0.5:2"));
    big[14..16].copy_from_slice(&4096u16.to_be_bytes());
    assert_eq!(send(&node, &[&big, &login]).await, None);
    // A v1 line without its end.
    assert_eq!(
        send(
            &node,
            &[format!("PROXY TCP4 {}", "9".repeat(200)).as_bytes()]
        )
        .await,
        None
    );

    metric_reaches(&node, PROXY_FAILURES, 6).await;
    assert_eq!(
        metric(
            &node,
            r#"lorabroker_connects_total{outcome="transport_failed"}"#
        )
        .await,
        6
    );
    // Still serving.
    assert_eq!(
        send(&node, &[&v1(addr("10.0.0.6:1")), &login]).await,
        Some(0)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn local_header_keeps_the_socket_address() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = proxied_node(&env, |_| {}).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    // A refused login names its peer in the log: the socket's own address here.
    let bad = connect_packet(&uid, &lorabroker::auth::generate().key);
    let mut s = TcpStream::connect(node.mqtt_addr).await.unwrap();
    let local = s.local_addr().unwrap();
    s.write_all(&v2_local()).await.unwrap();
    s.write_all(&bad).await.unwrap();
    assert_eq!(connack(&mut s).await, Some(5));
    let peer = format!("peer={local}");
    assert!(
        !log_lines(&[&peer, "connection refused"]).is_empty(),
        "no log with {peer}"
    );
    // v1 UNKNOWN too, and MQTT works after either.
    let login = connect_packet(&uid, &node.key(&app, Rights::DEFAULT).await);
    assert_eq!(send(&node, &[&v2_local(), &login]).await, Some(0));
    assert_eq!(send(&node, &[b"PROXY UNKNOWN\r\n", &login]).await, Some(0));
    assert_eq!(metric(&node, PROXY_FAILURES).await, 0);
    node.shutdown().await;
}

#[tokio::test]
async fn without_the_option_a_header_is_garbage() {
    let env = TestEnv::new(Backend::Embedded).await;
    captured();
    let node = env.node().await;
    let app = env.app("app1");
    let login = connect_packet(&node.username(&app), &node.key(&app, Rights::DEFAULT).await);
    for header in [v1(addr("10.0.0.7:1")), v2(addr("10.0.0.7:2"))] {
        let started = Instant::now();
        assert_eq!(send(&node, &[&header, &login]).await, None);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "closed only after {:?}",
            started.elapsed()
        );
    }
    assert_eq!(send(&node, &[&login]).await, Some(0));
    node.shutdown().await;
}

#[tokio::test]
async fn a_header_split_over_writes_loses_no_byte() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = proxied_node(&env, |_| {}).await;
    let app = env.app("app1");
    let login = connect_packet(&node.username(&app), &node.key(&app, Rights::DEFAULT).await);
    // The last write ends the header and starts the CONNECT.
    let h = v2(addr("10.0.0.8:1"));
    let mut tail = h[14..].to_vec();
    tail.extend_from_slice(&login[..3]);
    assert_eq!(
        send(&node, &[&h[..5], &h[5..14], &tail, &login[3..]]).await,
        Some(0)
    );
    let h = v1(addr("10.0.0.8:2"));
    let mut tail = h[20..].to_vec();
    tail.extend_from_slice(&login[..1]);
    assert_eq!(
        send(&node, &[&h[..3], &h[3..20], &tail, &login[1..]]).await,
        Some(0)
    );
    // Header and CONNECT in one write.
    assert_eq!(
        send(&node, &[&[v1(addr("10.0.0.8:3")), login.clone()].concat()]).await,
        Some(0)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_silent_socket_is_closed_after_the_handshake_timeout() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = proxied_node(&env, |c| {
        c.mqtt.handshake_timeout = Duration::from_millis(300)
    })
    .await;
    // One says nothing, one stops in the middle of its header.
    let mut silent = TcpStream::connect(node.mqtt_addr).await.unwrap();
    let mut stalled = TcpStream::connect(node.mqtt_addr).await.unwrap();
    stalled.write_all(b"PROXY TCP4 10.0.").await.unwrap();
    let started = Instant::now();
    assert_eq!(connack(&mut silent).await, None);
    assert_eq!(connack(&mut stalled).await, None);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    metric_reaches(&node, TIMEOUTS, 2).await;
    assert_eq!(metric(&node, PROXY_FAILURES).await, 0);
    node.shutdown().await;
}

/// The MQTT behaviours of tests/mqtt_surface.rs, through a load balancer that sends
/// `header`: CONNACK codes, subscribe and receive an uplink, down/push → down/queued,
/// a malformed packet closes the connection.
async fn mqtt_behaviours(header: Vec<u8>) {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = proxied_node(&env, |_| {}).await;
    let lb = ProxyForwarder::start(node.mqtt_addr, header).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;

    let malformed =
        TestClient::connect(lb.addr, &uid, "NNSXS.VEEBURF3KR77ZR..", &unique("c")).await;
    assert_eq!(
        malformed.err(),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    let unknown = lorabroker::auth::generate().key;
    let bad = TestClient::connect(lb.addr, &uid, &unknown, &unique("c")).await;
    assert_eq!(bad.err(), Some(ConnectReturnCode::NotAuthorized));
    let other = TestClient::connect(lb.addr, "nobody@nowhere", &key, &unique("c")).await;
    assert!(other.is_err(), "a key of another application was accepted");

    let mut sub = TestClient::connect(lb.addr, &uid, &key, &unique("c"))
        .await
        .unwrap();
    assert_eq!(sub.subscribe("#").await, GRANTED);
    let device = DeviceRef::new(app.clone(), Id::parse("dev1").unwrap());
    node.upstream()
        .publish(&device, Event::Up, bytes::Bytes::from_static(b"{\"up\":1}"))
        .await
        .unwrap();
    let (topic, payload) = sub.next_publish().await;
    assert_eq!(topic, format!("v3/{uid}/devices/dev1/up"));
    assert_eq!(&payload[..], b"{\"up\":1}");

    sub.publish(
        &format!("v3/{uid}/devices/dev1/down/push"),
        r#"{"downlinks":[{"f_port":15,"frm_payload":"vu8="}]}"#,
    )
    .await;
    let queued = sub.next_on("/devices/dev1/down/queued").await;
    assert_eq!(queued["downlink_queued"]["f_port"], 15);

    // A malformed packet after the CONNECT closes that connection only.
    let mut raw = TcpStream::connect(lb.addr).await.unwrap();
    raw.write_all(&connect_packet(&uid, &key)).await.unwrap();
    assert_eq!(connack(&mut raw).await, Some(0));
    raw.write_all(&[0xf0, 0x00]).await.unwrap();
    assert_eq!(connack(&mut raw).await, None);
    node.upstream()
        .publish(&device, Event::Up, bytes::Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(
        sub.next_publish().await.0,
        format!("v3/{uid}/devices/dev1/up")
    );
    assert_eq!(metric(&node, PROXY_FAILURES).await, 0);
    node.shutdown().await;
}

#[tokio::test]
async fn mqtt_behaviours_behind_proxy_v1() {
    mqtt_behaviours(v1(addr("192.0.2.10:5000"))).await;
}

#[tokio::test]
async fn mqtt_behaviours_behind_proxy_v2_ipv6() {
    mqtt_behaviours(v2(addr("[2001:db8::10]:5000"))).await;
}
