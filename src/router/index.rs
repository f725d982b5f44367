//! The [`Index`] of one application's local subscribers: who gets a device event, found
//! without matching every subscriber's filters against it.
//!
//! Each filter compiles to a [`Selection`] (one device or any device, and a set of
//! events). A subscriber with any any-device selection sits in the `any` list with the
//! union of those events; its single-device selections go to per-device buckets with the
//! events the `any` entry does not already cover. A device event therefore consults one
//! bucket and the `any` list, and reaches each subscriber at most once, whatever the number
//! of other devices' subscribers. This module does not know the bus or the wire.

use std::collections::HashMap;
use std::sync::Arc;

use crate::mqtt::outbox::Outbox;
use crate::topic::{Event, EventSet, Filter, Id, Selection};

/// Where one subscriber receives, and which events of a bucket it wants.
#[derive(Clone)]
pub struct Slot {
    /// The connection ID.
    pub id: u64,
    /// The events of this bucket the subscriber wants.
    pub events: EventSet,
    /// Its outbox.
    pub outbox: Arc<Outbox>,
}

/// One subscriber's granted filters.
struct Subscriber {
    outbox: Arc<Outbox>,
    filters: Vec<(Box<str>, Selection)>,
}

impl Subscriber {
    /// Its `any` events and its per-device events (minus the `any` ones, empty ones left
    /// out).
    fn compile(&self) -> (EventSet, Vec<(Id, EventSet)>) {
        let any = self
            .filters
            .iter()
            .filter(|(_, s)| s.device.is_none())
            .fold(EventSet::NONE, |acc, (_, s)| acc.union(s.events));
        let mut devices: Vec<(Id, EventSet)> = Vec::new();
        for (_, s) in &self.filters {
            let Some(device) = &s.device else { continue };
            let events = s.events.difference(any);
            if events.is_empty() {
                continue;
            }
            match devices.iter_mut().find(|(d, _)| d == device) {
                Some((_, e)) => *e = e.union(events),
                None => devices.push((device.clone(), events)),
            }
        }
        (any, devices)
    }
}

/// One application's subscribers, indexed by device.
#[derive(Default)]
pub struct Index {
    subscribers: HashMap<u64, Subscriber>,
    any: Vec<Slot>,
    by_device: HashMap<Id, Vec<Slot>>,
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants `filter` to subscriber `id` (delivering to `outbox`), replacing a filter with
    /// the same requested text (MQTT 3.1.1 §3.8.4).
    pub fn add(&mut self, id: u64, outbox: &Arc<Outbox>, filter: &Filter) {
        self.unindex(id);
        // Sized for the usual single filter: this is per-connection memory.
        let sub = self.subscribers.entry(id).or_insert_with(|| Subscriber {
            outbox: outbox.clone(),
            filters: Vec::with_capacity(1),
        });
        sub.filters.retain(|(r, _)| **r != *filter.requested);
        sub.filters
            .push((filter.requested.as_str().into(), filter.selection().clone()));
        self.reindex(id);
    }

    /// Removes the filter `requested` of subscriber `id`; a subscriber left without
    /// filters is forgotten. Returns how many filters it still has.
    pub fn remove(&mut self, id: u64, requested: &str) -> usize {
        if !self.subscribers.contains_key(&id) {
            return 0;
        }
        self.unindex(id);
        let sub = self.subscribers.get_mut(&id).expect("checked above");
        sub.filters.retain(|(r, _)| &**r != requested);
        let left = sub.filters.len();
        if left == 0 {
            self.subscribers.remove(&id);
        } else {
            self.reindex(id);
        }
        left
    }

    /// Forgets subscriber `id` and all its filters.
    pub fn remove_all(&mut self, id: u64) {
        self.unindex(id);
        self.subscribers.remove(&id);
    }

    /// Whether nobody is subscribed.
    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.subscribers.len()
    }

    /// Calls `deliver` once for each subscriber that wants `event` of `device`.
    pub fn for_each_match(&self, device: &str, event: Event, mut deliver: impl FnMut(&Slot)) {
        // No hashing at all when every subscriber takes every device (plain fan-out).
        let bucket = if self.by_device.is_empty() {
            &[][..]
        } else {
            self.by_device.get(device).map_or(&[][..], Vec::as_slice)
        };
        for slot in self.any.iter().chain(bucket) {
            if slot.events.contains(event) {
                deliver(slot);
            }
        }
    }

    fn unindex(&mut self, id: u64) {
        let Some(sub) = self.subscribers.get(&id) else {
            return;
        };
        let (any, devices) = sub.compile();
        if !any.is_empty() {
            remove_slot(&mut self.any, id);
        }
        for (device, _) in devices {
            if let Some(bucket) = self.by_device.get_mut(&device) {
                remove_slot(bucket, id);
                if bucket.is_empty() {
                    self.by_device.remove(&device);
                }
            }
        }
    }

    fn reindex(&mut self, id: u64) {
        let Some(sub) = self.subscribers.get(&id) else {
            return;
        };
        let (any, devices) = sub.compile();
        let slot = |events| Slot {
            id,
            events,
            outbox: sub.outbox.clone(),
        };
        if !any.is_empty() {
            self.any.push(slot(any));
        }
        for (device, events) in devices {
            self.by_device
                .entry(device)
                .or_insert_with(|| Vec::with_capacity(1))
                .push(slot(events));
        }
    }
}

