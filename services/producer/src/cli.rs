//! The command line: `generate` (a workload plus its ground truth) and `send` (one event).
//!
//! Every flag has a `METERFLOW_...` environment variable so that compose files, CI scripts and
//! tests configure the producer the same way as the other services.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use meterflow_core::codec::{Framing, UsageEventCodec};
use meterflow_core::meter::MeterCatalog;
use meterflow_core::UsageEvent;
use meterflow_runtime::args::{KafkaArgs, LogArgs, TopicArgs};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

use crate::generate::{generate, EventTimeMode, GenerateConfig};
use crate::producer::EventProducer;
use crate::progress::Progress;
use crate::time::{format_rfc3339_ms, parse_duration, parse_time_ms};
use crate::truth::GroundTruth;

/// Sends usage events to meterflow's Kafka topic.
#[derive(Debug, Parser)]
#[command(
    name = "meterflow-producer",
    version,
    about = "Sends usage events to meterflow's Kafka topic: a realistic AI workload with its exact ground truth, or one event by hand.",
    long_about = None,
    after_help = "Examples:\n  \
        meterflow-producer generate --events 1000000 --ground-truth truth.json\n  \
        meterflow-producer generate --duration 60s --rate 5000 --too-late-rate 0.001\n  \
        meterflow-producer generate --events 100000 --event-time-start 2025-01-01T00:00:00Z --event-time-span 1h --seed 7\n  \
        meterflow-producer send --tenant acme --meter input_tokens --quantity 1200 --dimension model=gpt-4o --dimension region=eu-west"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a realistic AI-platform workload (Zipf-skewed tenants, five models, token,
    /// request and GPU meters) with injected duplicates, late, malformed and too-late
    /// messages, and write the exact totals the pipeline must produce (--ground-truth).
    Generate(Box<GenerateArgs>),
    /// Send one event built from flags and print where it landed.
    Send(Box<SendArgs>),
}

/// Connection, topics, logging and wire format, shared by the subcommands.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    #[command(flatten, next_help_heading = "Kafka")]
    pub kafka: KafkaArgs,
    #[command(flatten, next_help_heading = "Topics")]
    pub topics: TopicArgs,
    #[command(flatten, next_help_heading = "Logging")]
    pub log: LogArgs,
    /// Payload framing: Avro single-object encoding (C3 01 + schema fingerprint), or
    /// Confluent's (00 + schema id) for a schema-registry world.
    #[arg(long, env = "METERFLOW_PRODUCER_FRAMING", value_enum, default_value_t = FramingArg::SingleObject, help_heading = "Wire format")]
    pub framing: FramingArg,
    /// Confluent schema id of usage_event v2 (with --framing confluent; v1 is assumed to be one less).
    #[arg(long, env = "METERFLOW_PRODUCER_SCHEMA_ID", default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..), help_heading = "Wire format")]
    pub schema_id: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FramingArg {
    SingleObject,
    Confluent,
}

