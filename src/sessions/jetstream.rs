//! [`JetStreamSessions`]: persistent sessions in NATS JetStream, shared by every node, so
//! that a client resumes its session on whichever node it reconnects to, after that node
//! or all of them restarted.
//!
//! - One stream per tenant, `{sessions.stream_prefix}{tenant}`, captures the tenant's
//!   traffic (`v3.{tenant}.>`) with interest retention: a message is kept only while a
//!   session of its application has not acknowledged it, within the stream's bounds
//!   (`sessions.max_tenant_bytes`, `sessions.max_age`; the oldest go first). The upstream
//!   keeps publishing plain subjects; it does not know the stream exists.
//! - One durable pull consumer per session on that stream, filtered to its application,
//!   acknowledging explicitly, with at most `mqtt.max_inflight` messages unacknowledged,
//!   deleted by JetStream after `sessions.expiry` without a connection. Each attachment
//!   makes a fresh one (`{app}-{digest}-{ulid}`) that starts at the previous one's ack
//!   floor and then deletes the previous one: what an earlier connection was handed and
//!   did not acknowledge comes again first, in order, marked redelivered, and a pull
//!   request an earlier connection left waiting at the server can take nothing from the
//!   new consumer (a takeover leaves the old connection's pull with a deleted consumer).
//! - One durable pull consumer per shared subscription, `{app}-share-{digest}`, that the
//!   members of the share pull from together, whichever node they are on: JetStream hands
//!   each message to one pull request. A member that detaches hands back (NAK) what it
//!   did not acknowledge, so it goes to another member at once; what a dead node held
//!   goes after `sessions.ack_wait`. JetStream deletes it after `sessions.expiry` without
//!   members.
//! - The session's record (its granted filters) in the tenant's key-value bucket
//!   `{prefix}meta-{tenant}`, kept for twice `sessions.expiry` and a minute after its
//!   last refresh (refreshed every third of the expiry while connected).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;

use super::{
    Opened, SavedFilter, SessionConsumer, SessionError, SessionKey, SessionRecord, SessionStore,
    SessionsConfig, Stored, TenantUsage,
};
use crate::topic::{Id, ShareKey};

/// How long a pull request waits at the server; heartbeats say it is alive meanwhile.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// Heartbeats of a waiting pull request.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

/// Persistent sessions in JetStream (see the module docs).
pub struct JetStreamSessions {
    js: jetstream::Context,
    config: SessionsConfig,
    max_inflight: usize,
    /// Each tenant's stream and bucket, once made or found.
    tenants: Mutex<HashMap<Id, (stream::Stream, kv::Store)>>,
    expired: Mutex<Counter>,
}

fn unavailable(e: impl std::fmt::Display) -> SessionError {
    SessionError::Unavailable(e.to_string())
}

/// An error of `what`, named.
fn failed(what: &'static str) -> impl FnOnce(&dyn std::fmt::Display) -> SessionError {
    move |e| SessionError::Unavailable(format!("{what}: {e}"))
}

impl JetStreamSessions {
    /// Sessions in the JetStream of `js`, configured by `config`, each with at most
    /// `max_inflight` messages unacknowledged.
    pub fn new(js: jetstream::Context, config: &SessionsConfig, max_inflight: usize) -> Self {
        Self {
            js,
            config: config.clone(),
            max_inflight: max_inflight.max(1),
            tenants: Mutex::default(),
            expired: Mutex::new(Counter::default()),
        }
    }

    fn storage(&self) -> stream::StorageType {
        match self.config.storage.as_str() {
            "memory" => stream::StorageType::Memory,
            _ => stream::StorageType::File,
        }
    }

    fn stream_name(&self, tenant: &Id) -> String {
        format!("{}{tenant}", self.config.stream_prefix)
    }

    fn bucket_name(&self, tenant: &Id) -> String {
        format!("{}meta-{tenant}", self.config.stream_prefix)
    }

