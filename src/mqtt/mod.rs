//! MQTT 3.1.1 (and 3.1): the framing ([`codec`]) and its packet rules ([`validate`]), the
//! CONNECT decision ([`connect`]), a connection's outbound queue ([`outbox`]), its socket
//! ([`wire`]), and the per-connection state machine ([`session`]) with its CONNECT phase
//! (`handshake`) and its inbound PUBLISH handling (`publish`).

pub mod admission;
pub mod codec;
pub mod connect;
mod handshake;
mod inflight;
pub mod outbox;
mod persistent;
mod publish;
pub mod session;
pub mod validate;
pub mod wire;
