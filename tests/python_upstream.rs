//! The upstream contract proved by a second language (issue 11, point 9): the Python
//! upstream of `examples/python-upstream/`, written from `docs/upstream.md` alone, feeds a
//! `lorabroker serve` node through a real NATS and a real Redis, and real `mosquitto_sub`
//! and `mosquitto_pub` see it work: its uplinks arrive on `v3/app1@{tenant}/devices/dev1/up`
//! in the shape of the document's examples, and a pushed downlink comes back as
//! `down/queued` (from the node), then `down/sent` and `down/ack` (from the Python
//! upstream), carrying the push's correlation ID and the server's (and, for the second
//! confirmed downlink, `down/nack` under `--nack-every 2`); an item it cannot send gets
//! `down/failed`; the pop script leaves no bytes in the quota counters; SIGTERM stops it
//! with status 0.
//!
//! Python is `target/pyenv/bin/python` (or `LORABROKER_TEST_PYTHON`); when the pinned
//! nats-py and redis are not installed there, the test runs `tests/clients/setup` first.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::clients::root;
use common::doc::{assert_same_shape, event_example};
use common::http;
use common::services::{unique, NatsService, RedisService};
use common::shell::{correlation_ids, exec, require, shell, OutputLines, Spawned};

/// How long one step may take (the upstream uplinks every 300 ms).
const WAIT: Duration = Duration::from_secs(20);

const SERVE: &str = "lorabroker serve --node-name py-node --mqtt-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --nats-url {nats} --redis-url {redis}";
const KEYS_CREATE: &str = "lorabroker keys create --app app1 --tenant {tenant} --redis-url {redis}";
const SUB: &str = "mosquitto_sub -h 127.0.0.1 -p {port} -u 'app1@{tenant}' -P '{key}' -t '#' -v";
const PUB: &str = "mosquitto_pub -h 127.0.0.1 -p {port} -u 'app1@{tenant}' -P '{key}' -t 'v3/app1@{tenant}/devices/dev1/down/push' -m '{body}'";

/// The Python that has the upstream's pinned packages, installing them when missing.
fn python() -> PathBuf {
    let custom = std::env::var_os("LORABROKER_TEST_PYTHON").map(PathBuf::from);
    let python = custom
        .clone()
        .unwrap_or_else(|| root().join("target/pyenv/bin/python"));
    let probe = || {
        std::process::Command::new(&python)
            .args([
                "-c",
                "from importlib.metadata import version as v; print(v('nats-py'), v('redis'))",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let pinned = "2.16.0 8.1.0";
    if probe() != pinned && custom.is_none() {
        common::clients::run_setup();
    }
    assert_eq!(
        probe(),
        pinned,
        "{} lacks nats-py 2.16.0 and redis 8.1.0: run tests/clients/setup",
        python.display()
    );
    python
}

/// `template` with every `{name}` of `vars` filled in.
fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut s = template.to_owned();
    for (name, value) in vars {
        s = s.replace(&format!("{{{name}}}"), value);
    }
    s
}

/// A `lorabroker serve` child on free ports, ready.
struct Node {
    child: Spawned,
    mqtt: SocketAddr,
    http: SocketAddr,
}

async fn serve(cmd: &str, prefix: &str) -> Node {
    let mut child = Spawned::start(
        shell(&exec(cmd))
            .env("LORABROKER_REDIS__KEY_PREFIX", prefix)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped()),
    );
    let mut lines = child.stdout_lines();
    let (mut mqtt, mut http) = (None, None);
    while mqtt.is_none() || http.is_none() {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("serve prints its addresses")
            .expect("stdout readable")
            .expect("serve exited before printing its addresses");
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("MQTT"), Some(addr)) => mqtt = addr.parse().ok(),
            (Some("HTTP"), Some(url)) => http = url.trim_start_matches("http://").parse().ok(),
            _ => {}
        }
    }
    let node = Node {
        child,
        mqtt: mqtt.expect("MQTT address"),
        http: http.expect("HTTP address"),
    };
    wait_for(&node, "/readyz", "").await;
    node
}

