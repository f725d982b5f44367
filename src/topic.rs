//! v3 topics and the names behind them: identifiers, tenancy, filter rewriting and
//! matching, and the mapping between MQTT topics and NATS subjects (DESIGN §2, §4, §7).
//!
//! Everything here is pure: no I/O, no async. Every identifier that reaches a topic, a
//! subject or a Redis key has passed [`Id::parse`], which is what makes subject and key
//! injection impossible (an ID never contains `.`, `/`, `:`, `*`, `>`, `+` or `#`).

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
fn is_valid_id(s: &str) -> bool {
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

/// One application of one tenant: the unit of authorisation and routing.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct AppRef {
    /// The tenant (the configured default tenant in single-tenant mode).
    pub tenant: Id,
    /// The application ID.
    pub app: Id,
}

impl AppRef {
    /// Builds an application reference from validated IDs.
    pub fn new(tenant: Id, app: Id) -> Self {
        Self { tenant, app }
    }

    /// NATS subject filter that carries all of this application's device traffic.
    pub fn traffic_subject_filter(&self) -> String {
        format!("v3.{}.{}.>", self.tenant, self.app)
    }

    /// Prefix of this application's traffic subjects, `v3.{tenant}.{app}.`.
    pub fn subject_prefix(&self) -> String {
        format!("v3.{}.{}.", self.tenant, self.app)
    }
}

impl fmt::Display for AppRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.app, self.tenant)
    }
}

/// One device of one application.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct DeviceRef {
    /// The device's application.
    pub app: AppRef,
    /// The device ID.
    pub device: Id,
}

impl DeviceRef {
    /// Builds a device reference.
    pub fn new(app: AppRef, device: Id) -> Self {
        Self { app, device }
    }

    /// NATS subject of `event` for this device: `v3.{tenant}.{app}.devices.{dev}.{event}`.
    pub fn subject(&self, event: Event) -> String {
        format!(
            "v3.{}.{}.devices.{}.{}",
            self.app.tenant,
            self.app.app,
            self.device,
            event.subject_suffix()
        )
    }
}

/// Deployment tenancy: how usernames and topics name an application (DESIGN §2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tenancy {
    /// Username and topics carry `{app}`; every application belongs to `default_tenant`.
    Single {
        /// The internal tenant ID; never appears on the wire.
        default_tenant: Id,
    },
    /// Username and topics carry `{app}@{tenant}`.
    Multi,
}

impl Tenancy {
    /// Parses an MQTT username (or the application part of a topic) into an application.
    pub fn parse_app(&self, username: &str) -> Result<AppRef, TopicError> {
        let invalid = || TopicError::InvalidUsername {
            username: username.to_owned(),
            expected: match self {
                Tenancy::Single { .. } => "{application id}",
                Tenancy::Multi => "{application id}@{tenant id}",
            },
        };
        match self {
            Tenancy::Single { default_tenant } => {
                let app = Id::parse(username).map_err(|_| invalid())?;
                Ok(AppRef::new(default_tenant.clone(), app))
            }
            Tenancy::Multi => {
                let (app, tenant) = username.split_once('@').ok_or_else(invalid)?;
                let app = Id::parse(app).map_err(|_| invalid())?;
                let tenant = Id::parse(tenant).map_err(|_| invalid())?;
                Ok(AppRef::new(tenant, app))
            }
        }
    }

    /// How `app` is written in usernames and topics: `{app}` or `{app}@{tenant}`.
    pub fn app_uid(&self, app: &AppRef) -> String {
        match self {
            Tenancy::Single { .. } => app.app.to_string(),
            Tenancy::Multi => app.to_string(),
        }
    }

    /// The MQTT topic of `event` for `device`.
    pub fn topic(&self, device: &DeviceRef, event: Event) -> String {
        format!(
            "v3/{}/devices/{}/{}",
            self.app_uid(&device.app),
            device.device,
            event.topic_suffix()
        )
    }
}

/// Server → client traffic events, in the order of DESIGN §4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// `join`
    Join,
    /// `up`
    Up,
    /// `up/normalized`
    UpNormalized,
    /// `down/queued`
    DownQueued,
    /// `down/sent`
    DownSent,
    /// `down/ack`
    DownAck,
    /// `down/nack`
    DownNack,
    /// `down/failed`
    DownFailed,
    /// `down/invalidated`
    DownInvalidated,
    /// `service/data`
    ServiceData,
    /// `location/solved`
    LocationSolved,
}

