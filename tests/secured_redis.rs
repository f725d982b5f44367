//! Secured and highly available Redis (issue 10, point 4): real `redis-server` processes on
//! free loopback ports, started by each test with certificates made in the test (rcgen):
//!
//! - TLS with a custom CA and a client certificate (`--tls-auth-clients yes`);
//! - an ACL user whose password is read from a file, with `default` off, driven through
//!   the real `lorabroker serve` and `lorabroker keys` binaries over TLS: the password never
//!   shows in their output, `/readyz` or `/metrics`, and a bad password file stops the start;
//! - Sentinel in front of a master and a replica: the master is killed, the sentinel fails
//!   over, and the node goes on with the new master;
//! - a three-master Redis Cluster: API keys, downlink push/pop with quotas, the device
//!   registry, connection quotas and takeover epochs through it; and one master killed and
//!   restarted in its directory (nodes.conf, append-only file) while a node serves.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use common::broker::{node_from_config, TestClient, TestNode, WAIT};
use common::http;
use common::services::unique;
use common::shell::{shell, OutputLines, Spawned};
use common::wait::eventually;
use lorabroker::auth::Rights;
use lorabroker::config::Config;
use lorabroker::downlink::redis::RedisDownlinkQueue;
use lorabroker::downlink::{DownlinkQueue, QueueError, QueueLimits};
use lorabroker::limits::LimitsConfig;
use lorabroker::redis_conn::RedisConn;
use lorabroker::topic::{AppRef, DeviceRef, Id};

/// How long a failover (detection after `down-after-milliseconds` 1000, election,
/// promotion) and the node's reconnection may take.
const FAILOVER: Duration = Duration::from_secs(30);
/// How long a server process may take to start.
const START: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Helpers.

/// A free loopback port (bound and released; the server binds it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A throw-away CA with a server certificate for 127.0.0.1/localhost and a client
/// certificate, as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("a temporary directory");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "lorabroker test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let write = |name: &str, pem: String| {
            std::fs::write(dir.path().join(name), pem).expect("PEM written");
        };
        write("ca.pem", ca_cert.pem());
        for (name, sans) in [
            (
                "server",
                vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            ),
            ("client", vec!["lorabroker-client".to_owned()]),
        ] {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, &issuer).expect("certificate");
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        // A second CA that signed nothing of ours: a client trusting it must refuse.
        let other_key = KeyPair::generate().expect("key");
        let mut other = CertificateParams::new(Vec::<String>::new()).expect("params");
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        write(
            "other-ca.pem",
            other.self_signed(&other_key).expect("certificate").pem(),
        );
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// `redis-server` arguments for a TLS-only server on `port`.
    fn server_args(&self, port: u16, client_certs: bool) -> Vec<String> {
        [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &self.path("server.pem"),
            "--tls-key-file",
            &self.path("server-key.pem"),
            "--tls-ca-cert-file",
            &self.path("ca.pem"),
            "--tls-auth-clients",
            if client_certs { "yes" } else { "no" },
        ]
        .into_iter()
        .map(str::to_owned)
        .collect()
    }
}

/// A `redis-server` (or sentinel) process of one test, killed with it.
struct Server {
    process: Spawned,
    _lines: OutputLines,
}

/// Starts `redis-server` with `args` (after a config file, if any) in `dir`, on loopback,
/// without persistence, and waits until `port` accepts connections.
async fn redis_server(dir: &Path, port: u16, args: &[String]) -> Server {
    redis_server_persisting(dir, port, args, &["--save", "", "--appendonly", "no"]).await
}

/// [`redis_server`] with the persistence settings `persistence`.
async fn redis_server_persisting(
    dir: &Path,
    port: u16,
    args: &[String],
    persistence: &[&str],
) -> Server {
    let mut cmd = Command::new("redis-server");
    cmd.args(args)
        .args(["--bind", "127.0.0.1"])
        .args(persistence)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut process = Spawned::start(&mut cmd);
    let lines = process.stdout_lines();
    eventually("redis-server listening", START, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map(drop)
    })
    .await;
    Server {
        process,
        _lines: lines,
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// One command on a connection of its own (a plain `redis://` URL).
async fn query<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> redis::RedisResult<T> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}

