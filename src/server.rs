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
use crate::cluster::{SignalHandler, SIGNAL_FILTERS};
use crate::mqtt::outbox::CloseReason;
use crate::mqtt::session;
use crate::transport::tls::CertificateWatch;
use crate::transport::ws::WsSettings;
use crate::transport::{Kind, Transport};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// One or both listeners could not be bound (each is reported).
    #[error("{}", listen_problems(.0))]
    Listen(Vec<ListenError>),
    /// A TLS certificate setting cannot be used (the key and the file are named).
    #[error("{0}")]
    Tls(#[from] crate::transport::tls::TlsConfigError),
    /// The cluster signal subscription failed.
    #[error("cannot subscribe to cluster signals: {0}")]
    Signals(#[from] BusError),
}

fn listen_problems(errors: &[ListenError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n  ")
}

/// The listeners of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// MQTT over one transport (`mqtt.listen`, `mqtt.tls.listen`, …).
    Mqtt(Kind),
    /// HTTP (`http.listen`).
    Http,
}

impl Listener {
    /// How to set its address: the command-line flag of `dev` and `serve`, or the setting.
    pub fn flag(self) -> &'static str {
        match self {
            Listener::Mqtt(Kind::Tcp) => "--mqtt-listen",
            Listener::Mqtt(Kind::Tls) => "--mqtt-tls-listen",
            Listener::Mqtt(Kind::Ws) => "--mqtt-ws-listen",
            Listener::Mqtt(kind) => kind.listen_key(),
            Listener::Http => "--http-listen",
        }
    }

    /// Who is likely to hold its port already.
    fn usual_suspect(self) -> &'static str {
        match self {
            Listener::Mqtt(_) => "another MQTT server such as Mosquitto?",
            Listener::Http => "another web server or lorabroker node?",
        }
    }
}

/// A listener that could not be bound, with what to do about it.
#[derive(Debug)]
pub struct ListenError {
    /// Which listener.
    pub listener: Listener,
    /// The configured address.
    pub addr: String,
    /// A nearby port on the same address that was free a moment ago (address in use only).
    pub free: Option<SocketAddr>,
    /// What the operating system said.
    pub error: std::io::Error,
}

impl std::fmt::Display for ListenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (addr, flag) = (&self.addr, self.listener.flag());
        if !flag.starts_with("--") {
            // Set in the configuration only.
            let advice = match self.free {
                Some(free) => format!("set {flag} = \"{free}\" (free)"),
                None => format!("set {flag} to a free address"),
            };
            return match self.error.kind() {
                std::io::ErrorKind::AddrInUse => write!(
                    f,
                    "{addr} is in use ({}); {advice}",
                    self.listener.usual_suspect()
                ),
                _ => write!(f, "cannot listen on {addr}: {}; {advice}", self.error),
            };
        }
        match (self.error.kind(), self.free) {
            (std::io::ErrorKind::AddrInUse, Some(free)) => write!(
                f,
                "{addr} is in use ({}); run with {flag} {free} (free)",
                self.listener.usual_suspect()
            ),
            (std::io::ErrorKind::AddrInUse, None) => write!(
                f,
                "{addr} is in use ({}); run with {flag} and a free address",
                self.listener.usual_suspect()
            ),
            _ => write!(
                f,
                "cannot listen on {addr}: {}; run with {flag} and another address",
                self.error
            ),
        }
    }
}

impl std::error::Error for ListenError {}

/// Ports above a busy one that are tried for a suggestion.
const FREE_PORT_SEARCH: u16 = 100;

async fn bind(listener: Listener, addr: &str) -> Result<(TcpListener, SocketAddr), ListenError> {
    let fail = |error: std::io::Error, free| ListenError {
        listener,
        addr: addr.to_owned(),
        free,
        error,
    };
    match TcpListener::bind(addr).await {
        Ok(l) => match l.local_addr() {
            Ok(a) => Ok((l, a)),
            Err(e) => Err(fail(e, None)),
        },
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let free = match addr.parse::<SocketAddr>() {
                Ok(busy) => free_port_near(busy).await,
                Err(_) => None,
            };
            Err(fail(e, free))
        }
        Err(e) => Err(fail(e, None)),
    }
}

