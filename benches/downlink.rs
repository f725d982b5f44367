//! Downlink request validation (`src/downlink/validate.rs`): the JSON body of a
//! `down/push` or `down/replace`, parsed and checked field by field.
//!
//! `cargo bench --bench downlink`

mod common;

use std::hint::black_box;
use std::time::Duration;

use base64::Engine as _;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lorabroker::downlink::validate::{parse_request, RequestLimits};
use serde_json::json;

fn bench_validate(c: &mut Criterion) {
    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![0xa5u8; n]);
    let small = json!({"downlinks":[{"f_port":15,"frm_payload":"vu8=","priority":"NORMAL"}]});
    let max = json!({"downlinks":[{
        "f_port":15,"frm_payload":b64(250),"priority":"HIGH","confirmed":true,
        "correlation_ids":["my-correlation-id"]}]});
    let item = json!({"f_port":1,"frm_payload":b64(16),"priority":"NORMAL",
        "correlation_ids":["app:order:12345"]});
    let multi = json!({ "downlinks": vec![item; 10] });
    let decoded = json!({"downlinks":[{"f_port":2,
        "decoded_payload":{"led":"on","level":42,"bytes":[1,2,3]}, "confirmed":false}]});
    let invalid = json!({"downlinks":[{"f_port":15,"frm_payload":"vu8=","fport":1}]});

    let limits = RequestLimits::default();
    let mut g = c.benchmark_group("downlink/parse_request");
    for (name, body, ok) in [
        ("small", &small, true),
        ("frm_payload_250b", &max, true),
        ("ten_items", &multi, true),
        ("decoded_payload", &decoded, true),
        ("unknown_field", &invalid, false),
    ] {
        let body = body.to_string().into_bytes();
        assert_eq!(parse_request(&body, &limits).is_ok(), ok, "{name}");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| parse_request(black_box(&body), &limits))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(Duration::from_secs(1), 30);
    targets = bench_validate
}
criterion_main!(benches);
