//! The console (DESIGN §10): one page on the HTTP listener of every node, `/console`, the
//! seed's Console MQTT page for one application — connection information, **Generate new
//! API key** (shown once), the key list with revocation, live events and small charts. It
//! is plain HTML, JavaScript modules and CSS embedded in the binary ([`assets`]); it uses
//! only the documented admin API ([`openapi`], served at `GET /api/v1/openapi.json`) with
//! the credential in an `Authorization` header that lives in the page's memory only.
//!
//! Routes added here: `/console` and its assets (when `console.enabled`),
//! `GET /api/v1/console/info` (the public addresses, [`info`]) and
//! `GET /api/v1/openapi.json`. The last two need no credentials: they say nothing that
//! is not public.

pub mod assets;
pub mod config;
pub mod info;
pub mod openapi;

use std::sync::Arc;

use axum::http::{header, HeaderName, HeaderValue};
use axum::routing::get;
use axum::Router;

use crate::app::App;

pub use config::ConsoleConfig;
pub use info::Listeners;

/// The Content-Security-Policy of every console response: nothing but the node's own
/// scripts, styles and API; no inline script, no framing, no form posts elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'none'";

/// The console's routes for `app`, whose MQTT listeners are `listeners`: the page and
/// its assets unless `console.enabled` is off, and always the console info and the
/// OpenAPI document (both part of the API).
pub fn routes(app: Arc<App>, listeners: Listeners) -> Router {
    let api = Router::new()
        .route("/api/v1/openapi.json", get(openapi::serve))
        .route("/api/v1/console/info", get(info::serve))
        .with_state((app.clone(), Arc::new(listeners)));
    if !app.config.console.enabled {
        return api;
    }
    let page = Router::new()
        .route("/console", get(assets::index))
        .route("/console/", get(assets::index))
        .route("/console/{file}", get(assets::file))
        .layer(axum::middleware::map_response(security_headers));
    api.merge(page)
}

/// Adds the console's security headers to a response.
async fn security_headers(mut response: axum::response::Response) -> axum::response::Response {
    let headers = response.headers_mut();
    let set = [
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    for (name, value) in set {
        headers.insert(name, value);
    }
    response
}
