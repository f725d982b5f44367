//! Durable delivery across a cluster (issue 14): persistent QoS 1 sessions survive a node
//! killed with SIGKILL, a rolling restart of every node, and a restart of NATS itself.
//!
//! The nodes are `lorabroker serve` processes on one NATS (JetStream) and one Redis,
//! configured through the environment as a deployment configures them; the upstream
//! publishes plain NATS subjects from the test, as The Things Stack's side would. The
//! subscriber is rumqttc with `clean_session=0`. Every uplink is numbered: the test checks
//! that every number arrives, that first arrivals come in order, and that every repeat
//! carries DUP.

mod common;

use std::time::Duration;

use rumqttc::{QoS, SubscribeReasonCode};

use common::broker::{Backend, TestEnv};
use common::persistent::{device, options, uplinks_via, Client, Resuming, Tally};
use common::serve::ServeNode;
use common::services::unique;
use lorabroker::app::Backends;
use lorabroker::auth::{create_key, Rights};
use lorabroker::topic::AppRef;
use lorabroker::upstream::Upstream;

/// One test's cluster: its NATS and Redis, what every node is started with, the upstream
/// and a key of the application.
struct Cluster {
    env: TestEnv,
    node_env: Vec<(String, String)>,
    upstream: Upstream,
    app: AppRef,
    key: String,
}

impl Cluster {
    async fn start() -> Cluster {
        let env = TestEnv::new(Backend::Cluster).await;
        let config = env.config();
        let backends = Backends::from_config(&config, "upstream")
            .await
            .expect("the test's backends");
        let app = env.app("app1");
        let key = create_key(backends.keys.as_ref(), &app, Rights::DEFAULT, "test", None)
            .await
            .expect("key stored")
            .0
            .key;
        let node_env = [
            ("LORABROKER_NATS__URL", config.nats.url.clone()),
            ("LORABROKER_REDIS__URL", config.redis.url.clone()),
            (
                "LORABROKER_REDIS__KEY_PREFIX",
                config.redis.key_prefix.clone(),
            ),
            ("LORABROKER_SESSIONS__ENABLED", "true".into()),
            // JetStream on disk, as deployed: what a restarted NATS has is what it stored.
            ("LORABROKER_SESSIONS__STORAGE", "file".into()),
            ("LORABROKER_SHUTDOWN__GRACE_PERIOD", "1s".into()),
            // The subscriber reconnects every 200 ms while a node or NATS is away; the
            // per-key and per-address login limits are not what these tests are about.
            (
                "LORABROKER_LIMITS__CONNECTS_PER_KEY__PER_SECOND",
                "0".into(),
            ),
            (
                "LORABROKER_LIMITS__FAILED_CONNECTS_PER_IP__PER_SECOND",
                "0".into(),
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec();
        Cluster {
            upstream: Upstream::from_backends(&backends),
            env,
            node_env,
            app,
            key,
        }
    }

    async fn node(&self, name: &str) -> ServeNode {
        ServeNode::start(name, &self.node_env).await
    }

    fn username(&self) -> String {
        format!("{}@{}", self.app.app, self.app.tenant)
    }

    /// Makes the persistent session of `client_id` on `node`, subscribed to every uplink
    /// at QoS 1, and returns its connection.
    async fn session(&self, node: &ServeNode, client_id: &str) -> Client {
        let opts = options(
            node.mqtt,
            &self.username(),
            &self.key,
            client_id,
            false,
            false,
        );
        let mut client = Client::connect(opts).await;
        assert!(!client.present, "a new session");
        assert_eq!(
            client
                .subscribe_acked("v3/+/devices/+/up", QoS::AtLeastOnce)
                .await,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        );
        client
    }
}

/// Checks that `tally` holds every number of `0..want`, first arrivals in order.
fn assert_all_in_order(tally: &Tally, want: u32) {
    if let Some(at) = tally.order.windows(2).position(|w| w[0] > w[1]) {
        let around = &tally.order[at.saturating_sub(3)..(at + 3).min(tally.order.len())];
        panic!("out of order at {at}: {around:?}");
    }
    assert_eq!(tally.order.len(), want as usize);
    assert_eq!(tally.order.last().copied(), want.checked_sub(1));
}

/// The scenario: a persistent QoS 1 subscriber on node A disconnects; the upstream
/// publishes 10,000 uplinks; node A is killed with SIGKILL; the client reconnects to node
/// B with the same client ID and `clean_session=0` and receives all 10,000, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_uplinks_missed_on_a_killed_node_come_from_another() {
    let cluster = Cluster::start().await;
    let (a, b) = tokio::join!(cluster.node("node-a"), cluster.node("node-b"));
    let id = unique("backend");
    let first = cluster.session(&a, &id).await;
    first.client.disconnect().await.expect("DISCONNECT sent");
    drop(first);
    wait_detached(&a).await;

    uplinks_via(&cluster.upstream, &device(&cluster.app, "dev1"), 0..10_000).await;
    a.kill().await;

    let mut on_b = Resuming::start(vec![b.mqtt], &cluster.username(), &cluster.key, &id);
    let mut tally = Tally::default();
    tally.receive_until(&mut on_b, 10_000).await;
    assert_all_in_order(&tally, 10_000);
    assert_eq!(
        tally.duplicates, 0,
        "none of them reached a client before, so none comes twice"
    );
    assert_eq!((on_b.connections(), on_b.absent()), (1, 0), "resumed once");
    b.terminate().await;
}

/// A node killed while it delivers (messages in flight, acknowledgements on their way to
/// JetStream) loses nothing: the client resumes on another node, which sends what was not
/// acknowledged again, with DUP, then the rest in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_while_delivering_loses_nothing() {
    let cluster = Cluster::start().await;
    let (a, b) = tokio::join!(cluster.node("node-a"), cluster.node("node-b"));
    let id = unique("backend");
    drop(cluster.session(&a, &id).await);
    wait_detached(&a).await;

