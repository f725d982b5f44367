//! [`RedisConn`]: the one Redis connection type every store shares, whatever `redis.mode`
//! says (DESIGN §7). The stores (API keys, takeover epochs, connection quotas, downlink
//! queues, device registry) send their commands and scripts through it and never know
//! whether they talk to
//!
//! - **standalone**: one Redis at `redis.url` (`redis://` or `rediss://`), through a redis
//!   `ConnectionManager` that reconnects in the background;
//! - **sentinel**: the master that the sentinels (`redis.sentinel_urls`) name for
//!   `redis.sentinel_master`. The master is asked for when the first command needs it and
//!   again after a connection error or a `READONLY` reply (a demoted master): after a
//!   failover the node fails for a short while and then works on the new master;
//! - **cluster**: a Redis Cluster found from the seeds `redis.cluster_urls`; commands go to
//!   the node of their slot (every script's keys share one hash tag, so one slot).
//!
//! TLS (`rediss://`) uses rustls with a custom CA (`redis.tls_ca_file`) and an optional
//! client certificate (`redis.tls_cert_file`, `redis.tls_key_file`). ACL credentials come
//! from `redis.username` and the file `redis.password_file` (a mounted Kubernetes Secret) or
//! from the URL. Nothing is dialled when a connection is made: a node starts while Redis is
//! down. Passwords never appear in errors: URLs are reported redacted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline,
    ProtocolVersion, RedisError, RedisFuture, RedisResult, TlsCertificates, TlsMode, Value,
};

use crate::config::{redact_url, RedisConfig};

/// One connection attempt (TCP connect and handshakes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// One command's reply on an established connection.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// First reconnection delay of the standalone manager; doubles per attempt up to
/// [`RECONNECT_MAX_DELAY`].
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
/// Longest reconnection delay before jitter (the manager adds up to 100 % jitter, so
/// attempts are at most ~1 s apart).
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);
/// After a failed dial (sentinel master, cluster), commands fail at once for this long
/// instead of dialling again: an outage costs Redis and the sentinels a few dials a second.
const REDIAL_DELAY: Duration = Duration::from_millis(200);
/// Longest time one dial (asking the sentinels, connecting to the master or the cluster)
/// may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a Redis connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisConnError {
    /// A file named by a configuration key is missing, unreadable or not what it should be.
    #[error("{key} = {path:?}: {reason}")]
    File {
        /// The configuration key, e.g. `redis.password_file`.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong with it (never its contents).
        reason: String,
    },
    /// A URL or setting that the Redis client refuses.
    #[error("{what}: {reason}")]
    Invalid {
        /// The setting, with any URL redacted.
        what: String,
        /// The client's reason.
        reason: String,
    },
}

/// The connection the stores share (see the module docs). Clones share one connection.
#[derive(Clone)]
pub struct RedisConn(Inner);

#[derive(Clone)]
enum Inner {
    /// Standalone: the manager reconnects to the one address by itself.
    Single(ConnectionManager),
    /// Sentinel or cluster: dialled on first use and after connection errors.
    Dialled(Arc<Dialled>),
}

impl RedisConn {
    /// The connection `config` describes (its mode, TLS files and credentials), without
    /// dialling. Fails for a bad URL and for a missing, unreadable or malformed file named
    /// by a key, saying which key and file.
    pub fn open(config: &RedisConfig) -> Result<Self, RedisConnError> {
        let secrets = Secrets::read(config)?;
        match config.mode.as_str() {
            "sentinel" => sentinel(config, &secrets),
            "cluster" => cluster(config, &secrets),
            _ => single(&config.url, &config.username, &secrets),
        }
    }

    /// A standalone connection to `url` (credentials and `rediss://` with the system's
    /// roots as the URL says), without dialling. Fails only for an unparsable URL.
    pub fn from_url(url: &str) -> Result<Self, RedisConnError> {
        single(url, "", &Secrets::default())
    }
}

/// What [`RedisConn::open`] reads from files: passwords and PEM files.
#[derive(Default)]
struct Secrets {
    password: Option<String>,
    sentinel_password: Option<String>,
    tls: Option<TlsCertificates>,
}

