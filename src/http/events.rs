//! The live event routes: `GET /api/v1/applications/{app}/events` (Server-Sent Events:
//! `event: <name>\ndata: <json>\n\n` per event, `?names=a,b` keeps the events whose name
//! starts with one of the prefixes, a `: keep-alive` comment every
//! `events.keepalive_interval`) and `GET /api/v1/applications/{app}/stats` (connections
//! and message counters). The same access as the key routes: the operator, or a key of
//! the application with `RIGHT_APPLICATION_SETTINGS_API_KEYS`.
//!
//! A stream starts with a `: connected` comment once the node receives the
//! application's events, and sends only events from then on.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::error::ApiError;
use super::keys::application_ref;
use crate::app::App;
use crate::events::{EventStream, OpenError};

/// Most name prefixes one `?names=` may carry.
const MAX_NAME_FILTERS: usize = 16;

/// The query of an event stream.
#[derive(Deserialize)]
pub(super) struct EventsQuery {
    /// Comma-separated name prefixes.
    #[serde(default)]
    names: Option<String>,
}

/// The `?names=` prefixes, checked (bounded in number and length).
fn name_filters(names: Option<&str>) -> Result<Vec<String>, ApiError> {
    let filters: Vec<String> = names
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if filters.len() > MAX_NAME_FILTERS {
        return Err(ApiError::invalid(format!(
            "names: {} prefixes, more than {MAX_NAME_FILTERS}",
            filters.len()
        )));
    }
    if let Some(bad) = filters.iter().find(|f| f.len() > 64) {
        return Err(ApiError::invalid(format!(
            "names: a prefix of {} characters, more than 64",
            bad.len()
        )));
    }
    Ok(filters)
}

/// What a stream's body needs between two frames.
struct Streaming {
    app: Arc<App>,
    events: EventStream,
    filters: Vec<String>,
    keepalive: tokio::time::Interval,
    started: bool,
}

impl Streaming {
    fn wants(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| name.starts_with(f.as_str()))
    }

    /// The next bytes of the body; `None` ends it (the node stops serving HTTP).
    async fn next(&mut self) -> Option<Bytes> {
        if !self.started {
            self.started = true;
            return Some(Bytes::from_static(b": connected\n\n"));
        }
        let hub = self.app.event_hub.clone();
        loop {
            tokio::select! {
                _ = hub.closing().cancelled() => return None,
                _ = self.keepalive.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
                frame = self.events.rx.recv() => match frame {
                    Ok(frame) if self.wants(&frame.name) => return Some(frame.sse.clone()),
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => hub.lost(n),
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }
}

/// `GET /api/v1/applications/{app}/events` → `text/event-stream`.
pub(super) async fn stream(
    State(app): State<Arc<App>>,
    Path(app_uid): Path<String>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let application = application_ref(&app, &app_uid)?;
    let filters = name_filters(query.names.as_deref())?;
    let events = app
        .event_hub
        .open(&application)
        .await
        .map_err(|e| match e {
            OpenError::ApplicationFull(_) => ApiError::too_many_requests(e.to_string()),
            OpenError::NodeFull(_) | OpenError::Bus(_) => ApiError::unavailable(e.to_string()),
        })?;
    let period = app.event_hub.config().keepalive_interval;
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = Streaming {
        app,
        events,
        filters,
        keepalive,
        started: false,
    };
    let body = futures::stream::unfold(state, |mut s| async move {
        let bytes = s.next().await?;
        Some((Ok::<_, Infallible>(bytes), s))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            // nginx and friends: pass each event on at once.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

/// `GET /api/v1/applications/{app}/stats` →
/// `{"connections":N,"messages_in":N,"messages_out":N,"dropped":N}`: connections across
/// the cluster where the application quota counts them (this node's otherwise), messages
/// of this node since it started.
pub(super) async fn stats(
    State(app): State<Arc<App>>,
    Path(app_uid): Path<String>,
) -> Result<Response, ApiError> {
    let application = application_ref(&app, &app_uid)?;
    let connections = match app
        .limits
        .quotas
        .application_connections(&application)
        .await
    {
        Some(n) => n,
        None => app
            .registry
            .all()
            .iter()
            .filter(|c| c.app == application)
            .count() as u64,
    };
    let counts = app.stats.get(&application);
    Ok(Json(json!({
        "connections": connections,
        "messages_in": counts.messages_in,
        "messages_out": counts.messages_out,
        "dropped": counts.dropped,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_filters_are_bounded() {
        assert_eq!(
            name_filters(Some("as.mqtt.connect, as.down,")).unwrap(),
            ["as.mqtt.connect", "as.down"]
        );
        assert!(name_filters(None).unwrap().is_empty());
        let many = vec!["a"; 17].join(",");
        assert_eq!(
            name_filters(Some(&many)).unwrap_err().code,
            "invalid_request"
        );
        assert!(name_filters(Some(&"a".repeat(65))).is_err());
    }
}
