//! MQTT over WebSocket (`mqtt.ws.listen`): the upgrade's checks (path, subprotocol,
//! origin), MQTT bytes in binary frames however a client cuts them, ping/pong, text
//! frames, the frame bound and the close handshake, with a real WebSocket client
//! (tokio-tungstenite); then MQTT.js over ws:// and wss:// in Node and in headless
//! Chromium. The MQTT behaviour suite every transport passes is in tests/transports.rs.

mod common;

use std::time::Duration;

use bytes::Bytes;
use mqttbytes::v4::Packet;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use common::broker::{Backend, TestEnv, TestNode};
use common::http;
use common::raw::{connect_packet, publish_packet, Connector, Ended, Raw};
use common::ws::{ws_handshake, ws_url};
use lorabroker::auth::Rights;
use lorabroker::config::Config;
use lorabroker::topic::AppRef;
use lorabroker::transport::Kind;

/// A node on the embedded backend with a WebSocket listener on a free port.
async fn ws_node(env: &TestEnv, tweak: impl FnOnce(&mut Config)) -> TestNode {
    env.node_with(|c| {
        c.mqtt.ws.listen = "127.0.0.1:0".into();
        tweak(c);
    })
    .await
}

/// The value of one sample of `/metrics` (0 when absent).
async fn metric(node: &TestNode, sample: &str) -> u64 {
    let (_, body) = http::get(node.http_addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

struct Fixture {
    _env: TestEnv,
    node: TestNode,
    app: AppRef,
    key: String,
}

impl Fixture {
    async fn new(tweak: impl FnOnce(&mut Config)) -> Fixture {
        let env = TestEnv::new(Backend::Embedded).await;
        let node = ws_node(&env, tweak).await;
        let app = env.app("app1");
        let key = node.key(&app, Rights::DEFAULT).await;
        Fixture {
            _env: env,
            node,
            app,
            key,
        }
    }

    fn username(&self) -> String {
        self.node.username(&self.app)
    }

    /// A WebSocket connection after CONNACK 0.
    async fn connected(&self) -> Raw {
        let mut raw = Connector::of(&self.node, Kind::Ws, &[]).open().await;
        assert_eq!(raw.connect(&self.username(), &self.key).await, 0);
        raw
    }
}

#[tokio::test]
async fn a_ping_frame_gets_its_pong() {
    let f = Fixture::new(|_| {}).await;
    let mut raw = f.connected().await;
    raw.send_message(Message::Ping(Bytes::from_static(b"are you there")))
        .await;
    match raw.next_message().await {
        Some(Message::Pong(p)) => assert_eq!(&p[..], b"are you there"),
        other => panic!("pong expected: {other:?}"),
    }
    // Still an MQTT connection.
    raw.send(&[0xc0, 0x00]).await;
    assert!(matches!(raw.next().await, Ok(Packet::PingResp)));
}

#[tokio::test]
async fn a_text_frame_closes_the_connection() {
    let f = Fixture::new(|_| {}).await;
    let mut raw = f.connected().await;
    raw.send_message(Message::Text("hello".into())).await;
    assert_eq!(
        raw.closed(Duration::from_secs(5)).await,
        Ended::Close(1003),
        "closed with 1003 (unsupported data)"
    );
    assert_eq!(
        metric(
            &f.node,
            r#"lorabroker_websocket_errors_total{reason="text_frame"}"#
        )
        .await,
        1
    );
}

#[tokio::test]
async fn a_frame_over_the_bound_closes_the_connection_and_is_counted() {
    let f = Fixture::new(|c| c.mqtt.max_packet_size = 1024).await;
    let mut raw = f.connected().await;
    // A PUBLISH that fits is fine.
    raw.send(&publish_packet("v3/x/devices/d/down/push", &[b'a'; 900]))
        .await;
    raw.send(&[0xc0, 0x00]).await;
    assert!(matches!(raw.next().await, Ok(Packet::PingResp)));
    // One frame of 1024 + 5 + 1 bytes: refused before it is buffered.
    raw.send(&vec![0u8; 1030]).await;
    assert_eq!(raw.closed(Duration::from_secs(5)).await, Ended::Close(1009));
    assert_eq!(
        metric(
            &f.node,
            r#"lorabroker_websocket_errors_total{reason="too_large"}"#
        )
        .await,
        1
    );
}

#[tokio::test]
async fn the_clients_close_frame_ends_the_connection_cleanly() {
    let f = Fixture::new(|_| {}).await;
    let mut raw = f.connected().await;
    assert_eq!(metric(&f.node, "lorabroker_connections").await, 1);
    raw.send_message(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await;
    // The server answers the close frame, then the stream ends.
    match raw.next_message().await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("the close answer expected: {other:?}"),
    }
    common::wait::eventually("the connection is gone", Duration::from_secs(5), || async {
        match metric(&f.node, "lorabroker_connections").await {
            0 => Ok(()),
            n => Err(n),
        }
    })
    .await;
}

#[tokio::test]
async fn the_upgrade_checks_path_and_subprotocol() {
    let f = Fixture::new(|_| {}).await;
    let url = ws_url(&f.node, "/mqtt");
    assert_eq!(
        ws_handshake(&ws_url(&f.node, "/other"), Some("mqtt"), None)
            .await
            .err(),
        Some(404)
    );
    assert_eq!(ws_handshake(&url, None, None).await.err(), Some(400));
    assert_eq!(
        ws_handshake(&url, Some("xmpp"), None).await.err(),
        Some(400)
    );
    for (offered, chosen) in [
        ("mqtt", "mqtt"),
        ("mqttv3.1", "mqttv3.1"),
        ("xmpp, mqtt", "mqtt"),
        ("mqttv3.1, mqtt", "mqttv3.1"),
    ] {
        let (ws, got) = ws_handshake(&url, Some(offered), None)
            .await
            .unwrap_or_else(|status| panic!("{offered}: refused with {status}"));
        assert_eq!(got.as_deref(), Some(chosen), "offered {offered}");
        drop(ws);
    }
    // A query string does not change the path.
    assert!(ws_handshake(&format!("{url}?x=1"), Some("mqtt"), None)
        .await
        .is_ok());
    assert_eq!(
        metric(
            &f.node,
            r#"lorabroker_transport_failures_total{listener="ws",reason="websocket_upgrade"}"#
        )
        .await,
        3
    );
}

#[tokio::test]
async fn origins_are_checked_when_configured() {
    let f = Fixture::new(|c| {
        c.mqtt.ws.allowed_origins = vec!["https://console.example.com".into()];
        c.mqtt.ws.path = "/ws".into();
    })
    .await;
    let url = ws_url(&f.node, "/ws");
    assert_eq!(
        ws_handshake(&url, Some("mqtt"), Some("https://evil.example.com"))
            .await
            .err(),
        Some(403)
    );
    let (ws, _) = ws_handshake(&url, Some("mqtt"), Some("https://Console.example.com"))
        .await
        .expect("an allowed origin (case does not matter)");
    drop(ws);
    // Not a browser: no Origin header.
    assert!(ws_handshake(&url, Some("mqtt"), None).await.is_ok());
}

#[tokio::test]
async fn our_close_is_a_close_frame() {
    // A keepalive timeout closes from the server side: with a close frame (1000).
    let f = Fixture::new(|_| {}).await;
    let mut raw = Connector::of(&f.node, Kind::Ws, &[]).open().await;
    raw.send(&connect_packet(&f.username(), &f.key, 1)).await;
    assert!(matches!(raw.next().await, Ok(Packet::ConnAck(a)) if a.code as u8 == 0));
    assert_eq!(raw.closed(Duration::from_secs(5)).await, Ended::Close(1000));
}

/// WebSocket over TLS (`mqtt.wss.listen`, the certificate of `[mqtt.tls]`): a plain HTTP
/// upgrade on the TLS port fails below MQTT and is counted; a rustls client offering ALPN
/// `http/1.1`, as browsers do, then gets its upgrade (tests/transports.rs runs the MQTT
/// behaviour suite over it).
#[tokio::test]
async fn plain_http_on_the_wss_port_is_a_counted_tls_failure() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::TestCa::new("wss test CA");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let f = Fixture::new(|c| {
        c.mqtt.wss.listen = "127.0.0.1:0".into();
        c.mqtt.tls.cert_file = cert.display().to_string();
        c.mqtt.tls.key_file = key.display().to_string();
    })
    .await;
    let addr = f.node.addr(Kind::Wss);
    // Plain WebSocket on the TLS port fails below MQTT and is counted.
    let before = metric(
        &f.node,
        r#"lorabroker_transport_failures_total{listener="wss",reason="tls_handshake"}"#,
    )
    .await;
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut sink),
    )
    .await
    .expect("closed");
    let sample = r#"lorabroker_transport_failures_total{listener="wss",reason="tls_handshake"}"#;
    assert_eq!(metric(&f.node, sample).await, before + 1);
    let mut wss = Connector::Wss(addr, vec![ca.pem()]).open().await;
    assert_eq!(wss.connect(&f.username(), &f.key).await, 0);
}

