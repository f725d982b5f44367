//! Connection quotas per tenant, application and API key, counted across the cluster
//! (DESIGN §9). [`QuotaStore`] is the small trait a backend implements: take one connection
//! in every scope unless one is full, give it back, renew this node's counts. The in-memory
//! [`MemoryQuotaStore`] serves a node on its own; the Redis one (with per-node leases) lives
//! beside the other Redis code, in `auth::quota_redis`. [`ConnectionQuotas`] is what the
//! CONNECT phase calls: it picks the scopes with a limit, counts refusals, and fails open
//! when the store is unreachable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::metrics::{Metrics, ScopeLabels};
use crate::topic::AppRef;

/// Why a quota store could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// The backend is unreachable or failed.
    #[error("connection quota store unavailable: {0}")]
    Unavailable(String),
}

/// What a quota counts connections of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeKind {
    /// A tenant.
    Tenant,
    /// An application of a tenant.
    Application,
    /// An API key.
    Key,
}

impl ScopeKind {
    /// The `scope` label of metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Tenant => "tenant",
            ScopeKind::Application => "application",
            ScopeKind::Key => "key",
        }
    }
}

/// One counted scope of a connection, with its limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// What is counted.
    pub kind: ScopeKind,
    /// The tenant the scope belongs to (every scope does; Redis keys share its hash tag).
    pub tenant: String,
    /// The application ID or key ID; empty for a tenant.
    pub id: String,
    /// Most connections in the scope (at least 1).
    pub limit: u64,
}

impl Scope {
    /// A stable name of the scope, unique across kinds and tenants.
    pub fn name(&self) -> String {
        match self.kind {
            ScopeKind::Tenant => format!("tenant:{}", self.tenant),
            ScopeKind::Application => format!("app:{}:{}", self.tenant, self.id),
            ScopeKind::Key => format!("key:{}:{}", self.tenant, self.id),
        }
    }
}

/// Cluster-wide connection counts per scope.
#[async_trait]
pub trait QuotaStore: Send + Sync {
    /// Takes one connection in every scope, or none when one is at its limit:
    /// `Ok(None)` when taken, `Ok(Some(i))` when `scopes[i]` is full.
    async fn acquire(&self, scopes: &[Scope]) -> Result<Option<usize>, QuotaError>;
    /// Gives back one connection taken in every scope.
    async fn release(&self, scopes: &[Scope]) -> Result<(), QuotaError>;
    /// Renews this node's counts (its lease); a no-op where counts cannot outlive a node.
    async fn refresh(&self) -> Result<(), QuotaError>;
    /// The connections counted in `scope` now, across the cluster.
    async fn count(&self, scope: &Scope) -> Result<u64, QuotaError>;
}

/// Counts in memory: exact, for a node on its own.
#[derive(Default)]
pub struct MemoryQuotaStore {
    counts: Mutex<HashMap<String, u64>>,
}

impl MemoryQuotaStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl QuotaStore for MemoryQuotaStore {
    async fn acquire(&self, scopes: &[Scope]) -> Result<Option<usize>, QuotaError> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for (i, s) in scopes.iter().enumerate() {
            if counts.get(&s.name()).copied().unwrap_or(0) >= s.limit {
                return Ok(Some(i));
            }
        }
        for s in scopes {
            *counts.entry(s.name()).or_default() += 1;
        }
        Ok(None)
    }

    async fn release(&self, scopes: &[Scope]) -> Result<(), QuotaError> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for s in scopes {
            let name = s.name();
            if let Some(c) = counts.get_mut(&name) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    counts.remove(&name);
                }
            }
        }
        Ok(())
    }

    async fn refresh(&self) -> Result<(), QuotaError> {
        Ok(())
    }

    async fn count(&self, scope: &Scope) -> Result<u64, QuotaError> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        Ok(counts.get(&scope.name()).copied().unwrap_or(0))
    }
}

/// The limits of each scope (0 = unlimited, not counted).
#[derive(Debug, Clone, Copy)]
pub struct QuotaLimits {
    /// Per tenant.
    pub tenant: u64,
    /// Per application.
    pub application: u64,
    /// Per API key.
    pub key: u64,
}

/// The outcome of [`ConnectionQuotas::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Counted: give it back with [`ConnectionQuotas::release`] when the connection ends.
    Held,
    /// Not counted: no scope has a limit, or the store was unreachable (failed open).
    Uncounted,
    /// The scope of this kind is at its quota.
    Full(ScopeKind),
}

