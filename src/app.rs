//! [`App`]: every handle of one node, built once from a [`Config`]. This is the only place
//! that chooses between the embedded backends and NATS/Redis; everything else sees traits.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::auth::quota_redis::RedisQuotaStore;
use crate::auth::redis::RedisKeyStore;
use crate::auth::{
    Authenticator, CacheSettings, ClientEpochs, KeyStore, MemoryEpochs, MemoryKeyStore, StoreError,
};
use crate::bus::{Bus, BusError, EmbeddedBus, NatsBus};
use crate::config::Config;
use crate::devices::redis::RedisDeviceRegistry;
use crate::devices::{DeviceRegistry, MemoryDeviceRegistry, RegistryError};
use crate::downlink::redis::RedisDownlinkQueue;
use crate::downlink::{
    DownlinkQueue, DownlinkService, MemoryDownlinkQueue, QueueError, QueueLimits, ServiceSettings,
};
use crate::events::{Hub, Publisher, TrafficStats};
use crate::limits::{Limits, MemoryQuotaStore, QuotaError, QuotaStore};
use crate::log::LogLimiter;
use crate::metrics::{Metrics, ReasonLabels};
use crate::mqtt::admission::Admission;
use crate::redis_conn::{RedisConn, RedisConnError};
use crate::registry::Registry;
use crate::router::Router;
use crate::sessions::{JetStreamSessions, MemorySessions, NoSessions, SessionStore};
use crate::topic::Tenancy;

/// One refusal line per peer (IP address) per this interval; the others are counted in
/// `lorabroker_log_lines_suppressed_total` and reported by the next line.
const REFUSAL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Peers the refusal log limiter remembers (about 100 bytes each).
const REFUSAL_LOG_PEERS: usize = 10_000;

