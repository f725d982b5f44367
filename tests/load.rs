//! The load generator (`lorabroker-load`) end to end at a tiny scale, against an
//! in-process cluster node (private NATS and Redis): it must connect, authenticate with
//! keys it creates, play the upstream on NATS, lose nothing on an idle machine, and end
//! with one parseable JSON line, over every transport (`--transport`), and spread its
//! connections over several source addresses (`--source-addrs`). Figures are not
//! asserted: these are not benchmarks.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use common::broker::{Backend, TestEnv, TestNode};
use common::sse::Sse;
use common::tls::TestCa;
use lorabroker::transport::Kind;

/// Runs `lorabroker-load` against `node` with `scenario` arguments and returns its JSON
/// line; panics with the tool's stderr when it fails.
async fn load(env: &TestEnv, node: &TestNode, scenario: &[&str]) -> Value {
    load_over(env, &node.mqtt_addr.to_string(), &[], scenario).await
}

/// [`load`] against the listener `mqtt`, with `transport` arguments (`--transport …`).
async fn load_over(env: &TestEnv, mqtt: &str, transport: &[&str], scenario: &[&str]) -> Value {
    let redis = &env.redis.as_ref().expect("cluster backend").url;
    let nats = &env.nats.as_ref().expect("cluster backend").url;
    let mut args = vec![
        "--label",
        "test",
        "--mqtt",
        mqtt,
        "--nats-url",
        nats,
        "--redis-url",
        redis,
        "--redis-prefix",
        &env.prefix,
        "--tenant",
        env.tenant.as_str(),
    ];
    args.extend_from_slice(transport);
    args.extend_from_slice(scenario);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lorabroker-load"))
        .args(&args)
        .output()
        .await
        .expect("lorabroker-load runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "lorabroker-load {args:?} failed:\n{stderr}"
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line on stdout, got {stdout:?}");
    let v: Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(v["target"], "test");
    assert!(
        stderr.contains("against test"),
        "human text on stderr: {stderr}"
    );
    v
}

#[tokio::test]
async fn fanout_storm_and_downlinks_at_tiny_scale() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env.node().await;

    let v = load(
        &env,
        &node,
        &[
            "fanout",
            "--subscribers",
            "2",
            "--messages",
            "100",
            "--rate",
            "max",
            "--duration",
            "30s",
        ],
    )
    .await;
    assert_eq!(v["scenario"], "fanout");
    assert_eq!(v["published"], 100);
    assert_eq!(v["expected"], 200);
    assert_eq!(v["delivered"], 200, "{v}");
    assert_eq!(v["lost"], 0);
    assert_eq!(v["latency_us"]["count"], 200);
    assert!(v["delivered_per_s"].as_f64().unwrap() > 0.0);

    let v = load(
        &env,
        &node,
        &["storm", "--connections", "20", "--distinct-keys"],
    )
    .await;
    assert_eq!(v["scenario"], "storm");
    assert_eq!(v["key_cache"], "miss");
    assert_eq!(v["latency_us"]["count"], 20);

    let v = load(
        &env,
        &node,
        &[
            "downlink",
            "--clients",
            "2",
            "--devices",
            "5",
            "--rate",
            "100",
            "--duration",
            "500ms",
        ],
    )
    .await;
    let pushed = v["pushed"].as_u64().unwrap();
    assert!(pushed > 0, "{v}");
    assert_eq!(v["queued_events"].as_u64(), Some(pushed), "{v}");
    assert_eq!(v["queued_in_redis"].as_u64(), Some(pushed), "{v}");

    node.shutdown().await;
}

