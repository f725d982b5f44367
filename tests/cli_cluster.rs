//! The seed flow across processes, as README.md's "Running a cluster locally" shows it: two
//! `lorabroker serve` nodes on one NATS and one Redis, `keys create`, `keys list`,
//! `lorabroker simulate` as the upstream, `mosquitto_sub` on node 1 and `mosquitto_pub` on
//! node 2, then `keys revoke`.
//!
//! Every command is one of the templates below, run through `sh -c` as a user pastes it;
//! the README shows the same templates with fixed ports filled in. Here the nodes listen on
//! port 0 and the test reads the addresses `serve` prints. NATS and Redis come from the
//! test fixtures (their own processes on free ports, or `LORABROKER_TEST_*_URL`); the key
//! prefix (`LORABROKER_REDIS__KEY_PREFIX`), tenant and application are unique per test, so
//! the test also runs against shared servers.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::http;
use common::serve::ServeNode;
use common::services::{unique, NatsService, RedisService};
use common::shell::{correlation_ids, exec, paste, require, shell, until, OutputLines, Spawned};

/// One cluster node.
const SERVE: &str = "lorabroker serve --node-name {node} --mqtt-listen 127.0.0.1:{mqtt_port} --http-listen 127.0.0.1:{http_port} --nats-url {nats} --redis-url {redis}";
/// A key of application `app1` (stdout: the key alone).
const KEYS_CREATE: &str = "lorabroker keys create --app app1 --tenant {tenant} --redis-url {redis}";
/// The application's keys, never their secrets.
const KEYS_LIST: &str = "lorabroker keys list --app app1 --tenant {tenant} --redis-url {redis}";
/// The upstream: simulated devices dev1 and dev2.
const SIMULATE: &str = "lorabroker simulate --app app1 --tenant {tenant} --devices 2 --uplink-interval 1s --nats-url {nats} --redis-url {redis}";
/// Everything of the application, on node 1.
const SUB: &str =
    "mosquitto_sub -h 127.0.0.1 -p {mqtt_port_1} -u 'app1@{tenant}' -P '{key}' -t '#' -v";
/// The seed's confirmed downlink, through node 2.
const PUB: &str = r#"mosquitto_pub -h 127.0.0.1 -p {mqtt_port_2} -u 'app1@{tenant}' -P '{key}' -t 'v3/app1@{tenant}/devices/dev1/down/push' -m '{"downlinks":[{"f_port":15,"frm_payload":"vu8=","priority":"NORMAL","confirmed":true,"correlation_ids":["my-correlation-id"]}]}'"#;
/// Cluster-wide revocation.
const KEYS_REVOKE: &str = "lorabroker keys revoke {key_id} --nats-url {nats} --redis-url {redis}";

/// Single-tenant mode: bare application IDs as usernames and in topics.
const SERVE_SINGLE: &str = "LORABROKER_TENANCY__MODE=single lorabroker serve --node-name {node} --mqtt-listen 127.0.0.1:{mqtt_port} --http-listen 127.0.0.1:{http_port} --nats-url {nats} --redis-url {redis}";
const KEYS_CREATE_SINGLE: &str = "lorabroker keys create --app {app} --redis-url {redis}";
const SIMULATE_SINGLE: &str = "lorabroker simulate --app {app} --devices 2 --uplink-interval 1s --nats-url {nats} --redis-url {redis}";
const SUB_SINGLE: &str =
    "mosquitto_sub -h 127.0.0.1 -p {mqtt_port_1} -u '{app}' -P '{key}' -t 'v3/+/devices/+/up' -t 'v3/{app}/devices/+/down/#' -v";
const PUB_SINGLE: &str = r#"mosquitto_pub -h 127.0.0.1 -p {mqtt_port_2} -u '{app}' -P '{key}' -t 'v3/{app}/devices/dev1/down/push' -m '{"downlinks":[{"f_port":15,"frm_payload":"vu8=","priority":"NORMAL","confirmed":true,"correlation_ids":["my-correlation-id"]}]}'"#;

/// How long a step of the flow may take (a device uplinks every second).
const WAIT: Duration = Duration::from_secs(20);

