//! Backing services for tests: Redis and NATS (with JetStream), found or started in this
//! order (the team's fixture rule):
//!
//! 1. the URLs in `LORABROKER_TEST_REDIS_URL` / `LORABROKER_TEST_NATS_URL` (a shared server;
//!    tests keep apart with [`unique`] prefixes, tenants and subjects);
//! 2. else `redis-server` / `nats-server` from `PATH`, one process per test on a free
//!    loopback port in a temporary directory, killed when the service is dropped;
//! 3. else a testcontainers container (`redis:7-alpine`, `nats:2-alpine -js`) when a Docker
//!    engine answers;
//! 4. else the test fails, saying how to provide them. Nothing is ever skipped silently.
//!
//! Services this fixture started itself can be stopped and restarted on the same port (same
//! URL), for the tests of backend failures; a service given by URL cannot.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Environment variable with the URL of a Redis to use instead of starting one.
pub const REDIS_URL_ENV: &str = "LORABROKER_TEST_REDIS_URL";
/// Environment variable with the URL of a NATS (JetStream enabled) to use instead.
pub const NATS_URL_ENV: &str = "LORABROKER_TEST_NATS_URL";

/// How often readiness is probed while a server starts.
const POLL: Duration = Duration::from_millis(10);
/// How long a server process may take to accept connections.
const PROCESS_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a container may take (an image pull included).
const CONTAINER_READY_TIMEOUT: Duration = Duration::from_secs(180);

const HOW_TO_PROVIDE: &str = "\
tests need Redis and NATS. Provide them in one of these ways:
  - install the servers so that `redis-server` and `nats-server` are on PATH
    (e.g. `apt-get install -y redis-server nats-server`); each test then starts its own;
  - or set LORABROKER_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379) and
    LORABROKER_TEST_NATS_URL (e.g. nats://127.0.0.1:4222, started with -js);
  - or start a Docker engine (testcontainers runs redis:7-alpine and nats:2-alpine).";

/// A unique name that is a valid application, device or tenant ID (lowercase letters,
/// digits and single dashes, at most 36 characters), starting with `prefix` (sanitised and
/// cut to 16 characters): for per-test Redis key prefixes, tenants and subjects, so that
/// tests run in parallel, even on a shared server, without seeing each other.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut head = String::new();
    for c in prefix.chars().flat_map(char::to_lowercase) {
        if head.len() == 16 {
            break;
        }
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            head.push(c);
        } else if !head.is_empty() && !head.ends_with('-') {
            head.push('-');
        }
    }
    if !head.is_empty() && !head.ends_with('-') {
        head.push('-');
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Counter for uniqueness within this process, randomness across processes.
    let name = format!("{head}{}{:012x}", radix36(n), rand::random::<u64>() >> 16);
    debug_assert!(lorabroker::topic::Id::parse(&name).is_ok(), "{name}");
    name
}

fn radix36(mut n: u64) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

/// A Redis for one test.
pub struct RedisService {
    /// `redis://host:port`.
    pub url: String,
    server: Server,
}

impl RedisService {
    /// Finds or starts a Redis (see the module docs); panics with instructions if none.
    pub async fn start() -> RedisService {
        let server = Server::start(Kind::Redis).await;
        RedisService {
            url: server.url(),
            server,
        }
    }

    /// Stops the server (kills the process, or stops the container). Panics for a server
    /// given by URL.
    pub async fn stop(&mut self) {
        self.server.stop().await;
    }

    /// Starts the stopped server again on the same port and waits until it answers; data
    /// written before [`RedisService::stop`] is still there (append-only file). Panics for
    /// a server given by URL.
    pub async fn restart(&mut self) {
        self.server.restart().await;
    }

    /// Runs one command on a connection of its own, behind the broker's back (to read
    /// what the broker wrote, e.g. `LRANGE {prefix}:down:{tenant}:{app}:{dev} 0 -1`).
    pub async fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let client = redis::Client::open(self.url.as_str()).expect("a valid Redis URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to Redis at {}: {e}", self.url));
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("Redis {args:?}: {e}"))
    }
}

/// A NATS server (JetStream enabled) for one test.
pub struct NatsService {
    /// `nats://host:port`.
    pub url: String,
    server: Server,
}

impl NatsService {
    /// Finds or starts a NATS server (see the module docs); panics with instructions if none.
    pub async fn start() -> NatsService {
        let server = Server::start(Kind::Nats).await;
        NatsService {
            url: server.url(),
            server,
        }
    }

    /// Stops the server. Panics for a server given by URL.
    pub async fn stop(&mut self) {
        self.server.stop().await;
    }

    /// Starts the stopped server again on the same port and waits until it answers.
    /// Panics for a server given by URL.
    pub async fn restart(&mut self) {
        self.server.restart().await;
    }

