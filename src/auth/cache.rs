//! The [`Authenticator`]: verifies a presented key against the [`KeyStore`] through a moka
//! cache (DESIGN §3).
//!
//! Found keys are cached for `ttl`, unknown IDs for `negative_ttl`, so a reconnect storm of
//! bad credentials does not reach the store. Concurrent misses of one ID make one store
//! call (moka's `try_get_with` coalesces them). Store errors are never cached. A wrong
//! secret for a known ID is decided from the cached record without a store call.
//!
//! A revocation ([`Authenticator::revoke`]) evicts the key and leaves a tombstone in the
//! node's [`Revocations`]; every record carries the [`Ticket`] taken before it was read
//! and is checked against the tombstones when the read returns and again at every use, so
//! that a read which raced the revocation never brings the key back (see
//! [`super::revocation`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;
use prometheus_client::metrics::counter::Counter;

use super::key::PresentedKey;
use super::revocation::{Revocations, Standing, Ticket};
use super::store::{unix_now, KeyStore, StoreError, StoredKey};
use crate::topic::AppRef;

/// Why a connection was not authenticated; mapped to a CONNACK code at the MQTT edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The password is not in the API key format.
    #[error("malformed API key")]
    MalformedKey,
    /// No key with this ID exists (or it was revoked).
    #[error("API key {0} not found")]
    UnknownKey(String),
    /// The key exists but the secret does not match.
    #[error("API key {0}: wrong secret")]
    WrongSecret(String),
    /// The key has expired.
    #[error("API key {0} expired")]
    Expired(String),
    /// The key belongs to another application or tenant.
    #[error("API key {key} belongs to another application than {requested}")]
    WrongApplication {
        /// The key ID.
        key: String,
        /// The application the client asked for.
        requested: String,
    },
    /// The key carries no traffic right.
    #[error("API key {0} has no traffic rights")]
    NoTrafficRights(String),
    /// The store could not be asked.
    #[error("cannot verify API key: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// The error as an application's live events word it, as The Things Stack does where
    /// it has a wording (`api key with id {id} not found`).
    pub fn event_message(&self) -> String {
        match self {
            AuthError::MalformedKey => "password is not an API key".into(),
            AuthError::UnknownKey(id) => format!("api key with id {id} not found"),
            AuthError::WrongSecret(id) => format!("api key with id {id} has a wrong secret"),
            AuthError::Expired(id) => format!("api key with id {id} expired"),
            AuthError::WrongApplication { key, .. } => {
                format!("api key with id {key} is for another application")
            }
            AuthError::NoTrafficRights(id) => format!("api key with id {id} has no traffic rights"),
            AuthError::Unavailable(_) => "api keys cannot be verified now".into(),
        }
    }
}

/// Cache sizing and lifetimes.
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// Lifetime of a found key.
    pub ttl: Duration,
    /// Lifetime of an unknown ID.
    pub negative_ttl: Duration,
    /// Most entries held.
    pub capacity: u64,
    /// Most revocation tombstones held (see [`super::revocation`]).
    pub max_tombstones: usize,
    /// Counts the tombstones dropped over `max_tombstones`.
    pub tombstones_dropped: Counter,
}

impl Default for CacheSettings {
    /// The defaults of `[auth]` in `config/lorabroker.toml`.
    fn default() -> Self {
        let auth = crate::config::AuthConfig::default();
        Self {
            ttl: auth.cache_ttl,
            negative_ttl: auth.negative_cache_ttl,
            capacity: auth.cache_capacity,
            max_tombstones: auth.max_tombstones,
            tombstones_dropped: Counter::default(),
        }
    }
}

/// How long a tombstone outlives the cache TTL: more than the longest store read (each is
/// bounded by the store's own timeout, 1.5 s for Redis), so that every entry a tombstone
/// could concern has expired before the tombstone does.
const TOMBSTONE_MARGIN: Duration = Duration::from_secs(10);

/// How often one login reads a key again after finding a record that may predate a
/// forgotten revocation, before giving up (only under a flood of revocations).
const LOOKUP_ATTEMPTS: usize = 3;

#[derive(Clone)]
enum Lookup {
    /// A record, and the ticket taken before it was read.
    Found(Arc<StoredKey>, Ticket),
    Missing,
}

struct LookupExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<String, Lookup> for LookupExpiry {
    fn expire_after_create(&self, _: &String, value: &Lookup, _: Instant) -> Option<Duration> {
        Some(match value {
            Lookup::Found(..) => self.ttl,
            Lookup::Missing => self.negative_ttl,
        })
    }
}

