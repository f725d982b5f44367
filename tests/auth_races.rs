//! Races between logins, revocations and takeovers on a two-node cluster with a real
//! Redis and a real NATS (issue 8 points 10 and 12, DESIGN §3 and §4):
//!
//! - a revocation that arrives while a node is still reading the key from a slow Redis
//!   (every reply 0.6 s late, through [`DelayProxy`]) is never lost: the raced connection
//!   is refused or closed within a second, and the key is refused from then on;
//! - concurrent CONNECTs with one client ID on two nodes leave exactly one session open,
//!   whatever the timing, and while Redis is down takeover still closes the older one.
//!
//! Each race runs many rounds with the timing varied, several rounds at a time.

mod common;

use std::time::{Duration, Instant};

use futures::future::join_all;
use rumqttc::ConnectReturnCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::broker::{Backend, TestClient, TestEnv, TestNode, WAIT};
use common::delay_proxy::DelayProxy;
use common::http;
use common::services::unique;
use common::wait::eventually;
use lorabroker::app::Backends;
use lorabroker::auth::{create_key, Rights};
use lorabroker::cluster::revoke_key;
use lorabroker::topic::AppRef;

/// The bound of revocation and takeover (DESIGN §3, §4).
const ONE_SECOND: Duration = Duration::from_secs(1);
/// How late the slow Redis answers every command.
const REPLY_DELAY: Duration = Duration::from_millis(600);

/// The key ID (middle part) of an API key.
fn key_id(key: &str) -> &str {
    key.split('.').nth(1).expect("NNSXS.<ID>.<SECRET>")
}

/// Connects with `key` and a fresh client ID; `Err` is the refusal code.
async fn attempt(
    node: &TestNode,
    app: &AppRef,
    key: &str,
) -> Result<TestClient, ConnectReturnCode> {
    TestClient::connect(node.mqtt_addr, &node.username(app), key, &unique("c")).await
}

/// Whether the server closes `client` within `limit` of `since` (which may have passed).
async fn closed_within(client: &mut TestClient, since: Instant, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::from_std(since + limit);
    tokio::time::timeout_at(deadline, client.expect_closed())
        .await
        .is_ok()
}