/// The first port above `busy`'s that can be bound on the same IP right now.
async fn free_port_near(busy: SocketAddr) -> Option<SocketAddr> {
    for port in (busy.port().saturating_add(1)..=u16::MAX).take(FREE_PORT_SEARCH.into()) {
        let candidate = SocketAddr::new(busy.ip(), port);
        if TcpListener::bind(candidate).await.is_ok() {
            return Some(candidate);
        }
    }
    None
}

/// A started node.
pub struct Node {
    /// The node's handles.
    pub app: Arc<App>,
    /// Where MQTT over TCP is served (the real port when configured with port 0).
    pub mqtt_addr: SocketAddr,
    /// Every MQTT listener (TCP first) with where it is served.
    pub mqtt_listeners: Vec<(Kind, SocketAddr)>,
    /// Where HTTP is served.
    pub http_addr: SocketAddr,
    /// Where the probes are served apart from the admin API (`http.metrics_listen`).
    pub metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    /// Cuts a drain short: every remaining client is closed at once.
    hurry: CancellationToken,
    mqtt_task: JoinHandle<()>,
    /// Stops HTTP, which keeps answering (not ready) until the drain is over.
    http_stop: CancellationToken,
    http_task: JoinHandle<()>,
    metrics_task: Option<JoinHandle<()>>,
    signal_task: JoinHandle<()>,
    /// Probes the backends for logs and `lorabroker_backend_up`; stopped with HTTP.
    health_task: JoinHandle<()>,
    /// Sweeps idle rate-limiter keys and renews the connection quota lease.
    limits_task: JoinHandle<()>,
    /// Only with `sessions.enabled`: without sessions there is nothing to read.
    sessions_usage_task: Option<JoinHandle<()>>,
    /// Publishes this node's live events on the bus.
    events_task: JoinHandle<()>,
    /// Catches up on missed revocations after bus reconnections (NATS only).
    catch_up_task: Option<JoinHandle<()>>,
}

/// How long HTTP connections still open after the drain (a scraper's keep-alive, an
/// event stream) may take to finish before they are dropped.
const HTTP_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long clients closed by a cut-short drain have to go before the node stops anyway.
const HURRIED_EXIT: Duration = Duration::from_millis(500);