impl Secrets {
    fn read(config: &RedisConfig) -> Result<Self, RedisConnError> {
        let data_password = password("redis.password_file", &config.password_file)?;
        let sentinel_password = password(
            "redis.sentinel_password_file",
            &config.sentinel_password_file,
        )?;
        let root_cert = pem("redis.tls_ca_file", &config.tls_ca_file, "CERTIFICATE")?;
        let client_cert = pem("redis.tls_cert_file", &config.tls_cert_file, "CERTIFICATE")?;
        let client_key = pem("redis.tls_key_file", &config.tls_key_file, "PRIVATE KEY")?;
        let client_tls = match (client_cert, client_key) {
            (Some(client_cert), Some(client_key)) => Some(ClientTlsConfig {
                client_cert,
                client_key,
            }),
            _ => None,
        };
        let tls = (root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates {
            client_tls,
            root_cert,
        });
        Ok(Self {
            password: data_password,
            sentinel_password,
            tls,
        })
    }
}

/// The password in the file at `path` (the setting `key`), without a final line break;
/// `None` when no file is configured.
fn password(key: &'static str, path: &str) -> Result<Option<String>, RedisConnError> {
    if path.is_empty() {
        return Ok(None);
    }
    let raw = std::fs::read_to_string(path).map_err(|e| RedisConnError::File {
        key,
        path: path.to_owned(),
        reason: format!("cannot read the password: {e}"),
    })?;
    let password = raw.strip_suffix('\n').unwrap_or(&raw);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(RedisConnError::File {
            key,
            path: path.to_owned(),
            reason: "the file is empty".into(),
        });
    }
    Ok(Some(password.to_owned()))
}

/// The PEM file at `path` (the setting `key`), which must hold a `-----BEGIN …{label}-----`
/// block; `None` when no file is configured.
fn pem(key: &'static str, path: &str, label: &str) -> Result<Option<Vec<u8>>, RedisConnError> {
    if path.is_empty() {
        return Ok(None);
    }
    let file = |reason: String| RedisConnError::File {
        key,
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| file(format!("cannot read it: {e}")))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{label}-----")));
    if !found {
        return Err(file(format!("no PEM \"{label}\" block in it")));
    }
    Ok(Some(bytes))
}

/// The parsed `url`, with the password and user of the configuration when given.
fn connection_info(
    what: &str,
    url: &str,
    username: &str,
    password: Option<&str>,
) -> Result<ConnectionInfo, RedisConnError> {
    let mut info = url
        .into_connection_info()
        .map_err(|e| invalid(what, url, e))?;
    let mut settings = info.redis_settings().clone();
    if !username.is_empty() {
        settings = settings.set_username(username);
    }
    if let Some(password) = password {
        settings = settings.set_password(password);
    }
    // RESP3 unless the URL asks otherwise (`?protocol=resp2`): a dropped connection is
    // noticed at once and re-established before the next command needs it.
    if !url.contains("protocol=") {
        settings = settings.set_protocol(ProtocolVersion::RESP3);
    }
    info = info.set_redis_settings(settings);
    Ok(info)
}

fn invalid(what: &str, url: &str, e: RedisError) -> RedisConnError {
    RedisConnError::Invalid {
        what: format!("{what} {:?}", redact_url(url)),
        reason: e.to_string(),
    }
}

fn tls_mode(url: &str) -> Option<TlsMode> {
    url.starts_with("rediss://").then_some(TlsMode::Secure)
}

/// The client settings every dialled connection gets.
fn async_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

fn single(url: &str, username: &str, secrets: &Secrets) -> Result<RedisConn, RedisConnError> {
    let what = "redis.url";
    let info = connection_info(what, url, username, secrets.password.as_deref())?;
    let client = match &secrets.tls {
        Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
        None => redis::Client::open(info),
    }
    .map_err(|e| invalid(what, url, e))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_min_delay(RECONNECT_MIN_DELAY)
        .set_max_delay(RECONNECT_MAX_DELAY)
        .set_exponent_base(2.0)
        // Never give up: a failed reconnection would only be retried on the next I/O error.
        .set_number_of_retries(usize::MAX);
    ConnectionManager::new_lazy_with_config(client, config)
        .map(|m| RedisConn(Inner::Single(m)))
        .map_err(|e| invalid(what, url, e))
}

