//! [`MemoryDownlinkQueue`]: the in-process [`DownlinkQueue`] of the embedded node and of
//! tests, with the same limits, quotas and idle expiry as the Redis one.
//!
//! One mutex guards every queue and counter, so each operation is as atomic as a Redis
//! script. Idle expiry uses tokio's clock (tests can pause it): each operation first
//! deletes the queues whose deadline has passed, oldest first, giving their bytes back.

use std::collections::{BTreeMap, HashMap, VecDeque};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::queue::{bytes_of, DownlinkQueue, QueueError, QueueLimits, QueueUsage};
use crate::topic::{AppRef, DeviceRef, Id};

/// In-process queues for the embedded node and tests.
pub struct MemoryDownlinkQueue {
    limits: QueueLimits,
    state: Mutex<State>,
}

struct Queue {
    items: VecDeque<String>,
    bytes: u64,
    /// Key of this queue in [`State::expiry`].
    expires: (Instant, u64),
}

#[derive(Default)]
struct State {
    queues: HashMap<DeviceRef, Queue>,
    applications: HashMap<AppRef, u64>,
    tenants: HashMap<Id, u64>,
    /// Queues by deadline (with a sequence number to keep keys unique).
    expiry: BTreeMap<(Instant, u64), DeviceRef>,
    next_seq: u64,
}

impl MemoryDownlinkQueue {
    /// Queues holding at most `capacity` items per device, with the default byte limits.
    pub fn new(capacity: usize) -> Self {
        Self::with_limits(QueueLimits::with_capacity(capacity))
    }

    /// Queues enforcing `limits`.
    pub fn with_limits(limits: QueueLimits) -> Self {
        Self {
            limits,
            state: Mutex::default(),
        }
    }

    /// The state with every queue whose deadline has passed deleted.
    fn state(&self) -> parking_lot::MutexGuard<'_, State> {
        let mut state = self.state.lock();
        let now = Instant::now();
        while let Some(entry) = state.expiry.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let device = entry.remove();
            state.remove(&device);
        }
        state
    }
}

impl State {
    fn usage(&self, device: &DeviceRef) -> QueueUsage {
        let queue = self.queues.get(device);
        QueueUsage {
            items: queue.map_or(0, |q| q.items.len()),
            device_bytes: queue.map_or(0, |q| q.bytes),
            application_bytes: self.applications.get(&device.app).copied().unwrap_or(0),
            tenant_bytes: self.tenants.get(&device.app.tenant).copied().unwrap_or(0),
        }
    }

    /// Checks that replacing `old` bytes of `device` by `new` ones stays within the quotas
    /// (an operation that does not grow the queue always passes).
    fn check_quotas(
        &self,
        limits: &QueueLimits,
        device: &DeviceRef,
        old: u64,
        new: u64,
    ) -> Result<(), QueueError> {
        if new <= old {
            return Ok(());
        }
        let usage = self.usage(device);
        let app = usage.application_bytes.saturating_sub(old);
        if app + new > limits.application_bytes {
            return Err(QueueError::ApplicationQuota {
                queued: app,
                adding: new,
                limit: limits.application_bytes,
            });
        }
        let tenant = usage.tenant_bytes.saturating_sub(old);
        if tenant + new > limits.tenant_bytes {
            return Err(QueueError::TenantQuota {
                queued: tenant,
                adding: new,
                limit: limits.tenant_bytes,
            });
        }
        Ok(())
    }

    /// Adds `delta` bytes (may be negative) to the device's application and tenant.
    fn account(&mut self, device: &DeviceRef, delta: i128) {
        fn apply<K: std::hash::Hash + Eq + Clone>(map: &mut HashMap<K, u64>, k: &K, d: i128) {
            let v = map.get(k).copied().unwrap_or(0) as i128 + d;
            if v <= 0 {
                map.remove(k);
            } else {
                map.insert(k.clone(), v as u64);
            }
        }
        apply(&mut self.applications, &device.app, delta);
        apply(&mut self.tenants, &device.app.tenant, delta);
    }

    /// Deletes a queue and gives its bytes back.
    fn remove(&mut self, device: &DeviceRef) {
        if let Some(q) = self.queues.remove(device) {
            self.expiry.remove(&q.expires);
            self.account(device, -(q.bytes as i128));
        }
    }

    /// Moves the queue's deadline to `idle` from now (a write happened).
    fn touch(&mut self, device: &DeviceRef, idle: std::time::Duration) {
        let key = (Instant::now() + idle, self.next_seq);
        self.next_seq += 1;
        if let Some(q) = self.queues.get_mut(device) {
            let old = std::mem::replace(&mut q.expires, key);
            self.expiry.remove(&old);
            self.expiry.insert(key, device.clone());
        }
    }
}

