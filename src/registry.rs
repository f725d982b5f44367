//! The [`Registry`] of live connections on this node, by (tenant, application, client ID),
//! for client-ID takeover, key revocation and drain.
//!
//! Takeover (DESIGN §4): of two connections with one client ID in one application, the one
//! with the greater takeover epoch survives, on whichever nodes they live ([`takes_over`]).
//! A login claims its epoch ([`Registry::claim_epoch`], from [`ClientEpochs`]) before it
//! registers, and the claim stays open until it does: an epoch announced by another node
//! meanwhile is remembered, and a connection that registers after a greater epoch was
//! announced is closed at once. That closes the hole of the wall-clock order used before
//! epochs (issue 8 point 12): a takeover signal that reached a node while its connection
//! was between login and registration found nothing to close and was lost, and when both
//! connections carried the same millisecond both stayed open.
//!
//! A connection without an epoch (Redis could not be asked) is ordered as before epochs:
//! by connect time in Unix milliseconds, the node ID breaking ties, newest registration
//! first on one node. While Redis is down two same-millisecond CONNECTs on two nodes may
//! then both stay open.
//!
//! Revocation: a connection carries the revocation [`Ticket`] taken when its login began,
//! and is closed as it registers if its key was revoked since, since the revocation
//! signal, handled between the login and the registration, had nothing to close.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::auth::{ClientEpochs, Revocations, Standing, Ticket};
use crate::mqtt::outbox::{CloseReason, Outbox};
use crate::topic::AppRef;

/// What the registry knows of one connection.
pub struct Connection {
    /// Node-unique connection ID.
    pub id: u64,
    /// The application it authenticated for.
    pub app: AppRef,
    /// Its MQTT client ID.
    pub client_id: String,
    /// The ID of the API key it authenticated with.
    pub key_id: String,
    /// How to reach its task.
    pub outbox: Arc<Outbox>,
    /// Its takeover epoch ([`Registry::claim_epoch`]); `None` when none could be had.
    pub epoch: Option<u64>,
    /// When it connected (Unix milliseconds): the takeover order without epochs.
    pub connected_at_ms: u64,
    /// The revocation ticket taken before its login began.
    pub ticket: Ticket,
}

impl Connection {
    /// Its place in the takeover order, as a connection of `node`.
    pub fn claim<'a>(&self, node: &'a str) -> Claim<'a> {
        Claim {
            epoch: self.epoch,
            connected_at_ms: self.connected_at_ms,
            node,
        }
    }
}

/// A connection's place in the takeover order of its client ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim<'a> {
    /// Its takeover epoch, if it has one.
    pub epoch: Option<u64>,
    /// When it connected (Unix milliseconds).
    pub connected_at_ms: u64,
    /// The instance ID of its node.
    pub node: &'a str,
}

/// Whether a connection at `newer` takes over one at `older` (the same client ID in the same
/// application): by epoch when both have one, else by connect time, then by node ID. (Equal
/// epochs happen only if Redis lost writes in a failover; time and node decide then.)
pub fn takes_over(newer: Claim<'_>, older: Claim<'_>) -> bool {
    match (newer.epoch, older.epoch) {
        (Some(n), Some(o)) if n != o => n > o,
        _ => (newer.connected_at_ms, newer.node) > (older.connected_at_ms, older.node),
    }
}

type ClientKey = (AppRef, String);

/// Logins of one client ID between their epoch claim and their registration.
#[derive(Default)]
struct Claiming {
    logins: usize,
    /// The greatest epoch other nodes announced for the client ID meanwhile.
    announced: Option<u64>,
}

#[derive(Default)]
struct State {
    live: HashMap<ClientKey, Arc<Connection>>,
    claiming: HashMap<ClientKey, Claiming>,
}

/// Live connections of this node.
pub struct Registry {
    state: Mutex<State>,
    next_id: AtomicU64,
    revocations: Arc<Revocations>,
}

/// Ends a claim if the login is dropped while waiting for its epoch.
struct ClaimGuard<'a> {
    registry: &'a Registry,
    key: Option<ClientKey>,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            Registry::end_claim(&mut self.registry.state.lock(), &key);
        }
    }
}

