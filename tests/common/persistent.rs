//! A QoS 1 MQTT client for the tests of persistent sessions and shared subscriptions
//! (issue 14): rumqttc with its event loop in the background, manual acknowledgements when
//! asked, and the uplinks the upstream publishes numbered in their payloads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;

use super::broker::{TestNode, WAIT};
use lorabroker::config::Config;
use lorabroker::topic::{AppRef, DeviceRef, Event as DeviceEvent, Id};
use lorabroker::transport::Kind;
use lorabroker::upstream::Upstream;

/// Runs each named `async fn(Backend)` of the test file as a test on both backends, in
/// the modules `embedded` and `cluster`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::common::broker::Backend::Embedded).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::common::broker::Backend::Cluster).await
                }
            )*
        }
    };
}

/// How long "nothing more arrives" is watched.
pub const SILENCE: Duration = Duration::from_millis(500);

pub fn sessions_on(c: &mut Config) {
    c.sessions.enabled = true;
    c.sessions.storage = "memory".into();
}

/// A rumqttc client whose event loop runs in the background, handing over PUBLISHes.
pub struct Client {
    pub client: AsyncClient,
    got: mpsc::UnboundedReceiver<Option<Publish>>,
    subacks: mpsc::UnboundedReceiver<Vec<SubscribeReasonCode>>,
    task: tokio::task::JoinHandle<()>,
    pub present: bool,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Login<'a> {
    pub node: &'a TestNode,
    pub app: &'a AppRef,
    pub key: &'a str,
}

impl Login<'_> {
    /// Connects `client_id` with `clean` session; `manual` turns off rumqttc's PUBACKs.
    pub async fn connect(&self, client_id: &str, clean: bool, manual: bool) -> Client {
        let addr = self.node.addr(Kind::Tcp);
        let username = self.node.username(self.app);
        Client::connect(options(addr, &username, self.key, client_id, clean, manual)).await
    }
}

/// MQTT options of a persistent-session test client.
pub fn options(
    addr: std::net::SocketAddr,
    username: &str,
    key: &str,
    client_id: &str,
    clean: bool,
    manual: bool,
) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_credentials(username, key);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(clean);
    opts.set_manual_acks(manual);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts
}

impl Client {
    /// Connects with `opts` (made by [`options`]) and waits for a successful CONNACK.
    pub async fn connect(opts: MqttOptions) -> Client {
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let present = loop {
            match tokio::time::timeout(WAIT, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
                    break ack.session_present;
                }
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => panic!("connect failed: {e}"),
                Err(_) => panic!("no CONNACK within {WAIT:?}"),
            }
        };
        let (tx, got) = mpsc::unbounded_channel();
        let (subacked, subacks) = mpsc::unbounded_channel();
        let task = tokio::spawn(pump(eventloop, tx, subacked));
        Client {
            client,
            got,
            subacks,
            task,
            present,
        }
    }
}

async fn pump(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<Option<Publish>>,
    subacked: mpsc::UnboundedSender<Vec<SubscribeReasonCode>>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let _ = subacked.send(ack.return_codes);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(Some(p)).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(ConnectionError::MqttState(_)) | Err(_) => {
                let _ = tx.send(None);
                return;
            }
        }
    }
}

impl Client {
    pub async fn subscribe(&self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
    }

    /// The next PUBLISH if one comes within `within`; `None` otherwise, or once the
    /// connection closed.
    pub async fn try_next(&mut self, within: Duration) -> Option<Publish> {
        tokio::time::timeout(within, self.got.recv())
            .await
            .ok()
            .flatten()
            .flatten()
    }

    /// Waits for the broker to close the connection (what arrives first is no PUBLISH).
    pub async fn expect_closed(&mut self) {
        match tokio::time::timeout(WAIT, self.got.recv()).await {
            Ok(Some(None)) | Ok(None) => {}
            other => panic!("the connection should be closed, got {other:?}"),
        }
    }

    /// Subscribes to `filter` at `qos` and returns the SUBACK's code.
    pub async fn subscribe_acked(&mut self, filter: &str, qos: QoS) -> SubscribeReasonCode {
        self.subscribe(filter, qos).await;
        match tokio::time::timeout(WAIT, self.subacks.recv()).await {
            Ok(Some(codes)) => codes[0],
            Ok(None) => panic!("connection closed before the SUBACK"),
            Err(_) => panic!("no SUBACK within {WAIT:?}"),
        }
    }

    /// The next PUBLISH within [`WAIT`]; panics on a close or a timeout.
    pub async fn next(&mut self) -> Publish {
        match tokio::time::timeout(WAIT, self.got.recv()).await {
            Ok(Some(Some(p))) => p,
            Ok(_) => panic!("connection closed"),
            Err(_) => panic!("no PUBLISH within {WAIT:?}"),
        }
    }

    pub async fn expect_silence(&mut self) {
        if let Ok(Some(Some(p))) = tokio::time::timeout(SILENCE, self.got.recv()).await {
            panic!("expected nothing, got {p:?}");
        }
    }

    /// Ends the connection without DISCONNECT (as a crash would).
    pub fn drop_connection(self) {
        drop(self);
    }
}

pub fn device(app: &AppRef, dev: &str) -> DeviceRef {
    DeviceRef::new(app.clone(), Id::parse(dev).expect("valid device ID"))
}

/// Publishes uplinks `from..to` of `dev`, numbered in their payloads.
pub async fn uplinks(node: &TestNode, dev: &DeviceRef, range: std::ops::Range<u32>) {
    uplinks_via(&node.upstream(), dev, range).await
}