#[async_trait]
impl DownlinkQueue for MemoryDownlinkQueue {
    async fn push(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError> {
        let mut state = self.state();
        let usage = state.usage(device);
        if items.is_empty() {
            return Ok(usage.items);
        }
        if usage.items + items.len() > self.limits.capacity {
            return Err(QueueError::Full {
                queued: usage.items,
                adding: items.len(),
                capacity: self.limits.capacity,
            });
        }
        let adding = bytes_of(items);
        if usage.device_bytes + adding > self.limits.device_bytes {
            return Err(QueueError::DeviceBytes {
                queued: usage.device_bytes,
                adding,
                limit: self.limits.device_bytes,
            });
        }
        state.check_quotas(&self.limits, device, 0, adding)?;
        let now = Instant::now();
        let q = state.queues.entry(device.clone()).or_insert_with(|| Queue {
            items: VecDeque::new(),
            bytes: 0,
            expires: (now, u64::MAX),
        });
        q.items.extend(items.iter().cloned());
        q.bytes += adding;
        let len = q.items.len();
        state.account(device, adding as i128);
        state.touch(device, self.limits.idle_expiry);
        Ok(len)
    }

    async fn replace(&self, device: &DeviceRef, items: &[String]) -> Result<usize, QueueError> {
        if items.len() > self.limits.capacity {
            return Err(QueueError::Full {
                queued: 0,
                adding: items.len(),
                capacity: self.limits.capacity,
            });
        }
        let adding = bytes_of(items);
        if adding > self.limits.device_bytes {
            return Err(QueueError::DeviceBytes {
                queued: 0,
                adding,
                limit: self.limits.device_bytes,
            });
        }
        let mut state = self.state();
        let old = state.usage(device).device_bytes;
        state.check_quotas(&self.limits, device, old, adding)?;
        state.remove(device);
        if items.is_empty() {
            return Ok(0);
        }
        let now = Instant::now();
        state.queues.insert(
            device.clone(),
            Queue {
                items: items.iter().cloned().collect(),
                bytes: adding,
                expires: (now, u64::MAX),
            },
        );
        state.account(device, adding as i128);
        state.touch(device, self.limits.idle_expiry);
        Ok(items.len())
    }

    async fn pop(&self, device: &DeviceRef) -> Result<Option<String>, QueueError> {
        let mut state = self.state();
        let Some(q) = state.queues.get_mut(device) else {
            return Ok(None);
        };
        let item = q.items.pop_front();
        let taken = item.as_ref().map_or(0, |i| i.len() as u64);
        q.bytes = q.bytes.saturating_sub(taken);
        let empty = q.items.is_empty();
        state.account(device, -(taken as i128));
        if empty {
            state.remove(device);
        }
        Ok(item)
    }

    async fn list(&self, device: &DeviceRef) -> Result<Vec<String>, QueueError> {
        Ok(self
            .state()
            .queues
            .get(device)
            .map(|q| q.items.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn usage(&self, device: &DeviceRef) -> Result<QueueUsage, QueueError> {
        Ok(self.state().usage(device))
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn device(app: &str, dev: &str) -> DeviceRef {
        DeviceRef::new(
            AppRef::new(Id::parse("tenant1").unwrap(), Id::parse(app).unwrap()),
            Id::parse(dev).unwrap(),
        )
    }

    fn limits() -> QueueLimits {
        QueueLimits {
            capacity: 100,
            device_bytes: 1000,
            application_bytes: 2000,
            tenant_bytes: 3000,
            idle_expiry: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_queues_expire_and_give_their_bytes_back() {
        let queue = MemoryDownlinkQueue::with_limits(limits());
        let (a, b) = (device("app1", "dev1"), device("app1", "dev2"));
        queue.push(&a, &["x".repeat(100)]).await.unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        queue.push(&b, &["y".repeat(50)]).await.unwrap();
        assert_eq!(queue.usage(&a).await.unwrap().application_bytes, 150);
        // a is idle for 60 s: gone, its bytes with it; b was written 30 s later.
        tokio::time::advance(Duration::from_secs(31)).await;
        let usage = queue.usage(&a).await.unwrap();
        assert_eq!((usage.items, usage.application_bytes), (0, 50));
        assert_eq!(usage.tenant_bytes, 50);
        assert!(queue.list(&a).await.unwrap().is_empty());
        // A write moves the deadline: b survives another 59 s after this push.
        queue.push(&b, &["z".into()]).await.unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(queue.usage(&b).await.unwrap().items, 2);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(queue.usage(&b).await.unwrap(), QueueUsage::default());
        // A pop is not a write.
        queue.push(&b, &["1".into(), "2".into()]).await.unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(queue.pop(&b).await.unwrap().as_deref(), Some("1"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(queue.pop(&b).await.unwrap(), None);
        assert_eq!(queue.state.lock().expiry.len(), 0);
    }
}