/// The placeholders of one test run.
struct Vars(Vec<(&'static str, String)>);

impl Vars {
    fn set(&mut self, name: &'static str, value: impl Into<String>) {
        self.0.retain(|(n, _)| *n != name);
        self.0.push((name, value.into()));
    }

    /// `template` with every `{name}` replaced; panics if one is left.
    fn fill(&self, template: &str) -> String {
        let mut s = template.to_owned();
        for (name, value) in &self.0 {
            s = s.replace(&format!("{{{name}}}"), value);
        }
        let placeholder = s.split('{').skip(1).find_map(|rest| {
            let name = rest.split('}').next()?;
            let is_name = !name.is_empty()
                && rest.len() > name.len()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            is_name.then_some(name)
        });
        assert!(placeholder.is_none(), "unfilled {placeholder:?} in {s}");
        s
    }
}

/// The shared services and what every child process of the test gets.
struct World {
    _redis: RedisService,
    _nats: NatsService,
    vars: Vars,
    prefix: String,
}

impl World {
    async fn start() -> World {
        require("mosquitto_sub");
        require("mosquitto_pub");
        let (redis, nats) = tokio::join!(RedisService::start(), NatsService::start());
        let vars = Vars(vec![
            ("nats", nats.url.clone()),
            ("redis", redis.url.clone()),
            ("tenant", unique("tenant")),
            ("app", unique("app")),
        ]);
        World {
            _redis: redis,
            _nats: nats,
            vars,
            prefix: unique("lbtest"),
        }
    }

    /// A template as a command of this test's world (its own Redis key prefix).
    fn command(&self, template: &str) -> tokio::process::Command {
        self.command_with(&self.vars, template)
    }

    fn command_with(&self, vars: &Vars, template: &str) -> tokio::process::Command {
        let mut cmd = shell(&vars.fill(template));
        cmd.env("LORABROKER_REDIS__KEY_PREFIX", &self.prefix)
            .env("RUST_LOG", "warn");
        cmd
    }

    /// Runs a command to its end; panics unless it succeeds. Returns stdout.
    async fn run(&self, template: &str) -> String {
        let out = Spawned::start(
            self.command(template)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .output()
        .await;
        assert!(
            out.status.success(),
            "{} failed ({}): {}",
            self.vars.fill(template),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// Starts a long-running command (replacing the shell, so a kill reaches it).
    fn spawn(&self, template: &str) -> (Spawned, OutputLines) {
        let mut child = Spawned::start(self.command(&exec(template)).stdout(Stdio::piped()));
        let lines = child.stdout_lines();
        (child, lines)
    }

    /// Starts a `serve` node on port 0; returns it once it prints its addresses and reports
    /// ready.
    async fn serve(&self, template: &str, node: &str) -> ServeNode {
        let mut vars = Vars(self.vars.0.clone());
        vars.set("node", node);
        vars.set("mqtt_port", "0");
        vars.set("http_port", "0");
        ServeNode::from_command(node, &mut self.command_with(&vars, &exec(template)), WAIT).await
    }
}

/// Waits until `node` has `n` MQTT connections (so that a client is in before the next
/// step).
async fn wait_for_connections(node: &ServeNode, n: usize) {
    let want = format!("lorabroker_connections {n}\n");
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, metrics) = http::get(node.http, "/metrics").await;
        if metrics.contains(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {want:?} in the metrics:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks the key format of DESIGN §3: `NNSXS.<ID>.<SECRET>`, 39 and 52 base32 characters.
fn assert_key_format(key: &str) {
    let parts: Vec<&str> = key.split('.').collect();
    assert_eq!(parts.len(), 3, "{key}");
    assert_eq!(parts[0], "NNSXS", "{key}");
    assert_eq!(parts[1].len(), 39, "{key}");
    assert_eq!(parts[2].len(), 52, "{key}");
    assert!(
        parts[1..].iter().all(|p| p
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))),
        "{key}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_flow_across_two_serve_nodes_with_keys_simulate_and_mosquitto() {
    let mut world = World::start().await;
    let (node1, node2) = tokio::join!(world.serve(SERVE, "node1"), world.serve(SERVE, "node2"));
    world.vars.set("mqtt_port_1", node1.mqtt.port().to_string());
    world.vars.set("mqtt_port_2", node2.mqtt.port().to_string());

    // `keys create` prints the key and nothing else on stdout, for `KEY=$(…)`.
    let stdout = world.run(KEYS_CREATE).await;
    let lines: Vec<&str> = stdout.split_terminator('\n').collect();
    assert_eq!(lines.len(), 1, "exactly one line on stdout: {stdout:?}");
    let key = lines[0].to_owned();
    assert_key_format(&key);
    let (key_id, secret) = {
        let mut parts = key.split('.').skip(1);
        (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
        )
    };
    world.vars.set("key", key.clone());
    world.vars.set("key_id", key_id.clone());

    // `keys list` shows the key's ID, never its secret.
    let listed = world.run(KEYS_LIST).await;
    assert!(listed.contains(&key_id), "{listed}");
    assert!(!listed.contains(&secret), "a secret was printed: {listed}");
    assert!(!listed.contains("secret"), "nor its hash: {listed}");
    let record: serde_json::Value =
        serde_json::from_str(listed.lines().next().unwrap_or_default()).expect("JSON lines");
    assert_eq!(record["id"], key_id.as_str());
    assert_eq!(record["application"], "app1");

    // The subscriber on node 1 is in before the fleet starts.
    let (mut sub, mut lines) = world.spawn(SUB);
    wait_for_connections(&node1, 1).await;
    let (mut simulate, _) = world.spawn(SIMULATE);

    let tenant = world.vars.fill("{tenant}");
    let (topic, join) = until(&mut lines, "/join", WAIT).await;
    assert!(
        topic.starts_with(&format!("v3/app1@{tenant}/devices/dev")),
        "{topic}"
    );
    assert!(join["join_accept"]["session_key_id"].is_string(), "{join}");
    let (topic, up) = until(&mut lines, "/up", WAIT).await;
    assert!(
        topic.starts_with(&format!("v3/app1@{tenant}/devices/dev")),
        "{topic}"
    );
    assert_eq!(
        up["end_device_ids"]["application_ids"]["application_id"],
        "app1"
    );
    assert!(up["uplink_message"]["frm_payload"].is_string(), "{up}");

    // The seed's confirmed downlink, through the other node.
    world.run(PUB).await;
    let (topic, queued) = until(&mut lines, "/down/queued", WAIT).await;
    assert_eq!(topic, format!("v3/app1@{tenant}/devices/dev1/down/queued"));
    let mine = "my-correlation-id".to_owned();
    assert!(
        correlation_ids(&queued["correlation_ids"]).contains(&mine),
        "{queued}"
    );
    let (_, sent) = until(&mut lines, "dev1/down/sent", WAIT).await;
    assert!(
        correlation_ids(&sent["correlation_ids"]).contains(&mine),
        "{sent}"
    );
    let (_, ack) = until(&mut lines, "dev1/down/ack", WAIT).await;
    assert!(
        correlation_ids(&ack["correlation_ids"]).contains(&mine),
        "{ack}"
    );
    assert!(
        correlation_ids(&ack["downlink_ack"]["correlation_ids"]).contains(&mine),
        "{ack}"
    );
    assert_eq!(ack["downlink_ack"]["frm_payload"], "vu8=");

    // Revocation ends the subscriber on node 1: disconnected, and refused on reconnect.
    world.run(KEYS_REVOKE).await;
    let status = tokio::time::timeout(WAIT, sub.wait())
        .await
        .expect("mosquitto_sub ends once its key is revoked");
    assert!(!status.success(), "{status}");
    wait_for_connections(&node1, 0).await;
    let refused = paste(&world.vars.fill(PUB)).output().await;
    assert!(
        !refused.status.success(),
        "a revoked key still publishes through node 2"
    );

    simulate.stop().await;
    for node in [node1, node2] {
        node.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_tenant_serve_takes_bare_application_usernames() {
    let mut world = World::start().await;
    let (node1, node2) = tokio::join!(
        world.serve(SERVE_SINGLE, "node1"),
        world.serve(SERVE_SINGLE, "node2")
    );
    world.vars.set("mqtt_port_1", node1.mqtt.port().to_string());
    world.vars.set("mqtt_port_2", node2.mqtt.port().to_string());
    let key = world.run(KEYS_CREATE_SINGLE).await.trim().to_owned();
    assert_key_format(&key);
    world.vars.set("key", key);
    let app = world.vars.fill("{app}");

    let (_sub, mut lines) = world.spawn(SUB_SINGLE);
    wait_for_connections(&node1, 1).await;
    let (_simulate, _) = world.spawn(SIMULATE_SINGLE);
    let (topic, up) = until(&mut lines, "/up", WAIT).await;
    assert!(
        topic.starts_with(&format!("v3/{app}/devices/dev")),
        "{topic}"
    );
    assert_eq!(
        up["end_device_ids"]["application_ids"]["application_id"],
        app.as_str()
    );

    world.run(PUB_SINGLE).await;
    let (topic, queued) = until(&mut lines, "/down/queued", WAIT).await;
    assert_eq!(topic, format!("v3/{app}/devices/dev1/down/queued"));
    assert!(
        correlation_ids(&queued["correlation_ids"]).contains(&"my-correlation-id".to_owned()),
        "{queued}"
    );
    let (_, ack) = until(&mut lines, "dev1/down/ack", WAIT).await;
    assert!(
        correlation_ids(&ack["correlation_ids"]).contains(&"my-correlation-id".to_owned()),
        "{ack}"
    );

    // A multi-tenant username is refused by a single-tenant node.
    let refused = paste(&world.vars.fill(
        "mosquitto_pub -h 127.0.0.1 -p {mqtt_port_2} -u '{app}@{tenant}' -P '{key}' -t 'v3/{app}@{tenant}/devices/dev1/down/push' -m '{}'",
    ))
    .output()
    .await;
    assert!(!refused.status.success());
}
