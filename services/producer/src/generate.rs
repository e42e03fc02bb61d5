//! The workload generator: realistic traffic with injected duplicates, late, malformed and
//! too-late messages, and the exact ground truth of what the pipeline must make of it.
//!
//! Every message slot draws its kind first (duplicate, malformed, too-late, or the next event
//! of a request), so the rates are fractions of all messages sent. Content depends only on the
//! seed (and, in real-time mode, the clock): event ids come from the seeded generator, and in
//! simulated-time mode with `--events` event times come from the message index, so two runs
//! with the same flags write byte-identical payloads.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use meterflow_core::codec::{Framing, WriterVersion};
use meterflow_core::meter::{Aggregation, MeterCatalog};
use meterflow_core::{RejectReason, UsageEventRef};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::event::event_id_from;
use crate::metrics::{ProducerMetrics, SentKind};
use crate::producer::{EventProducer, Sent, SendWindow};
use crate::progress::{Progress, Reporter};
use crate::time::{duration_ms, now_ms};
use crate::truth::{EventView, GroundTruth, RunInfo, TruthBuilder};
use crate::workload::{GenEvent, Workload};

mod malformed;
use malformed::{malformed, Malformed};

/// How event times are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventTimeMode {
    /// Event time = wall clock when the request is generated.
    RealTime,
    /// Event times spread evenly over `[start_ms, start_ms + span_ms)` in step with progress
    /// (message index for `events`, elapsed time for `duration`), whatever the wall clock:
    /// an hour of windows in a few seconds of test.
    Simulated { start_ms: i64, span_ms: i64 },
}

/// What to generate. [`GenerateConfig::new`] gives the CLI's defaults.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// Meter definitions: which meters exist, their windows, group_by and lateness.
    pub meters: MeterCatalog,
    /// Total messages to send, injected ones included. At least one of `events` and
    /// `duration` must be set; with both, whichever comes first ends the run.
    pub events: Option<u64>,
    pub duration: Option<Duration>,
    /// Messages per second; 0 = as fast as possible.
    pub rate: f64,
    pub seed: u64,
    pub tenants: usize,
    /// Zipf exponent of tenant activity (1.1: the top tenant sends ~20% of the traffic of 50).
    pub zipf_exponent: f64,
    /// Fraction of messages that re-send the exact bytes of an earlier event.
    pub duplicate_rate: f64,
    /// Fraction of requests whose events are moved back into an already-closed window.
    pub late_rate: f64,
    /// Upper bound of how far back a late event is moved.
    pub max_lateness: Duration,
    /// Fraction of messages that are malformed (undecodable, unknown meter, bad fields).
    pub malformed_rate: f64,
    /// Fraction of messages older than the dedup horizon (expected reason `too_late`).
    pub too_late_rate: f64,
    /// The aggregator's dedup horizon; too-late events are placed beyond it.
    pub dedup_horizon: Duration,
    pub event_time: EventTimeMode,
    /// The events' `source` field.
    pub source: String,
    /// Messages in flight at most (see [`SendWindow`]).
    pub max_in_flight: usize,
    /// Cancelled = stop sending, wait (30 s at most) for what is in flight, return the truth so far.
    pub shutdown: CancellationToken,
}

impl GenerateConfig {
    /// The CLI's defaults: 100,000 messages (set `events = None` for a run bounded by
    /// `duration` only), 50 tenants, 10% duplicates, 5% late, 1% malformed, no too-late,
    /// real-time event time, seed 1.
    pub fn new(meters: MeterCatalog) -> Self {
        Self {
            meters,
            events: Some(100_000),
            duration: None,
            rate: 0.0,
            seed: 1,
            tenants: 50,
            zipf_exponent: 1.1,
            duplicate_rate: 0.10,
            late_rate: 0.05,
            max_lateness: Duration::from_secs(600),
            malformed_rate: 0.01,
            too_late_rate: 0.0,
            dedup_horizon: DEFAULT_DEDUP_HORIZON,
            event_time: EventTimeMode::RealTime,
            source: "meterflow-producer".into(),
            max_in_flight: 100_000,
            shutdown: CancellationToken::new(),
        }
    }