/// Polls `/readyz` until the node answers 200.
async fn ready(node: &TestNode) {
    eventually("node ready", Duration::from_secs(15), || async {
        match http::get(node.http_addr, "/readyz").await {
            (200, _) => Ok(()),
            other => Err(other),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Point 10: a revocation racing a slow key read.

/// Rounds of the revocation race, and how many run at the same time.
const REVOCATION_ROUNDS: u32 = 24;
const REVOCATION_BATCH: usize = 4;
/// The revocation lands this far into the login, at most: past the key read and the
/// takeover epoch (one slow reply each), into the first moments of the session.
const REVOCATION_WINDOW: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_racing_a_slow_key_read_is_never_lost() {
    let env = TestEnv::new(Backend::Cluster).await;
    let redis = env.redis.as_ref().expect("the cluster backend has Redis");
    let (proxy, slow_url) = DelayProxy::for_redis(&redis.url).await;
    let (n1, n2) = tokio::join!(
        env.node_with(|c| c.redis.url = slow_url.clone()),
        env.node_with(|c| c.redis.url = slow_url.clone()),
    );
    // Both nodes hold their Redis connections (through the proxy) before it slows down.
    tokio::join!(ready(&n1), ready(&n2));
    proxy.set_delays(Duration::ZERO, REPLY_DELAY);
    // Keys are made and revoked as `lorabroker keys` does: on Redis and NATS connections
    // of their own, which the proxy does not slow.
    let admin = Backends::from_config(&env.config(), "test-admin")
        .await
        .expect("admin backends");
    eventually("admin connected to NATS", WAIT, || async {
        admin.bus.flush().await
    })
    .await;
    let app = env.app("app1");
    let nodes = [&n1, &n2];

    let rounds: Vec<u32> = (0..REVOCATION_ROUNDS).collect();
    let mut outcomes = Vec::new();
    for batch in rounds.chunks(REVOCATION_BATCH) {
        let runs = batch.iter().map(|&round| {
            let (admin, app, n1, n2) = (&admin, &app, &n1, &n2);
            async move {
                let key = create_key(admin.keys.as_ref(), app, Rights::DEFAULT, "race", None)
                    .await
                    .expect("key stored")
                    .0
                    .key;
                let offset = REVOCATION_WINDOW * round / REVOCATION_ROUNDS;
                let revoke = async {
                    tokio::time::sleep(offset).await;
                    revoke_key(admin.keys.as_ref(), admin.bus.as_ref(), key_id(&key))
                        .await
                        .expect("revoked");
                    Instant::now()
                };
                let (c1, c2, revoked) =
                    tokio::join!(attempt(n1, app, &key), attempt(n2, app, &key), revoke);
                let mut accepted = 0;
                for (i, c) in [c1, c2].into_iter().enumerate() {
                    match c {
                        Err(code) => assert_eq!(
                            code,
                            ConnectReturnCode::NotAuthorized,
                            "round {round} ({offset:?}), node {}",
                            i + 1
                        ),
                        Ok(mut client) => {
                            accepted += 1;
                            assert!(
                                closed_within(&mut client, revoked, ONE_SECOND).await,
                                "round {round}: revoked {offset:?} into the login, node {}'s \
                                 connection is still open a second after the revocation",
                                i + 1
                            );
                        }
                    }
                }
                // Neither node accepts the key any more, from its cache or otherwise.
                for (i, n) in nodes.iter().enumerate() {
                    assert_eq!(
                        attempt(n, app, &key).await.err(),
                        Some(ConnectReturnCode::NotAuthorized),
                        "round {round} ({offset:?}): node {} accepts the revoked key",
                        i + 1
                    );
                }
                (offset, accepted)
            }
        });
        outcomes.extend(join_all(runs).await);
    }
    // The race was really run: some logins were accepted before the revocation landed and
    // some were refused after it.
    let accepted: usize = outcomes.iter().map(|(_, a)| a).sum();
    eprintln!("revocation race: {outcomes:?}");
    assert!(accepted > 0, "no login was ever accepted: {outcomes:?}");
    assert!(
        accepted < 2 * outcomes.len(),
        "no login was ever refused: {outcomes:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Point 12: concurrent takeover across nodes.

/// Rounds of the takeover race. Each starts [`TAKEOVER_STAGGER`] after the previous one:
/// long enough for its CONNECTs to be handled before the next round's arrive, so that rounds
/// overlap only while they wait for the takeover to settle.
const TAKEOVER_ROUNDS: usize = 100;
const TAKEOVER_STAGGER: Duration = Duration::from_millis(60);

/// How the two CONNECTs of a takeover round are timed: the second is sent this long after
/// the first (negative: on node 1 after node 2). Offsets around a NATS hop make the first
/// connection's takeover signal reach the other node while the second logs in there.
type Offset = i64;

/// Waits `micros` microseconds, finer than the timer wheel's millisecond.
async fn spin(micros: u64) {
    let until = Instant::now() + Duration::from_micros(micros);
    while Instant::now() < until {
        tokio::task::yield_now().await;
    }
}

/// A CONNECT (MQTT 3.1.1, clean session, keepalive 30 s) with a username and password.
fn connect_packet(client_id: &str, username: &str, password: &str) -> Vec<u8> {
    let mut body = Vec::new();
    let mut string = |s: &[u8]| {
        body.extend_from_slice(&u16::try_from(s.len()).expect("short").to_be_bytes());
        body.extend_from_slice(s);
    };
    string(b"MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 30]);
    let mut string = |s: &str| {
        body.extend_from_slice(&u16::try_from(s.len()).expect("short").to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    };
    string(client_id);
    string(username);
    string(password);
    let mut packet = vec![0x10];
    lorabroker::mqtt::codec::put_remaining_length(&mut packet, body.len());
    packet.extend_from_slice(&body);
    packet
}

/// Reads the CONNACK's return code.
async fn connack(stream: &mut TcpStream) -> u8 {
    let mut ack = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut ack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK, not a close");
    assert_eq!(ack[..3], [0x20, 2, 0], "a CONNACK");
    ack[3]
}

/// Whether the server closes `stream` before `deadline`.
async fn closed_before(stream: &mut TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Connects `client_id` to both nodes, the second CONNECT `offset_us` after the first, over
/// raw sockets opened beforehand (so that only the CONNECTs' timing varies), and reports
/// which connections the server closed within a second: exactly one must be.
async fn takeover_round(
    nodes: [&TestNode; 2],
    app: &AppRef,
    key: &str,
    client_id: &str,
    offset_us: Offset,
) -> (bool, bool) {
    let packet = connect_packet(client_id, &nodes[0].username(app), key);
    let (a, b) = tokio::join!(
        TcpStream::connect(nodes[0].mqtt_addr),
        TcpStream::connect(nodes[1].mqtt_addr)
    );
    let (mut a, mut b) = (a.expect("node 1 accepts"), b.expect("node 2 accepts"));
    let (first, second) = if offset_us >= 0 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    first.write_all(&packet).await.expect("CONNECT sent");
    spin(offset_us.unsigned_abs()).await;
    second.write_all(&packet).await.expect("CONNECT sent");
    for s in [&mut a, &mut b] {
        assert_eq!(connack(s).await, 0, "accepted");
    }
    let deadline = tokio::time::Instant::now() + ONE_SECOND;
    let closed = tokio::join!(
        closed_before(&mut a, deadline),
        closed_before(&mut b, deadline)
    );
    // The survivor is really served: PINGREQ, PINGRESP.
    for (s, was_closed) in [(&mut a, closed.0), (&mut b, closed.1)] {
        if !was_closed {
            s.write_all(&[0xC0, 0]).await.expect("PINGREQ sent");
            let mut pong = [0u8; 2];
            tokio::time::timeout(WAIT, s.read_exact(&mut pong))
                .await
                .expect("PINGRESP in time")
                .expect("PINGRESP");
            assert_eq!(pong, [0xD0, 0]);
        }
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_with_one_client_id_on_two_nodes_leave_exactly_one_open() {
    let env = TestEnv::new(Backend::Cluster).await;
    let (n1, n2) = tokio::join!(env.node(), env.node());
    let app = env.app("app1");
    let key = n1.key(&app, Rights::DEFAULT).await;
    // Both caches hold the key, so that both logins take the same short path.
    for n in [&n1, &n2] {
        drop(attempt(n, &app, &key).await.expect("accepted"));
    }
    let rounds = (0..TAKEOVER_ROUNDS).map(|i| {
        // 0.5 ms to 2 ms either way, in steps of 100 µs: about a NATS hop, so that the first
        // connection's takeover signal reaches the other node while the second logs in.
        let step = i as Offset % 32;
        let offset = (500 + step / 2 * 100) * if step % 2 == 0 { 1 } else { -1 };
        let (n1, n2, app, key) = (&n1, &n2, &app, &key);
        async move {
            tokio::time::sleep(TAKEOVER_STAGGER * i as u32).await;
            let id = unique("same-id");
            (
                offset,
                takeover_round([n1, n2], app, key, &id, offset).await,
            )
        }
    });
    let wrong: Vec<_> = join_all(rounds)
        .await
        .into_iter()
        .filter(|(_, closed)| closed.0 == closed.1)
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {TAKEOVER_ROUNDS} rounds left both sessions open or closed both \
         (offset of the second CONNECT in µs, (first closed, second closed)): {wrong:?}",
        wrong.len()
    );
}

/// Logs in on raw sockets: connects, sends CONNECT for `client_id` and checks CONNACK 0.
async fn raw_login(node: &TestNode, app: &AppRef, key: &str, client_id: &str) -> TcpStream {
    let mut s = TcpStream::connect(node.mqtt_addr).await.expect("accepts");
    let packet = connect_packet(client_id, &node.username(app), key);
    s.write_all(&packet).await.expect("CONNECT sent");
    assert_eq!(connack(&mut s).await, 0, "accepted");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_takeover_falls_back_to_the_connect_time_order() {
    let mut env = TestEnv::new(Backend::Cluster).await;
    let (n1, n2) = tokio::join!(env.node(), env.node());
    let app = env.app("app1");
    let key = n1.key(&app, Rights::DEFAULT).await;
    for n in [&n1, &n2] {
        // A node forgets its cached keys when it (first) connects to NATS, in case it
        // missed revocations; let that happen before the keys are cached for the outage.
        eventually("connected to NATS", WAIT, || async {
            let connections = n.app.bus.connections().map(|c| *c.borrow());
            connections.filter(|&c| c > 0).ok_or(connections)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(raw_login(n, &app, &key, &unique("warm")).await);
    }
    env.redis.as_mut().expect("Redis").stop().await;

    // Cached keys still log in; without epochs the later CONNECT takes over.
    let id = unique("same-id");
    let mut first = raw_login(&n1, &app, &key, &id).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut second = raw_login(&n2, &app, &key, &id).await;
    let deadline = tokio::time::Instant::now() + ONE_SECOND;
    assert!(
        closed_before(&mut first, deadline).await,
        "the older connection on node 1 is taken over"
    );
    assert!(
        !closed_before(
            &mut second,
            tokio::time::Instant::now() + Duration::from_millis(300)
        )
        .await
    );

    // Redis is back: a connection with an epoch takes over one without.
    env.redis.as_mut().expect("Redis").restart().await;
    ready(&n1).await;
    let mut third = raw_login(&n1, &app, &key, &id).await;
    let deadline = tokio::time::Instant::now() + ONE_SECOND;
    assert!(
        closed_before(&mut second, deadline).await,
        "taken over by node 1 again"
    );
    assert!(
        !closed_before(
            &mut third,
            tokio::time::Instant::now() + Duration::from_millis(300)
        )
        .await
    );
}
