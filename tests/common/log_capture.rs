//! What a test binary logs, captured so that a test can assert on its log lines (the
//! address a PROXY header announced, a warning naming a file, no secret in any line).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// Everything the test binary logged through `tracing` with `filter` (an `EnvFilter`
/// directive such as `info` or `lorabroker=debug`). The first call installs the global
/// subscriber, so one binary uses one filter.
pub fn captured(filter: &str) -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        log
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
