//! Every metric the aggregator exports, in one place. Labels are bounded: reason (a fixed
//! enum), partition (the topic's partition count), table and sink (fixed sets).

use meterflow_runtime::telemetry::RuntimeMetrics;
use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Unit};
use meterflow_core::RejectReason;

pub const EVENTS_IN: &str = "meterflow_aggregator_events_in_total";
pub const ACCEPTED: &str = "meterflow_aggregator_events_accepted_total";
pub const DUPLICATES: &str = "meterflow_aggregator_duplicates_total";
pub const DEAD_LETTERS: &str = "meterflow_aggregator_dead_letters_total";
pub const WINDOWS_CLOSED: &str = "meterflow_aggregator_windows_closed_total";
pub const RESTATEMENTS: &str = "meterflow_aggregator_restatements_total";
pub const WATERMARK_LAG: &str = "meterflow_aggregator_watermark_lag_seconds";
pub const CONSUMER_LAG: &str = "meterflow_aggregator_consumer_lag_messages";
pub const BUFFERED_ROWS: &str = "meterflow_aggregator_buffered_rows";
pub const DEDUP_HOT_IDS: &str = "meterflow_aggregator_dedup_hot_ids";
pub const DEDUP_COLD_IDS: &str = "meterflow_aggregator_dedup_cold_ids";
pub const DEDUP_BYTES: &str = "meterflow_aggregator_dedup_bytes";
pub const PARTITIONS_OWNED: &str = "meterflow_aggregator_partitions_owned";
pub const OPEN_WINDOWS: &str = "meterflow_aggregator_open_windows";
pub const WINDOWS_IN_MEMORY: &str = "meterflow_aggregator_windows_in_memory";
pub const PROVISIONAL: &str = "meterflow_aggregator_provisional_totals_total";

/// What the runtime's loop and writers report for the aggregator.
pub const RUNTIME: RuntimeMetrics = RuntimeMetrics {
    insert_seconds: "meterflow_aggregator_clickhouse_insert_seconds",
    checkpoint_seconds: "meterflow_aggregator_checkpoint_seconds",
    flush_errors: "meterflow_aggregator_flush_errors_total",
    fenced: "meterflow_aggregator_partitions_fenced_total",
    checkpoints: "meterflow_aggregator_checkpoints_total",
    checkpoint_bytes: "meterflow_aggregator_checkpoint_bytes_total",
};

pub fn describe() {
    describe_counter!(EVENTS_IN, "Records read from the usage-events topic (ticks excluded).");
    describe_counter!(ACCEPTED, "Events counted in a window.");
    describe_counter!(DUPLICATES, "Events dropped because their (tenant, meter, event id) was accepted before, within the dedup horizon.");
    describe_counter!(DEAD_LETTERS, "Records sent to the dead-letter topic, by reason.");
    describe_counter!(WINDOWS_CLOSED, "Windows closed (revision 0 emitted).");
    describe_counter!(RESTATEMENTS, "Window restatements emitted (revision > 0).");
    describe_gauge!(WATERMARK_LAG, Unit::Seconds, "Wall clock minus the partition's watermark.");
    describe_gauge!(CONSUMER_LAG, "Messages between the committed position and the partition end.");
    RUNTIME.describe();
    describe_gauge!(BUFFERED_ROWS, "Output rows waiting to be flushed.");
    describe_gauge!(DEDUP_HOT_IDS, "Event ids remembered in memory.");
    describe_gauge!(DEDUP_COLD_IDS, "Evicted event ids remembered by a 4-byte fingerprint (a match asks ClickHouse).");
    describe_gauge!(DEDUP_BYTES, Unit::Bytes, "Memory of the dedup tables, hot and cold fingerprints.");
    describe_gauge!(PARTITIONS_OWNED, "Usage-events partitions this instance owns.");
    describe_gauge!(OPEN_WINDOWS, "Open windows per owned partition (bounded per tenant by --max-open-windows-per-tenant).");
    describe_gauge!(WINDOWS_IN_MEMORY, "Open and retained closed windows per owned partition (bounded by --max-windows).");
    describe_counter!(PROVISIONAL, "Provisional totals of open windows handed to the producer (sent) or not (dropped: queue full; unencodable).");
    // Touch the labelled series so dashboards see zeros instead of gaps.
    for r in meterflow_core::RejectReason::ALL {
        counter!(DEAD_LETTERS, "reason" => r.as_str()).increment(0);
    }
    for outcome in ["sent", "dropped", "unencodable"] {
        counter!(PROVISIONAL, "outcome" => outcome).increment(0);
    }
    for c in [EVENTS_IN, ACCEPTED, DUPLICATES, WINDOWS_CLOSED, RESTATEMENTS] {
        counter!(c).increment(0);
    }
    gauge!(BUFFERED_ROWS).set(0.0);
}

/// The per-record counters, registered once: looking a metric up by name for every record
/// (hashing its key in the registry) cost more than the increment itself.
#[derive(Clone)]
pub struct Counters {
    pub events_in: Counter,
    pub accepted: Counter,
    pub duplicates: Counter,
    pub windows_closed: Counter,
    pub restatements: Counter,
    /// By `RejectReason as usize`.
    dead_letters: Vec<Counter>,
}

impl Counters {
    pub fn register() -> Self {
        Self {
            events_in: counter!(EVENTS_IN),
            accepted: counter!(ACCEPTED),
            duplicates: counter!(DUPLICATES),
            windows_closed: counter!(WINDOWS_CLOSED),
            restatements: counter!(RESTATEMENTS),
            dead_letters: {
                let mut by_reason = RejectReason::ALL;
                by_reason.sort_by_key(|r| *r as usize);
                by_reason.iter().map(|r| counter!(DEAD_LETTERS, "reason" => r.as_str())).collect()
            },
        }
    }

    pub fn dead_letter(&self, reason: RejectReason) {
        if let Some(c) = self.dead_letters.get(reason as usize) {
            c.increment(1);
        }
    }
}
