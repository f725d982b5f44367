//! API keys and rights (DESIGN §3): the key format, hashing, the [`KeyStore`] trait with
//! its in-memory and Redis implementations, the caching [`Authenticator`] and the
//! revocation tombstones that keep it honest, and the per-client-ID takeover epochs
//! ([`ClientEpochs`]), whose Redis implementation shares the key store's connection.

pub mod admin;
pub mod cache;
pub mod epoch;
pub mod key;
pub mod quota_redis;
pub mod redis;
pub mod revocation;
pub mod rights;
pub mod store;

pub use admin::{create_key, CreateKeyError, KeyView};
pub use cache::{AuthError, Authenticator, CacheSettings};
pub use epoch::{ClientEpochs, MemoryEpochs};
pub use key::{generate, GeneratedKey, PresentedKey};
pub use revocation::{Revocations, Standing, Ticket};
pub use rights::Rights;
pub use store::{KeyStore, MemoryKeyStore, StoreError, StoredKey, LATEST_EXPIRY, MAX_KEY_LIFETIME};
