//! Who calls the `/api/v1` routes and what they may do (issue 12 point 2): the operator,
//! with `Authorization: Bearer <http.admin_token>`, may do everything; an API key
//! (`Authorization: Bearer NNSXS.…`) may manage the keys and read the events of its own
//! application when it holds `RIGHT_APPLICATION_SETTINGS_API_KEYS`, nothing else.
//!
//! Keys are verified like MQTT logins, through the node's key cache (revoked, unknown and
//! expired keys are refused), and failures count towards `limits.failed_connects_per_ip`
//! of the caller's address: over it the address gets 429 for the cool-down, as MQTT
//! logins from it get CONNACK 5. Credentials are read from the header only; a request that
//! carries one in its URL is refused.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::token_matches;
use crate::app::App;
use crate::auth::{AuthError, StoredKey};
use crate::topic::AppRef;

/// The address of the HTTP client (set by [`super::serve`] for every request).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub IpAddr);

/// The authenticated caller of a request.
#[derive(Clone, Debug)]
pub enum Caller {
    /// The admin token: every tenant and application.
    Operator,
    /// An API key; on application routes, one of that application holding
    /// `RIGHT_APPLICATION_SETTINGS_API_KEYS`.
    Key(Arc<StoredKey>),
}

/// Query parameters that would carry credentials in a URL (logged by proxies, kept in
/// browser histories): refused rather than ignored, so that nobody comes to rely on them.
const URL_CREDENTIALS: [&str; 5] = ["token", "access_token", "api_key", "key", "authorization"];

/// The bearer token of a request, empty if there is none.
pub(super) fn bearer(request: &Request) -> &str {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// What a request presents: its query string, bearer token and client address (taken
/// out of the request, which is not `Sync` and so may not be borrowed across an await).
struct Presented {
    query: String,
    token: String,
    peer: Option<IpAddr>,
}

impl Presented {
    fn of(request: &Request) -> Self {
        Self {
            query: request.uri().query().unwrap_or("").to_owned(),
            token: bearer(request).to_owned(),
            peer: request.extensions().get::<Peer>().map(|p| p.0),
        }
    }
}

/// Who sent `request`: the operator or a verified key (of any application).
async fn identify(app: &App, presented: Presented) -> Result<Caller, ApiError> {
    for (name, _) in form_pairs(&presented.query) {
        if URL_CREDENTIALS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(ApiError::invalid(format!(
                "credentials go in the Authorization header, never in the URL (query parameter {name:?})"
            )));
        }
    }
    let token = presented.token.as_str();
    if token.starts_with("NNSXS.") {
        return verify_key(app, presented.peer, token)
            .await
            .map(Caller::Key);
    }
    let admin = &app.config.http.admin_token;
    if admin.is_empty() {
        return Err(ApiError::not_found(
            "the admin API is disabled (http.admin_token is empty); API keys with \
             RIGHT_APPLICATION_SETTINGS_API_KEYS are accepted on their application's routes",
        ));
    }
    if !token_matches(token, admin) {
        return Err(ApiError::unauthenticated(
            "missing or wrong admin token or API key (Authorization: Bearer …)",
        ));
    }
    Ok(Caller::Operator)
}

/// The names of the `a=b&c` pairs of a query string (not decoded: credentials parameter
/// names are plain ASCII).
fn form_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Verifies an API key presented over HTTP, under the failed-login limit of its address.
async fn verify_key(
    app: &App,
    peer: Option<IpAddr>,
    token: &str,
) -> Result<Arc<StoredKey>, ApiError> {
    if let Some(ip) = peer {
        if app.limits.is_banned(ip).await {
            return Err(ApiError::too_many_requests(
                "too many failed logins from this address; try again later",
            ));
        }
    }
    match app.auth.verify(token).await {
        Ok(key) => Ok(key),
        Err(e @ AuthError::Unavailable(_)) => Err(ApiError::unavailable(e.to_string())),
        Err(e) => {
            if let Some(ip) = peer {
                app.limits.login_failed(ip).await;
            }
            Err(ApiError::unauthenticated(e.to_string()))
        }
    }
}

