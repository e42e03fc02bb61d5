//! Shared pieces of meterflow's end-to-end tests, chaos run and benchmarks: checking what
//! the pipeline wrote against the producer's ground truth. The services run as processes
//! under `meterflow_testkit::procs`.

pub mod faults;
pub mod scenario;
pub mod verify;