    /// Rejects settings that cannot produce what they promise.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.events.is_some() || self.duration.is_some(), "set a number of events or a duration");
        for (name, r) in [
            ("duplicate rate", self.duplicate_rate),
            ("late rate", self.late_rate),
            ("malformed rate", self.malformed_rate),
            ("too-late rate", self.too_late_rate),
        ] {
            anyhow::ensure!((0.0..=1.0).contains(&r), "{name} must be between 0 and 1, got {r}");
        }
        let injected = self.duplicate_rate + self.malformed_rate + self.too_late_rate;
        anyhow::ensure!(injected < 1.0, "duplicate + malformed + too-late rates add up to {injected}: no room for valid events");
        anyhow::ensure!(self.rate >= 0.0 && self.rate.is_finite(), "rate must be >= 0");
        anyhow::ensure!(self.tenants >= 1, "at least one tenant");
        anyhow::ensure!(self.max_in_flight >= 1, "max in flight must be >= 1");
        if let EventTimeMode::Simulated { span_ms, .. } = self.event_time {
            anyhow::ensure!(span_ms > 0, "the event-time span must be positive");
        }
        if self.late_rate > 0.0 {
            let (lo, hi) = self.late_bounds_ms();
            anyhow::ensure!(
                hi > lo,
                "max lateness ({hi} ms) must exceed the largest window + allowed lateness + jitter ({lo} ms): a late event must land in a closed window"
            );
        }
        anyhow::ensure!(duration_ms(self.dedup_horizon) > 0, "the dedup horizon must be positive");
        Ok(())
    }

    /// Backwards jitter of ordinary event times: at most half the smallest allowed lateness
    /// (and 1 s), so that jitter alone never makes an event late.
    fn jitter_ms(&self) -> i64 {
        let min_lateness = self.meters.meters().iter().map(|m| m.allowed_lateness_ms).min().unwrap_or(0);
        (min_lateness / 2).min(1000)
    }

    /// How far back a late event goes: far enough that its window has closed for every meter
    /// (window + allowed lateness + jitter behind the newest event time), and at most
    /// `max_lateness`.
    fn late_bounds_ms(&self) -> (i64, i64) {
        let closed = self
            .meters
            .meters()
            .iter()
            .map(|m| m.window_ms + m.allowed_lateness_ms)
            .max()
            .unwrap_or(0);
        (closed + self.jitter_ms() + 1, duration_ms(self.max_lateness))
    }
}

