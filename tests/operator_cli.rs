//! The operator's and the newcomer's view of the binary: what `lorabroker` prints and how
//! it exits when a port is taken, the configuration is wrong or a backend is away; how
//! fast it stops on SIGINT and SIGTERM; and its help texts.
//!
//! Every process runs in its own process group, killed as a whole when the test drops
//! it, on ports the test found free (or port 0), with `RUST_BACKTRACE=1` so that a
//! backtrace on an error would show.

mod common;

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use common::broker::TestClient;
use common::http;
use common::services::{unique, NatsService, RedisService};

/// How long a test waits for something that should happen.
const WAIT: Duration = Duration::from_secs(15);

/// A `lorabroker` process in its own process group, with its output collected.
struct Proc {
    child: Child,
    pid: i32,
    stdout: Lines,
    stderr: Lines,
}

/// Lines a process printed so far, filled by a background task.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(&self, reader: impl tokio::io::AsyncRead + Unpin + Send + 'static) {
        let lines = self.0.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.lock().push(line);
            }
        });
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().clone()
    }

    fn text(&self) -> String {
        self.all().join("\n")
    }

    /// Waits until a line contains `needle`; returns it.
    async fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self.all().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} within {WAIT:?}; got:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Proc {
    /// Starts `lorabroker args…` with `env`.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorabroker"));
        cmd.args(args)
            .envs(env.iter().copied())
            .env("RUST_BACKTRACE", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("lorabroker starts");
        let pid = child.id().expect("a running child") as i32;
        let (stdout, stderr) = (Lines::default(), Lines::default());
        stdout.collect(child.stdout.take().expect("piped stdout"));
        stderr.collect(child.stderr.take().expect("piped stderr"));
        Proc {
            child,
            pid,
            stdout,
            stderr,
        }
    }

    /// Sends `signal` to the process.
    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a PID this test spawned and still owns (not yet reaped).
        assert_eq!(unsafe { libc::kill(self.pid, signal) }, 0, "kill");
    }

    /// Waits for the process to exit, at most `limit`.
    async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!(
                "still running after {limit:?}; stderr:\n{}",
                self.stderr.text()
            ),
        }
    }

    /// Waits for the exit of a command that fails at start; returns its status and stderr.
    async fn failure(mut self) -> (ExitStatus, String) {
        let status = self.exit_within(WAIT).await;
        // The collectors read to EOF shortly after the exit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        (status, self.stderr.text())
    }

    /// The address printed on the banner line starting with `label` (`MQTT`, `HTTP`).
    async fn banner_addr(&self, label: &str) -> SocketAddr {
        let line = self.stdout.wait_for(&format!("  {label} ")).await;
        let addr = line
            .split_whitespace()
            .nth(1)
            .expect("an address after the label");
        addr.trim_start_matches("http://")
            .parse()
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The whole group, in case the binary ever starts helpers; ESRCH once it exited.
        // SAFETY: kill(2) on the process group this test created.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
    }
}

/// A port that is free now (bound to port 0, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Asserts what every startup error must look like: one `Error:` line, no backtrace,
/// no repeated cause, no colour codes.
fn assert_plain_error(stderr: &str) {
    assert_eq!(stderr.matches("Error:").count(), 1, "{stderr}");
    for noise in ["backtrace", "Caused by", "os error", "\u{1b}["] {
        assert!(!stderr.contains(noise), "{noise:?} in:\n{stderr}");
    }
}

#[tokio::test]
async fn a_busy_mqtt_port_says_which_flag_to_use_and_a_free_port() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr");
    let proc = Proc::start(
        &[
            "dev",
            "--mqtt-ws-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            &addr.to_string(),
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let (status, stderr) = proc.failure().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_plain_error(&stderr);
    let prefix = format!(
        "Error: {addr} is in use (another MQTT server such as Mosquitto?); run with --mqtt-listen 127.0.0.1:"
    );
    let line = stderr.trim();
    let suggested = line
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(" (free)"))
        .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"));
    let suggested: u16 = suggested.parse().expect("a port");
    assert!(suggested > addr.port(), "{line}");
    // The suggestion really was free: binding it works (unless something took it since).
    drop(busy);
}

