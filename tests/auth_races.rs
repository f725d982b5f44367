//! Races between logins and revocations on a two-node cluster with a real Redis and a
//! real NATS (issue 8 point 10, DESIGN §3): a revocation that arrives while a node is still
//! reading the key from a slow Redis (every reply 0.6 s late, through [`DelayProxy`]) is
//! never lost: the raced connection is refused or closed within a second, and the key is
//! refused from then on. The race runs many rounds with the timing varied, several rounds
//! at a time.

mod common;

use std::time::{Duration, Instant};

use futures::future::join_all;
use rumqttc::ConnectReturnCode;

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
/// The revocation lands this far into the login, at most: past the key read (one slow
/// reply) into the first moments of the session.
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
