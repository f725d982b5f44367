//! API key verification (`src/auth`): the cached [`Authenticator`] in front of an
//! in-memory key store (cache hit, negative and positive miss), and the raw key parsing
//! and constant-time secret check under it.
//!
//! `cargo bench --bench auth`

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use lorabroker::auth::{
    generate, Authenticator, CacheSettings, KeyStore, MemoryKeyStore, PresentedKey, Rights,
    StoredKey,
};
use lorabroker::topic::{AppRef, Id};

fn app() -> AppRef {
    AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn authenticator(store: Arc<MemoryKeyStore>) -> Authenticator {
    Authenticator::new(
        store,
        &CacheSettings {
            ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
            capacity: 100_000,
            ..CacheSettings::default()
        },
    )
}

fn bench_authenticator(c: &mut Criterion) {
    let rt = runtime();
    let store = Arc::new(MemoryKeyStore::new());
    let auth = authenticator(store.clone());
    let app = app();
    let key = generate();
    rt.block_on(store.insert(&StoredKey::new(&key, &app, Rights::DEFAULT, "bench", None)))
        .unwrap();
    rt.block_on(auth.authenticate(&app, &key.key)).unwrap();

    let mut g = c.benchmark_group("auth/authenticate");
    g.bench_function("cache_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { auth.authenticate(&app, black_box(&key.key)).await.unwrap() })
    });
    // A fresh unknown key every time: the store is asked and the answer cached negatively.
    g.bench_function("miss_unknown_key", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (auth, app) = (&auth, &app);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let unknown = generate();
                    let start = Instant::now();
                    let r = auth.authenticate(app, black_box(&unknown.key)).await;
                    total += start.elapsed();
                    assert!(r.is_err());
                }
                total
            }
        })
    });
    // A known key evicted before each use: store lookup, verification, positive insert.
    g.bench_function("miss_known_key", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (auth, app, key) = (&auth, &app, &key);
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    auth.evict(&key.id).await;
                    let start = Instant::now();
                    let r = auth.authenticate(app, black_box(&key.key)).await;
                    total += start.elapsed();
                    assert!(r.is_ok());
                }
                total
            }
        })
    });
    g.finish();
}

fn bench_key(c: &mut Criterion) {
    let key = generate();
    let presented = PresentedKey::parse(&key.key).unwrap();
    let mut g = c.benchmark_group("auth/key");
    g.bench_function("parse", |b| {
        b.iter(|| PresentedKey::parse(black_box(&key.key)).unwrap())
    });
    g.bench_function("verify", |b| {
        b.iter(|| black_box(&presented).verify(black_box(&key.secret_hash)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::config(Duration::from_secs(2), 30);
    targets = bench_authenticator, bench_key
}
criterion_main!(benches);
