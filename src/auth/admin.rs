//! Key management shared by the `keys` command and the admin HTTP API: creation (the
//! secret is returned once and never stored) and the public view of a key record.
//! Revocation needs the bus and lives in [`crate::cluster::revoke_key`].

use std::time::Duration;

use serde::Serialize;

use super::key::{generate, GeneratedKey};
use super::rights::Rights;
use super::store::{unix_now, KeyStore, StoreError, StoredKey};
use crate::topic::AppRef;

/// Creates and stores a key; the returned [`GeneratedKey::key`] is the only copy of it.
pub async fn create_key(
    store: &dyn KeyStore,
    app: &AppRef,
    rights: Rights,
    name: &str,
    expires_in: Option<Duration>,
) -> Result<(GeneratedKey, StoredKey), StoreError> {
    let generated = generate();
    let expires_at = expires_in.map(|d| unix_now().saturating_add(d.as_secs().max(1)));
    let record = StoredKey::new(&generated, app, rights, name, expires_at);
    store.insert(&record).await?;
    Ok((generated, record))
}

/// What may be shown of a key: everything but the secret hash.
#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    /// Key ID.
    pub id: String,
    /// Name.
    pub name: String,
    /// Tenant ID.
    pub tenant: String,
    /// Application ID.
    pub application: String,
    /// Rights, by The Things Stack name.
    pub rights: Vec<&'static str>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Expiry (RFC 3339), if any.
    pub expires_at: Option<String>,
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

impl From<&StoredKey> for KeyView {
    fn from(k: &StoredKey) -> Self {
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            tenant: k.tenant.to_string(),
            application: k.application.to_string(),
            rights: k.rights.names(),
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
        }
    }
}