impl CommonArgs {
    fn producer(&self) -> anyhow::Result<EventProducer> {
        let producer = EventProducer::new(&self.kafka, self.topics.usage_topic.clone())?;
        Ok(match self.framing {
            FramingArg::SingleObject => producer,
            FramingArg::Confluent => producer
                .with_codec(UsageEventCodec::new().with_confluent_ids(self.schema_id - 1, self.schema_id))
                .with_framing(Framing::Confluent { schema_id: self.schema_id }),
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Messages to send in total, injected ones included [default: 100000 unless --duration is given].
    #[arg(long, env = "METERFLOW_PRODUCER_EVENTS", help_heading = "Run")]
    pub events: Option<u64>,
    /// Run for this long (e.g. 60s, 10m); with --events too, whichever comes first.
    #[arg(long, env = "METERFLOW_PRODUCER_DURATION", value_parser = parse_duration, help_heading = "Run")]
    pub duration: Option<Duration>,
    /// Messages per second; 0 = as fast as the broker takes them.
    #[arg(long, env = "METERFLOW_PRODUCER_RATE", default_value_t = 0.0, help_heading = "Run")]
    pub rate: f64,
    /// Seed of all random choices: the same seed and flags give the same payloads (with
    /// simulated event time and --events) [default: random, recorded in the ground truth].
    #[arg(long, env = "METERFLOW_PRODUCER_SEED", help_heading = "Run")]
    pub seed: Option<u64>,

    /// Number of tenants, named tenant-000, tenant-001, ...
    #[arg(long, env = "METERFLOW_PRODUCER_TENANTS", default_value_t = 50, help_heading = "Workload")]
    pub tenants: usize,
    /// Zipf exponent of tenant activity (0 = uniform; larger = more skewed).
    #[arg(long, env = "METERFLOW_PRODUCER_ZIPF_EXPONENT", default_value_t = 1.1, help_heading = "Workload")]
    pub zipf_exponent: f64,
    /// The events' `source` field.
    #[arg(long, env = "METERFLOW_PRODUCER_SOURCE", default_value = "meterflow-producer", help_heading = "Workload")]
    pub source: String,
    /// Meter definitions (windows, group_by, lateness) the ground truth is computed with.
    #[arg(long, env = "METERFLOW_METERS", default_value = "config/meters.toml", help_heading = "Workload")]
    pub meters: PathBuf,

    /// Fraction of messages that re-send the exact bytes of an earlier event (some at once,
    /// some up to ~4000 messages later).
    #[arg(long, env = "METERFLOW_PRODUCER_DUPLICATE_RATE", default_value_t = 0.10, help_heading = "Injected faults")]
    pub duplicate_rate: f64,
    /// Fraction of requests whose events are moved back (by more than the window + allowed
    /// lateness, at most --max-lateness) into an already-closed window, forcing a restatement.
    #[arg(long, env = "METERFLOW_PRODUCER_LATE_RATE", default_value_t = 0.05, help_heading = "Injected faults")]
    pub late_rate: f64,
    /// How far back late events go at most.
    #[arg(long, env = "METERFLOW_PRODUCER_MAX_LATENESS", default_value = "10m", value_parser = parse_duration, help_heading = "Injected faults")]
    pub max_lateness: Duration,
    /// Fraction of malformed messages: garbage bytes, JSON, truncated Avro, unknown meter,
    /// empty tenant or event id, quantity NaN / 1e5 / -3, bad provider cost.
    #[arg(long, env = "METERFLOW_PRODUCER_MALFORMED_RATE", default_value_t = 0.01, help_heading = "Injected faults")]
    pub malformed_rate: f64,
    /// Fraction of valid-looking messages older than the dedup horizon (expected reason too_late).
    #[arg(long, env = "METERFLOW_PRODUCER_TOO_LATE_RATE", default_value_t = 0.0, help_heading = "Injected faults")]
    pub too_late_rate: f64,
    /// The aggregator's dedup horizon (too-late messages are placed beyond it).
    #[arg(long, env = "METERFLOW_PRODUCER_DEDUP_HORIZON", default_value = "35d", value_parser = parse_duration, help_heading = "Injected faults")]
    pub dedup_horizon: Duration,

    /// Simulated event time: the first event's time (RFC 3339 or Unix ms). Without it, event
    /// time is the wall clock.
    #[arg(long, env = "METERFLOW_PRODUCER_EVENT_TIME_START", value_parser = parse_time_ms, help_heading = "Event time")]
    pub event_time_start: Option<i64>,
    /// Simulated event time: the events' times are spread evenly over this span (+ jitter),
    /// however long the run takes.
    #[arg(long, env = "METERFLOW_PRODUCER_EVENT_TIME_SPAN", default_value = "1h", value_parser = parse_duration, help_heading = "Event time")]
    pub event_time_span: Duration,

    /// Write the ground truth (expected totals, counters, malformed positions) as JSON here.
    #[arg(long, env = "METERFLOW_PRODUCER_GROUND_TRUTH", help_heading = "Output")]
    pub ground_truth: Option<PathBuf>,
    /// Serve /healthz and /metrics here (port 0 picks a free port).
    #[arg(long, env = "METERFLOW_PRODUCER_METRICS_ADDR", default_value = "127.0.0.1:9103", help_heading = "Output")]
    pub metrics_addr: SocketAddr,

    /// Messages in flight at most (bounds memory; larger lets librdkafka batch more).
    #[arg(long, env = "METERFLOW_PRODUCER_MAX_IN_FLIGHT", default_value_t = 100_000, help_heading = "Tuning")]
    pub max_in_flight: usize,
    /// Create the usage topic with this many partitions first, if it does not exist.
    #[arg(long, env = "METERFLOW_PRODUCER_CREATE_TOPIC_PARTITIONS", help_heading = "Tuning")]
    pub create_topic_partitions: Option<i32>,
}

#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Tenant (also the message key, so a tenant's events stay in order on one partition).
    #[arg(long, env = "METERFLOW_PRODUCER_TENANT", help_heading = "Event")]
    pub tenant: String,
    /// Meter name, e.g. input_tokens (see config/meters.toml).
    #[arg(long, env = "METERFLOW_PRODUCER_METER", help_heading = "Event")]
    pub meter: String,
    /// Canonical decimal, e.g. 1200 or 0.5.
    #[arg(long, env = "METERFLOW_PRODUCER_QUANTITY", value_parser = parse_decimal, help_heading = "Event")]
    pub quantity: Decimal,
    /// Idempotency key [default: a random UUID]. Re-use it to send a duplicate on purpose.
    #[arg(long, env = "METERFLOW_PRODUCER_EVENT_ID", help_heading = "Event")]
    pub event_id: Option<String>,
    /// RFC 3339 or Unix ms [default: now].
    #[arg(long, env = "METERFLOW_PRODUCER_EVENT_TIME", value_parser = parse_time_ms, help_heading = "Event")]
    pub event_time: Option<i64>,
    /// A dimension as key=value; repeat for several.
    #[arg(long = "dimension", short = 'd', env = "METERFLOW_PRODUCER_DIMENSIONS", value_delimiter = ',', value_parser = parse_key_value, help_heading = "Event")]
    pub dimensions: Vec<(String, String)>,
    /// What the upstream provider charged for this usage (canonical decimal).
    #[arg(long, env = "METERFLOW_PRODUCER_PROVIDER_COST", value_parser = parse_decimal, help_heading = "Event")]
    pub provider_cost: Option<Decimal>,
    /// The event's `source` field (who emitted it).
    #[arg(long, env = "METERFLOW_PRODUCER_SOURCE", default_value = "meterflow-producer", help_heading = "Event")]
    pub source: String,
}

fn parse_decimal(s: &str) -> Result<Decimal, String> {
    meterflow_core::decimal::parse("value", s).map_err(|e| e.to_string())
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// Runs a parsed command line until done or `shutdown`.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => run_generate(*args, shutdown).await,
        Command::Send(args) => run_send(*args).await,
    }
}

async fn run_generate(args: GenerateArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    meterflow_runtime::telemetry::init_logging(&args.common.log);
    let text = std::fs::read_to_string(&args.meters).with_context(|| format!("reading meters file {}", args.meters.display()))?;
    let meters = MeterCatalog::from_toml_str(&text).with_context(|| format!("in {}", args.meters.display()))?;

    // Metrics first: handles registered before the recorder exists would be no-ops.
    let http_stop = shutdown.child_token();
    let health = meterflow_runtime::http::Health::default();
    let (bound, http) = meterflow_runtime::http::serve(args.metrics_addr, health.clone(), http_stop.clone())
        .await
        .with_context(|| format!("serving metrics on {}", args.metrics_addr))?;
    tracing::info!("serving /healthz and /metrics on http://{bound}");
    let upkeep = tokio::spawn(upkeep(http_stop.clone()));

    if let Some(partitions) = args.create_topic_partitions {
        create_topic(&args.common.kafka, &args.common.topics.usage_topic, partitions).await?;
    }
    let producer = args.common.producer()?;
    health.set_ready(true);

    let mut cfg = GenerateConfig::new(meters);
    cfg.events = match (args.events, args.duration) {
        (None, None) => Some(100_000),
        (events, _) => events,
    };
    cfg.duration = args.duration;
    cfg.rate = args.rate;
    cfg.seed = args.seed.unwrap_or_else(rand::random);
    cfg.tenants = args.tenants;
    cfg.zipf_exponent = args.zipf_exponent;
    cfg.duplicate_rate = args.duplicate_rate;
    cfg.late_rate = args.late_rate;
    cfg.max_lateness = args.max_lateness;
    cfg.malformed_rate = args.malformed_rate;
    cfg.too_late_rate = args.too_late_rate;
    cfg.dedup_horizon = args.dedup_horizon;
    cfg.event_time = match args.event_time_start {
        None => EventTimeMode::RealTime,
        Some(start_ms) => EventTimeMode::Simulated {
            start_ms,
            span_ms: crate::time::duration_ms(args.event_time_span),
        },
    };
    cfg.source = args.source.clone();
    cfg.max_in_flight = args.max_in_flight;
    cfg.shutdown = shutdown.clone();
    tracing::info!(
        topic = %args.common.topics.usage_topic,
        seed = cfg.seed,
        "generating {}",
        match (cfg.events, cfg.duration) {
            (Some(n), Some(d)) => format!("{n} messages or {} s, whichever comes first", d.as_secs()),
            (Some(n), None) => format!("{n} messages"),
            (None, Some(d)) => format!("for {} s", d.as_secs_f64()),
            (None, None) => unreachable!("validated"),
        }
    );

    let result = generate(cfg, &producer, Progress::auto()).await;
    http_stop.cancel();
    let _ = upkeep.await;
    let _ = http.await;
    let gt = result?;
    if let Some(path) = &args.ground_truth {
        gt.save(path)?;
    }
    print!("{}", summary(&gt));
    if let Some(path) = &args.ground_truth {
        println!("ground truth: {} windows, {} malformed positions -> {}", gt.windows.len(), gt.malformed.len(), path.display());
    }
    anyhow::ensure!(
        gt.counters.send_errors == 0,
        "{} messages were not acknowledged; the ground truth counts only acknowledged ones",
        gt.counters.send_errors
    );
    Ok(())
}

/// Drains the Prometheus histograms regularly: without a scrape, their samples would
/// otherwise accumulate for the whole run.
async fn upkeep(stop: CancellationToken) {
    let handle = meterflow_runtime::http::prometheus();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = stop.cancelled() => return,
        }
    }
}

