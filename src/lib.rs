//! # hmis-flow
//!
//! The binary's library half: configuration, the Kafka source, the runtime that wires
//! source → dataflow (crate `hmis-dataflows`) → sinks (crate `hmis-sinks`), the HTTP
//! endpoints, the demo and its workload generator. `main.rs` is only the CLI.
//!
//! ```text
//!  Kafka inputs ─► source ─► timely workers ─► gather ─► sink: PostgreSQL txn ─► outbox ─► Kafka outputs
//! ```

pub mod config;
pub mod demo;
pub mod http;
pub mod runtime;
pub mod source;
pub mod workload;

pub use config::{ClockMode, Config};
pub use runtime::{run, RunSummary, Shared};
