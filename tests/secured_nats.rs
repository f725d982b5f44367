//! Secured NATS (issue 10, DESIGN §7): a real `nats-server` on a free loopback port,
//! started with a configuration that requires a user and password, a token, an NKey, a
//! `.creds` file (operator mode, with JWTs made here) or TLS with a CA made here (with and
//! without client-certificate verification). For each, a node with the right settings is
//! ready and carries an uplink published on NATS by a separate upstream connection to an
//! MQTT subscriber; the same node with wrong credentials is not ready and its log says why
//! without the secret. Also: several seed URLs with the first one down, a restart of the
//! secured server while a node serves, bad files stopping the start, and the `lorabroker
//! serve` binary with the same settings.
//!
//! Every secret is a fresh random string, and every test scans everything the nodes said
//! (logs of all the tests of this binary, `/readyz`, `/metrics`, errors) for the secrets
//! it made.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, Once};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpStream;

use common::broker::{Backend, TestEnv, TestNode};
use common::http::get;
use common::services::{find_on_path, free_port, unique};
use common::shell::Spawned;
use common::wait::eventually;
use lorabroker::app::Backends;
use lorabroker::auth::Rights;
use lorabroker::config::{Config, NatsConfig};
use lorabroker::topic::{DeviceRef, Event, Id};
use lorabroker::upstream::Upstream;

/// How long a node may take to get ready, or a message to arrive.
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// The cases.

#[tokio::test]
async fn user_and_password() {
    let dir = tempdir();
    // Characters a URL must percent-encode.
    let password = format!("{}@:/%", secret("pw"));
    let encoded = password
        .replace('%', "%25")
        .replace('@', "%40")
        .replace(':', "%3A")
        .replace('/', "%2F");
    let server = SecuredNats::start(
        &dir,
        &format!("authorization {{ user: \"lorabroker\", password: \"{password}\" }}"),
    )
    .await;
    let good = NatsConfig {
        user: "lorabroker".into(),
        password_file: write(&dir, "password", &format!("{password}\n")),
        ..server.config()
    };
    let bad = NatsConfig {
        password_file: write(&dir, "wrong-password", &secret("wrong")),
        ..good.clone()
    };
    let secrets = [password.as_str(), &encoded, &read(&bad.password_file)];
    serves(&good, &secrets).await;
    refused(
        &bad,
        &format!(
            "authorization violation: the server refused user \"lorabroker\" with the password \
             in nats.password_file ({})",
            bad.password_file
        ),
        &secrets,
    )
    .await;
    // Credentials in the URL keep working, and are not shown either.
    let in_url = NatsConfig {
        url: format!("nats://lorabroker:{encoded}@127.0.0.1:{}", server.port),
        ..NatsConfig::default()
    };
    serves(&in_url, &secrets).await;
}

#[tokio::test]
async fn token() {
    let dir = tempdir();
    let token = secret("token");
    let server = SecuredNats::start(&dir, &format!("authorization {{ token: \"{token}\" }}")).await;
    let good = NatsConfig {
        token_file: write(&dir, "token", &token),
        ..server.config()
    };
    let bad = NatsConfig {
        token_file: write(&dir, "wrong-token", &secret("wrong")),
        ..server.config()
    };
    let secrets = [token.as_str(), &read(&bad.token_file)];
    serves(&good, &secrets).await;
    // A token as the URL's user (nats://TOKEN@host), as other NATS clients take it.
    let in_url = NatsConfig {
        url: format!("nats://{token}@127.0.0.1:{}", server.port),
        ..NatsConfig::default()
    };
    serves(&in_url, &secrets).await;
    refused(
        &bad,
        &format!(
            "authorization violation: the server refused the token in nats.token_file ({})",
            bad.token_file
        ),
        &secrets,
    )
    .await;
    // No credentials at all: the log says which keys to set.
    refused(
        &server.config(),
        "this node sent no credentials: set nats.user and nats.password_file",
        &secrets,
    )
    .await;
}

