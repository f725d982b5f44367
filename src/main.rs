//! The `lorabroker` binary: command-line parsing and wiring only. Every behaviour lives in
//! the library; this file turns flags into a [`Config`] and starts the right pieces.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use lorabroker::app::{App, Backends};
use lorabroker::auth::{create_key, GeneratedKey, PresentedKey, Rights, StoredKey};
use lorabroker::config::{is_log_filter, Config, ConfigError, LOG_FILTER_WORDS};
use lorabroker::server::Node;
use lorabroker::signals::{run_until_signalled, OnSignal, Signals};
use lorabroker::topic::{AppRef, DeviceRef, Id, Tenancy};
use lorabroker::transport::dev_ca::{DevCa, DevCertificates};
use lorabroker::transport::Kind;
use lorabroker::upstream::{run_fleet, FleetConfig, Upstream};

/// Exit status of a usage or configuration error (sysexits' EX_USAGE), so that scripts
/// and supervisors can tell "fix the command or the config" from a failure at run time.
const EX_USAGE: u8 = 64;

/// A command line that cannot work as given (an invalid ID, a missing URL): exit 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// `Err(UsageError)` with a formatted message.
macro_rules! usage {
    ($($arg:tt)*) => {
        return Err(UsageError(format!($($arg)*)).into())
    };
}

/// The subcommands that need more than wiring.
mod cli {
    pub(crate) mod keys;
}

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
    #[command(after_help = SERVE_HELP)]
    Serve(ServeArgs),
    /// Create, list and revoke API keys.
    Keys(KeysArgs),
    /// Run the simulated device fleet against NATS and Redis, as the upstream.
    Simulate(SimulateArgs),
    /// Add, list and remove the devices of the device registry.
    Devices(DevicesArgs),
}

/// What `serve --help` adds below the flags: the settings that have no flag.
const SERVE_HELP: &str = "\
Settings without a flag come from the config file (--config, default config/lorabroker.toml
when it exists) or from LORABROKER_<SECTION>__<KEY> environment variables, which override
the file; flags override both. Among them:
  LORABROKER_TENANCY__MODE=single|multi   usernames {app} or {app}@{tenant} (default multi)
  LORABROKER_TENANCY__DEFAULT_TENANT=ID   the tenant of single-tenant mode (default: default)
  LORABROKER_HTTP__ADMIN_TOKEN=TOKEN      bearer token of the admin API (off while empty)
  LORABROKER_SHUTDOWN__GRACE_PERIOD=25s   drain time after SIGTERM (a second signal cuts it)
Without --redis-url, API keys live in this node's memory: create them with the admin API.
config/lorabroker.toml lists every key with its default.";

