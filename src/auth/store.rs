//! The [`KeyStore`] trait: where API key records live, and the in-memory implementation
//! used by the embedded node. The Redis implementation is in [`super::redis`].

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::key::GeneratedKey;
use super::rights::Rights;
use crate::topic::{AppRef, Id};

/// The longest lifetime a key may be created with (DESIGN §3): 100 years of 365.25 days,
/// as `humantime` counts them (`"100y"` is allowed).
pub const MAX_KEY_LIFETIME: Duration = Duration::from_secs(100 * 31_557_600);

/// The last second an expiry can name: 9999-12-31T23:59:59Z, the last one RFC 3339 (hence
/// `keys list` and the admin API) can write. Only a corrupt or hand-written record expires
/// later (creation allows [`MAX_KEY_LIFETIME`]); such an expiry is treated as never, so
/// that no stored value can make a time computation overflow.
pub const LATEST_EXPIRY: u64 = 253_402_300_799;

/// What is stored of an API key: never the secret, only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// The key ID (middle part of the key).
    pub id: String,
    /// The tenant the key belongs to.
    pub tenant: Id,
    /// The application the key belongs to.
    pub application: Id,
    /// Granted rights.
    pub rights: Rights,
    /// A human-readable name.
    #[serde(default)]
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Expiry, seconds since the Unix epoch; `None` never expires. Read it through
    /// [`StoredKey::expiry`], which bounds it.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// SHA-256 of the secret, lowercase hex.
    #[serde(with = "hex_hash")]
    pub secret_hash: [u8; 32],
}

impl StoredKey {
    /// The record for a freshly generated key.
    pub fn new(
        generated: &GeneratedKey,
        app: &AppRef,
        rights: Rights,
        name: impl Into<String>,
        expires_at: Option<u64>,
    ) -> Self {
        Self {
            id: generated.id.clone(),
            tenant: app.tenant.clone(),
            application: app.app.clone(),
            rights,
            name: name.into(),
            created_at: unix_now(),
            expires_at,
            secret_hash: generated.secret_hash,
        }
    }

    /// The application this key belongs to.
    pub fn app(&self) -> AppRef {
        AppRef::new(self.tenant.clone(), self.application.clone())
    }

    /// When the key expires (Unix seconds, at most [`LATEST_EXPIRY`]); `None` if never,
    /// which includes a stored expiry after [`LATEST_EXPIRY`].
    pub fn expiry(&self) -> Option<u64> {
        self.expires_at.filter(|&e| e <= LATEST_EXPIRY)
    }

    /// Whether the key has expired at `now` (Unix seconds).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expiry().is_some_and(|e| e <= now)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

mod hex_hash {
    use data_encoding::HEXLOWER;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&HEXLOWER.encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        HEXLOWER
            .decode(s.as_bytes())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| D::Error::custom("secret_hash is not 32 bytes of lowercase hex"))
    }
}

/// Why a key store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or did not answer.
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be decoded.
    #[error("key record {id} is corrupt: {reason}")]
    Corrupt {
        /// The key ID.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Where API key records live. Implementations: [`MemoryKeyStore`] and
/// [`super::redis::RedisKeyStore`].
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a new key record.
    async fn insert(&self, key: &StoredKey) -> Result<(), StoreError>;
    /// Looks a key up by ID.
    async fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError>;
    /// Every key of one application, in creation order.
    async fn list(&self, app: &AppRef) -> Result<Vec<StoredKey>, StoreError>;
    /// Deletes a key, returning the record if it existed.
    async fn remove(&self, id: &str) -> Result<Option<StoredKey>, StoreError>;
    /// Checks that the backend answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// In-process key store for the embedded node and tests.
#[derive(Default)]
pub struct MemoryKeyStore {
    keys: RwLock<HashMap<String, StoredKey>>,
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    async fn insert(&self, key: &StoredKey) -> Result<(), StoreError> {
        self.keys.write().insert(key.id.clone(), key.clone());
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        Ok(self.keys.read().get(id).cloned())
    }

    async fn list(&self, app: &AppRef) -> Result<Vec<StoredKey>, StoreError> {
        let mut keys: Vec<StoredKey> = self
            .keys
            .read()
            .values()
            .filter(|k| k.tenant == app.tenant && k.application == app.app)
            .cloned()
            .collect();
        keys.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(keys)
    }

    async fn remove(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        Ok(self.keys.write().remove(id))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::key::generate;
    use crate::topic::Id;

    fn key_expiring(expires_at: Option<u64>) -> StoredKey {
        let app = AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap());
        StoredKey::new(&generate(), &app, Rights::DEFAULT, "k", expires_at)
    }

    #[test]
    fn absurd_expiries_never_expire_and_sane_ones_do() {
        for absurd in [LATEST_EXPIRY + 1, 300_000_000_000 * 31_557_600, u64::MAX] {
            let k = key_expiring(Some(absurd));
            assert_eq!(k.expiry(), None, "{absurd}");
            assert!(!k.is_expired(u64::MAX), "{absurd}");
        }
        let k = key_expiring(Some(LATEST_EXPIRY));
        assert_eq!(k.expiry(), Some(LATEST_EXPIRY));
        assert!(k.is_expired(LATEST_EXPIRY));
        assert!(!k.is_expired(LATEST_EXPIRY - 1));
        assert!(key_expiring(Some(0)).is_expired(0));
        assert_eq!(key_expiring(None).expiry(), None);
    }

    #[test]
    fn the_lifetime_limit_is_the_one_humantime_writes_as_100_years() {
        assert_eq!(humantime::parse_duration("100y").unwrap(), MAX_KEY_LIFETIME);
        assert!(unix_now() + MAX_KEY_LIFETIME.as_secs() < LATEST_EXPIRY);
    }
}
