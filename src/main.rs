//! The `lorabroker` binary: command-line parsing and wiring only. Every behaviour lives in
//! the library; this file turns flags into a [`Config`] and starts the right pieces.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use lorabroker::app::{App, Backends};
use lorabroker::auth::{
    create_key, CreateKeyError, GeneratedKey, KeyView, PresentedKey, Rights, StoredKey,
};
use lorabroker::cluster::revoke_key;
use lorabroker::config::Config;
use lorabroker::server::Node;
use lorabroker::topic::{AppRef, Id, Tenancy};
use lorabroker::upstream::{run_fleet, FleetConfig, Upstream};

/// A multi-tenant MQTT server for LoRaWAN applications, wire-compatible with The Things
/// Stack's MQTT integration.
#[derive(Parser)]
#[command(name = "lorabroker", version, about)]
struct Cli {
    /// Configuration file (default: config/lorabroker.toml when it exists).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One node with embedded bus and stores, a simulated fleet and a printed demo key.
    Dev(DevArgs),
    /// A cluster node (NATS + Redis when configured).
    Serve(ServeArgs),
    /// Create, list and revoke API keys.
    Keys(KeysArgs),
    /// Run the simulated device fleet against NATS and Redis, as the upstream.
    Simulate(SimulateArgs),
}

#[derive(Args)]
struct DevArgs {
    /// MQTT listen address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: String,
    /// HTTP listen address (health, readiness, metrics).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: String,
    #[command(flatten)]
    fleet: FleetArgs,
    /// Use this API key instead of generating one.
    #[arg(long)]
    api_key: Option<String>,
}

#[derive(Args)]
struct FleetArgs {
    /// Application ID.
    #[arg(long, default_value = "demo")]
    app: String,
    /// Tenant ID; when given, usernames are `{app}@{tenant}` (multi-tenant).
    #[arg(long)]
    tenant: Option<String>,
    /// Number of simulated devices (dev1…devN).
    #[arg(long, default_value_t = 3)]
    devices: u32,
    /// Time between two uplinks of one device.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    uplink_interval: Duration,
}

#[derive(Args)]
struct BackendArgs {
    /// NATS URL (also LORABROKER_NATS__URL).
    // Global, so that `keys --nats-url … revoke` and `keys revoke --nats-url …` both work.
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Redis URL (also LORABROKER_REDIS__URL).
    #[arg(long, global = true)]
    redis_url: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// MQTT listen address.
    #[arg(long)]
    mqtt_listen: Option<String>,
    /// HTTP listen address.
    #[arg(long)]
    http_listen: Option<String>,
    /// Node name in logs, metrics and cluster signals.
    #[arg(long)]
    node_name: Option<String>,
    #[command(flatten)]
    backends: BackendArgs,
}