impl Registry {
    /// An empty registry that checks registering connections against `revocations` (the
    /// node's, from [`crate::auth::Authenticator::revocations`]).
    pub fn new(revocations: Arc<Revocations>) -> Self {
        Self {
            state: Mutex::default(),
            next_id: AtomicU64::new(0),
            revocations,
        }
    }

    /// A fresh connection ID.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Claims a takeover epoch for a login of `client_id` in `app`; `None` (logged) when
    /// `epochs` fails. The claim stays open until a connection with this application and
    /// client ID is [registered](Registry::register), which every successful claim must be
    /// followed by.
    pub async fn claim_epoch(
        &self,
        epochs: &dyn ClientEpochs,
        app: &AppRef,
        client_id: &str,
    ) -> Option<u64> {
        let key = (app.clone(), client_id.to_owned());
        self.state
            .lock()
            .claiming
            .entry(key.clone())
            .or_default()
            .logins += 1;
        let mut guard = ClaimGuard {
            registry: self,
            key: Some(key),
        };
        let epoch = epochs.next(app, client_id).await;
        // From here the claim ends when the connection registers.
        guard.key = None;
        match epoch {
            Ok(epoch) => Some(epoch),
            Err(e) => {
                // Debug: during an outage every login gets here, and /readyz already says
                // that Redis is down.
                tracing::debug!(error = %e, "no takeover epoch: this connection is ordered by its connect time");
                None
            }
        }
    }

    fn end_claim(state: &mut State, key: &ClientKey) -> Option<u64> {
        let claiming = state.claiming.get_mut(key)?;
        claiming.logins = claiming.logins.saturating_sub(1);
        let announced = claiming.announced;
        if claiming.logins == 0 {
            state.claiming.remove(key);
        }
        announced
    }

    /// Registers a connection (ending its epoch claim); an older one with the same client
    /// ID in the same application is told to close (takeover) and returned. The connection
    /// itself is told to close at once, and not registered, when it lost the takeover
    /// already (another node announced a greater epoch during its login, or a connection
    /// of this node with a greater epoch registered first) or when its key was revoked
    /// since its login began.
    pub fn register(&self, conn: Arc<Connection>) -> Option<Arc<Connection>> {
        let key = (conn.app.clone(), conn.client_id.clone());
        let mut state = self.state.lock();
        let announced = Self::end_claim(&mut state, &key);
        // Under the registry lock: a revocation recorded after this check closes the
        // connection through `close_by_key`, which waits for the lock.
        if self.revocations.standing(&conn.key_id, conn.ticket) != Standing::Current {
            conn.outbox.close(CloseReason::KeyRevoked);
            return None;
        }
        if conn
            .epoch
            .zip(announced)
            .is_some_and(|(own, seen)| seen > own)
        {
            conn.outbox.close(CloseReason::Takeover);
            return None;
        }
        if let Some(live) = state.live.get(&key) {
            // On one node the newest registration wins unless epochs say otherwise.
            if matches!((conn.epoch, live.epoch), (Some(new), Some(old)) if new < old) {
                conn.outbox.close(CloseReason::Takeover);
                return None;
            }
        }
        let old = state.live.insert(key, conn);
        if let Some(old) = &old {
            old.outbox.close(CloseReason::Takeover);
        }
        old
    }

    /// Removes a connection, unless a takeover already replaced it.
    pub fn unregister(&self, conn: &Connection) {
        let key = (conn.app.clone(), conn.client_id.clone());
        let mut state = self.state.lock();
        if state.live.get(&key).is_some_and(|c| c.id == conn.id) {
            state.live.remove(&key);
        }
    }