    /// The tenant's stream and bucket, created when missing.
    async fn tenant(&self, tenant: &Id) -> Result<(stream::Stream, kv::Store), SessionError> {
        if let Some(found) = self.tenants.lock().get(tenant) {
            return Ok(found.clone());
        }
        let stream = self
            .js
            .get_or_create_stream(stream::Config {
                name: self.stream_name(tenant),
                description: Some(format!("lorabroker persistent sessions of tenant {tenant}")),
                subjects: vec![format!("v3.{tenant}.>")],
                retention: stream::RetentionPolicy::Interest,
                discard: stream::DiscardPolicy::Old,
                max_bytes: self.config.max_tenant_bytes,
                max_age: self.config.max_age,
                storage: self.storage(),
                ..Default::default()
            })
            .await
            .map_err(|e| failed("creating the tenant's stream")(&e))?;
        let bucket = self.bucket_name(tenant);
        // The bucket's stream is made here, as async-nats's create_key_value would make
        // it, because that call first asks for account details that nats-server 2.9
        // answers in a form async-nats 0.51 cannot read.
        self.js
            .get_or_create_stream(stream::Config {
                name: format!("KV_{bucket}"),
                description: Some(format!("lorabroker session records of tenant {tenant}")),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                // Longer than the consumer's expiry: a record outlives its consumer, so that
                // a client coming back after the expiry is counted as expired.
                max_age: record_lifetime(self.config.expiry),
                storage: self.storage(),
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| failed("creating the tenant's session bucket")(&e))?;
        let store = self
            .js
            .get_key_value(&bucket)
            .await
            .map_err(|e| failed("opening the tenant's session bucket")(&e))?;
        self.tenants
            .lock()
            .insert(tenant.clone(), (stream.clone(), store.clone()));
        Ok((stream, store))
    }

    /// The consumer `name`, if it exists.
    async fn consumer_info(
        stream: &stream::Stream,
        name: &str,
    ) -> Result<Option<consumer::Info>, SessionError> {
        match stream.consumer_info(name).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed("looking up the session's consumer")(&e)),
        }
    }

    /// [`SessionError::Full`] when the tenant's stream has `sessions.max_sessions_per_tenant`
    /// consumers: a new session or share is one more consumer that every message of the
    /// tenant is matched against. Checked before creating one, so concurrent creations may
    /// pass the bound by a few.
    async fn check_room(&self, stream: &stream::Stream) -> Result<(), SessionError> {
        let kept = stream
            .clone()
            .info()
            .await
            .map_err(|e| failed("reading the tenant's stream")(&e))?
            .state
            .consumer_count as u64;
        if kept >= self.config.max_sessions_per_tenant {
            return Err(SessionError::Full);
        }
        Ok(())
    }

    /// The messages of `consumer`, pulled a window at a time.
    async fn pull(
        &self,
        consumer: &consumer::PullConsumer,
    ) -> Result<consumer::pull::Stream, consumer::StreamError> {
        consumer
            .stream()
            .max_messages_per_batch(self.max_inflight)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await
    }

    fn consumer_config(&self, key: &SessionKey, name: &str) -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some(name.to_owned()),
            description: Some("lorabroker persistent session".into()),
            filter_subject: key.app.traffic_subject_filter(),
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_deliver: -1,
            max_ack_pending: self.max_inflight as i64,
            inactive_threshold: self.config.expiry,
            ..Default::default()
        }
    }
}

/// How long a session record is kept after its last refresh.
fn record_lifetime(expiry: Duration) -> Duration {
    expiry
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(60))
}

/// The names of a session: the prefix of its consumers' names and its record's key.
fn names(key: &SessionKey) -> (String, String) {
    let digest = key.digest();
    (
        format!("{}-{digest}-", key.app.app),
        format!("{}.{digest}", key.app.app),
    )
}

