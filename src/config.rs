//! Configuration: one typed [`Config`], loaded by figment from built-in defaults ← a TOML
//! file ← `LORABROKER_*` environment variables (nested with `__`) ← command-line flags,
//! then validated before any port is bound. Every problem is reported at once, by key.
//!
//! `config/lorabroker.toml` documents every key with its default.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topic::{Id, Tenancy, MAX_TRAFFIC_TOPIC_LEN};

mod load;
mod nats;

pub use nats::{NatsAuth, NatsConfig, DEFAULT_SUBSCRIPTION_CAPACITY};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "config/lorabroker.toml";

/// Settings outside any section, which environment variables name without `__`.
const TOP_LEVEL_KEYS: &[&str] = &["node_name"];

/// Why the configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file does not exist.
    #[error("config file {0} not found")]
    MissingFile(String),
    /// Every problem found, one line each, naming the key (and where it was set).
    #[error("{}", problems(.0))]
    Invalid(Vec<String>),
}

fn problems(lines: &[String]) -> String {
    match lines {
        [one] => format!("invalid configuration: {one}"),
        many => format!(
            "invalid configuration ({} problems):\n  {}",
            many.len(),
            many.join("\n  ")
        ),
    }
}

/// The whole configuration of a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Name of this node in logs, metrics and cluster signals; defaults to the hostname.
    pub node_name: String,
    /// MQTT listener and protocol limits.
    pub mqtt: MqttConfig,
    /// HTTP listener (health, metrics, admin API).
    pub http: HttpConfig,
    /// Single- or multi-tenant naming.
    pub tenancy: TenancyConfig,
    /// API key cache.
    pub auth: AuthConfig,
    /// Downlink queues.
    pub downlink: DownlinkConfig,
    /// NATS bus; empty URL means the embedded bus.
    pub nats: NatsConfig,
    /// Redis stores; empty URL means in-memory stores.
    pub redis: RedisConfig,
    /// Rate limits and connection quotas.
    pub limits: crate::limits::LimitsConfig,
    /// Live events and their streams.
    pub events: crate::events::EventsConfig,
    /// Persistent sessions (`clean_session=0`) and their bounds.
    pub sessions: crate::sessions::SessionsConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Logging.
    pub log: LogConfig,
    /// The console page and the public addresses it shows.
    pub console: crate::console::ConsoleConfig,
}

/// `[mqtt]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Address of the MQTT listener.
    pub listen: String,
    /// Time a client has to send CONNECT after the TCP connection opens.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest accepted packet (remaining length, bytes); larger packets close the connection.
    pub max_packet_size: usize,
    /// Most concurrent connections on this node.
    pub max_connections: usize,
    /// Longest client ID accepted.
    pub max_client_id_len: usize,
    /// Most subscription filters one connection holds; more get SUBACK 0x80.
    pub max_subscriptions: usize,
    /// Longest subscription filter accepted, in bytes; longer ones get SUBACK 0x80.
    pub max_filter_length: usize,
    /// Bytes queued for one slow subscriber before its messages are dropped.
    pub outbound_buffer_bytes: usize,
    /// Time a blocked socket write may take before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Most QoS 2 PUBLISH packet IDs one connection may hold unreleased (PUBREC sent, no
    /// PUBREL yet); one more closes the connection.
    pub max_inflight_qos2: usize,
    /// QoS 1 messages sent to one connection and not acknowledged yet; more wait (within
    /// `outbound_buffer_bytes`) until PUBACKs make room.
    pub max_inflight: usize,
    /// Longest keepalive a client is held to; a client asking 0 (none) or more gets this.
    #[serde(with = "humantime_serde")]
    pub max_keepalive: Duration,
    /// Largest CONNECT packet (remaining length, bytes), checked as soon as the fixed
    /// header is readable: an unauthenticated socket never makes the node buffer more.
    /// `max_packet_size` applies too when it is smaller.
    pub max_connect_size: usize,
    /// Most sockets waiting for their CONNECT at once, apart from `max_connections`; when
    /// full, the oldest waiting socket is closed to make room for the new one.
    pub max_pending_handshakes: usize,
    /// Whether the plain listener requires a PROXY protocol header (v1 or v2) first.
    pub proxy_protocol: bool,
    /// Time from the TCP accept to the first MQTT byte on every listener (PROXY header,
    /// TLS handshake, WebSocket upgrade); `connect_timeout` starts after it.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// MQTT over TLS, and the certificate of `[mqtt.wss]`.
    pub tls: MqttTlsConfig,
    /// MQTT over WebSocket, and the path and origins of `[mqtt.wss]`.
    pub ws: MqttWsConfig,
    /// MQTT over WebSocket over TLS.
    pub wss: MqttWssConfig,
}