fn sentinel(config: &RedisConfig, secrets: &Secrets) -> Result<RedisConn, RedisConnError> {
    let what = "redis.sentinel_urls";
    let mut addrs = Vec::new();
    let (mut user, mut password) = (None, None);
    for url in &config.sentinel_urls {
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|e| invalid(what, url, e))?;
        // Credentials written in a sentinel URL are the sentinels' (the builder takes one
        // set for all of them).
        user = user.or(info.redis_settings().username().map(str::to_owned));
        password = password.or(info.redis_settings().password().map(str::to_owned));
        addrs.push(info.addr().clone());
    }
    let tls = config.sentinel_urls.first().and_then(|u| tls_mode(u));
    let mut builder =
        SentinelClientBuilder::new(addrs, &config.sentinel_master, SentinelServerType::Master)
            .map_err(|e| invalid_setting(what, e))?
            .set_client_to_redis_protocol(ProtocolVersion::RESP3);
    if let Some(mode) = tls {
        builder = builder
            .set_client_to_redis_tls_mode(mode)
            .set_client_to_sentinel_tls_mode(mode);
        if let Some(certs) = &secrets.tls {
            builder = builder
                .set_client_to_redis_certificates(certs.clone())
                .set_client_to_sentinel_certificates(certs.clone());
        }
    }
    if !config.username.is_empty() {
        builder = builder.set_client_to_redis_username(&config.username);
    }
    if let Some(p) = &secrets.password {
        builder = builder.set_client_to_redis_password(p);
    }
    let sentinel_user = Some(config.sentinel_username.clone()).filter(|u| !u.is_empty());
    if let Some(u) = sentinel_user.or(user) {
        builder = builder.set_client_to_sentinel_username(u);
    }
    if let Some(p) = secrets.sentinel_password.clone().or(password) {
        builder = builder.set_client_to_sentinel_password(p);
    }
    let client = builder.build().map_err(|e| invalid_setting(what, e))?;
    Ok(Dialled::start(Target::Sentinel(Box::new(client))))
}

fn cluster(config: &RedisConfig, secrets: &Secrets) -> Result<RedisConn, RedisConnError> {
    let what = "redis.cluster_urls";
    let mut seeds = Vec::new();
    for url in &config.cluster_urls {
        seeds.push(connection_info(
            what,
            url,
            &config.username,
            secrets.password.as_deref(),
        )?);
    }
    let mut builder = ClusterClient::builder(seeds)
        .use_protocol(ProtocolVersion::RESP3)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        // A moved slot or a failed-over node is retried a few times; the store operation's
        // own bound (`auth::redis::OP_TIMEOUT`) caps the whole.
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(500);
    if !config.username.is_empty() {
        builder = builder.username(&config.username);
    }
    if let Some(p) = &secrets.password {
        builder = builder.password(p);
    }
    if let Some(certs) = &secrets.tls {
        builder = builder.certs(certs.clone());
    }
    let client = builder.build().map_err(|e| invalid_setting(what, e))?;
    Ok(Dialled::start(Target::Cluster(Box::new(client))))
}

