//! The client side of each scenario with the Mosquitto command-line clients
//! (`mosquitto_sub`, `mosquitto_pub`), as people script them. `-d` makes them print every
//! packet they send and receive, which is what is checked.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::common::shell::{require, until, OutputLines, Spawned};
use crate::harness::{downlink, Target};

/// What one expected line may take.
const WAIT: Duration = Duration::from_secs(10);

/// `binary` with line-buffered stdout (`stdbuf -oL`: into a pipe, the clients' `-d` lines
/// would otherwise arrive only when they exit).
fn client(binary: &str, t: &Target, port: u16) -> Command {
    require(binary);
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", binary])
        .args(["-h", &t.mqtt.ip().to_string(), "-p", &port.to_string()])
        .args(["-u", &t.username, "-P", &t.key])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Reads lines until one contains `needle`; panics (with what was read) if the output
/// ends or `WAIT` passes first (in all: a reconnect loop prints lines all the time).
/// Returns the lines read, the matching one last.
async fn read_until(lines: &mut OutputLines, needle: &str) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                let found = line.contains(needle);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Ok(_) => panic!("output ended before {needle:?}:\n{}", seen.join("\n")),
            Err(_) => panic!("no {needle:?} within {WAIT:?}:\n{}", seen.join("\n")),
        }
    }
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

/// `mosquitto_sub` with a will: accepted, then killed (SIGKILL: no DISCONNECT).
pub async fn will(t: &Target) {
    let (topic, payload) = t.will.clone().expect("a will");
    let mut cmd = client("mosquitto_sub", t, t.mqtt.port());
    cmd.args(["-d", "-t", "v3/+/devices/+/up"])
        .args(["--will-topic", &topic, "--will-payload", &payload])
        .args(["--will-qos", "1"]);
    let mut sub = Spawned::start(&mut cmd);
    let mut lines = sub.stdout_lines();
    read_until(&mut lines, "received CONNACK (0)").await;
    sub.stop().await;
}

/// `mosquitto_pub -l -q 1` (one connection, one publish per stdin line) to each forbidden
/// topic, twice: both acknowledged on the connection it opened, which it never reopens.
pub async fn forbidden(t: &Target) {
    for topic in &t.forbidden {
        let mut cmd = client("mosquitto_pub", t, t.mqtt.port());
        cmd.args(["-d", "-l", "-q", "1", "-t", topic])
            .stdin(Stdio::piped());
        let mut publisher = Spawned::start(&mut cmd);
        let mut stdin = publisher.child().stdin.take().expect("piped stdin");
        let mut lines = publisher.stdout_lines();
        let mut seen = Vec::new();
        for mid in 1..=2 {
            let body = format!("{}\n", downlink("forbidden"));
            stdin.write_all(body.as_bytes()).await.expect("stdin");
            seen.extend(read_until(&mut lines, &format!("received PUBACK (Mid: {mid}")).await);
        }
        drop(stdin);
        seen.extend(read_until(&mut lines, "sending DISCONNECT").await);
        let status = tokio::time::timeout(WAIT, publisher.wait())
            .await
            .expect("mosquitto_pub exits after DISCONNECT");
        assert!(status.success(), "{topic}: {status}\n{}", seen.join("\n"));
        assert_eq!(
            count(&seen, "sending CONNECT"),
            1,
            "{topic}: mosquitto_pub reconnected:\n{}",
            seen.join("\n")
        );
    }
}

/// The seed's flow exactly as the README pastes it: `mosquitto_sub -t '#' -v` on the first
/// node, `mosquitto_pub` of a confirmed downlink on the last.
pub async fn flow(t: &Target) {
    let mut cmd = client("mosquitto_sub", t, t.mqtt.port());
    cmd.args(["-t", "#", "-v"]);
    let mut sub = Spawned::start(&mut cmd);
    let mut lines = sub.stdout_lines();
    let dev = format!("/devices/{}", t.device);
    let (_, up) = until(&mut lines, &format!("{dev}/up"), WAIT).await;
    assert!(up["uplink_message"]["frm_payload"].is_string(), "{up}");

    let mut cmd = client("mosquitto_pub", t, t.publish_via.port());
    cmd.args(["-q", "1", "-t", &format!("v3/{}{dev}/down/push", t.app)])
        .args(["-m", &downlink(&t.correlation_id)]);
    let out = Spawned::start(&mut cmd).output().await;
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for event in ["down/queued", "down/sent", "down/ack"] {
        // `until` skips other lines; events of this downlink arrive in this order.
        let (_, doc) = until(&mut lines, &format!("{dev}/{event}"), WAIT).await;
        assert!(
            crate::common::shell::correlation_ids(&doc["correlation_ids"])
                .contains(&t.correlation_id),
            "{event} without {}: {doc}",
            t.correlation_id
        );
    }
    sub.stop().await;
}

/// `mosquitto_sub -V mqttv5`: refused, says why, exits.
pub async fn v5(t: &Target) {
    let mut cmd = client("mosquitto_sub", t, t.mqtt.port());
    cmd.args(["-V", "mqttv5", "-t", "#"]);
    let out = tokio::time::timeout(WAIT, Spawned::start(&mut cmd).output())
        .await
        .expect("mosquitto_sub -V mqttv5 ends by itself");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr
            .to_lowercase()
            .contains("unsupported protocol version"),
        "mosquitto_sub does not say why: {stderr}"
    );
}

/// `mosquitto_pub -q 2` of a downlink: PUBREC, PUBREL, PUBCOMP.
pub async fn qos2(t: &Target) {
    let mut cmd = client("mosquitto_pub", t, t.mqtt.port());
    cmd.args(["-d", "-q", "2"])
        .args([
            "-t",
            &format!("v3/{}/devices/{}/down/push", t.app, t.device),
        ])
        .args(["-m", &downlink(&t.correlation_id)]);
    let out = Spawned::start(&mut cmd).output().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("received PUBCOMP"), "{stdout}");
}