/// `[mqtt.tls]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttTlsConfig {
    /// Address of the MQTT over TLS listener (e.g. `0.0.0.0:8883`); empty: none.
    pub listen: String,
    /// PEM file with the server certificate chain (also used by `[mqtt.wss]`).
    pub cert_file: String,
    /// PEM file with the private key of `cert_file`.
    pub key_file: String,
    /// PEM file of CAs whose client certificates are required; empty: none asked.
    pub client_ca_file: String,
    /// Whether this listener requires a PROXY protocol header first.
    pub proxy_protocol: bool,
    /// How often the three files are read again; a change is loaded for new connections.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for MqttTlsConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            proxy_protocol: false,
            reload_interval: Duration::from_secs(5),
        }
    }
}

/// `[mqtt.ws]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttWsConfig {
    /// Address of the MQTT over WebSocket listener (e.g. `0.0.0.0:8083`); empty: none.
    pub listen: String,
    /// The HTTP path of the upgrade (also for `[mqtt.wss]`).
    pub path: String,
    /// `Origin` headers accepted (e.g. `https://console.example.com`); empty: any.
    pub allowed_origins: Vec<String>,
    /// Whether this listener requires a PROXY protocol header first.
    pub proxy_protocol: bool,
}

impl Default for MqttWsConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            path: "/mqtt".into(),
            allowed_origins: Vec::new(),
            proxy_protocol: false,
        }
    }
}

/// `[mqtt.wss]`
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttWssConfig {
    /// Address of the MQTT over WebSocket over TLS listener (e.g. `0.0.0.0:8084`); empty:
    /// none. The certificate is `[mqtt.tls]`'s; the path and origins are `[mqtt.ws]`'s.
    pub listen: String,
    /// Whether this listener requires a PROXY protocol header first.
    pub proxy_protocol: bool,
}

/// `[http]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP listener.
    pub listen: String,
    /// Bearer token of the admin API; empty disables the admin API.
    pub admin_token: String,
    /// Address of a second listener serving only `/healthz`, `/readyz` and `/metrics`;
    /// empty serves them on `listen` only.
    pub metrics_listen: String,
    /// Bearer token `/metrics` requires; empty leaves it open.
    pub metrics_token: String,
    /// Time a client has to send a request's headers; slower connections are closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request body (bytes); larger ones get 413.
    pub max_body_bytes: usize,
    /// Most concurrent HTTP connections per listener; further ones wait in the backlog.
    pub max_connections: usize,
}

/// `[tenancy]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenancyConfig {
    /// `"multi"` (username `{app}@{tenant}`) or `"single"` (username `{app}`).
    pub mode: String,
    /// Internal tenant of every application in single-tenant mode.
    pub default_tenant: String,
}

/// `[auth]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// How long a verified key is cached (revocation evicts it at once).
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How long an unknown key ID is cached.
    #[serde(with = "humantime_serde")]
    pub negative_cache_ttl: Duration,
    /// Most cached keys.
    pub cache_capacity: u64,
    /// Most revocations remembered (for `cache_ttl`), so that a key read before its
    /// revocation is never cached or accepted.
    pub max_tombstones: usize,
}

/// `[downlink]`: the bounds of downlink requests and queues (DESIGN §5, §9).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownlinkConfig {
    /// Most queued downlinks per device.
    pub queue_capacity: usize,
    /// Most items in one `down/push` or `down/replace` request.
    pub max_items_per_request: usize,
    /// Largest `decoded_payload` of one item, as JSON bytes.
    pub max_decoded_payload_bytes: usize,
    /// Most bytes queued for one device.
    pub max_device_queue_bytes: u64,
    /// Most bytes queued for all devices of one application.
    pub max_application_queue_bytes: u64,
    /// Most bytes queued for all applications of one tenant.
    pub max_tenant_queue_bytes: u64,
    /// A queue nothing was written to for this long is deleted.
    #[serde(with = "humantime_serde")]
    pub queue_idle_expiry: Duration,
    /// Refuse downlinks to devices the upstream has not registered.
    pub require_known_device: bool,
}

