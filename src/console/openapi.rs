//! The OpenAPI 3 document of the HTTP API, `docs/openapi.json`, embedded and served at
//! `GET /api/v1/openapi.json` (no credentials: it is the public description of the API).

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// `docs/openapi.json`, as built into this binary.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

/// `GET /api/v1/openapi.json`.
pub async fn serve() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}