/// Lets the operator through, nobody else (devices, `/api/v1/keys/{id}`).
pub(super) async fn require_admin(
    State(app): State<Arc<App>>,
    mut request: Request,
    next: Next,
) -> Response {
    match identify(&app, Presented::of(&request)).await {
        Ok(Caller::Operator) => {
            request.extensions_mut().insert(Caller::Operator);
            next.run(request).await
        }
        Ok(Caller::Key(key)) => ApiError::forbidden(format!(
            "API key {} may not use this route: it needs the admin token",
            key.id
        ))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Lets through the operator and the keys of the route's application (`{app}`) that hold
/// `RIGHT_APPLICATION_SETTINGS_API_KEYS`; the [`Caller`] is left in the request.
pub(super) async fn require_app_access(
    State(app): State<Arc<App>>,
    Path(params): Path<Vec<(String, String)>>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = match identify(&app, Presented::of(&request)).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Caller::Key(key) = &caller {
        let uid = params
            .iter()
            .find(|(name, _)| name == "app")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        let application = match app.tenancy.parse_app(uid) {
            Ok(a) => a,
            Err(e) => return ApiError::invalid(e.to_string()).into_response(),
        };
        if let Err(e) = may_manage(key, &application) {
            return e.into_response();
        }
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Whether `key` may manage the keys and read the events of `application`.
fn may_manage(key: &StoredKey, application: &AppRef) -> Result<(), ApiError> {
    if key.tenant != application.tenant || key.application != application.app {
        return Err(ApiError::forbidden(format!(
            "API key {} is for another application than {application}",
            key.id
        )));
    }
    if !key.rights.can_manage_keys() {
        return Err(ApiError::forbidden(format!(
            "API key {} lacks RIGHT_APPLICATION_SETTINGS_API_KEYS",
            key.id
        )));
    }
    Ok(())
}

/// `GET /api/v1/whoami`: `{"operator":true}`, or for a key
/// `{"operator":false,"application":"app1@tenant1","key_id":"…","rights":[…]}` (the
/// rights as granted, not expanded) — what a console sign-in may do.
pub(super) async fn whoami(State(app): State<Arc<App>>, request: Request) -> Response {
    match identify(&app, Presented::of(&request)).await {
        Ok(Caller::Operator) => Json(json!({ "operator": true })).into_response(),
        Ok(Caller::Key(key)) => {
            let application = AppRef::new(key.tenant.clone(), key.application.clone());
            Json(json!({
                "operator": false,
                "application": app.tenancy.app_uid(&application),
                "key_id": key.id,
                "rights": key.rights.names(),
            }))
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{generate, Rights};
    use crate::topic::Id;

    fn app(a: &str) -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse(a).unwrap())
    }

    #[test]
    fn a_key_manages_only_its_application_with_the_right() {
        let key = |rights| StoredKey::new(&generate(), &app("app1"), rights, "k", None);
        assert!(may_manage(&key(Rights::SETTINGS_API_KEYS), &app("app1")).is_ok());
        assert!(may_manage(&key(Rights::ALL), &app("app1")).is_ok());
        let e = may_manage(&key(Rights::ALL), &app("app2")).unwrap_err();
        assert_eq!(e.code, "forbidden");
        assert!(e.message.contains("another application"), "{}", e.message);
        let e = may_manage(&key(Rights::LINK), &app("app1")).unwrap_err();
        assert!(e.message.contains("RIGHT_APPLICATION_SETTINGS_API_KEYS"));
        let other_tenant = AppRef::new(Id::parse("tenant2").unwrap(), Id::parse("app1").unwrap());
        assert!(may_manage(&key(Rights::ALL), &other_tenant).is_err());
    }

    #[test]
    fn credential_parameters_are_found_in_queries() {
        let names: Vec<_> = form_pairs("names=as.mqtt&token=x&&b")
            .map(|p| p.0)
            .collect();
        assert_eq!(names, ["names", "token", "b"]);
    }
}
