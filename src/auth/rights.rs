//! Rights of an API key, named as in The Things Stack, and what they allow (DESIGN §3).

use std::fmt;

/// A set of rights. `LINK` implies traffic read and down write; `ALL` implies everything,
/// `SETTINGS_API_KEYS` included. `SETTINGS_API_KEYS` implies nothing else: it manages the
/// application's keys and reads its live events, and carries no MQTT traffic right.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rights(u8);

/// Why a right name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown right {0:?}: expected one of RIGHT_APPLICATION_TRAFFIC_READ (traffic:read), RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE (traffic:down:write), RIGHT_APPLICATION_TRAFFIC_UP_WRITE (traffic:up:write), RIGHT_APPLICATION_LINK (link), RIGHT_APPLICATION_SETTINGS_API_KEYS (settings:api:keys), RIGHT_APPLICATION_ALL (all)")]
pub struct UnknownRight(pub String);

const NAMES: [(Rights, &str, &str); 6] = [
    (
        Rights::TRAFFIC_READ,
        "RIGHT_APPLICATION_TRAFFIC_READ",
        "traffic:read",
    ),
    (
        Rights::TRAFFIC_DOWN_WRITE,
        "RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE",
        "traffic:down:write",
    ),
    (
        Rights::TRAFFIC_UP_WRITE,
        "RIGHT_APPLICATION_TRAFFIC_UP_WRITE",
        "traffic:up:write",
    ),
    (Rights::LINK, "RIGHT_APPLICATION_LINK", "link"),
    (
        Rights::SETTINGS_API_KEYS,
        "RIGHT_APPLICATION_SETTINGS_API_KEYS",
        "settings:api:keys",
    ),
    (Rights::ALL, "RIGHT_APPLICATION_ALL", "all"),
];

impl Rights {
    /// No rights.
    pub const NONE: Rights = Rights(0);
    /// Subscribe to traffic topics.
    pub const TRAFFIC_READ: Rights = Rights(1);
    /// Publish to `down/push` and `down/replace`.
    pub const TRAFFIC_DOWN_WRITE: Rights = Rights(2);
    /// Simulate uplinks (no MQTT topic uses it; kept for compatibility).
    pub const TRAFFIC_UP_WRITE: Rights = Rights(4);
    /// Link the application: implies read and down write.
    pub const LINK: Rights = Rights(8);
    /// Every application right.
    pub const ALL: Rights = Rights(16);
    /// Manage the application's own API keys and read its live events (the console's
    /// self-service sign-in); no MQTT traffic.
    pub const SETTINGS_API_KEYS: Rights = Rights(32);
    /// What a key gets when no rights are named: read + down write.
    pub const DEFAULT: Rights = Rights(1 | 2);

    /// The union of two sets.
    pub const fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    /// The rights this set grants, with `LINK` and `ALL` expanded.
    fn effective(self) -> u8 {
        let mut r = self.0;
        if r & Self::ALL.0 != 0 {
            r |= Self::TRAFFIC_READ.0
                | Self::TRAFFIC_DOWN_WRITE.0
                | Self::TRAFFIC_UP_WRITE.0
                | Self::LINK.0
                | Self::SETTINGS_API_KEYS.0;
        }
        if r & Self::LINK.0 != 0 {
            r |= Self::TRAFFIC_READ.0 | Self::TRAFFIC_DOWN_WRITE.0;
        }
        r
    }

    /// May subscribe to traffic.
    pub fn can_read(self) -> bool {
        self.effective() & Self::TRAFFIC_READ.0 != 0
    }

    /// May push and replace downlinks.
    pub fn can_write_down(self) -> bool {
        self.effective() & Self::TRAFFIC_DOWN_WRITE.0 != 0
    }

    /// May manage the application's keys and read its events.
    pub fn can_manage_keys(self) -> bool {
        self.effective() & Self::SETTINGS_API_KEYS.0 != 0
    }

    /// Whether every right `other` grants is granted by this set too (a key may only
    /// create keys with rights it holds itself).
    pub fn includes(self, other: Rights) -> bool {
        other.effective() & !self.effective() == 0
    }

