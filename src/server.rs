//! A running node: the MQTT listener with its accept loop and connection limit, the HTTP
//! listener, the cluster signal loop, and shutdown with drain (DESIGN §8).
//!
//! Shutdown flows one way: the [`Node`]'s token is cancelled; readiness goes false and the
//! listener closes at once; connected clients are told to close spread evenly over the
//! grace period; then the process may exit. A hard deadline bounds the whole drain.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::bus::BusError;
use crate::cluster::{SignalHandler, SIGNAL_FILTER};
use crate::mqtt::outbox::CloseReason;
use crate::mqtt::session;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The cluster signal subscription failed.
    #[error("cannot subscribe to cluster signals: {0}")]
    Signals(#[from] BusError),
}

/// A started node.
pub struct Node {
    /// The node's handles.
    pub app: Arc<App>,
    /// Where MQTT is served (the real port when configured with port 0).
    pub mqtt_addr: SocketAddr,
    /// Where HTTP is served.
    pub http_addr: SocketAddr,
    /// Where the probes are served apart from the admin API (`http.metrics_listen`).
    pub metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    mqtt_task: JoinHandle<()>,
    /// Stops HTTP, which keeps answering (not ready) until the drain is over.
    http_stop: CancellationToken,
    http_task: JoinHandle<()>,
    metrics_task: Option<JoinHandle<()>>,
    signal_task: JoinHandle<()>,
    /// Catches up on missed revocations after bus reconnections (NATS only).
    catch_up_task: Option<JoinHandle<()>>,
}

async fn bind(addr: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

impl Node {
    /// Binds the listeners and starts serving.
    pub async fn start(app: Arc<App>) -> Result<Node, StartError> {
        let mqtt = bind(&app.config.mqtt.listen).await?;
        let http = bind(&app.config.http.listen).await?;
        let mqtt_addr = mqtt.local_addr().map_err(|source| StartError::Bind {
            addr: app.config.mqtt.listen.clone(),
            source,
        })?;
        let http_addr = http.local_addr().map_err(|source| StartError::Bind {
            addr: app.config.http.listen.clone(),
            source,
        })?;
        let metrics = match app.config.http.metrics_listen.as_str() {
            "" => None,
            addr => Some(bind(addr).await?),
        };
        let metrics_addr = match &metrics {
            Some(l) => Some(l.local_addr().map_err(|source| StartError::Bind {
                addr: app.config.http.metrics_listen.clone(),
                source,
            })?),
            None => None,
        };
        let signals = app.bus.subscribe(SIGNAL_FILTER.to_owned()).await?;
        let handler = SignalHandler {
            node: app.node_id.clone(),
            registry: app.registry.clone(),
            auth: app.auth.clone(),
        };
        let shutdown = CancellationToken::new();
        let http_stop = CancellationToken::new();
        let catch_up_task = app.bus.connections().map(|connections| {
            tokio::spawn(handler.clone().catch_up_after_reconnections(connections))
        });
        let signal_task = tokio::spawn(handler.run(signals));
        let http_task = tokio::spawn(crate::http::serve(
            http,
            app.clone(),
            false,
            http_stop.clone(),
        ));
        let metrics_task = metrics.map(|listener| {
            tokio::spawn(crate::http::serve(
                listener,
                app.clone(),
                true,
                http_stop.clone(),
            ))
        });
        let mqtt_task = tokio::spawn(accept_loop(mqtt, app.clone(), shutdown.clone()));
        tracing::info!(node = %app.node_id, mqtt = %mqtt_addr, http = %http_addr, "node started");
        Ok(Node {
            app,
            mqtt_addr,
            http_addr,
            metrics_addr,
            shutdown,
            mqtt_task,
            http_stop,
            http_task,
            metrics_task,
            signal_task,
            catch_up_task,
        })
    }

    /// A token that starts the drain when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Drains and stops the node; returns when it is done.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the node has drained after its token was cancelled.
    pub async fn wait(self) {
        let _ = self.mqtt_task.await;
        self.http_stop.cancel();
        let _ = self.http_task.await;
        if let Some(t) = self.metrics_task {
            let _ = t.await;
        }
        self.signal_task.abort();
        if let Some(t) = &self.catch_up_task {
            t.abort();
        }
        tracing::info!(node = %self.app.node_id, "node stopped");
    }
}

/// Accepts and spawns; the connection bounds are the handshake's (`mqtt::admission`): a
/// socket waits for its CONNECT in a pending-handshake slot, and only an authenticated
/// client takes one of `mqtt.max_connections`.
async fn accept_loop(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(session::serve(app.clone(), stream, peer));
    }
    drop(listener);
    drain(&app).await;
}

/// Readiness false, then clients told to close spread over the grace period, then wait for
/// them to finish, bounded by a hard deadline.
async fn drain(app: &App) {
    app.draining.store(true, Ordering::Release);
    let grace = app.config.shutdown.grace_period;
    let conns = app.registry.all();
    tracing::info!(connections = conns.len(), ?grace, "draining");
    let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(5);
    if !conns.is_empty() {
        // Leave a fifth of the window for the last clients to go.
        let spread = grace.mul_f32(0.8);
        let step = spread / conns.len() as u32;
        let mut tick = tokio::time::interval(step.max(Duration::from_micros(100)));
        for c in conns {
            tick.tick().await;
            c.outbox.close(CloseReason::Draining);
        }
    }
    let _ = tokio::time::timeout_at(deadline, app.admission.all_closed()).await;
}
