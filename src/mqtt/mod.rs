//! MQTT 3.1.1: the framing ([`codec`]), the CONNECT decision ([`connect`]), a connection's
//! outbound queue ([`outbox`]), its socket ([`wire`]) and the per-connection state machine
//! ([`session`]).

pub mod codec;
pub mod connect;
pub mod outbox;
pub mod session;
pub mod wire;
