//! What the session store keeps, in `/metrics`: every `sessions.usage_interval` a node
//! asks its store ([`SessionStore::usage`]) and sets `lorabroker_sessions_stored`,
//! `lorabroker_session_pending_messages` and `lorabroker_session_pending_bytes` per tenant.
//! In a cluster every node reports the same figures for the tenants it has had sessions of
//! (they come from JetStream): take the maximum across nodes, not the sum.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::SessionStore;
use crate::metrics::{Metrics, TenantLabels};

/// Reads the store's usage into `metrics` every `every`, until the task is aborted; a store
/// that does not answer leaves the last figures and is asked again next time.
pub async fn report(store: Arc<dyn SessionStore>, metrics: Arc<Metrics>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.usage().await {
            Ok(usage) => {
                for tenant in usage {
                    let labels = TenantLabels {
                        tenant: tenant.tenant.to_string(),
                    };
                    set(&metrics.sessions_stored, &labels, tenant.sessions);
                    set(&metrics.session_pending_messages, &labels, tenant.messages);
                    set(&metrics.session_pending_bytes, &labels, tenant.bytes);
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not read the session store's usage"),
        }
    }
}

fn set(family: &Family<TenantLabels, Gauge>, labels: &TenantLabels, value: u64) {
    family
        .get_or_create(labels)
        .set(i64::try_from(value).unwrap_or(i64::MAX));
}