impl Node {
    /// Where the MQTT listener of `kind` is served, when there is one.
    pub fn addr(&self, kind: Kind) -> Option<SocketAddr> {
        self.mqtt_listeners
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, addr)| *addr)
    }

    /// Binds the listeners and starts serving. When a listener cannot be bound, both are
    /// tried first so that the error reports every busy address at once.
    pub async fn start(app: Arc<App>) -> Result<Node, StartError> {
        let mqtt_specs = mqtt_listeners(&app)?;
        let (mqtt, http) = tokio::join!(
            futures::future::join_all(
                mqtt_specs
                    .iter()
                    .map(|(kind, addr, _)| bind(Listener::Mqtt(*kind), addr))
            ),
            bind(Listener::Http, &app.config.http.listen)
        );
        let mut errors: Vec<ListenError> = Vec::new();
        let mut bound = Vec::new();
        for (result, (kind, _, transport)) in mqtt.into_iter().zip(mqtt_specs) {
            match result {
                Ok((listener, addr)) => bound.push((kind, listener, addr, transport)),
                Err(e) => errors.push(e),
            }
        }
        let http = match http {
            Ok(h) => Some(h),
            Err(e) => {
                errors.push(e);
                None
            }
        };
        let (http, http_addr) = match http {
            Some(h) if errors.is_empty() => h,
            _ => {
                // Several on one busy address: different suggestions.
                let mut suggested: Vec<SocketAddr> = Vec::new();
                for e in &mut errors {
                    while let Some(free) = e.free.filter(|f| suggested.contains(f)) {
                        e.free = free_port_near(free).await;
                    }
                    suggested.extend(e.free);
                }
                return Err(StartError::Listen(errors));
            }
        };
        let mqtt_addr = bound[0].2;
        let mqtt_listeners: Vec<(Kind, SocketAddr)> = bound
            .iter()
            .map(|(kind, _, addr, _)| (*kind, *addr))
            .collect();
        let (metrics, metrics_addr) = match app.config.http.metrics_listen.as_str() {
            "" => (None, None),
            addr => {
                let (l, a) = bind(Listener::Http, addr)
                    .await
                    .map_err(|e| StartError::Listen(vec![e]))?;
                (Some(l), Some(a))
            }
        };
        let mut signals = Vec::new();
        for filter in SIGNAL_FILTERS {
            signals.push(app.bus.subscribe(filter.to_owned()).await?);
        }
        let signals: crate::bus::Subscription = Box::pin(futures::stream::select_all(signals));
        let handler = SignalHandler {
            node: app.node_id.clone(),
            registry: app.registry.clone(),
            auth: app.auth.clone(),
        };
        let shutdown = CancellationToken::new();
        let hurry = CancellationToken::new();
        let http_stop = CancellationToken::new();
        let catch_up_task = app.bus.connections().map(|connections| {
            tokio::spawn(handler.clone().catch_up_after_reconnections(connections))
        });
        let signal_task = tokio::spawn(handler.run(signals));
        let limits_task = tokio::spawn(crate::limits::housekeeping(app.limits.clone()));
        let sessions_usage_task = app.config.sessions.enabled.then(|| {
            tokio::spawn(crate::sessions::usage::report(
                app.sessions.clone(),
                app.metrics.clone(),
                app.config.sessions.usage_interval,
            ))
        });
        let events_task = tokio::spawn({
            let (publisher, hub, bus) =
                (app.events.clone(), app.event_hub.clone(), app.bus.clone());
            let every = app.config.limits.sweep_interval;
            async move {
                let sweeps = async {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tick.tick().await;
                        hub.sweep();
                    }
                };
                tokio::join!(publisher.run(bus, every), sweeps);
            }
        });
        let http_task = tokio::spawn(crate::http::serve(
            http,
            app.clone(),
            false,
            crate::console::Listeners(mqtt_listeners.clone()),
            http_stop.clone(),
        ));
        let metrics_task = metrics.map(|listener| {
            tokio::spawn(crate::http::serve(
                listener,
                app.clone(),
                true,
                crate::console::Listeners::default(),
                http_stop.clone(),
            ))
        });
        let health_task = tokio::spawn(crate::health::watch(app.clone(), http_stop.clone()));
        let accept_loops: Vec<_> = bound
            .into_iter()
            .map(|(_, listener, _, transport)| {
                accept_loop(listener, Arc::new(transport), app.clone(), shutdown.clone())
            })
            .collect();
        let mqtt_task = tokio::spawn({
            let (app, hurry) = (app.clone(), hurry.clone());
            async move {
                futures::future::join_all(accept_loops).await;
                drain(&app, &hurry).await;
            }
        });
        for (kind, addr) in &mqtt_listeners[1..] {
            tracing::info!(listener = kind.as_str(), %addr, "MQTT listener started");
        }
        tracing::info!(node = %app.node_id, mqtt = %mqtt_addr, http = %http_addr, "node started");
        Ok(Node {
            app,
            mqtt_addr,
            mqtt_listeners,
            http_addr,
            metrics_addr,
            shutdown,
            hurry,
            mqtt_task,
            http_stop,
            http_task,
            metrics_task,
            signal_task,
            health_task,
            limits_task,
            sessions_usage_task,
            events_task,
            catch_up_task,
        })
    }

    /// A token that starts the drain when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// A token that, cancelled during (or before) a drain, cuts it short: the clients
    /// still connected are closed at once and the node stops (a second SIGTERM, or the
    /// first one of `lorabroker dev`).
    pub fn hurry_token(&self) -> CancellationToken {
        self.hurry.clone()
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
        // Event streams never end by themselves: they end with HTTP (after the drain,
        // whose disconnects they show).
        self.app.event_hub.closing().cancel();
        let http_grace = if self.hurry.is_cancelled() {
            Duration::ZERO
        } else {
            HTTP_STOP_GRACE
        };
        for mut task in std::iter::once(self.http_task).chain(self.metrics_task) {
            if tokio::time::timeout(http_grace, &mut task).await.is_err() {
                task.abort();
            }
        }
        self.signal_task.abort();
        self.health_task.abort();
        self.limits_task.abort();
        if let Some(task) = &self.sessions_usage_task {
            task.abort();
        }
        self.events_task.abort();
        if let Some(t) = &self.catch_up_task {
            t.abort();
        }
        tracing::info!(node = %self.app.node_id, "node stopped");
    }
}

