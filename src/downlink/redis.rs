//! Redis [`super::DownlinkQueue`] (placeholder until the cluster backends land).

/// Redis-backed downlink queue.
pub struct RedisDownlinkQueue;
