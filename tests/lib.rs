//! Shared pieces of meterflow's end-to-end tests, chaos run and benchmarks: checking what
//! the pipeline wrote against the producer's ground truth, and running the services as real
//! processes that can be killed.

pub mod faults;
pub mod procs;
pub mod scenario;
pub mod verify;
