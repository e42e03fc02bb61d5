//! Logging set-up, and the metrics the runtime reports on a service's behalf.

use metrics::{counter, describe_counter, describe_histogram, histogram, Unit};

use crate::args::LogArgs;
use crate::output::WriteMetrics;

/// Installs the global subscriber once; later calls (tests running several services in one
/// process) are ignored.
pub fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if args.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Names, in a service's metrics module, of what the runtime's loop and writers report for
/// it; what they mean is described here, once for every service.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeMetrics {
    /// Histogram of ClickHouse insert latency, labelled by `table`.
    pub insert_seconds: &'static str,
    /// Histogram of checkpoint time: snapshot plus fencing check and save, by `kind` (`full`
    /// if the batch wrote any base, else `delta`).
    pub checkpoint_seconds: &'static str,
    /// Counter of failed write attempts (retried), labelled by `sink`.
    pub flush_errors: &'static str,
    /// Counter of partitions given up because another instance claimed them (fencing).
    pub fenced: &'static str,
    /// Counter of checkpoints saved, labelled by `kind` (`full`, `delta`).
    pub checkpoints: &'static str,
    /// Counter of the state bytes of those checkpoints, by `kind`.
    pub checkpoint_bytes: &'static str,
}

impl RuntimeMetrics {
    pub const fn write(&self) -> WriteMetrics {
        WriteMetrics { insert_seconds: self.insert_seconds, errors: self.flush_errors }
    }

    /// Describes them (the recorder must exist) and exports zeros for the unlabelled ones, so
    /// dashboards and alerts see a series before the first event.
    pub fn describe(&self) {
        describe_histogram!(self.insert_seconds, Unit::Seconds, "ClickHouse insert latency by table.");
        describe_histogram!(self.checkpoint_seconds, Unit::Seconds, "Time to write a checkpoint and commit offsets.");
        describe_counter!(self.fenced, "Partitions given up because another instance claimed them in a newer epoch.");
        describe_counter!(self.flush_errors, "Failed flush attempts by sink (retried).");
        describe_counter!(self.checkpoint_bytes, "State bytes of the checkpoints saved, by kind (full, delta).");
        describe_counter!(self.checkpoints, "Checkpoints saved, by kind: full (a base) or delta (the change since the previous one).");
        counter!(self.fenced).increment(0);
        let _ = histogram!(self.checkpoint_seconds, "kind" => "full");
    }
}
