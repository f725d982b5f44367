//! The HTTP surface of a node (DESIGN §8): `/healthz` (alive), `/readyz` (backends
//! reachable, not draining), `/metrics` (Prometheus) and the admin API for keys, behind a
//! bearer token (disabled when `http.admin_token` is empty).
//!
//! Admin API:
//! - `POST /api/v1/applications/{app}/keys` `{"rights":[…],"name":"…","expires_in":"30d"}`
//!   → 201 with the key (shown once); `expires_in` at most `100y` (400 beyond)
//! - `GET /api/v1/applications/{app}/keys` → the application's keys, never secrets
//! - `DELETE /api/v1/keys/{id}` → 204, cluster-wide revocation; 404 if unknown
//!
//! `{app}` is written as in usernames: `{app}@{tenant}` or `{app}`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::auth::{create_key, CreateKeyError, KeyView, Rights};
use crate::cluster::revoke_key;

/// Serves HTTP on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) {
    let result = axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// The HTTP routes of a node.
pub fn router(app: Arc<App>) -> Router {
    let admin = Router::new()
        .route(
            "/api/v1/applications/{app}/keys",
            get(list_keys).post(create),
        )
        .route("/api/v1/keys/{id}", delete(revoke))
        .layer(middleware::from_fn_with_state(app.clone(), require_admin));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(admin)
        .with_state(app)
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    match app.readiness().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "problems": problems })),
        )
            .into_response(),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn require_admin(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let token = app.config.http.admin_token.as_bytes();
    if token.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "the admin API is disabled (http.admin_token is empty)",
        );
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(presented.as_bytes().ct_eq(token)) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
    }
    next.run(request).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    #[serde(default)]
    rights: Vec<String>,
    #[serde(default)]
    name: String,
    #[serde(default, with = "humantime_serde")]
    expires_in: Option<std::time::Duration>,
}

async fn create(
    State(app): State<Arc<App>>,
    Path(app_uid): Path<String>,
    body: Result<Json<CreateKey>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let application = match app.tenancy.parse_app(&app_uid) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let rights = match Rights::parse_list(&body.rights.join(",")) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match create_key(
        app.keys.as_ref(),
        &application,
        rights,
        &body.name,
        body.expires_in,
    )
    .await
    {
        Ok((generated, record)) => (
            StatusCode::CREATED,
            Json(json!({ "key": generated.key, "details": KeyView::from(&record) })),
        )
            .into_response(),
        Err(e @ CreateKeyError::LifetimeTooLong(_)) => {
            error(StatusCode::BAD_REQUEST, format!("expires_in: {e}"))
        }
        Err(CreateKeyError::Store(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn list_keys(State(app): State<Arc<App>>, Path(app_uid): Path<String>) -> Response {
    let application = match app.tenancy.parse_app(&app_uid) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match app.keys.list(&application).await {
        Ok(keys) => Json(keys.iter().map(KeyView::from).collect::<Vec<_>>()).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn revoke(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match revoke_key(app.keys.as_ref(), app.bus.as_ref(), &id).await {
        Ok(Some(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("API key {id} not found")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
