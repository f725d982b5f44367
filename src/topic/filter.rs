//! Subscription filters: The Things Stack's rewriting of what a client asks for into a
//! filter of its own application (DESIGN §4), MQTT matching, the [`Selection`] of device
//! traffic a filter stands for (which the router indexes), and which filters are granted at
//! all ([`Filter::grant`]: bounded in length, and able to match some traffic).

use super::{AppRef, Event, EventSet, Id, Tenancy, MAX_ID_LEN};

/// The longest topic a client can receive (DESIGN §4): multi-tenant
/// `v3/{app}@{tenant}/devices/{dev}/down/invalidated` with IDs of [`MAX_ID_LEN`]. A filter
/// length limit below it would refuse filters of real topics.
pub const MAX_TRAFFIC_TOPIC_LEN: usize =
    "v3/".len() + 2 * MAX_ID_LEN + 1 + "/devices/".len() + MAX_ID_LEN + "/down/invalidated".len();

/// Why a requested filter is not granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Longer than the configured `mqtt.max_filter_length`.
    #[error("filter of {len} bytes is longer than the {max} bytes allowed")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not MQTT 3.1.1 filter syntax (§4.7: `#` only last, wildcards only as whole levels).
    #[error("not a valid MQTT topic filter")]
    Invalid,
    /// `$share/{group}/{filter}` with no filter, or a group name that is empty, too long,
    /// or holds a wildcard, a space or a control character.
    #[error("not a valid shared subscription ($share/{{group}}/{{filter}})")]
    InvalidShare,
    /// Names another application, or a topic outside `v3/`.
    #[error("not a topic of this application")]
    OtherApplication,
    /// Well-formed and of this application, but no topic of DESIGN §4 that a client
    /// receives matches it: an invalid device ID, an unknown event, too many levels.
    #[error("matches no topic this application receives")]
    NeverMatches,
}

impl FilterError {
    /// The `reason` label of `lorabroker_subscriptions_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            FilterError::TooLong { .. } => "filter_too_long",
            FilterError::Invalid => "invalid_filter",
            FilterError::InvalidShare => "invalid_share",
            FilterError::OtherApplication => "not_own_application",
            FilterError::NeverMatches => "never_matches",
        }
    }
}

/// A subscription filter after The Things Stack's rewriting, relative to `v3/{app}/`.
///
/// Only the levels after the application are kept: a granted filter can by construction
/// match nothing outside its application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// The filter as the client wrote it (UNSUBSCRIBE names filters this way).
    pub requested: String,
    /// Levels after `v3/{app}/`; empty for a filter that is exactly `v3/{app}`.
    levels: Vec<Level>,
    /// What the levels select of device traffic.
    selection: Selection,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Level {
    Exact(String),
    Single,
    Multi,
}

impl Filter {
    /// Rewrites a requested filter the way The Things Stack does (DESIGN §4): `#` and `v3/#`
    /// mean `v3/{app}/#`, `v3/+/…` means `v3/{app}/…`, `v3/{app}/…` stays as written.
    /// Anything else is an error: an invalid filter, another application or prefix. The
    /// result may select no traffic at all (see [`Filter::grant`]).
    pub fn rewrite(tenancy: &Tenancy, app: &AppRef, requested: &str) -> Result<Self, FilterError> {
        if !is_valid_filter(requested) {
            return Err(FilterError::Invalid);
        }
        let uid = tenancy.app_uid(app);
        let levels: Vec<&str> = requested.split('/').collect();
        let rest: &[&str] = match levels.as_slice() {
            ["#"] | ["v3", "#"] => &["#"],
            ["v3", head, rest @ ..] if *head == "+" || *head == uid => rest,
            _ => return Err(FilterError::OtherApplication),
        };
        let levels: Vec<Level> = rest
            .iter()
            .map(|l| match *l {
                "+" => Level::Single,
                "#" => Level::Multi,
                exact => Level::Exact(exact.to_owned()),
            })
            .collect();
        Ok(Filter {
            requested: requested.to_owned(),
            selection: select(&levels),
            levels,
        })
    }