/// Runs `mqttjs_ws.mjs MODE` against a node with a WebSocket listener whose upstream sends
/// an uplink of dev1 every 200 ms; its output, after asserting that it succeeded.
async fn run_mqttjs(mode: &str, over_tls: bool) -> String {
    let dir = common::clients::node_clients();
    // For wss://: a CA made here, the server certificate of [mqtt.tls] signed by it.
    let certs = tempfile::tempdir().unwrap();
    let ca = common::tls::TestCa::new("MQTT.js wss test CA");
    let server = ca.server();
    let (cert, key) = server.write(certs.path(), "server");
    let ca_file = ca.write(certs.path(), "ca");
    let f = Fixture::new(|c| {
        if over_tls {
            c.mqtt.wss.listen = "127.0.0.1:0".into();
            c.mqtt.tls.cert_file = cert.display().to_string();
            c.mqtt.tls.key_file = key.display().to_string();
        }
    })
    .await;
    let url = if over_tls {
        format!("wss://localhost:{}/mqtt", f.node.addr(Kind::Wss).port())
    } else {
        ws_url(&f.node, "/mqtt")
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let fleet = lorabroker::upstream::FleetConfig {
        app: f.app.clone(),
        devices: 1,
        uplink_interval: Duration::from_millis(200),
    };
    tokio::spawn(lorabroker::upstream::run_fleet(
        f.node.upstream(),
        fleet,
        stop.clone(),
    ));
    let _stop = stop.drop_guard();
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("mqttjs_ws.mjs")
        .arg(mode)
        .current_dir(&dir)
        .env("LB_URL", &url)
        .env("LB_USERNAME", f.username())
        .env("LB_KEY", &f.key)
        .env("LB_APP", f.username())
        .env("LB_DEVICE", "dev1")
        .env("LB_TIMEOUT", "15")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if over_tls {
        cmd.env("LB_CA", &ca_file)
            .env("LB_SPKI", spki_hash(&server));
    }
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        common::shell::Spawned::start(&mut cmd).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("mqttjs_ws.mjs {mode} overran 90 s"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "mqttjs_ws.mjs {mode} failed:\n{text}");
    text
}

#[tokio::test]
async fn mqttjs_in_node_over_ws() {
    let out = run_mqttjs("node", false).await;
    assert!(out.contains("uplink on v3/"), "{out}");
    assert!(out.contains("down/queued seen"), "{out}");
}

#[tokio::test]
async fn mqttjs_in_headless_chromium_over_ws() {
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "headless Chromium is missing (Debian/Ubuntu: apt-get install -y chromium; .ci/run installs it)"
    );
    let out = run_mqttjs("browser", false).await;
    assert!(out.contains("received an uplink on v3/"), "{out}");
}

/// Base64 of the SHA-256 of `pem`'s SubjectPublicKeyInfo, as Chromium's
/// `--ignore-certificate-errors-spki-list` takes it.
fn spki_hash(pem: &common::tls::Pem) -> String {
    use base64::Engine;
    use sha2::Digest;
    let der = pem.der();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("a certificate");
    let digest = sha2::Sha256::digest(cert.tbs_certificate.subject_pki.raw);
    base64::engine::general_purpose::STANDARD.encode(digest)
}

#[tokio::test]
async fn mqttjs_in_node_over_wss() {
    let out = run_mqttjs("node", true).await;
    assert!(out.contains("connected over wss://"), "{out}");
    assert!(out.contains("uplink on v3/"), "{out}");
    assert!(out.contains("down/queued seen"), "{out}");
}

#[tokio::test]
async fn mqttjs_in_headless_chromium_over_wss() {
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "headless Chromium is missing (Debian/Ubuntu: apt-get install -y chromium; .ci/run installs it)"
    );
    let out = run_mqttjs("browser", true).await;
    assert!(out.contains("received an uplink on v3/"), "{out}");
}
