//! The [`Index`] of one application's local subscribers: who gets a device event, found
//! without matching every subscriber's filters against it, and kept up to date at the cost
//! of the one filter added or removed.
//!
//! Each filter stands for a [`Selection`] (one device or any device, and a set of events).
//! A subscriber's filters are grouped by what they select: its any-device filters form one
//! slot in the `any` bucket, its filters of one device one slot in that device's bucket.
//! A slot holds the union of its filters' events and, once it holds more than one filter,
//! how many of them select each event, so that adding or removing a filter updates one slot
//! in place: the cost is that of hashing the filter and its device, whatever the number of
//! filters of the subscriber, of the device or of the application.
//!
//! A device event consults the `any` bucket and the device's bucket, and reaches each
//! subscriber at most once: a device slot skips the events its subscriber's `any` slot
//! already delivers (looked up by the subscriber's slot number in a dense table, so that a
//! change of the `any` slot never touches the device slots). This module does not know the
//! bus or the wire.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use crate::mqtt::outbox::Outbox;
use crate::topic::{Event, EventSet, Filter, Id, Selection};

/// Buckets up to this long find a subscriber's slot by scanning; longer ones keep a map.
const SCAN: usize = 8;

/// The filter was refused: the subscriber already has the most filters allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection already has {max} filters, the most allowed")]
pub struct TooManyFilters {
    /// The limit.
    pub max: usize,
}

/// What [`Index::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Removed {
    /// Whether the subscriber had that filter.
    pub removed: bool,
    /// How many filters the subscriber has left.
    pub left: usize,
}

/// One application's subscribers, indexed by device.
#[derive(Default)]
pub struct Index {
    subscribers: HashMap<u64, Subscriber>,
    /// Every subscriber with an any-device filter.
    any: Bucket,
    /// Per device, the subscribers with a filter of that device.
    by_device: HashMap<Id, Bucket>,
    /// By slot number: the events a subscriber's `any` slot delivers (none without one).
    covered: Vec<EventSet>,
    /// Slot numbers of subscribers that left, for reuse.
    free: Vec<u32>,
}

/// One subscriber's granted filters.
struct Subscriber {
    /// Its number in `covered` and in its slots.
    number: u32,
    filters: Filters,
}

/// Where one subscriber receives a group of its filters (its any-device ones, or those of
/// one device), and which events they select.
struct Slot {
    number: u32,
    events: EventSet,
    outbox: Arc<Outbox>,
    /// `None` while the group is one filter (selecting `events`); else per-event counts.
    counts: Option<Box<Counts>>,
}

/// How many filters of a group there are, and how many select each event.
struct Counts {
    filters: u32,
    per_event: [u32; Event::ALL.len()],
}

impl Counts {
    /// The counts of one filter selecting `events`.
    fn one(events: EventSet) -> Self {
        let mut counts = Counts {
            filters: 0,
            per_event: [0; Event::ALL.len()],
        };
        counts.add(events);
        counts
    }

    fn add(&mut self, events: EventSet) {
        self.filters += 1;
        for (count, event) in self.per_event.iter_mut().zip(Event::ALL) {
            if events.contains(event) {
                *count += 1;
            }
        }
    }

    fn remove(&mut self, events: EventSet) {
        self.filters = self.filters.saturating_sub(1);
        for (count, event) in self.per_event.iter_mut().zip(Event::ALL) {
            if events.contains(event) {
                *count = count.saturating_sub(1);
            }
        }
    }

    /// The events at least one filter selects.
    fn events(&self) -> EventSet {
        let mut events = EventSet::NONE;
        for (count, event) in self.per_event.iter().zip(Event::ALL) {
            if *count > 0 {
                events.insert(event);
            }
        }
        events
    }
}

impl Slot {
    /// Adds a filter selecting `events` to this slot's group.
    fn add(&mut self, events: EventSet) {
        let counts = self
            .counts
            .get_or_insert_with(|| Box::new(Counts::one(self.events)));
        counts.add(events);
        self.events = self.events.union(events);
    }

    /// Removes a filter selecting `events`; `false` when the group is left empty.
    fn remove(&mut self, events: EventSet) -> bool {
        let Some(counts) = &mut self.counts else {
            return false;
        };
        counts.remove(events);
        self.events = counts.events();
        if counts.filters <= 1 {
            // One filter left: its events are the union; no counts needed.
            self.counts = None;
        }
        true
    }
}