#[derive(Args)]
struct DevArgs {
    /// MQTT listen address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: String,
    /// Also serve MQTT over TLS, with a throw-away CA and certificate for localhost.
    #[arg(long)]
    tls: bool,
    /// MQTT over TLS listen address (with --tls).
    #[arg(long, default_value = "127.0.0.1:8883")]
    mqtt_tls_listen: String,
    /// MQTT over WebSocket listen address (ws://…/mqtt); empty: none.
    #[arg(long, default_value = "127.0.0.1:9883")]
    mqtt_ws_listen: String,
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
    /// MQTT over TLS listen address (also LORABROKER_MQTT__TLS__LISTEN; needs
    /// mqtt.tls.cert_file and mqtt.tls.key_file).
    #[arg(long)]
    mqtt_tls_listen: Option<String>,
    /// MQTT over WebSocket listen address (`mqtt.ws.listen`).
    #[arg(long)]
    mqtt_ws_listen: Option<String>,
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
        /// traffic:down:write, traffic:up:write, link, settings:api:keys, all). Default:
        /// read + down write.
        #[arg(long)]
        rights: Option<String>,
        /// A name for the key.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 30d; at most 100y; never expires when absent.
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
struct DevicesArgs {
    #[command(flatten)]
    backends: BackendArgs,
    #[command(subcommand)]
    command: DevicesCommand,
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Register devices, so that downlinks to them are accepted.
    Add {
        /// Application ID.
        #[arg(long)]
        app: String,
        /// Tenant ID (default: tenancy.default_tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Device IDs.
        #[arg(required = true)]
        devices: Vec<String>,
    },
    /// List an application's registered devices, one per line.
    List {
        /// Application ID.
        #[arg(long)]
        app: String,
        /// Tenant ID (default: tenancy.default_tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Unregister devices and clear their downlink queues.
    Remove {
        /// Application ID.
        #[arg(long)]
        app: String,
        /// Tenant ID (default: tenancy.default_tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Device IDs.
        #[arg(required = true)]
        devices: Vec<String>,
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

/// Logs to stderr, coloured only on a terminal. `RUST_LOG`, when set, overrides
/// `log.level`; an invalid one stops the start rather than silence every log line.
/// `quiet` (the one-shot `keys` commands) logs only errors unless a level was chosen.
fn init_logging(config: &Config, quiet: bool) -> Result<(), UsageError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.trim().is_empty() => {
            if !is_log_filter(&f) {
                usage!("RUST_LOG = {f:?}: expected {LOG_FILTER_WORDS}");
            }
            f
        }
        _ if quiet && config.log.level == lorabroker::config::LogConfig::default().level => {
            "error".to_owned()
        }
        _ => config.log.level.clone(),
    };
    // async-nats logs each of its events at info, which bus::nats already reports (with
    // the server's URL, and backing off while it is unreachable).
    let filter = if filter.contains("async_nats") {
        filter
    } else {
        format!("{filter},async_nats=warn")
    };
    // The redis crate warns on every failed dial of a cluster node (several a second per
    // connection while Redis is away), which health::watch already reports, backing off.
    let filter = if filter.split(',').any(|d| d.trim().starts_with("redis")) {
        filter
    } else {
        format!("{filter},redis=error")
    };
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(&filter)
        .map_err(|e| UsageError(format!("log filter {filter:?}: {e}")))?;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        // A closed stderr must not turn every log line into a panic (and a lost signal).
        .log_internal_errors(false);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}

/// Resolves `--app`/`--tenant` to an application under the configured tenancy.
fn application(config: &Config, app: &str, tenant: Option<&str>) -> anyhow::Result<AppRef> {
    let tenant = tenant.unwrap_or(&config.tenancy.default_tenant);
    let tenant = Id::parse(tenant).map_err(|e| UsageError(format!("--tenant {tenant:?}: {e}")))?;
    let app = Id::parse(app).map_err(|e| UsageError(format!("--app {app:?}: {e}")))?;
    Ok(AppRef::new(tenant, app))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            let usage = e.downcast_ref::<ConfigError>().is_some()
                || e.downcast_ref::<UsageError>().is_some();
            ExitCode::from(if usage { EX_USAGE } else { 1 })
        }
    }
}

