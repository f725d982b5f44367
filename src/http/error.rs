//! [`ApiError`]: the one error body of every `/api/v1` route, `{"code":"…","message":"…"}`,
//! with a snake_case code per HTTP status (DESIGN §10, issue 12 point 5).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// An `/api/v1` error: a status, a stable snake_case code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// `invalid_request`, `unauthenticated`, `forbidden`, `not_found`,
    /// `method_not_allowed`, `payload_too_large`, `too_many_requests` or `unavailable`.
    pub code: &'static str,
    /// What went wrong, naming the thing and the value.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 401 `unauthenticated`: no credentials, or ones that are not valid.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 403 `forbidden`: valid credentials that do not allow this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 429 `too_many_requests`.
    pub fn too_many_requests(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", message)
    }

    /// 503 `unavailable`: a backend (Redis, NATS) or a bound of the node.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// A body the JSON extractor refused: 413 `payload_too_large` over
    /// `http.max_body_bytes`, 400 `invalid_request` otherwise.
    pub fn from_json(e: &axum::extract::rejection::JsonRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(e.status(), "payload_too_large", e.body_text())
        } else {
            Self::invalid(e.body_text())
        }
    }

    /// 405 `method_not_allowed`.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this method is not allowed on this path",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "code": self.code, "message": self.message })),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_body_is_code_and_message() {
        let response = ApiError::forbidden("no").into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], br#"{"code":"forbidden","message":"no"}"#);
        for (e, status, code) in [
            (ApiError::invalid(""), 400, "invalid_request"),
            (ApiError::unauthenticated(""), 401, "unauthenticated"),
            (ApiError::not_found(""), 404, "not_found"),
            (ApiError::method_not_allowed(), 405, "method_not_allowed"),
            (ApiError::too_many_requests(""), 429, "too_many_requests"),
            (ApiError::unavailable(""), 503, "unavailable"),
        ] {
            assert_eq!((e.status.as_u16(), e.code), (status, code));
        }
    }
}