fn invalid_setting(what: &str, e: RedisError) -> RedisConnError {
    RedisConnError::Invalid {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

/// Where a dialled connection comes from.
enum Target {
    /// The master the sentinels name.
    Sentinel(Box<SentinelClient>),
    /// A cluster from its seeds.
    Cluster(Box<ClusterClient>),
}

/// An established dialled connection; clones share it.
#[derive(Clone)]
enum Live {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// A connection dialled on first use and again after it broke (sentinel), or once and
/// then kept (cluster: the cluster client follows slot moves and failovers itself).
struct Dialled {
    /// The connection in use and its generation (which dial made it).
    live: parking_lot::Mutex<Option<(u64, Live)>>,
    generations: AtomicU64,
    /// Held while dialling, so that concurrent commands wait for one dial; with when and
    /// why the last dial failed.
    dialer: tokio::sync::Mutex<(Target, Option<(Instant, String)>)>,
}

impl Dialled {
    fn start(target: Target) -> RedisConn {
        RedisConn(Inner::Dialled(Arc::new(Dialled {
            live: parking_lot::Mutex::new(None),
            generations: AtomicU64::new(0),
            dialer: tokio::sync::Mutex::new((target, None)),
        })))
    }

    /// The live connection, dialled if there is none.
    async fn get(&self) -> RedisResult<(u64, Live)> {
        if let Some(live) = self.live.lock().clone() {
            return Ok(live);
        }
        let mut dialer = self.dialer.lock().await;
        if let Some(live) = self.live.lock().clone() {
            return Ok(live);
        }
        let (target, last_failure) = &mut *dialer;
        if let Some((at, why)) = last_failure {
            if at.elapsed() < REDIAL_DELAY {
                return Err(not_connected(why.clone()));
            }
        }
        let dialled = match tokio::time::timeout(DIAL_TIMEOUT, dial(target)).await {
            Ok(dialled) => dialled,
            Err(_) => Err(not_connected(format!(
                "no connection within {DIAL_TIMEOUT:?}"
            ))),
        };
        match dialled {
            Ok(live) => {
                *last_failure = None;
                let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
                *self.live.lock() = Some((generation, live.clone()));
                Ok((generation, live))
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// After `error` on the connection of `generation`: drops it when it is broken or no
    /// longer the master, so that the next command dials (asks the sentinels) again.
    fn failed(&self, generation: u64, error: &RedisError) {
        let broken = error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
            || error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly);
        let mut live = self.live.lock();
        if broken && matches!(&*live, Some((g, Live::Node(_))) if *g == generation) {
            *live = None;
        }
    }

    async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let (generation, mut live) = self.get().await?;
        let reply = match &mut live {
            Live::Node(c) => c.req_packed_command(cmd).await,
            Live::Cluster(c) => c.req_packed_command(cmd).await,
        };
        if let Err(e) = &reply {
            self.failed(generation, e);
        }
        reply
    }

    async fn commands(
        &self,
        pipe: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let (generation, mut live) = self.get().await?;
        let reply = match &mut live {
            Live::Node(c) => c.req_packed_commands(pipe, offset, count).await,
            Live::Cluster(c) => c.req_packed_commands(pipe, offset, count).await,
        };
        if let Err(e) = &reply {
            self.failed(generation, e);
        }
        reply
    }
}

async fn dial(target: &mut Target) -> RedisResult<Live> {
    match target {
        Target::Sentinel(sentinel) => {
            // Asks the sentinels for the master and checks that it says it is one.
            let master = sentinel.async_get_client().await?;
            let conn = master
                .get_multiplexed_async_connection_with_config(&async_config())
                .await?;
            Ok(Live::Node(conn))
        }
        Target::Cluster(client) => Ok(Live::Cluster(client.get_async_connection().await?)),
    }
}

fn not_connected(why: String) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::NotConnected, why))
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Inner::Single(m) => m.req_packed_command(cmd),
            Inner::Dialled(d) => Box::pin(d.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Inner::Single(m) => m.req_packed_commands(pipe, offset, count),
            Inner::Dialled(d) => Box::pin(d.commands(pipe, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Inner::Single(m) => m.get_db(),
            Inner::Dialled(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), contents).unwrap();
        f
    }

    #[test]
    fn a_password_file_loses_its_final_line_break_only() {
        let f = file("s3cret \n");
        let p = password("redis.password_file", f.path().to_str().unwrap()).unwrap();
        assert_eq!(p.as_deref(), Some("s3cret "));
        assert_eq!(password("redis.password_file", "").unwrap(), None);
    }

    #[test]
    fn bad_files_name_the_key_and_the_file_but_never_the_contents() {
        let e = password("redis.password_file", "/nonexistent/pw").unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("redis.password_file = \"/nonexistent/pw\": cannot read"),
            "{text}"
        );
        let empty = file("\n");
        let e = password("redis.password_file", empty.path().to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let not_pem = file("hunter2");
        let e = pem(
            "redis.tls_ca_file",
            not_pem.path().to_str().unwrap(),
            "CERTIFICATE",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("redis.tls_ca_file = "), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn an_unparsable_url_is_an_error_without_its_password() {
        let Err(e) = RedisConn::from_url("redis://:hunter2@host:notaport") else {
            panic!("a bad URL was accepted");
        };
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[tokio::test]
    async fn nothing_is_dialled_when_a_connection_is_made() {
        let mut config = RedisConfig {
            mode: "sentinel".into(),
            sentinel_master: "m".into(),
            sentinel_urls: vec!["redis://127.0.0.1:1".into()],
            ..RedisConfig::default()
        };
        let mut conn = RedisConn::open(&config).expect("sentinel connection");
        let e = redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .unwrap_err();
        assert!(!e.to_string().is_empty());
        config.mode = "cluster".into();
        config.cluster_urls = std::mem::take(&mut config.sentinel_urls);
        let mut conn = RedisConn::open(&config).expect("cluster connection");
        assert!(redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .is_err());
    }
}