/// What the delivery report of a message means for the ground truth.
#[derive(Debug)]
enum Tag {
    Accepted { event: GenEvent, late: bool },
    Duplicate,
    Rejected { reason: RejectReason, kind: &'static str },
}

/// Where event time stands for message `i`.
#[derive(Debug)]
struct Clock {
    mode: EventTimeMode,
    started: Instant,
    events: Option<u64>,
    duration: Option<Duration>,
}

impl Clock {
    fn now_ms(&self, i: u64) -> i64 {
        match self.mode {
            EventTimeMode::RealTime => now_ms(),
            EventTimeMode::Simulated { start_ms, span_ms } => {
                let fraction = match (self.events, self.duration) {
                    (Some(n), _) => i as f64 / n.max(1) as f64,
                    (None, Some(d)) => self.started.elapsed().as_secs_f64() / d.as_secs_f64().max(1e-9),
                    (None, None) => 0.0,
                };
                start_ms + (fraction.min(1.0) * span_ms as f64) as i64
            }
        }
    }
}

/// The aggregator's default dedup horizon (35 days: a month plus slack for late producers).
pub const DEFAULT_DEDUP_HORIZON: Duration = Duration::from_secs(35 * 86_400);

/// Recently sent valid events, for duplicates: (tenant index, exact bytes).
const DUPLICATE_RING: usize = 4096;
/// Share of duplicates that immediately follow their original (a client retrying at once).
const IMMEDIATE_DUPLICATES: f64 = 0.3;
/// How often (in messages) progress and the in-flight gauge are updated.
const REPORT_EVERY: u64 = 1024;

/// Generates the workload described by `cfg` into `producer`'s topic and returns the ground
/// truth of what was acknowledged.
pub async fn generate(cfg: GenerateConfig, producer: &EventProducer, progress: Progress) -> anyhow::Result<GroundTruth> {
    cfg.validate()?;
    let metrics = ProducerMetrics::register();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let workload = Workload::new(&cfg.meters, cfg.tenants, cfg.zipf_exponent, &cfg.source, &mut rng)?;
    let started_wall = now_ms();
    let started = Instant::now();
    let clock = Clock {
        mode: cfg.event_time,
        started,
        events: cfg.events,
        duration: cfg.duration,
    };
    let mut reporter = Reporter::new(progress, cfg.events, cfg.duration);
    let mut truth = TruthBuilder::new(cfg.meters.clone());
    let mut window: SendWindow<'_, Tag> = producer.window(cfg.max_in_flight);
    let mut ctx = Apply {
        metrics: &metrics,
        workload: &workload,
        errors_logged: 0,
    };
    let mut slots = Slots::new(&cfg, &workload, producer, rng);
    let mut interrupted = false;
    let mut i: u64 = 0;

    loop {
        if cfg.events.is_some_and(|n| i >= n) || cfg.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if cfg.shutdown.is_cancelled() {
            interrupted = true;
            break;
        }
        if cfg.rate > 0.0 {
            let due = started + Duration::from_secs_f64(i as f64 / cfg.rate);
            if due > Instant::now() + Duration::from_millis(1) {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = cfg.shutdown.cancelled() => continue,
                }
            }
        }
        if !slots.send_next(clock.now_ms(i), &mut window).await {
            continue;
        }
        i += 1;

        for sent in window.drain_completed() {
            ctx.apply(sent, &mut truth);
        }
        if i % REPORT_EVERY == 0 {
            metrics.in_flight(window.in_flight());
            reporter.update(i, window.in_flight(), truth.counters().send_errors);
            // The loop only awaits when the window is full: let other tasks (the /metrics
            // server, signal handling) run on a busy runtime.
            tokio::task::yield_now().await;
        }
    }

    settle_rest(&mut window, interrupted, &mut ctx, &mut truth, &metrics).await;
    metrics.in_flight(0);
    reporter.update(i, 0, truth.counters().send_errors);
    reporter.finish();

    let run = run_info(&cfg, producer, started_wall, started.elapsed(), truth.min_max_time(), interrupted);
    let gt = truth.finish(run);
    gt.check_consistency()?;
    Ok(gt)
}

/// What the ground truth records of the run itself.
fn run_info(
    cfg: &GenerateConfig,
    producer: &EventProducer,
    started_at_ms: i64,
    elapsed: Duration,
    (min_event_time_ms, max_event_time_ms): (Option<i64>, Option<i64>),
    interrupted: bool,
) -> RunInfo {
    RunInfo {
        topic: producer.topic().to_owned(),
        seed: cfg.seed,
        framing: match producer.framing() {
            Framing::SingleObject => "single-object".into(),
            Framing::Confluent { .. } => "confluent".into(),
        },
        event_time_mode: match cfg.event_time {
            EventTimeMode::RealTime => "real-time".into(),
            EventTimeMode::Simulated { .. } => "simulated".into(),
        },
        dedup_horizon_ms: duration_ms(cfg.dedup_horizon),
        started_at_ms,
        elapsed_ms: elapsed.as_millis() as u64,
        min_event_time_ms,
        max_event_time_ms,
        interrupted,
    }
}

