//! Subscription filters: The Things Stack's rewriting of what a client asks for into a
//! filter of its own application (DESIGN §4), MQTT matching, and the [`Selection`] of device
//! traffic a filter stands for, which the router indexes.

use super::{AppRef, Event, EventSet, Id, Tenancy};

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
    /// Anything else (another application, another prefix, an invalid filter) is `None`.
    pub fn rewrite(tenancy: &Tenancy, app: &AppRef, requested: &str) -> Option<Self> {
        if !is_valid_filter(requested) {
            return None;
        }
        let uid = tenancy.app_uid(app);
        let levels: Vec<&str> = requested.split('/').collect();
        let rest: &[&str] = match levels.as_slice() {
            ["#"] | ["v3", "#"] => &["#"],
            ["v3", head, rest @ ..] if *head == "+" || *head == uid => rest,
            _ => return None,
        };
        Some(Filter {
            requested: requested.to_owned(),
            levels: rest
                .iter()
                .map(|l| match *l {
                    "+" => Level::Single,
                    "#" => Level::Multi,
                    exact => Level::Exact(exact.to_owned()),
                })
                .collect(),
        })
    }

    /// Whether this filter matches a topic given as its levels after `v3/{app}/`
    /// (`devices/{dev}/up`), joined by `sep` (`/` for topics, `.` for subjects).
    pub fn matches(&self, rest: &str, sep: char) -> bool {
        // `v3/{app}` alone never names traffic.
        !self.levels.is_empty() && match_levels(&self.levels, rest.split(sep))
    }

    /// What this filter selects of the application's device traffic, the only traffic a
    /// client ever receives: for every device event topic `devices/{dev}/{event}`,
    /// `self.matches(topic)` is `selection.includes(dev, event)`. This lets the router
    /// index subscribers by device instead of matching every filter against every message.
    pub fn selection(&self) -> Selection {
        let nothing = Selection {
            device: None,
            events: EventSet::NONE,
        };
        let everything = Selection {
            device: None,
            events: EventSet::ALL,
        };
        match self.levels.first() {
            None => return nothing,
            Some(Level::Multi) => return everything,
            Some(Level::Single) => {}
            Some(Level::Exact(l)) if l == "devices" => {}
            Some(Level::Exact(_)) => return nothing,
        }
        let device = match self.levels.get(1) {
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
            if match_levels(&self.levels[2..], event.topic_suffix().split('/')) {
                events.insert(event);
            }
        }
        Selection { device, events }
    }
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

    fn rewrite(f: &str) -> Option<Filter> {
        Filter::rewrite(&Tenancy::Multi, &app(), f)
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
            "v3/#/x",
            "v3/a+/x",
            "",
            "$SYS/#",
        ] {
            assert!(rewrite(denied).is_none(), "{denied} must be denied");
        }
    }

    #[test]
    fn selections() {
        let all = rewrite("#").unwrap().selection();
        assert_eq!(all.device, None);
        assert_eq!(all.events, EventSet::ALL);
        let up = rewrite("v3/+/devices/+/up").unwrap().selection();
        assert_eq!(up.device, None);
        assert!(up.events.contains(Event::Up));
        assert!(!up.events.contains(Event::UpNormalized));
        let dev = rewrite("v3/app1@tenant1/devices/dev1/down/+")
            .unwrap()
            .selection();
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
            for device in ["dev1", "dev2", "dev3"] {
                for event in Event::ALL {
                    let rest = format!("devices.{device}.{}", event.subject_suffix());
                    prop_assert_eq!(
                        filter.matches(&rest, '.'),
                        selection.includes(device, event),
                        "{} on {}", f, rest
                    );
                }
            }
        }

        /// Whatever a client asks for, a granted filter never matches another application's
        /// traffic, because matching only ever sees the levels after `v3/{app}/`.
        #[test]
        fn rewriting_never_escapes_the_application(f in "[a-z0-9@+#/$-]{0,40}") {
            if let Some(filter) = rewrite(&f) {
                prop_assert!(
                    f == "#" || f.starts_with("v3/+") || f.starts_with("v3/#")
                        || f.starts_with("v3/app1@tenant1")
                );
                prop_assert!(filter.requested == f);
            }
        }
    }
}
