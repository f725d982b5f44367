//! The console page (`/console`): its security headers and embedded assets, turning it
//! off, the public addresses it shows (`GET /api/v1/console/info`), and the whole page
//! end to end in headless Chromium with two nodes (tests/clients/node/console_e2e.mjs):
//! sign in, generate a key, connect with it, see the live events of a client on the other
//! node, an unknown key's `as.mqtt.connect.fail`, revoke, a self-service sign-in with a
//! key holding `RIGHT_APPLICATION_SETTINGS_API_KEYS`, and a screenshot for CI; and in
//! headless Firefox (tests/clients/node/console_firefox.mjs, over Marionette): sign in,
//! generate a key, its client's `as.mqtt.connect`, an unknown key's
//! `as.mqtt.connect.fail`, and a screenshot.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::broker::{Backend, TestEnv};
use lorabroker::console::CONTENT_SECURITY_POLICY;

const TOKEN: &str = "console-admin-token";

/// One `GET path` with `Host: host`: status, lower-cased header lines, body.
async fn get(addr: SocketAddr, path: &str, host: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).await.expect("HTTP port accepts");
    let head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("request sent");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("response read");
    let (head, body) = out.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn console_is_served_with_a_strict_content_security_policy() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node().await;
    let mut paths = vec!["/console".to_owned(), "/console/".to_owned()];
    paths.extend(lorabroker::console::assets::names().map(|n| format!("/console/{n}")));
    for path in &paths {
        let (status, headers, body) = get(node.http_addr, path, "localhost").await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(!body.is_empty(), "{path}");
        assert_eq!(
            header(&headers, "content-security-policy"),
            Some(CONTENT_SECURITY_POLICY),
            "{path}"
        );
        assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&headers, "referrer-policy"), Some("no-referrer"));
        assert_eq!(header(&headers, "x-frame-options"), Some("DENY"));
        assert_eq!(header(&headers, "cache-control"), Some("no-store"));
        assert!(header(&headers, "set-cookie").is_none(), "{path}");
    }
    let csp = CONTENT_SECURITY_POLICY;
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' data:",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");

    // The page: scripts only from files, no inline handlers or styles, nothing remote.
    let (_, headers, page) = get(node.http_addr, "/console", "localhost").await;
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/html; charset=utf-8")
    );
    for tag in page.split("<script").skip(1) {
        let open = tag.split('>').next().unwrap_or_default();
        assert!(
            open.contains("src=\"/console/"),
            "inline script: <script{open}>"
        );
        assert!(
            tag.split_once('>')
                .map(|(_, rest)| rest.starts_with("</script>"))
                == Some(true),
            "a script with a body"
        );
    }
    for forbidden in [
        " onclick=",
        " onload=",
        " onsubmit=",
        " style=",
        "http://",
        "https://",
    ] {
        assert!(!page.contains(forbidden), "the page contains {forbidden:?}");
    }
    let (_, headers, _) = get(node.http_addr, "/console/console.js", "localhost").await;
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/javascript; charset=utf-8")
    );
    // The credential lives in memory: no storage, no cookies, no token in a URL.
    for name in lorabroker::console::assets::names().filter(|n| n.ends_with(".js")) {
        let (_, _, js) = get(node.http_addr, &format!("/console/{name}"), "x").await;
        for forbidden in [
            "localStorage",
            "sessionStorage",
            "document.cookie",
            "?token",
            "innerHTML",
            "eval(",
        ] {
            assert!(!js.contains(forbidden), "{name} uses {forbidden}");
        }
    }

    let (status, _, _) = get(node.http_addr, "/console/nothing.js", "localhost").await;
    assert_eq!(status, 404);
    let (status, _, _) = get(node.http_addr, "/console/../Cargo.toml", "localhost").await;
    assert_eq!(status, 404);
    node.shutdown().await;
}

#[tokio::test]
async fn console_turned_off_is_not_found() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node_with(|c| c.console.enabled = false).await;
    for path in [
        "/console",
        "/console/",
        "/console/console.js",
        "/console/console.css",
    ] {
        let (status, headers, body) = get(node.http_addr, path, "localhost").await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(header(&headers, "content-security-policy").is_none());
    }
    // The API keeps its description and the public addresses.
    let (status, _, body) = get(node.http_addr, "/api/v1/openapi.json", "localhost").await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = get(node.http_addr, "/api/v1/console/info", "localhost").await;
    assert_eq!(status, 200);
    node.shutdown().await;
}

