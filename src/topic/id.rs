//! Identifiers: the application, device and tenant ID grammar of The Things Stack
//! (DESIGN §2), checked once so that every ID that reaches a topic, a subject or a Redis key
//! is safe there.

use std::fmt;
use std::sync::Arc;

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// An application, device or tenant ID that does not match the ID grammar.
    #[error("invalid ID {0:?}: IDs are 3 to 36 lowercase letters, digits and single dashes, starting and ending with a letter or digit")]
    InvalidId(String),
    /// A username that is not `{app}` (single-tenant) or `{app}@{tenant}` (multi-tenant).
    #[error("invalid username {username:?}: expected {expected}")]
    InvalidUsername {
        /// The username as sent.
        username: String,
        /// What this deployment expects.
        expected: &'static str,
    },
}

/// Longest ID accepted, as in The Things Stack.
pub const MAX_ID_LEN: usize = 36;

/// A validated application, device or tenant ID (`^[a-z0-9](?:[-]?[a-z0-9]){2,}$`, at most
/// 36 characters). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(Arc<str>);

impl Id {
    /// Checks `s` against the ID grammar.
    pub fn parse(s: &str) -> Result<Self, TopicError> {
        if is_valid_id(s) {
            Ok(Id(Arc::from(s)))
        } else {
            Err(TopicError::InvalidId(s.to_owned()))
        }
    }

    /// The ID as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by [`Id`] be queried with a `&str` (the derived `Hash` of `Id` is that
/// of its string).
impl std::borrow::Borrow<str> for Id {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl serde::Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Id::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Id {
    type Err = TopicError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Id::parse(s)
    }
}

/// `^[a-z0-9](?:[-]?[a-z0-9]){2,}$` without a regex engine: alphanumerics separated by
/// single dashes, at least three alphanumerics, no leading or trailing dash.
pub(super) fn is_valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 3 || b.len() > MAX_ID_LEN {
        return false;
    }
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut alnums = 0;
    let mut prev_dash = true; // a leading dash is as bad as a double one
    for &c in b {
        if alnum(c) {
            alnums += 1;
            prev_dash = false;
        } else if c == b'-' && !prev_dash {
            prev_dash = true;
        } else {
            return false;
        }
    }
    !prev_dash && alnums >= 3
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_follow_the_things_stack_grammar() {
        for ok in ["app1", "abc", "a-b-c", "dev1", "0a0", &"a".repeat(36)] {
            assert!(Id::parse(ok).is_ok(), "{ok} should be valid");
        }
        for bad in [
            "",
            "ab",
            "-abc",
            "abc-",
            "a--b",
            "ABC",
            "a_b",
            "a.b",
            "a/b",
            "a*b",
            "a>b",
            "a b",
            "a@b",
            &"a".repeat(37),
            "é12",
        ] {
            assert!(Id::parse(bad).is_err(), "{bad} should be invalid");
        }
    }

    proptest! {
        #[test]
        fn id_parsing_never_panics_and_rejects_separators(s in "\\PC{0,40}") {
            if let Ok(id) = Id::parse(&s) {
                prop_assert!(!id.as_str().contains(['.', '/', ':', '@', '*', '>', '+', '#', ' ']));
            }
        }
    }
}
