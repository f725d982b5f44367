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

use std::net::SocketAddr;

use anyhow::Context;
use async_nats::Subject;
use bytes::{Bytes, BytesMut};
use lorabroker::auth::redis::RedisKeyStore;
use lorabroker::auth::{create_key, Rights};
use lorabroker::topic::{AppRef, Id};

use crate::dial::Dialer;
use crate::report::CpuMeter;
use crate::wire::{encode_publish, Conn, Login};

/// Flush the MQTT upstream's batch once it holds this many bytes.
const MQTT_BATCH: usize = 32 * 1024;

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

    /// Connects the upstream that publishes uplinks of `devices` (by index).
    pub async fn upstream(&self, devices: usize) -> anyhow::Result<Upstream> {
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
        }
        Ok(())
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
        }
        Ok(())
    }

    /// Sends everything buffered and, for NATS, waits until the server has it.
    pub async fn settle(&mut self) -> anyhow::Result<()> {
        self.flush().await?;
        if let Upstream::Nats { client, .. } = self {
            client.flush().await?;
        }
        Ok(())
    }
}