/// A list of slots, one per subscriber, that finds a subscriber's slot without scanning a
/// long list.
#[derive(Default)]
struct Bucket {
    slots: Vec<Slot>,
    /// Position of each subscriber's slot, once the list is longer than [`SCAN`]. Boxed:
    /// most buckets never need it, and every device bucket carries the field.
    #[allow(clippy::box_collection)]
    at: Option<Box<HashMap<u32, u32>>>,
}

impl Bucket {
    fn find(&self, number: u32) -> Option<usize> {
        match &self.at {
            Some(at) => at.get(&number).map(|&i| i as usize),
            None => self.slots.iter().position(|s| s.number == number),
        }
    }

    fn push(&mut self, slot: Slot) {
        let (number, i) = (slot.number, self.slots.len() as u32);
        if self.slots.capacity() == 0 {
            // Sized for the usual single subscriber of a device (a first push would make
            // room for four): this is per-connection memory.
            self.slots.reserve_exact(1);
        }
        self.slots.push(slot);
        match &mut self.at {
            Some(at) => {
                at.insert(number, i);
            }
            None if self.slots.len() > SCAN => {
                let at = self.slots.iter().enumerate();
                self.at = Some(Box::new(at.map(|(i, s)| (s.number, i as u32)).collect()));
            }
            None => {}
        }
    }

    fn swap_remove(&mut self, i: usize) {
        let gone = self.slots.swap_remove(i);
        if let Some(at) = &mut self.at {
            at.remove(&gone.number);
            if let Some(moved) = self.slots.get(i) {
                at.insert(moved.number, i as u32);
            }
            if self.slots.len() <= SCAN / 2 {
                self.at = None;
            } else {
                shrink_map(at);
            }
        }
        if self.slots.capacity() > 2 * self.slots.len() + SCAN {
            self.slots.shrink_to_fit();
        }
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// Gives back the memory of a map that shrank to a quarter of its capacity: amortised over
/// the removals that shrank it, this costs O(1) per removal.
fn shrink_map<K: Eq + Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 4 * map.len() + 2 * SCAN {
        map.shrink_to_fit();
    }
}

/// A subscriber's filters by requested text: a short list while there are few (most
/// connections have one to a dozen, and a list of one is a fifth of a map's memory), a map
/// beyond.
enum Filters {
    Few(Vec<(Box<str>, Selection)>),
    /// Boxed, so that the usual `Few` costs no room for a map in every subscriber.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Box<str>, Selection>>),
}

impl Filters {
    fn get(&self, requested: &str) -> Option<&Selection> {
        match self {
            Filters::Few(list) => list.iter().find(|(r, _)| **r == *requested).map(|(_, s)| s),
            Filters::Many(map) => map.get(requested),
        }
    }

    /// Adds a filter that is not there yet.
    fn insert(&mut self, requested: Box<str>, selection: Selection) {
        match self {
            Filters::Few(list) if list.len() < SCAN => list.push((requested, selection)),
            Filters::Few(list) => {
                let mut map: HashMap<_, _> = std::mem::take(list).into_iter().collect();
                map.insert(requested, selection);
                *self = Filters::Many(Box::new(map));
            }
            Filters::Many(map) => {
                map.insert(requested, selection);
            }
        }
    }

