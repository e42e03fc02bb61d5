//! I/O shared by meterflow's services, so that each service crate stays thin.

pub mod args;
pub mod chain;
pub mod checkpoint;
mod claim;
pub mod clickhouse;
pub mod error;
pub mod http;
mod inflight;
pub mod kafka;
/// The in-memory driver: the loop's own tests, and other crates' with the `memory` feature.
#[cfg(any(test, feature = "memory"))]
pub mod memory;
pub mod output;
pub mod partitioned;
pub mod record;
pub mod record_key;
pub mod resume;
pub mod retry;
pub mod rows;
pub mod service;
mod service_io;
pub mod shutdown;
pub mod source;
pub mod store;
pub mod tail;
pub mod telemetry;

pub use error::Error;
