//! Criterion settings shared by the benches: short runs, so that `cargo bench` of every
//! bench stays within a few minutes on a 2-core machine.

use std::time::Duration;

use criterion::Criterion;

/// Criterion measuring for `measurement` after half as long (at most 500 ms) of warm-up.
pub fn config(measurement: Duration, samples: usize) -> Criterion {
    Criterion::default()
        .warm_up_time((measurement / 2).min(Duration::from_millis(500)))
        .measurement_time(measurement)
        .sample_size(samples)
}