#[tokio::test]
async fn console_info_shows_configured_or_derived_addresses() {
    let env = TestEnv::new(Backend::Embedded).await;
    // Derived: the host the page was loaded from, the real ports of the listeners.
    let node = env
        .node_with(|c| c.mqtt.ws.listen = "127.0.0.1:0".into())
        .await;
    let ws = node.addr(lorabroker::transport::Kind::Ws).port();
    let (status, _, body) = get(
        node.http_addr,
        "/api/v1/console/info",
        "mqtt.example.com:8080",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        info["public_address"],
        format!("mqtt.example.com:{}", node.mqtt_addr.port())
    );
    assert_eq!(info["public_tls_address"], "");
    assert_eq!(
        info["public_ws_url"],
        format!("ws://mqtt.example.com:{ws}/mqtt")
    );
    assert_eq!(info["tenancy"], "multi");
    assert!(info["node"].as_str().unwrap().starts_with("test"), "{info}");
    // A Host header that is not a host name is not echoed.
    let (_, _, body) = get(node.http_addr, "/api/v1/console/info", "<b>x</b>").await;
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        info["public_address"],
        format!("127.0.0.1:{}", node.mqtt_addr.port())
    );
    node.shutdown().await;

    // Configured: shown as they are (a node cannot know its load balancer's name).
    let node = env
        .node_with(|c| {
            c.tenancy.mode = "single".into();
            c.console.public_address = "eu1.example.com:1883".into();
            c.console.public_tls_address = "eu1.example.com:8883".into();
            c.console.public_ws_url = "wss://eu1.example.com/mqtt".into();
        })
        .await;
    let (_, _, body) = get(node.http_addr, "/api/v1/console/info", "localhost").await;
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["public_address"], "eu1.example.com:1883");
    assert_eq!(info["public_tls_address"], "eu1.example.com:8883");
    assert_eq!(info["public_ws_url"], "wss://eu1.example.com/mqtt");
    assert_eq!(info["tenancy"], "single");
    node.shutdown().await;
}

/// Where a screenshot goes: `target/<name>` (the CI artifact), under `CARGO_TARGET_DIR`
/// when that is set.
fn screenshot_path(name: &str) -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&target).expect("the target directory");
    target.join(name)
}

#[tokio::test]
async fn console_in_headless_chromium_with_two_nodes() {
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "headless Chromium is missing (Debian/Ubuntu: apt-get install -y chromium; .ci/run installs it)"
    );
    let dir = common::clients::node_clients();
    let env = TestEnv::new(Backend::Cluster).await;
    // Node A serves the page; the MQTT clients connect to node B.
    let a = env
        .node_with(|c| {
            c.node_name = "node-a".into();
            c.http.admin_token = TOKEN.into();
            // Connection quotas keep the cluster-wide count the charts show.
            c.limits.max_connections_per_application = 1000;
        })
        .await;
    let b = env
        .node_with(|c| {
            c.node_name = "node-b".into();
            c.http.admin_token = TOKEN.into();
            // Connection quotas keep the cluster-wide count the charts show.
            c.limits.max_connections_per_application = 1000;
        })
        .await;
    let app = env.app("console-app");
    let screenshot = screenshot_path("console-screenshot.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("console_e2e.mjs")
        .current_dir(&dir)
        .env(
            "LB_CONSOLE",
            format!("http://127.0.0.1:{}/console", a.http_addr.port()),
        )
        .env("LB_TOKEN", TOKEN)
        .env("LB_APP", a.username(&app))
        .env("LB_MQTT", format!("mqtt://{}", b.mqtt_addr))
        .env("LB_SCREENSHOT", &screenshot)
        .env("LB_TIMEOUT", "15")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = tokio::time::timeout(
        Duration::from_secs(150),
        common::shell::Spawned::start(&mut cmd).output(),
    )
    .await
    .expect("console_e2e.mjs overran 150 s");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "console_e2e.mjs failed:\n{text}");
    for seen in [
        "signed in as operator",
        "Make sure to copy your API key now, since it will no longer be visible after leaving the page",
        "connect event:",
        "node-b",
        "not found",
        "client disconnected after revocation",
        "disconnect event:",
        "self-service key signed in to",
    ] {
        assert!(text.contains(seen), "{seen:?} not in:\n{text}");
    }
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );
    println!("{text}");
    a.shutdown().await;
    b.shutdown().await;
}

