//! The HTTP admin API for keys: token checks, create, list (no secrets), revoke — and that
//! the keys it makes and revokes act on real MQTT connections. Run against both backends.

mod common;

use rumqttc::ConnectReturnCode;
use serde_json::Value;

use common::broker::{Backend, TestClient, TestEnv};
use common::http::request;
use common::services::unique;

const TOKEN: &str = "s3cret-admin-token";

async fn admin_api_manages_keys(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node_with(|c| c.http.admin_token = TOKEN.into()).await;
    let app = env.app("app1");
    let uid = node.username(&app);
    let keys = format!("/api/v1/applications/{uid}/keys");

    // Without the token, or with a wrong one: 401, and nothing is created.
    assert_eq!(request(node.http_addr, "GET", &keys, None, "").await.0, 401);
    assert_eq!(
        request(node.http_addr, "GET", &keys, Some("wrong"), "")
            .await
            .0,
        401
    );
    let (status, body) = request(node.http_addr, "POST", &keys, Some("nope"), "{}").await;
    assert_eq!(status, 401, "{body}");

    // Bad requests name the problem.
    let (status, body) = request(
        node.http_addr,
        "POST",
        &keys,
        Some(TOKEN),
        r#"{"rights":["fly"]}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("fly"), "{body}");
    let (status, body) = request(
        node.http_addr,
        "POST",
        &keys,
        Some(TOKEN),
        r#"{"right":[]}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("right"), "{body}");
    let bad_app = "/api/v1/applications/Not_An_Id/keys";
    assert_eq!(
        request(node.http_addr, "GET", bad_app, Some(TOKEN), "")
            .await
            .0,
        400
    );

    // Create: the key is returned once and connects over MQTT.
    let (status, body) = request(
        node.http_addr,
        "POST",
        &keys,
        Some(TOKEN),
        r#"{"rights":["traffic:read"],"name":"dashboard","expires_in":"1h"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("NNSXS."), "{body}");
    let id = key.split('.').nth(1).unwrap().to_owned();
    assert_eq!(created["details"]["id"], id.as_str(), "{body}");
    assert_eq!(created["details"]["name"], "dashboard");
    let mut client = TestClient::connect(node.mqtt_addr, &uid, &key, &unique("c"))
        .await
        .expect("the created key connects");

    // List shows the key and never its secret.
    let (status, body) = request(node.http_addr, "GET", &keys, Some(TOKEN), "").await;
    assert_eq!(status, 200);
    let secret = key.rsplit('.').next().unwrap();
    assert!(body.contains(&id), "{body}");
    assert!(!body.contains(secret), "list leaks the secret: {body}");
    assert!(!body.contains(&key), "list leaks the key: {body}");

    // Revoke: the connected client is closed and the key no longer connects.
    let revoke = format!("/api/v1/keys/{id}");
    assert_eq!(
        request(node.http_addr, "DELETE", &revoke, Some(TOKEN), "")
            .await
            .0,
        204
    );
    client.expect_closed().await;
    let refused = TestClient::connect(node.mqtt_addr, &uid, &key, &unique("c")).await;
    assert_eq!(refused.err(), Some(ConnectReturnCode::NotAuthorized));
    assert_eq!(
        request(node.http_addr, "DELETE", &revoke, Some(TOKEN), "")
            .await
            .0,
        404
    );
}

async fn admin_api_is_off_without_a_token(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let node = env.node().await;
    let uid = node.username(&env.app("app1"));
    let path = format!("/api/v1/applications/{uid}/keys");
    assert_eq!(
        request(node.http_addr, "GET", &path, Some(""), "").await.0,
        404
    );
    assert_eq!(
        request(node.http_addr, "POST", &path, None, "{}").await.0,
        404
    );
}

mod embedded {
    use super::*;

    #[tokio::test]
    async fn manages_keys() {
        admin_api_manages_keys(Backend::Embedded).await;
    }

    #[tokio::test]
    async fn off_without_a_token() {
        admin_api_is_off_without_a_token(Backend::Embedded).await;
    }
}

mod cluster {
    use super::*;

    #[tokio::test]
    async fn manages_keys() {
        admin_api_manages_keys(Backend::Cluster).await;
    }

    #[tokio::test]
    async fn off_without_a_token() {
        admin_api_is_off_without_a_token(Backend::Cluster).await;
    }
}