#[async_trait]
impl SessionStore for JetStreamSessions {
    async fn open(&self, key: &SessionKey) -> Result<Opened, SessionError> {
        let (stream, store) = self.tenant(&key.app.tenant).await?;
        let (prefix, record_key) = names(key);
        let stored = store
            .get(&record_key)
            .await
            .map_err(|e| failed("reading the session record")(&e))?;
        // A record that does not parse, or names a consumer of another session, is no
        // session (never a panic, never another session's traffic).
        let record: Option<SessionRecord> = stored
            .and_then(|bytes| serde_json::from_slice::<SessionRecord>(&bytes).ok())
            .filter(|r| r.consumer.starts_with(&prefix));
        let previous = match &record {
            Some(r) => Self::consumer_info(&stream, &r.consumer).await?,
            None => None,
        };
        if record.is_some() && previous.is_none() {
            // Its consumer expired (JetStream's inactive threshold).
            self.expired.lock().inc();
        }
        let present = previous.is_some();
        if !present {
            self.check_room(&stream).await?;
        }
        let (start, last_delivered) = match &previous {
            Some(info) => (
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: info.ack_floor.stream_sequence + 1,
                },
                info.delivered.stream_sequence,
            ),
            None => (consumer::DeliverPolicy::New, 0),
        };
        let name = format!("{prefix}{}", ulid::Ulid::new().to_string().to_lowercase());
        let mut config = self.consumer_config(key, &name);
        config.deliver_policy = start;
        let mut consumer: consumer::PullConsumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| failed("creating the session's consumer")(&e))?;
        let record = SessionRecord {
            client_id: key.client_id.clone(),
            filters: match (present, record) {
                (true, Some(r)) => r.filters,
                _ => Vec::new(),
            },
            consumer: name,
        };
        put(&store, &record_key, &record).await?;
        if let Some(info) = previous {
            // The new consumer holds the interest now: nothing is lost by deleting this
            // one, and an earlier connection still pulling from it stops.
            if let Err(e) = stream.delete_consumer(&info.name).await {
                tracing::debug!(error = %e, "could not delete the session's previous consumer");
            }
        }
        let info = consumer
            .info()
            .await
            .map_err(|e| failed("reading the session's consumer")(&e))?;
        let pending = info.num_pending + info.num_ack_pending as u64;
        let messages = self
            .pull(&consumer)
            .await
            .map_err(|e| failed("pulling from the session's consumer")(&e))?;
        Ok(Opened {
            present,
            filters: record.filters.clone(),
            pending,
            consumer: Box::new(JetStreamConsumer {
                messages,
                store,
                record_key,
                record,
                unacked: HashMap::new(),
                last_delivered,
                skip: pending.saturating_sub(self.config.max_pending_messages),
                overflowed: 0,
            }),
        })
    }

    async fn discard(&self, key: &SessionKey) -> Result<bool, SessionError> {
        let (prefix, record_key) = names(key);
        let stream = match self.js.get_stream(self.stream_name(&key.app.tenant)).await {
            Ok(stream) => stream,
            // No session of this tenant was ever made.
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(unavailable(e)),
        };
        let Ok(store) = self
            .js
            .get_key_value(self.bucket_name(&key.app.tenant))
            .await
        else {
            return Ok(false);
        };
        let record: Option<SessionRecord> = store
            .get(&record_key)
            .await
            .map_err(|e| failed("reading the session record")(&e))?
            .and_then(|bytes| serde_json::from_slice::<SessionRecord>(&bytes).ok());
        let Some(record) = record else {
            return Ok(false);
        };
        if record.consumer.starts_with(&prefix) {
            if let Err(e) = stream.delete_consumer(&record.consumer).await {
                tracing::debug!(error = %e, "the discarded session's consumer was gone");
            }
        }
        store
            .purge(&record_key)
            .await
            .map_err(|e| failed("deleting the session record")(&e))?;
        Ok(true)
    }

    async fn join_share(&self, share: &ShareKey) -> Result<Box<dyn SessionConsumer>, SessionError> {
        let (stream, _) = self.tenant(&share.app.tenant).await?;
        let name = format!("{}-share-{}", share.app.app, share.digest());
        let config = consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some("lorabroker shared subscription".into()),
            filter_subject: share.app.traffic_subject_filter(),
            deliver_policy: consumer::DeliverPolicy::New,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            max_deliver: -1,
            // Every member's window, for the members a share usually has.
            max_ack_pending: self.max_inflight.saturating_mul(SHARE_WINDOWS) as i64,
            inactive_threshold: self.config.expiry,
            ..Default::default()
        };
        // One lookup for a share that exists (the usual join); a new share is one more
        // consumer of the tenant's stream, as a session is, and needs room.
        let consumer: consumer::PullConsumer = match stream.get_consumer(&name).await {
            Ok(consumer) => consumer,
            // Missing, or unreachable: the lookup says which.
            Err(e) => match Self::consumer_info(&stream, &name).await? {
                Some(_) => return Err(failed("opening the share's consumer")(&e)),
                None => {
                    self.check_room(&stream).await?;
                    stream
                        .create_consumer(config)
                        .await
                        .map_err(|e| failed("making the share's consumer")(&e))?
                }
            },
        };
        // JetStream may hand a message that an earlier member held when it left out again
        // as if for the first time (its delivery undone): anything up to what the share
        // handed out before this member joined counts as a redelivery.
        let last_delivered = consumer.cached_info().delivered.stream_sequence;
        let messages = self
            .pull(&consumer)
            .await
            .map_err(|e| failed("pulling from the share's consumer")(&e))?;
        Ok(Box::new(JetStreamMember {
            messages,
            unacked: HashMap::new(),
            last_delivered,
        }))
    }

    fn count_expiries_in(&self, counter: Counter) {
        *self.expired.lock() = counter;
    }

    async fn usage(&self) -> Result<Vec<TenantUsage>, SessionError> {
        let tenants: Vec<(Id, stream::Stream)> = self
            .tenants
            .lock()
            .iter()
            .map(|(tenant, (stream, _))| (tenant.clone(), stream.clone()))
            .collect();
        let mut usage = Vec::with_capacity(tenants.len());
        for (tenant, mut stream) in tenants {
            let info = stream
                .info()
                .await
                .map_err(|e| failed("reading the tenant's stream")(&e))?;
            usage.push(TenantUsage {
                tenant,
                sessions: info.state.consumer_count as u64,
                messages: info.state.messages,
                bytes: info.state.bytes,
            });
        }
        Ok(usage)
    }
}