    /// The filter granted for `requested`, as [`Filter::rewrite`] makes it, if it is at most
    /// `max_len` bytes long (checked first: nothing longer is even parsed) and can match
    /// some traffic of the application; the reason of the refusal otherwise.
    pub fn grant(
        tenancy: &Tenancy,
        app: &AppRef,
        requested: &str,
        max_len: usize,
    ) -> Result<Self, FilterError> {
        check_length(requested, max_len)?;
        let filter = Filter::rewrite(tenancy, app, requested)?;
        if filter.selection.events.is_empty() {
            return Err(FilterError::NeverMatches);
        }
        Ok(filter)
    }

    /// Whether this filter matches a topic given as its levels after `v3/{app}/`
    /// (`devices/{dev}/up`), joined by `sep` (`/` for topics, `.` for subjects).
    pub fn matches(&self, rest: &str, sep: char) -> bool {
        // `v3/{app}` alone never names traffic.
        !self.levels.is_empty() && match_levels(&self.levels, rest.split(sep))
    }

    /// The filter's levels after `v3/{app}/` as one canonical string (`devices/+/up`):
    /// two requests that rewrite to the same filter (`v3/+/…` and `v3/{app}/…`) have the
    /// same one.
    pub fn canonical(&self) -> String {
        let levels: Vec<&str> = self
            .levels
            .iter()
            .map(|l| match l {
                Level::Exact(e) => e.as_str(),
                Level::Single => "+",
                Level::Multi => "#",
            })
            .collect();
        levels.join("/")
    }

    /// What this filter selects of the application's device traffic, the only traffic a
    /// client ever receives: for every device event topic `devices/{dev}/{event}`,
    /// `self.matches(topic)` is `selection.includes(dev, event)`. This lets the router
    /// index subscribers by device instead of matching every filter against every message.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }
}

/// `requested` is at most `max_len` bytes long (`mqtt.max_filter_length`): checked before
/// anything parses it.
pub(super) fn check_length(requested: &str, max_len: usize) -> Result<(), FilterError> {
    if requested.len() > max_len {
        return Err(FilterError::TooLong {
            len: requested.len(),
            max: max_len,
        });
    }
    Ok(())
}

/// What filter `levels` (after `v3/{app}/`) select of device traffic.
fn select(levels: &[Level]) -> Selection {
    let nothing = Selection {
        device: None,
        events: EventSet::NONE,
    };
    let everything = Selection {
        device: None,
        events: EventSet::ALL,
    };
    match levels.first() {
        None => return nothing,
        Some(Level::Multi) => return everything,
        Some(Level::Single) => {}
        Some(Level::Exact(l)) if l == "devices" => {}
        Some(Level::Exact(_)) => return nothing,
    }
    let device = match levels.get(1) {
        None => return nothing,
        Some(Level::Multi) => return everything,
        Some(Level::Single) => None,
        // A level that is no valid ID names no device that can send traffic.
        Some(Level::Exact(d)) => match Id::parse(d) {
            Ok(id) => Some(id),
            Err(_) => return nothing,
        },
    };
    let mut events = EventSet::NONE;
    for event in Event::ALL {
        if match_levels(&levels[2..], event.topic_suffix().split('/')) {
            events.insert(event);
        }
    }
    Selection { device, events }
}

/// Whether filter `levels` match exactly the topic levels of `topic`.
fn match_levels<'a>(levels: &[Level], mut topic: impl Iterator<Item = &'a str>) -> bool {
    for level in levels {
        match level {
            Level::Multi => return true,
            Level::Single => {
                if topic.next().is_none() {
                    return false;
                }
            }
            Level::Exact(want) => match topic.next() {
                Some(got) if got == want => {}
                _ => return false,
            },
        }
    }
    topic.next().is_none()
}

/// What a [`Filter`] selects of device traffic: one device or every device, and a set of
/// events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The one device selected, or `None` for every device.
    pub device: Option<Id>,
    /// The events selected (empty: the filter matches no traffic at all).
    pub events: EventSet,
}

impl Selection {
    /// Whether `event` of `device` is selected.
    pub fn includes(&self, device: &str, event: Event) -> bool {
        self.events.contains(event) && self.device.as_ref().is_none_or(|d| d.as_str() == device)
    }
}

