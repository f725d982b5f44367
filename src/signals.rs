//! How a process answers SIGINT (Ctrl-C) and SIGTERM while a [`Node`] runs: `serve`
//! drains on the first signal and cuts the drain short on the second, as every server an
//! operator knows; `dev` stops at once on the first (nothing load-balances away from a
//! laptop, and a 25 s wait after Ctrl-C only looks like a hang).

use tokio_util::sync::CancellationToken;

use crate::server::Node;

/// SIGINT (Ctrl-C) and SIGTERM, as a stream of their names.
pub struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Takes over SIGINT and SIGTERM from here on.
    pub fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next signal.
    pub async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "SIGINT",
                _ = self.terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

/// How the node answers signals.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OnSignal {
    /// `serve`: the first signal drains over the grace period, a second one cuts it short.
    Drain,
    /// `dev`: the first signal closes every connection and stops (nobody is load-balanced
    /// away from a laptop).
    Stop,
}

/// Runs `node` until signals stop it as `on_signal` says; `also` is cancelled on the
/// first signal (e.g. the simulated fleet of `dev`). Returns when the node has stopped.
pub async fn run_until_signalled(
    node: Node,
    mut signals: Signals,
    also: CancellationToken,
    on_signal: OnSignal,
) {
    let (drain, hurry) = (node.shutdown_token(), node.hurry_token());
    let grace = node.app.config.shutdown.grace_period;
    let watcher = tokio::spawn(async move {
        let signal = signals.next().await;
        also.cancel();
        if on_signal == OnSignal::Stop {
            tracing::info!(signal, "stopping");
            hurry.cancel();
            drain.cancel();
            return;
        }
        tracing::info!(
            signal,
            grace = %humantime::format_duration(grace),
            "draining; send SIGTERM or Ctrl-C again to stop at once"
        );
        drain.cancel();
        let signal = signals.next().await;
        tracing::info!(
            signal,
            "second signal: closing every remaining connection now"
        );
        hurry.cancel();
    });
    node.wait().await;
    watcher.abort();
}