#[tokio::test]
async fn nkey() {
    let dir = tempdir();
    let user = nkeys::KeyPair::new_user();
    let server = SecuredNats::start(
        &dir,
        &format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
            user.public_key()
        ),
    )
    .await;
    let seed = user.seed().expect("a generated pair has its seed");
    let stranger = nkeys::KeyPair::new_user()
        .seed()
        .expect("a generated pair has its seed");
    let good = NatsConfig {
        nkey_seed_file: write(&dir, "user.nk", &format!("{seed}\n")),
        ..server.config()
    };
    let bad = NatsConfig {
        nkey_seed_file: write(&dir, "stranger.nk", &stranger),
        ..server.config()
    };
    let secrets = [seed.as_str(), &stranger];
    serves(&good, &secrets).await;
    refused(
        &bad,
        &format!(
            "authorization violation: the server refused the NKey of nats.nkey_seed_file ({})",
            bad.nkey_seed_file
        ),
        &secrets,
    )
    .await;
}

#[tokio::test]
async fn creds_file_of_an_operator_mode_server() {
    let dir = tempdir();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        json!({
            "type": "account", "version": 2,
            "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                       "wildcards": true, "conn": -1, "leaf": -1},
        }),
    );
    let operator_file = write(&dir, "operator.jwt", &operator_jwt);
    let server = SecuredNats::start(
        &dir,
        &format!(
            "operator: \"{operator_file}\"\nresolver: MEMORY\n\
             resolver_preload: {{ {}: \"{account_jwt}\" }}",
            account.public_key()
        ),
    )
    .await;
    // A user of the account, and one of an account the server does not know.
    let (good_creds, good_seed) = creds(&account);
    let (bad_creds, bad_seed) = creds(&nkeys::KeyPair::new_account());
    let good = NatsConfig {
        creds_file: write(&dir, "user.creds", &good_creds),
        ..server.config()
    };
    let bad = NatsConfig {
        creds_file: write(&dir, "stranger.creds", &bad_creds),
        ..server.config()
    };
    let secrets = [good_seed.as_str(), &bad_seed];
    serves(&good, &secrets).await;
    refused(
        &bad,
        &format!(
            "authorization violation: the server refused the credentials in nats.creds_file ({})",
            bad.creds_file
        ),
        &secrets,
    )
    .await;
}

#[tokio::test]
async fn tls_with_a_custom_ca() {
    let dir = tempdir();
    let pki = Pki::new(&dir);
    let token = secret("token");
    let server = SecuredNats::start(
        &dir,
        &format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\nauthorization {{ token: \"{token}\" }}",
            pki.server_cert, pki.server_key
        ),
    )
    .await;
    let token_file = write(&dir, "token", &token);
    let good = NatsConfig {
        tls_ca_file: pki.ca.clone(),
        token_file: token_file.clone(),
        ..server.config()
    };
    let secrets = [token.as_str()];
    serves(&good, &secrets).await;
    // tls:// URLs and the implicit TLS of a CA file both work; a CA that did not sign the
    // server's certificate does not.
    let tls_url = NatsConfig {
        url: format!("tls://127.0.0.1:{}", server.port),
        ..good.clone()
    };
    serves(&tls_url, &secrets).await;
    let other = Pki::new(&tempdir());
    let wrong_ca = NatsConfig {
        tls_ca_file: other.ca.clone(),
        ..good.clone()
    };
    refused(
        &wrong_ca,
        &format!(
            "nats: IO error: the server is unreachable, or the TLS handshake failed: the server \
             must speak TLS with a certificate for the URL's host name that chains to \
             nats.tls_ca_file ({})",
            other.ca
        ),
        &secrets,
    )
    .await;
}

#[tokio::test]
async fn tls_with_client_certificate_verification() {
    let dir = tempdir();
    let pki = Pki::new(&dir);
    let server = SecuredNats::start(
        &dir,
        &format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}",
            pki.server_cert, pki.server_key, pki.ca
        ),
    )
    .await;
    let good = NatsConfig {
        tls_ca_file: pki.ca.clone(),
        tls_cert_file: pki.client_cert.clone(),
        tls_key_file: pki.client_key.clone(),
        ..server.config()
    };
    let client_key = read(&pki.client_key);
    let secrets = [client_key.as_str()];
    serves(&good, &secrets).await;
    let without_certificate = NatsConfig {
        tls_cert_file: String::new(),
        tls_key_file: String::new(),
        ..good.clone()
    };
    refused(
        &without_certificate,
        &format!(
            "the TLS handshake failed: the server must speak TLS with a certificate for the \
             URL's host name that chains to nats.tls_ca_file ({}), and must not require a \
             client certificate (nats.tls_cert_file)",
            pki.ca
        ),
        &secrets,
    )
    .await;
}

