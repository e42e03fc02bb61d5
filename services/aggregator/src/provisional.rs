//! Provisional totals of open windows (see `meterflow_core::engine::open`): every
//! `--provisional-interval` (500 ms) the aggregator publishes the running totals of the open
//! windows that changed since the previous publication, so the rater can count their spend as
//! pending within about that interval of the events' acknowledgement instead of when the
//! windows close. The cost is at most one record per active window per interval, whatever the
//! event rate.
//!
//! Best effort by design: the records are handed to the producer without waiting for their
//! acknowledgement and never retried. A lost one only delays the pending amount until the
//! window's next change or its settlement; the exactly-once path (aggregates) is untouched.

use meterflow_core::auth::{self, RecordKey};
use meterflow_core::engine::PartitionEngine;
use meterflow_core::records::{AvroRecord, ProvisionalTotal};
use metrics::counter;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::metrics as m;

/// Where and how provisional totals go.
pub struct Publisher {
    pub producer: FutureProducer,
    pub topic: String,
    /// Tags every record (`meterflow-auth`): the rater ignores untagged ones.
    pub record_key: RecordKey,
    /// `--provisional-interval`.
    pub interval: std::time::Duration,
    pub last: std::time::Instant,
}

impl Publisher {
    /// Whether the interval has passed since the last publication.
    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.interval
    }

    /// Publishes the changed open windows of `engines`, stamped with `now_ms`.
    pub fn publish<'a>(&mut self, engines: impl IntoIterator<Item = &'a mut PartitionEngine>, now_ms: i64) {
        self.last = std::time::Instant::now();
        for engine in engines {
            for p in engine.take_provisional(now_ms) {
                self.send(&p);
            }
        }
    }

    fn send(&self, p: &ProvisionalTotal) {
        let Ok(bytes) = p.to_avro() else {
            counter!(m::PROVISIONAL, "outcome" => "unencodable").increment(1);
            return;
        };
        let tag = auth::sign(&self.record_key, &[auth::PURPOSE_PROVISIONAL, &bytes]);
        let headers = OwnedHeaders::new().insert(Header { key: auth::HEADER, value: Some(&tag[..]) });
        let record = FutureRecord::to(&self.topic).key(p.tenant.as_bytes()).payload(&bytes).headers(headers);
        // The delivery future is dropped: librdkafka still delivers (and retries) the record,
        // the aggregator just does not wait for it.
        match self.producer.send_result(record) {
            Ok(_) => counter!(m::PROVISIONAL, "outcome" => "sent").increment(1),
            Err(_) => counter!(m::PROVISIONAL, "outcome" => "dropped").increment(1),
        }
    }
}
