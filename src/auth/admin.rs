//! Key management shared by the `keys` command and the admin HTTP API: creation (the
//! secret is returned once and never stored; the lifetime is at most
//! [`MAX_KEY_LIFETIME`]) and the public view of a key record. Revocation needs the bus and
//! lives in [`crate::cluster::revoke_key`].

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::key::{generate, GeneratedKey};
use super::rights::Rights;
use super::store::{unix_now, KeyStore, StoreError, StoredKey, LATEST_EXPIRY, MAX_KEY_LIFETIME};
use crate::topic::AppRef;

/// Why a key could not be created.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CreateKeyError {
    /// The requested lifetime is longer than [`MAX_KEY_LIFETIME`]. Each surface names its
    /// own field (`expires_in`, `--expires`) in front of this message.
    #[error(
        "a key lives at most 100 years (100y); {} is longer",
        humantime::format_duration(*.0)
    )]
    LifetimeTooLong(Duration),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Creates and stores a key that expires `expires_in` from now (at least a second, at most
/// [`MAX_KEY_LIFETIME`]) or never; the returned [`GeneratedKey::key`] is the only copy of
/// it. Nothing is stored when the lifetime is refused.
pub async fn create_key(
    store: &dyn KeyStore,
    app: &AppRef,
    rights: Rights,
    name: &str,
    expires_in: Option<Duration>,
) -> Result<(GeneratedKey, StoredKey), CreateKeyError> {
    let expires_at = expires_in.map(expiry_after).transpose()?;
    let generated = generate();
    let record = StoredKey::new(&generated, app, rights, name, expires_at);
    store.insert(&record).await?;
    Ok((generated, record))
}

/// The expiry (Unix seconds) of a key created now with `lifetime`.
fn expiry_after(lifetime: Duration) -> Result<u64, CreateKeyError> {
    if lifetime > MAX_KEY_LIFETIME {
        return Err(CreateKeyError::LifetimeTooLong(lifetime));
    }
    // At most now + 100 years: far from overflowing, and below LATEST_EXPIRY until 9899.
    Ok(unix_now()
        .saturating_add(lifetime.as_secs().max(1))
        .min(LATEST_EXPIRY))
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

/// RFC 3339 for Unix seconds, clamped to [`LATEST_EXPIRY`] (the last second RFC 3339 can
/// write; only a corrupt record holds a later time).
fn rfc3339(unix: u64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs(unix.min(LATEST_EXPIRY));
    humantime::format_rfc3339_seconds(time).to_string()
}

impl From<&StoredKey> for KeyView {
    /// An expiry after [`LATEST_EXPIRY`] is shown as none: such a key never expires.
    fn from(k: &StoredKey) -> Self {
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            tenant: k.tenant.to_string(),
            application: k.application.to_string(),
            rights: k.rights.names(),
            created_at: rfc3339(k.created_at),
            expires_at: k.expiry().map(rfc3339),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::MemoryKeyStore;
    use crate::topic::Id;

    fn app() -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap())
    }

    #[tokio::test]
    async fn lifetimes_up_to_100_years_are_kept_and_longer_ones_refused_storing_nothing() {
        let store = MemoryKeyStore::new();
        let now = unix_now();
        let (_, k) = create_key(&store, &app(), Rights::DEFAULT, "", Some(MAX_KEY_LIFETIME))
            .await
            .unwrap();
        let expires_at = k.expires_at.unwrap();
        assert!(
            (now + MAX_KEY_LIFETIME.as_secs()..now + MAX_KEY_LIFETIME.as_secs() + 5)
                .contains(&expires_at)
        );
        let (_, k) = create_key(&store, &app(), Rights::DEFAULT, "", Some(Duration::ZERO))
            .await
            .unwrap();
        assert!(k.expires_at.unwrap() > now, "at least a second");

        for too_long in ["100y 1s", "101y", "10000y"] {
            let d = humantime::parse_duration(too_long).unwrap();
            let Err(e) = create_key(&store, &app(), Rights::DEFAULT, "", Some(d)).await else {
                panic!("{too_long} accepted");
            };
            assert!(matches!(e, CreateKeyError::LifetimeTooLong(_)), "{e}");
            assert!(e.to_string().contains("100 years"), "{e}");
        }
        let Err(e) = create_key(&store, &app(), Rights::DEFAULT, "", Some(Duration::MAX)).await
        else {
            panic!("Duration::MAX accepted");
        };
        assert!(matches!(e, CreateKeyError::LifetimeTooLong(_)), "{e}");
        assert_eq!(store.list(&app()).await.unwrap().len(), 2);
    }

    #[test]
    fn any_stored_time_can_be_shown() {
        let mut k = StoredKey::new(&generate(), &app(), Rights::DEFAULT, "k", Some(u64::MAX));
        k.created_at = u64::MAX;
        let view = KeyView::from(&k);
        assert_eq!(view.expires_at, None, "never expires");
        assert_eq!(view.created_at, "9999-12-31T23:59:59Z");
        k.expires_at = Some(LATEST_EXPIRY);
        k.created_at = 0;
        let view = KeyView::from(&k);
        assert_eq!(view.expires_at.as_deref(), Some("9999-12-31T23:59:59Z"));
        assert_eq!(view.created_at, "1970-01-01T00:00:00Z");
    }
}
