//! Shell-level helpers: commands run through `sh -c` exactly as a user pastes them (with
//! the `lorabroker` under test first on `PATH`), and the `topic payload` lines that
//! `mosquitto_sub -v` prints.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Lines of a child's stdout.
pub type OutputLines = Lines<BufReader<ChildStdout>>;

/// Panics, saying how to install it, unless `binary` is on `PATH`.
pub fn require(binary: &str) {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {binary}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{binary} is needed for the shell-level tests: install it with `apt-get install -y mosquitto-clients`"
    );
}

/// `sh -c command`, with the `lorabroker` binary under test first on `PATH`, no stdin, and
/// killed when dropped. A command that runs until stopped should start with `exec` (after
/// any `NAME=value` prefixes, see [`exec`]) so that the kill reaches it rather than the shell.
pub fn shell(command: &str) -> Command {
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_lorabroker"))
        .parent()
        .expect("the binary has a directory")
        .to_owned();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(&path)))
        .expect("a valid PATH");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("PATH", path)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// `command` with `exec` inserted after its leading `NAME=value` assignments, so that the
/// shell is replaced by the program (which then inherits the assignments).
pub fn exec(command: &str) -> String {
    let mut words: Vec<&str> = command.split(' ').collect();
    let assignments = words
        .iter()
        .take_while(|w| {
            w.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
        })
        .count();
    words.insert(assignments, "exec");
    words.join(" ")
}

/// Runs a pasted command with its stdout and stderr piped.
pub fn paste(command: &str) -> Child {
    shell(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sh runs")
}

/// Reads `mosquitto_sub -v` lines (`topic payload`) until one on a topic ending in
/// `suffix`, within `wait`; returns its topic and JSON payload.
pub async fn until(lines: &mut OutputLines, suffix: &str, wait: Duration) -> (String, Value) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no message on …{suffix} within {wait:?}"))
            .expect("mosquitto_sub output")
            .unwrap_or_else(|| panic!("mosquitto_sub ended before a message on …{suffix}"));
        let Some((topic, payload)) = line.split_once(' ') else {
            continue;
        };
        if topic.ends_with(suffix) {
            let json = serde_json::from_str(payload)
                .unwrap_or_else(|e| panic!("{topic}: payload is not JSON ({e}): {payload}"));
            return (topic.to_owned(), json);
        }
    }
}

/// The strings of a `correlation_ids` array.
pub fn correlation_ids(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
