//! The seed document's flows, as a newcomer runs them: start `lorabroker dev`, paste the
//! `mosquitto_sub` and `mosquitto_pub` commands it prints, and see joins, uplinks, and a
//! confirmed downlink come back as `down/queued`, `down/sent` and `down/ack` carrying the
//! application's own correlation ID.

mod common;

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use common::shell::{correlation_ids, paste, require, until, Spawned};

const WAIT: Duration = Duration::from_secs(20);

/// A running `lorabroker dev` and the commands its banner printed.
struct Dev {
    process: Spawned,
    sub: String,
    publish: String,
    api_key: String,
}

async fn start_dev(extra: &[&str]) -> Dev {
    require("mosquitto_sub");
    require("mosquitto_pub");
    let mut process = Spawned::start(
        Command::new(env!("CARGO_BIN_EXE_lorabroker"))
            .args([
                "dev",
                "--mqtt-ws-listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--devices",
                "2",
                "--uplink-interval",
                "400ms",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped()),
    );
    let mut lines = process.stdout_lines();
    let (mut sub, mut publish, mut api_key) = (None, None, None);
    while publish.is_none() {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("banner within the wait")
            .expect("stdout readable")
            .expect("banner before exit");
        let line = line.trim().to_owned();
        if let Some(k) = line.strip_prefix("API key") {
            api_key = Some(k.trim().to_owned());
        } else if line.starts_with("mosquitto_sub ") {
            sub = Some(line);
        } else if line.starts_with("mosquitto_pub ") {
            publish = Some(line);
        }
    }
    Dev {
        process,
        sub: sub.expect("banner prints a mosquitto_sub command"),
        publish: publish.expect("banner prints a mosquitto_pub command"),
        api_key: api_key.expect("banner prints the API key"),
    }
}

async fn seed_flows(extra: &[&str], uid: &str) {
    let mut dev = start_dev(extra).await;
    assert!(dev.api_key.starts_with("NNSXS."), "{}", dev.api_key);
    assert!(dev.sub.contains(&format!("-u '{uid}'")), "{}", dev.sub);

    let mut sub = paste(&dev.sub);
    let mut lines = sub.stdout_lines();

    // Joins and uplinks, in the seed's JSON.
    let (topic, join) = until(&mut lines, "/join", WAIT).await;
    assert!(
        topic.starts_with(&format!("v3/{uid}/devices/dev")),
        "{topic}"
    );
    assert!(join["join_accept"]["session_key_id"].is_string(), "{join}");
    let (topic, up) = until(&mut lines, "/up", WAIT).await;
    assert!(
        topic.starts_with(&format!("v3/{uid}/devices/dev")),
        "{topic}"
    );
    let ids = &up["end_device_ids"];
    assert!(
        ids["device_id"].as_str().unwrap_or("").starts_with("dev"),
        "{up}"
    );
    assert_eq!(
        ids["application_ids"]["application_id"],
        uid.split('@').next().unwrap()
    );
    for field in ["dev_eui", "join_eui", "dev_addr"] {
        assert!(ids[field].is_string(), "end_device_ids.{field} in {up}");
    }
    assert!(up["received_at"].is_string(), "{up}");
    let msg = &up["uplink_message"];
    assert!(msg["f_port"].is_number(), "{up}");
    assert!(msg["frm_payload"].is_string(), "{up}");
    assert!(
        msg["rx_metadata"][0]["gateway_ids"]["gateway_id"].is_string(),
        "{up}"
    );
    assert!(
        msg["settings"]["data_rate"]["lora"]["spreading_factor"].is_number(),
        "{up}"
    );

    // The printed downlink command: queued, then sent and acknowledged by dev1.
    let output = paste(&dev.publish).output().await;
    assert!(
        output.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (topic, queued) = until(&mut lines, "/down/queued", WAIT).await;
    assert_eq!(topic, format!("v3/{uid}/devices/dev1/down/queued"));
    assert!(correlation_ids(&queued["correlation_ids"]).contains(&"my-correlation-id".to_owned()));
    let (_, sent) = until(&mut lines, "dev1/down/sent", WAIT).await;
    assert!(
        correlation_ids(&sent["correlation_ids"]).contains(&"my-correlation-id".to_owned()),
        "{sent}"
    );
    let (_, ack) = until(&mut lines, "dev1/down/ack", WAIT).await;
    assert!(
        correlation_ids(&ack["correlation_ids"]).contains(&"my-correlation-id".to_owned()),
        "{ack}"
    );
    assert!(
        correlation_ids(&ack["downlink_ack"]["correlation_ids"])
            .contains(&"my-correlation-id".to_owned()),
        "{ack}"
    );
    assert_eq!(ack["downlink_ack"]["frm_payload"], "vu8=");
    assert_eq!(ack["downlink_ack"]["confirmed"], true);

    sub.stop().await;
    dev.process.stop().await;
}

#[tokio::test]
async fn seed_flows_multi_tenant() {
    seed_flows(&["--app", "app1", "--tenant", "tenant1"], "app1@tenant1").await;
}

#[tokio::test]
async fn seed_flows_single_tenant_default_app() {
    seed_flows(&[], "demo").await;
}

#[tokio::test]
async fn dev_accepts_a_given_api_key() {
    let key = lorabroker::auth::generate().key;
    let mut dev = start_dev(&["--api-key", &key]).await;
    assert_eq!(dev.api_key, key);
    assert!(dev.sub.contains(&key));
    dev.process.stop().await;
}

// ---------------------------------------------------------------------------------------
// Test hygiene (issue 11): the guard every test spawns its processes with leaves nothing
// running, and fails the test that would.

/// Whether process `pid` is alive (a zombie is not).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|s| s != "Z" && s != "X")
        })
        .unwrap_or(false)
}