/// Verifies API keys with a cache in front of the store.
pub struct Authenticator {
    store: Arc<dyn KeyStore>,
    cache: Cache<String, Lookup>,
    revocations: Arc<Revocations>,
}

impl Authenticator {
    /// Builds an authenticator over `store`.
    pub fn new(store: Arc<dyn KeyStore>, settings: &CacheSettings) -> Self {
        let cache = Cache::builder()
            .max_capacity(settings.capacity)
            .expire_after(LookupExpiry {
                ttl: settings.ttl,
                negative_ttl: settings.negative_ttl,
            })
            .build();
        let revocations = Arc::new(Revocations::new(
            settings.ttl.saturating_add(TOMBSTONE_MARGIN),
            settings.max_tombstones,
            settings.tombstones_dropped.clone(),
        ));
        Self {
            store,
            cache,
            revocations,
        }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// This node's recent revocations (the registry checks connections against them).
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// The ticket a login takes before it begins: a revocation of its key recorded after
    /// it closes the connection as it registers.
    pub fn ticket(&self) -> Ticket {
        self.revocations.ticket()
    }

    /// Authenticates `password` for `app`, returning the key record on success.
    pub async fn authenticate(
        &self,
        app: &AppRef,
        password: &str,
    ) -> Result<Arc<StoredKey>, AuthError> {
        let key = self.verify(password).await?;
        if key.tenant != app.tenant || key.application != app.app {
            return Err(AuthError::WrongApplication {
                key: key.id.clone(),
                requested: app.to_string(),
            });
        }
        if !key.rights.has_traffic_right() {
            return Err(AuthError::NoTrafficRights(key.id.clone()));
        }
        Ok(key)
    }

    /// Verifies `password` as an API key, whatever its application and rights (the HTTP
    /// API checks those itself): well-formed, known, the right secret, not expired.
    pub async fn verify(&self, password: &str) -> Result<Arc<StoredKey>, AuthError> {
        let presented = PresentedKey::parse(password).map_err(|_| AuthError::MalformedKey)?;
        let key = self.lookup(&presented.id).await?;
        if !presented.verify(&key.secret_hash) {
            return Err(AuthError::WrongSecret(presented.id));
        }
        if key.is_expired(unix_now()) {
            return Err(AuthError::Expired(presented.id));
        }
        Ok(key)
    }

    /// The record of `id`, from the cache or the store, never one that may have been read
    /// before a revocation of `id` that this node has heard of.
    async fn lookup(&self, id: &str) -> Result<Arc<StoredKey>, AuthError> {
        for _ in 0..LOOKUP_ATTEMPTS {
            let store = self.store.clone();
            let revocations = self.revocations.clone();
            let key_id = id.to_owned();
            let lookup = self
                .cache
                .try_get_with(id.to_owned(), async move {
                    let ticket = revocations.ticket();
                    let record = store.get(&key_id).await?;
                    Ok::<_, StoreError>(match record {
                        // Revoked while the read was under way: the record predates the
                        // revocation. Remembered as unknown, which it now is.
                        Some(_) if revocations.standing(&key_id, ticket) == Standing::Revoked => {
                            Lookup::Missing
                        }
                        Some(k) => Lookup::Found(Arc::new(k), ticket),
                        None => Lookup::Missing,
                    })
                })
                .await
                .map_err(|e| AuthError::Unavailable(e.to_string()))?;
            let (key, ticket) = match lookup {
                Lookup::Found(k, ticket) => (k, ticket),
                Lookup::Missing => return Err(AuthError::UnknownKey(id.to_owned())),
            };
            // The check above ran before moka stored the record; a revocation handled in
            // between evicted nothing, so the entry is checked at every use as well.
            match self.revocations.standing(id, ticket) {
                Standing::Current => return Ok(key),
                Standing::Revoked => {
                    self.cache.invalidate(id).await;
                    return Err(AuthError::UnknownKey(id.to_owned()));
                }
                Standing::Forgotten => self.cache.invalidate(id).await,
            }
        }
        Err(AuthError::Unavailable(format!(
            "API key {id}: revocations kept arriving while it was read"
        )))
    }

    /// Acts on the revocation of `key_id`: leaves a tombstone (before anything else, so
    /// that a read under way cannot cache the record afterwards) and evicts the key.
    pub async fn revoke(&self, key_id: &str) {
        self.revocations.record(key_id);
        self.cache.invalidate(key_id).await;
    }

    /// Forgets a key ID, so the next use asks the store.
    pub async fn evict(&self, key_id: &str) {
        self.cache.invalidate(key_id).await;
    }

    /// Forgets every key, so that each next use asks the store (after this node may have
    /// missed revocations).
    pub fn evict_all(&self) {
        self.cache.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::key::generate;
    use crate::auth::rights::Rights;
    use crate::auth::store::MemoryKeyStore;
    use crate::topic::Id;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the lookups that reach the real in-memory store.
    struct Counting {
        inner: MemoryKeyStore,
        gets: AtomicUsize,
    }

    #[async_trait]
    impl KeyStore for Counting {
        async fn insert(&self, key: &StoredKey) -> Result<(), StoreError> {
            self.inner.insert(key).await
        }
        async fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.inner.get(id).await
        }
        async fn list(&self, app: &AppRef) -> Result<Vec<StoredKey>, StoreError> {
            self.inner.list(app).await
        }
        async fn remove(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
            self.inner.remove(id).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    fn app(a: &str) -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse(a).unwrap())
    }

    fn setup() -> (Arc<Counting>, Authenticator) {
        let store = Arc::new(Counting {
            inner: MemoryKeyStore::new(),
            gets: AtomicUsize::new(0),
        });
        let auth = Authenticator::new(
            store.clone(),
            &CacheSettings {
                ttl: Duration::from_secs(60),
                negative_ttl: Duration::from_secs(5),
                capacity: 100,
                ..CacheSettings::default()
            },
        );
        (store, auth)
    }

    #[tokio::test]
    async fn verifies_and_caches() {
        let (store, auth) = setup();
        let g = generate();
        store
            .insert(&StoredKey::new(
                &g,
                &app("app1"),
                Rights::DEFAULT,
                "k",
                None,
            ))
            .await
            .unwrap();
        let k = auth.authenticate(&app("app1"), &g.key).await.unwrap();
        assert_eq!(k.id, g.id);
        auth.authenticate(&app("app1"), &g.key).await.unwrap();
        assert_eq!(
            store.gets.load(Ordering::SeqCst),
            1,
            "second use is a cache hit"
        );

        // Change one character in the middle of the secret (the last one carries padding
        // bits that base32 decoding checks).
        let at = g.key.len() - 10;
        let swapped = if &g.key[at..=at] == "A" { "B" } else { "A" };
        let wrong = format!("{}{swapped}{}", &g.key[..at], &g.key[at + 1..]);
        assert_eq!(
            auth.authenticate(&app("app1"), &wrong).await,
            Err(AuthError::WrongSecret(g.id.clone()))
        );
        assert!(matches!(
            auth.authenticate(&app("app2"), &g.key).await,
            Err(AuthError::WrongApplication { .. })
        ));
        assert_eq!(
            store.gets.load(Ordering::SeqCst),
            1,
            "decided from the cache"
        );
        assert_eq!(
            auth.authenticate(&app("app1"), "NNSXS.nope").await,
            Err(AuthError::MalformedKey)
        );
    }

    #[tokio::test]
    async fn unknown_keys_are_cached_negatively_and_misses_coalesce() {
        let (store, auth) = setup();
        let g = generate();
        let auth = Arc::new(auth);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let auth = auth.clone();
                let key = g.key.clone();
                tokio::spawn(async move { auth.authenticate(&app("app1"), &key).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), Err(AuthError::UnknownKey(g.id.clone())));
        }
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        // Stored now, but the negative entry still answers until evicted.
        store
            .insert(&StoredKey::new(
                &g,
                &app("app1"),
                Rights::DEFAULT,
                "k",
                None,
            ))
            .await
            .unwrap();
        assert!(auth.authenticate(&app("app1"), &g.key).await.is_err());
        auth.evict(&g.id).await;
        assert!(auth.authenticate(&app("app1"), &g.key).await.is_ok());
    }

