//! The link between a connection and its persistent session (issue 14): a task of its
//! own (the pump) reads the session's stored messages and hands them to the connection,
//! and carries the connection's acknowledgements and filter changes to the store, so
//! that the connection's task never waits on the store.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::app::App;
use crate::events::{bounded, data};
use crate::metrics::{AppLabels, OutcomeLabels};
use crate::sessions::{SavedFilter, SessionConsumer, SessionError, SessionKey, Stored};

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

/// Runs the pump of one connection's session until the connection drops `commands`,
/// then detaches from the session.
pub(super) async fn pump(
    app: Arc<App>,
    key: SessionKey,
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
    app.metrics.sessions_attached.inc();
    report_overflow(&app, &key, &labels, consumer.as_mut());
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
                report_overflow(&app, &key, &labels, consumer.as_mut());
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
                report_overflow(&app, &key, &labels, consumer.as_mut());
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
    app.metrics.sessions_attached.dec();
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