/// A node configuration on free loopback ports, with its own key prefix and no limits.
fn config() -> Config {
    let mut c = Config {
        node_name: "test".into(),
        ..Config::default()
    };
    c.mqtt.listen = "127.0.0.1:0".into();
    c.http.listen = "127.0.0.1:0".into();
    c.redis.key_prefix = unique("lbtest");
    c.shutdown.grace_period = Duration::from_millis(500);
    c.limits = LimitsConfig::unlimited();
    c
}

fn app() -> AppRef {
    AppRef::new(
        Id::parse(&unique("tenant")).expect("valid tenant"),
        Id::parse("app1").expect("valid app"),
    )
}

fn device(app: &AppRef, dev: &str) -> DeviceRef {
    DeviceRef::new(app.clone(), Id::parse(dev).expect("valid device ID"))
}

/// Pushes one downlink to `dev` over MQTT and waits until the node's queue holds it.
async fn push_over_mqtt(node: &TestNode, client: &TestClient, dev: &DeviceRef, marker: &str) {
    let topic = format!(
        "v3/{}/devices/{}/down/push",
        node.username(&dev.app),
        dev.device
    );
    client
        .publish(
            &topic,
            format!(
                r#"{{"downlinks":[{{"f_port":1,"frm_payload":"AQ==","correlation_ids":["{marker}"]}}]}}"#
            ),
        )
        .await;
    eventually("the downlink is queued", WAIT, || async {
        let items = node.app.queue.list(dev).await.map_err(|e| e.to_string())?;
        if items.iter().any(|i| i.contains(marker)) {
            Ok(())
        } else {
            Err(format!("queue holds {items:?}"))
        }
    })
    .await;
}

/// A key (created through the node, retried while Redis is failing over), a client that
/// logs in with it, and a downlink it queues: the node serves.
async fn serves(node: &TestNode, app: &AppRef, marker: &str) {
    let key = eventually("an API key is stored", FAILOVER, || async {
        lorabroker::auth::create_key(node.app.keys.as_ref(), app, Rights::DEFAULT, "t", None)
            .await
            .map(|(created, _)| created.key)
            .map_err(|e| e.to_string())
    })
    .await;
    let client = eventually("a client logs in with the new key", FAILOVER, || async {
        TestClient::connect(node.mqtt_addr, &node.username(app), &key, &unique("c"))
            .await
            .map_err(|code| format!("{code:?}"))
    })
    .await;
    let dev = device(app, "dev1");
    eventually("the device is registered", FAILOVER, || async {
        node.upstream()
            .register(&dev)
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    push_over_mqtt(node, &client, &dev, marker).await;
}

// ---------------------------------------------------------------------------------------
// (a) TLS with a custom CA and a client certificate.

#[tokio::test]
async fn tls_with_a_custom_ca_and_a_client_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis = redis_server(dir.path(), port, &pki.server_args(port, true)).await;

    let mut c = config();
    c.redis.url = format!("rediss://127.0.0.1:{port}");
    c.redis.tls_ca_file = pki.path("ca.pem");
    c.redis.tls_cert_file = pki.path("client.pem");
    c.redis.tls_key_file = pki.path("client-key.pem");

    // Without the client certificate, or trusting another CA, no connection is made.
    let refused = |tweak: fn(&mut Config)| {
        let mut c = c.clone();
        tweak(&mut c);
        async move {
            let mut conn = RedisConn::open(&c.redis).expect("a connection object");
            let ping = tokio::time::timeout(
                Duration::from_secs(3),
                redis::cmd("PING").query_async::<String>(&mut conn),
            )
            .await;
            assert!(!matches!(ping, Ok(Ok(_))), "PING answered: {ping:?}");
        }
    };
    refused(|c| {
        c.redis.tls_cert_file.clear();
        c.redis.tls_key_file.clear();
    })
    .await;
    refused(|c| c.redis.tls_ca_file = c.redis.tls_ca_file.replace("ca.pem", "other-ca.pem")).await;

    let node = node_from_config(c).await;
    serves(&node, &app(), "over-tls").await;
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// (b) ACL user, password file, TLS; the real binaries; no secret anywhere.

/// Runs `lorabroker serve` with the environment `env`; returns it with its output lines
/// and the MQTT and HTTP addresses from its banner.
async fn serve(env: &[(&str, String)]) -> (Spawned, OutputLines, String, String) {
    let mut cmd = shell("exec lorabroker serve");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut process = Spawned::start(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()));
    let mut lines = process.stdout_lines();
    let (mut mqtt, mut http) = (None, None);
    let banner = tokio::time::timeout(START, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("MQTT"), Some(addr)) => mqtt = Some(addr.to_owned()),
                (Some("HTTP"), Some(addr)) => {
                    http = Some(addr.trim_start_matches("http://").to_owned())
                }
                _ => {}
            }
            if mqtt.is_some() && http.is_some() {
                return;
            }
        }
    })
    .await;
    assert!(banner.is_ok(), "no banner from lorabroker serve");
    (process, lines, mqtt.unwrap(), http.unwrap())
}