/// Publishes uplinks `from..to` of `dev` through `upstream`, numbered in their payloads.
pub async fn uplinks_via(upstream: &Upstream, dev: &DeviceRef, range: std::ops::Range<u32>) {
    for i in range {
        upstream
            .publish(dev, DeviceEvent::Up, Bytes::from(i.to_string()))
            .await
            .expect("uplink published");
    }
    upstream.flush().await.expect("flushed");
}

pub fn number(p: &Publish) -> u32 {
    std::str::from_utf8(&p.payload)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("payload {:?} is no number", p.payload))
}

/// Something PUBLISHes arrive from, one at a time.
#[allow(async_fn_in_trait)]
pub trait Deliveries {
    /// The next PUBLISH; panics when none comes in time.
    async fn next_delivery(&mut self) -> Publish;
}

impl Deliveries for Client {
    async fn next_delivery(&mut self) -> Publish {
        self.next().await
    }
}

/// What a subscriber received: each number's first arrival in order, and how many came
/// again (each asserted to carry DUP as it is counted).
#[derive(Default)]
pub struct Tally {
    seen: std::collections::HashSet<u32>,
    /// First arrivals, in arrival order.
    pub order: Vec<u32>,
    /// Repeats.
    pub duplicates: usize,
}

impl Tally {
    /// Counts one PUBLISH; panics on a repeat without DUP.
    pub fn count(&mut self, p: &Publish) {
        let n = number(p);
        if self.seen.insert(n) {
            self.order.push(n);
        } else {
            assert!(p.dup, "message {n} came again without DUP");
            self.duplicates += 1;
        }
    }

    /// Receives from `from` until `want` distinct numbers arrived in all.
    pub async fn receive_until(&mut self, from: &mut impl Deliveries, want: usize) {
        while self.seen.len() < want {
            let p = from.next_delivery().await;
            self.count(&p);
        }
    }
}

/// Receives until `want` distinct numbers arrived; returns them in arrival order with
/// how many came twice, asserting that every repeat carries DUP.
pub async fn receive_all(client: &mut impl Deliveries, want: usize) -> (Vec<u32>, usize) {
    let mut tally = Tally::default();
    tally.receive_until(client, want).await;
    (tally.order, tally.duplicates)
}

/// Waits until no persistent session is attached on `node`.
pub async fn detached(node: &TestNode) {
    node.metric_becomes("the session detached", "lorabroker_sessions_attached", 0)
        .await;
}

/// A persistent-session subscriber that, whenever its connection ends, connects again with
/// `clean_session=0` to the next of `nodes`, as an application backend behind a load
/// balancer does. Its session must exist already: every connection must find it
/// (CONNACK session present), which [`Resuming::absent`] counts. PUBACKs are rumqttc's.
pub struct Resuming {
    /// Where it connects, in turn; a test removes a node before stopping it and adds its
    /// replacement, as a load balancer's endpoints follow a rolling restart.
    pub nodes: Arc<Mutex<Vec<SocketAddr>>>,
    got: mpsc::UnboundedReceiver<Publish>,
    connections: Arc<AtomicUsize>,
    absent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Resuming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long a [`Resuming`] subscriber may go without a PUBLISH (nodes restart meanwhile).
pub const RESUME_WAIT: Duration = Duration::from_secs(30);

impl Resuming {
    /// Starts connecting `client_id` as `username` with `key` to `nodes`.
    pub fn start(nodes: Vec<SocketAddr>, username: &str, key: &str, client_id: &str) -> Resuming {
        let nodes = Arc::new(Mutex::new(nodes));
        let (tx, got) = mpsc::unbounded_channel();
        let connections = Arc::new(AtomicUsize::new(0));
        let absent = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(resume(
            nodes.clone(),
            [username, key, client_id].map(str::to_owned),
            tx,
            connections.clone(),
            absent.clone(),
        ));
        Resuming {
            nodes,
            got,
            connections,
            absent,
            task,
        }
    }

    /// How many connections were accepted (CONNACK 0) so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// How many accepted connections did not find the session.
    pub fn absent(&self) -> usize {
        self.absent.load(Ordering::Relaxed)
    }
}

impl Deliveries for Resuming {
    async fn next_delivery(&mut self) -> Publish {
        match tokio::time::timeout(RESUME_WAIT, self.got.recv()).await {
            Ok(Some(p)) => p,
            Ok(None) => panic!("the subscriber's task ended"),
            Err(_) => panic!(
                "no PUBLISH within {RESUME_WAIT:?} ({} connections so far)",
                self.connections()
            ),
        }
    }
}

async fn resume(
    nodes: Arc<Mutex<Vec<SocketAddr>>>,
    [username, key, client_id]: [String; 3],
    tx: mpsc::UnboundedSender<Publish>,
    connections: Arc<AtomicUsize>,
    absent: Arc<AtomicUsize>,
) {
    for turn in 0usize.. {
        let addr = {
            let nodes = nodes.lock().expect("not poisoned");
            nodes.get(turn % nodes.len().max(1)).copied()
        };
        let Some(addr) = addr else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let opts = options(addr, &username, &key, &client_id, false, false);
        // The client is held while its event loop runs: dropping it ends the loop.
        let (_client, mut eventloop) = AsyncClient::new(opts, 1024);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != rumqttc::ConnectReturnCode::Success {
                        break;
                    }
                    connections.fetch_add(1, Ordering::Relaxed);
                    if !ack.session_present {
                        absent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
