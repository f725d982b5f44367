//! The link between a connection and its persistent session (issue 14): a task of its
//! own (the pump) reads the session's stored messages and hands them to the connection,
//! and carries the connection's acknowledgements and filter changes to the store, so
//! that the connection's task never waits on the store. A connection has one pump for
//! its session and one for each of its shared subscriptions ([`Feed`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::app::App;
use crate::events::{bounded, data};
use crate::metrics::{AppLabels, OutcomeLabels};
use crate::sessions::{SavedFilter, SessionConsumer, SessionError, SessionKey, Stored};
use crate::topic::SharedFilter;

/// The `as.mqtt.session.overflow` event: stored messages of a session were dropped,
/// oldest first, over its bounds.
pub const OVERFLOW_EVENT: &str = "as.mqtt.session.overflow";

/// What the connection asks of its session.
pub(super) enum ToPump {
    /// The client acknowledged the message with this store number (or it needs none).
    Ack(u64),
    /// Store these filters; answered once stored.
    Save(Vec<SavedFilter>, oneshot::Sender<Result<(), SessionError>>),
}

/// How long the pump waits before asking a store that failed again.
const RETRY: Duration = Duration::from_secs(1);

/// How many stored messages the session's pump hands over ahead of the window.
const PUMP_AHEAD: usize = 16;
/// The same for a share's pump: little, since what a member holds the others cannot have
/// until it acknowledges or leaves.
const SHARE_PUMP_AHEAD: usize = 1;

/// A connection's end of one pump.
pub(super) struct Feed {
    pub to_pump: mpsc::UnboundedSender<ToPump>,
    pub from_pump: mpsc::Receiver<Stored>,
    /// The pump stopped.
    pub ended: bool,
}

impl Feed {
    /// Asks the pump to acknowledge message `seq` (a pump that stopped no longer can: the
    /// store hands the message out again).
    pub fn ack(&self, seq: u64) {
        let _ = self.to_pump.send(ToPump::Ack(seq));
    }
}

/// One shared subscription of a persistent session, fed by its share in the store.
pub(super) struct ShareFeed {
    pub shared: SharedFilter,
    /// The granted QoS: 0 or 1.
    pub qos: u8,
    /// Its feed number (never 0, the session's own).
    pub id: u32,
    pub feed: Feed,
}

/// Starts the pump of the session of `key` over `consumer`, for the current connection.
pub(super) fn session_feed(
    app: &Arc<App>,
    key: SessionKey,
    consumer: Box<dyn SessionConsumer>,
) -> Feed {
    let (feed, commands, deliveries) = channels(PUMP_AHEAD);
    let app = app.clone();
    tokio::spawn(
        async move {
            app.metrics.sessions_attached.inc();
            pump(&app, &key, consumer, commands, deliveries).await;
            app.metrics.sessions_attached.dec();
        }
        .instrument(tracing::Span::current()),
    );
    feed
}

/// Starts the pump of the connection's membership in the share of `shared` (the session
/// of `key`) over `joined`, or joining the share in the store first, and again until it
/// works (a session restored while the store is away).
pub(super) fn share_feed(
    app: &Arc<App>,
    key: SessionKey,
    shared: &SharedFilter,
    joined: Option<Box<dyn SessionConsumer>>,
) -> Feed {
    let (feed, commands, deliveries) = channels(SHARE_PUMP_AHEAD);
    let (app, share) = (app.clone(), shared.key.clone());
    tokio::spawn(
        async move {
            let mut joined = joined;
            let consumer = loop {
                if let Some(consumer) = joined.take() {
                    break consumer;
                }
                match app.sessions.join_share(&share).await {
                    Ok(consumer) => break consumer,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not join a shared subscription; retrying")
                    }
                }
                tokio::time::sleep(RETRY).await;
                if deliveries.is_closed() {
                    return;
                }
            };
            pump(&app, &key, consumer, commands, deliveries).await;
        }
        .instrument(tracing::Span::current()),
    );
    feed
}

fn channels(ahead: usize) -> (Feed, mpsc::UnboundedReceiver<ToPump>, mpsc::Sender<Stored>) {
    let (to_pump, commands) = mpsc::unbounded_channel();
    let (deliveries, from_pump) = mpsc::channel(ahead);
    let feed = Feed {
        to_pump,
        from_pump,
        ended: false,
    };
    (feed, commands, deliveries)
}

/// Runs one pump of a connection's session until the connection drops `commands`, then
/// detaches from the session (or share).
async fn pump(
    app: &App,
    key: &SessionKey,
    mut consumer: Box<dyn SessionConsumer>,
    mut commands: mpsc::UnboundedReceiver<ToPump>,
    deliveries: mpsc::Sender<Stored>,
) {
    let labels = AppLabels {
        tenant: key.app.tenant.to_string(),
        application: key.app.app.to_string(),
    };
    let every = (app.config.sessions.expiry / 3).max(Duration::from_secs(1));
    let mut refresh = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    report_overflow(app, key, &labels, consumer.as_mut());
    enum Step {
        Command(Option<ToPump>),
        Refresh,
        Next(Result<Stored, SessionError>),
    }
    loop {
        // Commands first: acknowledgements make room for more messages.
        let step = tokio::select! {
            biased;
            c = commands.recv() => Step::Command(c),
            _ = refresh.tick() => Step::Refresh,
            n = consumer.next() => Step::Next(n),
        };
        match step {
            Step::Command(None) => break,
            Step::Command(Some(ToPump::Ack(seq))) => {
                if let Err(e) = consumer.ack(seq).await {
                    // The store offers it again after its ack wait: a duplicate, not a loss.
                    tracing::debug!(error = %e, "could not acknowledge a stored message");
                }
            }
            Step::Command(Some(ToPump::Save(filters, done))) => {
                let _ = done.send(consumer.save(&filters).await);
            }
            Step::Refresh => {
                if let Err(e) = consumer.refresh().await {
                    tracing::warn!(error = %e, "could not refresh the persistent session");
                }
                report_overflow(app, key, &labels, consumer.as_mut());
            }
            Step::Next(Ok(stored)) => {
                let outcome = if stored.redelivered {
                    "redelivered"
                } else {
                    "first"
                };
                app.metrics
                    .session_messages
                    .get_or_create(&OutcomeLabels { outcome })
                    .inc();
                report_overflow(app, key, &labels, consumer.as_mut());
                // Waits while the connection's window is full; the connection's end closes it.
                if deliveries.send(stored).await.is_err() {
                    break;
                }
            }
            Step::Next(Err(SessionError::TakenOver)) => break,
            Step::Next(Err(e)) => {
                tracing::warn!(error = %e, "persistent session: the store failed; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
    // Acknowledgements the connection sent before it ended still count.
    while let Ok(ToPump::Ack(seq)) = commands.try_recv() {
        let _ = consumer.ack(seq).await;
    }
    consumer.detach().await;
}

/// Counts and announces what the session dropped over its bounds since last asked.
fn report_overflow(
    app: &App,
    key: &SessionKey,
    labels: &AppLabels,
    consumer: &mut dyn SessionConsumer,
) {
    let dropped = consumer.take_overflow();
    if dropped == 0 {
        return;
    }
    app.metrics
        .session_overflow_dropped
        .get_or_create(labels)
        .inc_by(dropped);
    tracing::info!(
        dropped,
        "persistent session over sessions.max_pending_*: the oldest messages were dropped"
    );
    app.events.emit(
        &key.app,
        OVERFLOW_EVENT,
        data([
            ("client_id", bounded(&key.client_id)),
            ("dropped", dropped.into()),
        ]),
    );
}
