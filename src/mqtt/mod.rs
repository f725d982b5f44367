//! MQTT 3.1.1: the wire ([`codec`]), the CONNECT decision ([`connect`]), a connection's
//! outbound queue ([`outbox`]) and the per-connection state machine ([`session`]).

pub mod codec;
pub mod connect;
pub mod outbox;
pub mod session;