/// `[redis]`: where the stores live and how to reach them (see [`crate::redis_conn`]).
/// Secrets are never in here: passwords are read from files when the node starts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `standalone` (one Redis at [`RedisConfig::url`]), `sentinel` or `cluster`.
    pub mode: String,
    /// Redis URL of the standalone mode; empty keeps keys and queues in memory.
    pub url: String,
    /// ACL user for the data nodes; empty keeps the URL's (or `default`).
    pub username: String,
    /// File holding the data nodes' password (a mounted Secret); empty keeps the URL's.
    pub password_file: String,
    /// PEM CA bundle that verifies the servers of `rediss://` URLs; empty: system roots.
    pub tls_ca_file: String,
    /// PEM client certificate chain presented to Redis over TLS (with `tls_key_file`).
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// Sentinel mode: the name of the monitored master.
    pub sentinel_master: String,
    /// Sentinel mode: the sentinels' URLs (`redis://` or `rediss://`, a list or one
    /// comma-separated string).
    #[serde(deserialize_with = "url_list")]
    pub sentinel_urls: Vec<String>,
    /// Sentinel mode: ACL user for the sentinels themselves; empty: the URLs'.
    pub sentinel_username: String,
    /// Sentinel mode: file holding the sentinels' password; empty: the URLs'.
    pub sentinel_password_file: String,
    /// Cluster mode: seed node URLs (a list or one comma-separated string).
    #[serde(deserialize_with = "url_list")]
    pub cluster_urls: Vec<String>,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// How long Redis keeps a client ID's takeover epoch counter after its last CONNECT.
    #[serde(with = "humantime_serde")]
    pub takeover_epoch_ttl: Duration,
}

/// The Redis modes `redis.mode` accepts.
pub const REDIS_MODES: [&str; 3] = ["standalone", "sentinel", "cluster"];
/// URL schemes of a TCP Redis node (standalone also takes Unix sockets).
const REDIS_TCP_SCHEMES: [&str; 2] = ["redis://", "rediss://"];

impl RedisConfig {
    /// Whether the stores live in Redis (else in memory): a URL for the mode is set.
    pub fn is_enabled(&self) -> bool {
        match self.mode.as_str() {
            "sentinel" => !self.sentinel_urls.is_empty(),
            "cluster" => !self.cluster_urls.is_empty(),
            _ => !self.url.is_empty(),
        }
    }

    /// What the node talks to, for logs and errors, credentials masked: `Redis at
    /// redis://***@h:6379`, `Redis master mymaster via sentinels …`, `Redis Cluster
    /// (seeds …)`.
    pub fn describe(&self) -> String {
        let list = |urls: &[String]| {
            urls.iter()
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.mode.as_str() {
            "sentinel" => format!(
                "Redis master {:?} via sentinels {}",
                self.sentinel_master,
                list(&self.sentinel_urls)
            ),
            "cluster" => format!("Redis Cluster (seeds {})", list(&self.cluster_urls)),
            _ => format!("Redis at {}", redact_url(&self.url)),
        }
    }

    /// The problems of the connection settings, for [`Config::validate`].
    fn validate(&self, errors: &mut Vec<String>) {
        if !REDIS_MODES.contains(&self.mode.as_str()) {
            errors.push(format!(
                "redis.mode: {:?} is none of \"standalone\", \"sentinel\", \"cluster\"",
                self.mode
            ));
            return;
        }
        if !(self.url.is_empty()
            || ["redis://", "rediss://", "redis+unix://", "unix://"]
                .iter()
                .any(|s| self.url.starts_with(s)))
        {
            errors.push(format!(
                "redis.url: {:?} is not a redis:// URL",
                redact_url(&self.url)
            ));
        }
        for (key, urls) in [
            ("redis.sentinel_urls", &self.sentinel_urls),
            ("redis.cluster_urls", &self.cluster_urls),
        ] {
            for url in urls {
                if !REDIS_TCP_SCHEMES.iter().any(|s| url.starts_with(s)) {
                    errors.push(format!(
                        "{key}: {:?} is not a redis:// or rediss:// URL",
                        redact_url(url)
                    ));
                }
            }
            let schemes: std::collections::BTreeSet<bool> =
                urls.iter().map(|u| u.starts_with("rediss://")).collect();
            if schemes.len() > 1 {
                errors.push(format!(
                    "{key}: mixes redis:// and rediss:// URLs; use one scheme for all"
                ));
            }
        }
        match self.mode.as_str() {
            "sentinel" if self.sentinel_urls.is_empty() != self.sentinel_master.is_empty() => {
                errors.push(
                    "redis.sentinel_master and redis.sentinel_urls: the sentinel mode needs both"
                        .into(),
                )
            }
            "standalone" | "cluster" if !self.sentinel_master.is_empty() || !self.sentinel_urls.is_empty() => errors.push(format!(
                "redis.sentinel_master, redis.sentinel_urls: only for redis.mode = \"sentinel\" (it is {:?})",
                self.mode
            )),
            _ => {}
        }
        if self.mode != "cluster" && !self.cluster_urls.is_empty() {
            errors.push(format!(
                "redis.cluster_urls: only for redis.mode = \"cluster\" (it is {:?})",
                self.mode
            ));
        }
        if self.mode != "standalone" && !self.url.is_empty() {
            errors.push(format!(
                "redis.url: only for redis.mode = \"standalone\" (it is {:?}); use redis.{}",
                self.mode,
                if self.mode == "sentinel" {
                    "sentinel_urls"
                } else {
                    "cluster_urls"
                }
            ));
        }
        let tls_urls = match self.mode.as_str() {
            "sentinel" => self
                .sentinel_urls
                .iter()
                .all(|u| u.starts_with("rediss://")),
            "cluster" => self.cluster_urls.iter().all(|u| u.starts_with("rediss://")),
            _ => self.url.starts_with("rediss://"),
        };
        for (key, file) in [
            ("redis.tls_ca_file", &self.tls_ca_file),
            ("redis.tls_cert_file", &self.tls_cert_file),
        ] {
            if !file.is_empty() && self.is_enabled() && !tls_urls {
                errors.push(format!(
                    "{key}: set, but the Redis URLs are not rediss:// (TLS) URLs"
                ));
            }
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            errors.push(
                "redis.tls_cert_file and redis.tls_key_file: a client certificate needs both"
                    .into(),
            );
        }
    }
}

/// A list of URLs given either as a list or as one comma-separated string (as an
/// environment variable such as `LORABROKER_REDIS__SENTINEL_URLS` gives it).
fn url_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Urls;
    impl<'de> serde::de::Visitor<'de> for Urls {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of URLs or one comma-separated string of URLs")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut urls = Vec::new();
            while let Some(url) = seq.next_element::<String>()? {
                urls.extend(serde::de::Visitor::visit_str::<A::Error>(Urls, &url)?);
            }
            Ok(urls)
        }
    }
    d.deserialize_any(Urls)
}