/// The connection quotas of a node.
pub struct ConnectionQuotas {
    store: Arc<dyn QuotaStore>,
    limits: QuotaLimits,
    metrics: Arc<Metrics>,
}

impl ConnectionQuotas {
    /// Quotas of `limits` counted in `store`.
    pub fn new(store: Arc<dyn QuotaStore>, limits: QuotaLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            limits,
            metrics,
        }
    }

    fn scopes(&self, app: &AppRef, key_id: &str) -> Vec<Scope> {
        let tenant = app.tenant.to_string();
        [
            (ScopeKind::Tenant, String::new(), self.limits.tenant),
            (
                ScopeKind::Application,
                app.app.to_string(),
                self.limits.application,
            ),
            (ScopeKind::Key, key_id.to_owned(), self.limits.key),
        ]
        .into_iter()
        .filter(|(_, _, limit)| *limit > 0)
        .map(|(kind, id, limit)| Scope {
            kind,
            tenant: tenant.clone(),
            id,
            limit,
        })
        .collect()
    }

    /// Takes one connection of `app` with `key_id` in every limited scope. An unreachable
    /// store admits the connection uncounted (fail open: Redis trouble must not lock every
    /// tenant out), with a warning and `lorabroker_quota_unavailable_total`.
    pub async fn acquire(&self, app: &AppRef, key_id: &str) -> Admission {
        let scopes = self.scopes(app, key_id);
        if scopes.is_empty() {
            return Admission::Uncounted;
        }
        match self.store.acquire(&scopes).await {
            Ok(None) => Admission::Held,
            Ok(Some(i)) => {
                let kind = scopes.get(i).map_or(ScopeKind::Tenant, |s| s.kind);
                self.metrics
                    .quota_refused
                    .get_or_create(&ScopeLabels {
                        scope: kind.as_str(),
                    })
                    .inc();
                Admission::Full(kind)
            }
            Err(e) => {
                self.metrics.quota_unavailable.inc();
                tracing::warn!(error = %e, "connection quota not checked: admitted uncounted");
                Admission::Uncounted
            }
        }
    }

    /// The connections of `app` across the cluster, when the application quota counts
    /// them (`limits.max_connections_per_application` > 0) and the store answers.
    pub async fn application_connections(&self, app: &AppRef) -> Option<u64> {
        if self.limits.application == 0 {
            return None;
        }
        let scope = Scope {
            kind: ScopeKind::Application,
            tenant: app.tenant.to_string(),
            id: app.app.to_string(),
            limit: self.limits.application,
        };
        self.store.count(&scope).await.ok()
    }

    /// Gives back a connection that [`ConnectionQuotas::acquire`] held.
    pub async fn release(&self, app: &AppRef, key_id: &str) {
        let scopes = self.scopes(app, key_id);
        if let Err(e) = self.store.release(&scopes).await {
            // The lease repairs it: the next refresh writes this node's true counts.
            self.metrics.quota_unavailable.inc();
            tracing::warn!(error = %e, "connection quota not released");
        }
    }

    /// Renews this node's counts in the store.
    pub async fn refresh(&self) {
        if let Err(e) = self.store.refresh().await {
            self.metrics.quota_unavailable.inc();
            tracing::warn!(error = %e, "connection quota lease not renewed");
        }
    }
}

/// The behavioural suite every [`QuotaStore`] passes (run on the memory store here and on
/// Redis in `tests/abuse/quota.rs`). `node_a` and `node_b` are two nodes' views of one
/// store (the same value for a store that serves one node); `tenant` is unique per run.
#[doc(hidden)]
pub mod suite {
    use super::*;

    fn scope(kind: ScopeKind, tenant: &str, id: &str, limit: u64) -> Scope {
        Scope {
            kind,
            tenant: tenant.to_owned(),
            id: id.to_owned(),
            limit,
        }
    }

