//! The PROXY protocol (v1 and v2) header a load balancer sends before the client's bytes.
//!
//! Not built yet: `proxy_protocol = true` cannot be configured (see `Config::validate`).

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The PROXY protocol is not available in this build.
    #[error("the PROXY protocol is not available in this build")]
    NotBuilt,
}

/// Reads the PROXY header at the start of `tcp`: the client's address, or `None` for a
/// `LOCAL` header (a load balancer's health check).
pub async fn read_header(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyError> {
    let _ = tcp;
    Err(ProxyError::NotBuilt)
}
