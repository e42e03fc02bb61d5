//! Every metric the producer exports, declared in one place so names and labels stay
//! consistent and the `/metrics` page can be read against this file.
//!
//! Handles are registered once and then only incremented: looking a metric up by name and
//! labels on every event would cost more than encoding the event.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge, Histogram, Unit};

/// `meterflow_producer_events_sent_total{kind}`: messages acknowledged by the broker.
pub const EVENTS_SENT: &str = "meterflow_producer_events_sent_total";
/// `meterflow_producer_send_errors_total`: messages the broker did not acknowledge.
pub const SEND_ERRORS: &str = "meterflow_producer_send_errors_total";
/// `meterflow_producer_send_latency_seconds`: hand-over to acknowledgement, 1 in
/// [`crate::producer::DEFAULT_LATENCY_SAMPLE_EVERY`] messages.
pub const SEND_LATENCY: &str = "meterflow_producer_send_latency_seconds";
/// `meterflow_producer_in_flight`: messages handed over and not acknowledged yet.
pub const IN_FLIGHT: &str = "meterflow_producer_in_flight";

/// What kind of message was sent (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SentKind {
    /// A valid, first-time event in an open window.
    Valid,
    /// A valid, first-time event whose time lands in an already-closed window.
    Late,
    /// A byte-identical re-send of an earlier event.
    Duplicate,
    /// A payload the pipeline must reject (dead-letter), other than too-late.
    Malformed,
    /// A valid event older than the dedup horizon: rejected as `too_late`.
    TooLate,
}

impl SentKind {
    pub const ALL: [SentKind; 5] = [SentKind::Valid, SentKind::Late, SentKind::Duplicate, SentKind::Malformed, SentKind::TooLate];

    pub fn as_str(self) -> &'static str {
        match self {
            SentKind::Valid => "valid",
            SentKind::Late => "late",
            SentKind::Duplicate => "duplicate",
            SentKind::Malformed => "malformed",
            SentKind::TooLate => "too_late",
        }
    }
}

/// Registered metric handles.
#[derive(Clone)]
pub struct ProducerMetrics {
    sent: [Counter; 5],
    send_errors: Counter,
    send_latency: Histogram,
    in_flight: Gauge,
}

impl std::fmt::Debug for ProducerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProducerMetrics")
    }
}

impl ProducerMetrics {
    /// Describes and registers the metrics with the installed recorder (no-ops without one,
    /// e.g. in tests that do not serve `/metrics`).
    pub fn register() -> Self {
        describe_counter!(EVENTS_SENT, Unit::Count, "Messages acknowledged by the broker, by kind (valid, late, duplicate, malformed, too_late).");
        describe_counter!(SEND_ERRORS, Unit::Count, "Messages the broker did not acknowledge.");
        describe_histogram!(SEND_LATENCY, Unit::Seconds, "Time from handing a message to librdkafka to its delivery report (1 in 256 messages sampled).");
        describe_gauge!(IN_FLIGHT, Unit::Count, "Messages handed to librdkafka and not acknowledged yet.");
        Self {
            sent: SentKind::ALL.map(|k| counter!(EVENTS_SENT, "kind" => k.as_str())),
            send_errors: counter!(SEND_ERRORS),
            send_latency: histogram!(SEND_LATENCY),
            in_flight: gauge!(IN_FLIGHT),
        }
    }

    pub fn sent(&self, kind: SentKind) {
        self.sent[kind as usize].increment(1);
    }

    pub fn send_error(&self) {
        self.send_errors.increment(1);
    }

    pub fn latency(&self, seconds: f64) {
        self.send_latency.record(seconds);
    }

    pub fn in_flight(&self, n: usize) {
        self.in_flight.set(n as f64);
    }
}
