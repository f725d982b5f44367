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

/// Per-tenant labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    /// Tenant ID.
    pub tenant: String,
}

/// A single `result` or `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// What happened.
    pub outcome: &'static str,
}

/// A single `result` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// What happened.
    pub result: &'static str,
}

/// A single `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

/// The `limit` label of a rate limit that bit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The limit's name in `[limits]`, e.g. `accepts_per_ip`.
    pub limit: &'static str,
}

/// The `scope` label of a connection quota.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    /// `tenant`, `application` or `key`.
    pub scope: &'static str,
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

/// Which backend: `bus` (NATS or embedded) or `store` (keys and queues: Redis or memory).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `bus` or `store`.
    pub backend: &'static str,
}

/// A listener and why a connection failed on it below MQTT.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `tcp`, `tls`, `ws` or `wss` ([`crate::transport::Kind`]).
    pub listener: &'static str,
    /// `proxy_protocol`, `tls_handshake`, `websocket_upgrade` or `handshake_timeout`.
    pub reason: &'static str,
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
    /// PUBLISH packets dropped because a client's outbound buffer was full, or still
    /// queued (or half written) when its connection ended.
    pub dropped: Family<AppLabels, Counter>,
    /// Messages received from the bus by this node's routers.
    pub bus_messages: Counter,
    /// Downlink publishes by outcome.
    pub downlinks: Family<DownlinkLabels, Counter>,
    /// PUBLISH packets (and wills) acknowledged and dropped because the client may not
    /// write their topic, by reason.
    pub publishes_refused: Family<ReasonLabels, Counter>,
    /// Malformed packets (each closed its connection), by reason.
    pub malformed_packets: Family<ReasonLabels, Counter>,
    /// 1 while a backend answers, 0 while it does not (see `health`).
    pub backend_up: Family<BackendLabels, Gauge>,
    /// Connections, logins, downlinks and SUBSCRIBEs refused by a rate limit, by limit.
    pub rate_limited: Family<LimitLabels, Counter>,
    /// CONNECTs refused because a connection quota is full, by scope.
    pub quota_refused: Family<ScopeLabels, Counter>,
    /// Connection quota operations that failed (the store unreachable; logins fail open).
    pub quota_unavailable: Counter,
    /// Sockets waiting for their CONNECT (bounded by `mqtt.max_pending_handshakes`).
    pub pending_handshakes: Gauge,
    /// Bus messages lost before they reached this node's routers, by reason
    /// (`slow_consumer`: a NATS subscription's buffer was full, the node's total of
    /// [`Metrics::bus_slow_consumer_dropped`] and of any other subscription's drops;
    /// `too_large_for_mqtt`).
    pub bus_dropped: Family<ReasonLabels, Counter>,
    /// Bus messages of an application lost because this node's subscription for it fell
    /// more than `nats.subscription_capacity` messages behind.
    pub bus_slow_consumer_dropped: Family<AppLabels, Counter>,
    /// Log lines about refusals held back by the per-peer log limiter.
    pub log_lines_suppressed: Counter,
    /// Open HTTP connections, all listeners (bounded by `http.max_connections` each).
    pub http_connections: Gauge,
    /// Revocation tombstones dropped over `auth.max_tombstones`.
    pub tombstones_dropped: Counter,
    /// Subscription filters granted to this node's connections.
    pub subscriptions: Gauge,
    /// Subscription filters refused (SUBACK 0x80), by reason.
    pub subscriptions_refused: Family<ReasonLabels, Counter>,
    /// Connections that failed below MQTT (PROXY header, TLS handshake, WebSocket
    /// upgrade, or their timeout), by listener and reason.
    pub transport_failures: Family<TransportLabels, Counter>,
    /// Certificate reloads of the TLS listeners (`loaded`, or `failed`: the files did not
    /// load and the certificate in use stays).
    pub tls_reloads: Family<ResultLabels, Counter>,
    /// When the TLS certificate in use expires (Unix seconds; 0 without TLS).
    pub tls_certificate_expiry: Gauge,
    /// WebSocket connections closed for a frame problem (`text_frame`, `too_large`,
    /// `protocol`), by reason.
    pub websocket_errors: Family<ReasonLabels, Counter>,
    /// Live events dropped, by reason (`rate_limited`, `queue_full`, `bus_unavailable`,
    /// `slow_reader`).
    pub events_dropped: Family<ReasonLabels, Counter>,
    /// Live events this node published on the bus.
    pub events_published: Counter,
    /// Event streams (SSE) open on this node.
    pub event_streams: Gauge,
    /// Persistent sessions attached to a connection of this node.
    pub sessions_attached: Gauge,
    /// Persistent sessions opened on this node, by outcome (`resumed`, `created`).
    pub sessions_opened: Family<OutcomeLabels, Counter>,
    /// Persistent sessions discarded by a `clean_session=1` CONNECT.
    pub sessions_discarded: Counter,
    /// Persistent sessions found expired.
    pub sessions_expired: Counter,
    /// Messages stored for persistent sessions that this node handed to their clients,
    /// and how many of them were redeliveries.
    pub session_messages: Family<OutcomeLabels, Counter>,
    /// Messages stored for a session and dropped, oldest first, over its bounds.
    pub session_overflow_dropped: Family<AppLabels, Counter>,
    /// QoS 1 PUBLISHes sent and not acknowledged yet, on this node.
    pub inflight: Gauge,
    /// Persistent sessions and shared subscriptions the session store keeps, per tenant
    /// this node has had sessions of (read every `sessions.usage_interval`).
    pub sessions_stored: Family<TenantLabels, Gauge>,
    /// Messages the session store keeps for them, per tenant.
    pub session_pending_messages: Family<TenantLabels, Gauge>,
    /// Bytes of those messages, per tenant.
    pub session_pending_bytes: Family<TenantLabels, Gauge>,
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
            publishes_refused: Family::default(),
            malformed_packets: Family::default(),
            backend_up: Family::default(),
            rate_limited: Family::default(),
            quota_refused: Family::default(),
            quota_unavailable: Counter::default(),
            pending_handshakes: Gauge::default(),
            bus_dropped: Family::default(),
            bus_slow_consumer_dropped: Family::default(),
            log_lines_suppressed: Counter::default(),
            http_connections: Gauge::default(),
            tombstones_dropped: Counter::default(),
            subscriptions: Gauge::default(),
            subscriptions_refused: Family::default(),
            transport_failures: Family::default(),
            tls_reloads: Family::default(),
            tls_certificate_expiry: Gauge::default(),
            websocket_errors: Family::default(),
            events_dropped: Family::default(),
            events_published: Counter::default(),
            event_streams: Gauge::default(),
            sessions_attached: Gauge::default(),
            sessions_opened: Family::default(),
            sessions_discarded: Counter::default(),
            sessions_expired: Counter::default(),
            session_messages: Family::default(),
            session_overflow_dropped: Family::default(),
            inflight: Gauge::default(),
            sessions_stored: Family::default(),
            session_pending_messages: Family::default(),
            session_pending_bytes: Family::default(),
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
            "PUBLISH packets dropped for slow subscribers: over the outbound buffer, or unwritten when the connection ended",
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
            "publishes_refused",
            "PUBLISH packets and wills dropped because the client may not write their topic",
            m.publishes_refused.clone(),
        );
        registry.register(
            "malformed_packets",
            "Malformed packets, each of which closed its connection",
            m.malformed_packets.clone(),
        );
        registry.register(
            "backend_up",
            "1 while a backend (bus, store) answers, 0 while it does not",
            m.backend_up.clone(),
        );
        registry.register(
            "rate_limited",
            "Connections, logins, downlinks and SUBSCRIBEs refused by a rate limit, by limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "quota_refused",
            "CONNECTs refused because a connection quota is full, by scope",
            m.quota_refused.clone(),
        );
        registry.register(
            "quota_unavailable",
            "Connection quota operations that failed because the store was unreachable (logins fail open)",
            m.quota_unavailable.clone(),
        );
        registry.register(
            "pending_handshakes",
            "Sockets waiting for their CONNECT",
            m.pending_handshakes.clone(),
        );
        registry.register(
            "bus_dropped",
            "Bus messages lost before reaching this node's routers, by reason",
            m.bus_dropped.clone(),
        );
        registry.register(
            "bus_slow_consumer_dropped",
            "Bus messages of an application lost because this node's subscription for it fell more than nats.subscription_capacity behind",
            m.bus_slow_consumer_dropped.clone(),
        );
        registry.register(
            "log_lines_suppressed",
            "Refusal log lines held back by the per-peer log limiter",
            m.log_lines_suppressed.clone(),
        );
        registry.register(
            "http_connections",
            "Open HTTP connections",
            m.http_connections.clone(),
        );
        registry.register(
            "auth_tombstones_dropped",
            "Revocation tombstones forgotten over auth.max_tombstones (keys cached before them are read again)",
            m.tombstones_dropped.clone(),
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
        registry.register(
            "transport_failures",
            "Connections that failed below MQTT (PROXY header, TLS handshake, WebSocket upgrade, or mqtt.handshake_timeout), by listener and reason",
            m.transport_failures.clone(),
        );
        registry.register(
            "tls_reloads",
            "TLS certificate reloads by result (failed: the files did not load, the certificate in use stays)",
            m.tls_reloads.clone(),
        );
        registry.register(
            "tls_certificate_expiry_seconds",
            "When the TLS certificate in use expires, in Unix seconds",
            m.tls_certificate_expiry.clone(),
        );
        registry.register(
            "websocket_errors",
            "WebSocket connections closed for a frame problem (text_frame, too_large over mqtt.max_packet_size, protocol), by reason",
            m.websocket_errors.clone(),
        );
        registry.register(
            "events_dropped",
            "Live events dropped, by reason (rate_limited over events.per_application_per_second, queue_full, bus_unavailable, slow_reader)",
            m.events_dropped.clone(),
        );
        registry.register(
            "events_published",
            "Live events this node published on the bus",
            m.events_published.clone(),
        );
        registry.register(
            "event_streams",
            "Event streams (SSE) open on this node",
            m.event_streams.clone(),
        );
        registry.register(
            "sessions_attached",
            "Persistent sessions attached to a connection of this node",
            m.sessions_attached.clone(),
        );
        registry.register(
            "sessions_opened",
            "Persistent sessions opened on this node, by outcome (resumed, created, full, unavailable)",
            m.sessions_opened.clone(),
        );
        registry.register(
            "sessions_discarded",
            "Persistent sessions discarded by a clean_session=1 CONNECT",
            m.sessions_discarded.clone(),
        );
        registry.register(
            "sessions_expired",
            "Persistent sessions found expired (sessions.expiry after their connection ended)",
            m.sessions_expired.clone(),
        );
        registry.register(
            "session_messages",
            "Stored messages of persistent sessions handed to their clients, by outcome (first, redelivered)",
            m.session_messages.clone(),
        );
        registry.register(
            "session_overflow_dropped",
            "Stored messages of persistent sessions dropped, oldest first, over sessions.max_pending_*",
            m.session_overflow_dropped.clone(),
        );
        registry.register(
            "inflight_messages",
            "QoS 1 PUBLISHes sent to clients of this node and not acknowledged yet",
            m.inflight.clone(),
        );
        registry.register(
            "sessions_stored",
            "Persistent sessions and shared subscriptions kept by the session store, per tenant",
            m.sessions_stored.clone(),
        );
        registry.register(
            "session_pending_messages",
            "Messages the session store keeps for persistent sessions, per tenant (JetStream: in the tenant's stream)",
            m.session_pending_messages.clone(),
        );
        registry.register(
            "session_pending_bytes",
            "Bytes of the messages the session store keeps for persistent sessions, per tenant",
            m.session_pending_bytes.clone(),
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