#[tokio::test]
async fn busy_ports_of_both_listeners_are_reported_together() {
    let mqtt = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (m, h) = (mqtt.local_addr().unwrap(), http.local_addr().unwrap());
    let proc = Proc::start(
        &[
            "serve",
            "--mqtt-listen",
            &m.to_string(),
            "--http-listen",
            &h.to_string(),
        ],
        &[],
    );
    let (status, stderr) = proc.failure().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_plain_error(&stderr);
    assert!(stderr.contains(&format!("{m} is in use (another MQTT server such as Mosquitto?); run with --mqtt-listen 127.0.0.1:")), "{stderr}");
    assert!(
        stderr.contains(&format!("{h} is in use (another web server or lorabroker node?); run with --http-listen 127.0.0.1:")),
        "{stderr}"
    );
}

#[tokio::test]
async fn configuration_errors_are_listed_at_once_and_exit_64() {
    let proc = Proc::start(
        &[
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[
            ("LORABROKER_MQTT__MAX_PACKET_SIZE", "abc"),
            ("LORABROKER_MQTT__LISTN", "1"),
            ("LORABROKER_HTTP__BAR", "2"),
            ("LORABROKER_LOG__LEVEL", "verbose"),
        ],
    );
    let (status, stderr) = proc.failure().await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert_plain_error(&stderr);
    assert!(
        stderr.starts_with("Error: invalid configuration (4 problems):\n"),
        "{stderr}"
    );
    for line in [
        "  mqtt.max_packet_size = \"abc\": expected a number of bytes (LORABROKER_MQTT__MAX_PACKET_SIZE)",
        "  mqtt.listn: unknown key; did you mean mqtt.listen? (LORABROKER_MQTT__LISTN)",
        "  http.bar: unknown key; [http] has listen, admin_token, metrics_listen, metrics_token, header_read_timeout, max_body_bytes, max_connections (LORABROKER_HTTP__BAR)",
    ] {
        assert_eq!(stderr.lines().filter(|l| *l == line).count(), 1, "{line:?} once in:\n{stderr}");
    }
    let level = stderr
        .lines()
        .find(|l| l.starts_with("  log.level = \"verbose\": expected a level"))
        .unwrap_or_else(|| panic!("no log.level line in:\n{stderr}"));
    assert!(level.ends_with("(LORABROKER_LOG__LEVEL)"), "{level}");
    for noise in ["default.", "usize", "`"] {
        assert!(!stderr.contains(noise), "{noise:?} in:\n{stderr}");
    }
}

#[tokio::test]
async fn an_invalid_rust_log_stops_the_start() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorabroker"));
    let out = cmd
        .args([
            "dev",
            "--mqtt-ws-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "verbose")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("exits at once")
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.starts_with("Error: RUST_LOG = \"verbose\": expected a level"),
        "{stderr}"
    );
}

/// Starts `dev` on free ports with fast uplinks; returns it with its MQTT address, the
/// username and the API key of its banner.
async fn dev() -> (Proc, SocketAddr, String, String) {
    let proc = Proc::start(
        &[
            "dev",
            "--mqtt-ws-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--uplink-interval",
            "50ms",
        ],
        &[],
    );
    let mqtt = proc.banner_addr("MQTT").await;
    let username = proc.stdout.wait_for("  username ").await;
    let key = proc.stdout.wait_for("  API key ").await;
    let last = |l: String| l.split_whitespace().last().unwrap_or_default().to_owned();
    (proc, mqtt, last(username), last(key))
}

/// The dev banner names the console, and its demo key signs in there: it holds
/// RIGHT_APPLICATION_SETTINGS_API_KEYS next to the traffic rights, and reads its own keys.
#[tokio::test]
async fn dev_prints_the_console_and_its_key_signs_in() {
    let (proc, _mqtt, username, key) = dev().await;
    let line = proc.stdout.wait_for("  Console ").await;
    let url = line.split_whitespace().nth(1).expect("a URL").to_owned();
    let (addr, path) = url
        .trim_start_matches("http://")
        .split_once('/')
        .expect("http://host:port/path");
    let addr: SocketAddr = addr.parse().expect("an address");
    assert_eq!(path, "console");
    let (status, page) = http::get(addr, "/console").await;
    assert_eq!(status, 200, "{page}");
    let rights = proc.stdout.wait_for("rights: ").await;
    assert!(
        rights.contains("RIGHT_APPLICATION_SETTINGS_API_KEYS"),
        "{rights}"
    );
    let (status, whoami) = http::request(addr, "GET", "/api/v1/whoami", Some(&key), "").await;
    assert_eq!(status, 200, "{whoami}");
    let whoami: serde_json::Value = serde_json::from_str(&whoami).unwrap();
    assert_eq!(whoami["operator"], false, "{whoami}");
    assert_eq!(whoami["application"], username.as_str(), "{whoami}");
    let keys = format!("/api/v1/applications/{username}/keys");
    let (status, listed) = http::request(addr, "GET", &keys, Some(&key), "").await;
    assert_eq!(status, 200, "{listed}");
    let id = key.split('.').nth(1).unwrap();
    assert!(listed.contains(id), "{listed}");
}

#[tokio::test]
async fn dev_stops_within_a_second_of_ctrl_c_with_clients_connected() {
    let (mut proc, mqtt, username, key) = dev().await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = TestClient::connect(mqtt, &username, &key, &format!("c{i}"))
            .await
            .expect("connects");
        c.subscribe("#").await;
        clients.push(c);
    }
    // Traffic flows to the three while devices uplink every 50 ms.
    for c in &mut clients {
        c.next_publish().await;
    }
    let asked = Instant::now();
    proc.signal(libc::SIGINT);
    let status = proc.exit_within(Duration::from_secs(5)).await;
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}");
    // The drain grace period is 25 s; dev does not drain.
    assert!(took < Duration::from_secs(2), "dev took {took:?} to stop");
    for c in &mut clients {
        c.expect_closed().await;
    }
    let stderr = proc.stderr.text();
    // Log lines carry their own span only (the fleet's device spans used to leak into
    // whatever ran next on a worker thread), and no colour codes when not on a terminal.
    assert!(stderr.contains("conn{"), "{stderr}");
    assert!(!stderr.contains("device{"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
}

/// Starts `dev --tls` on free ports with `TMPDIR` set to `tmp`; returns it with its TLS
/// address, the CA file it printed, the username and the API key.
async fn dev_tls(tmp: &std::path::Path) -> (Proc, SocketAddr, std::path::PathBuf, String, String) {
    let proc = Proc::start(
        &[
            "dev",
            "--tls",
            "--mqtt-tls-listen",
            "127.0.0.1:0",
            "--mqtt-ws-listen",
            "",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[("TMPDIR", tmp.to_str().expect("a UTF-8 path"))],
    );
    let line = proc.stdout.wait_for("MQTT over TLS on ").await;
    let tls = line
        .strip_prefix("MQTT over TLS on ")
        .and_then(|rest| rest.split(',').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let ca = proc.stdout.wait_for("  CA ").await;
    let ca = std::path::PathBuf::from(ca.split_whitespace().last().expect("a path"));
    let username = proc.stdout.wait_for("  username ").await;
    let key = proc.stdout.wait_for("  API key ").await;
    let last = |l: String| l.split_whitespace().last().unwrap_or_default().to_owned();
    (proc, tls, ca, last(username), last(key))
}

/// A PID that no process has: one of a child that has exited and was reaped.
async fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().expect("true runs");
    let pid = child.id().expect("a pid");
    child.wait().await.expect("true exits");
    pid
}

#[tokio::test]
async fn dev_tls_removes_its_certificates_on_sigint_and_sigterm_and_stale_ones_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    // Left by a dev that was killed outright (SIGKILL), and one of a process that runs.
    let stale = tmp
        .path()
        .join(format!("lorabroker-dev-tls-{}-AbC123", dead_pid().await));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("ca.pem"), "old").unwrap();
    let running = tmp
        .path()
        .join(format!("lorabroker-dev-tls-{}-XyZ789", std::process::id()));
    std::fs::create_dir(&running).unwrap();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let (mut proc, tls, ca_file, username, key) = dev_tls(tmp.path()).await;
        let dir = ca_file
            .parent()
            .expect("the CA is in a directory")
            .to_owned();
        assert!(
            dir.starts_with(tmp.path()),
            "{} not under TMPDIR",
            dir.display()
        );
        assert!(!stale.exists(), "the stale directory of a dead PID stays");
        assert!(
            running.exists(),
            "the directory of a running PID was removed"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&dir).unwrap().permissions(),
        );
        assert_eq!(
            mode & 0o077,
            0,
            "the key's directory is open to others: {mode:o}"
        );
        // A client trusting the printed CA file gets in.
        let ca = std::fs::read_to_string(&ca_file).unwrap();
        let stream = common::tls::tls_connect(tls, &[ca], None)
            .await
            .expect("the printed CA verifies the server");
        let mut client = common::raw::Raw::over(stream);
        assert_eq!(client.connect(&username, &key).await, 0);

        proc.signal(signal);
        let status = proc.exit_within(WAIT).await;
        assert!(status.success(), "{status:?}: {}", proc.stderr.text());
        assert!(
            !dir.exists(),
            "{} left after signal {signal}",
            dir.display()
        );
    }
    assert!(running.exists());
}