impl Event {
    /// Every event, for tests and tools.
    pub const ALL: [Event; 11] = [
        Event::Join,
        Event::Up,
        Event::UpNormalized,
        Event::DownQueued,
        Event::DownSent,
        Event::DownAck,
        Event::DownNack,
        Event::DownFailed,
        Event::DownInvalidated,
        Event::ServiceData,
        Event::LocationSolved,
    ];

    /// The topic levels after `devices/{dev}/`.
    pub fn topic_suffix(self) -> &'static str {
        match self {
            Event::Join => "join",
            Event::Up => "up",
            Event::UpNormalized => "up/normalized",
            Event::DownQueued => "down/queued",
            Event::DownSent => "down/sent",
            Event::DownAck => "down/ack",
            Event::DownNack => "down/nack",
            Event::DownFailed => "down/failed",
            Event::DownInvalidated => "down/invalidated",
            Event::ServiceData => "service/data",
            Event::LocationSolved => "location/solved",
        }
    }

    /// The subject tokens after `devices.{dev}.`.
    pub fn subject_suffix(self) -> &'static str {
        match self {
            Event::Join => "join",
            Event::Up => "up",
            Event::UpNormalized => "up.normalized",
            Event::DownQueued => "down.queued",
            Event::DownSent => "down.sent",
            Event::DownAck => "down.ack",
            Event::DownNack => "down.nack",
            Event::DownFailed => "down.failed",
            Event::DownInvalidated => "down.invalidated",
            Event::ServiceData => "service.data",
            Event::LocationSolved => "location.solved",
        }
    }

    /// Parses the subject tokens after `devices.{dev}.`.
    pub fn from_subject_suffix(s: &str) -> Option<Self> {
        Event::ALL.into_iter().find(|e| e.subject_suffix() == s)
    }

    /// This event's bit in an [`EventSet`].
    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of [`Event`]s, as a bit set: what one filter (or one client's filters) selects
/// of a device's traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventSet(u16);

impl EventSet {
    /// No event.
    pub const NONE: EventSet = EventSet(0);
    /// Every event.
    pub const ALL: EventSet = EventSet((1 << Event::ALL.len()) - 1);

    /// Whether `event` is in the set.
    pub fn contains(self, event: Event) -> bool {
        self.0 & event.bit() != 0
    }

    /// Adds `event`.
    pub fn insert(&mut self, event: Event) {
        self.0 |= event.bit();
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The events in either set.
    pub fn union(self, other: EventSet) -> EventSet {
        EventSet(self.0 | other.0)
    }

    /// The events of `self` that are not in `other`.
    pub fn difference(self, other: EventSet) -> EventSet {
        EventSet(self.0 & !other.0)
    }
}

/// Client → server operations on the downlink queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownlinkOp {
    /// `down/push`: append to the queue.
    Push,
    /// `down/replace`: replace the queue.
    Replace,
}

/// Parses a PUBLISH topic into the device and the downlink operation it names, if the topic
/// is one of `app`'s writable topics (`v3/{app}/devices/{dev}/down/push|replace`).
pub fn parse_downlink_topic(
    tenancy: &Tenancy,
    app: &AppRef,
    topic: &str,
) -> Option<(DeviceRef, DownlinkOp)> {
    let rest = topic.strip_prefix("v3/")?;
    let rest = rest.strip_prefix(tenancy.app_uid(app).as_str())?;
    let rest = rest.strip_prefix("/devices/")?;
    let (device, op) = rest.split_once('/')?;
    let op = match op {
        "down/push" => DownlinkOp::Push,
        "down/replace" => DownlinkOp::Replace,
        _ => return None,
    };
    let device = Id::parse(device).ok()?;
    Some((DeviceRef::new(app.clone(), device), op))
}

/// A device event parsed from a traffic subject of a known application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectEvent<'a> {
    /// The device ID, as written in the subject (validated).
    pub device: &'a str,
    /// The event.
    pub event: Event,
}

