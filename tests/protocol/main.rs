//! The MQTT protocol edge of DESIGN §4 (issue 8) byte by byte: raw TCP sockets write exact
//! packets and read exact answers from a node of `tests/common`, on the embedded backends
//! and, where a backend takes part (queues, events, a Redis that stops), on NATS + Redis.
//!
//! Pipelining behind CONNECT, MQTT 5 refused with CONNACK 0x01, MQTT 3.1 served like 3.1.1,
//! every malformed-packet rule closing, QoS 2 exactly-once, forbidden publishes
//! acknowledged and explained, wills on unwritable topics ignored, and downlinks
//! acknowledged only once stored.
//!
//! One test binary, one module per part of the edge: [`connect`] (the CONNECT phase,
//! versions, pipelining, wills), [`malformed`] (the packet rules), [`publish`] (QoS 2,
//! forbidden topics, acknowledgements); [`raw`] writes and reads the bytes.

#[path = "../common/mod.rs"]
mod common;

/// Generates one `#[tokio::test]` per backend for each suite function.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Embedded).await })*
        }
        mod cluster {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Cluster).await })*
        }
    };
}

mod connect;
mod malformed;
mod publish;
mod raw;