/// Prints `error` and each cause it does not already say, without a backtrace (whatever
/// `RUST_BACKTRACE` says: a startup error is for an operator, not a debugger).
fn report(error: &anyhow::Error) {
    let mut said = error.to_string();
    let mut out = format!("Error: {said}");
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !said.contains(&cause) {
            out.push_str("\n  caused by: ");
            out.push_str(&cause);
            said.push_str(&cause);
        }
    }
    eprintln!("{out}");
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut o = Map::new();
    let mut dev_tls = None;
    match &cli.command {
        Command::Dev(a) => {
            set(&mut o, "mqtt.listen", Some(a.mqtt_listen.clone()));
            if a.tls {
                // Removed when dropped: when dev returns, whether it stopped on a signal
                // or failed to start.
                let ca = DevCa::create()?;
                set(&mut o, "mqtt.tls.listen", Some(a.mqtt_tls_listen.clone()));
                let path = |p: &std::path::Path| Some(p.display().to_string());
                set(
                    &mut o,
                    "mqtt.tls.cert_file",
                    path(&ca.certificates.cert_file),
                );
                set(&mut o, "mqtt.tls.key_file", path(&ca.certificates.key_file));
                dev_tls = Some(ca);
            }
            set(&mut o, "mqtt.ws.listen", Some(a.mqtt_ws_listen.clone()));
            set(&mut o, "http.listen", Some(a.http_listen.clone()));
            set(&mut o, "nats.url", Some(""));
            set(&mut o, "redis.url", Some(""));
            // `dev` keeps everything in memory whatever a config file says.
            set(&mut o, "redis.mode", Some("standalone"));
            set(&mut o, "redis.sentinel_master", Some(""));
            set(
                &mut o,
                "redis.sentinel_urls",
                Some(Value::Array(Vec::new())),
            );
            set(&mut o, "redis.cluster_urls", Some(Value::Array(Vec::new())));
            let mode = if a.fleet.tenant.is_some() {
                "multi"
            } else {
                "single"
            };
            set(&mut o, "tenancy.mode", Some(mode));
        }
        Command::Serve(a) => {
            set(&mut o, "mqtt.listen", a.mqtt_listen.clone());
            set(&mut o, "mqtt.tls.listen", a.mqtt_tls_listen.clone());
            set(&mut o, "mqtt.ws.listen", a.mqtt_ws_listen.clone());
            set(&mut o, "http.listen", a.http_listen.clone());
            set(&mut o, "node_name", a.node_name.clone());
            backend_overrides(&a.backends, &mut o);
        }
        Command::Keys(a) => backend_overrides(&a.backends, &mut o),
        Command::Simulate(a) => backend_overrides(&a.backends, &mut o),
        Command::Devices(a) => backend_overrides(&a.backends, &mut o),
    }
    let config = Config::load(cli.config.as_deref(), Value::Object(o))?;
    init_logging(&config, matches!(cli.command, Command::Keys(_)))?;
    match cli.command {
        Command::Dev(a) => dev(config, a, dev_tls).await,
        Command::Serve(_) => serve(config).await,
        Command::Keys(a) => cli::keys::run(config, a.command).await,
        Command::Simulate(a) => simulate(config, a.fleet).await,
        Command::Devices(a) => devices(config, a.command).await,
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let backends = Backends::from_config(&config, &config.node_name).await?;
    let app = App::new(config, backends);
    let node = Node::start(app).await?;
    let signals = Signals::new()?;
    print_serve_banner(&node);
    run_until_signalled(node, signals, CancellationToken::new(), OnSignal::Drain).await;
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
    let stores = if !config.redis.is_enabled() {
        "in-memory stores"
    } else {
        "Redis stores"
    };
    println!(
        "lorabroker serve is running (node {node_id}, {bus}, {stores}, {mode}-tenant)
  MQTT      {mqtt}{ws}
  HTTP      http://{http}  (/healthz /readyz /metrics)",
        node_id = node.app.node_id,
        mode = config.tenancy.mode,
        mqtt = node.mqtt_addr,
        ws = ws_line(node),
        http = node.http_addr,
    );
    if let Some(tls) = node.addr(Kind::Tls) {
        println!("  MQTT/TLS  {tls}");
    }
    if !config.redis.is_enabled() {
        print_in_memory_keys_hint(node);
    }
}