/// Waits for the messages still in flight; after a shutdown request, not longer than 30 s
/// (what is still unacknowledged then counts as send errors).
async fn settle_rest(
    window: &mut SendWindow<'_, Tag>,
    interrupted: bool,
    ctx: &mut Apply<'_>,
    truth: &mut TruthBuilder,
    metrics: &ProducerMetrics,
) {
    let deadline = interrupted.then(|| tokio::time::Instant::now() + Duration::from_secs(30));
    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, window.next()).await {
                Ok(next) => next,
                Err(_) => {
                    let lost = window.in_flight();
                    tracing::warn!("{lost} messages still unacknowledged after 30 s: counted as send errors");
                    for _ in 0..lost {
                        truth.send_error();
                        metrics.send_error();
                    }
                    break;
                }
            },
            None => window.next().await,
        };
        match next {
            Some(sent) => ctx.apply(sent, truth),
            None => break,
        }
    }
}

/// What decides each message slot: the seeded generator, what it draws from, and what it
/// remembers (recent valid messages for duplicates, the request being sent, each tenant's
/// newest event time).
struct Slots<'a> {
    rng: StdRng,
    workload: &'a Workload,
    producer: &'a EventProducer,
    source: &'a str,
    enc: Encoder,
    /// Sum meters that forbid negative quantities (a count meter might reasonably not look
    /// at the quantity at all).
    negative_meters: Vec<&'a str>,
    emitted_meters: Vec<&'a str>,
    /// A meter name the catalog does not have.
    unknown_meter: String,
    jitter_ms: i64,
    late_bounds: (i64, i64),
    late_rate: f64,
    horizon_ms: i64,
    /// Cumulative thresholds of a slot's uniform draw: duplicate, malformed, too late.
    p_dup: f64,
    p_malformed: f64,
    p_too_late: f64,
    /// Events of the current request not sent yet: (event, late).
    pending: VecDeque<(GenEvent, bool)>,
    scratch: Vec<GenEvent>,
    ring: VecDeque<(usize, Vec<u8>)>,
    /// Newest event time sent per tenant: too-late events are placed relative to it, so that
    /// they are too late whatever else shares the tenant's partition.
    tenant_max: Vec<Option<i64>>,
}

impl<'a> Slots<'a> {
    fn new(cfg: &'a GenerateConfig, workload: &'a Workload, producer: &'a EventProducer, rng: StdRng) -> Self {
        let negative_meters: Vec<&str> = cfg
            .meters
            .meters()
            .iter()
            .filter(|m| !m.allow_negative && m.aggregation == Aggregation::Sum && workload_meter(&m.name))
            .map(|m| m.name.as_str())
            .collect();
        let emitted_meters: Vec<&str> =
            cfg.meters.meters().iter().map(|m| m.name.as_str()).filter(|m| workload_meter(m)).collect();
        let mut unknown_meter = "image_generations".to_owned();
        for i in 1.. {
            if cfg.meters.get(&unknown_meter).is_none() {
                break;
            }
            unknown_meter = format!("image_generations_{i}");
        }
        Self {
            rng,
            workload,
            producer,
            source: &cfg.source,
            enc: Encoder::default(),
            negative_meters,
            emitted_meters,
            unknown_meter,
            jitter_ms: cfg.jitter_ms(),
            late_bounds: cfg.late_bounds_ms(),
            late_rate: cfg.late_rate,
            horizon_ms: duration_ms(cfg.dedup_horizon),
            p_dup: cfg.duplicate_rate,
            p_malformed: cfg.duplicate_rate + cfg.malformed_rate,
            p_too_late: cfg.duplicate_rate + cfg.malformed_rate + cfg.too_late_rate,
            pending: VecDeque::new(),
            scratch: Vec::with_capacity(4),
            ring: VecDeque::with_capacity(DUPLICATE_RING),
            tenant_max: vec![None; workload.tenant_count()],
        }
    }

