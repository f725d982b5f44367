//! Shared fixtures for integration tests: backing services and brokers.
#![allow(dead_code)]

pub mod broker;
pub mod delay_proxy;
pub mod http;
pub mod services;
pub mod shell;
pub mod wait;
pub mod ws;