/// Creates `topic` unless it exists. Replication 1: the local broker is a single node.
pub async fn create_topic(kafka: &KafkaArgs, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = meterflow_runtime::kafka::base_config(kafka)?.create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&new], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
        .await?;
    for r in results {
        match r {
            Ok(t) => tracing::info!("created topic {t} with {partitions} partitions"),
            Err((t, RDKafkaErrorCode::TopicAlreadyExists)) => tracing::info!("topic {t} exists"),
            Err((t, code)) => anyhow::bail!("creating topic {t}: {code}"),
        }
    }
    Ok(())
}

async fn run_send(args: SendArgs) -> anyhow::Result<()> {
    meterflow_runtime::telemetry::init_logging(&args.common.log);
    let producer = args.common.producer()?;
    let mut ev = UsageEvent::new(
        args.event_id.unwrap_or_else(crate::event::random_event_id),
        args.tenant,
        args.meter,
        args.quantity,
        args.event_time.unwrap_or_else(crate::time::now_ms),
    )
    .with_source(args.source);
    for (k, v) in args.dimensions {
        ev = ev.with_dimension(k, v);
    }
    if let Some(c) = args.provider_cost {
        ev = ev.with_provider_cost(c);
    }
    let at = producer.send(&ev).await.context("sending the event")?;
    println!(
        "sent event {} (tenant {}, meter {}, quantity {}, time {}) to {} partition {} offset {}",
        ev.event_id,
        ev.tenant,
        ev.meter,
        ev.quantity,
        format_rfc3339_ms(ev.event_time_ms),
        producer.topic(),
        at.partition,
        at.offset
    );
    Ok(())
}