#[tokio::test]
async fn serve_drains_on_sigterm_and_a_second_signal_ends_the_drain() {
    let token = unique("token");
    let mut proc = Proc::start(
        &[
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[
            ("LORABROKER_SHUTDOWN__GRACE_PERIOD", "120s"),
            ("LORABROKER_HTTP__ADMIN_TOKEN", &token),
            ("LORABROKER_TENANCY__MODE", "single"),
        ],
    );
    let (mqtt, web) = (
        proc.banner_addr("MQTT").await,
        proc.banner_addr("HTTP").await,
    );
    let (status, body) = http::request(
        web,
        "POST",
        "/api/v1/applications/app1/keys",
        Some(&token),
        "{}",
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let key = body["key"].as_str().expect("a key").to_owned();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(
            TestClient::connect(mqtt, "app1", &key, &format!("c{i}"))
                .await
                .expect("connects"),
        );
    }

    proc.signal(libc::SIGTERM);
    proc.stderr
        .wait_for("send SIGTERM or Ctrl-C again to stop at once")
        .await;
    let (status, body) = http::get(web, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    // Spread over 120 s, the drain closes one client now and the next ones 32 s apart.
    let first = {
        let closing = clients.iter_mut().map(|c| Box::pin(c.expect_closed()));
        futures::future::select_all(closing).await.1
    };
    clients.remove(first);
    assert!(
        proc.child.try_wait().expect("try_wait").is_none(),
        "exited during the drain"
    );

    let asked = Instant::now();
    proc.signal(libc::SIGTERM);
    let status = proc.exit_within(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    for c in &mut clients {
        c.expect_closed().await;
    }
    proc.stderr
        .wait_for("second signal: closing every remaining connection now")
        .await;
}

#[tokio::test]
async fn serve_without_redis_says_how_to_get_a_key() {
    let mut proc = Proc::start(
        &[
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let line = proc.stdout.wait_for("API keys").await;
    assert!(line.contains("LORABROKER_HTTP__ADMIN_TOKEN"), "{line}");
    proc.stdout.wait_for("lorabroker dev").await;
    proc.signal(libc::SIGTERM);
    assert!(proc.exit_within(WAIT).await.success());

    let mut proc = Proc::start(
        &[
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        &[("LORABROKER_HTTP__ADMIN_TOKEN", "t0k3n")],
    );
    let web = proc.banner_addr("HTTP").await;
    let curl = proc.stdout.wait_for("curl -X POST").await;
    assert!(
        curl.contains(&format!(
            "-d '{{}}' http://{web}/api/v1/applications/{{app}}@{{tenant}}/keys"
        )),
        "{curl}"
    );
    assert!(
        !proc.stdout.text().contains("t0k3n"),
        "the token is never printed"
    );
    proc.signal(libc::SIGTERM);
    assert!(proc.exit_within(WAIT).await.success());
}

#[tokio::test]
async fn unreachable_backends_are_logged_once_with_their_redacted_url() {
    let (nats_port, redis_port) = (free_port(), free_port());
    let nats = format!("nats://user:s3cret@127.0.0.1:{nats_port}");
    let redis = format!("redis://:s3cret@127.0.0.1:{redis_port}");
    let mut proc = Proc::start(
        &[
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--nats-url",
            &nats,
            "--redis-url",
            &redis,
        ],
        &[],
    );
    let nats_line = format!("cannot reach NATS at nats://***@127.0.0.1:{nats_port}");
    let redis_line = format!("cannot reach Redis at redis://***@127.0.0.1:{redis_port}");
    proc.stderr.wait_for(&nats_line).await;
    proc.stderr.wait_for(&redis_line).await;
    // NATS is retried about once a second and Redis probed every 2 s: over 4 s more,
    // neither is reported again (the first reminder is due after 10 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stderr = proc.stderr.text();
    assert_eq!(stderr.matches(&nats_line).count(), 1, "{stderr}");
    assert_eq!(stderr.matches(&redis_line).count(), 1, "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
    assert!(!stderr.contains("async_nats"), "{stderr}");
    proc.signal(libc::SIGTERM);
    assert!(proc.exit_within(WAIT).await.success());
}

#[tokio::test]
async fn keys_revoke_with_nats_down_says_what_happened_promptly() {
    let redis = RedisService::start().await;
    let nats = format!("nats://127.0.0.1:{}", free_port());
    let prefix = unique("lbtest");
    let env = [("LORABROKER_REDIS__KEY_PREFIX", prefix.as_str())];
    let unknown = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFG";
    let asked = Instant::now();
    let proc = Proc::start(
        &[
            "keys",
            "revoke",
            unknown,
            "--nats-url",
            &nats,
            "--redis-url",
            &redis.url,
        ],
        &env,
    );
    let (status, stderr) = proc.failure().await;
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(6), "{took:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!("waiting for NATS at {nats}…").as_str(),
            format!(
                "Error: API key {unknown} not found in the key store (nothing deleted), and the revocation signal could not be sent: NATS at {nats} is unreachable, so nodes that still cache it were not told"
            )
            .as_str(),
        ],
        "{stderr}"
    );

    // A real key: deleted, and said so, with what the missing signal means.
    let create = Proc::start(
        &["keys", "create", "--app", "app1", "--redis-url", &redis.url],
        &env,
    );
    let mut create = create;
    assert!(create.exit_within(WAIT).await.success());
    let key = create.stdout.wait_for("NNSXS.").await;
    let id = key.split('.').nth(1).expect("an ID").to_owned();
    let proc = Proc::start(
        &[
            "keys",
            "revoke",
            &key,
            "--nats-url",
            &nats,
            "--redis-url",
            &redis.url,
        ],
        &env,
    );
    let (status, stderr) = proc.failure().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "Error: deleted API key {id} from the key store, but the revocation signal could not be sent: NATS at {nats} is unreachable. Until the nodes hear of it, connections using the key stay open"
        )),
        "{stderr}"
    );
    assert!(
        !stderr.contains("NATS client") && !stderr.contains(" WARN "),
        "{stderr}"
    );

    // NATS up, key unknown: nothing deleted, but the nodes were told; said once, quietly.
    let nats = NatsService::start().await;
    let proc = Proc::start(
        &[
            "keys",
            "revoke",
            unknown,
            "--nats-url",
            &nats.url,
            "--redis-url",
            &redis.url,
        ],
        &env,
    );
    let (status, stderr) = proc.failure().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "Error: API key {unknown} not found in the key store (nothing deleted); every node was told to drop it in case one still caches it"
        ),
    );
}