/// Why the backends could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// NATS.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Redis (keys).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Redis (queues).
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Redis (device registry).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Redis (connection quotas).
    #[error(transparent)]
    Quota(#[from] QuotaError),
    /// Redis settings (a file, a URL) that no connection can be made of.
    #[error(transparent)]
    Redis(#[from] RedisConnError),
}

/// The backends of a node: bus, key store (with the takeover epochs beside it), downlink
/// queue, device registry, connection quota store.
#[derive(Clone)]
pub struct Backends {
    /// Traffic and cluster signals.
    pub bus: Arc<dyn Bus>,
    /// API key records.
    pub keys: Arc<dyn KeyStore>,
    /// Takeover epochs of client IDs (on the key store's Redis connection).
    pub epochs: Arc<dyn ClientEpochs>,
    /// Downlink queues.
    pub queue: Arc<dyn DownlinkQueue>,
    /// Devices the upstream serves.
    pub devices: Arc<dyn DeviceRegistry>,
    /// Connection counts for the quotas.
    pub quota: Arc<dyn QuotaStore>,
    /// Where persistent sessions are kept ([`NoSessions`] when they are off).
    pub sessions: Arc<dyn SessionStore>,
}

impl Backends {
    /// Embedded bus and in-memory stores, for one node on its own, with queues of at most
    /// `queue_capacity` items per device and the default byte limits.
    pub fn embedded(queue_capacity: usize) -> Self {
        Self::embedded_with(QueueLimits::with_capacity(queue_capacity))
    }

    /// Embedded bus and in-memory stores whose queues enforce `limits`.
    pub fn embedded_with(limits: QueueLimits) -> Self {
        Self {
            bus: Arc::new(EmbeddedBus::new()),
            keys: Arc::new(MemoryKeyStore::new()),
            epochs: Arc::new(MemoryEpochs::new()),
            queue: Arc::new(MemoryDownlinkQueue::with_limits(limits)),
            devices: Arc::new(MemoryDeviceRegistry::new()),
            quota: Arc::new(MemoryQuotaStore::new()),
            sessions: Arc::new(NoSessions),
        }
    }

    /// The embedded backends with the bounds of `config`, persistent sessions in memory
    /// when `config` enables them.
    pub fn embedded_for(config: &Config) -> Self {
        let embedded = Self::embedded_with(QueueLimits::from_config(&config.downlink));
        Self {
            sessions: if config.sessions.enabled {
                Arc::new(MemorySessions::new(embedded.bus.clone(), &config.sessions))
            } else {
                Arc::new(NoSessions)
            },
            ..embedded
        }
    }

    /// NATS for the bus if `nats.url` is set, Redis for the stores if `[redis]` names one,
    /// embedded otherwise. A backend that is down at start does not fail this: the node
    /// starts not-ready and connects when it can.
    pub async fn from_config(config: &Config, client_name: &str) -> Result<Self, BackendError> {
        let limits = QueueLimits::from_config(&config.downlink);
        let embedded = Self::embedded_for(config);
        let (bus, sessions): (Arc<dyn Bus>, Arc<dyn SessionStore>) = if config.nats.url.is_empty() {
            (embedded.bus, embedded.sessions)
        } else {
            let nats = NatsBus::connect_with(&config.nats, client_name).await?;
            let sessions: Arc<dyn SessionStore> = if config.sessions.enabled {
                Arc::new(JetStreamSessions::new(
                    nats.jetstream(),
                    &config.sessions,
                    config.mqtt.max_inflight,
                ))
            } else {
                Arc::new(NoSessions)
            };
            (Arc::new(nats), sessions)
        };
        if !config.redis.is_enabled() {
            return Ok(Self {
                bus,
                sessions,
                ..embedded
            });
        }
        let prefix = &config.redis.key_prefix;
        // One connection per store, as before: a long reply for one never queues another's.
        let open = || RedisConn::open(&config.redis);
        let keys = RedisKeyStore::new(open()?, prefix);
        Ok(Self {
            bus,
            epochs: Arc::new(keys.epochs(config.redis.takeover_epoch_ttl)),
            keys: Arc::new(keys),
            queue: Arc::new(RedisDownlinkQueue::new(open()?, prefix, limits)),
            devices: Arc::new(RedisDeviceRegistry::new(open()?, prefix)),
            quota: Arc::new(RedisQuotaStore::new(
                open()?,
                prefix,
                &format!("{client_name}-{}", ulid::Ulid::new()),
                config.limits.quota_lease,
            )),
            sessions,
        })
    }
}

/// Every handle of one node.
pub struct App {
    /// The validated configuration.
    pub config: Config,
    /// Username and topic naming.
    pub tenancy: Tenancy,
    /// This process's instance ID: the node name plus a unique suffix.
    pub node_id: String,
    /// Traffic and cluster signals.
    pub bus: Arc<dyn Bus>,
    /// API key records.
    pub keys: Arc<dyn KeyStore>,
    /// Takeover epochs of client IDs.
    pub epochs: Arc<dyn ClientEpochs>,
    /// Downlink queues.
    pub queue: Arc<dyn DownlinkQueue>,
    /// Devices the upstream serves.
    pub devices: Arc<dyn DeviceRegistry>,
    /// Cached key verification.
    pub auth: Arc<Authenticator>,
    /// Downlink validation, queueing and events.
    pub downlinks: DownlinkService,
    /// Fan-out from the bus to local subscribers.
    pub router: Router,
    /// Live connections.
    pub registry: Arc<Registry>,
    /// Rate limits and connection quotas.
    pub limits: Arc<Limits>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Set when the node starts draining.
    pub draining: AtomicBool,
    /// The bounds on pending handshakes and established connections.
    pub admission: Admission,
    /// One refusal log line per peer per interval.
    pub refusal_log: LogLimiter,
    /// Emits live events (rate-limited, never blocking).
    pub events: Arc<Publisher>,
    /// This node's live event streams.
    pub event_hub: Arc<Hub>,
    /// Message counters per application (`/stats`).
    pub stats: Arc<TrafficStats>,
    /// Where persistent sessions are kept.
    pub sessions: Arc<dyn SessionStore>,
}

impl App {
    /// Wires a node from its configuration and backends.
    pub fn new(config: Config, backends: Backends) -> Arc<Self> {
        let tenancy = config.tenancy();
        let metrics = Arc::new(Metrics::default());
        let auth = Arc::new(Authenticator::new(
            backends.keys.clone(),
            &CacheSettings {
                ttl: config.auth.cache_ttl,
                negative_ttl: config.auth.negative_cache_ttl,
                capacity: config.auth.cache_capacity,
                max_tombstones: config.auth.max_tombstones,
                tombstones_dropped: metrics.tombstones_dropped.clone(),
            },
        ));
        backends.bus.count_drops_in(
            metrics
                .bus_dropped
                .get_or_create(&ReasonLabels {
                    reason: "slow_consumer",
                })
                .clone(),
        );
        backends
            .sessions
            .count_expiries_in(metrics.sessions_expired.clone());
        let admission = Admission::new(
            config.mqtt.max_connections,
            config.mqtt.max_pending_handshakes,
            metrics.pending_handshakes.clone(),
        );
        let max_tracked = config.limits.max_tracked_keys;
        let events = Arc::new(Publisher::new(
            &config.events,
            &config.node_name,
            max_tracked,
            metrics.events_dropped.clone(),
            metrics.events_published.clone(),
        ));
        let event_hub = Arc::new(Hub::new(
            backends.bus.clone(),
            config.events.clone(),
            &config.node_name,
            max_tracked,
            metrics.events_dropped.clone(),
            metrics.event_streams.clone(),
        ));
        let stats = Arc::new(TrafficStats::new(config.events.max_stats_applications));
        Arc::new(Self {
            node_id: format!("{}-{}", config.node_name, ulid::Ulid::new()),
            router: Router::new(backends.bus.clone(), tenancy.clone(), metrics.clone())
                .with_stats(stats.clone()),
            events,
            event_hub,
            stats,
            sessions: backends.sessions.clone(),
            downlinks: DownlinkService::new(
                backends.queue.clone(),
                backends.devices.clone(),
                backends.bus.clone(),
                ServiceSettings::from_config(&config.downlink),
            ),
            tenancy,
            bus: backends.bus,
            keys: backends.keys,
            epochs: backends.epochs,
            queue: backends.queue,
            devices: backends.devices,
            registry: Arc::new(Registry::new(auth.revocations().clone())),
            auth,
            limits: Arc::new(Limits::new(
                config.limits.clone(),
                backends.quota,
                metrics.clone(),
            )),
            metrics,
            draining: AtomicBool::new(false),
            admission,
            refusal_log: LogLimiter::new(REFUSAL_LOG_INTERVAL, REFUSAL_LOG_PEERS),
            config,
        })
    }

    /// Whether the node can serve: bus and stores reachable, not draining. Returns what
    /// is wrong otherwise.
    pub async fn readiness(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.draining.load(std::sync::atomic::Ordering::Acquire) {
            problems.push("draining".to_owned());
        }
        if !self.bus.is_ready() {
            problems.push("bus not connected".to_owned());
        }
        // Concurrently: while Redis is down each ping takes its whole operation timeout, and
        // one after the other they would outlast a probe's timeout.
        let (keys, queue) = tokio::join!(self.keys.ping(), self.queue.ping());
        if let Err(e) = keys {
            problems.push(e.to_string());
        }
        if let Err(e) = queue {
            problems.push(e.to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
