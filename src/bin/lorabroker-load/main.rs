//! `lorabroker-load`: a load generator for lorabroker and, for comparison, any MQTT 3.1.1
//! broker. One process holds many lightweight connections (a tokio task and a small
//! buffer each, mqttbytes framing), plays the upstream (NATS for lorabroker, an MQTT
//! publisher for other brokers; see `target.rs`) and measures:
//!
//! - `fanout`: S subscribers of one application receive every uplink;
//! - `devices`: S subscribers each on one device's topic, uplinks spread over the devices;
//! - `storm`: K clients connect (API key cache hit or miss for lorabroker);
//! - `idle`: N connected, subscribed clients; broker RSS per connection;
//! - `scale`: N subscribed clients, then uplinks at a rate spread over their devices;
//!   broker RSS (per connection, peak) and CPU;
//! - `downlink`: C clients push downlinks at a rate into lorabroker's Redis queues;
//! - `qos1`: fan-out at QoS 1 to S persistent-session subscribers (clean_session=0, fixed
//!   client IDs) that acknowledge every PUBLISH (DUP redeliveries counted apart);
//! - `store-cost`: bytes on disk and in memory per QoS 1 message stored for a persistent
//!   subscriber that is away (JetStream stream info, the store's RSS and directory).
//!
//! Each run prints human text on stderr and one JSON line on stdout (delivered msg/s,
//! loss, latency percentiles from timestamps inside the payloads, connects/s, bytes per
//! connection). `benches/compare.sh` runs them all against lorabroker, Mosquitto and
//! nats-server's MQTT mode; `benches/transports.sh` compares TCP, TLS, WS and WSS
//! (`--transport`, see `dial.rs`); `benches/scale.sh` runs `idle` and `scale` at up to
//! 100,000 connections. At start the descriptor limit is raised as far as allowed and a
//! run that cannot fit is refused; past one port range of connections to a loopback
//! listener the sockets are spread over several source addresses (`oslimits.rs`).

mod clients;
mod dial;
mod downlink;
mod oslimits;
mod payload;
mod report;
mod scale;
mod storecost;
mod target;
mod traffic;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use dial::{Dialer, TransportKind};
use target::Target;

/// Load generator for lorabroker and other MQTT 3.1.1 brokers.
#[derive(Parser)]
#[command(name = "lorabroker-load", version, about)]
struct Cli {
    #[command(flatten)]
    target: TargetArgs,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args)]
struct TargetArgs {
    /// MQTT listener(s) of the broker, comma-separated (connections are spread over them).
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:1883"
    )]
    mqtt: Vec<SocketAddr>,
    /// How clients reach the listener(s) given with --mqtt: tcp, tls (trusting --cafile),
    /// ws or wss (an HTTP upgrade at --ws-path, subprotocol mqtt). For brokers other than
    /// lorabroker the MQTT upstream publisher uses the same transport.
    #[arg(long, global = true, value_enum, default_value = "tcp")]
    transport: TransportKind,
    /// PEM file of the CA certificate(s) to trust for --transport tls and wss.
    #[arg(long, global = true)]
    cafile: Option<PathBuf>,
    /// Name the broker's certificate must carry (tls and wss).
    #[arg(long, global = true, default_value = "localhost")]
    server_name: String,
    /// HTTP path of the WebSocket upgrade (ws and wss).
    #[arg(long, global = true, default_value = "/mqtt")]
    ws_path: String,
    /// Label of the broker in reports.
    #[arg(long, global = true, default_value = "broker")]
    label: String,
    /// NATS URL of a lorabroker cluster: the upstream publishes uplinks there.
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Redis URL of a lorabroker cluster: makes the target lorabroker (API keys are
    /// created there; clients log in as `{app}@{tenant}`). Without it clients connect
    /// anonymously and the upstream publishes over MQTT.
    #[arg(long, global = true)]
    redis_url: Option<String>,
    /// Redis key prefix of the cluster.
    #[arg(
        long,
        global = true,
        default_value = "lorabroker",
        env = "LORABROKER_REDIS__KEY_PREFIX"
    )]
    redis_prefix: String,
    /// Tenant ID.
    #[arg(long, global = true, default_value = "bench")]
    tenant: String,
    /// Application ID (default: a fresh `load-…` per run, so queues start empty).
    #[arg(long, global = true)]
    app: Option<String>,
    /// Broker process ID(s), comma-separated, one per node: `idle` reads their RSS (needed
    /// there), every scenario reports their CPU time.
    #[arg(long, global = true, value_delimiter = ',')]
    broker_pid: Vec<u32>,
    /// Process IDs of the broker's backing services (NATS, Redis), comma-separated: their
    /// CPU time is reported apart.
    #[arg(long, global = true, value_delimiter = ',')]
    aux_pid: Vec<u32>,
    /// Connections opened at once while setting up a scenario.
    #[arg(long, global = true, default_value_t = 64)]
    concurrency: usize,
    /// Source addresses the connections are bound to, round-robin, so that each has its
    /// own range of local ports: a list (127.0.0.2,127.0.0.3), a range
    /// (127.0.0.2-127.0.0.9), a count (4: from 127.0.0.2), `none`, or `auto`: as many
    /// loopback addresses as the connections need when they exceed one port range
    /// (about 25k) to loopback listeners.
    #[arg(long, global = true, default_value = "auto")]
    source_addrs: oslimits::SourceAddrs,
}

