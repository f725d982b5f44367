//! Key expiry at its limits (issue 8 point 11, DESIGN §3): a key lives at most 100 years,
//! refused beyond that by the admin API (400 naming `expires_in`) and by `keys create`
//! (`--expires`, exit non-zero), storing nothing; and a record with an absurd expiry
//! written straight into Redis (`u64::MAX` seconds, 300 billion years) never panics a
//! CONNECT, `keys list` or the admin list, and leaks neither the registry entry nor the
//! connection gauge: such a key never expires.

mod common;

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use common::broker::{Backend, TestClient, TestEnv, TestNode, WAIT};
use common::http::request;
use common::services::unique;
use common::wait::eventually;
use lorabroker::auth::{generate, Rights, StoredKey};
use lorabroker::topic::{AppRef, DeviceRef, Event, Id};

const TOKEN: &str = "expiry-admin-token";

fn keys_path(node: &TestNode, app: &AppRef) -> String {
    format!("/api/v1/applications/{}/keys", node.username(app))
}

async fn listed(node: &TestNode, app: &AppRef) -> Vec<Value> {
    let (status, body) = request(
        node.http_addr,
        "GET",
        &keys_path(node, app),
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("a JSON list")
}

#[tokio::test]
async fn the_admin_api_refuses_lifetimes_over_100_years_and_stores_nothing() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node_with(|c| c.http.admin_token = TOKEN.into()).await;
    let app = env.app("app1");
    let path = keys_path(&node, &app);
    for too_long in ["10000y", "101y", "100y 1s"] {
        let body = format!(r#"{{"expires_in":"{too_long}"}}"#);
        let (status, answer) = request(node.http_addr, "POST", &path, Some(TOKEN), &body).await;
        assert_eq!(status, 400, "{too_long}: {answer}");
        let error: Value = serde_json::from_str(&answer).expect("a JSON error");
        let message = error["message"].as_str().expect("an error message");
        assert_eq!(error["code"], "invalid_request");
        assert!(message.starts_with("expires_in: "), "{message}");
        assert!(message.contains("100 years"), "{message}");
    }
    assert_eq!(listed(&node, &app).await, Vec::<Value>::new());

    // The limit itself is allowed, and the key works and is listed with its expiry.
    let (status, answer) = request(
        node.http_addr,
        "POST",
        &path,
        Some(TOKEN),
        r#"{"expires_in":"100y"}"#,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let created: Value = serde_json::from_str(&answer).unwrap();
    let key = created["key"].as_str().unwrap();
    let expires = created["details"]["expires_at"].as_str().unwrap();
    assert!(expires.starts_with("21"), "{expires}");
    TestClient::connect(node.mqtt_addr, &node.username(&app), key, &unique("c"))
        .await
        .expect("a century-long key connects");
    assert_eq!(listed(&node, &app).await.len(), 1);
}

/// Runs the `lorabroker` binary on this environment's Redis and key prefix.
async fn cli(env: &TestEnv, args: &[&str]) -> Output {
    let redis = env.redis.as_ref().expect("the cluster backend has Redis");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_lorabroker"))
        .args(args)
        .args(["--redis-url", &redis.url])
        .env("LORABROKER_REDIS__KEY_PREFIX", &env.prefix)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .expect("the lorabroker binary runs")
}

#[tokio::test]
async fn keys_create_refuses_lifetimes_over_100_years_and_stores_nothing() {
    let env = TestEnv::new(Backend::Cluster).await;
    let tenant = env.tenant.to_string();
    let app = ["--app", "app1", "--tenant", &tenant];
    let out = cli(
        &env,
        &[&["keys", "create", "--expires", "10000y"], &app[..]].concat(),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(out.stdout.is_empty(), "no key printed");
    assert!(stderr.contains("--expires"), "{stderr}");
    assert!(stderr.contains("100 years"), "{stderr}");
    let list = cli(&env, &[&["keys", "list"], &app[..]].concat()).await;
    assert!(list.status.success());
    assert!(
        list.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );

    let out = cli(
        &env,
        &[&["keys", "create", "--expires", "100y"], &app[..]].concat(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_stored_expiries_never_panic_connect_list_or_the_gauge() {
    let env = TestEnv::new(Backend::Cluster).await;
    let node = env.node_with(|c| c.http.admin_token = TOKEN.into()).await;
    let redis = env.redis.as_ref().expect("Redis");
    let app = env.app("app1");
    let uid = node.username(&app);
    let upstream = node.upstream();
    let dev = DeviceRef::new(app.clone(), Id::parse("dev1").unwrap());
    let absurd = [u64::MAX, 300_000_000_000 * 31_557_600];

    let mut keys = Vec::new();
    for expires_at in absurd {
        // Written behind the broker's back, under the documented layout.
        let generated = generate();
        let record = StoredKey::new(
            &generated,
            &app,
            Rights::DEFAULT,
            "absurd",
            Some(expires_at),
        );
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(&expires_at.to_string()), "{json}");
        let record_key = format!("{}:apikey:{}", env.prefix, generated.id);
        let index = format!("{}:apikeys:{}:{}", env.prefix, app.tenant, app.app);
        let () = redis.query(&["SET", &record_key, &json]).await;
        let _: i64 = redis.query(&["SADD", &index, &generated.id]).await;
        keys.push(generated.key);
    }

    for key in &keys {
        // Twice: from the store, then from the cache.
        for _ in 0..2 {
            let mut client = TestClient::connect(node.mqtt_addr, &uid, key, &unique("c"))
                .await
                .expect("a key that never expires connects");
            assert_eq!(
                client.subscribe("#").await,
                rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce)
            );
            upstream
                .publish(&dev, Event::Up, "served".into())
                .await
                .unwrap();
            assert_eq!(client.next_publish().await.1, "served");
            client.client.disconnect().await.unwrap();
            client.expect_closed().await;
            eventually("the connection is unregistered", WAIT, || async {
                match (node.app.registry.len(), node.app.metrics.connections.get()) {
                    (0, 0) => Ok(()),
                    other => Err(other),
                }
            })
            .await;
        }
    }

    // Listed everywhere as never expiring.
    let views = listed(&node, &app).await;
    assert_eq!(views.len(), 2, "{views:?}");
    for v in &views {
        assert_eq!(v["expires_at"], Value::Null, "{v}");
    }
    let tenant = env.tenant.to_string();
    let out = cli(
        &env,
        &["keys", "list", "--app", "app1", "--tenant", &tenant],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["expires_at"], Value::Null, "{v}");
    }
    // The node still serves.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        request(node.http_addr, "GET", "/healthz", None, "").await.0,
        200
    );
}