/// How many members' windows a share's consumer lets be unacknowledged at once.
const SHARE_WINDOWS: usize = 16;

/// The next message of a pull consumer's `messages`, or why there is none: pull errors
/// that only mean "pull again" are skipped; a deleted consumer is [`SessionError::TakenOver`].
async fn pulled(
    messages: &mut consumer::pull::Stream,
) -> Result<(jetstream::Message, u64, u64), SessionError> {
    loop {
        let message = match messages.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                use consumer::pull::MessagesErrorKind as Kind;
                match e.kind() {
                    // Heartbeats missed while the bus reconnects: the stream pulls again.
                    Kind::MissingHeartbeat | Kind::Pull => {
                        tracing::debug!(error = %e, "session consumer: pulling again");
                        continue;
                    }
                    // A newer connection made the session a consumer of its own.
                    Kind::ConsumerDeleted => return Err(SessionError::TakenOver),
                    _ => return Err(unavailable(e)),
                }
            }
            None => return Err(unavailable("the consumer's message stream ended")),
        };
        match message.info() {
            Ok(info) => {
                let (seq, delivered) = (info.stream_sequence, info.delivered as u64);
                return Ok((message, seq, delivered));
            }
            Err(e) => {
                tracing::warn!(error = %e, "session consumer: a message without JetStream info")
            }
        }
    }
}

/// Whether message `seq`, handed out for the `delivered`th time, may have reached a client
/// before; `highest` is the highest sequence handed out so far, and is raised to `seq`.
///
/// JetStream's own count is not enough: a nats-server that restarts can come back with a
/// consumer state older than what it had handed out (it writes that state lazily), and
/// then hands the same messages out again as first deliveries.
fn redelivery(highest: &mut u64, seq: u64, delivered: u64) -> bool {
    let before = delivered > 1 || seq <= *highest;
    *highest = (*highest).max(seq);
    before
}

/// Acknowledges message `seq` to JetStream if it is among the `unacked` handed out.
async fn ack_held(
    unacked: &mut HashMap<u64, jetstream::Message>,
    seq: u64,
) -> Result<(), SessionError> {
    if let Some(message) = unacked.remove(&seq) {
        message.ack().await.map_err(unavailable)?;
    }
    Ok(())
}

/// One member's attachment to a share's consumer.
struct JetStreamMember {
    messages: consumer::pull::Stream,
    /// Handed out and not acknowledged yet, by stream sequence.
    unacked: HashMap<u64, jetstream::Message>,
    /// The highest stream sequence handed out: the share's when this member joined, then
    /// this member's.
    last_delivered: u64,
}