/// Parses `devices.{dev}.{event…}` (the part of a traffic subject after
/// [`AppRef::subject_prefix`]); `None` for anything that is not a known device event.
pub fn parse_subject_rest(rest: &str) -> Option<SubjectEvent<'_>> {
    let rest = rest.strip_prefix("devices.")?;
    let (device, event) = rest.split_once('.')?;
    if !is_valid_id(device) {
        return None;
    }
    Some(SubjectEvent {
        device,
        event: Event::from_subject_suffix(event)?,
    })
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

/// Converts an MQTT topic or filter to NATS syntax (`/` → `.`, `+` → `*`, `#` → `>`).
/// Callers only pass topics built from validated IDs.
pub fn topic_to_subject(topic: &str) -> String {
    topic
        .split('/')
        .map(|l| match l {
            "+" => "*",
            "#" => ">",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(".")
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

    #[test]
    fn usernames_by_tenancy() {
        let multi = Tenancy::Multi;
        assert_eq!(multi.parse_app("app1@tenant1").unwrap(), app());
        assert!(multi.parse_app("app1").is_err());
        assert!(multi.parse_app("app1@").is_err());
        assert!(multi.parse_app("app1@ten@ant").is_err());
        let single = Tenancy::Single {
            default_tenant: id("default"),
        };
        let a = single.parse_app("app1").unwrap();
        assert_eq!(a.tenant.as_str(), "default");
        assert!(single.parse_app("app1@tenant1").is_err());
        assert_eq!(single.app_uid(&a), "app1");
        assert_eq!(multi.app_uid(&app()), "app1@tenant1");
    }

    #[test]
    fn subjects_and_topics() {
        let dev = DeviceRef::new(app(), id("dev1"));
        assert_eq!(
            dev.subject(Event::DownQueued),
            "v3.tenant1.app1.devices.dev1.down.queued"
        );
        assert_eq!(
            Tenancy::Multi.topic(&dev, Event::UpNormalized),
            "v3/app1@tenant1/devices/dev1/up/normalized"
        );
        assert_eq!(app().traffic_subject_filter(), "v3.tenant1.app1.>");
        for e in Event::ALL {
            assert_eq!(e.subject_suffix().replace('.', "/"), e.topic_suffix());
            assert_eq!(Event::from_subject_suffix(e.subject_suffix()), Some(e));
            let rest = format!("devices.dev1.{}", e.subject_suffix());
            assert_eq!(
                parse_subject_rest(&rest),
                Some(SubjectEvent {
                    device: "dev1",
                    event: e
                })
            );
        }
        assert_eq!(parse_subject_rest("devices.dev1.down.push"), None);
        assert_eq!(parse_subject_rest("devices.D.up"), None);
        assert_eq!(parse_subject_rest("gateways.gw1.up"), None);
        assert_eq!(
            topic_to_subject("v3/+/devices/#"),
            "v3.*.devices.>".to_string()
        );
    }

    #[test]
    fn downlink_topics() {
        let t = Tenancy::Multi;
        let (dev, op) =
            parse_downlink_topic(&t, &app(), "v3/app1@tenant1/devices/dev1/down/push").unwrap();
        assert_eq!(dev.device.as_str(), "dev1");
        assert_eq!(op, DownlinkOp::Push);
        let (_, op) =
            parse_downlink_topic(&t, &app(), "v3/app1@tenant1/devices/dev1/down/replace").unwrap();
        assert_eq!(op, DownlinkOp::Replace);
        for bad in [
            "v3/app2@tenant1/devices/dev1/down/push",
            "v3/app1@tenant2/devices/dev1/down/push",
            "v3/app1/devices/dev1/down/push",
            "v3/app1@tenant1/devices/dev1/up",
            "v3/app1@tenant1/devices/DEV/down/push",
            "v3/app1@tenant1/devices/dev1/down/push/x",
            "v3/app1@tenant1/devices/+/down/push",
            "v3/app1@tenant1x/devices/dev1/down/push",
        ] {
            assert!(parse_downlink_topic(&t, &app(), bad).is_none(), "{bad}");
        }
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

        #[test]
        fn id_parsing_never_panics_and_rejects_separators(s in "\\PC{0,40}") {
            if let Ok(id) = Id::parse(&s) {
                prop_assert!(!id.as_str().contains(['.', '/', ':', '@', '*', '>', '+', '#', ' ']));
            }
        }
    }
}
