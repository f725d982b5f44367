//! The device registry routes of the admin API (DESIGN §5), for the operator only.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::keys::application_ref;
use crate::app::App;
use crate::topic::{DeviceRef, Id};

/// The body of `POST …/devices`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddDevice {
    device_id: String,
}

/// The device `dev` of the application `app_uid` names, or why it names none (a 400).
fn device_ref(app: &App, app_uid: &str, dev: &str) -> Result<DeviceRef, ApiError> {
    let application = application_ref(app, app_uid)?;
    let id = Id::parse(dev).map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(DeviceRef::new(application, id))
}

fn unavailable(e: impl ToString) -> ApiError {
    ApiError::unavailable(e.to_string())
}

fn device_not_found(device: &DeviceRef) -> ApiError {
    ApiError::not_found(format!("end device {} not found", device.device))
}

/// `POST /api/v1/applications/{app}/devices` → 201, or 200 when registered already.
pub(super) async fn add(
    State(app): State<Arc<App>>,
    Path(app_uid): Path<String>,
    body: Result<Json<AddDevice>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| ApiError::from_json(&e))?;
    let device = device_ref(&app, &app_uid, &body.device_id)?;
    let new = app.devices.add(&device).await.map_err(unavailable)?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({ "device_id": device.device }))).into_response())
}

/// `GET /api/v1/applications/{app}/devices` → the registered device IDs, sorted.
pub(super) async fn list(
    State(app): State<Arc<App>>,
    Path(app_uid): Path<String>,
) -> Result<Response, ApiError> {
    let application = application_ref(&app, &app_uid)?;
    let devices = app.devices.list(&application).await.map_err(unavailable)?;
    Ok(Json(devices).into_response())
}

/// `GET /api/v1/applications/{app}/devices/{dev}` → `{"device_id":"…"}`; 404 if unknown.
pub(super) async fn get(
    State(app): State<Arc<App>>,
    Path((app_uid, dev)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let device = device_ref(&app, &app_uid, &dev)?;
    if app.devices.contains(&device).await.map_err(unavailable)? {
        Ok(Json(json!({ "device_id": device.device })).into_response())
    } else {
        Err(device_not_found(&device))
    }
}

/// `DELETE /api/v1/applications/{app}/devices/{dev}` → 204 and its downlink queue
/// cleared; 404 if unknown.
pub(super) async fn remove(
    State(app): State<Arc<App>>,
    Path((app_uid, dev)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let device = device_ref(&app, &app_uid, &dev)?;
    let removed = app.devices.remove(&device).await.map_err(unavailable)?;
    // A device nobody serves keeps no queue (and its bytes leave the quotas).
    app.queue.replace(&device, &[]).await.map_err(unavailable)?;
    if removed {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(device_not_found(&device))
    }
}
