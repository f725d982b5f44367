//! The key routes of the admin API: create, list and revoke an application's keys (for the
//! operator and, self-service, for the application's keys with
//! `RIGHT_APPLICATION_SETTINGS_API_KEYS`), and revoke any key by ID (operator only).
//!
//! A key caller may only create keys with rights it holds itself, so the settings right
//! cannot be turned into traffic rights the signed-in key lacks.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::access::Caller;
use super::error::ApiError;
use crate::app::App;
use crate::auth::{create_key, CreateKeyError, KeyView, Rights};
use crate::cluster::revoke_key;
use crate::topic::AppRef;

/// The body of `POST …/keys`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateKey {
    #[serde(default)]
    rights: Vec<String>,
    #[serde(default)]
    name: String,
    #[serde(default, with = "humantime_serde")]
    expires_in: Option<std::time::Duration>,
}

/// The application `app_uid` names, or why it names none (a 400).
pub(super) fn application_ref(app: &App, app_uid: &str) -> Result<AppRef, ApiError> {
    app.tenancy
        .parse_app(app_uid)
        .map_err(|e| ApiError::invalid(e.to_string()))
}

/// `POST /api/v1/applications/{app}/keys` → 201 with the key, shown once.
pub(super) async fn create(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(app_uid): Path<String>,
    body: Result<Json<CreateKey>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::from_json(&e))?;
    let application = application_ref(&app, &app_uid)?;
    let rights =
        Rights::parse_list(&body.rights.join(",")).map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Caller::Key(key) = &caller {
        if !key.rights.includes(rights) {
            return Err(ApiError::forbidden(format!(
                "API key {} may only create keys with rights it holds ({:?}); {:?} asked",
                key.id, key.rights, rights
            )));
        }
    }
    match create_key(
        app.keys.as_ref(),
        &application,
        rights,
        &body.name,
        body.expires_in,
    )
    .await
    {
        Ok((generated, record)) => Ok((
            StatusCode::CREATED,
            Json(json!({ "key": generated.key, "details": KeyView::from(&record) })),
        )
            .into_response()),
        Err(e @ CreateKeyError::LifetimeTooLong(_)) => {
            Err(ApiError::invalid(format!("expires_in: {e}")))
        }
        Err(CreateKeyError::Store(e)) => Err(ApiError::unavailable(e.to_string())),
    }
}

/// `GET /api/v1/applications/{app}/keys` → the application's keys, never a secret.
pub(super) async fn list(
    State(app): State<Arc<App>>,
    Path(app_uid): Path<String>,
) -> Result<Response, ApiError> {
    let application = application_ref(&app, &app_uid)?;
    let keys = app
        .keys
        .list(&application)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    Ok(Json(keys.iter().map(KeyView::from).collect::<Vec<_>>()).into_response())
}

/// `DELETE /api/v1/applications/{app}/keys/{id}` → 204, revoked cluster-wide; 404 unless
/// the key is one of that application's.
pub(super) async fn revoke_own(
    State(app): State<Arc<App>>,
    Path((app_uid, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let application = application_ref(&app, &app_uid)?;
    let record = app
        .keys
        .get(&id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    match record {
        Some(k) if k.tenant == application.tenant && k.application == application.app => {
            revoke(State(app), Path(id)).await
        }
        _ => Err(not_found(&id)),
    }
}

fn not_found(id: &str) -> ApiError {
    // Bounded: the ID comes from the URL.
    ApiError::not_found(format!("API key {} not found", crate::log::Bounded::id(id)))
}

/// `DELETE /api/v1/keys/{id}` → 204, revoked cluster-wide; 404 if unknown.
pub(super) async fn revoke(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match revoke_key(app.keys.as_ref(), app.bus.as_ref(), &id).await {
        Ok(Some(_)) => Ok(StatusCode::NO_CONTENT.into_response()),
        Ok(None) => Err(not_found(&id)),
        Err(e) => Err(ApiError::unavailable(e.to_string())),
    }
}
