//! The API key format of The Things Stack, `NNSXS.<ID>.<SECRET>`, and how secrets are
//! hashed and verified (DESIGN §3).
//!
//! `NNSXS` is the unpadded base32 of "key"; `<ID>` is 24 random bytes (39 characters) and
//! `<SECRET>` 32 random bytes (52 characters), both unpadded RFC 4648 base32. Only the
//! SHA-256 of the secret is ever stored: a 256-bit random secret needs no slow KDF, and a
//! fast hash keeps a connect storm cheap. Comparison is constant-time.

use data_encoding::BASE32_NOPAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The fixed first part of every key: unpadded base32 of "key".
pub const KEY_PREFIX: &str = "NNSXS";
/// Length of the encoded ID (24 bytes).
pub const ID_LEN: usize = 39;
/// Length of the encoded secret (32 bytes).
pub const SECRET_LEN: usize = 52;

/// A key as presented by a client: an ID to look up and a secret to verify.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedKey {
    /// The key ID (the middle part), safe to log and to use as a store key.
    pub id: String,
    secret: String,
}

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresentedKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a presented password is not an API key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed API key: expected NNSXS.<39 base32 characters>.<52 base32 characters>")]
pub struct MalformedKey;

impl PresentedKey {
    /// Parses `NNSXS.<ID>.<SECRET>`; anything else is [`MalformedKey`].
    pub fn parse(s: &str) -> Result<Self, MalformedKey> {
        let mut parts = s.split('.');
        let (Some(KEY_PREFIX), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(MalformedKey);
        };
        if id.len() != ID_LEN || secret.len() != SECRET_LEN {
            return Err(MalformedKey);
        }
        if BASE32_NOPAD.decode(id.as_bytes()).is_err()
            || BASE32_NOPAD.decode(secret.as_bytes()).is_err()
        {
            return Err(MalformedKey);
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// SHA-256 of the secret, for storing a key whose full text is already known (the
    /// `--api-key` of `lorabroker dev`).
    pub fn secret_hash(&self) -> [u8; 32] {
        hash_secret(&self.secret)
    }

    /// Whether this key's secret hashes to `stored_hash`, in constant time.
    pub fn verify(&self, stored_hash: &[u8; 32]) -> bool {
        hash_secret(&self.secret).ct_eq(stored_hash).into()
    }
}

/// A freshly generated key: the full key string is shown once and never stored.
#[derive(Clone)]
pub struct GeneratedKey {
    /// The key ID.
    pub id: String,
    /// The full `NNSXS.<ID>.<SECRET>` string to hand to the user.
    pub key: String,
    /// SHA-256 of the secret: the only part that is stored.
    pub secret_hash: [u8; 32],
}

/// Generates a new random key.
pub fn generate() -> GeneratedKey {
    let mut rng = rand::rng();
    let mut id = [0u8; 24];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let id = BASE32_NOPAD.encode(&id);
    let secret = BASE32_NOPAD.encode(&secret);
    GeneratedKey {
        key: format!("{KEY_PREFIX}.{id}.{secret}"),
        secret_hash: hash_secret(&secret),
        id,
    }
}

/// SHA-256 of the encoded secret.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefix_is_base32_of_key() {
        assert_eq!(BASE32_NOPAD.encode(b"key"), KEY_PREFIX);
    }

    #[test]
    fn generated_keys_parse_and_verify() {
        let g = generate();
        assert_eq!(g.id.len(), ID_LEN);
        assert!(g.key.starts_with("NNSXS."));
        assert_eq!(g.key.len(), 5 + 1 + ID_LEN + 1 + SECRET_LEN);
        let p = PresentedKey::parse(&g.key).unwrap();
        assert_eq!(p.id, g.id);
        assert!(p.verify(&g.secret_hash));
        let other = generate();
        assert!(!p.verify(&other.secret_hash));
        assert_ne!(g.id, other.id);
    }

    #[test]
    fn malformed_keys() {
        let g = generate();
        let (_, rest) = g.key.split_at(6);
        for bad in [
            String::new(),
            "NNSXS.VEEBURF3KR77ZR..".to_owned(),
            format!("NNSXT.{rest}"),
            format!("{}.", g.key),
            g.key.to_lowercase(),
            g.key[..g.key.len() - 1].to_owned(),
            g.key.replace('.', ":"),
        ] {
            assert_eq!(PresentedKey::parse(&bad), Err(MalformedKey), "{bad}");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let g = generate();
        let p = PresentedKey::parse(&g.key).unwrap();
        let secret = g.key.rsplit('.').next().unwrap();
        assert!(!format!("{p:?}").contains(secret));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,120}") {
            let _ = PresentedKey::parse(&s);
        }
    }
}