/// `[shutdown]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Time spent draining after SIGTERM: clients are disconnected spread over it.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

/// `[log]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Filter directive, e.g. `info` or `lorabroker=debug,info`.
    pub level: String,
    /// `"text"` or `"json"`.
    pub format: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: std::env::var("HOSTNAME").unwrap_or_else(|_| "lorabroker".into()),
            mqtt: MqttConfig::default(),
            http: HttpConfig::default(),
            tenancy: TenancyConfig::default(),
            auth: AuthConfig::default(),
            downlink: DownlinkConfig::default(),
            nats: NatsConfig::default(),
            redis: RedisConfig::default(),
            limits: crate::limits::LimitsConfig::default(),
            events: crate::events::EventsConfig::default(),
            sessions: crate::sessions::SessionsConfig::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
            console: crate::console::ConsoleConfig::default(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1883".into(),
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 64 * 1024,
            max_connections: 100_000,
            max_client_id_len: 256,
            max_subscriptions: 100,
            max_filter_length: 256,
            outbound_buffer_bytes: 1024 * 1024,
            write_timeout: Duration::from_secs(30),
            max_inflight_qos2: 64,
            max_inflight: 100,
            max_keepalive: Duration::from_secs(3600),
            max_connect_size: 4096,
            max_pending_handshakes: 1024,
            proxy_protocol: false,
            handshake_timeout: Duration::from_secs(10),
            tls: MqttTlsConfig::default(),
            ws: MqttWsConfig::default(),
            wss: MqttWssConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            admin_token: String::new(),
            metrics_listen: String::new(),
            metrics_token: String::new(),
            header_read_timeout: Duration::from_secs(10),
            max_body_bytes: 64 * 1024,
            max_connections: 1024,
        }
    }
}