    fn remove(&mut self, requested: &str) -> Option<Selection> {
        match self {
            Filters::Few(list) => {
                let i = list.iter().position(|(r, _)| **r == *requested)?;
                Some(list.swap_remove(i).1)
            }
            Filters::Many(map) => {
                let selection = map.remove(requested);
                shrink_map(map);
                selection
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Filters::Few(list) => list.len(),
            Filters::Many(map) => map.len(),
        }
    }
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants `filter` to subscriber `id` (delivering to `outbox`, the same for every filter
    /// of `id`) unless `id` already has
    /// `max_filters` other filters. Returns whether the filter is new: a filter with the
    /// same requested text replaces the old one (MQTT 3.1.1 §3.8.4), which changes nothing
    /// and is not counted twice.
    pub fn add(
        &mut self,
        id: u64,
        outbox: &Arc<Outbox>,
        filter: &Filter,
        max_filters: usize,
    ) -> Result<bool, TooManyFilters> {
        let number = match self.subscribers.get(&id) {
            Some(sub) if sub.filters.get(&filter.requested).is_some() => return Ok(false),
            Some(sub) if sub.filters.len() >= max_filters => {
                return Err(TooManyFilters { max: max_filters })
            }
            Some(sub) => sub.number,
            None if max_filters == 0 => return Err(TooManyFilters { max: 0 }),
            None => {
                let number = self.free.pop().unwrap_or_else(|| {
                    self.covered.push(EventSet::NONE);
                    (self.covered.len() - 1) as u32
                });
                self.subscribers.insert(
                    id,
                    Subscriber {
                        number,
                        // Sized for the usual single filter: this is per-connection memory.
                        filters: Filters::Few(Vec::with_capacity(1)),
                    },
                );
                number
            }
        };
        let selection = filter.selection().clone();
        let events = selection.events;
        if !events.is_empty() {
            let bucket = match &selection.device {
                None => &mut self.any,
                Some(device) => self.by_device.entry(device.clone()).or_default(),
            };
            let now = match bucket.find(number) {
                Some(i) => {
                    let slot = &mut bucket.slots[i];
                    slot.add(events);
                    slot.events
                }
                None => {
                    bucket.push(Slot {
                        number,
                        events,
                        outbox: outbox.clone(),
                        counts: None,
                    });
                    events
                }
            };
            if selection.device.is_none() {
                self.covered[number as usize] = now;
            }
        }
        if let Some(sub) = self.subscribers.get_mut(&id) {
            sub.filters
                .insert(filter.requested.as_str().into(), selection);
        }
        Ok(true)
    }

    /// Removes the filter `requested` of subscriber `id`; a subscriber left without
    /// filters is forgotten.
    pub fn remove(&mut self, id: u64, requested: &str) -> Removed {
        let Some(sub) = self.subscribers.get_mut(&id) else {
            return Removed::default();
        };
        let Some(selection) = sub.filters.remove(requested) else {
            return Removed {
                removed: false,
                left: sub.filters.len(),
            };
        };
        let (number, left) = (sub.number, sub.filters.len());
        self.unindex(number, &selection);
        if left == 0 {
            self.forget(id);
        }
        Removed {
            removed: true,
            left,
        }
    }

    /// Forgets subscriber `id` and all its filters; returns how many it had.
    pub fn remove_all(&mut self, id: u64) -> usize {
        let Some(sub) = self.subscribers.get_mut(&id) else {
            return 0;
        };
        let number = sub.number;
        let filters = std::mem::replace(&mut sub.filters, Filters::Few(Vec::new()));
        let n = filters.len();
        match filters {
            Filters::Few(list) => list
                .into_iter()
                .for_each(|(_, selection)| self.unindex(number, &selection)),
            Filters::Many(map) => (*map)
                .into_values()
                .for_each(|selection| self.unindex(number, &selection)),
        }
        self.forget(id);
        n
    }

    /// Whether nobody is subscribed.
    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.subscribers.len()
    }

    /// Number of filters of subscriber `id`.
    pub fn filters(&self, id: u64) -> usize {
        self.subscribers.get(&id).map_or(0, |s| s.filters.len())
    }

    /// Calls `deliver` once for each subscriber that wants `event` of `device`.
    pub fn for_each_match(
        &self,
        device: &str,
        event: Event,
        mut deliver: impl FnMut(&Arc<Outbox>),
    ) {
        for slot in &self.any.slots {
            if slot.events.contains(event) {
                deliver(&slot.outbox);
            }
        }
        // No hashing at all when every subscriber takes every device (plain fan-out).
        if self.by_device.is_empty() {
            return;
        }
        let Some(bucket) = self.by_device.get(device) else {
            return;
        };
        for slot in &bucket.slots {
            if slot.events.contains(event)
                && !self
                    .covered
                    .get(slot.number as usize)
                    .is_some_and(|c| c.contains(event))
            {
                deliver(&slot.outbox);
            }
        }
    }

    /// Takes a filter selecting `selection` out of subscriber `number`'s slots.
    fn unindex(&mut self, number: u32, selection: &Selection) {
        if selection.events.is_empty() {
            return;
        }
        let (bucket, device) = match &selection.device {
            None => (&mut self.any, None),
            Some(device) => match self.by_device.get_mut(device) {
                Some(bucket) => (bucket, Some(device)),
                None => return,
            },
        };
        let Some(i) = bucket.find(number) else {
            return;
        };
        let kept = bucket.slots[i].remove(selection.events);
        let events = if kept {
            bucket.slots[i].events
        } else {
            bucket.swap_remove(i);
            EventSet::NONE
        };
        match device {
            None => self.covered[number as usize] = events,
            Some(device) if bucket.is_empty() => {
                self.by_device.remove(device);
                shrink_map(&mut self.by_device);
            }
            Some(_) => {}
        }
    }

    /// Drops subscriber `id`, whose slots are already gone.
    fn forget(&mut self, id: u64) {
        if let Some(sub) = self.subscribers.remove(&id) {
            self.covered[sub.number as usize] = EventSet::NONE;
            self.free.push(sub.number);
            shrink_map(&mut self.subscribers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{AppRef, Tenancy};
    use proptest::prelude::*;

    const NO_LIMIT: usize = usize::MAX;

    fn filter(f: &str) -> Filter {
        let app = AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap());
        Filter::rewrite(&Tenancy::Multi, &app, f).unwrap()
    }

    /// Subscribers by ID, each with an outbox of its own so that deliveries name them.
    #[derive(Default)]
    struct Outboxes(HashMap<u64, Arc<Outbox>>);

    impl Outboxes {
        fn of(&mut self, id: u64) -> Arc<Outbox> {
            self.0
                .entry(id)
                .or_insert_with(|| Arc::new(Outbox::new(1024)))
                .clone()
        }

        fn matched(&self, index: &Index, device: &str, event: Event) -> Vec<u64> {
            let mut ids = Vec::new();
            index.for_each_match(device, event, |outbox| {
                let id = self.0.iter().find(|(_, o)| Arc::ptr_eq(o, outbox));
                ids.push(*id.expect("an outbox of a subscriber").0);
            });
            ids.sort_unstable();
            ids
        }
    }

    fn add(index: &mut Index, outboxes: &mut Outboxes, id: u64, f: &str) -> bool {
        index
            .add(id, &outboxes.of(id), &filter(f), NO_LIMIT)
            .unwrap()
    }

    #[test]
    fn each_subscriber_at_most_once() {
        let (mut index, mut o) = (Index::new(), Outboxes::default());
        add(&mut index, &mut o, 1, "#");
        add(&mut index, &mut o, 1, "v3/+/devices/dev1/#");
        add(&mut index, &mut o, 2, "v3/+/devices/dev1/up");
        add(&mut index, &mut o, 2, "v3/+/devices/dev1/+");
        add(&mut index, &mut o, 3, "v3/+/devices/dev2/up");
        assert_eq!(o.matched(&index, "dev1", Event::Up), vec![1, 2]);
        assert_eq!(o.matched(&index, "dev1", Event::UpNormalized), vec![1]);
        assert_eq!(o.matched(&index, "dev2", Event::Up), vec![1, 3]);
        let removed = index.remove(1, "#");
        assert_eq!(
            removed,
            Removed {
                removed: true,
                left: 1
            }
        );
        assert_eq!(o.matched(&index, "dev2", Event::Up), vec![3]);
        assert_eq!(o.matched(&index, "dev1", Event::UpNormalized), vec![1]);
        assert_eq!(index.remove_all(2), 2);
        assert_eq!(index.remove(3, "v3/+/devices/dev2/up").left, 0);
        assert_eq!(index.len(), 1);
        assert_eq!(index.remove(1, "v3/+/devices/dev1/#").left, 0);
        assert!(index.is_empty());
        assert!(index.any.is_empty() && index.by_device.is_empty());
        assert_eq!(index.remove(9, "#"), Removed::default());
    }

    #[test]
    fn same_filter_twice_is_one_subscription() {
        let (mut index, mut o) = (Index::new(), Outboxes::default());
        assert!(add(&mut index, &mut o, 1, "v3/+/devices/dev1/up"));
        assert!(!add(&mut index, &mut o, 1, "v3/+/devices/dev1/up"));
        assert_eq!(index.filters(1), 1);
        assert_eq!(o.matched(&index, "dev1", Event::Up), vec![1]);
        assert_eq!(index.remove(1, "v3/+/devices/dev1/up").left, 0);
        assert!(index.by_device.is_empty());
    }

    /// Overlapping filters of one device share a slot; removing one keeps what the others
    /// still select.
    #[test]
    fn overlapping_filters_of_one_device_count_per_event() {
        let (mut index, mut o) = (Index::new(), Outboxes::default());
        add(&mut index, &mut o, 1, "v3/+/devices/dev1/up");
        add(&mut index, &mut o, 1, "v3/app1@tenant1/devices/dev1/up");
        add(&mut index, &mut o, 1, "v3/+/devices/dev1/#");
        assert_eq!(index.by_device["dev1"].slots.len(), 1);
        index.remove(1, "v3/+/devices/dev1/#");
        assert_eq!(o.matched(&index, "dev1", Event::Join), Vec::<u64>::new());
        assert_eq!(o.matched(&index, "dev1", Event::Up), vec![1]);
        index.remove(1, "v3/+/devices/dev1/up");
        assert_eq!(o.matched(&index, "dev1", Event::Up), vec![1]);
        assert!(index.by_device["dev1"].slots[0].counts.is_none());
        index.remove(1, "v3/app1@tenant1/devices/dev1/up");
        assert!(index.is_empty() && index.by_device.is_empty());
    }

    #[test]
    fn the_filter_limit_counts_distinct_filters() {
        let (mut index, mut o) = (Index::new(), Outboxes::default());
        let outbox = o.of(1);
        let mut add = |f: &str| index.add(1, &outbox, &filter(f), 2);
        assert_eq!(add("v3/+/devices/dev1/up"), Ok(true));
        assert_eq!(add("v3/+/devices/dev2/up"), Ok(true));
        assert_eq!(add("v3/+/devices/dev3/up"), Err(TooManyFilters { max: 2 }));
        // Subscribing again to a filter it has is no new filter.
        assert_eq!(add("v3/+/devices/dev1/up"), Ok(false));
        assert_eq!(index.filters(1), 2);
        index.remove(1, "v3/+/devices/dev1/up");
        assert_eq!(index.add(1, &outbox, &filter("#"), 2), Ok(true));
        assert_eq!(
            index.add(2, &o.of(2), &filter("#"), 0),
            Err(TooManyFilters { max: 0 })
        );
        assert_eq!(index.len(), 1);
    }

    /// A bucket longer than [`SCAN`] finds slots through its map, and gives the map up when
    /// it shrinks again.
    #[test]
    fn long_buckets_keep_positions() {
        let (mut index, mut o) = (Index::new(), Outboxes::default());
        for id in 0..40 {
            add(&mut index, &mut o, id, "v3/+/devices/dev1/up");
            add(&mut index, &mut o, id, "#");
        }
        assert!(index.by_device["dev1"].at.is_some() && index.any.at.is_some());
        for id in (0..40).filter(|id| id % 3 != 0) {
            index.remove(id, "#");
        }
        for id in (0..40).step_by(2) {
            index.remove(id, "v3/+/devices/dev1/up");
        }
        let want_up: Vec<u64> = (0..40).filter(|id| id % 3 == 0 || id % 2 == 1).collect();
        assert_eq!(o.matched(&index, "dev1", Event::Up), want_up);
        let want_join: Vec<u64> = (0..40).filter(|id| id % 3 == 0).collect();
        assert_eq!(o.matched(&index, "dev1", Event::Join), want_join);
        check(&index);
        for id in 0..40 {
            index.remove_all(id);
        }
        assert!(index.is_empty() && index.any.is_empty() && index.by_device.is_empty());
        assert!(index.any.at.is_none());
    }

    /// The index's derived state agrees with its subscribers' filters: one slot per
    /// subscriber and group, holding the union of the group's events (and their counts),
    /// `covered` equal to the `any` slots, bucket maps pointing at the right slots, no empty
    /// bucket, no stray slot.
    fn check(index: &Index) {
        let mut want: HashMap<(Option<Id>, u32), (EventSet, u32)> = HashMap::new();
        for sub in index.subscribers.values() {
            let selections: Vec<&Selection> = match &sub.filters {
                Filters::Few(list) => list.iter().map(|(_, s)| s).collect(),
                Filters::Many(map) => map.values().collect(),
            };
            for s in selections.into_iter().filter(|s| !s.events.is_empty()) {
                let group = want
                    .entry((s.device.clone(), sub.number))
                    .or_insert((EventSet::NONE, 0));
                group.0 = group.0.union(s.events);
                group.1 += 1;
            }
        }
        let buckets = std::iter::once((None, &index.any))
            .chain(index.by_device.iter().map(|(d, b)| (Some(d.clone()), b)));
        let mut slots = 0;
        for (device, bucket) in buckets {
            assert!(
                device.is_none() || !bucket.is_empty(),
                "empty bucket {device:?}"
            );
            for (i, slot) in bucket.slots.iter().enumerate() {
                slots += 1;
                let (events, n) = want[&(device.clone(), slot.number)];
                assert_eq!(slot.events, events, "{device:?}");
                match &slot.counts {
                    None => assert_eq!(n, 1),
                    Some(c) => {
                        assert_eq!((c.filters, c.events()), (n, events));
                        assert!(n > 1);
                    }
                }
                assert_eq!(bucket.find(slot.number), Some(i));
                if device.is_none() {
                    assert_eq!(index.covered[slot.number as usize], events);
                }
            }
            if let Some(at) = &bucket.at {
                assert_eq!(at.len(), bucket.slots.len());
            }
        }
        assert_eq!(slots, want.len());
        for sub in index.subscribers.values() {
            if !want.contains_key(&(None, sub.number)) {
                assert_eq!(index.covered[sub.number as usize], EventSet::NONE);
            }
        }
    }

    /// Every connection with a filter has a subscriber, a slot and (for a device filter) a
    /// bucket entry: keep them from growing (issue 4's budget for an idle, subscribed
    /// connection is 2 KiB of broker memory).
    #[test]
    fn per_connection_structures_stay_small() {
        use std::mem::size_of;
        assert!(size_of::<Subscriber>() <= 40, "{}", size_of::<Subscriber>());
        assert!(size_of::<Slot>() <= 24, "{}", size_of::<Slot>());
        assert!(size_of::<Bucket>() <= 32, "{}", size_of::<Bucket>());
        let (mut index, mut o) = (Index::new(), Outboxes::default());
        add(&mut index, &mut o, 1, "v3/+/devices/dev1/#");
        assert_eq!(index.by_device["dev1"].slots.capacity(), 1);
        let Filters::Few(list) = &index.subscribers[&1].filters else {
            panic!("one filter is a list")
        };
        assert_eq!(list.capacity(), 1);
    }

    /// One step of a subscriber's life.
    #[derive(Debug, Clone)]
    enum Op {
        Add(u64, String, usize),
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
            "v3/app1@tenant1/devices/dev1/up",
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
        // More subscribers than a bucket scans, so that bucket maps are exercised too.
        let id = 0u64..(2 * SCAN as u64 + 4);
        prop_oneof![
            6 => (id.clone(), any_filter(), prop_oneof![4 => Just(NO_LIMIT), 1 => 0usize..4])
                .prop_map(|(id, f, max)| Op::Add(id, f, max)),
            3 => (id.clone(), any_filter()).prop_map(|(id, f)| Op::Remove(id, f)),
            1 => id.prop_map(Op::Leave),
        ]
    }

    proptest! {
        /// After any sequence of subscribes (some with a filter limit) and unsubscribes,
        /// the index grants what the naive model grants, keeps its derived state consistent,
        /// and delivers each device event to exactly the subscribers one of whose filters
        /// matches it, once each: the same as the naive scan over every subscriber's filters.
        #[test]
        fn index_equals_naive_scan(ops in prop::collection::vec(any_op(), 0..80)) {
            let (mut index, mut outboxes) = (Index::new(), Outboxes::default());
            let mut naive: HashMap<u64, Vec<Filter>> = HashMap::new();
            for op in ops {
                match op {
                    Op::Add(id, f, max) => {
                        let f = filter(&f);
                        let got = index.add(id, &outboxes.of(id), &f, max);
                        let fs = naive.entry(id).or_default();
                        let want = if fs.iter().any(|g| g.requested == f.requested) {
                            Ok(false)
                        } else if fs.len() >= max {
                            Err(TooManyFilters { max })
                        } else {
                            fs.push(f);
                            Ok(true)
                        };
                        prop_assert_eq!(got, want);
                    }
                    Op::Remove(id, f) => {
                        let got = index.remove(id, &f);
                        let fs = naive.entry(id).or_default();
                        let before = fs.len();
                        fs.retain(|g| g.requested != f);
                        prop_assert_eq!(got, Removed { removed: fs.len() < before, left: fs.len() });
                    }
                    Op::Leave(id) => {
                        let had = naive.remove(&id).map_or(0, |fs| fs.len());
                        prop_assert_eq!(index.remove_all(id), had);
                    }
                }
                naive.retain(|_, fs| !fs.is_empty());
                prop_assert_eq!(index.len(), naive.len());
                for (id, fs) in &naive {
                    prop_assert_eq!(index.filters(*id), fs.len());
                }
                check(&index);
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
                    prop_assert_eq!(outboxes.matched(&index, device, event), want, "{}", rest);
                }
            }
        }
    }
}