    /// Draws the kind of the next message and sends it; false if nothing was sent (a request
    /// without events: the slot is drawn again).
    async fn send_next(&mut self, now: i64, window: &mut SendWindow<'_, Tag>) -> bool {
        let r: f64 = self.rng.random();
        if r < self.p_dup && !self.ring.is_empty() {
            self.duplicate(window).await;
        } else if (self.p_dup..self.p_malformed).contains(&r) {
            self.malformed(now, window).await;
        } else if let Some((tenant, newest)) = (self.p_malformed..self.p_too_late)
            .contains(&r)
            .then(|| self.workload.pick_tenant(&mut self.rng))
            .and_then(|t| Some((t, self.tenant_max[t]?)))
        {
            self.too_late(tenant, newest, window).await;
        } else {
            return self.event(now, window).await;
        }
        true
    }

    async fn duplicate(&mut self, window: &mut SendWindow<'_, Tag>) {
        let j = if self.rng.random_bool(IMMEDIATE_DUPLICATES) { self.ring.len() - 1 } else { self.rng.random_range(0..self.ring.len()) };
        let (tenant, bytes) = &self.ring[j];
        window.send(self.workload.tenant_name(*tenant), bytes, Tag::Duplicate).await;
    }

    async fn malformed(&mut self, now: i64, window: &mut SendWindow<'_, Tag>) {
        let rng = &mut self.rng;
        let mut what = Malformed::ALL[rng.random_range(0..Malformed::ALL.len())];
        if what == Malformed::NegativeQuantity && self.negative_meters.is_empty() {
            what = Malformed::QuantityNaN;
        }
        let tenant = self.workload.pick_tenant(rng);
        let meter = match what {
            Malformed::UnknownMeter => self.unknown_meter.as_str(),
            Malformed::NegativeQuantity => self.negative_meters[rng.random_range(0..self.negative_meters.len())],
            _ => self.emitted_meters[rng.random_range(0..self.emitted_meters.len())],
        };
        let time = now - rng.random_range(0..=self.jitter_ms);
        let (key, payload) = malformed(what, self.workload, tenant, meter, time, self.source, self.producer, rng);
        window.send(key, &payload, Tag::Rejected { reason: what.reason(), kind: what.kind() }).await;
    }

    async fn too_late(&mut self, tenant: usize, newest: i64, window: &mut SendWindow<'_, Tag>) {
        let time = newest - self.horizon_ms - self.rng.random_range(3_600_000..86_400_000);
        let req = self.workload.request(tenant, &mut self.rng);
        let id = event_id_from(&mut self.rng);
        self.scratch.clear();
        self.workload.gen_events(&req, &id, time, &mut self.scratch);
        let ev = self.scratch.swap_remove(self.rng.random_range(0..self.scratch.len()));
        let payload = self.enc.encode(&ev, self.workload, self.producer);
        let tag = Tag::Rejected { reason: RejectReason::TooLate, kind: "too_late" };
        window.send(self.workload.tenant_name(tenant), &payload, tag).await;
    }

    /// The next event of the current request (a new request when it is done); false if the
    /// request has none.
    async fn event(&mut self, now: i64, window: &mut SendWindow<'_, Tag>) -> bool {
        if self.pending.is_empty() {
            let rng = &mut self.rng;
            let tenant = self.workload.pick_tenant(rng);
            let req = self.workload.request(tenant, rng);
            let late = self.late_rate > 0.0 && rng.random_bool(self.late_rate);
            let (late_lo, late_hi) = self.late_bounds;
            let time = if late { now - rng.random_range(late_lo..=late_hi) } else { now - rng.random_range(0..=self.jitter_ms) };
            let id = event_id_from(rng);
            self.scratch.clear();
            self.workload.gen_events(&req, &id, time, &mut self.scratch);
            self.pending.extend(self.scratch.drain(..).map(|ev| (ev, late)));
        }
        let Some((ev, late)) = self.pending.pop_front() else {
            return false;
        };
        let tenant = ev.tenant;
        let payload = self.enc.encode(&ev, self.workload, self.producer);
        let newest = self.tenant_max[tenant].get_or_insert(ev.event_time_ms);
        *newest = (*newest).max(ev.event_time_ms);
        window.send(self.workload.tenant_name(tenant), &payload, Tag::Accepted { event: ev, late }).await;
        if self.ring.len() == DUPLICATE_RING {
            self.ring.pop_front();
        }
        self.ring.push_back((tenant, payload));
        true
    }
}

