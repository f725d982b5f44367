//! `docs/upstream.md` checked against the code, block by block (the blocks are read from
//! the file, see `tests/common/doc.rs`), on a node with a real NATS and a real Redis:
//!
//! - every event example (`json v3.…` blocks) is a document of the documented envelope
//!   for the device and event of its subject, every event has one, and published on NATS
//!   it reaches an MQTT subscriber on the documented topic byte for byte, in publish
//!   order, while the subjects the document says nodes ignore are ignored; the downlink
//!   examples carry the queued item's correlation IDs as the document says;
//! - single-tenant mode: subjects carry `tenancy.default_tenant`, topics only `{app}`;
//! - the registry commands and the pop script command (`sh redis` blocks) do what the
//!   document says, and the stored item is the `json queue-item` block;
//! - the pop script's guarantees when workers race for one device.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use common::broker::{Backend, TestEnv, TestNode};
use common::doc::{blocks_tagged, event_example, upstream_doc_blocks, Block};
use common::shell::{correlation_ids, require};
use lorabroker::auth::Rights;
use lorabroker::bus::{Bus, NatsBus};
use lorabroker::topic::{parse_subject_rest, DeviceRef, Event, Id};

/// The document field of each event (docs/upstream.md, "NATS subjects").
fn field(event: Event) -> &'static str {
    match event {
        Event::Join => "join_accept",
        Event::Up => "uplink_message",
        Event::UpNormalized => "uplink_normalized",
        Event::DownQueued => "downlink_queued",
        Event::DownSent => "downlink_sent",
        Event::DownAck => "downlink_ack",
        Event::DownNack => "downlink_nack",
        Event::DownFailed => "downlink_failed",
        Event::DownInvalidated => "downlink_queue_invalidated",
        Event::ServiceData => "service_data",
        Event::LocationSolved => "location_solved",
    }
}

/// The event examples, in document order, with the event of their subject.
fn event_examples() -> Vec<(Block, String, Event)> {
    upstream_doc_blocks()
        .into_iter()
        .filter_map(|b| {
            let subject = b.info.strip_prefix("json v3.")?.to_owned();
            let rest = subject
                .strip_prefix("tenant1.app1.")
                .unwrap_or_else(|| panic!("line {}: examples are of tenant1/app1", b.line));
            let parsed = parse_subject_rest(rest)
                .unwrap_or_else(|| panic!("line {}: v3.{subject} is no device event", b.line));
            assert_eq!(parsed.device, "dev1", "line {}", b.line);
            let event = parsed.event;
            Some((b, format!("v3.{subject}"), event))
        })
        .collect()
}

/// The downlink events carry the queued item's correlation IDs, in order, at the start of
/// their top-level IDs and inside their body.
fn assert_carried_over(doc: &Value, event: Event, item_ids: &[String]) {
    let top = correlation_ids(&doc["correlation_ids"]);
    assert_eq!(&top[..item_ids.len()], item_ids, "{event:?}: {doc}");
    let body = &doc[field(event)];
    let items: Vec<&Value> = match event {
        Event::DownFailed => vec![&body["downlink"]],
        Event::DownInvalidated => body["downlinks"].as_array().unwrap().iter().collect(),
        _ => vec![body],
    };
    for item in items {
        assert_eq!(
            correlation_ids(&item["correlation_ids"]),
            item_ids,
            "{event:?}: {doc}"
        );
    }
}

