//! Brokers and MQTT clients for integration tests: nodes on port 0 with either backend,
//! API keys, and a rumqttc client that records what it receives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;

use lorabroker::app::{App, Backends};
use lorabroker::auth::{create_key, Rights};
use lorabroker::config::Config;
use lorabroker::server::Node;
use lorabroker::topic::{AppRef, DeviceRef, Id};
use lorabroker::upstream::Upstream;

use super::services::{unique, NatsService, RedisService};

/// Which backends a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Embedded bus, in-memory stores.
    Embedded,
    /// NATS and Redis (started for the test or given by the environment).
    Cluster,
}

/// One test's world: its services (for the cluster backend), its own Redis key prefix
/// and its own tenant, so tests never see each other.
pub struct TestEnv {
    /// The backend of this run.
    pub backend: Backend,
    /// Redis, for the cluster backend.
    pub redis: Option<RedisService>,
    /// NATS, for the cluster backend.
    pub nats: Option<NatsService>,
    /// Redis key prefix of this test.
    pub prefix: String,
    /// Tenant of this test.
    pub tenant: Id,
}

impl TestEnv {
    /// Sets up the backend's services.
    pub async fn new(backend: Backend) -> Self {
        let (redis, nats) = match backend {
            Backend::Embedded => (None, None),
            Backend::Cluster => {
                let (r, n) = tokio::join!(RedisService::start(), NatsService::start());
                (Some(r), Some(n))
            }
        };
        Self {
            backend,
            redis,
            nats,
            prefix: unique("lbtest"),
            tenant: Id::parse(&unique("tenant")).expect("unique() gives valid IDs"),
        }
    }

    /// An application of this test's tenant.
    pub fn app(&self, app: &str) -> AppRef {
        AppRef::new(self.tenant.clone(), Id::parse(app).expect("valid app ID"))
    }

    /// A node configuration on free loopback ports for this environment.
    pub fn config(&self) -> Config {
        let mut c = Config {
            node_name: "test".into(),
            ..Config::default()
        };
        c.mqtt.listen = "127.0.0.1:0".into();
        c.http.listen = "127.0.0.1:0".into();
        c.redis.key_prefix = self.prefix.clone();
        c.shutdown.grace_period = Duration::from_millis(500);
        // Tests about something else push to devices that nobody registered; the tests of
        // the device registry turn the check back on (or register with `register_device`).
        c.downlink.require_known_device = false;
        // Tests connect everything from 127.0.0.1, often with one key: the limits are off
        // here, and tests/abuse/ turns on the ones it attacks.
        c.limits = lorabroker::limits::LimitsConfig::unlimited();
        if let (Some(r), Some(n)) = (&self.redis, &self.nats) {
            c.redis.url = r.url.clone();
            c.nats.url = n.url.clone();
        }
        c
    }

    /// Starts a node with this environment's configuration.
    pub async fn node(&self) -> TestNode {
        self.node_with(|_| {}).await
    }

    /// Starts a node on the backends `config` names (`Backends::from_config`, whatever
    /// this environment's backend), as `lorabroker serve` does: e.g. a NATS bus with
    /// in-memory stores.
    pub async fn node_from_config(&self, config: Config) -> TestNode {
        config.validate().expect("test config is valid");
        let backends = Backends::from_config(&config, "test-node")
            .await
            .expect("backends from the config");
        start(config, backends).await
    }

    /// Starts a node after adjusting its configuration.
    pub async fn node_with(&self, tweak: impl FnOnce(&mut Config)) -> TestNode {
        let mut config = self.config();
        tweak(&mut config);
        config.validate().expect("test config is valid");
        let backends = match self.backend {
            Backend::Embedded => Backends::embedded_for(&config),
            Backend::Cluster => Backends::from_config(&config, "test-node")
                .await
                .expect("cluster backends"),
        };
        start(config, backends).await
    }
}

/// Starts a node with the backends that `config` names (`[nats]`, `[redis]` in any mode),
/// as `lorabroker serve` does.
pub async fn node_from_config(config: Config) -> TestNode {
    config.validate().expect("test config is valid");
    let backends = Backends::from_config(&config, "test-node")
        .await
        .expect("backends");
    start(config, backends).await
}

async fn start(config: Config, backends: Backends) -> TestNode {
    let app = App::new(config, backends);
    let node = Node::start(app).await.expect("node starts");
    TestNode {
        mqtt_addr: node.mqtt_addr,
        http_addr: node.http_addr,
        metrics_addr: node.metrics_addr,
        mqtt_listeners: node.mqtt_listeners.clone(),
        app: node.app.clone(),
        node: Some(node),
    }
}

/// A running node.
pub struct TestNode {
    /// MQTT address.
    pub mqtt_addr: SocketAddr,
    /// HTTP address.
    pub http_addr: SocketAddr,
    /// The probes-only HTTP listener, when `http.metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// Every MQTT listener (TCP first) with its address.
    pub mqtt_listeners: Vec<(lorabroker::transport::Kind, SocketAddr)>,
    /// The node's handles.
    pub app: Arc<App>,
    node: Option<Node>,
}

impl TestNode {
    /// Creates an API key for `app` in this node's key store.
    pub async fn key(&self, app: &AppRef, rights: Rights) -> String {
        self.key_expiring(app, rights, None).await
    }

    /// Creates an API key with a lifetime.
    pub async fn key_expiring(
        &self,
        app: &AppRef,
        rights: Rights,
        expires_in: Option<Duration>,
    ) -> String {
        create_key(self.app.keys.as_ref(), app, rights, "test", expires_in)
            .await
            .expect("key stored")
            .0
            .key
    }