/// Waits until GET `path` of `node` answers 200 with a body containing `text`.
async fn wait_for(node: &Node, path: &str, text: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = http::get(node.http, path).await;
        if status == 200 && body.contains(text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: {status} {body} (waiting for {text:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads `mosquitto_sub -v` lines until `done` says it has seen enough; returns every
/// message as (topic, JSON payload).
async fn collect(
    lines: &mut OutputLines,
    what: &str,
    mut done: impl FnMut(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    while !done(&seen) {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{what} not seen within {WAIT:?}; seen: {seen:#?}"))
            .expect("mosquitto_sub output")
            .expect("mosquitto_sub ended");
        let Some((topic, payload)) = line.split_once(' ') else {
            continue;
        };
        let json = serde_json::from_str(payload)
            .unwrap_or_else(|e| panic!("{topic}: payload is not JSON ({e}): {payload}"));
        seen.push((topic.to_owned(), json));
    }
    seen
}

/// The last message of `seen` on a topic ending in `suffix` whose top-level correlation
/// IDs include `id`.
fn find<'a>(seen: &'a [(String, Value)], suffix: &str, id: &str) -> Option<&'a Value> {
    seen.iter()
        .rev()
        .find(|(t, v)| {
            t.ends_with(suffix)
                && correlation_ids(&v["correlation_ids"])
                    .iter()
                    .any(|c| c == id)
        })
        .map(|(_, v)| v)
}

/// Publishes a `down/push` of `body` to dev1 with `mosquitto_pub`.
async fn push(vars: &[(&str, &str)], body: &str) {
    let published = Spawned::start(
        shell(&exec(&fill(PUB, vars)).replace("{body}", body))
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .output()
    .await;
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
}

/// The seed's confirmed downlink with a correlation ID of its own: queued by the node,
/// then `down/sent` and `last` (`down/ack` or `down/nack`) from the Python upstream, each
/// in the shape of the document's example and carrying the push's and the server's
/// correlation IDs, in order, at the top and in the body.
async fn confirmed_round_trip(vars: &[(&str, &str)], lines: &mut OutputLines, last: &str) {
    let mine = unique("cid");
    let body = format!(
        r#"{{"downlinks":[{{"f_port":15,"frm_payload":"vu8=","priority":"HIGH","confirmed":true,"correlation_ids":["{mine}"]}}]}}"#
    );
    push(vars, &body).await;
    let events = ["down/queued", "down/sent", last];
    let seen = collect(lines, &events.join(", "), |seen| {
        events
            .iter()
            .all(|e| find(seen, &format!("dev1/{e}"), &mine).is_some())
    })
    .await;
    let queued = find(&seen, "dev1/down/queued", &mine).unwrap();
    let server_id = correlation_ids(&queued["correlation_ids"])
        .into_iter()
        .find(|c| c.starts_with("as:downlink:"))
        .unwrap_or_else(|| panic!("no server correlation ID in {queued}"));
    let item_ids = vec![mine.clone(), server_id];
    let other = if last == "down/ack" {
        "down/nack"
    } else {
        "down/ack"
    };
    assert!(
        find(&seen, &format!("dev1/{other}"), &mine).is_none(),
        "both {last} and {other}"
    );
    for event in ["down/sent", last] {
        let field = format!("downlink_{}", event.trim_start_matches("down/"));
        let doc = find(&seen, &format!("dev1/{event}"), &mine).unwrap();
        assert_same_shape(
            &event_example(&format!(
                "v3.tenant1.app1.devices.dev1.{}",
                event.replace('/', ".")
            )),
            doc,
            event,
        );
        let top = correlation_ids(&doc["correlation_ids"]);
        assert_eq!(top[..2], item_ids[..], "{event}: {doc}");
        assert_eq!(
            correlation_ids(&doc[&field]["correlation_ids"]),
            item_ids,
            "{event}: {doc}"
        );
        assert_eq!(doc[&field]["frm_payload"], "vu8=", "{event}: {doc}");
        assert_eq!(doc[&field]["f_port"], 15, "{event}: {doc}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_upstream_feeds_a_serve_node_and_serves_its_downlinks() {
    require("mosquitto_sub");
    require("mosquitto_pub");
    let python = python();
    let (redis, nats) = tokio::join!(RedisService::start(), NatsService::start());
    let (tenant, prefix) = (unique("tenant"), unique("lbtest"));
    let base = [
        ("nats", nats.url.as_str()),
        ("redis", redis.url.as_str()),
        ("tenant", tenant.as_str()),
    ];
    let mut node = serve(&fill(SERVE, &base), &prefix).await;

    let out = Spawned::start(
        shell(&fill(KEYS_CREATE, &base))
            .env("LORABROKER_REDIS__KEY_PREFIX", &prefix)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .output()
    .await;
    assert!(
        out.status.success(),
        "keys create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let port = node.mqtt.port().to_string();
    let vars = [
        ("port", port.as_str()),
        ("tenant", tenant.as_str()),
        ("key", key.as_str()),
    ];

    let mut sub = Spawned::start(shell(&exec(&fill(SUB, &vars))).stdout(Stdio::piped()));
    let mut lines = sub.stdout_lines();
    wait_for(&node, "/metrics", "lorabroker_connections 1\n").await;

    // The upstream, as its README runs it, with its log in a file.
    let log = tempfile::NamedTempFile::new().expect("a temporary file");
    let mut upstream = Spawned::start(
        tokio::process::Command::new(&python)
            .arg(root().join("examples/python-upstream/upstream.py"))
            .args(["--nats-url", &nats.url, "--redis-url", &redis.url])
            .args([
                "--key-prefix",
                &prefix,
                "--tenant",
                &tenant,
                "--app",
                "app1",
            ])
            .args([
                "--devices",
                "dev1",
                "--interval",
                "0.3",
                "--nack-every",
                "2",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("the log file")),
    );
    let log_text = || std::fs::read_to_string(log.path()).unwrap_or_default();

    // A join, then uplinks, on the documented topics and in the documented shape.
    let topic = |event: &str| format!("v3/app1@{tenant}/devices/dev1/{event}");
    let seen = collect(&mut lines, "a join and an uplink", |seen| {
        let join = seen.iter().position(|(t, _)| *t == topic("join"));
        join.is_some_and(|j| seen[j..].iter().any(|(t, _)| *t == topic("up")))
    })
    .await;
    let join = &seen.iter().find(|(t, _)| *t == topic("join")).unwrap().1;
    let up = &seen
        .iter()
        .rev()
        .find(|(t, _)| *t == topic("up"))
        .unwrap()
        .1;
    assert_same_shape(
        &event_example("v3.tenant1.app1.devices.dev1.join"),
        join,
        "join",
    );
    assert_same_shape(&event_example("v3.tenant1.app1.devices.dev1.up"), up, "up");
    assert_eq!(up["end_device_ids"]["device_id"], "dev1");
    assert_eq!(
        up["end_device_ids"]["application_ids"]["application_id"],
        "app1"
    );
    assert_eq!(
        up["uplink_message"]["session_key_id"],
        join["join_accept"]["session_key_id"]
    );
    for doc in [join, up] {
        let at = doc["received_at"].as_str().expect("received_at");
        humantime::parse_rfc3339(at).unwrap_or_else(|e| panic!("received_at {at}: {e}"));
    }

    // The seed's confirmed downlink: queued by the node, then sent and acknowledged by
    // the Python upstream, every event carrying the push's and the server's IDs.
    confirmed_round_trip(&vars, &mut lines, "down/ack").await;
    // --nack-every 2: the second confirmed downlink is not acknowledged.
    confirmed_round_trip(&vars, &mut lines, "down/nack").await;

    // An item this upstream cannot send (no payload encoder): down/failed, carrying it.
    let other = unique("cid");
    let body = format!(
        r#"{{"downlinks":[{{"f_port":2,"decoded_payload":{{"on":true}},"correlation_ids":["{other}"]}}]}}"#
    );
    push(&vars, &body).await;
    let seen = collect(&mut lines, "down/failed", |seen| {
        find(seen, "dev1/down/failed", &other).is_some()
    })
    .await;
    let failed = find(&seen, "dev1/down/failed", &other).unwrap();
    // The example's item has a frm_payload; this one has a decoded_payload instead.
    let mut example = event_example("v3.tenant1.app1.devices.dev1.down.failed");
    example["downlink_failed"]["downlink"] =
        serde_json::json!({"f_port": 1, "correlation_ids": [""]});
    assert_same_shape(&example, failed, "down/failed");
    assert_eq!(
        failed["downlink_failed"]["downlink"]["decoded_payload"]["on"], true,
        "{failed}"
    );
    assert!(
        find(&seen, "dev1/down/sent", &other).is_none(),
        "an item without frm_payload was reported sent"
    );

    // The script gave the bytes back: the queue is empty and the tenant's counters gone.
    let scope = format!("{prefix}:{{t:{tenant}}}");
    let queued: i64 = redis
        .query(&["LLEN", &format!("{scope}:down:app1:dev1")])
        .await;
    assert_eq!(queued, 0);
    let counters: HashMap<String, String> =
        redis.query(&["HGETALL", &format!("{scope}:quota")]).await;
    assert!(counters.is_empty(), "counters left: {counters:?}");
    let registered: Vec<String> = redis
        .query(&["SMEMBERS", &format!("{scope}:devices:app1")])
        .await;
    assert_eq!(registered, ["dev1"]);

    // SIGTERM stops it cleanly, with status 0.
    let pid = upstream.child().id().expect("running") as i32;
    // SAFETY: kill only sends a signal to the child this test started.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::time::timeout(WAIT, upstream.wait())
        .await
        .unwrap_or_else(|_| panic!("the upstream ignores SIGTERM:\n{}", log_text()));
    assert!(status.success(), "{status}:\n{}", log_text());
    assert!(log_text().contains("stopping"), "{}", log_text());

    sub.stop().await;
    node.child.stop().await;
}
