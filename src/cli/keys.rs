//! `lorabroker keys create|list|revoke`: the key store from the command line, saying
//! exactly what happened (a revocation that could not reach the nodes says so).

use std::time::Duration;

use anyhow::bail;

use lorabroker::app::Backends;
use lorabroker::auth::{create_key, CreateKeyError, KeyView, PresentedKey, Rights};
use lorabroker::bus::Bus;
use lorabroker::cluster::{self, Signal};
use lorabroker::config::{redact_urls, Config};
use lorabroker::topic::{AppRef, Tenancy};

use crate::{application, KeysCommand, UsageError};

/// How long `keys revoke` waits for NATS before saying it is unreachable.
const REVOKE_NATS_WAIT: Duration = Duration::from_secs(3);
/// When `keys revoke` says that it is waiting for NATS.
const REVOKE_NATS_NOTICE: Duration = Duration::from_millis(500);

pub(crate) async fn run(config: Config, command: KeysCommand) -> anyhow::Result<()> {
    if !config.redis.is_enabled() {
        usage!(
            "keys needs the shared key store: pass --redis-url (or set LORABROKER_REDIS__URL, or \
             a sentinel or cluster redis.mode); \
             a node without Redis keeps its keys in memory: use its admin API instead"
        );
    }
    if matches!(command, KeysCommand::Revoke { .. }) && config.nats.url.is_empty() {
        usage!("revocation must reach every node: pass --nats-url (or set LORABROKER_NATS__URL)");
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
            let tenancy = config.tenancy();
            if let (Tenancy::Single { default_tenant }, Some(t)) = (&tenancy, &tenant) {
                if t != default_tenant.as_str() {
                    usage!(
                        "--tenant {t}: single-tenant nodes serve only tenant {default_tenant}; \
                         leave --tenant out"
                    );
                }
            }
            let rights = Rights::parse_list(rights.as_deref().unwrap_or(""))
                .map_err(|e| UsageError(format!("--rights: {e}")))?;
            let name = name.unwrap_or_default();
            let created =
                create_key(backends.keys.as_ref(), &application, rights, &name, expires).await;
            let (generated, record) = match created {
                Err(e @ CreateKeyError::LifetimeTooLong(_)) => usage!("--expires: {e}"),
                created => created?,
            };
            eprintln!(
                "created key {} for {application} (username {}) with {}",
                record.id,
                username(&tenancy, &application, tenant.is_some()),
                record.rights.names().join(", ")
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
            let id = match PresentedKey::parse(&key_id) {
                Ok(p) => p.id,
                Err(_) => key_id,
            };
            revoke(&config, &backends, &id).await?;
        }
    }
    Ok(())
}

/// The MQTT username of a new key. Without `--tenant` the key is for the default tenant,
/// whose username depends on the nodes' tenancy, which this command may not share.
fn username(tenancy: &Tenancy, app: &AppRef, tenant_given: bool) -> String {
    match tenancy {
        Tenancy::Single { .. } => format!("{:?}", tenancy.app_uid(app)),
        Tenancy::Multi if tenant_given => format!("{:?}", tenancy.app_uid(app)),
        Tenancy::Multi => format!(
            "{:?} on single-tenant nodes, {:?} on multi-tenant ones",
            app.app.as_str(),
            tenancy.app_uid(app)
        ),
    }
}

/// Deletes the key and tells every node, saying exactly which of the two happened.
async fn revoke(config: &Config, backends: &Backends, id: &str) -> anyhow::Result<()> {
    let nats = redact_urls(&config.nats.url);
    let (removed, nats_up) = tokio::join!(
        backends.keys.remove(id),
        wait_for_bus(backends.bus.as_ref(), &nats)
    );
    let found = removed?.is_some();
    let deleted = if found {
        format!("deleted API key {id} from the key store")
    } else {
        format!("API key {id} not found in the key store (nothing deleted)")
    };
    if !nats_up {
        let consequence = if found {
            format!(
                ". Until the nodes hear of it, connections using the key stay open and nodes \
                 that cached it accept it for up to auth.cache_ttl ({}); nodes that lost NATS \
                 too catch up when they reconnect. Run this again when NATS is reachable",
                humantime::format_duration(config.auth.cache_ttl)
            )
        } else {
            ", so nodes that still cache it were not told".to_owned()
        };
        let and = if found { "but" } else { "and" };
        bail!(
            "{deleted}, {and} the revocation signal could not be sent: NATS at {nats} is \
             unreachable{consequence}"
        );
    }
    let signal = Signal::KeyRevoked {
        key_id: id.to_owned(),
    };
    let sent = match cluster::send(backends.bus.as_ref(), &signal).await {
        Ok(()) => backends.bus.flush().await,
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        bail!("{deleted}, but the revocation signal was not sent: {e}");
    }
    if found {
        eprintln!("revoked API key {id}: deleted, and every node told to drop it");
        Ok(())
    } else {
        bail!("{deleted}; every node was told to drop it in case one still caches it")
    }
}

/// Waits up to [`REVOKE_NATS_WAIT`] for the bus to connect, saying so when it takes long.
async fn wait_for_bus(bus: &dyn Bus, url: &str) -> bool {
    let started = tokio::time::Instant::now();
    let mut noticed = false;
    while !bus.is_ready() {
        let waited = started.elapsed();
        if waited >= REVOKE_NATS_WAIT {
            return false;
        }
        if waited >= REVOKE_NATS_NOTICE && !noticed {
            eprintln!("waiting for NATS at {url}…");
            noticed = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}
