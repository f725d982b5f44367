//! Shared subscriptions (issue 14): `$share/{group}/{filter}`, the MQTT 5 syntax that MQTT
//! 3.1.1 clients of other brokers use too. The members of one group that asked for the
//! same filter share its messages: each one goes to one member only.
//!
//! The filter is rewritten like any other (DESIGN §4), so a share is always inside the
//! client's own application. The group name is client input: it is bounded and checked
//! here, and it reaches the bus and the session store only inside a digest
//! ([`ShareKey::digest`]), never as written.

use super::filter::check_length;
use super::{AppRef, Filter, FilterError, Tenancy};

/// What a shared subscription's filter starts with.
pub const SHARE_PREFIX: &str = "$share/";

/// The longest group name accepted, in bytes.
pub const MAX_SHARE_GROUP_LEN: usize = 128;

/// A granted shared subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedFilter {
    /// `$share/{group}/{filter}` as the client wrote it (UNSUBSCRIBE names it so).
    pub requested: String,
    /// The share it joins.
    pub key: ShareKey,
    /// The rewritten filter after the group.
    pub filter: Filter,
}

/// Which share: one group of one application with one (rewritten) filter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShareKey {
    /// The application whose traffic is shared.
    pub app: AppRef,
    /// The group name, as written.
    pub group: String,
    /// The rewritten filter, canonical ([`Filter::canonical`]).
    pub filter: String,
}

impl SharedFilter {
    /// The shared subscription `requested` stands for, if it starts with `$share/`: its
    /// filter granted as [`Filter::grant`] grants one (the whole text at most `max_len`
    /// bytes), its group valid. `None` for a plain filter.
    pub fn grant(
        tenancy: &Tenancy,
        app: &AppRef,
        requested: &str,
        max_len: usize,
    ) -> Option<Result<SharedFilter, FilterError>> {
        let rest = requested.strip_prefix(SHARE_PREFIX)?;
        Some(Self::parse(tenancy, app, requested, rest, max_len))
    }

    fn parse(
        tenancy: &Tenancy,
        app: &AppRef,
        requested: &str,
        rest: &str,
        max_len: usize,
    ) -> Result<SharedFilter, FilterError> {
        check_length(requested, max_len)?;
        let (group, inner) = rest.split_once('/').ok_or(FilterError::InvalidShare)?;
        if !is_valid_group(group) || inner.is_empty() {
            return Err(FilterError::InvalidShare);
        }
        let filter = Filter::grant(tenancy, app, inner, max_len)?;
        Ok(SharedFilter {
            requested: requested.to_owned(),
            key: ShareKey {
                app: app.clone(),
                group: group.to_owned(),
                filter: filter.canonical(),
            },
            filter,
        })
    }
}

/// A group name: 1 to [`MAX_SHARE_GROUP_LEN`] bytes, no `+`, `#` (MQTT 5 §4.8.2), no
/// whitespace or control character.
fn is_valid_group(group: &str) -> bool {
    (1..=MAX_SHARE_GROUP_LEN).contains(&group.len())
        && !group.contains(|c: char| c == '+' || c == '#' || c.is_whitespace() || c.is_control())
}

impl ShareKey {
    /// A name for this share made only of `[0-9a-f]` (a hash of the application, the
    /// group and the filter), safe as a NATS queue group or a JetStream consumer name
    /// whatever the group holds.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [
            self.app.tenant.as_str(),
            self.app.app.as_str(),
            &self.group,
            &self.filter,
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        data_encoding::HEXLOWER.encode(&h.finalize()[..16])
    }

    /// The NATS queue group of this share's members on every node.
    pub fn queue_group(&self) -> String {
        format!("lorabroker-share-{}", self.digest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Id;

    fn app(a: &str) -> AppRef {
        AppRef::new(Id::parse("tenant1").unwrap(), Id::parse(a).unwrap())
    }

    fn grant(requested: &str) -> Option<Result<SharedFilter, FilterError>> {
        SharedFilter::grant(&Tenancy::Multi, &app("app1"), requested, 1024)
    }

    #[test]
    fn plain_filters_are_not_shares() {
        assert!(grant("v3/+/devices/+/up").is_none());
        assert!(grant("$shared/g/#").is_none());
    }

    #[test]
    fn a_share_rewrites_its_filter_inside_the_application() {
        let s = grant("$share/workers/v3/+/devices/+/up").unwrap().unwrap();
        assert_eq!(s.key.group, "workers");
        assert_eq!(s.key.filter, "devices/+/up");
        assert_eq!(s.requested, "$share/workers/v3/+/devices/+/up");
        assert!(s.filter.matches("devices/dev1/up", '/'));
        // The same filter written with the application's own ID is the same share.
        let same = grant("$share/workers/v3/app1@tenant1/devices/+/up")
            .unwrap()
            .unwrap();
        assert_eq!(same.key, s.key);
        assert_eq!(same.key.digest(), s.key.digest());
        // Another group, filter or application is another share.
        let other = grant("$share/other/v3/+/devices/+/up").unwrap().unwrap();
        assert_ne!(other.key.digest(), s.key.digest());
        let elsewhere = SharedFilter::grant(
            &Tenancy::Multi,
            &app("app2"),
            "$share/workers/v3/+/devices/+/up",
            1024,
        )
        .unwrap()
        .unwrap();
        assert_ne!(elsewhere.key.digest(), s.key.digest());
    }

    #[test]
    fn bad_shares_are_refused_with_a_reason() {
        for bad in [
            "$share/",
            "$share/g",
            "$share//#",
            "$share/g/",
            "$share/g+/#",
            "$share/#/#",
            "$share/a b/#",
            "$share/a\u{1}/#",
        ] {
            assert_eq!(
                grant(bad).unwrap().unwrap_err(),
                FilterError::InvalidShare,
                "{bad:?}"
            );
        }
        let long_group = format!("$share/{}/#", "g".repeat(MAX_SHARE_GROUP_LEN + 1));
        assert_eq!(
            grant(&long_group).unwrap().unwrap_err(),
            FilterError::InvalidShare
        );
        assert_eq!(
            grant("$share/g/v3/other@tenant1/devices/+/up")
                .unwrap()
                .unwrap_err(),
            FilterError::OtherApplication
        );
        assert_eq!(
            grant("$share/g/v3/+/devices/+/nothing")
                .unwrap()
                .unwrap_err(),
            FilterError::NeverMatches
        );
        let limit = SharedFilter::grant(&Tenancy::Multi, &app("app1"), "$share/g/#", 8);
        assert!(matches!(
            limit,
            Some(Err(FilterError::TooLong { len: 10, max: 8 }))
        ));
    }

    #[test]
    fn names_are_safe_whatever_the_group() {
        let s = grant("$share/a.b>*$x/#").unwrap().unwrap();
        let q = s.key.queue_group();
        assert!(crate::bus::is_valid_queue_group(&q), "{q}");
        assert!(s.key.digest().bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
