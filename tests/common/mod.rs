//! Shared fixtures for integration tests: backing services and brokers.
#![allow(dead_code)]

pub mod broker;
pub mod clients;
pub mod delay_proxy;
pub mod doc;
pub mod http;
pub mod log_capture;
pub mod persistent;
pub mod proxy;
pub mod raw;
pub mod serve;
pub mod services;
pub mod shell;
pub mod sse;
pub mod tls;
pub mod wait;
pub mod ws;
