//! `lorabroker serve` nodes as child processes of a test: configured through the
//! environment as an operator's deployment configures them ([`ServeNode::start`]), or run
//! from any command line ([`ServeNode::from_command`], as `tests/cli_cluster.rs` pastes the
//! README's), so that a test can kill one outright (SIGKILL) or stop it as an orchestrator
//! does (SIGTERM, then drain).

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;

use super::broker::WAIT;
use super::shell::{exec, shell, OutputLines, Spawned};

/// A running `lorabroker serve` process.
pub struct ServeNode {
    child: Spawned,
    /// Its MQTT (TCP) listener.
    pub mqtt: SocketAddr,
    /// Its HTTP listener (`/readyz`, `/metrics`).
    pub http: SocketAddr,
    /// Its stdout after the banner, kept open so that the node never writes to a closed pipe.
    _stdout: OutputLines,
}

impl ServeNode {
    /// Starts `lorabroker serve` with `env` (`LORABROKER_…` settings) on port 0 and returns
    /// it once it has printed its addresses and answers `/readyz` with 200.
    pub async fn start(name: &str, env: &[(String, String)]) -> ServeNode {
        let mut cmd = shell(&exec("lorabroker serve"));
        cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("LORABROKER_NODE_NAME", name)
            .env("LORABROKER_MQTT__LISTEN", "127.0.0.1:0")
            .env("LORABROKER_HTTP__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "warn");
        Self::from_command(name, &mut cmd, WAIT).await
    }

    /// Runs `cmd` (a `serve` that replaces its shell, listening on port 0) and returns the
    /// node once it has printed its addresses and answers `/readyz` with 200, each within
    /// `wait`.
    pub async fn from_command(name: &str, cmd: &mut Command, wait: Duration) -> ServeNode {
        let mut child = Spawned::start(cmd.stdout(Stdio::piped()));
        let mut lines = child.stdout_lines();
        let (mut mqtt, mut http) = (None, None);
        while mqtt.is_none() || http.is_none() {
            let line = tokio::time::timeout(wait, lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("{name} printed no addresses within {wait:?}"))
                .expect("stdout readable")
                .unwrap_or_else(|| panic!("{name} exited before printing its addresses"));
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("MQTT"), Some(addr)) => mqtt = addr.parse().ok(),
                (Some("HTTP"), Some(url)) => {
                    http = url.trim_start_matches("http://").parse().ok();
                }
                _ => {}
            }
        }
        let node = ServeNode {
            child,
            mqtt: mqtt.expect("an MQTT address"),
            http: http.expect("an HTTP address"),
            _stdout: lines,
        };
        super::wait::eventually(&format!("{name} ready"), wait, || async {
            match super::http::get(node.http, "/readyz").await {
                (200, _) => Ok(()),
                (status, body) => Err(format!("/readyz: {status} {body}")),
            }
        })
        .await;
        node
    }

    /// The value of one series of the node's `/metrics` (0 when absent).
    pub async fn metric(&self, series: &str) -> u64 {
        super::http::metric(self.http, series).await
    }

    /// Kills the node with SIGKILL: no drain, nothing flushed.
    pub async fn kill(mut self) {
        self.child.stop().await;
    }

    /// Stops the node with SIGTERM and waits for it to drain and exit.
    pub async fn terminate(mut self) -> ExitStatus {
        self.child.terminate(Duration::from_secs(30)).await
    }
}
