//! Downlinks bounded in every dimension (issue 9 points 2 and 6), against real nodes on
//! both backends: the device registry (`device_not_found` over MQTT, the admin API and
//! the `lorabroker devices` CLI), no amplification on the bus (bytes published per byte
//! received, measured on the node's own bus, NATS for the cluster), and the "fill Redis"
//! attack stopped at the quotas (Redis `used_memory` before and after).
//!
//! The shared suites of the queue, its quotas, its idle expiry and the registry over
//! memory and real Redis are in `tests/backends.rs`; validation is unit-tested in
//! `src/downlink/validate.rs`.

mod common;

use std::sync::Arc;

use futures::StreamExt;
use rumqttc::{QoS, SubscribeReasonCode};
use serde_json::{json, Value};

use common::broker::{Backend, TestEnv, TestNode, WAIT};
use common::http::request;
use common::wait::eventually;
use lorabroker::auth::Rights;
use lorabroker::bus::{Bus, Subscription};
use lorabroker::downlink::service::MAX_EVENT_ENVELOPE;
use lorabroker::topic::{AppRef, DeviceRef, DownlinkOp, Id};

const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtMostOnce);
const TOKEN: &str = "downlink-admin-token";

macro_rules! both_backends {
    ($($test:ident),+ $(,)?) => {
        mod embedded { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Backend::Embedded).await } )+ }
        mod cluster { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(super::Backend::Cluster).await } )+ }
    };
}

both_backends!(
    unregistered_devices_get_device_not_found,
    bytes_published_per_byte_received_are_bounded,
);

fn dev(app: &AppRef, id: &str) -> DeviceRef {
    DeviceRef::new(app.clone(), Id::parse(id).expect("valid device ID"))
}

/// A valid item with a base64 payload.
fn item(f_port: u8) -> Value {
    json!({"f_port": f_port, "frm_payload": "AQID"})
}

fn push_body(items: Vec<Value>) -> String {
    json!({ "downlinks": items }).to_string()
}

/// `GET /metrics`.
async fn metrics(node: &TestNode) -> String {
    common::http::get(node.http_addr, "/metrics").await.1
}

