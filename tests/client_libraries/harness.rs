//! The world a client-library test runs in (nodes, keys, the simulated upstream), what a
//! client is told about it ([`Target`]), the server's counters, and how the Python and Node
//! programs under `tests/clients/` are found and run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use lorabroker::auth::Rights;
use lorabroker::config::Config;
use lorabroker::topic::{AppRef, DeviceRef, Id};
use lorabroker::upstream::{run_fleet, FleetConfig};

use crate::common::broker::{Backend, TestClient, TestEnv, TestNode};
use crate::common::http;
use crate::common::services::unique;
use crate::common::shell::Spawned;

/// How long one client program may run before the test gives up on it (each program also
/// stops itself after 60 s, and waits at most `LB_TIMEOUT` for each expected thing).
const PROGRAM_LIMIT: Duration = Duration::from_secs(90);
/// What each program may wait for one expected thing (an uplink comes every 200 ms).
const PROGRAM_WAIT_SECS: &str = "10";
/// Time between two uplinks of a simulated device.
const UPLINK_INTERVAL: Duration = Duration::from_millis(200);

/// The device the simulated upstream runs (joins, uplinks, takes downlinks).
pub const FLEET_DEVICE: &str = "dev1";

/// How to install what the client programs need, for the failure messages.
const HOW_TO_INSTALL: &str = "\
the client-library tests need Python 3 with venv, Node.js with npm, and the pinned client
libraries. The tests run the following themselves when target/pyenv or
tests/clients/node/node_modules is missing; to install (or reinstall) them by hand:

    tests/clients/setup

(from the repository root: it creates the virtual environment target/pyenv with
tests/clients/python/requirements.txt and runs `npm ci` in tests/clients/node; on
Debian/Ubuntu first `apt-get install -y python3-venv nodejs npm` if they are missing).
LORABROKER_TEST_PYTHON and LORABROKER_TEST_NODE name other interpreters.";

/// One test's nodes, application, keys and upstream.
pub struct World {
    /// Services, key prefix and tenant of the test.
    pub env: TestEnv,
    /// The nodes (all on the same backends).
    pub nodes: Vec<TestNode>,
    /// The application every client belongs to.
    pub app: AppRef,
    /// A key with `TRAFFIC_READ` and `TRAFFIC_DOWN_WRITE`.
    pub key: String,
    /// A key with `TRAFFIC_READ` only.
    pub read_only: String,
    fleet: Option<CancellationToken>,
}

impl World {
    /// `nodes` nodes on `backend`; with `fleet`, the simulated upstream runs
    /// [`FLEET_DEVICE`] (an uplink every 200 ms, downlinks taken after each).
    pub async fn new(backend: Backend, nodes: usize, fleet: bool) -> World {
        Self::new_with(backend, nodes, fleet, |_| {}).await
    }

    /// As [`World::new`], with every node's configuration adjusted by `tweak`.
    pub async fn new_with(
        backend: Backend,
        nodes: usize,
        fleet: bool,
        tweak: impl Fn(&mut Config),
    ) -> World {
        let env = TestEnv::new(backend).await;
        let mut started = Vec::new();
        for _ in 0..nodes {
            started.push(env.node_with(&tweak).await);
        }
        let app = env.app("app1");
        let key = started[0].key(&app, Rights::DEFAULT).await;
        let read_only = started[0].key(&app, Rights::TRAFFIC_READ).await;
        let fleet = fleet.then(|| {
            let stop = CancellationToken::new();
            let config = FleetConfig {
                app: app.clone(),
                devices: 1,
                uplink_interval: UPLINK_INTERVAL,
            };
            tokio::spawn(run_fleet(started[0].upstream(), config, stop.clone()));
            stop
        });
        World {
            env,
            nodes: started,
            app,
            key,
            read_only,
            fleet,
        }
    }

    /// The application as written in usernames and topics (`app1@{tenant}`).
    pub fn uid(&self) -> String {
        self.nodes[0].username(&self.app)
    }

    /// A device of the application.
    pub fn device(&self, id: &str) -> DeviceRef {
        DeviceRef::new(self.app.clone(), Id::parse(id).expect("valid device ID"))
    }

