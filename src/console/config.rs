//! `[console]`: whether the console page is served, and the public addresses it shows.

use serde::{Deserialize, Serialize};

/// `[console]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve `/console` on the HTTP listener; off: 404 there.
    pub enabled: bool,
    /// MQTT address clients use, e.g. `mqtt.example.com:1883` (a node cannot know its load
    /// balancer's name); empty: the host the page was loaded from and `mqtt.listen`'s port.
    pub public_address: String,
    /// MQTT over TLS address, e.g. `mqtt.example.com:8883`; empty: derived as
    /// `public_address` from `mqtt.tls.listen`, none without a TLS listener.
    pub public_tls_address: String,
    /// MQTT over WebSocket URL, e.g. `wss://mqtt.example.com/mqtt`; empty: derived from
    /// `mqtt.wss.listen` (else `mqtt.ws.listen`) and `mqtt.ws.path`, none without either.
    pub public_ws_url: String,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            public_address: String::new(),
            public_tls_address: String::new(),
            public_ws_url: String::new(),
        }
    }
}
