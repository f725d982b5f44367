//! Backing services for tests (NATS, Redis): filled in by the cluster work.
