//! Sending usage events to Kafka.
//!
//! [`EventProducer`] wraps rdkafka's `FutureProducer` with meterflow's producer settings
//! (idempotent, `acks=all`, see [`meterflow_runtime::kafka::producer_config`]) and the core's
//! codec. Two ways to send:
//!
//! * [`EventProducer::send`] / [`EventProducer::send_raw`] await the broker's acknowledgement of
//!   one message: simple, and the right tool for a human or a test that sends a few events.
//! * [`SendWindow`] keeps up to `max_in_flight` messages in flight and hands back delivery
//!   reports as they arrive. Awaiting each acknowledgement in turn caps a producer at one
//!   message per round trip (a few thousand per second); the window lets librdkafka batch
//!   thousands of messages per request, which is what reaching 100k+ events/s takes.
//!
//! The message key is always the tenant: all events of a tenant land on one partition, in
//! order, which is what the aggregator's per-partition dedup and watermarks rely on.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use meterflow_core::codec::{Framing, UsageEventCodec};
use meterflow_core::UsageEvent;
use meterflow_runtime::args::KafkaArgs;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// Where the broker stored a message: what a dead letter or a ground truth points back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
}

/// Why a message was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The producer went away before librdkafka reported the outcome; the message may or may
    /// not have been written.
    #[error("delivery report lost: the producer was dropped before the broker answered")]
    Canceled,
}

/// How long [`EventProducer::send`] waits for room in librdkafka's local queue before giving up.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// A Kafka producer of usage events on one topic.
pub struct EventProducer {
    inner: FutureProducer,
    topic: String,
    codec: UsageEventCodec,
    framing: Framing,
}

impl std::fmt::Debug for EventProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventProducer")
            .field("topic", &self.topic)
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl EventProducer {
    /// A producer with meterflow's settings (idempotent, `acks=all`, never transactional: the
    /// local broker refuses transactions) writing Avro single-object encoded events to `topic`.
    pub fn new(kafka: &KafkaArgs, topic: impl Into<String>) -> anyhow::Result<Self> {
        let cfg = meterflow_runtime::kafka::producer_config(kafka)?;
        Ok(Self::from_config(&cfg, topic)?)
    }

    /// A producer from an explicit librdkafka configuration (tests tune linger or timeouts).
    pub fn from_config(cfg: &ClientConfig, topic: impl Into<String>) -> Result<Self, KafkaError> {
        Ok(Self {
            inner: cfg.create()?,
            topic: topic.into(),
            codec: UsageEventCodec::new(),
            framing: Framing::SingleObject,
        })
    }

    /// Switches the framing, e.g. to Confluent's for a schema-registry world.
    pub fn with_framing(mut self, framing: Framing) -> Self {
        self.framing = framing;
        self
    }

    /// Uses a codec with other Confluent schema ids.
    pub fn with_codec(mut self, codec: UsageEventCodec) -> Self {
        self.codec = codec;
        self
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    pub fn codec(&self) -> &UsageEventCodec {
        &self.codec
    }

    /// The underlying rdkafka producer, for what this wrapper does not cover.
    pub fn kafka(&self) -> &FutureProducer {
        &self.inner
    }

    /// The bytes [`EventProducer::send`] would write for `ev`.
    pub fn encode(&self, ev: &UsageEvent) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        self.encode_into(ev, &mut out);
        out
    }

    /// Appends the encoding of `ev` to `out` (lets a hot loop reuse one buffer).
    pub fn encode_into(&self, ev: &UsageEvent, out: &mut Vec<u8>) {
        self.codec.encode(ev, self.framing, out);
    }

    /// Sends one event keyed by its tenant and waits for the broker's acknowledgement.
    pub async fn send(&self, ev: &UsageEvent) -> Result<Delivery, SendError> {
        let payload = self.encode(ev);
        self.send_raw(&ev.tenant, &payload).await
    }

    /// Sends arbitrary bytes under `key`: load generators and tests use it for malformed
    /// payloads the codec would never produce.
    pub async fn send_raw(&self, key: &str, payload: &[u8]) -> Result<Delivery, SendError> {
        let record = FutureRecord::to(&self.topic).key(key).payload(payload);
        match self.inner.send(record, Timeout::After(QUEUE_TIMEOUT)).await {
            Ok(d) => Ok(Delivery {
                partition: d.partition,
                offset: d.offset,
            }),
            Err((e, _msg)) => Err(SendError::Kafka(e)),
        }
    }

    /// A window of up to `max_in_flight` unacknowledged messages for high-throughput sending.
    /// `T` is whatever the caller wants back with each delivery report.
    pub fn window<T>(&self, max_in_flight: usize) -> SendWindow<'_, T> {
        SendWindow {
            producer: self,
            in_flight: FuturesUnordered::new(),
            max_in_flight: max_in_flight.max(1),
            completed: Vec::new(),
            latency_every: DEFAULT_LATENCY_SAMPLE_EVERY,
            sent: 0,
        }
    }

    /// Waits until every queued message is acknowledged or `timeout` passes. Blocking: call it
    /// from `spawn_blocking` in async code that must not stall.
    pub fn flush(&self, timeout: Duration) -> Result<(), SendError> {
        self.inner.flush(Timeout::After(timeout)).map_err(SendError::Kafka)
    }
}