    /// The upstream side of this node's backends.
    pub fn upstream(&self) -> Upstream {
        Upstream::new(
            self.app.bus.clone(),
            self.app.queue.clone(),
            self.app.devices.clone(),
        )
    }

    /// Registers `device` in this node's device registry, as its upstream would.
    pub async fn register_device(&self, device: &DeviceRef) {
        self.upstream()
            .register(device)
            .await
            .expect("device registered");
    }

    /// The MQTT username of `app` on this node.
    pub fn username(&self, app: &AppRef) -> String {
        self.app.tenancy.app_uid(app)
    }

    /// Connects an MQTT client for `app` with `key`.
    pub async fn client(&self, app: &AppRef, key: &str) -> TestClient {
        TestClient::connect(self.mqtt_addr, &self.username(app), key, &unique("c"))
            .await
            .expect("client connects")
    }

    /// Where the node's MQTT listener of `kind` is served; panics when it has none.
    pub fn addr(&self, kind: lorabroker::transport::Kind) -> SocketAddr {
        self.node
            .as_ref()
            .and_then(|n| n.addr(kind))
            .unwrap_or_else(|| panic!("the node has no {} listener", kind.as_str()))
    }

    /// The value of one series of this node's `/metrics`, read over HTTP (0 when absent).
    pub async fn metric(&self, series: &str) -> u64 {
        super::http::metric(self.http_addr, series).await
    }

    /// Waits (within [`WAIT`]) until `series` of this node's `/metrics` is `want`; panics
    /// saying `what` did not happen otherwise.
    pub async fn metric_becomes(&self, what: &str, series: &str, want: u64) {
        super::wait::eventually(what, WAIT, || async {
            match self.metric(series).await {
                n if n == want => Ok(()),
                n => Err(format!("{series} is {n}, not {want}")),
            }
        })
        .await;
    }

    /// Drains and stops the node.
    pub async fn shutdown(mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
    }

    /// The node's drain token.
    pub fn shutdown_token(&self) -> tokio_util::sync::CancellationToken {
        self.node
            .as_ref()
            .map(|n| n.shutdown_token())
            .unwrap_or_default()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(n) = &self.node {
            n.shutdown_token().cancel();
        }
    }
}

/// What a test client saw.
#[derive(Debug)]
pub enum Seen {
    /// A PUBLISH.
    Publish {
        /// Its topic.
        topic: String,
        /// Its payload.
        payload: Bytes,
    },
    /// A SUBACK.
    SubAck(Vec<SubscribeReasonCode>),
    /// The connection ended.
    Closed(String),
}

/// A connected rumqttc client whose event loop runs in the background.
pub struct TestClient {
    /// The rumqttc handle.
    pub client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);

impl TestClient {
    /// Connects; `Err` carries the CONNACK code of a refusal (or panics on other errors).
    pub async fn connect(
        addr: SocketAddr,
        username: &str,
        password: &str,
        client_id: &str,
    ) -> Result<TestClient, ConnectReturnCode> {
        let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_credentials(username, password);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        Self::connect_with(opts).await
    }

    /// Connects with full control over the options.
    pub async fn connect_with(opts: MqttOptions) -> Result<TestClient, ConnectReturnCode> {
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        loop {
            match tokio::time::timeout(WAIT, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    assert_eq!(ack.code, ConnectReturnCode::Success);
                    break;
                }
                Ok(Ok(_)) => continue,
                Ok(Err(ConnectionError::ConnectionRefused(code))) => return Err(code),
                Ok(Err(e)) => panic!("connect failed: {e}"),
                Err(_) => panic!("no CONNACK within {WAIT:?}"),
            }
        }
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(pump(eventloop, tx));
        Ok(TestClient { client, seen, task })
    }

    /// Subscribes to one filter at QoS 0 and returns the SUBACK code.
    pub async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtMostOnce)
            .await
            .expect("subscribe request");
        loop {
            match self.next().await {
                Some(Seen::SubAck(codes)) => return codes[0],
                Some(Seen::Publish { .. }) => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// Publishes at QoS 0.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload.into())
            .await
            .expect("publish request");
    }

    /// The next thing seen, within [`WAIT`].
    pub async fn next(&mut self) -> Option<Seen> {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next PUBLISH, within [`WAIT`]; panics on anything else.
    pub async fn next_publish(&mut self) -> (String, Bytes) {
        match self.next().await {
            Some(Seen::Publish { topic, payload }) => (topic, payload),
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }

    /// The next PUBLISH on a topic ending in `suffix`, skipping others.
    pub async fn next_on(&mut self, suffix: &str) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.seen.recv()).await {
                Ok(Some(Seen::Publish { topic, payload })) if topic.ends_with(suffix) => {
                    return serde_json::from_slice(&payload).expect("JSON payload")
                }
                Ok(Some(Seen::Publish { .. })) => continue,
                other => panic!("expected a PUBLISH on …{suffix}, got {other:?}"),
            }
        }
    }

    /// Asserts that nothing arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Ok(Some(seen)) = tokio::time::timeout(d, self.seen.recv()).await {
            panic!("expected nothing, got {seen:?}");
        }
    }

    /// Waits until the server closes the connection; panics if it stays open.
    pub async fn expect_closed(&mut self) -> String {
        loop {
            match self.next().await {
                Some(Seen::Closed(why)) => return why,
                Some(_) => continue,
                None => panic!("connection still open after {WAIT:?}"),
            }
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Seen>) {
    loop {
        let seen = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish {
                topic: p.topic,
                payload: p.payload,
            },
            Ok(Event::Incoming(Packet::SubAck(ack))) => Seen::SubAck(ack.return_codes),
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(Seen::Closed(e.to_string()));
                return;
            }
        };
        if tx.send(seen).is_err() {
            return;
        }
    }
}