#[tokio::test]
async fn keys_create_prints_the_username_the_nodes_accept() {
    let redis = RedisService::start().await;
    let prefix = unique("lbtest");
    let run = |args: Vec<String>, env: Vec<(&'static str, String)>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut p = Proc::start(&args, &env);
        assert!(p.exit_within(WAIT).await.success(), "{}", p.stderr.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
        p.stderr.text()
    };
    let base = |extra: &[&str]| {
        let mut a: Vec<String> = ["keys", "create", "--app", "app1", "--redis-url", &redis.url]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let env = vec![("LORABROKER_REDIS__KEY_PREFIX", prefix.clone())];
    let mut single = env.clone();
    single.push(("LORABROKER_TENANCY__MODE", "single".into()));

    let out = run(base(&[]), single.clone()).await;
    assert!(out.contains("(username \"app1\") with"), "{out}");
    let out = run(base(&["--tenant", "tenant1"]), env.clone()).await;
    assert!(out.contains("(username \"app1@tenant1\") with"), "{out}");
    let out = run(base(&[]), env.clone()).await;
    assert!(
        out.contains(
            "(username \"app1\" on single-tenant nodes, \"app1@default\" on multi-tenant ones)"
        ),
        "{out}"
    );
    assert!(out.contains("RIGHT_APPLICATION_TRAFFIC_READ"), "{out}");
}

#[tokio::test]
async fn help_says_where_the_settings_without_flags_are() {
    let help = |args: &'static [&'static str]| async move {
        let out = Command::new(env!("CARGO_BIN_EXE_lorabroker"))
            .args(args)
            .output()
            .await
            .expect("runs");
        assert!(out.status.success());
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let create = help(&["keys", "create", "--help"]).await;
    assert!(!create.contains("[default: ]"), "{create}");
    assert!(!create.contains("[default: \"\"]"), "{create}");
    let serve = help(&["serve", "--help"]).await;
    for var in [
        "LORABROKER_TENANCY__MODE",
        "LORABROKER_HTTP__ADMIN_TOKEN",
        "config/lorabroker.toml",
    ] {
        assert!(serve.contains(var), "{var} in:\n{serve}");
    }
}

#[tokio::test]
async fn unknown_http_paths_are_plain_404s_with_or_without_a_token() {
    use common::broker::{Backend, TestEnv};
    let env = TestEnv::new(Backend::Embedded).await;
    for admin_token in ["", "t0k3n"] {
        let node = env
            .node_with(|c| c.http.admin_token = admin_token.into())
            .await;
        for path in ["/metrics/", "/nope", "/api/v1/nope", "/healthz/x"] {
            for token in [None, Some("t0k3n"), Some("wrong")] {
                let (status, body) = http::request(node.http_addr, "GET", path, token, "").await;
                let context = format!("GET {path} with {token:?}, admin token {admin_token:?}");
                if path.starts_with("/api/v1/") {
                    // Under /api/v1 every error is the API's JSON error.
                    let error: serde_json::Value = serde_json::from_str(&body).expect(&context);
                    assert_eq!(
                        (status, &error["code"]),
                        (404, &"not_found".into()),
                        "{context}"
                    );
                } else {
                    assert_eq!(
                        (status, body.as_str()),
                        (404, "404 not found\n"),
                        "{context}"
                    );
                }
            }
        }
        // The admin routes themselves still say why they refuse.
        let (status, body) = http::get(node.http_addr, "/api/v1/applications/app1/keys").await;
        let expected = if admin_token.is_empty() { 404 } else { 401 };
        assert_eq!(status, expected, "{body}");
        assert!(body.contains("admin"), "{body}");
        node.shutdown().await;
    }
}

#[test]
fn the_grafana_dashboard_queries_only_metrics_a_node_exports() {
    use lorabroker::metrics::{AppLabels, BackendLabels, DownlinkLabels, Metrics, OutcomeLabels};
    // Families are rendered once they have a label set: give each one.
    let m = Metrics::default();
    let app = AppLabels {
        tenant: "t".into(),
        application: "a".into(),
    };
    m.connects
        .get_or_create(&OutcomeLabels { outcome: "x" })
        .inc();
    m.disconnects
        .get_or_create(&OutcomeLabels { outcome: "x" })
        .inc();
    m.dropped.get_or_create(&app).inc();
    m.bus_slow_consumer_dropped.get_or_create(&app).inc();
    m.downlinks
        .get_or_create(&DownlinkLabels {
            tenant: "t".into(),
            application: "a".into(),
            outcome: "queued",
        })
        .inc();
    m.backend_up
        .get_or_create(&BackendLabels { backend: "bus" })
        .set(1);
    let mut exported = std::collections::BTreeSet::new();
    for line in m.render().lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            exported.insert(format!("{name}{s}"));
        }
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/lorabroker/dashboards/lorabroker.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard file"))
            .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            queries.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if v["type"] == "query" {
            queries.push(v["query"]["query"].as_str().expect("query").to_owned());
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");
    for q in &queries {
        let names: Vec<&str> = q
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("lorabroker_"))
            .collect();
        assert!(!names.is_empty(), "{q}");
        for n in names {
            assert!(
                exported.contains(n),
                "{n} (in {q}) is not on /metrics: {exported:?}"
            );
        }
    }
}

/// The section of README.md from the heading `start` to the next `## ` heading.
fn readme_section(start: &str) -> String {
    let readme = include_str!("../README.md");
    let from = readme
        .find(start)
        .unwrap_or_else(|| panic!("README.md has no {start:?}"));
    let rest = &readme[from + start.len()..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_owned()
}

/// Every `127.0.0.1:PORT` and `-p PORT` in `text`.
fn ports(text: &str) -> std::collections::BTreeSet<u16> {
    let mut found = std::collections::BTreeSet::new();
    for (i, _) in text.match_indices("127.0.0.1:") {
        let digits: String = text[i + 10..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        found.extend(digits.parse::<u16>().ok());
    }
    for (i, _) in text.match_indices("-p ") {
        let digits: String = text[i + 3..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        found.extend(digits.parse::<u16>().ok());
    }
    found
}

#[test]
fn the_readme_says_what_to_do_about_a_busy_port_before_the_command() {
    let section = readme_section("## The two commands");
    let hint = section
        .find("--mqtt-listen")
        .expect("the two commands say how to change the MQTT port");
    let command = section
        .find("cargo run --release -- dev")
        .expect("the dev command");
    assert!(
        hint < command,
        "the busy-port hint must come before the command"
    );
    // Ports suggested for dev must not be ones the cluster walk-through binds.
    let dev = ports(&section);
    let cluster = ports(&readme_section("## Running a cluster locally"));
    assert!(
        !dev.is_empty() && !cluster.is_empty(),
        "{dev:?} {cluster:?}"
    );
    let shared: Vec<_> = dev.intersection(&cluster).collect();
    assert!(
        shared.is_empty(),
        "dev and the cluster section share {shared:?}"
    );
    let readme = include_str!("../README.md");
    assert!(!readme.contains("changing the host name"), "no TLS yet");
}