#[tokio::test]
async fn several_urls_with_the_first_seed_down() {
    let dir = tempdir();
    let token = secret("token");
    let server = SecuredNats::start(&dir, &format!("authorization {{ token: \"{token}\" }}")).await;
    let down = free_port();
    let config = NatsConfig {
        url: format!("nats://127.0.0.1:{down}, nats://127.0.0.1:{}", server.port),
        token_file: write(&dir, "token", &token),
        ..NatsConfig::default()
    };
    serves(&config, &[&token]).await;
}

#[tokio::test]
async fn a_restarted_secured_server_is_reconnected_to_and_traffic_flows_again() {
    let dir = tempdir();
    let token = secret("token");
    let mut server =
        SecuredNats::start(&dir, &format!("authorization {{ token: \"{token}\" }}")).await;
    let config = NatsConfig {
        token_file: write(&dir, "token", &token),
        ..server.config()
    };
    let env = TestEnv::new(Backend::Embedded).await;
    let node = node(&env, &config).await;
    let upstream = upstream(&config).await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut client = node.client(&app, &key).await;
    client.subscribe("#").await;
    uplink_arrives(&upstream, &app, &mut client, "dev1").await;

    server.stop().await;
    eventually("the node reports the outage", WAIT, || async {
        let (status, body) = get(node.http_addr, "/readyz").await;
        (status == 503 && body.contains("bus not connected"))
            .then_some(())
            .ok_or(format!("{status} {body}"))
    })
    .await;
    server.restart().await;
    ready(&node).await;
    eventually("the upstream reconnects", WAIT, || async {
        upstream_ready(&upstream).then_some(()).ok_or("not yet")
    })
    .await;
    // The MQTT client's subscription survived: the resubscribed node carries traffic.
    uplink_arrives(&upstream, &app, &mut client, "dev2").await;
    assert_no_secret(&node, &[&token]).await;
    node.shutdown().await;
}

#[tokio::test]
async fn bad_files_stop_the_start_naming_the_key_and_the_file() {
    let dir = tempdir();
    let pki = Pki::new(&dir);
    let url = format!("nats://127.0.0.1:{}", free_port());
    let missing = dir.join("missing").display().to_string();
    let empty = write(&dir, "empty", "\n");
    let not_a_seed = secret("SUnot-a-seed");
    let seed_file = write(&dir, "bad.nk", &not_a_seed);
    let account_seed = nkeys::KeyPair::new_account().seed().expect("a seed");
    let account_seed_file = write(&dir, "account.nk", &account_seed);
    let garbage = secret("garbage");
    let garbage_file = write(&dir, "garbage", &garbage);
    let cases: Vec<(NatsConfig, String)> = vec![
        (
            NatsConfig {
                user: "u".into(),
                password_file: missing.clone(),
                ..NatsConfig::default()
            },
            format!("nats.password_file: cannot read {missing}: No such file"),
        ),
        (
            NatsConfig {
                token_file: empty.clone(),
                ..NatsConfig::default()
            },
            format!("nats.token_file: {empty} is empty"),
        ),
        (
            NatsConfig {
                token_file: dir.display().to_string(),
                ..NatsConfig::default()
            },
            format!(
                "nats.token_file: cannot read {}: it is a directory",
                dir.display()
            ),
        ),
        (
            NatsConfig {
                nkey_seed_file: seed_file.clone(),
                ..NatsConfig::default()
            },
            format!("nats.nkey_seed_file: {seed_file} does not hold an NKey seed"),
        ),
        (
            NatsConfig {
                nkey_seed_file: account_seed_file.clone(),
                ..NatsConfig::default()
            },
            format!("nats.nkey_seed_file: {account_seed_file} holds the seed of an operator"),
        ),
        (
            NatsConfig {
                creds_file: garbage_file.clone(),
                ..NatsConfig::default()
            },
            format!("nats.creds_file: {garbage_file} is not a NATS credentials file"),
        ),
        (
            NatsConfig {
                tls_ca_file: garbage_file.clone(),
                ..NatsConfig::default()
            },
            format!("nats.tls_ca_file: {garbage_file} holds no PEM certificate"),
        ),
        (
            NatsConfig {
                tls_cert_file: pki.client_cert.clone(),
                tls_key_file: pki.server_key.clone(),
                ..NatsConfig::default()
            },
            format!(
                "nats.tls_key_file: {} does not go with the certificate in nats.tls_cert_file ({})",
                pki.server_key, pki.client_cert
            ),
        ),
        (
            NatsConfig {
                tls_cert_file: pki.client_cert.clone(),
                tls_key_file: garbage_file.clone(),
                ..NatsConfig::default()
            },
            format!("nats.tls_key_file: {garbage_file} holds no PEM private key"),
        ),
    ];
    let secrets = [not_a_seed.as_str(), &account_seed, &garbage];
    for (nats, expected) in cases {
        let config = Config {
            nats: NatsConfig {
                url: url.clone(),
                ..nats
            },
            ..Config::default()
        };
        config.validate().expect("valid apart from the files");
        let error = match Backends::from_config(&config, "test").await {
            Ok(_) => panic!("{:?} started", config.nats),
            Err(e) => e.to_string(),
        };
        assert!(error.starts_with(&expected), "{error:?} for {expected:?}");
        for s in secrets {
            assert!(!error.contains(s), "{error:?} shows a secret");
        }
    }
    // Two bad files at once: both are reported.
    let config = Config {
        nats: NatsConfig {
            url,
            token_file: empty.clone(),
            tls_ca_file: garbage_file.clone(),
            ..NatsConfig::default()
        },
        ..Config::default()
    };
    let error = Backends::from_config(&config, "test")
        .await
        .err()
        .expect("bad files")
        .to_string();
    assert!(
        error.contains("nats.token_file") && error.contains("nats.tls_ca_file"),
        "{error}"
    );
}