    /// A connection of `client_id` at `claim` was announced by another node; this node
    /// is `node`. Closes this node's connection with that client ID if the announced one
    /// takes it over, and remembers the epoch for logins of the client ID that are still
    /// under way. Returns whether a connection was closed.
    pub fn announced(&self, app: &AppRef, client_id: &str, claim: Claim<'_>, node: &str) -> bool {
        let key = (app.clone(), client_id.to_owned());
        let mut state = self.state.lock();
        if let (Some(claiming), Some(epoch)) = (state.claiming.get_mut(&key), claim.epoch) {
            claiming.announced = claiming.announced.max(Some(epoch));
        }
        match state.live.get(&key) {
            Some(c) if takes_over(claim, c.claim(node)) => {
                c.outbox.close(CloseReason::Takeover);
                true
            }
            _ => false,
        }
    }

    /// Closes every connection that authenticated with `key_id`; returns how many.
    pub fn close_by_key(&self, key_id: &str, reason: CloseReason) -> usize {
        let state = self.state.lock();
        let mut n = 0;
        for c in state.live.values().filter(|c| c.key_id == key_id) {
            c.outbox.close(reason);
            n += 1;
        }
        n
    }

    /// Every live connection (for drain).
    pub fn all(&self) -> Vec<Arc<Connection>> {
        self.state.lock().live.values().cloned().collect()
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.state.lock().live.len()
    }