async fn unregistered_devices_get_device_not_found(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env
        .node_with(|c| {
            c.downlink.require_known_device = true;
            c.http.admin_token = TOKEN.into();
        })
        .await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut sub = node.client(&app, &key).await;
    assert_eq!(sub.subscribe("#").await, GRANTED);
    let publisher = node.client(&app, &key).await;
    let dev1 = dev(&app, "dev1");
    let push = |d: &str| format!("v3/{uid}/devices/{d}/down/push");

    // Nobody registered dev1: down/failed device_not_found, nothing queued.
    publisher
        .publish(&push("dev1"), push_body(vec![item(1)]))
        .await;
    let failed = sub.next_on("/devices/dev1/down/failed").await;
    let error = &failed["downlink_failed"]["error"];
    assert_eq!(error["name"], "device_not_found", "{failed}");
    assert_eq!(error["code"], 5, "{failed}");
    assert_eq!(error["message_format"], "end device dev1 not found");
    assert_eq!(failed["downlink_failed"]["downlink"]["f_port"], 1);
    assert!(node.app.queue.list(&dev1).await.unwrap().is_empty());
    // The outcome is counted once the service returns, just after it published the
    // `down/failed` event seen above, so the counter may trail the event briefly.
    let counted = format!(
        "lorabroker_downlinks_total{{tenant=\"{}\",application=\"app1\",outcome=\"device_not_found\"}} 1",
        env.tenant
    );
    eventually("device_not_found counted by reason", WAIT, || async {
        let text = metrics(&node).await;
        if text.contains(&counted) {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;

    // The admin API registers it: the same push is queued.
    let devices = format!("/api/v1/applications/{uid}/devices");
    let add = |id: &str| format!(r#"{{"device_id":"{id}"}}"#);
    assert_eq!(
        request(node.http_addr, "POST", &devices, None, &add("dev1"))
            .await
            .0,
        401
    );
    let (status, body) = request(node.http_addr, "POST", &devices, Some(TOKEN), &add("dev1")).await;
    assert_eq!((status, body.as_str()), (201, r#"{"device_id":"dev1"}"#));
    assert_eq!(
        request(node.http_addr, "POST", &devices, Some(TOKEN), &add("dev1"))
            .await
            .0,
        200
    );
    let (status, body) =
        request(node.http_addr, "POST", &devices, Some(TOKEN), &add("Dev_1")).await;
    assert_eq!(status, 400, "{body}");
    publisher
        .publish(&push("dev1"), push_body(vec![item(2)]))
        .await;
    let queued = sub.next_on("/devices/dev1/down/queued").await;
    assert_eq!(queued["downlink_queued"]["f_port"], 2);
    assert_eq!(node.app.queue.list(&dev1).await.unwrap().len(), 1);

    // The upstream registers the devices it serves.
    node.register_device(&dev(&app, "dev2")).await;
    publisher
        .publish(&push("dev2"), push_body(vec![item(3)]))
        .await;
    assert_eq!(
        sub.next_on("/devices/dev2/down/queued").await["downlink_queued"]["f_port"],
        3
    );
    let (status, body) = request(node.http_addr, "GET", &devices, Some(TOKEN), "").await;
    assert_eq!((status, body.as_str()), (200, r#"["dev1","dev2"]"#));
    let one = format!("{devices}/dev2");
    assert_eq!(
        request(node.http_addr, "GET", &one, Some(TOKEN), "")
            .await
            .0,
        200
    );
    assert_eq!(
        request(
            node.http_addr,
            "GET",
            &format!("{devices}/dev3"),
            Some(TOKEN),
            ""
        )
        .await
        .0,
        404
    );

    // Removed: its queue goes with it, and pushes fail again.
    assert_eq!(
        request(node.http_addr, "DELETE", &one, Some(TOKEN), "")
            .await
            .0,
        204
    );
    assert_eq!(
        request(node.http_addr, "DELETE", &one, Some(TOKEN), "")
            .await
            .0,
        404
    );
    assert!(node
        .app
        .queue
        .list(&dev(&app, "dev2"))
        .await
        .unwrap()
        .is_empty());
    publisher
        .publish(&push("dev2"), push_body(vec![item(4)]))
        .await;
    let failed = sub.next_on("/devices/dev2/down/failed").await;
    assert_eq!(
        failed["downlink_failed"]["error"]["name"],
        "device_not_found"
    );

    // Another application's registration is not this one's.
    let other = env.app("app2");
    node.register_device(&dev(&other, "dev9")).await;
    publisher
        .publish(&push("dev9"), push_body(vec![item(5)]))
        .await;
    let failed = sub.next_on("/devices/dev9/down/failed").await;
    assert_eq!(
        failed["downlink_failed"]["error"]["name"],
        "device_not_found"
    );
}

/// Every message published on `sub` until `marker` (a subject published last).
async fn until_marker(bus: &dyn Bus, sub: &mut Subscription, marker: &str) -> Vec<(String, usize)> {
    bus.publish(marker.to_owned(), "m".into()).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(common::broker::WAIT, sub.next())
            .await
            .expect("the marker arrives")
            .expect("subscription open");
        if msg.subject == marker {
            return seen;
        }
        seen.push((msg.subject, msg.payload.len()));
    }
}

async fn bytes_published_per_byte_received_are_bounded(backend: Backend) {
    let env = TestEnv::new(backend).await;
    // A small application quota, so that a valid request can be refused by it too.
    let node = env
        .node_with(|c| c.downlink.max_application_queue_bytes = 150_000)
        .await;
    let app = env.app("app1");
    let bus: Arc<dyn Bus> = node.app.bus.clone();
    let mut sub = bus.subscribe(app.traffic_subject_filter()).await.unwrap();
    bus.flush().await.unwrap();
    let marker = format!("{}marker", app.subject_prefix());
    let dev1 = dev(&app, "dev1");

    let empty_items = |n: usize| format!("{{\"downlinks\":[{}]}}", vec!["{}"; n].join(","));
    let decoded = |n: usize| json!({"f_port": 1, "decoded_payload": {"v": vec![1e15; n]}});
    let big_decoded = json!({"f_port": 1, "decoded_payload": {"text": "x".repeat(2000)},
        "correlation_ids": vec!["c".repeat(100); 16]});
    let many_ids: Vec<String> = (0..3000).map(|i| format!("app:request:{i:08}")).collect();
    let cases: Vec<(&str, String, bool)> = vec![
        ("65 KB of {} items", empty_items(21_600), false),
        ("16 {} items", empty_items(16), false),
        (
            "one item, 3000 correlation IDs",
            push_body(vec![
                json!({"f_port": 1, "frm_payload": "", "correlation_ids": many_ids}),
            ]),
            false,
        ),
        (
            "deep JSON",
            format!("{{\"downlinks\":{}", "[".repeat(60_000)),
            false,
        ),
        ("not JSON", "x".repeat(60_000), false),
        (
            "60 KB unknown field name",
            push_body(vec![
                json!({"f_port": 1, "frm_payload": "", "k".repeat(60_000): 1}),
            ]),
            false,
        ),
        (
            "17 large valid items",
            push_body(vec![big_decoded.clone(); 17]),
            false,
        ),
        (
            "16 oversized decoded payloads",
            push_body(vec![decoded(250); 16]),
            false,
        ),
        (
            "16 items with every error",
            push_body((0..16).map(|i| json!({"f_port": 224, "n": i})).collect()),
            false,
        ),
        (
            "16 tiny valid items",
            push_body(vec![json!({"f_port": 1, "frm_payload": ""}); 16]),
            true,
        ),
        // 1e15 is stored as 1000000000000000.0: 5 bytes received, 19 stored and published.
        (
            "16 valid items of expanding numbers",
            push_body(vec![decoded(210); 16]).replace("1000000000000000.0", "1e15"),
            true,
        ),
        (
            "15 large valid items",
            push_body(vec![big_decoded.clone(); 15]),
            true,
        ),
        (
            "valid, over the application quota",
            push_body(vec![big_decoded.clone(); 15]),
            false,
        ),
    ];
    let mut worst = 0.0f64;
    for (name, body, accepted) in &cases {
        let received = body.len();
        let result = node
            .app
            .downlinks
            .handle(&dev1, DownlinkOp::Push, body.as_bytes())
            .await;
        assert_eq!(result.is_ok(), *accepted, "{name}: {result:?}");
        let published = until_marker(bus.as_ref(), &mut sub, &marker).await;
        let bytes: usize = published.iter().map(|(_, n)| n).sum();
        let events = published.len();
        if *accepted {
            let items = result.unwrap();
            assert_eq!(events, items, "{name}: one down/queued per item");
            assert!(published.iter().all(|(s, _)| s.ends_with(".down.queued")));
        } else {
            assert_eq!(events, 1, "{name}: one down/failed per rejected request");
            assert!(published[0].0.ends_with(".down.failed"), "{name}");
        }
        let bound = 5 * received + events * MAX_EVENT_ENVELOPE;
        let ratio = bytes as f64 / received as f64;
        eprintln!(
            "{name:<40} received {received:>6} B, published {bytes:>6} B in {events:>2} event(s): \
             {ratio:.2}× (bound {bound} B)"
        );
        assert!(
            bytes <= bound,
            "{name}: {bytes} B published for {received} B received"
        );
        if !accepted {
            worst = worst.max((bytes.saturating_sub(MAX_EVENT_ENVELOPE)) as f64 / received as f64);
        }
    }
    eprintln!("worst rejected request: {worst:.2}× the bytes received, plus one envelope");
}

// ---------------------------------------------------------------------------------------
// The "fill Redis" attack of issue 9, against a real node on real Redis.

/// Redis `used_memory`, in bytes.
async fn used_memory(env: &TestEnv) -> i64 {
    let info: String = env.redis.as_ref().unwrap().query(&["INFO", "memory"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fill_redis_attack_stops_at_the_quotas() {
    const QUOTA: u64 = 4 * 1024 * 1024;
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| {
            c.downlink.require_known_device = true;
            c.downlink.max_application_queue_bytes = QUOTA;
        })
        .await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let devices: Vec<DeviceRef> = (0..16).map(|i| dev(&app, &format!("dev{i}"))).collect();
    for d in &devices {
        node.register_device(d).await;
    }
    node.register_device(&dev(&app, "marker")).await;
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut watcher = node.client(&app, &key).await;
    assert_eq!(
        watcher
            .subscribe(&format!("v3/{uid}/devices/marker/down/queued"))
            .await,
        GRANTED
    );
    let attacker = node.client(&app, &key).await;
    let before = used_memory(&env).await;

    // Pushes of 11 maximal items (~60 KB, just under the packet size), round-robin over
    // the registered devices, and as many to devices nobody registered.
    let big = json!({"f_port": 1, "decoded_payload": {"text": "x".repeat(4000)},
        "correlation_ids": vec!["c".repeat(100); 15]});
    let body = push_body(vec![big; 11]);
    const PUSHES: usize = 200;
    let started = std::time::Instant::now();
    for i in 0..PUSHES {
        let d = &devices[i % devices.len()];
        let topic = format!("v3/{uid}/devices/{}/down/push", d.device);
        attacker.publish(&topic, body.clone()).await;
        let stranger = format!("v3/{uid}/devices/random-{i}/down/push");
        attacker.publish(&stranger, body.clone()).await;
    }
    attacker
        .publish(
            &format!("v3/{uid}/devices/marker/down/push"),
            push_body(vec![item(1)]),
        )
        .await;
    // The session handles publishes in order: the marker's event comes after all of them.
    let mut waited = 0;
    loop {
        match watcher.next().await {
            Some(common::broker::Seen::Publish { topic, .. })
                if topic.ends_with("marker/down/queued") =>
            {
                break
            }
            Some(common::broker::Seen::Closed(why)) => panic!("watcher closed: {why}"),
            _ if waited < 24 => waited += 1,
            _ => panic!("the attack was not processed within two minutes"),
        }
    }
    let took = started.elapsed();
    let after = used_memory(&env).await;

    let usage = node.app.queue.usage(&devices[0]).await.unwrap();
    let sent = (2 * PUSHES * body.len()) as f64 / (1024.0 * 1024.0);
    let grown = (after - before) as f64 / (1024.0 * 1024.0);
    eprintln!(
        "fill-Redis attack: {PUSHES} pushes of {} B to registered devices and {PUSHES} to \
         unregistered ones ({sent:.1} MiB) in {took:?}; application queued {} B (quota \
         {QUOTA} B); Redis used_memory {before} → {after} B (+{grown:.2} MiB; issue 9 saw \
         +0.98 GiB in 8 s)",
        body.len(),
        usage.application_bytes
    );
    assert!(usage.application_bytes <= QUOTA, "{usage:?}");
    assert!(
        usage.application_bytes > QUOTA / 2,
        "the attack did fill the quota: {usage:?}"
    );
    assert!(
        grown < QUOTA as f64 / (1024.0 * 1024.0) * 1.5 + 1.0,
        "Redis grew by {grown:.2} MiB for a {QUOTA} B quota"
    );
    for d in &devices {
        assert!(node.app.queue.usage(d).await.unwrap().device_bytes <= 1024 * 1024);
    }
    let m = metrics(&node).await;
    for outcome in ["application_quota_exceeded", "device_not_found", "queued"] {
        assert!(
            m.contains(&format!("outcome=\"{outcome}\"")),
            "{outcome} counted:\n{m}"
        );
    }
    // Nothing of the unregistered devices was stored.
    let stranger = dev(&app, "random-1");
    assert_eq!(node.app.queue.usage(&stranger).await.unwrap().items, 0);
}

// ---------------------------------------------------------------------------------------
// `lorabroker devices`, as an operator runs it.

async fn devices_cli(env: &TestEnv, args: &[&str]) -> std::process::Output {
    let url = &env.config().redis.url;
    tokio::process::Command::new(env!("CARGO_BIN_EXE_lorabroker"))
        .arg("devices")
        .args(["--redis-url", url])
        .args(args)
        .env("LORABROKER_REDIS__KEY_PREFIX", &env.prefix)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .expect("the lorabroker binary runs")
}

/// Runs `lorabroker devices …`: whether it succeeded, its stdout and its stderr.
async fn run(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = devices_cli(env, args).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stdout, stderr)
}

#[tokio::test]
async fn the_devices_cli_adds_lists_and_removes() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env
        .node_with(|c| c.downlink.require_known_device = true)
        .await;
    let app = env.app("app1");
    let tenant = env.tenant.to_string();
    let scope: &[&str] = &["--app", "app1", "--tenant", tenant.as_str()];
    let (ok, _, stderr) = run(&env, &[&["add"], scope, &["dev2", "dev1"]].concat()).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("registered dev1"), "{stderr}");
    let (ok, stdout, _) = run(&env, &[&["list"], scope].concat()).await;
    assert!(ok);
    assert_eq!(stdout, "dev1\ndev2\n");
    // The node sees the same registry: dev1 takes downlinks now.
    let dev1 = dev(&app, "dev1");
    let body = push_body(vec![item(1)]);
    assert_eq!(
        node.app
            .downlinks
            .handle(&dev1, DownlinkOp::Push, body.as_bytes())
            .await,
        Ok(1)
    );
    let (ok, _, stderr) = run(&env, &[&["remove"], scope, &["dev1"]].concat()).await;
    assert!(ok, "{stderr}");
    assert!(
        node.app.queue.list(&dev1).await.unwrap().is_empty(),
        "its queue is cleared"
    );
    assert_eq!(
        node.app
            .downlinks
            .handle(&dev1, DownlinkOp::Push, body.as_bytes())
            .await
            .unwrap_err()
            .name(),
        "device_not_found"
    );
    let (ok, _, stderr) = run(&env, &[&["remove"], scope, &["dev1"]].concat()).await;
    assert!(!ok && stderr.contains("not registered"), "{stderr}");
    let (ok, _, stderr) = run(&env, &[&["add"], scope, &["Not_An_ID"]].concat()).await;
    assert!(!ok && stderr.contains("Not_An_ID"), "{stderr}");
    let (ok, stdout, _) = run(&env, &[&["list"], scope].concat()).await;
    assert!(ok);
    assert_eq!(stdout, "dev2\n");
}
