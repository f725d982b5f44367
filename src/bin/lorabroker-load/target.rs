//! The broker under test and how the load generator plays each side of it.
//!
//! - **lorabroker** (`--redis-url` given): clients log in as `{app}@{tenant}` with API keys
//!   that the load generator writes into the cluster's Redis itself (with the library's
//!   [`create_key`], the same code as `lorabroker keys create`); the upstream publishes
//!   device traffic on NATS subjects `v3.{tenant}.{app}.devices.{dev}.up`, which is the
//!   only way traffic enters lorabroker (its MQTT clients cannot publish uplinks).
//! - **any other MQTT broker** (Mosquitto, nats-server's MQTT mode): clients connect
//!   anonymously, and the upstream is one more MQTT connection that publishes at QoS 0 to
//!   the same topics `v3/{app}@{tenant}/devices/{dev}/up`, so subscribers see identical
//!   topics and payloads in both cases. That connection uses the clients' transport
//!   (`--transport`), so the broker pays the same TLS or WebSocket cost on both sides.
//!   For QoS 1 subscribers it publishes at QoS 1 (a broker delivers at the lower of the
//!   publish and subscription QoS), with at most a window of PUBLISHes not yet
//!   acknowledged, reading the PUBACKs as it goes. lorabroker's upstream stays plain NATS:
//!   its sessions stream captures those subjects.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::Subject;
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use lorabroker::auth::redis::RedisKeyStore;
use lorabroker::auth::{create_key, Rights};
use lorabroker::topic::{AppRef, Id};

use crate::dial::Dialer;
use crate::report::CpuMeter;
use crate::wire::{encode_publish, encode_publish_qos1, Conn, Frame, Login};

/// Flush the MQTT upstream's batch once it holds this many bytes.
const MQTT_BATCH: usize = 32 * 1024;
/// How long a QoS 1 upstream waits for the PUBACKs of what it published, at the end.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to reach the broker under test.
#[derive(Clone, Debug)]
pub struct Target {
    /// Label in reports (e.g. `lorabroker-2`, `mosquitto`).
    pub label: String,
    /// MQTT listeners; connections are spread over them round-robin.
    pub addrs: Vec<SocketAddr>,
    /// How connections reach those listeners (TCP, TLS, WS, WSS).
    pub dialer: Dialer,
    /// NATS URL of a lorabroker cluster (the upstream side).
    pub nats_url: Option<String>,
    /// Redis URL of a lorabroker cluster (API keys, downlink queues).
    pub redis_url: Option<String>,
    /// Redis key prefix of the cluster.
    pub redis_prefix: String,
    /// Tenant ID of the load.
    pub tenant: String,
    /// Application ID of the load.
    pub app: String,
    /// Broker process IDs (one per node): RSS and CPU are read from /proc.
    pub broker_pids: Vec<u32>,
    /// Processes the broker needs besides itself (NATS, Redis): their CPU is reported
    /// apart.
    pub aux_pids: Vec<u32>,
}

impl Target {
    /// Whether this is a lorabroker cluster (authenticated clients, NATS upstream).
    pub fn is_lorabroker(&self) -> bool {
        self.redis_url.is_some()
    }

    /// Starts measuring the CPU time of the broker and its backing services.
    pub fn cpu_meter(&self) -> CpuMeter {
        CpuMeter::start(&self.broker_pids, &self.aux_pids)
    }

