//! `GET /api/v1/console/info`: what the console's MQTT page shows besides the keys — the
//! public MQTT, MQTT over TLS and WebSocket addresses (`console.public_*`, or derived from
//! the host the page was loaded from and this node's listeners), the tenancy mode (which
//! decides the username: `{app}@{tenant}` or `{app}`) and the node's name.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::app::App;
use crate::transport::Kind;

/// Where this node's MQTT listeners are served (the real ports, also when configured
/// with port 0).
#[derive(Clone, Debug, Default)]
pub struct Listeners(pub Vec<(Kind, SocketAddr)>);

impl Listeners {
    fn port(&self, kind: Kind) -> Option<u16> {
        self.0
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, addr)| addr.port())
    }
}

/// The body of `GET /api/v1/console/info`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ConsoleInfo {
    /// `host:port` of MQTT over TCP.
    pub public_address: String,
    /// `host:port` of MQTT over TLS; empty when there is none.
    pub public_tls_address: String,
    /// `ws://` or `wss://` URL of MQTT over WebSocket; empty when there is none.
    pub public_ws_url: String,
    /// `multi` (usernames `{app}@{tenant}`) or `single` (usernames `{app}`).
    pub tenancy: String,
    /// The name of the node that answered.
    pub node: String,
}

/// The answer for a request whose `Host` header named `host` (without port; `None` when
/// missing or unusable).
pub fn console_info(app: &App, listeners: &Listeners, host: Option<&str>) -> ConsoleInfo {
    let console = &app.config.console;
    let host = host.map(str::to_owned).unwrap_or_else(|| {
        // No usable Host header: the address MQTT listens on, unless that is a wildcard.
        listeners
            .0
            .first()
            .map(|(_, a)| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .map(|ip| match ip {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            })
            .unwrap_or_else(|| "localhost".into())
    });
    let or_derived = |configured: &str, kind: Kind| match configured {
        "" => listeners
            .port(kind)
            .map(|port| format!("{host}:{port}"))
            .unwrap_or_default(),
        set => set.to_owned(),
    };
    let path = &app.config.mqtt.ws.path;
    let ws_url = match console.public_ws_url.as_str() {
        "" => match (listeners.port(Kind::Wss), listeners.port(Kind::Ws)) {
            (Some(port), _) => format!("wss://{host}:{port}{path}"),
            (None, Some(port)) => format!("ws://{host}:{port}{path}"),
            (None, None) => String::new(),
        },
        set => set.to_owned(),
    };
    ConsoleInfo {
        public_address: or_derived(&console.public_address, Kind::Tcp),
        public_tls_address: or_derived(&console.public_tls_address, Kind::Tls),
        public_ws_url: ws_url,
        tenancy: app.config.tenancy.mode.clone(),
        node: app.node_id.clone(),
    }
}

/// The host part of a `Host` header, when it is a plain DNS name or IP literal (anything
/// else is ignored rather than echoed).
pub fn host_of(value: &str) -> Option<&str> {
    let host = if value.starts_with('[') {
        // [v6]:port or [v6]
        &value[..=value.find(']')?]
    } else {
        value.split(':').next()?
    };
    let plain = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    plain.then_some(host)
}

/// `GET /api/v1/console/info`.
pub async fn serve(
    State((app, listeners)): State<(Arc<App>, Arc<Listeners>)>,
    headers: HeaderMap,
) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(host_of);
    Json(console_info(&app, &listeners, host)).into_response()
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_header_without_port() {
        assert_eq!(host_of("mqtt.example.com:8080"), Some("mqtt.example.com"));
        assert_eq!(host_of("mqtt.example.com"), Some("mqtt.example.com"));
        assert_eq!(host_of("127.0.0.1:80"), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:8080"), Some("[::1]"));
        assert_eq!(host_of("[::1]"), Some("[::1]"));
    }

    #[test]
    fn odd_host_headers_are_ignored() {
        assert_eq!(host_of(""), None);
        assert_eq!(host_of("<script>"), None);
        assert_eq!(host_of("a b"), None);
        assert_eq!(host_of("[::1"), None);
    }
}