#[async_trait]
impl SessionConsumer for JetStreamMember {
    async fn next(&mut self) -> Result<Stored, SessionError> {
        let (message, seq, delivered) = pulled(&mut self.messages).await?;
        let stored = Stored {
            seq,
            subject: message.subject.to_string(),
            payload: message.payload.clone(),
            redelivered: redelivery(&mut self.last_delivered, seq, delivered),
        };
        self.unacked.insert(seq, message);
        Ok(stored)
    }

    async fn ack(&mut self, seq: u64) -> Result<(), SessionError> {
        ack_held(&mut self.unacked, seq).await
    }

    async fn save(&mut self, _filters: &[SavedFilter]) -> Result<(), SessionError> {
        Ok(())
    }

    async fn refresh(&mut self) -> Result<(), SessionError> {
        Ok(())
    }

    fn take_overflow(&mut self) -> u64 {
        0
    }

    async fn detach(self: Box<Self>) {
        drop(self.messages);
        for (_, message) in self.unacked {
            // To another member now rather than after the ack wait.
            if let Err(e) = message.ack_with(jetstream::AckKind::Nak(None)).await {
                tracing::debug!(error = %e, "could not hand back a shared message");
            }
        }
    }
}

async fn put(store: &kv::Store, key: &str, record: &SessionRecord) -> Result<(), SessionError> {
    let json = serde_json::to_vec(record).map_err(unavailable)?;
    store
        .put(key, Bytes::from(json))
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// One connection's attachment to its session's consumer.
struct JetStreamConsumer {
    messages: consumer::pull::Stream,
    store: kv::Store,
    record_key: String,
    record: SessionRecord,
    /// Handed out and not acknowledged yet, by stream sequence.
    unacked: HashMap<u64, jetstream::Message>,
    /// The highest stream sequence handed out: the session's previous consumer's when it
    /// was opened, then this one's. Anything up to it may have reached the client before.
    last_delivered: u64,
    /// Fresh messages still to drop: what the session held past
    /// `sessions.max_pending_messages` when it was opened.
    skip: u64,
    overflowed: u64,
}

#[async_trait]
impl SessionConsumer for JetStreamConsumer {
    async fn next(&mut self) -> Result<Stored, SessionError> {
        loop {
            let (message, seq, delivered) = pulled(&mut self.messages).await?;
            if self.skip > 0 && delivered <= 1 {
                self.skip -= 1;
                self.overflowed += 1;
                message.ack().await.map_err(unavailable)?;
                continue;
            }
            let stored = Stored {
                seq,
                subject: message.subject.to_string(),
                payload: message.payload.clone(),
                redelivered: redelivery(&mut self.last_delivered, seq, delivered),
            };
            // A redelivery (the ack wait passed) replaces the earlier delivery.
            self.unacked.insert(seq, message);
            return Ok(stored);
        }
    }

    async fn ack(&mut self, seq: u64) -> Result<(), SessionError> {
        ack_held(&mut self.unacked, seq).await
    }

    async fn save(&mut self, filters: &[SavedFilter]) -> Result<(), SessionError> {
        self.record.filters = filters.to_vec();
        put(&self.store, &self.record_key, &self.record).await
    }

    async fn refresh(&mut self) -> Result<(), SessionError> {
        put(&self.store, &self.record_key, &self.record).await
    }

    fn take_overflow(&mut self) -> u64 {
        std::mem::take(&mut self.overflowed)
    }

    async fn detach(self: Box<Self>) {
        // What the client did not acknowledge stays unacknowledged: the next attachment
        // starts from the ack floor. The record is refreshed: the expiry starts now.
        drop(self.messages);
        if let Err(e) = put(&self.store, &self.record_key, &self.record).await {
            tracing::warn!(error = %e, "could not refresh the session record at its end");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redelivery;

    #[test]
    fn a_sequence_handed_out_before_is_a_redelivery_whatever_jetstream_counts() {
        let mut highest = 0;
        assert!(!redelivery(&mut highest, 1, 1));
        assert!(!redelivery(&mut highest, 2, 1));
        // A restarted server rewound the consumer: 2 comes as a first delivery again.
        assert!(redelivery(&mut highest, 2, 1));
        assert!(!redelivery(&mut highest, 3, 1));
        // JetStream's own count says so after an ack wait.
        assert!(redelivery(&mut highest, 3, 2));
        assert_eq!(highest, 3);
    }
}