    // The subscriber goes to node A first, then to node B when A is gone.
    let mut subscriber =
        Resuming::start(vec![a.mqtt, b.mqtt], &cluster.username(), &cluster.key, &id);
    let upstream = cluster.upstream.clone();
    let dev = device(&cluster.app, "dev1");
    let publishing = tokio::spawn(async move { uplinks_via(&upstream, &dev, 0..10_000).await });
    // Kill node A once deliveries are under way.
    let mut tally = Tally::default();
    tally.receive_until(&mut subscriber, 2_000).await;
    a.kill().await;
    subscriber.nodes.lock().unwrap().retain(|n| *n == b.mqtt);
    publishing.await.expect("the upstream published");
    tally.receive_until(&mut subscriber, 10_000).await;
    assert_all_in_order(&tally, 10_000);
    assert!(subscriber.connections() >= 2, "the subscriber moved to B");
    assert_eq!(subscriber.absent(), 0, "node B found the session");
    eprintln!(
        "a node killed while delivering: {} duplicates, all with DUP",
        tally.duplicates
    );
    b.terminate().await;
}

/// A rolling restart of three nodes (each stopped with SIGTERM, drained, and replaced by a
/// new process) while 1,000 uplinks per second flow to a persistent subscriber loses
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_three_nodes_at_a_thousand_uplinks_per_second_loses_nothing() {
    const RATE: u32 = 1_000;
    const SECONDS: u32 = 12;
    let cluster = Cluster::start().await;
    let (n1, n2, n3) = tokio::join!(
        cluster.node("node-1"),
        cluster.node("node-2"),
        cluster.node("node-3")
    );
    let id = unique("backend");
    drop(cluster.session(&n1, &id).await);
    wait_detached(&n1).await;
    let mut subscriber = Resuming::start(
        vec![n1.mqtt, n2.mqtt, n3.mqtt],
        &cluster.username(),
        &cluster.key,
        &id,
    );

    let upstream = cluster.upstream.clone();
    let dev = device(&cluster.app, "dev1");
    let publishing = tokio::spawn(async move {
        // Ten uplinks every 10 ms.
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for batch in 0..RATE * SECONDS / 10 {
            tick.tick().await;
            uplinks_via(&upstream, &dev, batch * 10..batch * 10 + 10).await;
        }
    });
    // Each node in turn: out of the load balancer, SIGTERM (it drains its clients), then a
    // new process in its place.
    let mut nodes = vec![n1, n2, n3];
    for generation in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let node = nodes.remove(0);
        subscriber.nodes.lock().unwrap().retain(|n| *n != node.mqtt);
        let status = node.terminate().await;
        assert!(status.success(), "a drained node exits cleanly: {status}");
        let new = cluster.node(&format!("node-{}-new", generation + 1)).await;
        subscriber.nodes.lock().unwrap().push(new.mqtt);
        nodes.push(new);
    }
    publishing.await.expect("the upstream published");
    let mut tally = Tally::default();
    tally
        .receive_until(&mut subscriber, (RATE * SECONDS) as usize)
        .await;
    assert_all_in_order(&tally, RATE * SECONDS);
    assert_eq!(subscriber.absent(), 0, "every node found the session");
    assert!(subscriber.connections() >= 2, "the subscriber moved");
    eprintln!(
        "rolling restart: {} uplinks, {} duplicates (all with DUP), {} connections",
        RATE * SECONDS,
        tally.duplicates,
        subscriber.connections()
    );
    for node in nodes {
        node.terminate().await;
    }
}

/// NATS restarts while a persistent subscriber is connected: what was published before
/// and after comes, in order, and the session is still there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_during_a_session_loses_nothing() {
    let mut cluster = Cluster::start().await;
    let node = cluster.node("node-a").await;
    let id = unique("backend");
    drop(cluster.session(&node, &id).await);
    wait_detached(&node).await;
    let mut subscriber = Resuming::start(vec![node.mqtt], &cluster.username(), &cluster.key, &id);
    let dev = device(&cluster.app, "dev1");
    uplinks_via(&cluster.upstream, &dev, 0..500).await;
    let mut tally = Tally::default();
    tally.receive_until(&mut subscriber, 500).await;

    let nats = cluster.env.nats.as_mut().expect("the cluster's NATS");
    nats.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart().await;
    // The upstream's client reconnects by itself; it refuses to publish until then.
    common::wait::eventually("the upstream reconnected", Duration::from_secs(20), || {
        cluster.upstream.flush()
    })
    .await;
    uplinks_via(&cluster.upstream, &dev, 500..1_000).await;
    tally.receive_until(&mut subscriber, 1_000).await;
    assert_all_in_order(&tally, 1_000);
    assert_eq!(subscriber.absent(), 0, "the session outlived the restart");
    eprintln!(
        "NATS restart: {} duplicates (all with DUP), {} connections",
        tally.duplicates,
        subscriber.connections()
    );
    node.terminate().await;
}

/// Waits until `node` holds no attached session (the client's leaving was seen).
async fn wait_detached(node: &ServeNode) {
    common::wait::eventually("the session detached", Duration::from_secs(10), || async {
        match node.metric("lorabroker_sessions_attached").await {
            0 => Ok(()),
            n => Err(format!("{n} attached")),
        }
    })
    .await;
}
