//! MQTT over TLS (issue 10 point 1): Mosquitto's clients with `--cafile` (and client
//! certificates), refused handshakes counted by reason, certificate rotation without
//! dropping connections, and a bad certificate file that stops the start. Certificates are
//! made in each test (rcgen); the MQTT behaviour suite every transport passes is in
//! tests/transports.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use common::broker::{Backend, TestEnv, TestNode};
use common::raw::Raw;
use common::shell::{require, until, Spawned};
use common::tls::{peer_certificate, tls_connect, TestCa};
use lorabroker::app::{App, Backends};
use lorabroker::auth::Rights;
use lorabroker::config::Config;
use lorabroker::server::Node;
use lorabroker::topic::{DeviceRef, Event, Id};
use lorabroker::transport::Kind;

/// Everything the test binary logged at INFO and above.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    common::log_capture::captured("info")
}

/// The value of one series in the node's /metrics (0 when absent).
fn metric(node: &TestNode, series: &str) -> f64 {
    node.app
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A CA, a server certificate for localhost signed by it, and their files.
struct Certs {
    dir: tempfile::TempDir,
    ca: TestCa,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("lorabroker test CA");
    let server = ca.server();
    let ca_file = ca.write(dir.path(), "ca.pem");
    let (cert_file, key_file) = server.write(dir.path(), "server");
    Certs {
        dir,
        ca,
        ca_file,
        cert_file,
        key_file,
    }
}

fn use_tls(c: &mut Config, cert: &Path, key: &Path) {
    c.mqtt.tls.listen = "127.0.0.1:0".into();
    c.mqtt.tls.cert_file = cert.display().to_string();
    c.mqtt.tls.key_file = key.display().to_string();
}

fn device(env: &TestEnv, dev: &str) -> DeviceRef {
    DeviceRef::new(env.app("app1"), Id::parse(dev).unwrap())
}

const PUSH: &str = r#"{"downlinks":[{"f_port":15,"frm_payload":"vu8=","priority":"NORMAL"}]}"#;

/// Publishes an uplink of dev1 every 100 ms until dropped (a mosquitto_sub starting up
/// subscribes at some point).
fn uplinks(node: &TestNode, env: &TestEnv) -> tokio::task::JoinHandle<()> {
    let (up, dev) = (node.upstream(), device(env, "dev1"));
    tokio::spawn(async move {
        loop {
            let _ = up.publish(&dev, Event::Up, r#"{"uplink":1}"#.into()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn mosquitto(program: &str, port: u16, ca: &Path, user: &str, key: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(["--cafile", &ca.display().to_string()])
        .args(["-h", "localhost", "-p", &port.to_string()])
        .args(["-u", user, "-P", key])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_with_cafile() {
    require("mosquitto_sub");
    let env = TestEnv::new(Backend::Embedded).await;
    let certs = certs();
    let node = env
        .node_with(|c| use_tls(c, &certs.cert_file, &certs.key_file))
        .await;
    let app1 = env.app("app1");
    let (user, key) = (node.username(&app1), node.key(&app1, Rights::DEFAULT).await);
    let port = node.addr(Kind::Tls).port();

    let mut sub = Spawned::start(
        mosquitto("mosquitto_sub", port, &certs.ca_file, &user, &key).args(["-t", "#", "-v"]),
    );
    let mut lines = sub.stdout_lines();
    let publisher = uplinks(&node, &env);
    let (topic, up) = until(&mut lines, "/devices/dev1/up", Duration::from_secs(10)).await;
    assert_eq!(topic, format!("v3/{user}/devices/dev1/up"));
    assert_eq!(up["uplink"], 1);
    publisher.abort();

    let topic = format!("v3/{user}/devices/dev1/down/push");
    let out = Spawned::start(
        mosquitto("mosquitto_pub", port, &certs.ca_file, &user, &key)
            .args(["-t", &topic, "-m", PUSH]),
    )
    .output()
    .await;
    assert!(out.status.success(), "mosquitto_pub: {out:?}");
    let (_, queued) = until(
        &mut lines,
        "/devices/dev1/down/queued",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(queued["downlink_queued"]["f_port"], 15);
    let stored = node
        .upstream()
        .next_downlink(&device(&env, "dev1"))
        .await
        .unwrap()
        .expect("the pushed downlink is queued");
    assert_eq!(stored["f_port"], 15);
    sub.stop().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_when_client_ca_file_is_set() {
    require("mosquitto_sub");
    let env = TestEnv::new(Backend::Embedded).await;
    let certs = certs();
    let clients = TestCa::new("lorabroker test client CA");
    let client_ca = clients.write(certs.dir.path(), "client-ca.pem");
    let client = clients.client("gateway-42");
    let (client_cert, client_key) = client.write(certs.dir.path(), "client");
    // A certificate of another CA is refused as well as none.
    let stranger = TestCa::new("not trusted").client("stranger");
    let node = env
        .node_with(|c| {
            use_tls(c, &certs.cert_file, &certs.key_file);
            c.mqtt.tls.client_ca_file = client_ca.display().to_string();
        })
        .await;
    let app1 = env.app("app1");
    let (user, key) = (node.username(&app1), node.key(&app1, Rights::DEFAULT).await);
    let tls = node.addr(Kind::Tls);
    let roots = vec![certs.ca.pem()];

    // rustls: with the certificate, CONNACK 0; without it or with a stranger's, no MQTT.
    let mut with = Raw::over(tls_connect(tls, &roots, Some(&client)).await.unwrap());
    assert_eq!(with.connect_with(&user, &key, 30).await, 0);
    for (what, cert) in [("no", None), ("an untrusted", Some(&stranger))] {
        // TLS 1.3 refuses the client's certificate after the client's side is done.
        let refused = match tls_connect(tls, &roots, cert).await {
            Err(_) => true,
            Ok(s) => Raw::over(s).connect_with(&user, &key, 30).await == 255,
        };
        assert!(refused, "{what} client certificate was accepted");
    }
    // The API key stays the credential.
    let mut wrong_key = Raw::over(tls_connect(tls, &roots, Some(&client)).await.unwrap());
    let other = node.key(&env.app("app2"), Rights::DEFAULT).await;
    assert_eq!(wrong_key.connect_with(&user, &other, 30).await, 5);

    // mosquitto_sub with --cert/--key receives; without them it fails.
    let mut sub = Spawned::start(
        mosquitto("mosquitto_sub", tls.port(), &certs.ca_file, &user, &key)
            .args(["--cert", &client_cert.display().to_string()])
            .args(["--key", &client_key.display().to_string()])
            .args(["-t", "#", "-v"]),
    );
    let mut lines = sub.stdout_lines();
    let publisher = uplinks(&node, &env);
    until(&mut lines, "/devices/dev1/up", Duration::from_secs(10)).await;
    sub.stop().await;
    let without = Spawned::start(
        mosquitto("mosquitto_sub", tls.port(), &certs.ca_file, &user, &key)
            .args(["-t", "#", "-v", "-C", "1", "-W", "5"]),
    );
    let out = tokio::time::timeout(Duration::from_secs(10), without.output())
        .await
        .expect("mosquitto_sub without a certificate ends");
    publisher.abort();
    assert!(
        !out.status.success(),
        "mosquitto_sub without --cert: {out:?}"
    );
    assert!(
        out.stdout.is_empty(),
        "received without a certificate: {out:?}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_and_plaintext_are_refused_and_counted() {
    let env = TestEnv::new(Backend::Embedded).await;
    let certs = certs();
    let node = env
        .node_with(|c| use_tls(c, &certs.cert_file, &certs.key_file))
        .await;
    let app1 = env.app("app1");
    let (user, key) = (node.username(&app1), node.key(&app1, Rights::DEFAULT).await);
    let tls = node.addr(Kind::Tls);
    let failures = r#"lorabroker_transport_failures_total{listener="tls",reason="tls_handshake"}"#;

    // A plaintext MQTT CONNECT on the TLS port: closed, counted, no CONNACK.
    let mut plain = TcpStream::connect(tls).await.unwrap();
    let mut connect = bytes::BytesMut::new();
    let mut packet = mqttbytes::v4::Connect::new("plaintext");
    packet.set_login(user.as_str(), key.as_str());
    packet.write(&mut connect).unwrap();
    plain.write_all(&connect).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), plain.read_to_end(&mut answer))
        .await
        .expect("the plaintext connection is closed");
    // At most a TLS alert record (0x15), never a CONNACK (0x20).
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "answered {answer:02x?}"
    );
    common::wait::eventually(
        "the plaintext CONNECT counted",
        Duration::from_secs(2),
        || async {
            match metric(&node, failures) {
                1.0 => Ok(()),
                n => Err(n),
            }
        },
    )
    .await;
    assert_eq!(
        metric(
            &node,
            r#"lorabroker_connects_total{outcome="transport_failed"}"#
        ),
        1.0
    );

    // A client that trusts another CA refuses the server's certificate.
    let other = TestCa::new("another CA").pem();
    let refused = tls_connect(tls, &[other], None).await;
    let Err(error) = refused else {
        panic!("a client with the wrong CA refuses the server");
    };
    assert!(
        error.to_string().contains("UnknownIssuer") || error.to_string().contains("issuer"),
        "{error}"
    );
    // The right CA still works.
    let mut ok = Raw::over(tls_connect(tls, &[certs.ca.pem()], None).await.unwrap());
    assert_eq!(ok.connect_with(&user, &key, 30).await, 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_a_client_hello_is_closed_and_counted() {
    let env = TestEnv::new(Backend::Embedded).await;
    let certs = certs();
    let node = env
        .node_with(|c| {
            use_tls(c, &certs.cert_file, &certs.key_file);
            c.mqtt.handshake_timeout = Duration::from_millis(300);
        })
        .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(node.addr(Kind::Tls)).await.unwrap();
    common::wait::eventually(
        "the socket holds a pending-handshake slot",
        Duration::from_secs(1),
        || async {
            match metric(&node, "lorabroker_pending_handshakes") {
                1.0 => Ok(()),
                n => Err(n),
            }
        },
    )
    .await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut byte))
        .await
        .expect("closed within mqtt.handshake_timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed too early"
    );
    let series =
        r#"lorabroker_transport_failures_total{listener="tls",reason="handshake_timeout"}"#;
    assert_eq!(metric(&node, series), 1.0);
    assert_eq!(metric(&node, "lorabroker_pending_handshakes"), 0.0);
    // The write side is gone too.
    let _ = silent.write_all(b"late").await;
    node.shutdown().await;
}

/// Certificate files laid out as Kubernetes mounts a Secret: `tls.crt` and `tls.key` are
/// symlinks through `..data`, itself a symlink to a timestamped directory, and an update
/// swaps `..data` atomically.
struct SecretMount {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretMount {
    fn new(cert: &str, key: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut mount = SecretMount { dir, version: 0 };
        mount.update(cert, key);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), mount.dir.path().join(name))
                .unwrap();
        }
        mount
    }

    fn update(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let version = format!("..2026_12_02_v{}", self.version);
        let target = self.dir.path().join(&version);
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("tls.crt"), cert).unwrap();
        std::fs::write(target.join("tls.key"), key).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_dropping_connections() {
    let log = captured();
    let env = TestEnv::new(Backend::Embedded).await;
    let (ca_a, ca_b) = (TestCa::new("CA A"), TestCa::new("CA B"));
    let (cert_a, cert_b) = (ca_a.server(), ca_b.server());
    let mut mount = SecretMount::new(&cert_a.cert, &cert_a.key);
    let node = env
        .node_with(|c| {
            use_tls(c, &mount.cert(), &mount.key());
            c.mqtt.tls.reload_interval = Duration::from_millis(200);
        })
        .await;
    let app1 = env.app("app1");
    let (user, key) = (node.username(&app1), node.key(&app1, Rights::DEFAULT).await);
    let tls = node.addr(Kind::Tls);
    let roots = vec![ca_a.pem(), ca_b.pem()];
    let expiry = metric(&node, "lorabroker_tls_certificate_expiry_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now, "expiry gauge {expiry} is not in the future");

    let stream = tls_connect(tls, &roots, None).await.unwrap();
    assert_eq!(peer_certificate(&stream), cert_a.der());
    let mut client1 = Raw::over(stream);
    assert_eq!(client1.connect_with(&user, &key, 30).await, 0);
    assert!(client1.subscribe("#").await);

    mount.update(&cert_b.cert, &cert_b.key);
    let seen_b = Instant::now();
    common::wait::eventually(
        "a new client sees certificate B",
        Duration::from_secs(3),
        || async {
            let s = tls_connect(tls, &roots, None)
                .await
                .map_err(|e| e.to_string())?;
            if peer_certificate(&s) == cert_b.der() {
                Ok(())
            } else {
                Err("still certificate A".to_owned())
            }
        },
    )
    .await;
    assert!(
        seen_b.elapsed() < Duration::from_secs(2),
        "took {:?}",
        seen_b.elapsed()
    );
    assert_eq!(
        metric(&node, r#"lorabroker_tls_reloads_total{result="loaded"}"#),
        1.0
    );
    // Client 1, connected with certificate A, still receives uplinks.
    node.upstream()
        .publish(&device(&env, "dev1"), Event::Up, r#"{"after":"B"}"#.into())
        .await
        .unwrap();
    assert_eq!(
        &client1.next_on("/devices/dev1/up").await.payload[..],
        br#"{"after":"B"}"#
    );
    let mut client2 = Raw::over(tls_connect(tls, &roots, None).await.unwrap());
    assert_eq!(client2.connect_with(&user, &key, 30).await, 0);

    // A broken certificate file: B stays, a warning names the file, the failure counts.
    mount.update(
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
        &cert_b.key,
    );
    let failed = r#"lorabroker_tls_reloads_total{result="failed"}"#;
    common::wait::eventually(
        "the broken file counted",
        Duration::from_secs(3),
        || async {
            match metric(&node, failed) {
                1.0 => Ok(()),
                n => Err(n),
            }
        },
    )
    .await;
    let s = tls_connect(tls, &roots, None).await.unwrap();
    assert_eq!(
        peer_certificate(&s),
        cert_b.der(),
        "the broken file replaced B"
    );
    let logged = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let warning = logged
        .lines()
        .find(|l| l.contains("TLS certificate not reloaded"))
        .unwrap_or_else(|| panic!("no warning logged:\n{logged}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains(&mount.cert().display().to_string()),
        "{warning}"
    );
    assert!(warning.contains("mqtt.tls.cert_file"), "{warning}");
    // Warned once, not every reload_interval.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(metric(&node, failed), 1.0);
    assert_eq!(
        metric(&node, r#"lorabroker_tls_reloads_total{result="loaded"}"#),
        1.0
    );
    node.upstream()
        .publish(
            &device(&env, "dev1"),
            Event::Up,
            r#"{"after":"broken"}"#.into(),
        )
        .await
        .unwrap();
    assert_eq!(
        &client1.next_on("/devices/dev1/up").await.payload[..],
        br#"{"after":"broken"}"#
    );
    node.shutdown().await;
}

/// The certificate a new handshake on `addr` gets when offering `alpn`, and the protocol
/// the server selected.
async fn presented(
    addr: std::net::SocketAddr,
    roots: &[String],
    alpn: &[u8],
) -> Result<(rustls_pki_types::CertificateDer<'static>, Option<Vec<u8>>), String> {
    let s = common::tls::tls_connect_alpn(addr, roots, None, alpn)
        .await
        .map_err(|e| e.to_string())?;
    let selected = s.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    Ok((peer_certificate(&s), selected))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_wss_share_one_certificate_watch() {
    let log = captured();
    let env = TestEnv::new(Backend::Embedded).await;
    let (ca_a, ca_b) = (TestCa::new("shared CA A"), TestCa::new("shared CA B"));
    let (cert_a, cert_b) = (ca_a.server(), ca_b.server());
    let mut mount = SecretMount::new(&cert_a.cert, &cert_a.key);
    let node = env
        .node_with(|c| {
            use_tls(c, &mount.cert(), &mount.key());
            c.mqtt.wss.listen = "127.0.0.1:0".into();
            c.mqtt.tls.reload_interval = Duration::from_millis(100);
        })
        .await;
    let app1 = env.app("app1");
    let (user, key) = (node.username(&app1), node.key(&app1, Rights::DEFAULT).await);
    let (tls, wss) = (node.addr(Kind::Tls), node.addr(Kind::Wss));
    let roots = vec![ca_a.pem(), ca_b.pem()];
    let loaded = r#"lorabroker_tls_reloads_total{result="loaded"}"#;
    assert_eq!(metric(&node, loaded), 0.0);

    // One old connection on each listener, on certificate A.
    let stream = tls_connect(tls, &roots, None).await.unwrap();
    assert_eq!(peer_certificate(&stream), cert_a.der());
    let mut old_tls = Raw::over(stream);
    assert_eq!(old_tls.connect(&user, &key).await, 0);
    assert!(old_tls.subscribe("#").await);
    assert_eq!(
        presented(wss, &roots, b"http/1.1").await.unwrap().0,
        cert_a.der()
    );
    let mut old_wss = common::raw::Connector::Wss(wss, roots.clone()).open().await;
    assert_eq!(old_wss.connect(&user, &key).await, 0);
    assert!(old_wss.subscribe("#").await);

    mount.update(&cert_b.cert, &cert_b.key);
    for (listener, addr, alpn) in [("tls", tls, &b"mqtt"[..]), ("wss", wss, b"http/1.1")] {
        common::wait::eventually(
            &format!("a new {listener} client sees certificate B"),
            Duration::from_secs(5),
            || async {
                let (cert, selected) = presented(addr, &roots, alpn).await?;
                if cert != cert_b.der() {
                    return Err("still certificate A".to_owned());
                }
                // Each listener keeps its own ALPN after the swap.
                match selected.as_deref() {
                    Some(p) if p == alpn => Ok(()),
                    other => panic!("{listener} selected {other:?} after the rotation"),
                }
            },
        )
        .await;
    }
    // Several more reload intervals: a second watch would have counted by now as well.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(metric(&node, loaded), 1.0, "one rotation, counted once");
    let cert_file = mount.cert().display().to_string();
    let logged = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    let lines = logged
        .lines()
        .filter(|l| l.contains("TLS certificate reloaded") && l.contains(&cert_file))
        .count();
    assert_eq!(lines, 1, "one rotation, logged once:\n{logged}");

    // Both old connections, made with certificate A, still receive uplinks.
    node.upstream()
        .publish(&device(&env, "dev1"), Event::Up, r#"{"after":"B"}"#.into())
        .await
        .unwrap();
    assert_eq!(
        &old_tls.next_on("/devices/dev1/up").await.payload[..],
        br#"{"after":"B"}"#
    );
    let (_, payload) = old_wss.next_publish_on("/devices/dev1/up").await;
    assert_eq!(&payload[..], br#"{"after":"B"}"#);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_file_stops_the_start_naming_it() {
    let env = TestEnv::new(Backend::Embedded).await;
    let certs = certs();
    let garbage = certs.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let missing = certs.dir.path().join("missing-key.pem");
    let not_a_ca = certs.dir.path().join("empty-ca.pem");
    std::fs::write(&not_a_ca, "").unwrap();
    type Tweak<'a> = Box<dyn Fn(&mut Config) + 'a>;
    let cases: [(&str, Tweak, &Path); 4] = [
        (
            "mqtt.tls.cert_file",
            Box::new(|c| use_tls(c, &garbage, &certs.key_file)),
            &garbage,
        ),
        (
            "mqtt.tls.key_file",
            Box::new(|c| use_tls(c, &certs.cert_file, &missing)),
            &missing,
        ),
        // The CA's certificate with the server's key: they do not go together.
        (
            "mqtt.tls.key_file",
            Box::new(|c| use_tls(c, &certs.ca_file, &certs.key_file)),
            &certs.key_file,
        ),
        (
            "mqtt.tls.client_ca_file",
            Box::new(|c| {
                use_tls(c, &certs.cert_file, &certs.key_file);
                c.mqtt.tls.client_ca_file = not_a_ca.display().to_string();
            }),
            &not_a_ca,
        ),
    ];
    for (key, tweak, file) in cases {
        let mut config = env.config();
        tweak(&mut config);
        config.validate().expect("valid settings, bad files");
        let backends = Backends::embedded_for(&config);
        let error = match Node::start(App::new(config, backends)).await {
            Ok(node) => panic!("started with a bad {key}: {:?}", node.mqtt_listeners),
            Err(e) => e.to_string(),
        };
        assert!(error.starts_with(key), "{key}: {error}");
        assert!(
            error.contains(&file.display().to_string()),
            "{key}: {error}"
        );
    }
    // Without a certificate file, the configuration says which key is missing.
    let mut config = env.config();
    config.mqtt.tls.listen = "127.0.0.1:0".into();
    let problems = format!("{:?}", config.validate().unwrap_err());
    assert!(problems.contains("mqtt.tls.cert_file"), "{problems}");
    assert!(problems.contains("mqtt.tls.key_file"), "{problems}");
}