#[derive(Subcommand)]
enum Scenario {
    /// S subscribers of one application each receive every uplink.
    Fanout(TrafficArgs),
    /// S subscribers each subscribed to one device's uplinks; uplinks spread over them.
    Devices(TrafficArgs),
    /// K clients connect as fast as the broker accepts them.
    Storm {
        /// Number of connections.
        #[arg(long, default_value_t = 5000)]
        connections: usize,
        /// Connect (and then disconnect) all of them this many times.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Give each client its own API key (lorabroker: every CONNECT misses the cache).
        #[arg(long)]
        distinct_keys: bool,
    },
    /// N idle, subscribed clients; broker RSS per connection (needs --broker-pid).
    Idle {
        /// Number of connections.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Wait this long after the last connection before reading RSS.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
    /// N subscribed clients, one device each, then uplinks at a rate spread over the
    /// devices; broker RSS (before, connected, peak) and CPU (needs --broker-pid).
    Scale {
        /// Number of connections (and devices).
        #[arg(long, default_value_t = 100_000)]
        connections: usize,
        /// Uplinks per second, all devices together.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        /// How long to publish.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Payload size in bytes (at least 44).
        #[arg(long, default_value_t = 200)]
        payload: usize,
        /// Wait this long after the last connection before reading RSS.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
    /// C clients push downlinks at a rate (lorabroker only).
    Downlink {
        /// Publishing clients.
        #[arg(long, default_value_t = 10)]
        clients: usize,
        /// Devices the pushes are spread over.
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Pushes per second, all clients together.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// How long to push.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// S persistent-session subscribers (clean_session=0) of one application receive
    /// every uplink at QoS 1 and acknowledge each.
    Qos1(Qos1Args),
    /// Bytes on disk and in memory per QoS 1 message stored for an absent persistent
    /// subscriber; then its replay.
    StoreCost(StoreCostArgs),
}

#[derive(Args)]
struct Qos1Args {
    /// Number of subscribers (client IDs `{client-prefix}-{i}`).
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Devices the upstream rotates over.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Payload size in bytes (at least 44; padded JSON with the send time inside).
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// Messages per second from the upstream, or `max`: as fast as the broker delivers.
    #[arg(long, default_value = "max")]
    rate: String,
    /// How long to publish.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many messages (if sooner than `--duration`).
    #[arg(long)]
    messages: Option<u64>,
    /// With `--rate max`: deliveries in flight (all subscribers together) at most.
    #[arg(long, default_value_t = 1000)]
    window: u64,
    /// An MQTT upstream's unacknowledged QoS 1 PUBLISHes at most (not lorabroker's: its
    /// upstream publishes plain NATS subjects).
    #[arg(long, default_value_t = 1000)]
    upstream_window: usize,
    /// Prefix of the subscribers' client IDs.
    #[arg(long, default_value = "lbload-qos1")]
    client_prefix: String,
}

#[derive(Args)]
struct StoreCostArgs {
    /// Messages published while the subscriber is away.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Payload size in bytes (at least 44).
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// Devices the upstream rotates over.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Client ID of the persistent subscriber.
    #[arg(long, default_value = "lbload-store-0")]
    client_id: String,
    /// NATS URL of the JetStream holding the stream (default: --nats-url).
    #[arg(long)]
    js_url: Option<String>,
    /// The stream holding the messages (lorabroker default: `lorabroker-sessions-{tenant}`;
    /// nats-server's MQTT mode: `$MQTT_msgs`).
    #[arg(long)]
    stream: Option<String>,
    /// Process ID of the store (nats-server, or the broker itself): its RSS.
    #[arg(long)]
    store_pid: Option<u32>,
    /// The store's directory (JetStream's store_dir): bytes allocated under it.
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// An MQTT upstream's unacknowledged QoS 1 PUBLISHes at most.
    #[arg(long, default_value_t = 1000)]
    upstream_window: usize,
    /// Wait this long after storing before reading the figures.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
}

impl Scenario {
    /// Connections the scenario holds at once (its upstream included).
    fn connections(&self) -> usize {
        match self {
            Scenario::Fanout(a) | Scenario::Devices(a) => a.subscribers + 1,
            Scenario::Storm { connections, .. } => *connections,
            Scenario::Idle { connections, .. } | Scenario::Scale { connections, .. } => {
                *connections
            }
            Scenario::Downlink { clients, .. } => clients + 1,
            Scenario::Qos1(a) => 2 * a.subscribers + 1,
            Scenario::StoreCost(_) => 3,
        }
    }
}

#[derive(Args)]
struct TrafficArgs {
    /// Number of subscribers.
    #[arg(long, default_value_t = 10)]
    subscribers: usize,
    /// Fan-out only: devices the upstream rotates over.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Payload size in bytes (at least 44; padded JSON with the send time inside).
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// Messages per second from the upstream, or `max`: as fast as the broker delivers.
    #[arg(long, default_value = "max")]
    rate: String,
    /// How long to publish.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many messages (if sooner than `--duration`).
    #[arg(long)]
    messages: Option<u64>,
    /// With `--rate max`: deliveries in flight (all subscribers together) at most.
    #[arg(long, default_value_t = 10_000)]
    window: u64,
}

impl TrafficArgs {
    fn shape(&self, per_device: bool, concurrency: usize) -> anyhow::Result<traffic::Shape> {
        let rate = match self.rate.as_str() {
            "max" => None,
            r => Some(r.parse().context("--rate: a number or `max`")?),
        };
        Ok(traffic::Shape {
            subscribers: self.subscribers,
            per_device,
            devices: self.devices,
            payload: self.payload,
            rate,
            duration: self.duration,
            messages: self.messages,
            window: self.window.max(1),
            concurrency,
            qos1: None,
        })
    }
}

impl Qos1Args {
    /// The fan-out shape of these arguments (their own defaults: one subscriber, a window
    /// of 1000), with QoS 1 on.
    fn shape(&self, concurrency: usize) -> anyhow::Result<traffic::Shape> {
        let traffic = TrafficArgs {
            subscribers: self.subscribers,
            devices: self.devices,
            payload: self.payload,
            rate: self.rate.clone(),
            duration: self.duration,
            messages: self.messages,
            window: self.window,
        };
        Ok(traffic::Shape {
            qos1: Some(traffic::Qos1 {
                client_prefix: self.client_prefix.clone(),
                upstream_window: self.upstream_window.max(1),
            }),
            ..traffic.shape(false, concurrency)?
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let t = cli.target;
    anyhow::ensure!(!t.mqtt.is_empty(), "--mqtt needs at least one address");
    let connections = cli.scenario.connections();
    let nofile = oslimits::prepare_descriptors(connections)?;
    let sources = oslimits::resolve(
        &t.source_addrs,
        connections,
        &t.mqtt,
        oslimits::ephemeral_ports(),
    )
    .map_err(anyhow::Error::msg)?;
    if !sources.is_empty() {
        eprintln!(
            "binding connections to {} source addresses ({} to {})",
            sources.len(),
            sources[0],
            sources[sources.len() - 1]
        );
    }
    let dialer = Dialer::new(t.transport, t.cafile.as_deref(), &t.server_name, &t.ws_path)?
        .with_sources(sources);
    let target = Target {
        label: t.label,
        addrs: t.mqtt,
        dialer,
        nats_url: t.nats_url,
        redis_url: t.redis_url,
        redis_prefix: t.redis_prefix,
        tenant: t.tenant,
        app: t
            .app
            .unwrap_or_else(|| format!("load-{:08x}", rand::random::<u32>())),
        broker_pids: t.broker_pid,
        aux_pids: t.aux_pid,
    };
    payload::now_us(); // start the clock
    let mut report = match cli.scenario {
        Scenario::Fanout(a) => traffic::run(&target, &a.shape(false, t.concurrency)?).await?,
        Scenario::Devices(a) => traffic::run(&target, &a.shape(true, t.concurrency)?).await?,
        Scenario::Storm {
            connections,
            rounds,
            distinct_keys,
        } => clients::storm(&target, connections, rounds, t.concurrency, distinct_keys).await?,
        Scenario::Idle {
            connections,
            settle,
        } => clients::idle(&target, connections, t.concurrency, settle).await?,
        Scenario::Scale {
            connections,
            rate,
            duration,
            payload,
            settle,
        } => {
            let shape = scale::Shape {
                connections,
                rate,
                duration,
                payload,
                settle,
                concurrency: t.concurrency,
            };
            scale::run(&target, &shape).await?
        }
        Scenario::Downlink {
            clients,
            devices,
            rate,
            duration,
        } => {
            let shape = downlink::Shape {
                clients,
                devices,
                rate,
                duration,
            };
            downlink::run(&target, &shape).await?
        }
        Scenario::Qos1(a) => traffic::run(&target, &a.shape(t.concurrency)?).await?,
        Scenario::StoreCost(a) => {
            let shape = storecost::Shape {
                messages: a.messages,
                payload: a.payload,
                devices: a.devices,
                client_id: a.client_id,
                js_url: a.js_url,
                stream: a.stream,
                store_pid: a.store_pid,
                store_dir: a.store_dir,
                upstream_window: a.upstream_window.max(1),
                settle: a.settle,
            };
            storecost::run(&target, &shape).await?
        }
    };
    report
        .set("transport", target.dialer.kind().as_str())
        .set("source_addrs", target.dialer.sources().len() as u64)
        .set("nofile_limit", nofile);
    report.print();
    Ok(())
}