/// MQTT 3.1.1 §4.7 filter syntax: non-empty, `#` only as the whole last level, `+` only as
/// a whole level, no NUL.
fn is_valid_filter(f: &str) -> bool {
    if f.is_empty() || f.contains('\0') {
        return false;
    }
    let mut levels = f.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !is_last) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn app() -> AppRef {
        AppRef::new(id("tenant1"), id("app1"))
    }

    fn rewrite(f: &str) -> Result<Filter, FilterError> {
        Filter::rewrite(&Tenancy::Multi, &app(), f)
    }

    fn grant(f: &str) -> Result<Filter, FilterError> {
        Filter::grant(&Tenancy::Multi, &app(), f, 256)
    }

    #[test]
    fn filter_rewriting_as_the_things_stack() {
        for all in ["#", "v3/#", "v3/+/#", "v3/app1@tenant1/#"] {
            let f = rewrite(all).unwrap();
            assert!(f.matches("devices/dev1/up", '/'), "{all}");
            assert!(f.matches("devices/dev2/down/queued", '/'), "{all}");
        }
        let up = rewrite("v3/+/devices/+/up").unwrap();
        assert!(up.matches("devices/dev1/up", '/'));
        assert!(!up.matches("devices/dev1/up/normalized", '/'));
        assert!(!up.matches("devices/dev1/join", '/'));
        let dev = rewrite("v3/app1@tenant1/devices/dev1/#").unwrap();
        assert!(dev.matches("devices.dev1.down.ack", '.'));
        assert!(!dev.matches("devices.dev2.down.ack", '.'));
        // A filter that is only the application matches no traffic.
        assert!(!rewrite("v3/+").unwrap().matches("devices/dev1/up", '/'));
        for denied in [
            "v3/app2@tenant1/#",
            "v3/app1@tenant2/#",
            "v3/app1/#",
            "+/#",
            "v2/#",
            "a/#",
            "v3",
            "$SYS/#",
        ] {
            assert_eq!(
                rewrite(denied),
                Err(FilterError::OtherApplication),
                "{denied}"
            );
        }
        for invalid in ["v3/#/x", "v3/a+/x", "", "v3/+/devices/dev1/\0", "v3/+/#x"] {
            assert_eq!(rewrite(invalid), Err(FilterError::Invalid), "{invalid:?}");
        }
    }

    #[test]
    fn selections() {
        let all = rewrite("#").unwrap().selection().clone();
        assert_eq!(all.device, None);
        assert_eq!(all.events, EventSet::ALL);
        let up = rewrite("v3/+/devices/+/up").unwrap().selection().clone();
        assert_eq!(up.device, None);
        assert!(up.events.contains(Event::Up));
        assert!(!up.events.contains(Event::UpNormalized));
        let dev = rewrite("v3/app1@tenant1/devices/dev1/down/+")
            .unwrap()
            .selection()
            .clone();
        assert_eq!(dev.device, Some(id("dev1")));
        assert!(dev.includes("dev1", Event::DownAck));
        assert!(!dev.includes("dev2", Event::DownAck));
        assert!(!dev.includes("dev1", Event::Up));
        for nothing in [
            "v3/+",
            "v3/+/gateways/#",
            "v3/+/devices",
            "v3/+/devices/UP/#",
        ] {
            assert!(
                rewrite(nothing).unwrap().selection().events.is_empty(),
                "{nothing}"
            );
        }
    }

    /// Issue 9: what can never match a topic of DESIGN §4 is refused, wildcards in the
    /// right places are not, and nothing over the length limit is even parsed.
    #[test]
    fn grants_only_filters_that_can_match_within_the_length_limit() {
        for never in [
            "v3/+",
            "v3/+/devices",
            "v3/+/devices/dev1",
            "v3/+/gateways/#",
            "v3/+/devices/Dev1/up",
            "v3/+/devices/d1/up",
            "v3/+/devices/dev--1/#",
            &format!("v3/+/devices/{}/up", "a".repeat(MAX_ID_LEN + 1)),
            "v3/+/devices/dev1/upp",
            "v3/+/devices/dev1/down",
            "v3/+/devices/dev1/down/push",
            "v3/+/devices/dev1/down/replace",
            "v3/+/devices/dev1/location/x",
            "v3/+/devices/dev1/up/normalized/x",
            "v3/+/devices/+/+/+/+",
            "v3/+/devices/+/join/+",
        ] {
            assert_eq!(grant(never), Err(FilterError::NeverMatches), "{never}");
        }
        for valid in [
            "#",
            "v3/#",
            "v3/+/#",
            "v3/app1@tenant1/#",
            "v3/+/devices/#",
            "v3/+/+/+/#",
            "v3/+/devices/+/up",
            "v3/+/devices/+/+",
            "v3/+/devices/+/+/+",
            "v3/+/devices/+/join/#",
            "v3/+/devices/dev1/up/normalized",
            "v3/+/devices/dev1/down/+",
            "v3/+/devices/dev1/service/data",
            "v3/+/devices/dev1/location/solved",
            "v3/app1@tenant1/devices/dev1/down/invalidated",
        ] {
            assert!(grant(valid).is_ok(), "{valid}");
        }
        let longest = format!(
            "v3/{a}@{a}/devices/{a}/down/invalidated",
            a = "a".repeat(MAX_ID_LEN)
        );
        assert_eq!(longest.len(), MAX_TRAFFIC_TOPIC_LEN);
        let app = AppRef::new(id(&"a".repeat(MAX_ID_LEN)), id(&"a".repeat(MAX_ID_LEN)));
        let grant_longest = |max| Filter::grant(&Tenancy::Multi, &app, &longest, max);
        assert!(grant_longest(MAX_TRAFFIC_TOPIC_LEN).is_ok());
        assert_eq!(
            grant_longest(MAX_TRAFFIC_TOPIC_LEN - 1),
            Err(FilterError::TooLong {
                len: MAX_TRAFFIC_TOPIC_LEN,
                max: MAX_TRAFFIC_TOPIC_LEN - 1
            })
        );
        // The length is checked first, before the filter is read at all.
        let huge = "v3/#/".repeat(1000);
        assert!(matches!(
            Filter::grant(&Tenancy::Multi, &app, &huge, 256),
            Err(FilterError::TooLong { .. })
        ));
    }

    /// Filters of the shapes clients use, over a few devices and events.
    fn any_filter() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec![
            "+",
            "devices",
            "dev1",
            "dev2",
            "up",
            "down",
            "normalized",
            "queued",
            "ack",
            "x",
        ]);
        (
            prop::sample::select(vec!["#", "v3/#", "v3/+", "v3/app1@tenant1"]),
            prop::collection::vec(level, 0..5),
            any::<bool>(),
        )
            .prop_map(|(head, levels, hash)| {
                let mut f = head.to_owned();
                if !f.ends_with('#') {
                    for l in levels {
                        f.push('/');
                        f.push_str(l);
                    }
                    if hash {
                        f.push_str("/#");
                    }
                }
                f
            })
    }

    proptest! {
        /// A filter's selection agrees with matching the filter, on every device event.
        #[test]
        fn selection_agrees_with_matching(f in any_filter()) {
            let filter = rewrite(&f).unwrap();
            let selection = filter.selection();
            let mut matches_some = false;
            // Any level may be the device level: check those that are device IDs too.
            let named = f.split('/').filter(|l| Id::parse(l).is_ok());
            for device in ["dev1", "dev2", "dev3"].into_iter().chain(named) {
                for event in Event::ALL {
                    let rest = format!("devices.{device}.{}", event.subject_suffix());
                    let matches = filter.matches(&rest, '.');
                    matches_some |= matches;
                    prop_assert_eq!(
                        matches,
                        selection.includes(device, event),
                        "{} on {}", f, rest
                    );
                }
            }
            // Granted exactly when some event of some device matches.
            prop_assert_eq!(grant(&f).is_ok(), matches_some, "{}", f);
        }

        /// Whatever a client asks for, a granted filter never matches another application's
        /// traffic, because matching only ever sees the levels after `v3/{app}/`.
        #[test]
        fn rewriting_never_escapes_the_application(f in "[a-z0-9@+#/$-]{0,40}") {
            if let Ok(filter) = rewrite(&f) {
                prop_assert!(
                    f == "#" || f.starts_with("v3/+") || f.starts_with("v3/#")
                        || f.starts_with("v3/app1@tenant1")
                );
                prop_assert!(filter.requested == f);
            }
        }
    }
}