/// The end-of-run report: messages by kind, rate achieved, elapsed time.
pub fn summary(gt: &GroundTruth) -> String {
    use std::fmt::Write as _;
    let c = &gt.counters;
    let secs = (gt.run.elapsed_ms as f64 / 1000.0).max(1e-3);
    let too_late = c.malformed_by_reason.get("too_late").copied().unwrap_or(0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "sent {} messages to {} in {:.2} s: {:.0} messages/s{}",
        c.sent,
        gt.run.topic,
        secs,
        c.sent as f64 / secs,
        if gt.run.interrupted { " (interrupted)" } else { "" }
    );
    let _ = writeln!(s, "  valid       {:>10}  (distinct events counted; {} of them late)", c.unique_accepted, c.late);
    let _ = writeln!(s, "  duplicates  {:>10}", c.duplicates);
    let _ = writeln!(s, "  malformed   {:>10}", c.malformed - too_late);
    for (reason, n) in c.malformed_by_reason.iter().filter(|(r, _)| r.as_str() != "too_late") {
        let _ = writeln!(s, "    {reason:<18} {n:>8}");
    }
    let _ = writeln!(s, "  too late    {too_late:>10}");
    let _ = writeln!(s, "  send errors {:>10}", c.send_errors);
    if let (Some(lo), Some(hi)) = (gt.run.min_event_time_ms, gt.run.max_event_time_ms) {
        let _ = writeln!(s, "  event times {} .. {}", format_rfc3339_ms(lo), format_rfc3339_ms(hi));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_generate_flags() {
        let cli = Cli::try_parse_from([
            "meterflow-producer",
            "generate",
            "--events",
            "1000",
            "--duplicate-rate",
            "0.2",
            "--event-time-start",
            "2025-01-01T00:00:00Z",
            "--event-time-span",
            "2h",
            "--framing",
            "confluent",
            "--kafka-brokers",
            "127.0.0.1:1",
        ])
        .unwrap();
        let Command::Generate(g) = cli.command else { panic!("generate expected") };
        assert_eq!(g.events, Some(1000));
        assert_eq!(g.duplicate_rate, 0.2);
        assert_eq!(g.event_time_start, Some(1_735_689_600_000));
        assert_eq!(g.event_time_span, Duration::from_secs(7200));
        assert_eq!(g.common.framing, FramingArg::Confluent);
        assert_eq!(g.max_lateness, Duration::from_secs(600));
        assert_eq!(g.common.kafka.brokers, "127.0.0.1:1");
    }

    #[test]
    fn parses_send_flags() {
        let cli = Cli::try_parse_from([
            "meterflow-producer",
            "send",
            "--tenant",
            "acme",
            "--meter",
            "input_tokens",
            "--quantity",
            "12.5",
            "-d",
            "model=gpt-4o",
            "-d",
            "region=eu-west",
        ])
        .unwrap();
        let Command::Send(s) = cli.command else { panic!("send expected") };
        assert_eq!(s.quantity, Decimal::new(125, 1));
        assert_eq!(s.dimensions.len(), 2);
        assert!(Cli::try_parse_from(["meterflow-producer", "send", "--tenant", "a", "--meter", "m", "--quantity", "1e5"]).is_err());
    }
}