    #[tokio::test]
    async fn expired_and_rightless_keys() {
        let (store, auth) = setup();
        let g = generate();
        store
            .insert(&StoredKey::new(
                &g,
                &app("app1"),
                Rights::DEFAULT,
                "k",
                Some(1),
            ))
            .await
            .unwrap();
        assert_eq!(
            auth.authenticate(&app("app1"), &g.key).await,
            Err(AuthError::Expired(g.id.clone()))
        );
        let g2 = generate();
        store
            .insert(&StoredKey::new(&g2, &app("app1"), Rights::NONE, "k", None))
            .await
            .unwrap();
        assert_eq!(
            auth.authenticate(&app("app1"), &g2.key).await,
            Err(AuthError::NoTrafficRights(g2.id.clone()))
        );
    }

    /// A store whose reads wait until the test lets them return: a slow store, frozen.
    struct Gated {
        inner: MemoryKeyStore,
        started: tokio::sync::Notify,
        release: tokio::sync::Semaphore,
    }

    #[async_trait]
    impl KeyStore for Gated {
        async fn insert(&self, key: &StoredKey) -> Result<(), StoreError> {
            self.inner.insert(key).await
        }
        async fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
            // Read first, as Redis does before its reply travels back.
            let record = self.inner.get(id).await;
            self.started.notify_one();
            self.release.acquire().await.expect("open").forget();
            record
        }
        async fn list(&self, app: &AppRef) -> Result<Vec<StoredKey>, StoreError> {
            self.inner.list(app).await
        }
        async fn remove(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
            self.inner.remove(id).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    async fn gated_with_key() -> (Arc<Gated>, Arc<Authenticator>, crate::auth::GeneratedKey) {
        let store = Arc::new(Gated {
            inner: MemoryKeyStore::new(),
            started: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        });
        let g = generate();
        store
            .insert(&StoredKey::new(
                &g,
                &app("app1"),
                Rights::DEFAULT,
                "k",
                None,
            ))
            .await
            .unwrap();
        let auth = Arc::new(Authenticator::new(store.clone(), &CacheSettings::default()));
        (store, auth, g)
    }

    #[tokio::test]
    async fn a_revocation_during_a_store_read_is_not_undone_by_the_read() {
        let (store, auth, g) = gated_with_key().await;
        let login = tokio::spawn({
            let (auth, key) = (auth.clone(), g.key.clone());
            async move { auth.authenticate(&app("app1"), &key).await }
        });
        store.started.notified().await;
        // The read holds the record; now the key is deleted and the signal handled.
        store.remove(&g.id).await.unwrap();
        auth.revoke(&g.id).await;
        store.release.add_permits(1);
        assert_eq!(
            login.await.unwrap(),
            Err(AuthError::UnknownKey(g.id.clone()))
        );
        // Nothing was cached but the refusal: the next login is refused without a store
        // read (which would wait for a permit forever).
        let app1 = app("app1");
        let again = tokio::time::timeout(Duration::from_secs(5), auth.authenticate(&app1, &g.key));
        assert_eq!(
            again.await.expect("decided from the cache"),
            Err(AuthError::UnknownKey(g.id.clone()))
        );
    }

    #[tokio::test]
    async fn a_cached_record_read_before_a_revocation_is_never_used() {
        let (store, auth, g) = gated_with_key().await;
        let before = auth.ticket();
        let record = store.inner.get(&g.id).await.unwrap().unwrap();
        auth.revoke(&g.id).await;
        // What moka does when the tombstone arrives between a read's own check and the
        // insert: the stale record lands in the cache after the eviction.
        auth.cache
            .insert(g.id.clone(), Lookup::Found(Arc::new(record), before))
            .await;
        assert_eq!(
            auth.authenticate(&app("app1"), &g.key).await,
            Err(AuthError::UnknownKey(g.id.clone()))
        );
        assert!(
            auth.cache.get(&g.id).await.is_none(),
            "the stale entry is gone"
        );
    }

    #[tokio::test]
    async fn a_record_older_than_a_forgotten_revocation_is_read_again() {
        let store = Arc::new(MemoryKeyStore::new());
        let g = generate();
        store
            .insert(&StoredKey::new(
                &g,
                &app("app1"),
                Rights::DEFAULT,
                "k",
                None,
            ))
            .await
            .unwrap();
        let dropped = Counter::default();
        let auth = Authenticator::new(
            store.clone(),
            &CacheSettings {
                max_tombstones: 1,
                tombstones_dropped: dropped.clone(),
                ..CacheSettings::default()
            },
        );
        let stale = auth.ticket();
        let record = store.get(&g.id).await.unwrap().unwrap();
        auth.cache
            .insert(g.id.clone(), Lookup::Found(Arc::new(record), stale))
            .await;
        // Two revocations of other keys: the first one's tombstone is dropped, so the
        // cached record might predate a revocation of its own key that was forgotten.
        auth.revoke("OTHER1").await;
        auth.revoke("OTHER2").await;
        assert_eq!(dropped.get(), 1);
        let key = auth.authenticate(&app("app1"), &g.key).await.unwrap();
        assert_eq!(key.id, g.id);
        match auth.cache.get(&g.id).await {
            Some(Lookup::Found(_, ticket)) => assert!(ticket > stale, "read again"),
            _ => panic!("the key is cached again"),
        }
    }
}
