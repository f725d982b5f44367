//! Live events and the application-scoped API (issue 12, backend): an SSE stream on one
//! node sees what happens on another (connect, a refused connect in The Things Stack's
//! words, a revocation's disconnect); who may use the application routes (the admin token,
//! a key of the application with RIGHT_APPLICATION_SETTINGS_API_KEYS) and the JSON error
//! shape; self-service key management; and the bounds (event rate, stream counts).

mod common;

use rumqttc::ConnectReturnCode;
use serde_json::Value;

use common::broker::{Backend, TestClient, TestEnv};
use common::http::request;
use common::services::unique;
use common::sse::Sse;
use lorabroker::auth::{generate, Rights};

const TOKEN: &str = "events-admin-token";

fn key_id(key: &str) -> String {
    key.split('.')
        .nth(1)
        .expect("NNSXS.<id>.<secret>")
        .to_owned()
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn a_stream_on_one_node_sees_connects_refusals_and_revocations_on_another() {
    let env = TestEnv::new(Backend::Cluster).await;
    // The application quota on: its counts in Redis are the cluster-wide connections.
    let config = |c: &mut lorabroker::config::Config| {
        c.http.admin_token = TOKEN.into();
        c.limits.max_connections_per_application = 100;
    };
    let a = env.node_with(config).await;
    let b = env.node_with(config).await;
    let app = env.app("app1");
    let uid = a.username(&app);
    let mut events = Sse::open(
        a.http_addr,
        &format!("/api/v1/applications/{uid}/events"),
        TOKEN,
    )
    .await;
    assert_eq!(events.status, 200);

    // A client connects to node B: node A's stream sees it, with its key ID.
    let key = b.key(&app, Rights::ALL).await;
    let id = key_id(&key);
    let client_id = unique("c");
    let mut client = TestClient::connect(b.mqtt_addr, &uid, &key, &client_id)
        .await
        .expect("connects");
    let connect = events
        .event("as.mqtt.connect", |e| {
            e["data"]["client_id"] == client_id.as_str()
        })
        .await;
    assert_eq!(connect["data"]["key_id"], id.as_str(), "{connect}");
    assert_eq!(connect["data"]["transport"], "tcp");
    assert_eq!(connect["data"]["node"], b.app.node_id.as_str());
    assert_eq!(connect["data"]["tenant_id"], env.tenant.as_str());
    assert!(connect["data"]["remote_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(
        connect["identifiers"][0]["application_ids"]["application_id"],
        "app1"
    );
    assert_eq!(connect["origin"], "test");
    let (status, body) = request(
        a.http_addr,
        "GET",
        &format!("/api/v1/applications/{uid}/stats"),
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json(&body)["connections"],
        1,
        "node B's client, seen from A: {body}"
    );

    // A key that does not exist: The Things Stack's words.
    let unknown = generate().key;
    let refused = TestClient::connect(b.mqtt_addr, &uid, &unknown, &unique("bad")).await;
    assert_eq!(refused.err(), Some(ConnectReturnCode::NotAuthorized));
    let fail = events.event("as.mqtt.connect.fail", |_| true).await;
    assert_eq!(
        fail["data"]["error"],
        format!("api key with id {} not found", key_id(&unknown)).as_str(),
        "{fail}"
    );

    // Revoked through the application's route on node A: the client on B is closed, and
    // the stream says why.
    let (status, body) = request(
        a.http_addr,
        "DELETE",
        &format!("/api/v1/applications/{uid}/keys/{id}"),
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, 204, "{body}");
    client.expect_closed().await;
    let gone = events
        .event("as.mqtt.disconnect", |e| {
            e["data"]["client_id"] == client_id.as_str()
        })
        .await;
    assert_eq!(gone["data"]["reason"], "revoked", "{gone}");
    assert_eq!(gone["data"]["key_id"], id.as_str());

    // Node B drains: its clients' disconnects say so, on node A's stream.
    let key = b.key(&app, Rights::LINK).await;
    let client_id = unique("d");
    let _client = TestClient::connect(b.mqtt_addr, &uid, &key, &client_id)
        .await
        .expect("connects");
    events
        .event("as.mqtt.connect", |e| {
            e["data"]["client_id"] == client_id.as_str()
        })
        .await;
    b.shutdown().await;
    let drained = events
        .event("as.mqtt.disconnect", |e| {
            e["data"]["client_id"] == client_id.as_str()
        })
        .await;
    assert_eq!(drained["data"]["reason"], "drain", "{drained}");
    drop(events);
    a.shutdown().await;
}

#[tokio::test]
async fn the_application_routes_take_the_admin_token_or_a_key_with_the_settings_right() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node_with(|c| c.http.admin_token = TOKEN.into()).await;
    let (app1, app2) = (env.app("app1"), env.app("app2"));
    let (uid1, uid2) = (node.username(&app1), node.username(&app2));
    let settings = Rights::SETTINGS_API_KEYS.union(Rights::LINK);
    let manager = node.key(&app1, settings).await;
    let plain = node.key(&app1, Rights::LINK).await;
    let other = node.key(&app2, Rights::ALL).await;
    let keys1 = format!("/api/v1/applications/{uid1}/keys");
    let keys2 = format!("/api/v1/applications/{uid2}/keys");
    let addr = node.http_addr;

    assert_eq!(request(addr, "GET", &keys1, Some(TOKEN), "").await.0, 200);
    assert_eq!(
        request(addr, "GET", &keys1, Some(&manager), "").await.0,
        200
    );
    for (token, path, status, code) in [
        (plain.as_str(), &keys1, 403, "forbidden"),
        (manager.as_str(), &keys2, 403, "forbidden"),
        (other.as_str(), &keys1, 403, "forbidden"),
        ("wrong-token", &keys1, 401, "unauthenticated"),
    ] {
        let (s, body) = request(addr, "GET", path, Some(token), "").await;
        assert_eq!(s, status, "{path}: {body}");
        let error = json(&body);
        assert_eq!(error["code"], code, "{body}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let unknown = generate().key;
    let (s, body) = request(addr, "GET", &keys1, Some(&unknown), "").await;
    assert_eq!(s, 401, "{body}");
    assert_eq!(json(&body)["code"], "unauthenticated");
    assert!(body.contains("not found"), "{body}");
    let (s, body) = request(addr, "GET", &keys1, None, "").await;
    assert_eq!(
        (s, json(&body)["code"].clone()),
        (401, "unauthenticated".into())
    );

    // The settings right carries no MQTT traffic right.
    let settings_only = node.key(&app1, Rights::SETTINGS_API_KEYS).await;
    let refused = TestClient::connect(node.mqtt_addr, &uid1, &settings_only, &unique("c")).await;
    assert_eq!(refused.err(), Some(ConnectReturnCode::NotAuthorized));
    assert_eq!(
        request(addr, "GET", &keys1, Some(&settings_only), "")
            .await
            .0,
        200
    );

    // Device routes and revocation by ID stay the operator's.
    let devices = format!("/api/v1/applications/{uid1}/devices");
    let (s, body) = request(addr, "GET", &devices, Some(&manager), "").await;
    assert_eq!(
        (s, json(&body)["code"].clone()),
        (403, "forbidden".into()),
        "{body}"
    );
    let by_id = format!("/api/v1/keys/{}", key_id(&plain));
    assert_eq!(
        request(addr, "DELETE", &by_id, Some(&manager), "").await.0,
        403
    );

    // No credentials in URLs.
    let (s, body) = request(addr, "GET", &format!("{keys1}?token={TOKEN}"), None, "").await;
    assert_eq!(
        (s, json(&body)["code"].clone()),
        (400, "invalid_request".into()),
        "{body}"
    );

    // Who am I.
    let (s, body) = request(addr, "GET", "/api/v1/whoami", Some(TOKEN), "").await;
    assert_eq!(
        (s, json(&body)),
        (200, serde_json::json!({"operator": true}))
    );
    let (s, body) = request(addr, "GET", "/api/v1/whoami", Some(&manager), "").await;
    assert_eq!(s, 200, "{body}");
    let me = json(&body);
    assert_eq!(me["operator"], false);
    assert_eq!(me["application"], uid1.as_str());
    assert_eq!(me["key_id"], key_id(&manager).as_str());
    assert_eq!(
        me["rights"],
        serde_json::json!([
            "RIGHT_APPLICATION_LINK",
            "RIGHT_APPLICATION_SETTINGS_API_KEYS"
        ])
    );

    // Self-service: create (only rights the key holds), list, and revoke its own keys.
    let (s, body) = request(
        addr,
        "POST",
        &keys1,
        Some(&manager),
        r#"{"rights":["all"]}"#,
    )
    .await;
    assert_eq!(
        (s, json(&body)["code"].clone()),
        (403, "forbidden".into()),
        "{body}"
    );
    let (s, body) = request(
        addr,
        "POST",
        &keys1,
        Some(&manager),
        r#"{"rights":["traffic:read"],"name":"self-made"}"#,
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let made = json(&body)["key"].as_str().unwrap().to_owned();
    let mut client = TestClient::connect(node.mqtt_addr, &uid1, &made, &unique("c"))
        .await
        .expect("the self-made key connects");
    let (s, body) = request(addr, "GET", &keys1, Some(&manager), "").await;
    assert_eq!(s, 200);
    assert!(
        body.contains(&key_id(&made)) && !body.contains(&made),
        "{body}"
    );
    let other_by_app1 = format!("{keys1}/{}", key_id(&other));
    let (s, body) = request(addr, "DELETE", &other_by_app1, Some(TOKEN), "").await;
    assert_eq!(
        (s, json(&body)["code"].clone()),
        (404, "not_found".into()),
        "{body}"
    );
    let own = format!("{keys1}/{}", key_id(&made));
    assert_eq!(
        request(addr, "DELETE", &own, Some(&manager), "").await.0,
        204
    );
    client.expect_closed().await;
    assert_eq!(
        request(addr, "DELETE", &own, Some(&manager), "").await.0,
        404
    );

    // Events and stats take the same access.
    let stats = format!("/api/v1/applications/{uid1}/stats");
    let (s, body) = request(addr, "GET", &stats, Some(&manager), "").await;
    assert_eq!(s, 200, "{body}");
    let stats = json(&body);
    for field in ["connections", "messages_in", "messages_out", "dropped"] {
        assert!(stats[field].is_u64(), "{field}: {body}");
    }
    let events = format!("/api/v1/applications/{uid1}/events");
    assert_eq!(Sse::open(addr, &events, &manager).await.status, 200);
    let refused = Sse::open(addr, &events, &plain).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.error_body().await["code"], "forbidden");

    // Unknown API paths and methods answer with the same shape.
    let (s, body) = request(addr, "GET", "/api/v1/nothing", Some(TOKEN), "").await;
    assert_eq!((s, json(&body)["code"].clone()), (404, "not_found".into()));
    let (s, body) = request(addr, "PUT", &keys1, Some(TOKEN), "").await;
    assert_eq!(s, 405, "{body}");
    assert_eq!(json(&body)["code"], "method_not_allowed");
    node.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_refused_connects_is_rate_limited_and_streams_are_bounded() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env
        .node_with(|c| {
            c.http.admin_token = TOKEN.into();
            c.events.per_application_per_second = 1.0;
            c.events.per_application_burst = 2;
            c.events.max_streams = 2;
            c.events.max_streams_per_application = 1;
        })
        .await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let path = |uid: &str| format!("/api/v1/applications/{uid}/events");
    let mut events = Sse::open(node.http_addr, &path(&uid), TOKEN).await;
    assert_eq!(events.status, 200);

    for _ in 0..20 {
        let refused =
            TestClient::connect(node.mqtt_addr, &uid, &generate().key, &unique("f")).await;
        assert_eq!(refused.err(), Some(ConnectReturnCode::NotAuthorized));
    }
    let fail = events.event("as.mqtt.connect.fail", |_| true).await;
    assert!(fail["data"]["error"]
        .as_str()
        .unwrap()
        .ends_with("not found"));
    let (_, metrics) = request(node.http_addr, "GET", "/metrics", None, "").await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"lorabroker_events_dropped_total{reason="rate_limited"} "#))
        .expect("rate-limited events are counted")
        .parse()
        .unwrap();
    assert!(dropped >= 10, "{dropped} dropped of 20 at a burst of 2");

    // One stream per application, two per node.
    let second = Sse::open(node.http_addr, &path(&uid), TOKEN).await;
    assert_eq!(second.status, 429);
    assert_eq!(second.error_body().await["code"], "too_many_requests");
    let other = Sse::open(
        node.http_addr,
        &path(&node.username(&env.app("app2"))),
        TOKEN,
    )
    .await;
    assert_eq!(other.status, 200);
    let third = Sse::open(
        node.http_addr,
        &path(&node.username(&env.app("app3"))),
        TOKEN,
    )
    .await;
    assert_eq!(third.status, 503);
    assert_eq!(third.error_body().await["code"], "unavailable");
    // Streams end with the node (they would otherwise hold its HTTP connections).
    let mut other = other;
    tokio::time::timeout(std::time::Duration::from_secs(10), node.shutdown())
        .await
        .expect("the node stops with streams open");
    events.expect_end().await;
    other.expect_end().await;
}

#[tokio::test]
async fn wrong_keys_over_http_count_towards_the_failed_login_limit_of_the_address() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env
        .node_with(|c| {
            c.http.admin_token = TOKEN.into();
            c.limits.failed_connects_per_ip = lorabroker::limits::Rate::new(0.01, 3);
        })
        .await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let good = node.key(&app, Rights::SETTINGS_API_KEYS).await;
    let keys = format!("/api/v1/applications/{uid}/keys");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (s, _) = request(node.http_addr, "GET", &keys, Some(&generate().key), "").await;
        statuses.push(s);
    }
    // The failure past the burst of 3 starts the cool-down (as over MQTT).
    assert_eq!(statuses, [401, 401, 401, 401, 429]);
    // The address is refused for the cool-down, even with a good key (as over MQTT) …
    let (s, body) = request(node.http_addr, "GET", &keys, Some(&good), "").await;
    assert_eq!(
        (s, json(&body)["code"].clone()),
        (429, "too_many_requests".into())
    );
    let refused = TestClient::connect(node.mqtt_addr, &uid, &good, &unique("c")).await;
    assert_eq!(refused.err(), Some(ConnectReturnCode::NotAuthorized));
    // … but not the operator, whose token is not an API key.
    assert_eq!(
        request(node.http_addr, "GET", &keys, Some(TOKEN), "")
            .await
            .0,
        200
    );
    node.shutdown().await;
}

#[tokio::test]
async fn uplinks_are_sampled_downlinks_reported_and_messages_counted() {
    use lorabroker::topic::{DeviceRef, Event, Id};
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node_with(|c| c.http.admin_token = TOKEN.into()).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let mut events = Sse::open(
        node.http_addr,
        &format!("/api/v1/applications/{uid}/events?names=as.up,as.down"),
        TOKEN,
    )
    .await;
    let key = node.key(&app, Rights::LINK).await;
    let mut client = node.client(&app, &key).await;
    client.subscribe(&format!("v3/{uid}/devices/+/up")).await;
    let device = DeviceRef::new(app.clone(), Id::parse("dev1").unwrap());
    let uplink = r#"{"uplink_message":{"f_port":1}}"#;
    node.upstream()
        .publish(&device, Event::Up, uplink.into())
        .await
        .unwrap();
    client.next_on("/up").await;
    let sample = events.event("as.up.sample", |_| true).await;
    assert_eq!(sample["data"]["device_id"], "dev1");
    assert_eq!(sample["data"]["size"], uplink.len());
    assert!(
        sample["data"].get("frm_payload").is_none()
            && !sample.to_string().contains("uplink_message")
    );

    client
        .publish(
            &format!("v3/{uid}/devices/dev1/down/push"),
            r#"{"downlinks":[{"f_port":1,"frm_payload":"AQ=="}]}"#,
        )
        .await;
    let queued = events.event("as.down.queued", |_| true).await;
    assert_eq!(queued["data"]["device_id"], "dev1");
    assert_eq!(
        queued["data"]["summary"], "1 downlink(s) pushed",
        "{queued}"
    );
    client
        .publish(&format!("v3/{uid}/devices/dev1/down/push"), "not json")
        .await;
    let failed = events.event("as.down.failed", |_| true).await;
    assert!(
        failed["data"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("invalid"),
        "{failed}"
    );

    let (s, body) = request(
        node.http_addr,
        "GET",
        &format!("/api/v1/applications/{uid}/stats"),
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        json(&body),
        serde_json::json!({"connections": 1, "messages_in": 2, "messages_out": 1, "dropped": 0})
    );
    node.shutdown().await;
}
