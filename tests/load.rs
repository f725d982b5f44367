//! The load generator (`lorabroker-load`) end to end at a tiny scale, against an
//! in-process cluster node (private NATS and Redis): it must connect, authenticate with
//! keys it creates, play the upstream on NATS, lose nothing on an idle machine, and end
//! with one parseable JSON line. Figures are not asserted: these are not benchmarks.

mod common;

use serde_json::Value;

use common::broker::{Backend, TestEnv, TestNode};

/// Runs `lorabroker-load` against `node` with `scenario` arguments and returns its JSON
/// line; panics with the tool's stderr when it fails.
async fn load(env: &TestEnv, node: &TestNode, scenario: &[&str]) -> Value {
    let redis = &env.redis.as_ref().expect("cluster backend").url;
    let nats = &env.nats.as_ref().expect("cluster backend").url;
    let mqtt = node.mqtt_addr.to_string();
    let mut args = vec![
        "--label",
        "test",
        "--mqtt",
        &mqtt,
        "--nats-url",
        nats,
        "--redis-url",
        redis,
        "--redis-prefix",
        &env.prefix,
        "--tenant",
        env.tenant.as_str(),
    ];
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
