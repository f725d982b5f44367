//! Topics (`src/topic.rs`): The Things Stack's filter rewriting, filter matching, and the
//! mapping between MQTT topics and NATS subjects.
//!
//! `cargo bench --bench topic`

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use lorabroker::topic::{
    parse_downlink_topic, parse_subject_rest, topic_to_subject, AppRef, Filter, Id, Tenancy,
};

fn app() -> AppRef {
    AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap())
}

fn bench_rewrite(c: &mut Criterion) {
    let (tenancy, app) = (Tenancy::Multi, app());
    let mut g = c.benchmark_group("topic/rewrite");
    for (name, f) in [
        ("hash", "#"),
        ("plus_device_up", "v3/+/devices/+/up"),
        ("own_app_device", "v3/app1@tenant1/devices/dev1/#"),
        ("denied", "v3/app2@tenant1/#"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| Filter::rewrite(&tenancy, &app, black_box(f)))
        });
    }
    g.finish();
}

fn bench_matches(c: &mut Criterion) {
    let (tenancy, app) = (Tenancy::Multi, app());
    let mut g = c.benchmark_group("topic/matches");
    for (name, f, rest, expect) in [
        ("hash", "#", "devices.dev1.up", true),
        ("plus_up_hit", "v3/+/devices/+/up", "devices.dev1.up", true),
        (
            "plus_up_miss",
            "v3/+/devices/+/up",
            "devices.dev1.up.normalized",
            false,
        ),
        (
            "device_hit",
            "v3/+/devices/device-000123/#",
            "devices.device-000123.down.ack",
            true,
        ),
        (
            "device_miss",
            "v3/+/devices/device-000123/#",
            "devices.device-000124.down.ack",
            false,
        ),
    ] {
        let filter = Filter::rewrite(&tenancy, &app, f).unwrap();
        assert_eq!(filter.matches(rest, '.'), expect, "{name}");
        g.bench_function(name, |b| b.iter(|| filter.matches(black_box(rest), '.')));
    }
    g.finish();
}

fn bench_subjects(c: &mut Criterion) {
    let (tenancy, app) = (Tenancy::Multi, app());
    let mut g = c.benchmark_group("topic/subject");
    g.bench_function("topic_to_subject", |b| {
        b.iter(|| topic_to_subject(black_box("v3/app1@tenant1/devices/dev1/up/normalized")))
    });
    g.bench_function("parse_subject_rest", |b| {
        b.iter(|| parse_subject_rest(black_box("devices.device-000123.up.normalized")))
    });
    g.bench_function("parse_downlink_topic", |b| {
        b.iter(|| {
            parse_downlink_topic(
                &tenancy,
                &app,
                black_box("v3/app1@tenant1/devices/dev1/down/push"),
            )
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(Duration::from_secs(1), 30);
    targets = bench_rewrite, bench_matches, bench_subjects
}
criterion_main!(benches);
