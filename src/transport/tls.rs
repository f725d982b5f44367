//! MQTT over TLS and the TLS layer of WebSocket over TLS (rustls).
//!
//! Not built yet: a listener that needs it cannot be configured (see `Config::validate`).

use tokio::net::TcpStream;

use super::Duplex;

/// Why a TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// TLS listeners are not available in this build.
    #[error("TLS is not available in this build")]
    NotBuilt,
}

/// Accepts TLS connections with the configured certificate.
pub struct TlsAcceptor {
    _private: (),
}

impl TlsAcceptor {
    /// Runs the server side of a TLS handshake on `tcp`.
    pub async fn accept(&self, tcp: TcpStream) -> Result<Box<dyn Duplex>, TlsError> {
        drop(tcp);
        Err(TlsError::NotBuilt)
    }
}