    /// The listener for the `i`-th connection.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i % self.addrs.len()]
    }

    /// `{app}@{tenant}`: the username and topic prefix of the application.
    pub fn uid(&self) -> String {
        format!("{}@{}", self.app, self.tenant)
    }

    /// Topic of an event of device `dev`, e.g. `v3/{uid}/devices/{dev}/up`.
    pub fn topic(&self, dev: &str, event: &str) -> String {
        format!("v3/{}/devices/{dev}/{event}", self.uid())
    }

    /// Name of the `i`-th device.
    pub fn device(i: usize) -> String {
        format!("dev{i}")
    }

    /// `n` logins for lorabroker: `distinct` keys created in Redis (one key shared by all
    /// when `distinct` is false); `None` for anonymous brokers.
    pub async fn logins(&self, n: usize, distinct: bool) -> anyhow::Result<Option<Vec<Login>>> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        let store = RedisKeyStore::connect(url, &self.redis_prefix).await?;
        let app = AppRef::new(
            Id::parse(&self.tenant).context("--tenant")?,
            Id::parse(&self.app).context("--app")?,
        );
        let count = if distinct { n } else { 1 };
        let mut keys = Vec::with_capacity(count);
        for _ in 0..count {
            let (generated, _) = create_key(&store, &app, Rights::DEFAULT, "lorabroker-load", None)
                .await
                .context("creating an API key in Redis")?;
            keys.push(Login {
                username: self.uid(),
                password: generated.key,
            });
        }
        Ok(Some(keys))
    }

    /// Connects the upstream that publishes uplinks of `devices` (by index), at QoS 0; with
    /// `qos1_window` an MQTT upstream publishes at QoS 1 with at most that many PUBLISHes
    /// unacknowledged (lorabroker's NATS upstream is the same either way).
    pub async fn upstream(
        &self,
        devices: usize,
        qos1_window: Option<usize>,
    ) -> anyhow::Result<Upstream> {
        if self.is_lorabroker() {
            let url = self
                .nats_url
                .as_deref()
                .context("a lorabroker target needs --nats-url for its upstream")?;
            let client = async_nats::connect(url)
                .await
                .with_context(|| format!("connecting to NATS at {url}"))?;
            let subjects = (0..devices)
                .map(|i| {
                    Subject::from(format!(
                        "v3.{}.{}.devices.{}.up",
                        self.tenant,
                        self.app,
                        Self::device(i)
                    ))
                })
                .collect();
            Ok(Upstream::Nats { client, subjects })
        } else {
            let conn = Conn::connect(
                &self.dialer,
                self.addr(0),
                &format!("lbload-up-{}", std::process::id()),
                None,
            )
            .await
            .context("connecting the MQTT upstream")?;
            let topics = (0..devices)
                .map(|i| self.topic(&Self::device(i), "up"))
                .collect();
            if let Some(window) = qos1_window {
                let window = window.clamp(1, usize::from(u16::MAX) - 1);
                return Ok(Upstream::MqttQos1(Qos1Publisher {
                    conn,
                    topics,
                    batch: BytesMut::with_capacity(MQTT_BATCH * 2),
                    in_flight: vec![false; usize::from(u16::MAX) + 1],
                    count: 0,
                    next: 1,
                    window,
                    unexpected_acks: 0,
                }));
            }
            Ok(Upstream::Mqtt {
                conn,
                topics,
                batch: BytesMut::with_capacity(MQTT_BATCH * 2),
            })
        }
    }
}

/// The side that publishes device traffic into the broker.
pub enum Upstream {
    /// lorabroker: NATS subjects.
    Nats {
        /// The NATS client.
        client: async_nats::Client,
        /// Subject per device.
        subjects: Vec<Subject>,
    },
    /// Other brokers: QoS 0 PUBLISH on one MQTT connection, written in batches.
    Mqtt {
        /// The connection.
        conn: Conn,
        /// Topic per device.
        topics: Vec<String>,
        /// Frames not written yet.
        batch: BytesMut,
    },
    /// Other brokers, for QoS 1 subscribers: QoS 1 PUBLISH on one MQTT connection.
    MqttQos1(Qos1Publisher),
}

/// An MQTT publisher at QoS 1 with a bounded window of unacknowledged PUBLISHes.
pub struct Qos1Publisher {
    conn: Conn,
    topics: Vec<String>,
    /// Frames not written yet.
    batch: BytesMut,
    /// Packet IDs awaiting their PUBACK.
    in_flight: Vec<bool>,
    /// How many of them.
    count: usize,
    /// The next packet ID to try.
    next: u16,
    /// Unacknowledged PUBLISHes at most.
    window: usize,
    /// PUBACKs of packet IDs that were not in flight.
    unexpected_acks: u64,
}

