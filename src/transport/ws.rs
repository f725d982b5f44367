//! MQTT over WebSocket (plain and over TLS).
//!
//! Not built yet: a listener that needs it cannot be configured (see `Config::validate`).

use super::Duplex;

/// Why a WebSocket upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// WebSocket listeners are not available in this build.
    #[error("WebSocket is not available in this build")]
    NotBuilt,
}

/// The settings of WebSocket listeners (path, subprotocols, origins).
pub struct WsSettings {
    _private: (),
}

impl WsSettings {
    /// Runs the server side of a WebSocket upgrade on `stream`; MQTT bytes flow in binary
    /// frames from then on.
    pub async fn accept<S: Duplex>(&self, stream: S) -> Result<Box<dyn Duplex>, WsError> {
        drop(stream);
        Err(WsError::NotBuilt)
    }
}
