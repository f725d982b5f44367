//! Waiting for something that should happen soon, with a bound and a message that says
//! what did not happen.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it succeeds; panics after `limit` with the last error.
pub async fn eventually<T, E: Debug, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what}: still {e:?} after {limit:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
