//! The [`Authenticator`]: verifies a presented key against the [`KeyStore`] through a moka
//! cache (DESIGN §3).
//!
//! Found keys are cached for `ttl`, unknown IDs for `negative_ttl`, so a reconnect storm of
//! bad credentials does not reach the store. Concurrent misses of one ID make one store
//! call (moka's `try_get_with` coalesces them). Store errors are never cached. A wrong
//! secret for a known ID is decided from the cached record without a store call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;

use super::key::PresentedKey;
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

/// Cache sizing and lifetimes.
#[derive(Clone, Debug)]
pub struct CacheSettings {
    /// Lifetime of a found key.
    pub ttl: Duration,
    /// Lifetime of an unknown ID.
    pub negative_ttl: Duration,
    /// Most entries held.
    pub capacity: u64,
}

#[derive(Clone)]
enum Lookup {
    Found(Arc<StoredKey>),
    Missing,
}

struct LookupExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<String, Lookup> for LookupExpiry {
    fn expire_after_create(&self, _: &String, value: &Lookup, _: Instant) -> Option<Duration> {
        Some(match value {
            Lookup::Found(_) => self.ttl,
            Lookup::Missing => self.negative_ttl,
        })
    }
}

/// Verifies API keys with a cache in front of the store.
pub struct Authenticator {
    store: Arc<dyn KeyStore>,
    cache: Cache<String, Lookup>,
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
        Self { store, cache }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Authenticates `password` for `app`, returning the key record on success.
    pub async fn authenticate(
        &self,
        app: &AppRef,
        password: &str,
    ) -> Result<Arc<StoredKey>, AuthError> {
        let presented = PresentedKey::parse(password).map_err(|_| AuthError::MalformedKey)?;
        let store = self.store.clone();
        let id = presented.id.clone();
        let lookup = self
            .cache
            .try_get_with(presented.id.clone(), async move {
                Ok::<_, StoreError>(match store.get(&id).await? {
                    Some(k) => Lookup::Found(Arc::new(k)),
                    None => Lookup::Missing,
                })
            })
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let key = match lookup {
            Lookup::Found(k) => k,
            Lookup::Missing => return Err(AuthError::UnknownKey(presented.id)),
        };
        if !presented.verify(&key.secret_hash) {
            return Err(AuthError::WrongSecret(presented.id));
        }
        if key.is_expired(unix_now()) {
            return Err(AuthError::Expired(presented.id));
        }
        if key.tenant != app.tenant || key.application != app.app {
            return Err(AuthError::WrongApplication {
                key: presented.id,
                requested: app.to_string(),
            });
        }
        if !key.rights.has_traffic_right() {
            return Err(AuthError::NoTrafficRights(presented.id));
        }
        Ok(key)
    }

    /// Forgets a key ID (after revocation), so the next use asks the store.
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
}