fn remove_slot(slots: &mut Vec<Slot>, id: u64) {
    if let Some(at) = slots.iter().position(|s| s.id == id) {
        slots.swap_remove(at);
    }
    if slots.capacity() > 2 * slots.len() + 8 {
        slots.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{AppRef, Tenancy};
    use proptest::prelude::*;

    fn filter(f: &str) -> Filter {
        let app = AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap());
        Filter::rewrite(&Tenancy::Multi, &app, f).unwrap()
    }

    fn matched(index: &Index, device: &str, event: Event) -> Vec<u64> {
        let mut ids = Vec::new();
        index.for_each_match(device, event, |s| ids.push(s.id));
        ids.sort_unstable();
        ids
    }

    #[test]
    fn each_subscriber_at_most_once() {
        let mut index = Index::new();
        let outbox = Arc::new(Outbox::new(1024));
        index.add(1, &outbox, &filter("#"));
        index.add(1, &outbox, &filter("v3/+/devices/dev1/#"));
        index.add(2, &outbox, &filter("v3/+/devices/dev1/up"));
        index.add(2, &outbox, &filter("v3/+/devices/dev1/+"));
        index.add(3, &outbox, &filter("v3/+/devices/dev2/up"));
        assert_eq!(matched(&index, "dev1", Event::Up), vec![1, 2]);
        assert_eq!(matched(&index, "dev1", Event::UpNormalized), vec![1]);
        assert_eq!(matched(&index, "dev2", Event::Up), vec![1, 3]);
        assert_eq!(index.remove(1, "#"), 1);
        assert_eq!(matched(&index, "dev2", Event::Up), vec![3]);
        assert_eq!(matched(&index, "dev1", Event::UpNormalized), vec![1]);
        index.remove_all(2);
        assert_eq!(index.remove(3, "v3/+/devices/dev2/up"), 0);
        assert_eq!(index.len(), 1);
        assert_eq!(index.remove(1, "v3/+/devices/dev1/#"), 0);
        assert!(index.is_empty());
        assert!(index.any.is_empty() && index.by_device.is_empty());
        assert_eq!(index.remove(9, "#"), 0);
    }

    #[test]
    fn same_filter_twice_is_one_subscription() {
        let mut index = Index::new();
        let outbox = Arc::new(Outbox::new(1024));
        index.add(1, &outbox, &filter("v3/+/devices/dev1/up"));
        index.add(1, &outbox, &filter("v3/+/devices/dev1/up"));
        assert_eq!(matched(&index, "dev1", Event::Up), vec![1]);
        assert_eq!(index.remove(1, "v3/+/devices/dev1/up"), 0);
        assert!(index.by_device.is_empty());
    }

    /// One step of a subscriber's life.
    #[derive(Debug, Clone)]
    enum Op {
        Add(u64, String),
        Remove(u64, String),
        Leave(u64),
    }

    fn any_filter() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "#",
            "v3/#",
            "v3/+/#",
            "v3/+",
            "v3/+/devices/+/up",
            "v3/+/devices/+/down/#",
            "v3/+/+/+/up",
            "v3/+/+/dev1/#",
            "v3/+/devices/dev1/#",
            "v3/+/devices/dev1/up",
            "v3/+/devices/dev1/+",
            "v3/+/devices/dev2/#",
            "v3/+/devices/dev2/down/ack",
            "v3/+/devices/dev3/up/normalized",
            "v3/+/devices/dev3/+/+",
            "v3/+/gateways/#",
        ])
        .prop_map(str::to_owned)
    }

    fn any_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..6, any_filter()).prop_map(|(id, f)| Op::Add(id, f)),
            2 => (0u64..6, any_filter()).prop_map(|(id, f)| Op::Remove(id, f)),
            1 => (0u64..6).prop_map(Op::Leave),
        ]
    }

    proptest! {
        /// After any sequence of subscribes and unsubscribes, the index delivers each device
        /// event to exactly the subscribers one of whose filters matches it, once each: the
        /// same as the naive scan over every subscriber's filters.
        #[test]
        fn index_equals_naive_scan(ops in prop::collection::vec(any_op(), 0..40)) {
            let mut index = Index::new();
            let mut naive: HashMap<u64, Vec<Filter>> = HashMap::new();
            let outbox = Arc::new(Outbox::new(1024));
            for op in ops {
                match op {
                    Op::Add(id, f) => {
                        let f = filter(&f);
                        index.add(id, &outbox, &f);
                        let fs = naive.entry(id).or_default();
                        fs.retain(|g| g.requested != f.requested);
                        fs.push(f);
                    }
                    Op::Remove(id, f) => {
                        let left = index.remove(id, &f);
                        let fs = naive.entry(id).or_default();
                        fs.retain(|g| g.requested != f);
                        prop_assert_eq!(left, fs.len());
                    }
                    Op::Leave(id) => {
                        index.remove_all(id);
                        naive.remove(&id);
                    }
                }
                naive.retain(|_, fs| !fs.is_empty());
                prop_assert_eq!(index.len(), naive.len());
            }
            for device in ["dev1", "dev2", "dev3", "dev4"] {
                for event in Event::ALL {
                    let rest = format!("devices.{device}.{}", event.subject_suffix());
                    let mut want: Vec<u64> = naive
                        .iter()
                        .filter(|(_, fs)| fs.iter().any(|f| f.matches(&rest, '.')))
                        .map(|(id, _)| *id)
                        .collect();
                    want.sort_unstable();
                    prop_assert_eq!(matched(&index, device, event), want, "{}", rest);
                }
            }
        }
    }
}
