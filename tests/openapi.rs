//! The OpenAPI document (`docs/openapi.json`, served at `GET /api/v1/openapi.json`): it
//! names exactly the routes of the router (no drift either way), each of its operations
//! reaches a handler, and schemathesis (pinned in tests/clients/python/schemathesis.txt,
//! installed into target/pyenv by tests/clients/setup) finds no 5xx and no response that
//! breaks the document against a running `lorabroker serve`.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::broker::{Backend, TestEnv};
use common::clients::root;
use common::shell::Spawned;

const TOKEN: &str = "openapi-admin-token";
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn document() -> Value {
    let text =
        std::fs::read_to_string(root().join("docs/openapi.json")).expect("docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// `/a/{x}/b` → `/a/{}/b`: parameter names may differ between router and document.
fn shape(path: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in path.chars() {
        match c {
            '{' => {
                inside = true;
                out.push_str("{}");
            }
            '}' => inside = false,
            _ if inside => {}
            c => out.push(c),
        }
    }
    out
}

/// `(METHOD, path shape)` of every operation of the document.
fn documented() -> BTreeSet<(String, String)> {
    let doc = document();
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                ops.insert((method.to_uppercase(), shape(path)));
            }
        }
    }
    ops
}

/// The text from `start` (an opening parenthesis) to its matching closing one.
fn balanced(text: &str, start: usize) -> &str {
    let mut depth = 0;
    for (i, c) in text[start..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &text[start..=start + i];
                }
            }
            _ => {}
        }
    }
    &text[start..]
}

/// `(METHOD, path shape)` of every `/api/v1` route the sources declare with
/// `.route("/api/v1/…", get(…).post(…))`, read from every file under src/.
fn routed() -> BTreeSet<(String, String)> {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut sources = Vec::new();
    files(&root().join("src"), &mut sources);
    let mut ops = BTreeSet::new();
    for file in sources {
        let text = std::fs::read_to_string(&file).expect("a source file");
        for (at, _) in text.match_indices(".route(") {
            let call = balanced(&text, at + ".route".len());
            let Some(path) = call.split('"').nth(1) else {
                continue;
            };
            if !path.starts_with("/api/") {
                continue;
            }
            let handlers = &call[call.find(',').unwrap_or(0)..];
            for method in METHODS {
                let found = handlers.match_indices(&format!("{method}(")).any(|(i, _)| {
                    let before = handlers[..i].chars().next_back();
                    !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                if found {
                    ops.insert((method.to_uppercase(), shape(path)));
                }
            }
        }
    }
    ops
}

#[test]
fn document_names_exactly_the_routes_of_the_router() {
    let (doc, router) = (documented(), routed());
    assert!(
        router.len() >= 8,
        "the route scan found too little: {router:?}"
    );
    let undocumented: Vec<_> = router.difference(&doc).collect();
    let unrouted: Vec<_> = doc.difference(&router).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes missing from docs/openapi.json: {undocumented:?}\n\
         operations of docs/openapi.json no route serves: {unrouted:?}"
    );
    for path in document()["paths"].as_object().unwrap().keys() {
        assert!(path.starts_with("/api/v1/"), "{path}");
    }
}

/// Status and the first bytes of the answer to `method path` (not waiting for a stream
/// to end).
async fn probe(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("HTTP port accepts");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("request sent");
    let mut buf = vec![0; 4096];
    let mut got = 0;
    let read = async {
        loop {
            match s.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
            if got == buf.len() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    let text = String::from_utf8_lossy(&buf[..got]).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn every_documented_operation_reaches_a_handler() {
    let env = TestEnv::new(Backend::Embedded).await;
    let node = env.node_with(|c| c.http.admin_token = TOKEN.into()).await;
    let app = node.username(&env.app("app1"));
    let doc = document();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{app}", &app)
            .replace("{id}", "NOSUCHKEY")
            .replace("{dev}", "dev1");
        for method in METHODS {
            if item.get(method).is_none() {
                continue;
            }
            let body = if method == "post" && path.ends_with("/devices") {
                r#"{"device_id":"dev1"}"#
            } else if method == "post" {
                "{}"
            } else {
                ""
            };
            let (status, text) =
                probe(node.http_addr, &method.to_uppercase(), &concrete, body).await;
            assert!(status != 0 && status != 405, "{method} {path}: {text}");
            // The router's fallback: `{"code":"not_found","message":"no route …"}`.
            assert!(
                !text.contains("no route"),
                "{method} {path} fell through to the router's fallback: {text}"
            );
        }
    }
    // The served document is the file.
    let (status, text) = probe(node.http_addr, "GET", "/api/v1/openapi.json", "").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("application/json"), "{text}");
    assert_eq!(
        lorabroker::console::openapi::DOCUMENT,
        std::fs::read_to_string(root().join("docs/openapi.json")).unwrap()
    );
    node.shutdown().await;
}

/// The schemathesis of target/pyenv (or `LORABROKER_TEST_SCHEMATHESIS`), at the version
/// tests/clients/python/schemathesis.txt pins; installed by tests/clients/setup when
/// missing (as tests/python_upstream.rs does for its packages).
fn schemathesis() -> PathBuf {
    let custom = std::env::var_os("LORABROKER_TEST_SCHEMATHESIS").map(PathBuf::from);
    let path = custom
        .clone()
        .unwrap_or_else(|| root().join("target/pyenv/bin/schemathesis"));
    let pinned = std::fs::read_to_string(root().join("tests/clients/python/schemathesis.txt"))
        .expect("tests/clients/python/schemathesis.txt")
        .lines()
        .find_map(|l| l.strip_prefix("schemathesis=="))
        .expect("schemathesis is pinned")
        .trim()
        .to_owned();
    let version = || {
        std::process::Command::new(&path)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    if !version().contains(&pinned) && custom.is_none() {
        common::clients::run_setup();
    }
    assert!(
        version().contains(&pinned),
        "{} is not schemathesis {pinned}: run tests/clients/setup",
        path.display()
    );
    path
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let schemathesis = schemathesis();
    let http = common::services::free_port();
    let mut node = Spawned::start(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lorabroker"))
            .args(["serve", "--config", "/dev/null"])
            .args(["--mqtt-listen", "127.0.0.1:0"])
            .args(["--http-listen", &format!("127.0.0.1:{http}")])
            .args(["--node-name", "schemathesis"])
            .env("LORABROKER_HTTP__ADMIN_TOKEN", TOKEN)
            .env("LORABROKER_LOG__LEVEL", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit()),
    );
    let base = format!("http://127.0.0.1:{http}");
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    common::wait::eventually("lorabroker serve listens", Duration::from_secs(20), || {
        TcpStream::connect(addr)
    })
    .await;
    let report = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(&schemathesis);
    cmd.arg("run")
        .arg(root().join("docs/openapi.json"))
        .args(["--url", &base])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--checks", "all"])
        // The event stream never ends: schemathesis would wait for its body forever.
        .args(["--exclude-path", "/api/v1/applications/{app}/events"])
        .args(["--max-examples", "15", "--seed", "1", "--workers", "1"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "5"])
        // The application parameter's pattern bounds each ID's length with lookaheads:
        // hypothesis filters many candidates out, which is slow, not wrong.
        .args(["--suppress-health-check", "filter_too_much"])
        .args(["--report-dir"])
        .arg(report.path())
        .env("NO_COLOR", "1")
        .current_dir(report.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(300), Spawned::start(&mut cmd).output())
        .await
        .expect("schemathesis overran 300 s");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    node.stop().await;
    assert!(out.status.success(), "schemathesis found problems:\n{text}");
    println!("{text}");
}