    /// Whether the server has a subscriber for `subject` (of any client), asked over a raw
    /// connection of its own: a publish with a reply subject comes back as a 503 "no
    /// responders" status when nobody listens. The probe message itself is delivered to
    /// the subscribers, so pick a subject they ignore.
    pub async fn has_interest(&self, subject: &str) -> bool {
        let addr = self.url.trim_start_matches("nats://");
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to NATS at {}: {e}", self.url));
        let (read, mut write) = stream.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let info = lines.next_line().await.unwrap().unwrap_or_default();
        assert!(info.starts_with("INFO "), "{info}");
        let probe = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"headers\":true,\"no_responders\":true}}\r\n\
             SUB probe.inbox 1\r\nPUB {subject} probe.inbox 0\r\n\r\nPING\r\n"
        );
        write.write_all(probe.as_bytes()).await.unwrap();
        loop {
            let line = lines.next_line().await.unwrap().unwrap_or_default();
            if line.starts_with("HMSG probe.inbox") {
                return false;
            }
            if line == "PONG" {
                return true;
            }
            assert!(!line.starts_with("-ERR"), "{line}");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Redis,
    Nats,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Redis => "Redis",
            Kind::Nats => "NATS",
        }
    }

    fn env(self) -> &'static str {
        match self {
            Kind::Redis => REDIS_URL_ENV,
            Kind::Nats => NATS_URL_ENV,
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Nats => "nats",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Kind::Redis => "redis-server",
            Kind::Nats => "nats-server",
        }
    }

    fn args(self, port: u16, dir: &Path) -> Vec<String> {
        let port = port.to_string();
        let dir = dir.display().to_string();
        let args: Vec<&str> = match self {
            // The append-only file (written before each reply) keeps data across a kill,
            // so a restart test sees what was there before.
            Kind::Redis => vec![
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--dir",
                &dir,
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "no",
                "--daemonize",
                "no",
            ],
            Kind::Nats => vec!["-js", "-a", "127.0.0.1", "-p", &port, "-sd", &dir],
        };
        args.into_iter().map(str::to_owned).collect()
    }

    fn container_port(self) -> u16 {
        match self {
            Kind::Redis => 6379,
            Kind::Nats => 4222,
        }
    }

    fn image(self) -> GenericImage {
        match self {
            Kind::Redis => GenericImage::new("redis", "7-alpine")
                .with_wait_for(WaitFor::message_on_stdout("Ready to accept connections")),
            Kind::Nats => GenericImage::new("nats", "2-alpine")
                .with_wait_for(WaitFor::message_on_stderr("Server is ready")),
        }
    }

    /// Whether whatever listens on `host:port` is this kind of server and ready: Redis
    /// answers PING with PONG (not LOADING), NATS greets with INFO.
    async fn answers(self, host: &str, port: u16) -> bool {
        let probe = async {
            let mut stream = TcpStream::connect((host, port)).await.ok()?;
            let expected: &[u8] = match self {
                Kind::Redis => {
                    stream.write_all(b"PING\r\n").await.ok()?;
                    b"+PONG"
                }
                Kind::Nats => b"INFO ",
            };
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while got.len() < expected.len() {
                let n = stream.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                got.extend_from_slice(&buf[..n]);
            }
            got.starts_with(expected).then_some(())
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), probe).await,
            Ok(Some(()))
        )
    }
}

/// Where a service comes from.
enum Source {
    /// Given by the environment; not ours to stop.
    External(String),
    /// A child process on a port we chose.
    Process(Box<ServerProcess>),
    /// A container with a fixed host port.
    Container {
        container: Box<ContainerAsync<GenericImage>>,
        host: String,
        port: u16,
    },
}

struct Server {
    kind: Kind,
    source: Source,
}

impl Server {
    async fn start(kind: Kind) -> Server {
        if let Some(url) = std::env::var(kind.env()).ok().filter(|u| !u.is_empty()) {
            return Server {
                kind,
                source: Source::External(url),
            };
        }
        if let Some(binary) = find_on_path(kind.binary()) {
            return Server {
                kind,
                source: Source::Process(Box::new(ServerProcess::start(kind, binary).await)),
            };
        }
        if docker_reachable().await {
            return Server {
                kind,
                source: start_container(kind).await,
            };
        }
        panic!(
            "no {} for the test: {} is not set, `{}` is not on PATH and no Docker engine \
             answers.\n{HOW_TO_PROVIDE}",
            kind.name(),
            kind.env(),
            kind.binary()
        );
    }

    fn url(&self) -> String {
        match &self.source {
            Source::External(url) => url.clone(),
            Source::Process(p) => format!("{}://127.0.0.1:{}", self.kind.scheme(), p.port),
            Source::Container { host, port, .. } => {
                format!("{}://{host}:{port}", self.kind.scheme())
            }
        }
    }