#[test]
fn every_event_has_one_example_with_the_documented_envelope() {
    let examples = event_examples();
    let events: Vec<Event> = examples.iter().map(|(_, _, e)| *e).collect();
    assert_eq!(
        events
            .iter()
            .copied()
            .collect::<std::collections::HashSet<_>>(),
        Event::ALL.into_iter().collect(),
        "one example per event"
    );
    assert_eq!(events.len(), Event::ALL.len(), "one example per event");
    let queued = event_example("v3.tenant1.app1.devices.dev1.down.queued");
    let item_ids = correlation_ids(&queued["downlink_queued"]["correlation_ids"]);
    assert!(item_ids.last().unwrap().starts_with("as:downlink:"));
    for (block, _, event) in examples {
        let doc = block.json();
        let at = format!("docs/upstream.md:{}", block.line);
        let ids = &doc["end_device_ids"];
        assert_eq!(ids["device_id"], "dev1", "{at}");
        assert_eq!(ids["application_ids"]["application_id"], "app1", "{at}");
        if event != Event::DownQueued {
            for eui in ["dev_eui", "join_eui"] {
                let v = ids[eui].as_str().unwrap_or_default();
                assert!(
                    v.len() == 16 && v.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{at}: {eui}"
                );
            }
            assert_eq!(ids["dev_addr"].as_str().map(str::len), Some(8), "{at}");
        }
        let cids = correlation_ids(&doc["correlation_ids"]);
        assert!(!cids.is_empty(), "{at}: correlation_ids");
        let received = doc["received_at"].as_str().expect("received_at");
        humantime::parse_rfc3339(received).unwrap_or_else(|e| panic!("{at}: {e}"));
        let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "end_device_ids",
                "correlation_ids",
                "received_at",
                field(event)
            ],
            "{at}"
        );
        if matches!(
            event,
            Event::DownQueued
                | Event::DownSent
                | Event::DownAck
                | Event::DownNack
                | Event::DownFailed
                | Event::DownInvalidated
        ) {
            assert_carried_over(&doc, event, &item_ids);
        }
    }
    // down/sent, ack and nack share one body: the item plus session and frame counter.
    let sent = event_example("v3.tenant1.app1.devices.dev1.down.sent");
    for (subject, f) in [("down.ack", "downlink_ack"), ("down.nack", "downlink_nack")] {
        let doc = event_example(&format!("v3.tenant1.app1.devices.dev1.{subject}"));
        assert_eq!(doc[f], sent["downlink_sent"], "{subject}");
    }
    let mut body = sent["downlink_sent"].as_object().unwrap().clone();
    body.remove("session_key_id");
    body.remove("f_cnt");
    assert_eq!(Value::Object(body), queued["downlink_queued"]);
}

/// Publishes every example on NATS (with this test's tenant) and checks what an MQTT
/// subscriber on a node gets.
async fn route_examples(node: &TestNode, nats_url: &str, tenant: &Id, topic_app: &str) {
    let app = lorabroker::topic::AppRef::new(tenant.clone(), Id::parse("app1").unwrap());
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut client = node.client(&app, &key).await;
    assert_eq!(
        client.subscribe("#").await,
        rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce)
    );
    let bus = NatsBus::connect(nats_url, "upstream-doc-test")
        .await
        .expect("NATS URL");
    let subject = |s: &str| s.replacen("v3.tenant1.", &format!("v3.{tenant}."), 1);
    // What the document says nodes ignore, between the real events.
    let ignored = [
        "v3.tenant1.app1.devices.dev1.down.push",
        "v3.tenant1.app1.devices.dev1.foo",
        "v3.tenant1.app1.gateways.gw1.up",
        "v3.tenant1.app1.devices.DEV1.up",
    ];
    let examples = event_examples();
    for (i, (block, s, _)) in examples.iter().enumerate() {
        let junk = ignored[i % ignored.len()];
        bus.publish(subject(junk), Bytes::from_static(b"{}"))
            .await
            .unwrap();
        bus.publish(subject(s), Bytes::from(block.text.clone()))
            .await
            .unwrap();
    }
    bus.flush().await.unwrap();
    for (block, _, event) in &examples {
        let (topic, payload) = client.next_publish().await;
        assert_eq!(
            topic,
            format!("v3/{topic_app}/devices/dev1/{}", event.topic_suffix()),
            "docs/upstream.md:{}",
            block.line
        );
        assert_eq!(
            payload,
            block.text.as_bytes(),
            "docs/upstream.md:{}: the bytes arrive unchanged",
            block.line
        );
    }
    client
        .expect_silence(std::time::Duration::from_millis(300))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_published_on_nats_reach_mqtt_unchanged_and_in_order() {
    let env = TestEnv::new(Backend::Cluster).await;
    let nats = env.nats.as_ref().unwrap().url.clone();
    let node = env.node().await;
    route_examples(&node, &nats, &env.tenant, &format!("app1@{}", env.tenant)).await;
    node.shutdown().await;

    // Single-tenant mode: the subject carries the default tenant, the topic only the app.
    let single = env
        .node_with(|c| {
            c.tenancy.mode = "single".into();
            c.tenancy.default_tenant = env.tenant.to_string();
        })
        .await;
    route_examples(&single, &nats, &env.tenant, "app1").await;
    single.shutdown().await;
}