fn workload_meter(name: &str) -> bool {
    use crate::workload::{GPU_SECONDS, INPUT_TOKENS, OUTPUT_TOKENS, REQUESTS};
    [INPUT_TOKENS, OUTPUT_TOKENS, REQUESTS, GPU_SECONDS].contains(&name)
}

/// Encodes generated events, reusing its buffers across calls.
#[derive(Debug, Default)]
struct Encoder {
    quantity: String,
    cost: String,
}

impl Encoder {
    fn encode(&mut self, ev: &GenEvent, workload: &Workload, producer: &EventProducer) -> Vec<u8> {
        use std::fmt::Write as _;
        self.quantity.clear();
        let _ = write!(self.quantity, "{}", ev.quantity);
        self.cost.clear();
        if let Some(c) = ev.provider_cost {
            let _ = write!(self.cost, "{c}");
        }
        let r = UsageEventRef {
            event_id: &ev.event_id,
            tenant: workload.tenant_name(ev.tenant),
            meter: ev.meter,
            quantity: &self.quantity,
            event_time_ms: ev.event_time_ms,
            dimensions: ev.dimensions().collect(),
            provider_cost: ev.provider_cost.is_some().then_some(self.cost.as_str()),
            source: workload.source(),
        };
        let mut out = Vec::with_capacity(192);
        producer.codec().encode_ref(&r, WriterVersion::V2, producer.framing(), &mut out);
        out
    }
}

/// Folds delivery reports into the ground truth and the metrics.
struct Apply<'m> {
    metrics: &'m ProducerMetrics,
    workload: &'m Workload,
    errors_logged: u32,
}

impl Apply<'_> {
    fn apply(&mut self, sent: Sent<Tag>, truth: &mut TruthBuilder) {
        if let Some(latency) = sent.latency {
            self.metrics.latency(latency.as_secs_f64());
        }
        let at = match sent.result {
            Ok(at) => at,
            Err(e) => {
                truth.send_error();
                self.metrics.send_error();
                if self.errors_logged < 10 {
                    self.errors_logged += 1;
                    tracing::warn!(error = %e, "message not acknowledged (not counted in the ground truth)");
                }
                return;
            }
        };
        match sent.tag {
            Tag::Accepted { event, late } => {
                let mut dims = [("", ""); 4];
                let mut n = 0;
                for d in event.dimensions() {
                    dims[n] = d;
                    n += 1;
                }
                let view = EventView {
                    tenant: self.workload.tenant_name(event.tenant),
                    meter: event.meter,
                    event_id: &event.event_id,
                    quantity: event.quantity,
                    provider_cost: event.provider_cost,
                    event_time_ms: event.event_time_ms,
                    dimensions: &dims[..n],
                };
                truth.accepted(&view, late);
                self.metrics.sent(if late { SentKind::Late } else { SentKind::Valid });
            }
            Tag::Duplicate => {
                truth.duplicate();
                self.metrics.sent(SentKind::Duplicate);
            }
            Tag::Rejected { reason, kind } => {
                truth.rejected(at, reason, kind);
                self.metrics.sent(if reason == RejectReason::TooLate { SentKind::TooLate } else { SentKind::Malformed });
            }
        }
    }
}
