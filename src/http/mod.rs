//! The HTTP surface of a node (DESIGN §8): `/healthz` (alive), `/readyz` (backends
//! reachable, not draining), `/metrics` (Prometheus, behind `http.metrics_token` when set)
//! and the admin API for keys, behind a bearer token (disabled when `http.admin_token` is
//! empty). The probes can also be served on a listener of their own
//! (`http.metrics_listen`), apart from the admin API.
//!
//! Hardened against clients that hold connections: a header-read timeout, a body limit and
//! a cap on concurrent connections per listener ([`serve`]).
//!
//! Admin API (errors are `{"code":"…","message":"…"}`, [`error::ApiError`]; who may call
//! what is [`access`]'s):
//! - `GET /api/v1/whoami` → `{"operator":true}` or the calling key's application, ID and
//!   rights
//! - `POST /api/v1/applications/{app}/keys` `{"rights":[…],"name":"…","expires_in":"30d"}`
//!   → 201 with the key (shown once); `expires_in` at most `100y` (400 beyond)
//! - `GET /api/v1/applications/{app}/keys` → the application's keys, never secrets
//! - `DELETE /api/v1/applications/{app}/keys/{id}` → 204, cluster-wide revocation; 404
//!   unless the key is one of that application's
//! - `GET /api/v1/applications/{app}/events` → the application's live events as
//!   Server-Sent Events, cluster-wide ([`events`]); `?names=a,b` filters by name prefix
//! - `GET /api/v1/applications/{app}/stats` → `{"connections":N,"messages_in":N,
//!   "messages_out":N,"dropped":N}`
//! - `DELETE /api/v1/keys/{id}` → 204, cluster-wide revocation; 404 if unknown (operator)
//! - `POST /api/v1/applications/{app}/devices` `{"device_id":"…"}` → 201 (200 when it was
//!   registered already): the device registry (DESIGN §5) (operator, as every device route)
//! - `GET /api/v1/applications/{app}/devices` → the registered device IDs, sorted
//! - `GET /api/v1/applications/{app}/devices/{dev}` → 200 `{"device_id":"…"}`; 404 if unknown
//! - `DELETE /api/v1/applications/{app}/devices/{dev}` → 204, and its downlink queue is
//!   cleared; 404 if unknown
//!
//! `{app}` is written as in usernames: `{app}@{tenant}` or `{app}`. The `…/keys`,
//! `…/events` and `…/stats` routes
//! accept the admin token or a key of that application with
//! `RIGHT_APPLICATION_SETTINGS_API_KEYS`; the others the admin token only.

pub mod access;
pub mod devices;
pub mod error;
pub mod events;
pub mod keys;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::app::App;
use access::{bearer, Peer};
use error::ApiError;

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
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // The client's address, for the failed-login limit of API keys.
        let service = TowerToHyperService::new(routes.clone().map_request(
            move |mut request: Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(Peer(peer.ip()));
                request
            },
        ));
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
    // `route_layer`: each guard covers its routes only. A `layer` would also wrap the
    // router's fallback, and every unknown path would answer with admin-API errors.
    let application = Router::new()
        .route(
            "/api/v1/applications/{app}/keys",
            get(keys::list).post(keys::create),
        )
        .route(
            "/api/v1/applications/{app}/keys/{id}",
            delete(keys::revoke_own),
        )
        .route("/api/v1/applications/{app}/events", get(events::stream))
        .route("/api/v1/applications/{app}/stats", get(events::stats))
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            access::require_app_access,
        ));
    let operator = Router::new()
        .route("/api/v1/keys/{id}", delete(keys::revoke))
        .route(
            "/api/v1/applications/{app}/devices",
            get(devices::list).post(devices::add),
        )
        .route(
            "/api/v1/applications/{app}/devices/{dev}",
            get(devices::get).delete(devices::remove),
        )
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            access::require_admin,
        ));
    let api = Router::new()
        .route("/api/v1/whoami", get(access::whoami))
        .merge(application)
        .merge(operator)
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(app.config.http.max_body_bytes))
        .with_state(app.clone());
    let console = crate::console::routes(app.clone(), listeners);
    probes(app).merge(api).merge(console).fallback(not_found)
}

/// Any path that is not a route: a plain 404, whoever asks; the JSON error under
/// `/api/v1`.
async fn not_found(request: Request) -> Response {
    if request.uri().path().starts_with("/api/v1/") {
        return ApiError::not_found(format!(
            "no route {}",
            crate::log::Bounded::id(request.uri().path())
        ))
        .into_response();
    }
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

async fn require_metrics(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let token = &app.config.http.metrics_token;
    if !token.is_empty() && !token_matches(bearer(&request), token) {
        return (StatusCode::UNAUTHORIZED, "missing or wrong metrics token\n").into_response();
    }
    next.run(request).await
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