impl Qos1Publisher {
    /// Reads the PUBACKs that arrived: waits for at least one read when `block`, else
    /// takes only what is already there.
    async fn read_acks(&mut self, block: bool) -> anyhow::Result<()> {
        let Qos1Publisher {
            conn,
            in_flight,
            count,
            unexpected_acks,
            ..
        } = self;
        let mut on_frame = |f: Frame<'_>| {
            if let Frame::PubAck(id) = f {
                let slot = &mut in_flight[usize::from(id)];
                if *slot {
                    *slot = false;
                    *count -= 1;
                } else {
                    *unexpected_acks += 1;
                }
            }
        };
        let open = if block {
            conn.read_packets(&mut on_frame).await?
        } else {
            match conn.read_packets(&mut on_frame).now_or_never() {
                Some(r) => r?,
                None => true,
            }
        };
        anyhow::ensure!(open, "the broker closed the QoS 1 upstream");
        Ok(())
    }

    /// Queues one QoS 1 PUBLISH, first waiting (reading PUBACKs) while the window is full.
    async fn publish(&mut self, dev: usize, payload: &[u8]) -> anyhow::Result<()> {
        self.read_acks(false).await?;
        while self.count >= self.window {
            self.flush().await?;
            self.read_acks(true).await?;
        }
        while self.in_flight[usize::from(self.next)] {
            self.next = self.next.checked_add(1).unwrap_or(1);
        }
        let id = self.next;
        self.next = self.next.checked_add(1).unwrap_or(1);
        self.in_flight[usize::from(id)] = true;
        self.count += 1;
        let topic = &self.topics[dev % self.topics.len()];
        encode_publish_qos1(&mut self.batch, topic, id, payload);
        if self.batch.len() >= MQTT_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.batch.is_empty() {
            self.conn.send(&self.batch).await?;
            self.batch.clear();
        }
        Ok(())
    }

    /// Flushes and waits until every PUBLISH is acknowledged (within [`SETTLE_TIMEOUT`]).
    async fn settle(&mut self) -> anyhow::Result<()> {
        self.flush().await?;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while self.count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(
                !left.is_zero(),
                "{} QoS 1 PUBLISHes not acknowledged within {SETTLE_TIMEOUT:?}",
                self.count
            );
            // A timeout only ends this wait; the loop checks the deadline.
            let _ = tokio::time::timeout(left, self.read_acks(true)).await;
        }
        Ok(())
    }
}

impl Upstream {
    /// Publishes `payload` as an uplink of device `dev` (an index); it may stay buffered
    /// until [`Upstream::flush`].
    pub async fn publish(&mut self, dev: usize, payload: &[u8]) -> anyhow::Result<()> {
        match self {
            Upstream::Nats { client, subjects } => {
                let subject = subjects[dev % subjects.len()].clone();
                client
                    .publish(subject, Bytes::copy_from_slice(payload))
                    .await?;
            }
            Upstream::Mqtt {
                conn,
                topics,
                batch,
            } => {
                encode_publish(batch, &topics[dev % topics.len()], payload);
                if batch.len() >= MQTT_BATCH {
                    conn.send(batch).await?;
                    batch.clear();
                }
            }
            Upstream::MqttQos1(p) => p.publish(dev, payload).await?,
        }
        Ok(())
    }

    /// Waits `pause` between two rounds of publishing; a QoS 1 upstream reads its PUBACKs
    /// meanwhile.
    pub async fn pause(&mut self, pause: Duration) -> anyhow::Result<()> {
        match self {
            Upstream::MqttQos1(p) => {
                // Reading is cancel-safe: the deadline ends the pause between two reads.
                let until = tokio::time::Instant::now() + pause;
                while let Ok(read) = tokio::time::timeout_at(until, p.read_acks(true)).await {
                    read?;
                }
            }
            _ => tokio::time::sleep(pause).await,
        }
        Ok(())
    }

    /// PUBACKs for packet IDs that were not in flight (QoS 1 upstream; 0 otherwise).
    pub fn unexpected_acks(&self) -> u64 {
        match self {
            Upstream::MqttQos1(p) => p.unexpected_acks,
            _ => 0,
        }
    }

    /// Sends what is buffered on this side (the NATS client writes out by itself).
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Upstream::Nats { .. } => {}
            Upstream::Mqtt { conn, batch, .. } => {
                if !batch.is_empty() {
                    conn.send(batch).await?;
                    batch.clear();
                }
            }
            Upstream::MqttQos1(p) => p.flush().await?,
        }
        Ok(())
    }

    /// Sends everything buffered and, for NATS, waits until the server has it; a QoS 1
    /// upstream waits for every PUBACK.
    pub async fn settle(&mut self) -> anyhow::Result<()> {
        self.flush().await?;
        match self {
            Upstream::Nats { client, .. } => client.flush().await?,
            Upstream::MqttQos1(p) => p.settle().await?,
            Upstream::Mqtt { .. } => {}
        }
        Ok(())
    }
}
