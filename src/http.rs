//! The HTTP surface of a node (DESIGN §8): `/healthz` (alive), `/readyz` (backends
//! reachable, not draining), `/metrics` (Prometheus, behind `http.metrics_token` when set)
//! and the admin API for keys, behind a bearer token (disabled when `http.admin_token` is
//! empty). The probes can also be served on a listener of their own
//! (`http.metrics_listen`), apart from the admin API.
//!
//! Hardened against clients that hold connections: a header-read timeout, a body limit and
//! a cap on concurrent connections per listener ([`serve`]).
//!
//! Admin API:
//! - `POST /api/v1/applications/{app}/keys` `{"rights":[…],"name":"…","expires_in":"30d"}`
//!   → 201 with the key (shown once); `expires_in` at most `100y` (400 beyond)
//! - `GET /api/v1/applications/{app}/keys` → the application's keys, never secrets
//! - `DELETE /api/v1/keys/{id}` → 204, cluster-wide revocation; 404 if unknown
//! - `POST /api/v1/applications/{app}/devices` `{"device_id":"…"}` → 201 (200 when it was
//!   registered already): the device registry (DESIGN §5)
//! - `GET /api/v1/applications/{app}/devices` → the registered device IDs, sorted
//! - `GET /api/v1/applications/{app}/devices/{dev}` → 200 `{"device_id":"…"}`; 404 if unknown
//! - `DELETE /api/v1/applications/{app}/devices/{dev}` → 204, and its downlink queue is
//!   cleared; 404 if unknown
//!
//! `{app}` is written as in usernames: `{app}@{tenant}` or `{app}`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::auth::{create_key, CreateKeyError, KeyView, Rights};
use crate::cluster::revoke_key;
use crate::topic::{AppRef, DeviceRef, Id};

/// Serves HTTP on `listener` until `shutdown` is cancelled: the whole API, or with
/// `probes_only` just `/healthz`, `/readyz` and `/metrics` (the `http.metrics_listen`
/// listener).
///
/// Each connection gets `http.header_read_timeout` to send a request's headers and bodies
/// are cut at `http.max_body_bytes` (413); at most `http.max_connections` are served at
/// once, further ones wait in the listen backlog.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    probes_only: bool,
    listeners: crate::console::Listeners,
    shutdown: CancellationToken,
) {
    let routes = if probes_only {
        probes(app.clone())
    } else {
        router(app.clone(), listeners)
    };
    let limit = Arc::new(Semaphore::new(app.config.http.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.http.header_read_timeout);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(routes.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let (shutdown, gauge) = (shutdown.clone(), app.metrics.http_connections.clone());
        gauge.inc();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            gauge.dec();
            drop(permit);
        });
    }
    // Every connection holds a permit until it is done.
    let _ = limit
        .acquire_many(app.config.http.max_connections as u32)
        .await;
}

/// The probe routes: `/healthz`, `/readyz`, `/metrics`.
fn probes(app: Arc<App>) -> Router {
    let metrics_route = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_metrics));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(metrics_route)
        .layer(DefaultBodyLimit::max(app.config.http.max_body_bytes))
        .with_state(app)
}

/// The HTTP routes of a node: the probes, the admin API and the console (whose page shows
/// the addresses of the MQTT `listeners`).
pub fn router(app: Arc<App>, listeners: crate::console::Listeners) -> Router {
    let admin = Router::new()
        .route(
            "/api/v1/applications/{app}/keys",
            get(list_keys).post(create),
        )
        .route("/api/v1/keys/{id}", delete(revoke))
        .route(
            "/api/v1/applications/{app}/devices",
            get(list_devices).post(add_device),
        )
        .route(
            "/api/v1/applications/{app}/devices/{dev}",
            get(get_device).delete(remove_device),
        )
        // `route_layer`: the token guards these routes only. A `layer` would also wrap the
        // router's fallback, and every unknown path would answer with admin-API errors.
        .route_layer(middleware::from_fn_with_state(app.clone(), require_admin))
        .layer(DefaultBodyLimit::max(app.config.http.max_body_bytes))
        .with_state(app.clone());
    let console = crate::console::routes(app.clone(), listeners);
    probes(app).merge(admin).merge(console).fallback(not_found)
}

/// Any path that is not a route: a plain 404, whoever asks.
async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "404 not found\n").into_response()
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
    let token = &app.config.http.admin_token;
    if token.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "the admin API is disabled (http.admin_token is empty)",
        );
    }
    if !token_matches(bearer(&request), token) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
    }
    next.run(request).await
}

async fn require_metrics(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let token = &app.config.http.metrics_token;
    if !token.is_empty() && !token_matches(bearer(&request), token) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong metrics token");
    }
    next.run(request).await
}

/// The bearer token of a request, empty if there is none.
fn bearer(request: &Request) -> &str {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// Whether `presented` is `expected`, in a time that depends on neither: both are hashed
/// first, so not even the length of the expected token leaks (a plain constant-time
/// comparison returns early on a length mismatch).
fn token_matches(presented: &str, expected: &str) -> bool {
    let (p, e) = (
        Sha256::digest(presented.as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    bool::from(p.as_slice().ct_eq(e.as_slice()))
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
        // 413 for a body over http.max_body_bytes, 400 for the others.
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(e.status(), e.body_text())
        }
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDevice {
    device_id: String,
}

/// The device `dev` of the application `app_uid` names, or why it names none (a 400).
fn device_ref(app: &App, app_uid: &str, dev: &str) -> Result<DeviceRef, String> {
    let application = application_ref(app, app_uid)?;
    let id = Id::parse(dev).map_err(|e| e.to_string())?;
    Ok(DeviceRef::new(application, id))
}

/// The application `app_uid` names, or why it names none (a 400).
fn application_ref(app: &App, app_uid: &str) -> Result<AppRef, String> {
    app.tenancy.parse_app(app_uid).map_err(|e| e.to_string())
}

async fn add_device(
    State(app): State<Arc<App>>,
    Path(app_uid): Path<String>,
    body: Result<Json<AddDevice>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let device = match device_ref(&app, &app_uid, &body.device_id) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match app.devices.add(&device).await {
        Ok(new) => {
            let status = if new {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(json!({ "device_id": device.device }))).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn list_devices(State(app): State<Arc<App>>, Path(app_uid): Path<String>) -> Response {
    let application = match application_ref(&app, &app_uid) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match app.devices.list(&application).await {
        Ok(devices) => Json(devices).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn get_device(
    State(app): State<Arc<App>>,
    Path((app_uid, dev)): Path<(String, String)>,
) -> Response {
    let device = match device_ref(&app, &app_uid, &dev) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match app.devices.contains(&device).await {
        Ok(true) => Json(json!({ "device_id": device.device })).into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("end device {} not found", device.device),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn remove_device(
    State(app): State<Arc<App>>,
    Path((app_uid, dev)): Path<(String, String)>,
) -> Response {
    let device = match device_ref(&app, &app_uid, &dev) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let removed = match app.devices.remove(&device).await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    // A device nobody serves keeps no queue (and its bytes leave the quotas).
    if let Err(e) = app.queue.replace(&device, &[]).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    if removed {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("end device {} not found", device.device),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(token_matches("s3cret-token", "s3cret-token"));
        assert!(!token_matches("s3cret-tokeN", "s3cret-token"));
        assert!(
            !token_matches("s3cret", "s3cret-token"),
            "a prefix is not the token"
        );
        assert!(!token_matches("s3cret-token-and-more", "s3cret-token"));
        assert!(!token_matches("", "s3cret-token"));
        assert!(token_matches("", ""));
    }
}
