//! Redis [`super::KeyStore`] (placeholder until the cluster backends land).

/// Redis-backed key store.
pub struct RedisKeyStore;
