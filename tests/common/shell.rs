//! Shell-level helpers: commands run through `sh -c` exactly as a user pastes them (with
//! the `lorabroker` under test first on `PATH`), the [`Spawned`] guard every test spawns its
//! child processes with (so that none outlives its test), and the `topic payload` lines
//! that `mosquitto_sub -v` prints.

use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
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

/// `sh -c command`, with the `lorabroker` binary under test first on `PATH` and no stdin;
/// start it with [`Spawned::start`]. A command that runs until stopped should start with
/// `exec` (after any `NAME=value` prefixes, see [`exec`]) so that the process the test
/// holds is the program, not a shell in front of it.
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

/// Runs a pasted command (a single program with its arguments, as the README and the `dev`
/// banner print them) through `sh -c exec …`, with its stdout and stderr piped.
pub fn paste(command: &str) -> Spawned {
    Spawned::start(
        shell(&exec(command))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
}

/// How long the processes of a stopped group may take to die before they count as leaked.
const DIE_WITHIN: Duration = Duration::from_secs(5);

/// A child process that leads a process group of its own, so that stopping it stops
/// everything it started (a `sh -c` and its program, a program and its helpers), and that
/// checks that nothing of the group outlives it:
///
/// - dropping the guard kills the whole group (SIGKILL), also when the test panics;
/// - on Linux the child gets SIGKILL when the test process dies first (`PR_SET_PDEATHSIG`),
///   since a group of its own no longer receives the terminal's Ctrl-C;
/// - [`Spawned::stop`], [`Spawned::wait`] and [`Spawned::output`] fail the test, naming
///   them, when processes of the group are still alive after the child has ended (a
///   program that was only a shell's child, something started in the background), and
///   kill them.
///
/// `.ci/no-leftovers` checks the same for the whole suite, whatever spawned the process.
pub struct Spawned {
    child: Option<Child>,
    pgid: i32,
    what: String,
    /// Whether the group was seen empty after the child ended: then the ID is not killed
    /// again, in case the system has given it to another process since.
    gone: bool,
}

impl Spawned {
    /// Spawns `cmd` (stdio as configured on it) as the leader of a new process group.
    pub fn start(cmd: &mut Command) -> Spawned {
        let what = format!("{:?}", cmd.as_std());
        cmd.process_group(0).kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: the closure runs in the forked child before exec and calls only prctl,
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .expect("a child that was just spawned has a PID");
        Spawned {
            child: Some(child),
            pgid,
            what,
            gone: false,
        }
    }

    /// The child, for its pipes and its PID.
    pub fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("the child is held until output()")
    }

    /// The lines of the child's stdout (which must be piped); takes the pipe.
    pub fn stdout_lines(&mut self) -> OutputLines {
        let stdout = self.child().stdout.take().expect("stdout is piped");
        BufReader::new(stdout).lines()
    }

    /// Waits for the child to exit by itself, then checks that it left nothing running.
    pub async fn wait(&mut self) -> ExitStatus {
        let status = self
            .child()
            .wait()
            .await
            .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.what));
        self.check_group_gone().await;
        status
    }

    /// Waits for the child to exit by itself and collects its output (piped stdout and
    /// stderr), then checks that it left nothing running.
    pub async fn output(mut self) -> Output {
        let child = self.child.take().expect("output() is called once");
        let output = child
            .wait_with_output()
            .await
            .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.what));
        self.check_group_gone().await;
        output
    }

    /// Kills the whole group, reaps the child, and checks that every process of the group
    /// has died.
    pub async fn stop(&mut self) {
        if self.gone {
            return;
        }
        self.kill_group();
        if let Some(child) = &mut self.child {
            let _ = child.wait().await;
        }
        let deadline = Instant::now() + DIE_WITHIN;
        loop {
            let alive = group_members(self.pgid);
            if alive.is_empty() {
                self.gone = true;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "processes of {} survive SIGKILL of their group for {DIE_WITHIN:?}: {alive:?}",
                self.what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM to the child alone (as an orchestrator stopping a pod does), waits
    /// up to `within` for it to exit, then checks that it left nothing running.
    pub async fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = self.pgid;
        // SAFETY: kill only sends a signal to the child we spawned and have not reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let status = tokio::time::timeout(within, self.child().wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {within:?} of SIGTERM", self.what))
            .unwrap_or_else(|e| panic!("cannot wait for {}: {e}", self.what));
        self.check_group_gone().await;
        status
    }

    /// After the child ended by itself: fails the test if other processes of its group are
    /// still alive (and kills them).
    async fn check_group_gone(&mut self) {
        let alive = group_members(self.pgid);
        if alive.is_empty() {
            self.gone = true;
            return;
        }
        self.stop().await;
        panic!(
            "{} exited but left processes running (now killed): {alive:?}",
            self.what
        );
    }

    fn kill_group(&self) {
        // SAFETY: killpg only sends a signal; a group that no longer exists gives ESRCH.
        unsafe {
            libc::killpg(self.pgid, libc::SIGKILL);
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if !self.gone {
            self.kill_group();
        }
    }
}

/// The live (not zombie) processes of process group `pgid`, as `PID command line`, read
/// from `/proc` (empty where there is no `/proc`).
fn group_members(pgid: i32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut alive = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(pgrp)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        if *pgrp == pgid.to_string() && !matches!(*state, "Z" | "X") {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            alive.push(format!("{pid} {}", cmdline.trim_end()));
        }
    }
    alive
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
