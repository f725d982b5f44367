//! MQTT wire codec (`src/mqtt/codec.rs`): decoding the packets clients send (CONNECT,
//! SUBSCRIBE, PUBLISH) and encoding the ones the server sends (the shared QoS 0 PUBLISH,
//! SUBACK, CONNACK).
//!
//! `cargo bench --bench codec`

mod common;

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lorabroker::mqtt::codec::{decode, encode, encode_publish, Decoded};
use mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, Publish, SubAck, Subscribe, SubscribeReasonCode,
};
use mqttbytes::QoS;

const MAX: usize = 64 * 1024;
const KEY: &str = "NNSXS.VEEBURF3KR77ZR2GZPYAGTNUSXNYOVVDN6ZYN2I.3GTDWZQJTW7ROIHTXDV2KVQ34SAENO4ZIUHVAKXGA3WNZN4HFNCQ";

fn wire(write: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::new();
    write(&mut buf);
    buf.freeze()
}

fn bench_decode(c: &mut Criterion) {
    let payload = vec![b'x'; 200];
    let publish = wire(|b| {
        Publish::new(
            "v3/app1@tenant1/devices/dev1/down/push",
            QoS::AtMostOnce,
            payload,
        )
        .write(b)
        .map(drop)
        .unwrap()
    });
    let subscribe = wire(|b| {
        Subscribe::new("v3/app1@tenant1/devices/+/up", QoS::AtMostOnce)
            .write(b)
            .map(drop)
            .unwrap()
    });
    let connect = wire(|b| {
        let mut c = Connect::new("client-0001");
        c.keep_alive = 60;
        c.set_login("app1@tenant1", KEY);
        c.write(b).map(drop).unwrap()
    });

    let mut g = c.benchmark_group("codec/decode");
    for (name, bytes) in [
        ("publish_200b", &publish),
        ("subscribe", &subscribe),
        ("connect", &connect),
    ] {
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(name, |b| {
            b.iter_batched(
                || BytesMut::from(&bytes[..]),
                |mut buf| match decode(&mut buf, MAX) {
                    Ok(Decoded::Packet(p)) => p,
                    other => panic!("{other:?}"),
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec/encode");
    for size in [200usize, 4096] {
        let payload = vec![b'x'; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("publish_{size}b"), |b| {
            b.iter(|| {
                encode_publish(
                    black_box("v3/app1@tenant1/"),
                    black_box("devices.dev1.up"),
                    b'.',
                    black_box(&payload),
                )
            })
        });
    }
    g.throughput(Throughput::Elements(1));
    let suback = Packet::SubAck(SubAck::new(
        1,
        vec![SubscribeReasonCode::Success(QoS::AtMostOnce)],
    ));
    g.bench_function("suback", |b| b.iter(|| encode(black_box(&suback))));
    let connack = Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false));
    g.bench_function("connack", |b| b.iter(|| encode(black_box(&connack))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(Duration::from_secs(2), 30);
    targets = bench_decode, bench_encode
}
criterion_main!(benches);
