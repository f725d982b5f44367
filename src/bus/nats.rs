//! NATS [`super::Bus`] (placeholder until the cluster backends land).

/// NATS-backed bus.
pub struct NatsBus;