/// The live Firefox processes that belong to the one with PID `pid` and profile
/// `profile`, as `PID command line`: a command line naming the profile, or naming `pid`
/// as a word (content processes' `-parentPid`, and the crash helper, which runs in a
/// session of its own, outside Firefox's process group).
fn firefox_processes(pid: u32, profile: &std::path::Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let pid = pid.to_string();
    let profile = profile.to_string_lossy();
    dir.flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // The state follows the parenthesised command name: Z is a zombie (dead).
            if stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
            {
                return None;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let ours = args
                .iter()
                .any(|a| a.contains(profile.as_ref()) || *a == pid);
            (ours && args.iter().any(|a| a.contains("firefox")))
                .then(|| format!("{name} {}", args.join(" ").trim_end()))
        })
        .collect()
}

#[tokio::test]
async fn console_in_headless_firefox() {
    let firefox_bin = std::path::Path::new("/usr/bin/firefox-esr");
    assert!(
        firefox_bin.exists(),
        "headless Firefox is missing (Debian: apt-get install -y firefox-esr; .ci/run installs it)"
    );
    let dir = common::clients::node_clients();
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env
        .node_with(|c| {
            c.node_name = "node-firefox".into();
            c.http.admin_token = TOKEN.into();
        })
        .await;
    let app = env.app("console-firefox-app");
    let screenshot = screenshot_path("console-screenshot-firefox.png");
    let _ = std::fs::remove_file(&screenshot);

    // A profile of its own (also its HOME), Marionette on a free port.
    let profile = tempfile::tempdir().expect("a temporary profile directory");
    let marionette = common::services::free_port();
    std::fs::write(
        profile.path().join("user.js"),
        format!(
            "user_pref(\"marionette.port\", {marionette});\n\
             user_pref(\"app.update.enabled\", false);\n\
             user_pref(\"browser.shell.checkDefaultBrowser\", false);\n"
        ),
    )
    .expect("user.js written");
    let mut browser_cmd = tokio::process::Command::new(firefox_bin);
    browser_cmd
        .args(["--headless", "--marionette", "--no-remote", "-profile"])
        .arg(profile.path())
        .env("HOME", profile.path())
        .env("MOZ_CRASHREPORTER_DISABLE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // Firefox starts content processes: it leads a process group, killed as a whole.
    let mut firefox = common::shell::Spawned::start(&mut browser_cmd);
    let firefox_pid = firefox.child().id().expect("Firefox was just started");

    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("console_firefox.mjs")
        .current_dir(&dir)
        .env("LB_MARIONETTE", marionette.to_string())
        .env(
            "LB_CONSOLE",
            format!("http://127.0.0.1:{}/console", node.http_addr.port()),
        )
        .env("LB_TOKEN", TOKEN)
        .env("LB_APP", node.username(&app))
        .env("LB_MQTT", format!("mqtt://{}", node.mqtt_addr))
        .env("LB_SCREENSHOT", &screenshot)
        .env("LB_TIMEOUT", "15")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = tokio::time::timeout(
        Duration::from_secs(150),
        common::shell::Spawned::start(&mut cmd).output(),
    )
    .await;
    firefox.stop().await;
    let out = out.expect("console_firefox.mjs overran 150 s");
    // The crash helper, outside the group, ends by itself when Firefox is gone.
    let mut left = firefox_processes(firefox_pid, profile.path());
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = firefox_processes(firefox_pid, profile.path());
    }
    assert!(left.is_empty(), "Firefox processes left running: {left:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "console_firefox.mjs failed:\n{text}");
    for seen in [
        "Marionette session in firefox",
        "signed in as operator",
        "Make sure to copy your API key now, since it will no longer be visible after leaving the page",
        "connect event:",
        "console-firefox-good",
        "connect.fail event:",
        "not found",
    ] {
        assert!(text.contains(seen), "{seen:?} not in:\n{text}");
    }
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );
    println!("{text}");
    node.shutdown().await;
}