#[tokio::test]
async fn the_serve_binary_takes_the_same_settings_and_says_what_is_wrong() {
    let dir = tempdir();
    let token = secret("token");
    let server = SecuredNats::start(&dir, &format!("authorization {{ token: \"{token}\" }}")).await;
    let wrong = secret("wrong");
    let wrong_file = write(&dir, "wrong-token", &wrong);
    let config_file = write(
        &dir,
        "lorabroker.toml",
        &format!(
            "[mqtt]\nlisten = \"127.0.0.1:0\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [nats]\nurl = [\"nats://127.0.0.1:{}\"]\ntoken_file = \"{wrong_file}\"\n",
            server.port
        ),
    );
    let mut serve = Spawned::start(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lorabroker"))
            .args(["--config", &config_file, "serve"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut stdout = serve.stdout_lines();
    let mut stderr = BufReader::new(serve.child().stderr.take().expect("piped")).lines();
    let http = tokio::time::timeout(WAIT, async {
        while let Some(line) = stdout.next_line().await.expect("stdout") {
            if let Some(addr) = line.trim().strip_prefix("HTTP      http://") {
                return addr.split_whitespace().next().map(str::to_owned);
            }
        }
        None
    })
    .await
    .expect("the banner within the wait")
    .expect("the banner names the HTTP address");
    let expected = format!(
        "authorization violation: the server refused the token in nats.token_file ({wrong_file})"
    );
    let mut said = String::new();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = stderr.next_line().await.expect("stderr") {
            said.push_str(&line);
            said.push('\n');
            if line.contains("cannot reach NATS at nats://127.0.0.1:") && line.contains(&expected) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no line with {expected:?} in:\n{said}"));
    let (status, body) = get(http.parse().expect("an address"), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(!said.contains(&wrong) && !said.contains(&token), "{said}");
    assert!(!body.contains(&wrong), "{body}");
    serve.stop().await;

    // A missing file stops the start, naming the key and the file.
    let missing = dir.join("no-such-token").display().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lorabroker"))
        .args(["--config", &config_file, "serve"])
        .env("LORABROKER_NATS__TOKEN_FILE", &missing)
        .kill_on_drop(true)
        .output()
        .await
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("nats.token_file: cannot read {missing}")),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// What every case checks.

/// A node with `nats` is ready and carries an uplink from a separate upstream connection
/// (with the same settings) to an MQTT subscriber; nothing it says shows a secret.
async fn serves(nats: &NatsConfig, secrets: &[&str]) {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = node(&env, nats).await;
    ready(&node).await;
    let upstream = upstream(nats).await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let mut client = node.client(&app, &key).await;
    client.subscribe("#").await;
    uplink_arrives(&upstream, &app, &mut client, "dev1").await;
    assert_no_secret(&node, secrets).await;
    node.shutdown().await;
}

/// A node with `nats` starts but is not ready, and its log says `why` (on a line about
/// this node's NATS URL), without any of `secrets`.
async fn refused(nats: &NatsConfig, why: &str, secrets: &[&str]) {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = node(&env, nats).await;
    let server = format!("NATS at {}", lorabroker::config::redact_urls(&nats.url));
    eventually("the log says why the node is not ready", WAIT, || async {
        let logs = logs();
        let about: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains(&format!("cannot reach {server}")))
            .collect();
        // tracing shows the error field quoted, with its own quotes escaped.
        let quoted = why.replace('"', "\\\"");
        about
            .iter()
            .any(|l| l.contains(&quoted))
            .then_some(())
            .ok_or(format!("no line with {quoted:?} among {about:#?}"))
    })
    .await;
    let (status, body) = get(node.http_addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("bus not connected"), "{body}");
    assert_no_secret(&node, secrets).await;
    node.shutdown().await;
}

/// Neither the logs (of every test here), `/readyz` nor `/metrics` show a secret.
async fn assert_no_secret(node: &TestNode, secrets: &[&str]) {
    let (_, readyz) = get(node.http_addr, "/readyz").await;
    let (_, metrics) = get(node.http_addr, "/metrics").await;
    let logs = logs();
    for secret in secrets {
        let secret = secret.trim();
        assert!(!secret.is_empty());
        for (what, text) in [
            ("logs", &logs),
            ("/readyz", &readyz),
            ("/metrics", &metrics),
        ] {
            assert!(!text.contains(secret), "a secret in the {what}:\n{text}");
        }
    }
}

/// A node of `env` with the bus `nats` (and in-memory stores).
async fn node(env: &TestEnv, nats: &NatsConfig) -> TestNode {
    capture_logs();
    let mut config = env.config();
    config.nats = nats.clone();
    env.node_from_config(config).await
}

async fn ready(node: &TestNode) {
    eventually("the node is ready", WAIT, || async {
        let (status, body) = get(node.http_addr, "/readyz").await;
        (status == 200)
            .then_some(())
            .ok_or(format!("{status} {body}"))
    })
    .await;
}

/// The upstream side, on a NATS connection of its own with the same settings.
async fn upstream(nats: &NatsConfig) -> (Upstream, Backends) {
    let config = Config {
        nats: nats.clone(),
        ..Config::default()
    };
    let backends = Backends::from_config(&config, "test-upstream")
        .await
        .expect("upstream backends");
    (Upstream::from_backends(&backends), backends)
}

fn upstream_ready((_, backends): &(Upstream, Backends)) -> bool {
    backends.bus.is_ready()
}

/// An uplink of `dev` published upstream reaches `client` (subscribed to `#`).
async fn uplink_arrives(
    upstream: &(Upstream, Backends),
    app: &lorabroker::topic::AppRef,
    client: &mut common::broker::TestClient,
    dev: &str,
) {
    eventually("the upstream is connected", WAIT, || async {
        upstream_ready(upstream).then_some(()).ok_or("not yet")
    })
    .await;
    let device = DeviceRef::new(app.clone(), Id::parse(dev).expect("a device ID"));
    let marker = unique("uplink");
    upstream
        .0
        .publish_json(&device, Event::Up, &json!({ "marker": marker }))
        .await
        .expect("published");
    upstream.0.flush().await.expect("flushed");
    let got = client.next_on(&format!("/devices/{dev}/up")).await;
    assert_eq!(got["marker"], marker.as_str());
}

// ---------------------------------------------------------------------------------------
// nats-server, secrets, certificates, JWTs.

/// A `nats-server` on a free loopback port with a configuration of the test's; stopped
/// and restarted on the same port.
struct SecuredNats {
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    process: Option<Spawned>,
}

impl SecuredNats {
    async fn start(dir: &Path, settings: &str) -> SecuredNats {
        let port = free_port();
        let conf = dir.join(format!("nats-{port}.conf"));
        std::fs::write(&conf, format!("listen: \"127.0.0.1:{port}\"\n{settings}\n"))
            .expect("nats-server config written");
        let mut server = SecuredNats {
            port,
            conf,
            log: dir.join(format!("nats-{port}.log")),
            process: None,
        };
        server.restart().await;
        server
    }

    /// Settings for this server's URL and nothing else.
    fn config(&self) -> NatsConfig {
        NatsConfig {
            url: format!("nats://127.0.0.1:{}", self.port),
            ..NatsConfig::default()
        }
    }

    async fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop().await;
        }
    }

    /// Starts the server (again) and waits until it greets with INFO.
    async fn restart(&mut self) {
        assert!(self.process.is_none(), "stop() first");
        let binary = find_on_path("nats-server")
            .expect("nats-server is on PATH or in /usr/sbin (apt-get install -y nats-server)");
        let log = std::fs::File::create(&self.log).expect("log file");
        self.process = Some(Spawned::start(
            tokio::process::Command::new(binary)
                .arg("-c")
                .arg(&self.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone().expect("log file")))
                .stderr(Stdio::from(log)),
        ));
        let port = self.port;
        let log = self.log.clone();
        eventually("nats-server greets", WAIT, || async {
            let greeting = async {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
                let mut buf = [0u8; 5];
                stream.read_exact(&mut buf).await.ok()?;
                (&buf == b"INFO ").then_some(())
            };
            match tokio::time::timeout(Duration::from_millis(500), greeting).await {
                Ok(Some(())) => Ok(()),
                _ => Err(std::fs::read_to_string(&log).unwrap_or_default()),
            }
        })
        .await;
    }
}

/// A fresh random secret, recognisable in a failure message.
fn secret(what: &str) -> String {
    format!("{what}-{}", unique("s"))
}

/// A temporary directory kept for the test's life (its path is leaked on purpose: the
/// files in it are the node's and the server's).
fn tempdir() -> PathBuf {
    tempfile::Builder::new()
        .prefix("lorabroker-secured-nats-")
        .tempdir()
        .expect("a temporary directory")
        .keep()
}

/// Writes `content` to `dir/name`; its path.
fn write(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("file written");
    path.display().to_string()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).expect("file read")
}

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as
/// PEM files.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "lorabroker test CA");
        let ca = ca_params.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>| {
            let key = KeyPair::generate().expect("a key");
            let cert = CertificateParams::new(names)
                .expect("params")
                .signed_by(&key, &issuer)
                .expect("a certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
        let (client_cert, client_key) = leaf(vec!["lorabroker-node".into()]);
        Pki {
            ca: write(dir, "ca.pem", &ca.pem()),
            server_cert: write(dir, "server.pem", &server_cert),
            server_key: write(dir, "server-key.pem", &server_key),
            client_cert: write(dir, "client.pem", &client_cert),
            client_key: write(dir, "client-key.pem", &client_key),
        }
    }
}

/// A NATS JWT (`ed25519-nkey`) for `subject`, issued and signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let claims = json!({
        "jti": unique("jti").to_uppercase(),
        "iat": now,
        "iss": issuer.public_key(),
        "name": subject.chars().take(8).collect::<String>(),
        "sub": subject,
        "nats": nats,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let signature = issuer.sign(signed.as_bytes()).expect("signed");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// A `.creds` file of a new user of `account`, and the user's seed.
fn creds(account: &nkeys::KeyPair) -> (String, String) {
    let user = nkeys::KeyPair::new_user();
    let user_jwt = jwt(
        account,
        &user.public_key(),
        json!({"type": "user", "version": 2, "pub": {}, "sub": {},
               "subs": -1, "data": -1, "payload": -1}),
    );
    let seed = user.seed().expect("a seed");
    let file = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    );
    (file, seed)
}

// ---------------------------------------------------------------------------------------
// Logs.

/// Everything logged in this test binary so far.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the logs of every node of this binary to [`LOGS`], filtered as `lorabroker
/// serve` filters them by default.
fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::fmt()
            .with_env_filter("info,async_nats=warn")
            .with_writer(|| Capture)
            .with_ansi(false)
            .init();
    });
}

fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}