    /// Runs every case.
    pub async fn run(node_a: &dyn QuotaStore, node_b: &dyn QuotaStore, tenant: &str) {
        let t = scope(ScopeKind::Tenant, tenant, "", 3);
        let app1 = scope(ScopeKind::Application, tenant, "app1", 2);
        let app2 = scope(ScopeKind::Application, tenant, "app2", 10);
        let key = scope(ScopeKind::Key, tenant, "KEY1", 10);

        // Counts add up across nodes, up to the limit of each scope.
        let a1 = [t.clone(), app1.clone(), key.clone()];
        assert_eq!(node_a.acquire(&a1).await.unwrap(), None);
        assert_eq!(node_b.acquire(&a1).await.unwrap(), None);
        assert_eq!(
            node_a.acquire(&a1).await.unwrap(),
            Some(1),
            "app1 is at its quota of 2"
        );
        // Every node reads the cluster-wide count (the /stats of an application).
        assert_eq!(node_a.count(&app1).await.unwrap(), 2);
        assert_eq!(node_b.count(&app1).await.unwrap(), 2);
        assert_eq!(node_b.count(&app2).await.unwrap(), 0);
        // A refused acquire took nothing: the tenant has one place left.
        let a2 = [t.clone(), app2.clone()];
        assert_eq!(node_b.acquire(&a2).await.unwrap(), None);
        assert_eq!(
            node_a.acquire(&a2).await.unwrap(),
            Some(0),
            "the tenant is at its quota of 3"
        );
        // Other tenants are not counted with this one.
        let other = format!("{tenant}x");
        let o = [scope(ScopeKind::Tenant, &other, "", 1)];
        assert_eq!(node_a.acquire(&o).await.unwrap(), None);
        // Releasing gives the place back, on whichever node it was held.
        node_b.release(&a1).await.unwrap();
        node_a.refresh().await.unwrap();
        node_b.refresh().await.unwrap();
        assert_eq!(node_a.acquire(&a1).await.unwrap(), None);
        // Releasing more than was held never goes below zero.
        for _ in 0..5 {
            node_a.release(&o).await.unwrap();
        }
        assert_eq!(node_a.acquire(&o).await.unwrap(), None);
        assert_eq!(node_a.acquire(&o).await.unwrap(), Some(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Id;

    #[tokio::test]
    async fn the_memory_store_passes_the_suite() {
        let store = MemoryQuotaStore::new();
        suite::run(&store, &store, "tenant1").await;
    }

    #[tokio::test]
    async fn unlimited_scopes_are_not_counted_and_refusals_are() {
        let metrics = Arc::new(Metrics::default());
        let store = Arc::new(MemoryQuotaStore::new());
        let app = AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap());
        let none = ConnectionQuotas::new(
            store.clone(),
            QuotaLimits {
                tenant: 0,
                application: 0,
                key: 0,
            },
            metrics.clone(),
        );
        assert_eq!(none.acquire(&app, "K").await, Admission::Uncounted);
        let quotas = ConnectionQuotas::new(
            store,
            QuotaLimits {
                tenant: 0,
                application: 5,
                key: 1,
            },
            metrics.clone(),
        );
        assert_eq!(quotas.acquire(&app, "K").await, Admission::Held);
        assert_eq!(
            quotas.acquire(&app, "K").await,
            Admission::Full(ScopeKind::Key)
        );
        assert_eq!(quotas.acquire(&app, "L").await, Admission::Held);
        quotas.release(&app, "K").await;
        assert_eq!(quotas.acquire(&app, "K").await, Admission::Held);
        assert!(metrics
            .render()
            .contains("lorabroker_quota_refused_total{scope=\"key\"} 1"));
    }

    struct Down;

    #[async_trait]
    impl QuotaStore for Down {
        async fn acquire(&self, _: &[Scope]) -> Result<Option<usize>, QuotaError> {
            Err(QuotaError::Unavailable("down".into()))
        }
        async fn release(&self, _: &[Scope]) -> Result<(), QuotaError> {
            Err(QuotaError::Unavailable("down".into()))
        }
        async fn refresh(&self) -> Result<(), QuotaError> {
            Err(QuotaError::Unavailable("down".into()))
        }
        async fn count(&self, _: &Scope) -> Result<u64, QuotaError> {
            Err(QuotaError::Unavailable("down".into()))
        }
    }

    #[tokio::test]
    async fn an_unreachable_store_fails_open_and_is_counted() {
        let metrics = Arc::new(Metrics::default());
        let quotas = ConnectionQuotas::new(
            Arc::new(Down),
            QuotaLimits {
                tenant: 1,
                application: 1,
                key: 1,
            },
            metrics.clone(),
        );
        let app = AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap());
        for _ in 0..3 {
            assert_eq!(quotas.acquire(&app, "K").await, Admission::Uncounted);
        }
        assert!(metrics
            .render()
            .contains("lorabroker_quota_unavailable_total 3"));
    }
}