impl Default for TenancyConfig {
    fn default() -> Self {
        Self {
            mode: "multi".into(),
            default_tenant: "default".into(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_secs(300),
            negative_cache_ttl: Duration::from_secs(5),
            cache_capacity: 100_000,
            max_tombstones: 10_000,
        }
    }
}

impl Default for DownlinkConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            max_items_per_request: 16,
            max_decoded_payload_bytes: 4096,
            max_device_queue_bytes: 1024 * 1024,
            max_application_queue_bytes: 32 * 1024 * 1024,
            max_tenant_queue_bytes: 128 * 1024 * 1024,
            queue_idle_expiry: Duration::from_secs(7 * 24 * 3600),
            require_known_device: true,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: "standalone".into(),
            url: String::new(),
            username: String::new(),
            password_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            sentinel_master: String::new(),
            sentinel_urls: Vec::new(),
            sentinel_username: String::new(),
            sentinel_password_file: String::new(),
            cluster_urls: Vec::new(),
            key_prefix: "lorabroker".into(),
            takeover_epoch_ttl: Duration::from_secs(3600),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(25),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

impl Config {
    /// Loads defaults ← `file` (or [`DEFAULT_CONFIG_FILE`] if present) ← environment ←
    /// `overrides` (command-line flags, as a partial nested map), then validates. The
    /// error lists every problem, each naming its key and where it was set.
    pub fn load(file: Option<&Path>, overrides: impl Serialize) -> Result<Config, ConfigError> {
        load::load(file, overrides)
    }