#[tokio::test]
async fn acl_user_with_a_password_file_over_tls_never_shows_the_password() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let secret = format!("pw-{}", unique("secret"));
    let mut args = pki.server_args(port, false);
    args.extend(strings(&["--user", "default", "off"]));
    args.extend(strings(&[
        "--user",
        "lbuser",
        "on",
        &format!(">{secret}"),
        "~*",
        "&*",
        "+@all",
    ]));
    let redis = redis_server(dir.path(), port, &args).await;
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{secret}\n")).unwrap();

    let prefix = unique("lbtest");
    let tenant = unique("tenant");
    let env: Vec<(&str, String)> = vec![
        ("LORABROKER_LOG__LEVEL", "debug".into()),
        ("LORABROKER_MQTT__LISTEN", "127.0.0.1:0".into()),
        ("LORABROKER_HTTP__LISTEN", "127.0.0.1:0".into()),
        (
            "LORABROKER_REDIS__URL",
            format!("rediss://127.0.0.1:{port}"),
        ),
        ("LORABROKER_REDIS__USERNAME", "lbuser".into()),
        (
            "LORABROKER_REDIS__PASSWORD_FILE",
            password_file.display().to_string(),
        ),
        ("LORABROKER_REDIS__TLS_CA_FILE", pki.path("ca.pem")),
        ("LORABROKER_REDIS__KEY_PREFIX", prefix.clone()),
        ("LORABROKER_TENANCY__MODE", "multi".into()),
    ];

    // A password file that is not there stops the start, naming the key and the file.
    let mut missing = env.clone();
    missing.retain(|(k, _)| *k != "LORABROKER_REDIS__PASSWORD_FILE");
    missing.push((
        "LORABROKER_REDIS__PASSWORD_FILE",
        "/nonexistent/redis-pw".into(),
    ));
    let mut cmd = shell("exec lorabroker serve");
    cmd.envs(missing.iter().map(|(k, v)| (*k, v.as_str())));
    let out = Spawned::start(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))
        .output()
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without its password file");
    assert!(
        stderr.contains("redis.password_file") && stderr.contains("/nonexistent/redis-pw"),
        "{stderr}"
    );

    let (mut node, mut lines, mqtt, http_addr) = serve(&env).await;
    let http_addr = http_addr.parse().expect("an HTTP address");
    eventually("the node is ready", START, || async {
        match http::get(http_addr, "/readyz").await {
            (200, body) => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // `lorabroker keys create` reads the same settings.
    let mut keys = shell(&format!(
        "exec lorabroker keys create --app app1 --tenant {tenant}"
    ));
    keys.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let out = Spawned::start(keys.stdout(Stdio::piped()).stderr(Stdio::piped()))
        .output()
        .await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "keys create: {stderr}");
    let key = stdout
        .split_whitespace()
        .find(|w| w.starts_with("NNSXS."))
        .unwrap_or_else(|| panic!("no key in {stdout:?}"))
        .to_owned();
    assert!(!stdout.contains(&secret) && !stderr.contains(&secret));

    let addr = mqtt.parse().expect("an MQTT address");
    let client = TestClient::connect(addr, &format!("app1@{tenant}"), &key, "c1").await;
    assert!(client.is_ok(), "login refused: {:?}", client.err());

    let (_, readyz) = http::get(http_addr, "/readyz").await;
    let (_, metrics) = http::get(http_addr, "/metrics").await;
    assert!(!readyz.contains(&secret), "{readyz}");
    assert!(!metrics.contains(&secret));

    // Redis goes away: the outage is logged, without the password.
    drop(client);
    drop(redis);
    let mut log = String::new();
    let stderr = node.child().stderr.take().expect("piped stderr");
    let mut log_lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let logged = tokio::time::timeout(START, async {
        while let Ok(Some(line)) = log_lines.next_line().await {
            log.push_str(&line);
            log.push('\n');
            if line.contains("cannot reach Redis at") {
                return;
            }
        }
    })
    .await;
    node.stop().await;
    while let Ok(Some(line)) = lines.next_line().await {
        log.push_str(&line);
        log.push('\n');
    }
    assert!(logged.is_ok(), "no log of the outage:\n{log}");
    assert!(!log.contains(&secret), "the password is in the log:\n{log}");
}

// ---------------------------------------------------------------------------------------
// (c) Sentinel: a master, a replica, one sentinel; the master dies.

#[tokio::test]
async fn sentinel_failover_keeps_the_node_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (m, r, s) = (free_port(), free_port(), free_port());
    // ACL user "lb" on the data nodes (default off), a password on the sentinel: both
    // reach the node through password files.
    let (password, sentinel_password) = (unique("pw"), unique("spw"));
    let acl = |port: u16| {
        strings(&[
            "--port",
            &port.to_string(),
            "--user",
            "default",
            "off",
            "--user",
            "lb",
            "on",
            &format!(">{password}"),
            "~*",
            "&*",
            "+@all",
            "--masteruser",
            "lb",
            "--masterauth",
            &password,
        ])
    };
    let mut master = redis_server(dir.path(), m, &acl(m)).await;
    let mut replica_args = acl(r);
    replica_args.extend(strings(&[
        "--replicaof",
        "127.0.0.1",
        &m.to_string(),
        "--dbfilename",
        "replica.rdb",
    ]));
    let _replica = redis_server(dir.path(), r, &replica_args).await;
    let sentinel_conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &sentinel_conf,
        format!(
            "port {s}\nbind 127.0.0.1\nrequirepass {sentinel_password}\n\
             sentinel monitor mymaster 127.0.0.1 {m} 1\n\
             sentinel auth-user mymaster lb\nsentinel auth-pass mymaster {password}\n\
             sentinel down-after-milliseconds mymaster 1000\n\
             sentinel failover-timeout mymaster 5000\n"
        ),
    )
    .unwrap();
    let _sentinel = redis_server(
        dir.path(),
        s,
        &[sentinel_conf.display().to_string(), "--sentinel".into()],
    )
    .await;
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, &password).unwrap();
    let sentinel_password_file = dir.path().join("sentinel-password");
    std::fs::write(&sentinel_password_file, format!("{sentinel_password}\n")).unwrap();
    let sentinel_url = format!("redis://:{sentinel_password}@127.0.0.1:{s}");
    eventually("the sentinel sees the replica", START, || async {
        let replicas: Vec<redis::Value> =
            query(&sentinel_url, &["SENTINEL", "REPLICAS", "mymaster"])
                .await
                .map_err(|e| e.to_string())?;
        if replicas.is_empty() {
            Err("no replica yet".to_owned())
        } else {
            Ok(())
        }
    })
    .await;

    let mut c = config();
    c.redis.mode = "sentinel".into();
    c.redis.sentinel_master = "mymaster".into();
    c.redis.sentinel_urls = vec![format!("redis://127.0.0.1:{s}")];
    c.redis.sentinel_password_file = sentinel_password_file.display().to_string();
    c.redis.username = "lb".into();
    c.redis.password_file = password_file.display().to_string();
    let node = node_from_config(c).await;
    let app = app();
    serves(&node, &app, "before-failover").await;

    let killed = std::time::Instant::now();
    master.process.stop().await;
    eventually("the sentinel promotes the replica", FAILOVER, || async {
        let (_, port): (String, String) = query(
            &sentinel_url,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        )
        .await
        .map_err(|e| e.to_string())?;
        if port == r.to_string() {
            Ok(())
        } else {
            Err(format!("master still on port {port}"))
        }
    })
    .await;

    let promoted = killed.elapsed();
    serves(&node, &app, "after-failover").await;
    let serving = killed.elapsed();
    eventually("the node is ready again", FAILOVER, || async {
        match http::get(node.http_addr, "/readyz").await {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eprintln!(
        "sentinel failover: master killed → replica promoted in {promoted:?}, node serving \
         (new key stored, login, downlink queued) after {serving:?}, ready after {:?}",
        killed.elapsed()
    );
    // Really on the new master: its list holds the downlink.
    let list = lorabroker::downlink::redis::list_key(
        &node.app.config.redis.key_prefix,
        &device(&app, "dev1"),
    );
    let items: Vec<String> = query(
        &format!("redis://lb:{password}@127.0.0.1:{r}"),
        &["LRANGE", &list, "0", "-1"],
    )
    .await
    .unwrap();
    assert!(
        items.iter().any(|i| i.contains("after-failover")),
        "{items:?}"
    );
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// (d) A three-master Redis Cluster.

/// One master of a test cluster on `port`, its `nodes.conf` and append-only file in
/// `dir/<port>` (every write synced), so that a restart in the same place rejoins the
/// cluster with its keys.
async fn cluster_master(dir: &Path, port: u16) -> Server {
    let dir = dir.join(port.to_string());
    std::fs::create_dir_all(&dir).expect("the master's directory");
    let args = strings(&[
        "--port",
        &port.to_string(),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "2000",
    ]);
    let persistence = [
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ];
    redis_server_persisting(&dir, port, &args, &persistence).await
}

/// Starts three masters in `dir`, joins them into a cluster and waits until every one
/// says `cluster_state:ok`.
async fn three_master_cluster(dir: &Path) -> ([u16; 3], Vec<Server>) {
    let ports = [free_port(), free_port(), free_port()];
    let mut servers = Vec::new();
    for port in ports {
        servers.push(cluster_master(dir, port).await);
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .arg("--cluster-yes")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("redis-cli runs");
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for port in ports {
        eventually("the cluster is up", START, || cluster_ok(port)).await;
    }
    (ports, servers)
}

/// `cluster_state:ok` on the master at `port`.
async fn cluster_ok(port: u16) -> Result<(), String> {
    let info: String = query(&format!("redis://127.0.0.1:{port}"), &["CLUSTER", "INFO"])
        .await
        .map_err(|e| e.to_string())?;
    if info.contains("cluster_state:ok") {
        Ok(())
    } else {
        Err(info)
    }
}

#[tokio::test]
async fn every_store_works_on_a_redis_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (ports, servers) = three_master_cluster(dir.path()).await;
    let mut c = config();
    c.redis.mode = "cluster".into();
    // One seed is enough: the rest is discovered.
    c.redis.cluster_urls = vec![format!("redis://127.0.0.1:{}", ports[0])];
    c.limits.max_connections_per_key = 2;
    let node = node_from_config(c.clone()).await;
    // The cluster connection is dialled on first use; on a busy machine that dial alone can
    // take longer than one store operation's timeout, so start once the node is ready.
    ready(&node).await;

    // Several tenants, so that their keys land on different nodes.
    let apps: Vec<AppRef> = (0..6).map(|_| app()).collect();
    let mut keys = Vec::new();
    for app in &apps {
        // API keys: insert, list (index and records on different slots), remove.
        let a = node.key(app, Rights::DEFAULT).await;
        let b = node.key(app, Rights::DEFAULT).await;
        let listed = node.app.keys.list(app).await.expect("keys listed");
        assert_eq!(listed.len(), 2, "{listed:?}");
        let b_id = b.split('.').nth(1).unwrap();
        assert!(node.app.keys.remove(b_id).await.unwrap().is_some());
        assert_eq!(node.app.keys.list(app).await.unwrap().len(), 1);
        assert!(node.app.keys.get(b_id).await.unwrap().is_none());
        // Device registry.
        let dev = device(app, "dev1");
        node.register_device(&dev).await;
        assert!(node.app.devices.contains(&dev).await.unwrap());
        assert_eq!(node.app.devices.list(app).await.unwrap().len(), 1);
        keys.push(a);
    }
    let mut used = Vec::new();
    for (i, slot) in ports.iter().enumerate() {
        let count: i64 = query(&format!("redis://127.0.0.1:{slot}"), &["DBSIZE"])
            .await
            .unwrap();
        used.push((i, count));
    }
    assert!(
        used.iter().filter(|(_, n)| *n > 0).count() >= 2,
        "the keys all landed on one node: {used:?}"
    );

    // Downlinks over MQTT (push script, registry check) and popped again.
    let (app, key) = (&apps[0], &keys[0]);
    let dev = device(app, "dev1");
    let client = node.client(app, key).await;
    push_over_mqtt(&node, &client, &dev, "on-the-cluster").await;
    let popped = node.app.queue.pop(&dev).await.unwrap().expect("an item");
    assert!(popped.contains("on-the-cluster"), "{popped}");
    assert!(node.app.queue.pop(&dev).await.unwrap().is_none());

    // Byte quotas: the scripts' counters live in the tenant's slot.
    let limits = QueueLimits {
        capacity: 100,
        device_bytes: 200,
        application_bytes: 300,
        tenant_bytes: 1000,
        idle_expiry: Duration::from_secs(60),
    };
    let queue = RedisDownlinkQueue::new(
        RedisConn::open(&c.redis).unwrap(),
        &c.redis.key_prefix,
        limits,
    );
    let item = "x".repeat(150);
    let one = std::slice::from_ref(&item);
    assert_eq!(queue.push(&dev, one).await.unwrap(), 1);
    assert!(matches!(
        queue.push(&dev, one).await,
        Err(QueueError::DeviceBytes { .. })
    ));
    let other = device(app, "dev2");
    queue.push(&other, one).await.unwrap();
    assert!(matches!(
        queue.push(&device(app, "dev3"), one).await,
        Err(QueueError::ApplicationQuota { .. })
    ));
    assert_eq!(queue.usage(&dev).await.unwrap().application_bytes, 300);
    assert_eq!(
        queue.pop(&dev).await.unwrap().as_deref(),
        Some(item.as_str())
    );
    assert_eq!(queue.usage(&dev).await.unwrap().application_bytes, 150);

    // Connection quota: two connections per key, the third is refused.
    let second = node.client(app, key).await;
    let third = TestClient::connect(node.mqtt_addr, &node.username(app), key, &unique("c")).await;
    assert!(third.is_err(), "a third connection of one key was let in");
    drop((client, second));

    // Takeover epochs: the second connection of a client ID closes the first.
    let (app, key) = (&apps[1], &keys[1]);
    let mut first = TestClient::connect(node.mqtt_addr, &node.username(app), key, "same-id")
        .await
        .expect("first connection");
    let _second = TestClient::connect(node.mqtt_addr, &node.username(app), key, "same-id")
        .await
        .expect("second connection");
    first.expect_closed().await;
    let a = node.app.epochs.next(app, "x").await.unwrap();
    let b = node.app.epochs.next(app, "x").await.unwrap();
    assert!(a < b, "{a} then {b}");

    node.shutdown().await;
    drop(servers);
}

/// Waits until the node's `/readyz` answers 200.
async fn ready(node: &TestNode) {
    eventually("the node is ready", FAILOVER, || async {
        match http::get(node.http_addr, "/readyz").await {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn the_node_keeps_serving_when_a_cluster_master_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (ports, mut servers) = three_master_cluster(dir.path()).await;
    let mut c = config();
    c.redis.mode = "cluster".into();
    c.redis.cluster_urls = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let node = node_from_config(c).await;
    // The cluster connection is dialled on first use; under load that dial alone can
    // outlast one store operation's bound, so start once the node says it is ready.
    ready(&node).await;
    let app = app();
    let key = node.key(&app, Rights::DEFAULT).await;
    let dev = device(&app, "dev1");
    node.register_device(&dev).await;
    let mut client = node.client(&app, &key).await;
    client.subscribe("#").await;
    push_over_mqtt(&node, &client, &dev, "before-restart").await;
    client.next_on("/down/queued").await;

    // The master holding the device's downlink list: the one that answers for its key.
    let list = lorabroker::downlink::redis::list_key(&node.app.config.redis.key_prefix, &dev);
    let mut owner = None;
    for (i, port) in ports.iter().enumerate() {
        let len: Result<i64, _> =
            query(&format!("redis://127.0.0.1:{port}"), &["LLEN", &list]).await;
        if len == Ok(1) {
            owner = Some(i);
        }
    }
    let owner = owner.expect("one master holds the downlink list");
    let port = ports[owner];

    // Killed outright, then started again in its directory: it rejoins from nodes.conf
    // with its keys from the append-only file.
    let killed = std::time::Instant::now();
    servers[owner].process.stop().await;
    // The node sees the outage: the slot's master is gone.
    assert!(
        node.app.queue.list(&dev).await.is_err(),
        "the downlink list was read with its master down"
    );
    let restarted = cluster_master(dir.path(), port).await;
    servers[owner] = restarted;
    for p in ports {
        eventually("the cluster is whole again", FAILOVER, || cluster_ok(p)).await;
    }
    let rejoined = killed.elapsed();

    // Pushes go through again (retried while the cluster settles), and the client that
    // stayed connected sees them queued.
    let mut attempt = 0;
    eventually("a downlink is queued after the restart", FAILOVER, || {
        attempt += 1;
        let marker = format!("after-restart-{attempt}");
        let (node, client, dev) = (&node, &client, &dev);
        async move {
            let topic = format!(
                "v3/{}/devices/{}/down/push",
                node.username(&dev.app),
                dev.device
            );
            client
                .publish(
                    &topic,
                    format!(
                        r#"{{"downlinks":[{{"f_port":1,"frm_payload":"AQ==","correlation_ids":["{marker}"]}}]}}"#
                    ),
                )
                .await;
            for _ in 0..25 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Ok(items) = node.app.queue.list(dev).await {
                    if items.iter().any(|i| i.contains(&marker)) {
                        return Ok(());
                    }
                }
            }
            Err(format!("{marker} not queued"))
        }
    })
    .await;
    let serving = killed.elapsed();
    let queued = client.next_on("/down/queued").await;
    assert!(queued.is_object(), "{queued}");
    // The item from before the restart survived with its master.
    let items = node.app.queue.list(&dev).await.unwrap();
    assert!(
        items.iter().any(|i| i.contains("before-restart")),
        "{items:?}"
    );
    ready(&node).await;
    // A new key (API key store) and a login with it work too.
    serves(&node, &app, "after-restart-login").await;
    eprintln!(
        "cluster master restart: whole again after {rejoined:?}, downlinks queued after \
         {serving:?}, ready after {:?}",
        killed.elapsed()
    );
    node.shutdown().await;
    drop(servers);
}