    /// What a client needs to know, connecting to the first node and publishing through
    /// the last one, about `device`.
    pub fn target(&self, device: &str) -> Target {
        Target {
            mqtt: self.nodes[0].mqtt_addr,
            publish_via: self.nodes[self.nodes.len() - 1].mqtt_addr,
            username: self.uid(),
            key: self.key.clone(),
            app: self.uid(),
            device: device.to_owned(),
            correlation_id: unique("cid"),
            will: None,
            forbidden: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// The downlinks queued for `device`, oldest first.
    pub async fn queue(&self, device: &str) -> Vec<Value> {
        self.nodes[0]
            .app
            .queue
            .list(&self.device(device))
            .await
            .expect("the queue answers")
            .iter()
            .map(|item| serde_json::from_str(item).expect("queued items are JSON"))
            .collect()
    }

    /// A rumqttc client of the application subscribed to `#` on the first node.
    pub async fn observer(&self) -> TestClient {
        let mut observer = self.nodes[0].client(&self.app, &self.key).await;
        assert_eq!(
            observer.subscribe("#").await,
            rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce)
        );
        observer
    }

    /// The `/metrics` text of node `i`.
    pub async fn metrics(&self, i: usize) -> Metrics {
        let (status, text) = http::get(self.nodes[i].http_addr, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        Metrics(text)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(stop) = &self.fleet {
            stop.cancel();
        }
    }
}

/// A node's Prometheus exposition.
pub struct Metrics(pub String);

impl Metrics {
    /// The sum of the samples of `name` whose labels include every `labels` pair.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (series_name, series_labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let matches = series_name == name
                    && labels.iter().all(|(k, v)| {
                        series_labels
                            .split(',')
                            .any(|pair| pair == format!("{k}=\"{v}\""))
                    });
                matches.then(|| value.parse::<f64>().ok()).flatten()
            })
            .sum()
    }

    /// CONNECTs this node accepted.
    pub fn accepted_connects(&self) -> f64 {
        self.sum("lorabroker_connects_total", &[("outcome", "accepted")])
    }

    /// PUBLISH packets to topics the client may not write (acknowledged and dropped).
    pub fn refused_publishes(&self) -> f64 {
        self.sum(REFUSED_PUBLISHES, &[])
    }
}

/// The counter of refused publishes (DESIGN §4: acknowledged, dropped, counted).
pub const REFUSED_PUBLISHES: &str = "lorabroker_publishes_refused_total";

/// What a client program is told (as `LB_*` environment variables).
#[derive(Clone, Debug)]
pub struct Target {
    /// The node to connect to (`LB_HOST`, `LB_PORT`).
    pub mqtt: SocketAddr,
    /// The node to push downlinks through (`LB_PUB_PORT`).
    pub publish_via: SocketAddr,
    /// MQTT username (`LB_USERNAME`).
    pub username: String,
    /// API key (`LB_KEY`).
    pub key: String,
    /// The application as written in topics (`LB_APP`).
    pub app: String,
    /// The device of the scenario (`LB_DEVICE`).
    pub device: String,
    /// The correlation ID to send and look for (`LB_CORRELATION_ID`).
    pub correlation_id: String,
    /// The will's topic and payload (`LB_WILL_TOPIC`, `LB_WILL_PAYLOAD`).
    pub will: Option<(String, String)>,
    /// Topics the key may not write (`LB_FORBIDDEN_TOPICS`).
    pub forbidden: Vec<String>,
    /// The variables of one scenario only (`LB_CLIENT_ID`, `LB_COUNT`).
    pub extra: Vec<(&'static str, String)>,
}

impl Target {
    /// The `LB_*` variables of this target.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("LB_HOST", self.mqtt.ip().to_string()),
            ("LB_PORT", self.mqtt.port().to_string()),
            ("LB_PUB_PORT", self.publish_via.port().to_string()),
            ("LB_USERNAME", self.username.clone()),
            ("LB_KEY", self.key.clone()),
            ("LB_APP", self.app.clone()),
            ("LB_DEVICE", self.device.clone()),
            ("LB_CORRELATION_ID", self.correlation_id.clone()),
            ("LB_FORBIDDEN_TOPICS", self.forbidden.join(",")),
            ("LB_TIMEOUT", PROGRAM_WAIT_SECS.to_owned()),
        ];
        if let Some((topic, payload)) = &self.will {
            vars.push(("LB_WILL_TOPIC", topic.clone()));
            vars.push(("LB_WILL_PAYLOAD", payload.clone()));
        }
        vars.extend(self.extra.iter().cloned());
        vars
    }
}

/// A downlink push body with one confirmed item carrying `correlation_id`.
pub fn downlink(correlation_id: &str) -> String {
    serde_json::json!({"downlinks": [{
        "f_port": 15,
        "frm_payload": "vu8=",
        "priority": "NORMAL",
        "confirmed": true,
        "correlation_ids": [correlation_id],
    }]})
    .to_string()
}