    fn not_restartable(&self) -> ! {
        panic!(
            "this test stops and restarts {name}, which only works for a server the fixture \
             started itself; {env} points to a shared one. Unset {env} (with `{bin}` on PATH, \
             or a Docker engine, the test starts its own).",
            name = self.kind.name(),
            env = self.kind.env(),
            bin = self.kind.binary()
        )
    }

    async fn stop(&mut self) {
        match &mut self.source {
            Source::External(_) => self.not_restartable(),
            Source::Process(p) => p.stop().await,
            Source::Container { container, .. } => {
                if let Err(e) = container.stop().await {
                    panic!("cannot stop the {} container: {e}", self.kind.name());
                }
            }
        }
    }

    async fn restart(&mut self) {
        let kind = self.kind;
        match &mut self.source {
            Source::External(_) => self.not_restartable(),
            Source::Process(p) => p.restart().await,
            Source::Container {
                container,
                host,
                port,
            } => {
                if let Err(e) = container.start().await {
                    panic!("cannot restart the {} container: {e}", kind.name());
                }
                wait_until_answers(kind, host, *port, CONTAINER_READY_TIMEOUT).await;
            }
        }
    }
}

/// A server process of ours, and what it takes to start it again.
struct ServerProcess {
    kind: Kind,
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl ServerProcess {
    async fn start(kind: Kind, binary: PathBuf) -> ServerProcess {
        let dir = match tempfile::Builder::new()
            .prefix(&format!("lorabroker-{}-", kind.binary()))
            .tempdir()
        {
            Ok(dir) => dir,
            Err(e) => panic!(
                "cannot create a temporary directory for {}: {e}",
                kind.name()
            ),
        };
        let mut process = ServerProcess {
            kind,
            binary,
            dir,
            port: 0,
            child: None,
        };
        // A port found free can be taken before the server binds it; then try another.
        for attempt in 1..=5 {
            process.port = free_port();
            match process.spawn_and_wait().await {
                Ok(()) => return process,
                Err(why) if attempt < 5 => {
                    eprintln!("{} did not start ({why}); retrying", kind.binary());
                }
                Err(why) => panic!("{} did not start: {why}", kind.binary()),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// Starts the process on `self.port` and waits until it answers; on failure the error
    /// carries the end of its log.
    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open {}: {e}", self.log_path().display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", self.log_path().display()))?;
        let mut child = Command::new(&self.binary)
            .args(self.kind.args(self.port, self.dir.path()))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        let deadline = Instant::now() + PROCESS_READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "exited with {status} on port {}; log:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            if self.kind.answers("127.0.0.1", self.port).await {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(format!(
                    "not answering on port {} after {PROCESS_READY_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn stop(&mut self) {
        match self.child.take() {
            Some(mut child) => {
                if let Err(e) = child.kill().await {
                    panic!("cannot kill {}: {e}", self.kind.binary());
                }
            }
            None => panic!("{} is already stopped", self.kind.name()),
        }
    }

    async fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "restart() needs a stopped {}; call stop() first",
            self.kind.name()
        );
        if let Err(why) = self.spawn_and_wait().await {
            panic!(
                "{} did not restart on port {}: {why}",
                self.kind.binary(),
                self.port
            );
        }
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(e) => panic!("cannot find a free loopback port: {e}"),
    }
}

/// Finds `binary` on PATH, then in the sbin directories Debian's packages install servers
/// into (`nats-server` lands in /usr/sbin, which a normal user's PATH often lacks).
pub fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// Whether a Docker engine is likely to answer: `DOCKER_HOST` is set, or the default socket
/// accepts a connection.
async fn docker_reachable() -> bool {
    if std::env::var_os("DOCKER_HOST").is_some_and(|h| !h.is_empty()) {
        return true;
    }
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::UnixStream::connect("/var/run/docker.sock"),
        )
        .await,
        Ok(Ok(_))
    )
}

async fn start_container(kind: Kind) -> Source {
    // A fixed host port, so that a restarted container keeps its URL.
    let port = free_port();
    let mut request = kind
        .image()
        .with_mapped_port(port, kind.container_port().tcp());
    if kind == Kind::Nats {
        request = request.with_cmd(["-js"]);
    }
    let container = match request.start().await {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot start a {} container: {e}\n{HOW_TO_PROVIDE}",
            kind.name()
        ),
    };
    let host = match container.get_host().await {
        Ok(h) => h.to_string(),
        Err(e) => panic!("cannot find the {} container's host: {e}", kind.name()),
    };
    wait_until_answers(kind, &host, port, CONTAINER_READY_TIMEOUT).await;
    Source::Container {
        container: Box::new(container),
        host,
        port,
    }
}

async fn wait_until_answers(kind: Kind, host: &str, port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !kind.answers(host, port).await {
        if Instant::now() > deadline {
            panic!(
                "{} at {host}:{port} does not answer after {limit:?}",
                kind.name()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