    /// Checks value ranges and formats, naming every bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, msg: String| {
            if !ok {
                errors.push(msg)
            }
        };
        check(
            self.mqtt.listen.parse::<SocketAddr>().is_ok(),
            format!(
                "mqtt.listen: {:?} is not an address like 0.0.0.0:1883",
                self.mqtt.listen
            ),
        );
        check(
            self.http.listen.parse::<SocketAddr>().is_ok(),
            format!(
                "http.listen: {:?} is not an address like 0.0.0.0:8080",
                self.http.listen
            ),
        );
        check(
            !self.mqtt.connect_timeout.is_zero(),
            "mqtt.connect_timeout: must be more than 0s".into(),
        );
        check(
            (16..=268_435_455).contains(&self.mqtt.max_packet_size),
            format!(
                "mqtt.max_packet_size: {} out of range 16..=268435455",
                self.mqtt.max_packet_size
            ),
        );
        check(
            self.mqtt.max_connections > 0,
            "mqtt.max_connections: must be at least 1".into(),
        );
        check(
            (23..=65_535).contains(&self.mqtt.max_client_id_len),
            format!(
                "mqtt.max_client_id_len: {} out of range 23..=65535",
                self.mqtt.max_client_id_len
            ),
        );
        check(
            (1..=100_000).contains(&self.mqtt.max_subscriptions),
            format!(
                "mqtt.max_subscriptions: {} out of range 1..=100000",
                self.mqtt.max_subscriptions
            ),
        );
        check(
            (MAX_TRAFFIC_TOPIC_LEN..=65_535).contains(&self.mqtt.max_filter_length),
            format!(
                "mqtt.max_filter_length: {} out of range {MAX_TRAFFIC_TOPIC_LEN}..=65535 \
                 (the longest topic a client receives is {MAX_TRAFFIC_TOPIC_LEN} bytes)",
                self.mqtt.max_filter_length
            ),
        );
        check(
            self.mqtt.outbound_buffer_bytes >= 1024,
            format!(
                "mqtt.outbound_buffer_bytes: {} is less than 1024",
                self.mqtt.outbound_buffer_bytes
            ),
        );
        check(
            !self.mqtt.write_timeout.is_zero(),
            "mqtt.write_timeout: must be more than 0s".into(),
        );
        check(
            (1..=65_535).contains(&self.mqtt.max_inflight_qos2),
            format!(
                "mqtt.max_inflight_qos2: {} out of range 1..=65535",
                self.mqtt.max_inflight_qos2
            ),
        );
        check(
            (1..=65_535).contains(&self.mqtt.max_inflight),
            format!(
                "mqtt.max_inflight: {} out of range 1..=65535",
                self.mqtt.max_inflight
            ),
        );
        check(
            (64..=268_435_455).contains(&self.mqtt.max_connect_size),
            format!(
                "mqtt.max_connect_size: {} out of range 64..=268435455",
                self.mqtt.max_connect_size
            ),
        );
        check(
            self.mqtt.max_pending_handshakes > 0,
            "mqtt.max_pending_handshakes: must be at least 1".into(),
        );
        check(
            !self.mqtt.handshake_timeout.is_zero(),
            "mqtt.handshake_timeout: must be more than 0s".into(),
        );
        for (key, addr) in [
            ("mqtt.tls.listen", &self.mqtt.tls.listen),
            ("mqtt.ws.listen", &self.mqtt.ws.listen),
            ("mqtt.wss.listen", &self.mqtt.wss.listen),
        ] {
            check(
                addr.is_empty() || addr.parse::<SocketAddr>().is_ok(),
                format!("{key}: {addr:?} is neither empty nor an address like 0.0.0.0:8883"),
            );
        }
        let tls = &self.mqtt.tls;
        if !tls.listen.is_empty() || !self.mqtt.wss.listen.is_empty() {
            for (key, file) in [
                ("mqtt.tls.cert_file", &tls.cert_file),
                ("mqtt.tls.key_file", &tls.key_file),
            ] {
                check(
                    !file.is_empty(),
                    format!("{key}: must name a PEM file when mqtt.tls.listen or mqtt.wss.listen is set"),
                );
            }
        }
        check(
            !tls.reload_interval.is_zero(),
            "mqtt.tls.reload_interval: must be more than 0s".into(),
        );
        check(
            self.mqtt.ws.path.starts_with('/') && !self.mqtt.ws.path.contains(['?', '#', ' ']),
            format!(
                "mqtt.ws.path: {:?} is not a path like /mqtt",
                self.mqtt.ws.path
            ),
        );
        for origin in &self.mqtt.ws.allowed_origins {
            check(
                origin.contains("://"),
                format!(
                    "mqtt.ws.allowed_origins: {origin:?} is not an origin like https://console.example.com"
                ),
            );
        }
        check(
            self.http.metrics_listen.is_empty()
                || self.http.metrics_listen.parse::<SocketAddr>().is_ok(),
            format!(
                "http.metrics_listen: {:?} is neither empty nor an address like 0.0.0.0:9090",
                self.http.metrics_listen
            ),
        );
        check(
            !self.http.header_read_timeout.is_zero(),
            "http.header_read_timeout: must be more than 0s".into(),
        );
        check(
            self.http.max_body_bytes >= 1024,
            format!(
                "http.max_body_bytes: {} is less than 1024",
                self.http.max_body_bytes
            ),
        );
        check(
            self.http.max_connections > 0,
            "http.max_connections: must be at least 1".into(),
        );
        check(
            matches!(self.tenancy.mode.as_str(), "single" | "multi"),
            format!(
                "tenancy.mode: {:?} is neither \"single\" nor \"multi\"",
                self.tenancy.mode
            ),
        );
        check(
            Id::parse(&self.tenancy.default_tenant).is_ok(),
            format!(
                "tenancy.default_tenant: {:?} is not a valid ID",
                self.tenancy.default_tenant
            ),
        );
        check(
            self.auth.cache_capacity > 0,
            "auth.cache_capacity: must be at least 1".into(),
        );
        check(
            self.auth.max_tombstones > 0,
            "auth.max_tombstones: must be at least 1".into(),
        );
        check(
            (1..=1_000_000).contains(&self.downlink.queue_capacity),
            format!(
                "downlink.queue_capacity: {} out of range 1..=1000000",
                self.downlink.queue_capacity
            ),
        );
        check(
            (1..=1000).contains(&self.downlink.max_items_per_request),
            format!(
                "downlink.max_items_per_request: {} out of range 1..=1000",
                self.downlink.max_items_per_request
            ),
        );
        check(
            (2..=1024 * 1024).contains(&self.downlink.max_decoded_payload_bytes),
            format!(
                "downlink.max_decoded_payload_bytes: {} out of range 2..=1048576",
                self.downlink.max_decoded_payload_bytes
            ),
        );
        for (key, value) in [
            (
                "max_device_queue_bytes",
                self.downlink.max_device_queue_bytes,
            ),
            (
                "max_application_queue_bytes",
                self.downlink.max_application_queue_bytes,
            ),
            (
                "max_tenant_queue_bytes",
                self.downlink.max_tenant_queue_bytes,
            ),
        ] {
            check(
                (1024..=1 << 40).contains(&value),
                format!("downlink.{key}: {value} out of range 1024..=1099511627776"),
            );
        }
        check(
            (Duration::from_secs(1)..=Duration::from_secs(3650 * 24 * 3600))
                .contains(&self.downlink.queue_idle_expiry),
            format!(
                "downlink.queue_idle_expiry: {} out of range 1s..=3650days",
                humantime::format_duration(self.downlink.queue_idle_expiry)
            ),
        );
        check(
            !self.redis.key_prefix.is_empty()
                && !self
                    .redis
                    .key_prefix
                    .contains(|c: char| c.is_whitespace() || c == '{' || c == '}'),
            format!(
                "redis.key_prefix: {:?} must be non-empty without spaces or braces (braces would \
                 change the Redis Cluster hash tags)",
                self.redis.key_prefix
            ),
        );
        check(
            self.redis.takeover_epoch_ttl >= Duration::from_secs(1),
            format!(
                "redis.takeover_epoch_ttl: {} is less than 1s",
                humantime::format_duration(self.redis.takeover_epoch_ttl)
            ),
        );
        check(
            matches!(self.log.format.as_str(), "text" | "json"),
            format!(
                "log.format: {:?} is neither \"text\" nor \"json\"",
                self.log.format
            ),
        );
        check(
            is_log_filter(&self.log.level),
            format!(
                "log.level = {:?}: expected {LOG_FILTER_WORDS}",
                self.log.level
            ),
        );
        check(
            !self.node_name.is_empty(),
            "node_name: must not be empty".into(),
        );
        check(
            (1..=65_535).contains(&self.mqtt.max_keepalive.as_secs()),
            format!(
                "mqtt.max_keepalive: {:?} out of range 1s..=65535s",
                self.mqtt.max_keepalive
            ),
        );
        self.nats.validate(&mut errors);
        self.limits.validate(&mut errors);
        self.events.validate(&mut errors);
        self.sessions.validate(&mut errors);
        self.redis.validate(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The tenancy this configuration describes (valid after [`Config::validate`]).
    pub fn tenancy(&self) -> Tenancy {
        match (
            self.tenancy.mode.as_str(),
            Id::parse(&self.tenancy.default_tenant),
        ) {
            ("single", Ok(default_tenant)) => Tenancy::Single { default_tenant },
            _ => Tenancy::Multi,
        }
    }
}

/// What [`is_log_filter`] accepts, for error messages.
pub const LOG_FILTER_WORDS: &str = "a level (error, warn, info, debug, trace or off) or \
     comma-separated target=level directives such as \"lorabroker=debug,info\"";

/// Whether `filter` is a level or `target=level` directives. tracing's own syntax also
/// takes a bare word as a target to log at every level, so a mistyped level such as
/// `verbose` would quietly turn every other log line off: a word must be a level here.
pub fn is_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let is_level = |s: &str| LEVELS.contains(&s.trim().to_ascii_lowercase().as_str());
    !filter.trim().is_empty()
        && filter.split(',').all(|directive| {
            is_level(directive)
                || directive
                    .rsplit_once('=')
                    .is_some_and(|(target, level)| !target.trim().is_empty() && is_level(level))
        })
        && tracing_subscriber::EnvFilter::builder()
            .parse(filter)
            .is_ok()
}

