//! meterflow's producer: a library to send usage events to Kafka, and a generator of realistic
//! AI-platform traffic that also writes the exact totals the pipeline must arrive at.
//!
//! * [`EventProducer`]: idempotent Kafka producer of Avro-encoded [`UsageEvent`]s, one at a
//!   time ([`EventProducer::send`]) or at 100k+ events/s through a [`SendWindow`].
//! * [`generate`]: the workload generator with injected duplicates, late, malformed and
//!   too-late messages; returns a [`GroundTruth`] computed independently of the core's engine,
//!   which end-to-end tests compare the pipeline's output against.
//! * [`cli`]: the `meterflow-producer` binary's command line; `main` only parses it and calls
//!   [`run`], so tests can drive the binary's code in-process.
//!
//! [`UsageEvent`]: meterflow_core::UsageEvent

pub mod cli;
pub mod event;
pub mod generate;
pub mod metrics;
pub mod producer;
pub mod progress;
pub mod time;
pub mod truth;
pub mod workload;

pub use cli::{run, Cli};
pub use event::{random_event_id, usage_event};
pub use generate::{generate, EventTimeMode, GenerateConfig, DEFAULT_DEDUP_HORIZON};
pub use producer::{Delivery, EventProducer, SendError, SendWindow, Sent};
pub use progress::Progress;
pub use truth::{Counters, GroundTruth, MalformedRecord, MeterInfo, MeterTotal, RunInfo, WindowKey, WindowTotal};