#[derive(Args)]
struct KeysArgs {
    #[command(flatten)]
    backends: BackendArgs,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; prints only the key on stdout (details on stderr).
    Create {
        /// Application ID.
        #[arg(long)]
        app: String,
        /// Tenant ID (default: tenancy.default_tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Comma-separated rights (The Things Stack names or traffic:read,
        /// traffic:down:write, traffic:up:write, link, all). Default: read + down write.
        #[arg(long, default_value = "")]
        rights: String,
        /// A name for the key.
        #[arg(long, default_value = "")]
        name: String,
        /// Lifetime, e.g. 30d, at most 100y; never expires when absent.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// List an application's keys (never the secrets).
    List {
        /// Application ID.
        #[arg(long)]
        app: String,
        /// Tenant ID (default: tenancy.default_tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key on every node.
    Revoke {
        /// The key ID (the middle part of the key) or the whole key.
        key_id: String,
    },
}

#[derive(Args)]
struct SimulateArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    backends: BackendArgs,
}

/// Puts `value` at the dotted `path` of a nested JSON object, for figment's flag layer.
fn set(overrides: &mut Map<String, Value>, path: &str, value: Option<impl Into<Value>>) {
    let Some(value) = value else { return };
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or(path);
    let mut node = overrides;
    for p in parts {
        node = match node
            .entry(p)
            .or_insert_with(|| Value::Object(Map::new()))
            .as_object_mut()
        {
            Some(n) => n,
            None => return,
        };
    }
    node.insert(last.to_owned(), value.into());
}

fn backend_overrides(b: &BackendArgs, o: &mut Map<String, Value>) {
    set(o, "nats.url", b.nats_url.clone());
    set(o, "redis.url", b.redis_url.clone());
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves `--app`/`--tenant` to an application under the configured tenancy.
fn application(config: &Config, app: &str, tenant: Option<&str>) -> anyhow::Result<AppRef> {
    let tenant = tenant.unwrap_or(&config.tenancy.default_tenant);
    Ok(AppRef::new(
        Id::parse(tenant).context("--tenant")?,
        Id::parse(app).context("--app")?,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut o = Map::new();
    match &cli.command {
        Command::Dev(a) => {
            set(&mut o, "mqtt.listen", Some(a.mqtt_listen.clone()));
            set(&mut o, "http.listen", Some(a.http_listen.clone()));
            set(&mut o, "nats.url", Some(""));
            set(&mut o, "redis.url", Some(""));
            let mode = if a.fleet.tenant.is_some() {
                "multi"
            } else {
                "single"
            };
            set(&mut o, "tenancy.mode", Some(mode));
        }
        Command::Serve(a) => {
            set(&mut o, "mqtt.listen", a.mqtt_listen.clone());
            set(&mut o, "http.listen", a.http_listen.clone());
            set(&mut o, "node_name", a.node_name.clone());
            backend_overrides(&a.backends, &mut o);
        }
        Command::Keys(a) => backend_overrides(&a.backends, &mut o),
        Command::Simulate(a) => backend_overrides(&a.backends, &mut o),
    }
    let config = Config::load(cli.config.as_deref(), Value::Object(o))?;
    init_logging(&config);
    match cli.command {
        Command::Dev(a) => dev(config, a).await,
        Command::Serve(_) => serve(config).await,
        Command::Keys(a) => keys(config, a.command).await,
        Command::Simulate(a) => simulate(config, a.fleet).await,
    }
}

/// Resolves when SIGTERM or Ctrl-C arrives.
async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run_until_terminated(node: Node, also: CancellationToken) {
    let token = node.shutdown_token();
    tokio::spawn(async move {
        termination().await;
        tracing::info!("termination requested: draining");
        also.cancel();
        token.cancel();
    });
    node.wait().await;
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let backends = Backends::from_config(&config, &config.node_name).await?;
    let app = App::new(config, backends);
    let node = Node::start(app).await?;
    print_serve_banner(&node);
    run_until_terminated(node, CancellationToken::new()).await;
    Ok(())
}

/// The bound addresses on stdout (logs go to stderr), so that a node started on port 0,
/// by a script or a test, can be found.
fn print_serve_banner(node: &Node) {
    let config = &node.app.config;
    let bus = if config.nats.url.is_empty() {
        "embedded bus"
    } else {
        "NATS bus"
    };
    let stores = if config.redis.url.is_empty() {
        "in-memory stores"
    } else {
        "Redis stores"
    };
    println!(
        "lorabroker serve is running (node {node_id}, {bus}, {stores}, {mode}-tenant)
  MQTT      {mqtt}
  HTTP      http://{http}  (/healthz /readyz /metrics)",
        node_id = node.app.node_id,
        mode = config.tenancy.mode,
        mqtt = node.mqtt_addr,
        http = node.http_addr,
    );
}

async fn dev(config: Config, args: DevArgs) -> anyhow::Result<()> {
    let tenancy = config.tenancy();
    let application = application(&config, &args.fleet.app, args.fleet.tenant.as_deref())?;
    let backends = Backends::embedded(config.downlink.queue_capacity);
    let rights = Rights::DEFAULT;
    let key = match &args.api_key {
        Some(k) => {
            let presented = PresentedKey::parse(k).context("--api-key")?;
            let given = GeneratedKey {
                id: presented.id.clone(),
                key: k.clone(),
                secret_hash: presented.secret_hash(),
            };
            let record = StoredKey::new(&given, &application, rights, "dev", None);
            backends.keys.insert(&record).await?;
            given.key
        }
        None => {
            create_key(backends.keys.as_ref(), &application, rights, "dev", None)
                .await?
                .0
                .key
        }
    };
    let app = App::new(config, backends.clone());
    let node = Node::start(app).await?;
    let fleet_stop = CancellationToken::new();
    tokio::spawn(run_fleet(
        Upstream::new(backends.bus.clone(), backends.queue.clone()),
        FleetConfig {
            app: application.clone(),
            devices: args.fleet.devices,
            uplink_interval: args.fleet.uplink_interval,
        },
        fleet_stop.clone(),
    ));
    print_dev_banner(&node, &tenancy, &application, &key, &args);
    run_until_terminated(node, fleet_stop).await;
    Ok(())
}

fn print_dev_banner(node: &Node, tenancy: &Tenancy, app: &AppRef, key: &str, args: &DevArgs) {
    let uid = tenancy.app_uid(app);
    let (host, port) = (node.mqtt_addr.ip(), node.mqtt_addr.port());
    let devices = args.fleet.devices;
    println!(
        r#"lorabroker dev is running (embedded bus, in-memory stores)
  MQTT      {mqtt}
  HTTP      http://{http}  (/healthz /readyz /metrics)
  username  {uid}
  API key   {key}
            rights: RIGHT_APPLICATION_TRAFFIC_READ, RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE
  devices   dev1..dev{devices}, one uplink each every {interval}

Watch joins, uplinks and downlink events:
  mosquitto_sub -h {host} -p {port} -u '{uid}' -P '{key}' -t '#' -v

Schedule a confirmed downlink with your own correlation ID:
  mosquitto_pub -h {host} -p {port} -u '{uid}' -P '{key}' -t 'v3/{uid}/devices/dev1/down/push' -m '{{"downlinks":[{{"f_port":15,"frm_payload":"vu8=","priority":"NORMAL","confirmed":true,"correlation_ids":["my-correlation-id"]}}]}}'
"#,
        mqtt = node.mqtt_addr,
        http = node.http_addr,
        interval = humantime::format_duration(args.fleet.uplink_interval),
    );
}

async fn keys(config: Config, command: KeysCommand) -> anyhow::Result<()> {
    if config.redis.url.is_empty() {
        bail!("keys needs the shared key store: pass --redis-url (or set LORABROKER_REDIS__URL)");
    }
    let backends = Backends::from_config(&config, "lorabroker-keys").await?;
    match command {
        KeysCommand::Create {
            app,
            tenant,
            rights,
            name,
            expires,
        } => {
            let application = application(&config, &app, tenant.as_deref())?;
            let rights = Rights::parse_list(&rights)?;
            let (generated, record) = match create_key(
                backends.keys.as_ref(),
                &application,
                rights,
                &name,
                expires,
            )
            .await
            {
                Err(e @ CreateKeyError::LifetimeTooLong(_)) => bail!("--expires: {e}"),
                created => created?,
            };
            eprintln!(
                "created key {} for {} (username {:?}) with {:?}",
                record.id,
                application,
                config.tenancy().app_uid(&application),
                record.rights
            );
            println!("{}", generated.key);
        }
        KeysCommand::List { app, tenant } => {
            let application = application(&config, &app, tenant.as_deref())?;
            for k in backends.keys.list(&application).await? {
                println!("{}", serde_json::to_string(&KeyView::from(&k))?);
            }
        }
        KeysCommand::Revoke { key_id } => {
            if config.nats.url.is_empty() {
                bail!("revocation must reach every node: pass --nats-url (or set LORABROKER_NATS__URL)");
            }
            let id = match PresentedKey::parse(&key_id) {
                Ok(p) => p.id,
                Err(_) => key_id,
            };
            match revoke_key(backends.keys.as_ref(), backends.bus.as_ref(), &id).await? {
                Some(_) => eprintln!("revoked key {id}"),
                None => bail!("API key {id} not found (a revocation signal was sent anyway)"),
            }
        }
    }
    Ok(())
}

async fn simulate(config: Config, fleet: FleetArgs) -> anyhow::Result<()> {
    if config.nats.url.is_empty() || config.redis.url.is_empty() {
        bail!("simulate is an upstream of a cluster: pass --nats-url and --redis-url");
    }
    let application = application(&config, &fleet.app, fleet.tenant.as_deref())?;
    let backends = Backends::from_config(&config, "lorabroker-simulate").await?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_fleet(
        Upstream::new(backends.bus.clone(), backends.queue.clone()),
        FleetConfig {
            app: application.clone(),
            devices: fleet.devices,
            uplink_interval: fleet.uplink_interval,
        },
        stop.clone(),
    ));
    eprintln!(
        "simulating {} devices of {application} every {}",
        fleet.devices,
        humantime::format_duration(fleet.uplink_interval)
    );
    termination().await;
    stop.cancel();
    let _ = task.await;
    backends.bus.flush().await.ok();
    Ok(())
}
