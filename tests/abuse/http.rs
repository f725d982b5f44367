//! HTTP: dribbling connections (`http.header_read_timeout`, `http.max_connections`), the
//! probes-only listener with a metrics token (`http.metrics_listen`,
//! `http.metrics_token`), and bodies over `http.max_body_bytes`.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::common::broker::{Backend, TestEnv};
use crate::common::http;
use crate::{closed_within, Bystander, NORMAL};

/// Opens `n` connections to `addr` that send a request line and then one header byte per
/// 200 ms per connection, until `stop`.
async fn dribble(addr: std::net::SocketAddr, n: usize, stop: CancellationToken) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        conns.push(s);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            for s in &mut conns {
                let _ = s.write_all(b"a").await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = tx.send(conns);
    });
    // Handed back once stopped, for the close checks.
    rx.await.unwrap()
}

/// 1000 dribbling connections: `/healthz` from others answers at once, and the dribblers
/// are closed after the header-read timeout (before: held 40 s and more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dribbling_connections_do_not_block_health() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env
        .node_with(|c| c.http.header_read_timeout = Duration::from_secs(2))
        .await;
    let bystander = Bystander::start(&node).await;
    let stop = CancellationToken::new();
    let dribblers = tokio::spawn(dribble(node.http_addr, 1000, stop.clone()));
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let (status, _) = http::get(node.http_addr, "/healthz").await;
        assert_eq!(status, 200);
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("HTTP dribble: worst /healthz {worst:?} beside 1000 dribbling connections");
    assert!(worst < NORMAL, "/healthz took {worst:?}");
    let open = crate::metric(&node, "lorabroker_http_connections").await;
    assert!(open <= 1024 + 1, "the connection cap holds: {open}");
    // Past the header-read timeout every dribbler is closed, though it kept sending.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let mut dribblers = dribblers.await.unwrap();
    for s in &mut dribblers {
        assert!(closed_within(s, Duration::from_secs(3)).await);
    }
    bystander.finish("HTTP dribble").await;
    node.shutdown().await;
}

/// More dribblers than `http.max_connections` fill the main listener, and the probes on
/// `http.metrics_listen` answer regardless; `/metrics` there wants its token, and the
/// admin API is not served there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_have_a_listener_of_their_own() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env
        .node_with(|c| {
            c.http.max_connections = 50;
            c.http.metrics_listen = "127.0.0.1:0".into();
            c.http.metrics_token = "metrics-secret".into();
            c.http.admin_token = "admin-secret".into();
        })
        .await;
    let probes = node.metrics_addr.expect("a probes listener");
    let stop = CancellationToken::new();
    let dribblers = tokio::spawn(dribble(node.http_addr, 200, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    assert_eq!(http::get(probes, "/healthz").await.0, 200);
    assert!(t.elapsed() < NORMAL);
    assert_eq!(http::get(probes, "/metrics").await.0, 401);
    let (status, body) = http::request(probes, "GET", "/metrics", Some("metrics-secret"), "").await;
    assert_eq!(status, 200);
    assert!(body.contains("lorabroker_http_connections"));
    let admin = http::request(
        probes,
        "GET",
        "/api/v1/applications/app1/keys",
        Some("admin-secret"),
        "",
    )
    .await;
    assert_eq!(admin.0, 404, "no admin API on the probes listener");
    stop.cancel();
    drop(dribblers.await.unwrap());
    node.shutdown().await;
}

/// A body over `http.max_body_bytes` gets 413, and one within it is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env
        .node_with(|c| {
            c.http.admin_token = "admin-secret".into();
            c.http.max_body_bytes = 4096;
        })
        .await;
    let path = format!("/api/v1/applications/app1@{}/keys", env.tenant);
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(8_000));
    let (status, _) =
        http::request(node.http_addr, "POST", &path, Some("admin-secret"), &big).await;
    assert_eq!(status, 413);
    let small = r#"{"name":"ok","rights":["traffic:read"]}"#;
    let (status, body) =
        http::request(node.http_addr, "POST", &path, Some("admin-secret"), small).await;
    assert_eq!(status, 201, "{body}");
    node.shutdown().await;
}