    /// Whether no connection is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of logins between their epoch claim and their registration.
    pub fn claiming(&self) -> usize {
        self.state.lock().claiming.values().map(|c| c.logins).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::MemoryEpochs;
    use crate::topic::Id;
    use prometheus_client::metrics::counter::Counter;
    use std::time::Duration;

    fn app() -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap())
    }

    fn registry() -> Registry {
        Registry::new(Arc::new(Revocations::new(
            Duration::from_secs(60),
            100,
            Counter::default(),
        )))
    }

    fn conn(r: &Registry, epoch: Option<u64>, at_ms: u64, key_id: &str) -> Arc<Connection> {
        Arc::new(Connection {
            id: r.next_id(),
            app: app(),
            client_id: "client-1".into(),
            key_id: key_id.into(),
            outbox: Arc::new(Outbox::new(1024)),
            epoch,
            connected_at_ms: at_ms,
            ticket: r.revocations.ticket(),
        })
    }

    fn closed(c: &Connection) -> Option<CloseReason> {
        c.outbox.take(&mut Vec::new())
    }

    fn claim(epoch: Option<u64>, at_ms: u64, node: &str) -> Claim<'_> {
        Claim {
            epoch,
            connected_at_ms: at_ms,
            node,
        }
    }

    #[test]
    fn epochs_decide_whatever_the_clocks_say_and_time_decides_without_them() {
        // A greater epoch wins even with an earlier (skewed) clock, on either node.
        assert!(takes_over(
            claim(Some(8), 1_000, "a"),
            claim(Some(7), 5_000, "b")
        ));
        assert!(!takes_over(
            claim(Some(7), 5_000, "b"),
            claim(Some(8), 1_000, "a")
        ));
        // Without an epoch on either side: connect time, then node ID; never both ways.
        for (x, y) in [
            (claim(None, 1_001, "a"), claim(Some(9), 1_000, "b")),
            (claim(Some(1), 1_000, "b"), claim(None, 1_000, "a")),
            (claim(Some(5), 1_000, "b"), claim(Some(5), 1_000, "a")),
        ] {
            assert!(takes_over(x, y), "{x:?} over {y:?}");
            assert!(!takes_over(y, x), "{y:?} over {x:?}");
        }
        let same = claim(Some(5), 1_000, "a");
        assert!(!takes_over(same, same));
    }

    /// The interleaving that left both sessions open with wall-clock ordering: the other
    /// node's signal arrives while this node's login is between its claim and its
    /// registration.
    #[tokio::test]
    async fn a_greater_epoch_announced_during_a_login_closes_it_as_it_registers() {
        let r = registry();
        let epochs = MemoryEpochs::new();
        let mine = r.claim_epoch(&epochs, &app(), "client-1").await;
        assert_eq!(r.claiming(), 1);
        let theirs = epochs.next(&app(), "client-1").await.unwrap();
        assert!(!r.announced(&app(), "client-1", claim(Some(theirs), 1_000, "b"), "a"));
        let c = conn(&r, mine, 1_000, "KEY");
        assert!(r.register(c.clone()).is_none());
        assert_eq!(closed(&c), Some(CloseReason::Takeover));
        assert!(r.is_empty(), "the loser is not registered");
        assert_eq!(r.claiming(), 0);
    }

    #[tokio::test]
    async fn a_smaller_epoch_announced_during_a_login_leaves_it_open() {
        let r = registry();
        let epochs = MemoryEpochs::new();
        let theirs = epochs.next(&app(), "client-1").await.unwrap();
        let mine = r.claim_epoch(&epochs, &app(), "client-1").await;
        r.announced(&app(), "client-1", claim(Some(theirs), 2_000, "b"), "a");
        let c = conn(&r, mine, 1_000, "KEY");
        r.register(c.clone());
        assert_eq!(closed(&c), None);
        assert_eq!(r.len(), 1);
        // And the announced connection's node closes its own when it hears of this one.
        assert!(takes_over(c.claim("a"), claim(Some(theirs), 2_000, "b")));
    }

    #[test]
    fn on_one_node_the_greater_epoch_survives_whichever_registers_first() {
        let r = registry();
        let newer = conn(&r, Some(6), 1_000, "KEY");
        let older = conn(&r, Some(5), 1_000, "KEY");
        r.register(newer.clone());
        assert!(r.register(older.clone()).is_none());
        assert_eq!(closed(&older), Some(CloseReason::Takeover));
        assert_eq!(closed(&newer), None);
        // In the usual order the older one is taken over.
        let newest = conn(&r, Some(7), 1_000, "KEY");
        assert_eq!(r.register(newest.clone()).map(|c| c.id), Some(newer.id));
        assert_eq!(closed(&newer), Some(CloseReason::Takeover));
        // Without epochs, the newest registration wins.
        let plain = conn(&r, None, 0, "KEY");
        assert_eq!(r.register(plain.clone()).map(|c| c.id), Some(newest.id));
        assert_eq!(closed(&plain), None);
    }

    #[test]
    fn announcements_close_the_local_connection_they_take_over() {
        let r = registry();
        let c = conn(&r, Some(5), 1_000, "KEY");
        r.register(c.clone());
        assert!(!r.announced(&app(), "client-1", claim(Some(4), 9_000, "b"), "a"));
        assert!(!r.announced(&app(), "other", claim(Some(9), 0, "b"), "a"));
        assert_eq!(closed(&c), None);
        assert!(r.announced(&app(), "client-1", claim(Some(6), 0, "b"), "a"));
        assert_eq!(closed(&c), Some(CloseReason::Takeover));
    }

    #[test]
    fn a_key_revoked_between_login_and_registration_closes_the_connection_at_once() {
        let r = registry();
        let legit = conn(&r, Some(1), 1_000, "GOOD");
        r.register(legit.clone());
        let c = conn(&r, Some(2), 1_000, "KEY");
        r.revocations.record("KEY");
        assert!(r.register(c.clone()).is_none());
        assert_eq!(closed(&c), Some(CloseReason::KeyRevoked));
        assert_eq!(closed(&legit), None, "a revoked login takes nobody over");
        assert_eq!(r.len(), 1);
        // A login that began after the revocation is not affected by it.
        let later = conn(&r, Some(3), 1_000, "KEY");
        r.register(later.clone());
        assert_eq!(closed(&later), None);
    }

    #[tokio::test]
    async fn a_login_dropped_while_claiming_ends_its_claim() {
        struct Never;
        #[async_trait::async_trait]
        impl ClientEpochs for Never {
            async fn next(&self, _: &AppRef, _: &str) -> Result<u64, crate::auth::StoreError> {
                std::future::pending().await
            }
        }
        let r = registry();
        let app1 = app();
        let login = r.claim_epoch(&Never, &app1, "client-1");
        assert!(tokio::time::timeout(Duration::from_millis(10), login)
            .await
            .is_err());
        assert_eq!(r.claiming(), 0);
    }
}