/// Without Redis, `keys` cannot reach this node's key store: say how to get a key.
fn print_in_memory_keys_hint(node: &Node) {
    let http = node.http_addr;
    let app = match node.app.tenancy {
        Tenancy::Single { .. } => "{app}",
        Tenancy::Multi => "{app}@{tenant}",
    };
    if node.app.config.http.admin_token.is_empty() {
        println!(
            "  API keys  in this node's memory, none yet: set LORABROKER_HTTP__ADMIN_TOKEN to create
            them with the admin API (POST http://{http}/api/v1/applications/{app}/keys),
            or run `lorabroker dev` for one node with a printed key"
        );
    } else {
        println!(
            "  API keys  in this node's memory, none yet; create one with the admin API:
            curl -X POST -H \"Authorization: Bearer $LORABROKER_HTTP__ADMIN_TOKEN\" -H 'Content-Type: application/json' -d '{{}}' http://{http}/api/v1/applications/{app}/keys"
        );
    }
}

async fn dev(config: Config, args: DevArgs, tls: Option<DevCa>) -> anyhow::Result<()> {
    let tenancy = config.tenancy();
    let application = application(&config, &args.fleet.app, args.fleet.tenant.as_deref())?;
    let backends = Backends::embedded_for(&config);
    // The demo key also signs in to the console (its keys and live events).
    let rights = Rights::DEFAULT.union(Rights::SETTINGS_API_KEYS);
    let key = match &args.api_key {
        Some(k) => {
            let presented =
                PresentedKey::parse(k).map_err(|e| UsageError(format!("--api-key: {e}")))?;
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
    let signals = Signals::new()?;
    let fleet_stop = CancellationToken::new();
    tokio::spawn(run_fleet(
        Upstream::from_backends(&backends),
        FleetConfig {
            app: application.clone(),
            devices: args.fleet.devices,
            uplink_interval: args.fleet.uplink_interval,
        },
        fleet_stop.clone(),
    ));
    print_dev_banner(&node, &tenancy, &application, &key, rights, &args);
    if let Some(ca) = &tls {
        print_dev_tls(
            &node,
            &tenancy.app_uid(&application),
            &key,
            &ca.certificates,
        );
    }
    run_until_signalled(node, signals, fleet_stop, OnSignal::Stop).await;
    // The throw-away certificates go with the node that used them.
    drop(tls);
    Ok(())
}

/// The banner line of the WebSocket listener (with its leading newline), if there is one.
fn ws_line(node: &Node) -> String {
    match node.addr(Kind::Ws) {
        Some(ws) => format!("\n  WebSocket ws://{ws}{}", node.app.config.mqtt.ws.path),
        None => String::new(),
    }
}

fn print_dev_banner(
    node: &Node,
    tenancy: &Tenancy,
    app: &AppRef,
    key: &str,
    rights: Rights,
    args: &DevArgs,
) {
    let uid = tenancy.app_uid(app);
    let (host, port) = (node.mqtt_addr.ip(), node.mqtt_addr.port());
    let devices = args.fleet.devices;
    println!(
        r#"lorabroker dev is running (embedded bus, in-memory stores)
  MQTT      {mqtt}{ws}
  HTTP      http://{http}  (/healthz /readyz /metrics){console}
  username  {uid}
  API key   {key}
            rights: {rights}
  devices   dev1..dev{devices}, one uplink each every {interval}
{mqttjs}
Watch joins, uplinks and downlink events:
  mosquitto_sub -h {host} -p {port} -u '{uid}' -P '{key}' -t '#' -v

Schedule a confirmed downlink with your own correlation ID:
  mosquitto_pub -h {host} -p {port} -u '{uid}' -P '{key}' -t 'v3/{uid}/devices/dev1/down/push' -m '{{"downlinks":[{{"f_port":15,"frm_payload":"vu8=","priority":"NORMAL","confirmed":true,"correlation_ids":["my-correlation-id"]}}]}}'
"#,
        mqtt = node.mqtt_addr,
        ws = ws_line(node),
        mqttjs = match node.addr(Kind::Ws) {
            Some(ws) => format!(
                "\nFrom MQTT.js (Node or a browser page) over WebSocket:\n  \
                 const client = mqtt.connect('ws://{ws}{path}', {{ username: '{uid}', password: '{key}' }});\n  \
                 client.on('connect', () => client.subscribe('#')); client.on('message', (t, p) => console.log(t, p.toString()));\n",
                path = node.app.config.mqtt.ws.path
            ),
            None => String::new(),
        },
        http = node.http_addr,
        console = if node.app.config.console.enabled {
            format!(
                "\n  Console   http://{}/console  (sign in with the API key below)",
                node.http_addr
            )
        } else {
            String::new()
        },
        rights = rights.names().join(", "),
        interval = humantime::format_duration(args.fleet.uplink_interval),
    );
}

/// The TLS listener of `dev --tls`: where the CA is and a command that trusts it.
fn print_dev_tls(node: &Node, uid: &str, key: &str, certs: &DevCertificates) {
    let Some(tls) = node.addr(Kind::Tls) else {
        return;
    };
    println!(
        r#"MQTT over TLS on {tls}, certificate for localhost, 127.0.0.1 and ::1 signed by a throw-away CA:
  CA        {ca}
  mosquitto_sub --cafile '{ca}' -h localhost -p {port} -u '{uid}' -P '{key}' -t '#' -v
"#,
        ca = certs.ca_file.display(),
        port = tls.port(),
    );
}

async fn simulate(config: Config, fleet: FleetArgs) -> anyhow::Result<()> {
    if config.nats.url.is_empty() || !config.redis.is_enabled() {
        usage!("simulate is an upstream of a cluster: pass --nats-url and --redis-url");
    }
    let application = application(&config, &fleet.app, fleet.tenant.as_deref())?;
    let backends = Backends::from_config(&config, "lorabroker-simulate").await?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(run_fleet(
        Upstream::from_backends(&backends),
        FleetConfig {
            app: application.clone(),
            devices: fleet.devices,
            uplink_interval: fleet.uplink_interval,
        },
        stop.clone(),
    ));
    let mut signals = Signals::new()?;
    eprintln!(
        "simulating {} devices of {application} every {}",
        fleet.devices,
        humantime::format_duration(fleet.uplink_interval)
    );
    signals.next().await;
    stop.cancel();
    let _ = task.await;
    backends.bus.flush().await.ok();
    Ok(())
}

async fn devices(config: Config, command: DevicesCommand) -> anyhow::Result<()> {
    if !config.redis.is_enabled() {
        bail!("devices needs the shared registry: pass --redis-url (or set LORABROKER_REDIS__URL)");
    }
    let backends = Backends::from_config(&config, "lorabroker-devices").await?;
    let device = |app: &AppRef, id: &str| -> anyhow::Result<DeviceRef> {
        Ok(DeviceRef::new(
            app.clone(),
            Id::parse(id).with_context(|| format!("device ID {id:?}"))?,
        ))
    };
    match command {
        DevicesCommand::Add {
            app,
            tenant,
            devices,
        } => {
            let application = application(&config, &app, tenant.as_deref())?;
            for id in &devices {
                let d = device(&application, id)?;
                let new = backends.devices.add(&d).await?;
                eprintln!(
                    "{} {id} of {application}",
                    if new {
                        "registered"
                    } else {
                        "already registered:"
                    }
                );
            }
        }
        DevicesCommand::List { app, tenant } => {
            let application = application(&config, &app, tenant.as_deref())?;
            for id in backends.devices.list(&application).await? {
                println!("{id}");
            }
        }
        DevicesCommand::Remove {
            app,
            tenant,
            devices,
        } => {
            let application = application(&config, &app, tenant.as_deref())?;
            let mut missing = Vec::new();
            for id in &devices {
                let d = device(&application, id)?;
                let removed = backends.devices.remove(&d).await?;
                backends.queue.replace(&d, &[]).await?;
                if removed {
                    eprintln!("removed {id} of {application} (its downlink queue is cleared)");
                } else {
                    missing.push(id.as_str());
                }
            }
            if !missing.is_empty() {
                bail!("not registered in {application}: {}", missing.join(", "));
            }
        }
    }
    Ok(())
}
