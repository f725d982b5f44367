//! Prometheus metrics of one node (`/metrics`). Labels carry tenant and application where
//! an operator needs them per customer; nothing here is visible to MQTT clients.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Per-application labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    /// Tenant ID.
    pub tenant: String,
    /// Application ID.
    pub application: String,
}

/// A single `result` or `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// What happened.
    pub outcome: &'static str,
}

/// A single `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

/// Per-application downlink outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DownlinkLabels {
    /// Tenant ID.
    pub tenant: String,
    /// Application ID.
    pub application: String,
    /// `queued` or the error name.
    pub outcome: &'static str,
}

/// Every metric of a node.
pub struct Metrics {
    registry: Registry,
    /// Open MQTT connections (after CONNACK 0).
    pub connections: Gauge,
    /// CONNECT attempts by outcome (`accepted` or the refusal).
    pub connects: Family<OutcomeLabels, Counter>,
    /// Closed connections by reason.
    pub disconnects: Family<OutcomeLabels, Counter>,
    /// PUBLISH packets handed to client outboxes.
    pub delivered: Counter,
    /// PUBLISH packets dropped because a client's outbound buffer was full.
    pub dropped: Family<AppLabels, Counter>,
    /// Messages received from the bus by this node's routers.
    pub bus_messages: Counter,
    /// Downlink publishes by outcome.
    pub downlinks: Family<DownlinkLabels, Counter>,
    /// Subscription filters granted to this node's connections.
    pub subscriptions: Gauge,
    /// Subscription filters refused (SUBACK 0x80), by reason.
    pub subscriptions_refused: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lorabroker");
        let m = Metrics {
            connections: Gauge::default(),
            connects: Family::default(),
            disconnects: Family::default(),
            delivered: Counter::default(),
            dropped: Family::default(),
            bus_messages: Counter::default(),
            downlinks: Family::default(),
            subscriptions: Gauge::default(),
            subscriptions_refused: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open MQTT connections",
            m.connections.clone(),
        );
        registry.register(
            "connects",
            "CONNECT attempts by outcome",
            m.connects.clone(),
        );
        registry.register(
            "disconnects",
            "Closed connections by reason",
            m.disconnects.clone(),
        );
        registry.register(
            "delivered_messages",
            "PUBLISH packets handed to subscribers",
            m.delivered.clone(),
        );
        registry.register(
            "dropped_messages",
            "PUBLISH packets dropped for slow subscribers",
            m.dropped.clone(),
        );
        registry.register(
            "bus_messages",
            "Traffic messages received from the bus",
            m.bus_messages.clone(),
        );
        registry.register(
            "downlinks",
            "Downlink publishes by outcome",
            m.downlinks.clone(),
        );
        registry.register(
            "subscriptions",
            "Subscription filters granted to this node's connections",
            m.subscriptions.clone(),
        );
        registry.register(
            "subscriptions_refused",
            "Subscription filters refused with SUBACK 0x80, by reason",
            m.subscriptions_refused.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