async fn until_dead(pid: &str) {
    common::wait::eventually("the process dies", Duration::from_secs(5), || async {
        if alive(pid) {
            Err("alive")
        } else {
            Ok(())
        }
    })
    .await
}

#[tokio::test]
async fn dropping_a_spawned_shell_kills_what_it_started() {
    // No `exec`: the shell stays in front of its two sleeps, as in the leak of issue 11.
    let mut process = Spawned::start(
        common::shell::shell("sleep 1000 & echo $!; sleep 1000").stdout(Stdio::piped()),
    );
    let mut lines = process.stdout_lines();
    let background = lines.next_line().await.unwrap().expect("the PID");
    assert!(alive(&background));
    drop(process);
    until_dead(&background).await;
}

#[tokio::test]
async fn a_command_that_leaves_a_process_running_fails_its_test() {
    let mut process =
        Spawned::start(common::shell::shell("sleep 1000 & echo $!; exit 0").stdout(Stdio::piped()));
    let mut lines = process.stdout_lines();
    let background = lines.next_line().await.unwrap().expect("the PID");
    let waited = tokio::spawn(async move { process.wait().await }).await;
    let panic = waited.expect_err("wait() fails when the group outlives the child");
    let message = panic
        .into_panic()
        .downcast::<String>()
        .map(|m| *m)
        .unwrap_or_default();
    assert!(message.contains("left processes running"), "{message}");
    assert!(message.contains("sleep 1000"), "{message}");
    until_dead(&background).await;
}

/// What a newcomer's other mosquitto commands do (issue 8): a subscriber with a status
/// will on a topic it may not write connects; a QoS 1 publish with a typo in the topic is
/// acknowledged (mosquitto_pub exits 0) and explained by a `down/failed`; QoS 2 pushes
/// complete; `-V mqttv31` works; `-V mqttv5` gets a clear refusal instead of hanging.
#[tokio::test]
async fn mosquitto_clients_with_wills_typos_qos_2_and_other_versions() {
    let mut dev = start_dev(&[]).await;
    let mut sub = paste(&format!(
        "{} --will-topic homeassistant/status --will-payload offline --will-qos 1 --will-retain",
        dev.sub
    ));
    let mut lines = sub.stdout_lines();
    until(&mut lines, "/up", WAIT).await;

    let run = |command: String| async move {
        let output = tokio::time::timeout(WAIT, paste(&command).output())
            .await
            .unwrap_or_else(|_| panic!("still running after {WAIT:?}: {command}"));
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let typo = dev
        .publish
        .replace("/down/push'", "/down/pushh'")
        .replace(" -m ", " -q 1 -m ");
    assert!(typo.contains("down/pushh"), "{typo}");
    let (code, stderr) = run(typo).await;
    assert_eq!(
        code,
        Some(0),
        "a forbidden QoS 1 publish is acknowledged: {stderr}"
    );
    let (topic, failed) = until(&mut lines, "/down/failed", WAIT).await;
    assert_eq!(topic, "v3/demo/devices/dev1/down/failed");
    assert_eq!(
        failed["downlink_failed"]["error"]["name"],
        "topic_not_writable"
    );

    let (code, stderr) = run(dev.publish.replace(" -m ", " -q 2 -m ")).await;
    assert_eq!(code, Some(0), "{stderr}");
    let (_, queued) = until(&mut lines, "/down/queued", WAIT).await;
    assert!(correlation_ids(&queued["correlation_ids"]).contains(&"my-correlation-id".to_owned()));

    let (code, stderr) = run(dev.sub.replace(" -v", " -v -V mqttv31 -C 1")).await;
    assert_eq!(code, Some(0), "MQTT 3.1: {stderr}");
    let (code, stderr) = run(dev.sub.replace(" -v", " -v -V mqttv5 -C 1")).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("Unsupported Protocol Version"), "{stderr}");

    // The subscriber with its status will is still there.
    until(&mut lines, "/up", WAIT).await;
    sub.stop().await;
    dev.process.stop().await;
}