/// A `sh redis` line of the document, for this test's Redis, key prefix and tenant.
fn redis_cli(line: &str, url: &str, prefix: &str, tenant: &Id) -> String {
    let line = line.replace(
        "lorabroker:{t:tenant1}",
        &format!("{prefix}:{{t:{tenant}}}"),
    );
    let line = line.replacen("redis-cli ", &format!("redis-cli -u {url} "), 1);
    assert!(line.starts_with("redis-cli -u "), "{line}");
    line
}

async fn sh(command: &str) -> String {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .await
        .expect("sh runs");
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_queue_item_and_pop_script_work_as_documented() {
    require("redis-cli");
    let env = TestEnv::new(Backend::Cluster).await;
    let redis = env.redis.as_ref().unwrap();
    let node = env
        .node_with(|c| c.downlink.require_known_device = true)
        .await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut client = node.client(&app, &key).await;
    client.subscribe("#").await;
    let uid = node.username(&app);

    let blocks = blocks_tagged("sh redis");
    assert_eq!(blocks.len(), 2, "the registry and the pop script blocks");
    // The registry: SADD dev1 dev2, SREM dev2.
    for line in blocks[0].text.lines() {
        sh(&redis_cli(line, &redis.url, &env.prefix, &env.tenant)).await;
    }
    let dev = |d: &str| DeviceRef::new(app.clone(), Id::parse(d).unwrap());
    assert!(node.app.devices.contains(&dev("dev1")).await.unwrap());
    assert!(!node.app.devices.contains(&dev("dev2")).await.unwrap());
    let seed = r#"{"downlinks":[{"f_port":15,"frm_payload":"vu8=","priority":"HIGH","confirmed":true,"correlation_ids":["my-correlation-id"]}]}"#;
    client
        .publish(&format!("v3/{uid}/devices/dev2/down/push"), seed)
        .await;
    let failed = client.next_on("/devices/dev2/down/failed").await;
    assert_eq!(
        failed["downlink_failed"]["error"]["name"], "device_not_found",
        "{failed}"
    );
    assert_eq!(failed["downlink_failed"]["error"]["code"], 5, "{failed}");

    // The seed's push to dev1 is stored as the queue-item block says.
    client
        .publish(&format!("v3/{uid}/devices/dev1/down/push"), seed)
        .await;
    let queued = client.next_on("/devices/dev1/down/queued").await;
    let list = format!("{}:{{t:{}}}:down:app1:dev1", env.prefix, env.tenant);
    let stored: Vec<String> = redis.query(&["LRANGE", &list, "0", "-1"]).await;
    assert_eq!(stored.len(), 1);
    let server_id = correlation_ids(&queued["correlation_ids"])
        .pop()
        .expect("the server's ID");
    assert!(server_id.starts_with("as:downlink:"), "{queued}");
    let ulid = server_id.trim_start_matches("as:downlink:");
    assert!(ulid.parse::<ulid::Ulid>().is_ok(), "{server_id}");
    let example = blocks_tagged("json queue-item");
    assert_eq!(example.len(), 1);
    let example_text = example[0].text.trim();
    let example_id = correlation_ids(&example[0].json()["correlation_ids"])
        .pop()
        .unwrap();
    assert_eq!(
        stored[0],
        example_text.replace(&example_id, &server_id),
        "stored byte for byte as the example"
    );
    assert_eq!(queued["downlink_queued"].to_string(), stored[0]);

    // The pop script, as the document runs it: the item, then nil; the counters are gone.
    let pop = redis_cli(blocks[1].text.trim(), &redis.url, &env.prefix, &env.tenant);
    assert_eq!(sh(&pop).await.trim_end(), stored[0]);
    assert_eq!(sh(&pop).await.trim(), "");
    let quota = format!("{}:{{t:{}}}:quota", env.prefix, env.tenant);
    let counters: Vec<String> = redis.query(&["HGETALL", &quota]).await;
    assert!(counters.is_empty(), "{counters:?}");
    node.shutdown().await;
}

/// The script the document describes: prelude.lua, a newline, pop.lua.
fn pop_script() -> redis::Script {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/downlink/lua");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("the Lua file");
    redis::Script::new(&format!("{}\n{}", read("prelude.lua"), read("pop.lua")))
}

/// One worker: a connection of its own that takes items until the queue is empty.
async fn drain(url: String, keys: [String; 3], dev: String) -> Vec<usize> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let script = pop_script();
    let mut taken = Vec::new();
    loop {
        let item: Option<String> = script
            .key(&keys[0])
            .key(&keys[1])
            .key(&keys[2])
            .arg("app1")
            .arg(format!("app1:{dev}"))
            .invoke_async(&mut conn)
            .await
            .unwrap();
        let Some(item) = item else { return taken };
        let doc: Value = serde_json::from_str(&item).unwrap();
        taken.push(doc["f_port"].as_u64().unwrap() as usize);
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_workers_each_take_distinct_items_oldest_first() {
    let env = TestEnv::new(Backend::Cluster).await;
    let url = env.redis.as_ref().unwrap().url.clone();
    let node = env.node().await;
    let app = env.app("app1");
    let scope = format!("{}:{{t:{}}}", env.prefix, env.tenant);
    let keys = |dev: &str| {
        [
            format!("{scope}:down:app1:{dev}"),
            format!("{scope}:quota"),
            format!("{scope}:queues"),
        ]
    };
    let queue = node.app.queue.clone();
    let item = |i: usize| {
        format!(r#"{{"f_port":{i},"frm_payload":"AQ==","correlation_ids":["as:downlink:{i}"]}}"#)
    };

    // 200 items, 8 workers: every item to exactly one, each worker's in queue order.
    let dev1 = DeviceRef::new(app.clone(), Id::parse("dev1").unwrap());
    let items: Vec<String> = (1..=200).map(item).collect();
    queue.push(&dev1, &items).await.unwrap();
    let workers: Vec<_> = (0..8)
        .map(|_| tokio::spawn(drain(url.clone(), keys("dev1"), "dev1".into())))
        .collect();
    let mut all = Vec::new();
    for w in workers {
        let taken = w.await.unwrap();
        assert!(taken.windows(2).all(|p| p[0] < p[1]), "{taken:?}");
        all.extend(taken);
    }
    assert_eq!(all.len(), 200, "no item twice");
    assert_eq!(
        all.into_iter().collect::<BTreeSet<_>>(),
        (1..=200).collect(),
        "none lost"
    );

    // Three items, four workers calling once at the same time: three items and one nil.
    let dev2 = DeviceRef::new(app.clone(), Id::parse("dev2").unwrap());
    let items: Vec<String> = (1..=3).map(item).collect();
    queue.push(&dev2, &items).await.unwrap();
    let script = Arc::new(pop_script());
    let once = |script: Arc<redis::Script>| {
        let (url, keys) = (url.clone(), keys("dev2"));
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let item: Option<String> = script
                .key(&keys[0])
                .key(&keys[1])
                .key(&keys[2])
                .arg("app1")
                .arg("app1:dev2")
                .invoke_async(&mut conn)
                .await
                .unwrap();
            item
        }
    };
    let results = futures::future::join_all((0..4).map(|_| tokio::spawn(once(script.clone()))))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
    let mut got: Vec<String> = results.iter().flatten().cloned().collect();
    got.sort();
    let mut want = items.clone();
    want.sort();
    assert_eq!(got, want, "{results:?}");
    assert_eq!(results.iter().filter(|r| r.is_none()).count(), 1);

    // The counters equal the bytes still queued: nothing.
    let usage = queue.usage(&dev1).await.unwrap();
    assert_eq!(
        (
            usage.items,
            usage.device_bytes,
            usage.application_bytes,
            usage.tenant_bytes
        ),
        (0, 0, 0, 0)
    );
    node.shutdown().await;
}
