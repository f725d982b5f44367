//! # lorabroker
//!
//! A horizontally scalable, multi-tenant MQTT 3.1.1 server whose MQTT surface is
//! wire-compatible with The Things Stack's Application Server MQTT integration.
//!
//! ```text
//!  MQTT clients ──► server (accept, limits, drain)
//!                     └─► mqtt::session (one task per connection)
//!                           ├─ auth::Authenticator ──► auth::KeyStore   (memory | Redis)
//!                           ├─ router::Router ◄────── bus::Bus          (embedded | NATS)
//!                           │    (per-application fan-out to local sessions)
//!                           ├─ downlink::DownlinkService ──► downlink::DownlinkQueue (memory | Redis)
//!                           │    (validation, limits, quotas)  └► devices::DeviceRegistry (memory | Redis)
//!                           ├─ registry::Registry ◄── cluster (takeover, revocation signals)
//!                           └─ events::Publisher ──► bus::Bus ──► events::Hub (SSE on http)
//!  upstream (simulated fleet) ──► bus::Bus, downlink::DownlinkQueue, devices::DeviceRegistry
//! ```
//!
//! [`app::App`] wires one node from a [`config::Config`]: it picks the embedded or the
//! NATS/Redis backends once, and nothing else knows which ones run.

pub mod app;
pub mod auth;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod console;
pub mod devices;
pub mod downlink;
pub mod events;
pub mod health;
pub mod http;
pub mod limits;
pub mod log;
pub mod message;
pub mod metrics;
pub mod mqtt;
pub mod redis_conn;
pub mod registry;
pub mod router;
pub mod server;
pub mod sessions;
pub mod signals;
pub mod topic;
pub mod transport;
pub mod upstream;