/// Fan-out with a few subscribers for about a second over TLS, WebSocket and WebSocket over
/// TLS (a CA made in the test, trusted with `--cafile`): everything published arrives.
#[tokio::test]
async fn fanout_over_tls_ws_and_wss() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("load test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let (cert, key) = ca.server().write(dir.path(), "server");
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| {
            c.mqtt.tls.listen = "127.0.0.1:0".into();
            c.mqtt.ws.listen = "127.0.0.1:0".into();
            c.mqtt.wss.listen = "127.0.0.1:0".into();
            c.mqtt.tls.cert_file = cert.display().to_string();
            c.mqtt.tls.key_file = key.display().to_string();
        })
        .await;
    let ca_file = ca_file.display().to_string();
    for (kind, name) in [(Kind::Tls, "tls"), (Kind::Ws, "ws"), (Kind::Wss, "wss")] {
        let addr = node.addr(kind).to_string();
        let transport = [
            "--transport",
            name,
            "--cafile",
            &ca_file,
            "--ws-path",
            "/mqtt",
        ];
        let fanout = [
            "fanout",
            "--subscribers",
            "3",
            "--rate",
            "500",
            "--duration",
            "1s",
        ];
        let v = load_over(&env, &addr, &transport, &fanout).await;
        assert_eq!(v["scenario"], "fanout", "{name}: {v}");
        assert_eq!(v["transport"], name, "{v}");
        let published = v["published"].as_u64().unwrap();
        assert!(published > 0, "{name}: {v}");
        assert_eq!(v["expected"].as_u64(), Some(published * 3), "{name}: {v}");
        assert_eq!(v["delivered"], v["expected"], "{name}: {v}");
        assert_eq!(v["lost"], 0, "{name}: {v}");
        assert_eq!(v["subscribers_closed"], 0, "{name}: {v}");

        // Idle connections over the transport: they connect and subscribe.
        let idle = [
            "--broker-pid",
            &std::process::id().to_string(),
            "idle",
            "--connections",
            "5",
            "--settle",
            "10ms",
        ]
        .map(String::from);
        let idle: Vec<&str> = idle.iter().map(String::as_str).collect();
        let v = load_over(&env, &addr, &transport, &idle).await;
        assert_eq!(v["connections"], 5, "{name}: {v}");
        assert_eq!(v["latency_us"]["count"], 5, "{name}: {v}");
    }
    // A client that does not trust the broker's CA is refused before MQTT.
    let stranger = TestCa::new("not the broker's CA").write(dir.path(), "stranger.pem");
    let stranger = stranger.display().to_string();
    let redis = &env.redis.as_ref().unwrap().url;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lorabroker-load"))
        .args(["--mqtt", &node.addr(Kind::Tls).to_string()])
        .args(["--transport", "tls", "--cafile", &stranger])
        .args(["--redis-url", redis, "--redis-prefix", &env.prefix])
        .args(["storm", "--connections", "1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TLS handshake"), "{stderr}");
    node.shutdown().await;
}

/// The scale scenario with a few connections bound to three loopback source addresses:
/// every connection subscribes, every uplink arrives, and the node saw connections from
/// each of the three addresses (its `as.mqtt.connect` events carry every client's remote
/// address).
#[tokio::test]
async fn scale_from_several_source_addresses() {
    const TOKEN: &str = "scale-test-admin-token";
    const CONNECTIONS: usize = 24;
    let sources: BTreeSet<IpAddr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .map(|a| a.parse().unwrap())
        .into();
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env.node_with(|c| c.http.admin_token = TOKEN.into()).await;
    let app = "scale-sources";
    let uid = format!("{app}@{}", env.tenant.as_str());
    let mut events = Sse::open(
        node.http_addr,
        &format!("/api/v1/applications/{uid}/events"),
        TOKEN,
    )
    .await;
    assert_eq!(events.status, 200);

    // The node runs in this process: its RSS is this process's.
    let pid = std::process::id().to_string();
    let connections = CONNECTIONS.to_string();
    let v = load(
        &env,
        &node,
        &[
            "--app",
            app,
            "--broker-pid",
            &pid,
            "--source-addrs",
            "127.0.0.2,127.0.0.3,127.0.0.4",
            "scale",
            "--connections",
            &connections,
            "--rate",
            "200",
            "--duration",
            "1s",
            "--settle",
            "10ms",
        ],
    )
    .await;
    assert_eq!(v["scenario"], "scale", "{v}");
    assert_eq!(v["connections"], CONNECTIONS, "{v}");
    assert_eq!(v["source_addrs"], 3, "{v}");
    let published = v["published"].as_u64().unwrap();
    assert!(published > 0, "{v}");
    assert_eq!(
        v["expected"].as_u64(),
        Some(published),
        "one subscriber per device: {v}"
    );
    assert_eq!(v["delivered"], v["expected"], "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["subscribers_closed"], 0, "{v}");
    assert_eq!(v["latency_us"]["count"].as_u64(), Some(published), "{v}");
    for field in ["rss_before_bytes", "rss_connected_bytes", "rss_peak_bytes"] {
        assert!(v[field].as_u64().is_some_and(|b| b > 0), "{field}: {v}");
    }
    assert!(v["broker_cpu_percent"].is_number(), "{v}");
    assert!(v["cpu_us_per_delivery"].is_number(), "{v}");

    // The node's side: where its connections came from.
    let mut seen = BTreeSet::new();
    for _ in 0..CONNECTIONS {
        let connect = events.event("as.mqtt.connect", |_| true).await;
        let remote: SocketAddr = connect["data"]["remote_addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("a remote address: {connect}"));
        seen.insert(remote.ip());
    }
    assert_eq!(
        seen, sources,
        "every source address connected, and only those"
    );
    node.shutdown().await;
}

/// A run whose connections cannot fit under any descriptor limit is refused before it
/// connects, naming the numbers and how to raise the limit.
#[tokio::test]
async fn a_run_beyond_the_descriptor_limit_is_refused_up_front() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lorabroker-load"))
        .args(["--mqtt", "127.0.0.1:9", "--broker-pid", "1"])
        .args(["idle", "--connections", "2000000000"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("2000000000 connections need 2000000128 file descriptors"),
        "{stderr}"
    );
    assert!(
        stderr.contains("ulimit -Hn") && stderr.contains("LimitNOFILE"),
        "{stderr}"
    );
}