/// By default one message in this many has its latency measured: reading the clock twice per
/// message and recording every sample costs more, at 100k+ messages/s, than the samples are
/// worth.
pub const DEFAULT_LATENCY_SAMPLE_EVERY: u64 = 256;

/// The outcome of one message sent through a [`SendWindow`].
#[derive(Debug)]
pub struct Sent<T> {
    pub tag: T,
    pub result: Result<Delivery, SendError>,
    /// For sampled messages: from handing the message to librdkafka to seeing its delivery
    /// report (an upper bound: reports are noticed when the window is polled).
    pub latency: Option<Duration>,
}

/// Messages in flight on an [`EventProducer`], with their delivery reports collected as they
/// arrive. Dropping the window does not cancel the messages; it only loses their reports.
pub struct SendWindow<'p, T> {
    producer: &'p EventProducer,
    in_flight: FuturesUnordered<InFlight<T>>,
    max_in_flight: usize,
    completed: Vec<Sent<T>>,
    latency_every: u64,
    sent: u64,
}

impl<T> std::fmt::Debug for SendWindow<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendWindow")
            .field("in_flight", &self.in_flight.len())
            .field("max_in_flight", &self.max_in_flight)
            .field("completed", &self.completed.len())
            .finish()
    }
}

impl<T> SendWindow<'_, T> {
    /// Measures the latency of one message in `n` (1 = every message).
    pub fn sample_latency_every(mut self, n: u64) -> Self {
        self.latency_every = n.max(1);
        self
    }

    /// Hands `payload` to librdkafka under `key`, first waiting for room if the window (or
    /// librdkafka's own queue) is full. The outcome comes back, with `tag`, from
    /// [`SendWindow::drain_completed`] or [`SendWindow::finish`]; a message rejected outright
    /// (e.g. too large) is reported there too, as an error.
    pub async fn send(&mut self, key: &str, payload: &[u8], tag: T) {
        while self.in_flight.len() >= self.max_in_flight {
            self.wait_one().await;
        }
        let topic = self.producer.topic.as_str();
        let sampled = self.sent % self.latency_every == 0;
        self.sent += 1;
        loop {
            let record = FutureRecord::to(topic).key(key).payload(payload);
            match self.producer.inner.send_result(record) {
                Ok(fut) => {
                    self.in_flight.push(InFlight {
                        fut,
                        tag: Some(tag),
                        enqueued: sampled.then(Instant::now),
                    });
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // librdkafka's queue is bounded by bytes too: wait for acknowledgements.
                    if !self.wait_one().await {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                Err((e, _)) => {
                    self.completed.push(Sent {
                        tag,
                        result: Err(SendError::Kafka(e)),
                        latency: None,
                    });
                    break;
                }
            }
        }
        self.collect_ready();
    }

    /// Messages handed over but not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Delivery reports that arrived since the last call.
    pub fn drain_completed(&mut self) -> std::vec::Drain<'_, Sent<T>> {
        self.collect_ready();
        self.completed.drain(..)
    }

    /// The next delivery report: one already collected, else the next to arrive; None once
    /// nothing is in flight.
    pub async fn next(&mut self) -> Option<Sent<T>> {
        if let Some(sent) = self.completed.pop() {
            return Some(sent);
        }
        self.in_flight.next().await
    }

    /// Waits for every message in flight and returns the reports not drained yet.
    pub async fn finish(mut self) -> Vec<Sent<T>> {
        while self.wait_one().await {}
        self.completed
    }

    /// Moves reports that are already there into `completed`, without waiting.
    fn collect_ready(&mut self) {
        while let Some(Some(sent)) = self.in_flight.next().now_or_never() {
            self.completed.push(sent);
        }
    }

    /// Waits for one report; false if nothing is in flight.
    async fn wait_one(&mut self) -> bool {
        match self.in_flight.next().await {
            Some(sent) => {
                self.completed.push(sent);
                true
            }
            None => false,
        }
    }
}

/// One message in flight: the delivery future plus what the caller gets back with it.
struct InFlight<T> {
    fut: DeliveryFuture,
    tag: Option<T>,
    enqueued: Option<Instant>,
}

// The tag is only moved out, never pinned, so the future is Unpin whatever `T` is.
impl<T> Unpin for InFlight<T> {}

impl<T> Future for InFlight<T> {
    type Output = Sent<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Sent<T>> {
        let this = self.get_mut();
        let outcome = match this.fut.poll_unpin(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(outcome) => outcome,
        };
        let result = match outcome {
            Ok(Ok(d)) => Ok(Delivery {
                partition: d.partition,
                offset: d.offset,
            }),
            Ok(Err((e, _msg))) => Err(SendError::Kafka(e)),
            Err(_canceled) => Err(SendError::Canceled),
        };
        Poll::Ready(Sent {
            #[allow(clippy::expect_used, reason = "a future polled after it completed may panic (Future::poll)")]
            tag: this.tag.take().expect("InFlight polled after completion"),
            result,
            latency: this.enqueued.map(|t| t.elapsed()),
        })
    }
}
