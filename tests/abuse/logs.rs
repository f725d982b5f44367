//! Logs: a client that swaps username and password, and one with a 60 KB username, against
//! a node whose log output is captured (a tracing subscriber writing to a buffer, for the
//! whole test binary). No secret may appear, each line stays short, and repeated refusals
//! from one peer are one line plus a count.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::broker::{Backend, TestEnv};
use crate::{connect_packet, metric, Bystander};
use lorabroker::auth::Rights;

/// Everything the test binary logged at INFO and above.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    crate::common::log_capture::captured("info")
}

/// Sends a CONNECT and reads the CONNACK code.
async fn try_connect(node: &crate::common::broker::TestNode, packet: &[u8]) -> u8 {
    let mut s = TcpStream::connect(node.mqtt_addr).await.unwrap();
    s.write_all(packet).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.expect("a CONNACK");
    ack[3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_log_no_secret_and_stay_bounded() {
    let log = captured();
    let env = TestEnv::new(Backend::Cluster).await;
    // A CONNECT limit large enough for the 60 KB username to reach the username check.
    let node = env.node_with(|c| c.mqtt.max_connect_size = 65_536).await;
    let bystander = Bystander::start(&node).await;
    let app = env.app("app1");
    let key = node.key(&app, Rights::DEFAULT).await;
    let secret = key.rsplit('.').next().unwrap().to_owned();
    let uid = node.username(&app);
    let before = log.lock().unwrap().len();

    // Swapped username and password, 200 times from the same peer.
    for i in 0..200 {
        let code = try_connect(
            &node,
            &connect_packet(&format!("{}s{i}", env.tenant), &key, &uid),
        )
        .await;
        assert_eq!(code, 4, "bad username");
    }
    // A 60 KB username, 20 times.
    let marker = format!("{}huge", env.tenant);
    let huge = format!("{marker}{}", "x".repeat(60_000));
    for i in 0..20 {
        let code = try_connect(
            &node,
            &connect_packet(&format!("{}h{i}", env.tenant), &huge, &key),
        )
        .await;
        assert_eq!(code, 4);
    }
    bystander.finish("refusal log flood").await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let text = String::from_utf8_lossy(&log.lock().unwrap()[before..]).into_owned();
    assert!(
        !text.contains(&secret),
        "an API key secret reached the log:\n{text}"
    );
    let tenant = env.tenant.to_string();
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("connection refused") && l.contains(&tenant))
        .collect();
    println!(
        "refusal log: {} bytes in {} lines for 220 refused CONNECTs (60 KB usernames among them)",
        ours.iter().map(|l| l.len() + 1).sum::<usize>(),
        ours.len()
    );
    for line in &ours {
        assert!(line.len() < 2048, "a log line of {} bytes", line.len());
        assert!(!line.contains(&"x".repeat(1000)));
    }
    // One line per peer per interval (other tests' nodes have limiters of their own).
    assert!(
        (1..=3).contains(&ours.len()),
        "refusals from one peer are rate-limited: {} lines",
        ours.len()
    );
    let suppressed = metric(&node, "lorabroker_log_lines_suppressed_total").await;
    assert!(suppressed >= 217, "held-back lines counted: {suppressed}");
    // The key ID may be shown, so that an operator can find the key.
    let key_id = key.split('.').nth(1).unwrap();
    assert!(ours[0].contains(key_id), "{}", ours[0]);
    node.shutdown().await;
}