/// `url` with its credentials masked, for logs and error messages
/// (`redis://:pw@h:6379/0` → `redis://***@h:6379/0`).
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Comma-separated URLs (`nats.url`) with each one's credentials masked.
pub fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(redact_url)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documented_defaults_match_the_built_in_ones() {
        // In a jail, like every test that loads: the others set LORABROKER_* variables.
        figment::Jail::expect_with(|_| {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/lorabroker.toml");
            let documented = Config::load(Some(std::path::Path::new(path)), json!({}))
                .map_err(|e| e.to_string())?;
            assert_eq!(
                format!("{documented:?}"),
                format!("{:?}", Config::default()),
                "config/lorabroker.toml must document exactly the built-in defaults"
            );
            Ok(())
        });
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact_url("nats://u:p@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(
            redact_urls("nats://u:p@a:4222,nats://b,tls://t@c"),
            "nats://***@a:4222,nats://b,tls://***@c"
        );
    }

    #[test]
    fn redis_url_lists_come_as_lists_or_comma_separated() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "node.toml",
                "[redis]\nmode = \"cluster\"\ncluster_urls = [\"redis://a:7000\", \"redis://b:7001,redis://c:7002\"]\n",
            )?;
            let c =
                Config::load(Some(Path::new("node.toml")), json!({})).map_err(|e| e.to_string())?;
            assert_eq!(c.redis.cluster_urls.len(), 3);
            assert!(c.redis.is_enabled());
            assert_eq!(
                c.redis.describe(),
                "Redis Cluster (seeds redis://a:7000, redis://b:7001, redis://c:7002)"
            );
            jail.set_env("LORABROKER_REDIS__MODE", "sentinel");
            jail.set_env("LORABROKER_REDIS__CLUSTER_URLS", "");
            jail.set_env(
                "LORABROKER_REDIS__SENTINEL_URLS",
                "redis://:pw@s1:26379, redis://s2:26379",
            );
            jail.set_env("LORABROKER_REDIS__SENTINEL_MASTER", "mymaster");
            let c =
                Config::load(Some(Path::new("node.toml")), json!({})).map_err(|e| e.to_string())?;
            assert_eq!(
                c.redis.sentinel_urls,
                ["redis://:pw@s1:26379", "redis://s2:26379"]
            );
            let described = c.redis.describe();
            assert!(!described.contains("pw"), "{described}");
            Ok(())
        });
    }

    #[test]
    fn redis_settings_that_cannot_work_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LORABROKER_REDIS__SENTINEL_URLS", "7");
            jail.set_env("LORABROKER_REDIS__CLUSTER_URLS", "redis://a:1");
            jail.set_env("LORABROKER_REDIS__URL", "redis://:secret@h:6379");
            jail.set_env("LORABROKER_REDIS__TLS_CA_FILE", "/ca.pem");
            jail.set_env("LORABROKER_REDIS__TLS_KEY_FILE", "/key.pem");
            let err = Config::load(None, json!({})).unwrap_err().to_string();
            for expected in [
                "redis.sentinel_urls = 7: expected a list of URLs",
                "redis.cluster_urls: only for redis.mode = \"cluster\"",
                "redis.tls_ca_file: set, but the Redis URLs are not rediss://",
                "redis.tls_cert_file and redis.tls_key_file",
            ] {
                assert!(err.contains(expected), "{expected:?} not in {err}");
            }
            assert!(!err.contains("secret"), "{err}");
            jail.set_env("LORABROKER_REDIS__MODE", "sentinel");
            jail.set_env("LORABROKER_REDIS__SENTINEL_URLS", "http://s1:26379");
            let err = Config::load(None, json!({})).unwrap_err().to_string();
            for expected in [
                "redis.sentinel_urls: \"http://s1:26379\" is not a redis://",
                "redis.sentinel_master and redis.sentinel_urls: the sentinel mode needs both",
                "redis.url: only for redis.mode = \"standalone\"",
            ] {
                assert!(err.contains(expected), "{expected:?} not in {err}");
            }
            jail.set_env("LORABROKER_REDIS__MODE", "replicated");
            let err = Config::load(None, json!({})).unwrap_err().to_string();
            assert!(
                err.contains("redis.mode: \"replicated\" is none of"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn layers_file_env_and_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "node.toml",
                "node_name = \"from-file\"\n[mqtt]\nlisten = \"127.0.0.1:1999\"\nmax_packet_size = 1000\n",
            )?;
            jail.set_env("LORABROKER_MQTT__MAX_PACKET_SIZE", "2000");
            jail.set_env("LORABROKER_REDIS__URL", "redis://127.0.0.1:6390");
            jail.set_env("LORABROKER_TEST_REDIS_URL", "redis://ignored");
            jail.set_env("LORABROKER_MQTT_SERVICE_HOST", "10.0.0.1");
            jail.set_env("LORABROKER_MQTT_PORT_1883_TCP", "tcp://10.0.0.1:1883");
            jail.set_env("LORABROKER_NODE_NAME", "from-env");
            let c = Config::load(
                Some(Path::new("node.toml")),
                json!({"mqtt": {"listen": "127.0.0.1:2000"}}),
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(c.node_name, "from-env");
            assert_eq!(c.mqtt.max_packet_size, 2000);
            assert_eq!(c.mqtt.listen, "127.0.0.1:2000");
            assert_eq!(c.redis.url, "redis://127.0.0.1:6390");
            assert_eq!(c.mqtt.connect_timeout, Duration::from_secs(10));
            Ok(())
        });
    }

    #[test]
    fn errors_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LORABROKER_MQTT__CONNECT_TIMEOUT", "soon");
            let err = Config::load(None, json!({})).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("mqtt.connect_timeout"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("LORABROKER_MQTT__LISTEN", "nowhere");
            jail.set_env("LORABROKER_TENANCY__MODE", "both");
            let err = Config::load(None, json!({})).unwrap_err().to_string();
            assert!(err.contains("mqtt.listen"), "{err}");
            assert!(err.contains("tenancy.mode"), "{err}");
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("LORABROKER_MQTT__LISTN", "0.0.0.0:1");
            let err = Config::load(None, json!({})).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("listn"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn tenancy_modes() {
        let mut c = Config::default();
        assert_eq!(c.tenancy(), Tenancy::Multi);
        c.tenancy.mode = "single".into();
        assert!(matches!(c.tenancy(), Tenancy::Single { .. }));
    }
}