/// Accepts and spawns until the shutdown; the connection bounds are the handshake's
/// (`mqtt::admission`): a socket waits for its CONNECT in a pending-handshake slot, and only
/// an authenticated client takes one of `mqtt.max_connections`.
async fn accept_loop(
    listener: TcpListener,
    transport: Arc<Transport>,
    app: Arc<App>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = transport.kind().as_str(), error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Behind a PROXY header the address is the balancer's: the handshake checks the
        // client's once the header is read.
        if !transport.proxy_protocol() && !app.limits.allow_accept(peer.ip()) {
            // Over limits.accepts_per_ip: closed before anything is read (counted).
            tracing::debug!(%peer, "connection closed: over limits.accepts_per_ip");
            drop(stream);
            continue;
        }
        tokio::spawn(session::serve(app.clone(), stream, peer, transport.clone()));
    }
}

/// The MQTT listeners the configuration asks for, TCP first, with their transports.
fn mqtt_listeners(app: &App) -> Result<Vec<(Kind, String, Transport)>, StartError> {
    let mqtt = &app.config.mqtt;
    let timeout = mqtt.handshake_timeout;
    let mut listeners = vec![(
        Kind::Tcp,
        mqtt.listen.clone(),
        Transport::tcp(mqtt.proxy_protocol, timeout),
    )];
    // One watch of [mqtt.tls]'s files for the TLS and the WSS listener: a rotation is read,
    // counted and logged once.
    let certificate = if mqtt.tls.listen.is_empty() && mqtt.wss.listen.is_empty() {
        None
    } else {
        Some(CertificateWatch::new(&mqtt.tls, &app.metrics)?)
    };
    if let (false, Some(certificate)) = (mqtt.tls.listen.is_empty(), &certificate) {
        let acceptor = certificate.acceptor(&[b"mqtt"]);
        listeners.push((
            Kind::Tls,
            mqtt.tls.listen.clone(),
            Transport::tls(Arc::new(acceptor), mqtt.tls.proxy_protocol, timeout),
        ));
    }
    let ws_settings = || {
        Arc::new(WsSettings::new(
            &mqtt.ws,
            mqtt.max_packet_size,
            app.metrics.websocket_errors.clone(),
        ))
    };
    if !mqtt.ws.listen.is_empty() {
        listeners.push((
            Kind::Ws,
            mqtt.ws.listen.clone(),
            Transport::ws(ws_settings(), mqtt.ws.proxy_protocol, timeout),
        ));
    }
    if let (false, Some(certificate)) = (mqtt.wss.listen.is_empty(), &certificate) {
        // WebSocket over TLS: the certificate of [mqtt.tls], offered with ALPN http/1.1
        // (browsers ask for it; the WebSocket upgrade is HTTP/1.1).
        let acceptor = certificate.acceptor(&[b"http/1.1"]);
        listeners.push((
            Kind::Wss,
            mqtt.wss.listen.clone(),
            Transport::wss(
                Arc::new(acceptor),
                ws_settings(),
                mqtt.wss.proxy_protocol,
                timeout,
            ),
        ));
    }
    Ok(listeners)
}

/// Readiness false, then clients told to close spread over the grace period, then wait for
/// them to finish, bounded by a hard deadline. `hurry` closes everyone left at once and
/// waits only [`HURRIED_EXIT`] for them.
async fn drain(app: &App, hurry: &CancellationToken) {
    app.draining.store(true, Ordering::Release);
    let grace = app.config.shutdown.grace_period;
    let conns = app.registry.all();
    tracing::info!(connections = conns.len(), ?grace, "draining");
    let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(5);
    let mut conns = conns.into_iter();
    if conns.len() > 0 && !hurry.is_cancelled() {
        // Leave a fifth of the window for the last clients to go.
        let spread = grace.mul_f32(0.8);
        let step = spread / conns.len() as u32;
        let mut tick = tokio::time::interval(step.max(Duration::from_micros(100)));
        loop {
            tokio::select! {
                _ = hurry.cancelled() => break,
                _ = tick.tick() => match conns.next() {
                    Some(c) => c.outbox.close(CloseReason::Draining),
                    None => break,
                },
            }
        }
    }
    let left: Vec<_> = conns.collect();
    if !left.is_empty() {
        tracing::info!(
            connections = left.len(),
            "drain cut short: closing the rest now"
        );
    }
    for c in left {
        c.outbox.close(CloseReason::Draining);
    }
    tokio::select! {
        _ = tokio::time::timeout_at(deadline, app.admission.all_closed()) => {}
        _ = async {
            hurry.cancelled().await;
            tokio::time::sleep(HURRIED_EXIT).await;
        } => tracing::info!("stopping without waiting for the last connections"),
    }
}