    /// The rights this set grants, expanded, by The Things Stack name.
    pub fn effective_names(self) -> Vec<&'static str> {
        Rights(self.effective()).names()
    }

    /// Carries at least one traffic right (otherwise the key may not connect).
    pub fn has_traffic_right(self) -> bool {
        self.effective()
            & (Self::TRAFFIC_READ.0 | Self::TRAFFIC_DOWN_WRITE.0 | Self::TRAFFIC_UP_WRITE.0)
            != 0
    }

    /// Parses one right, by its The Things Stack name or its short form.
    pub fn parse_one(name: &str) -> Result<Rights, UnknownRight> {
        let n = name.trim();
        if n.eq_ignore_ascii_case("settings_api_keys") {
            return Ok(Rights::SETTINGS_API_KEYS);
        }
        NAMES
            .iter()
            .find(|(_, long, short)| n.eq_ignore_ascii_case(long) || n.eq_ignore_ascii_case(short))
            .map(|(r, _, _)| *r)
            .ok_or_else(|| UnknownRight(name.to_owned()))
    }

    /// Parses a comma-separated list of rights; an empty list is [`Rights::DEFAULT`].
    pub fn parse_list(list: &str) -> Result<Rights, UnknownRight> {
        let mut rights = Rights::NONE;
        for name in list.split(',').filter(|s| !s.trim().is_empty()) {
            rights = rights.union(Rights::parse_one(name)?);
        }
        Ok(if rights == Rights::NONE {
            Rights::DEFAULT
        } else {
            rights
        })
    }

    /// The The Things Stack names of the rights in this set (not expanded).
    pub fn names(self) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(r, _, _)| self.0 & r.0 != 0)
            .map(|(_, long, _)| *long)
            .collect()
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl serde::Serialize for Rights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

impl<'de> serde::Deserialize<'de> for Rights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        names.iter().try_fold(Rights::NONE, |acc, n| {
            Rights::parse_one(n)
                .map(|r| acc.union(r))
                .map_err(serde::de::Error::custom)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implications() {
        assert!(Rights::LINK.can_read() && Rights::LINK.can_write_down());
        assert!(Rights::ALL.can_read() && Rights::ALL.can_write_down());
        assert!(Rights::TRAFFIC_READ.can_read() && !Rights::TRAFFIC_READ.can_write_down());
        assert!(!Rights::TRAFFIC_DOWN_WRITE.can_read());
        assert!(Rights::TRAFFIC_UP_WRITE.has_traffic_right());
        assert!(!Rights::TRAFFIC_UP_WRITE.can_read());
        assert!(!Rights::NONE.has_traffic_right());
        assert!(Rights::ALL.can_manage_keys());
        assert!(!Rights::LINK.can_manage_keys() && !Rights::DEFAULT.can_manage_keys());
        let settings = Rights::SETTINGS_API_KEYS;
        assert!(settings.can_manage_keys());
        assert!(
            !settings.has_traffic_right() && !settings.can_read() && !settings.can_write_down()
        );
    }

    #[test]
    fn a_set_includes_only_what_it_grants() {
        let settings = Rights::SETTINGS_API_KEYS;
        assert!(Rights::ALL.includes(settings.union(Rights::LINK)));
        assert!(Rights::ALL.includes(Rights::ALL));
        assert!(Rights::LINK.includes(Rights::DEFAULT));
        assert!(!Rights::LINK.includes(Rights::ALL));
        assert!(!settings.includes(Rights::TRAFFIC_READ));
        assert!(settings.includes(settings));
        assert!(!settings.union(Rights::LINK).includes(Rights::ALL));
        assert_eq!(
            Rights::LINK.effective_names(),
            vec![
                "RIGHT_APPLICATION_TRAFFIC_READ",
                "RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE",
                "RIGHT_APPLICATION_LINK"
            ]
        );
    }

    #[test]
    fn parsing_long_and_short_names() {
        assert_eq!(Rights::parse_list("").unwrap(), Rights::DEFAULT);
        assert_eq!(
            Rights::parse_list("traffic:read, RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE").unwrap(),
            Rights::DEFAULT
        );
        assert_eq!(Rights::parse_list("link").unwrap(), Rights::LINK);
        for name in [
            "RIGHT_APPLICATION_SETTINGS_API_KEYS",
            "settings:api:keys",
            "settings_api_keys",
        ] {
            assert_eq!(Rights::parse_list(name).unwrap(), Rights::SETTINGS_API_KEYS);
        }
        assert_eq!(
            Rights::parse_list("all").unwrap().names(),
            vec!["RIGHT_APPLICATION_ALL"]
        );
        let err = Rights::parse_list("traffic:read,bogus").unwrap_err();
        assert_eq!(err, UnknownRight("bogus".into()));
    }

    #[test]
    fn serde_round_trip() {
        let r = Rights::TRAFFIC_READ.union(Rights::LINK);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"["RIGHT_APPLICATION_TRAFFIC_READ","RIGHT_APPLICATION_LINK"]"#
        );
        assert_eq!(serde_json::from_str::<Rights>(&json).unwrap(), r);
    }
}