/// Whether a queued downlink carries `correlation_id`.
pub fn carries(item: &Value, correlation_id: &str) -> bool {
    item["correlation_ids"]
        .as_array()
        .is_some_and(|ids| ids.iter().any(|id| id == correlation_id))
}

/// A client program of `tests/clients/`.
#[derive(Clone, Copy, Debug)]
pub enum Program {
    /// `python/paho_client.py` with paho's callback API 1 or 2.
    Paho(u8),
    /// `node/mqttjs_client.mjs`.
    MqttJs,
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Runs `tests/clients/setup` once per test run when the pinned libraries are not installed
/// where the default interpreters look (so that a plain `cargo test` needs no step of its
/// own); interpreters named by `LORABROKER_TEST_PYTHON`/`LORABROKER_TEST_NODE` are the
/// caller's business and are not installed into.
fn install_if_missing() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python_missing = std::env::var_os("LORABROKER_TEST_PYTHON").is_none()
            && !root.join("target/pyenv/bin/python").exists();
        let node_missing = std::env::var_os("LORABROKER_TEST_NODE").is_none()
            && !clients_dir().join("node/node_modules/mqtt").exists();
        if !(python_missing || node_missing) {
            return;
        }
        let out = std::process::Command::new(clients_dir().join("setup"))
            .current_dir(root)
            .output();
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "tests/clients/setup failed:\n{}{}\n{HOW_TO_INSTALL}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!("cannot run tests/clients/setup: {e}.\n{HOW_TO_INSTALL}"),
        }
    });
}

/// The virtual environment's Python, checked once to have paho-mqtt 2.x.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        install_if_missing();
        let python = std::env::var_os("LORABROKER_TEST_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv/bin/python")
            });
        let probe = std::process::Command::new(&python)
            .args(["-c", "import paho.mqtt; print(paho.mqtt.__version__)"])
            .output();
        match probe {
            Ok(out) if out.status.success() && out.stdout.starts_with(b"2.") => python,
            Ok(out) => panic!(
                "{} has no paho-mqtt 2.x ({}{}).\n{HOW_TO_INSTALL}",
                python.display(),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!("cannot run {}: {e}.\n{HOW_TO_INSTALL}", python.display()),
        }
    })
}

/// Node.js, checked once to run and to find MQTT.js 5 in `tests/clients/node`.
fn node() -> &'static Path {
    static NODE: OnceLock<PathBuf> = OnceLock::new();
    NODE.get_or_init(|| {
        install_if_missing();
        let node = std::env::var_os("LORABROKER_TEST_NODE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("node"));
        let probe = std::process::Command::new(&node)
            .current_dir(clients_dir().join("node"))
            .args(["-e", "console.log(require('mqtt/package.json').version)"])
            .output();
        match probe {
            Ok(out) if out.status.success() && out.stdout.starts_with(b"5.") => node,
            Ok(out) => panic!(
                "MQTT.js 5 is not installed in tests/clients/node ({}{}).\n{HOW_TO_INSTALL}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!("cannot run {}: {e}.\n{HOW_TO_INSTALL}", node.display()),
        }
    })
}

impl Program {
    /// Runs `scenario` against `target`; panics with the program's output unless it exits
    /// 0 within [`PROGRAM_LIMIT`]. Returns its stdout.
    pub async fn run(self, scenario: &str, target: &Target) -> String {
        let mut cmd = match self {
            Program::Paho(api) => {
                let mut cmd = tokio::process::Command::new(python());
                cmd.arg(clients_dir().join("python/paho_client.py")).args([
                    "--api",
                    &api.to_string(),
                    scenario,
                ]);
                cmd
            }
            Program::MqttJs => {
                let mut cmd = tokio::process::Command::new(node());
                cmd.arg(clients_dir().join("node/mqttjs_client.mjs"))
                    .arg(scenario);
                cmd
            }
        };
        cmd.current_dir(clients_dir())
            .envs(target.vars())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let process = Spawned::start(&mut cmd);
        let output = tokio::time::timeout(PROGRAM_LIMIT, process.output())
            .await
            .unwrap_or_else(|_| {
                panic!("{self:?} {scenario} still running after {PROGRAM_LIMIT:?}")
            });
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{self:?} {scenario} failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}",
            output.status
        );
        stdout
    }
}
