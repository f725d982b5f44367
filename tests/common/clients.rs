//! The client programs the tests run (tests/clients): MQTT.js, playwright-core and the
//! console scripts under `tests/clients/node`, and the Python packages that
//! `tests/clients/setup` installs into `target/pyenv` at their pinned versions.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository's root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/clients/node` with its pinned packages (MQTT.js, playwright-core) installed:
/// `npm ci` there, once per test binary, when either is missing.
pub fn node_clients() -> PathBuf {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let dir = root().join("tests/clients/node");
    INSTALLED.get_or_init(|| {
        let modules = dir.join("node_modules");
        if modules.join("mqtt").exists() && modules.join("playwright-core").exists() {
            return;
        }
        let out = std::process::Command::new("npm")
            .arg("ci")
            .current_dir(&dir)
            .output()
            .expect("npm runs (Debian/Ubuntu: apt-get install -y nodejs npm)");
        assert!(
            out.status.success(),
            "npm ci in tests/clients/node failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
    dir
}

/// Runs `tests/clients/setup` (every pinned client library), panicking with its output
/// when it fails.
pub fn run_setup() {
    let out = std::process::Command::new(root().join("tests/clients/setup"))
        .current_dir(root())
        .output()
        .expect("tests/clients/setup runs");
    assert!(
        out.status.success(),
        "tests/clients/setup failed (it needs python3 with venv, node and npm):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
