//! A realistic AI-platform workload: tenants of very unequal size calling a handful of models.
//!
//! The shapes are what makes a metering pipeline interesting to test: Zipf-skewed tenants
//! (a few produce most events, so some partitions are hot), heavy-tailed token counts
//! (log-normal: most prompts are short, a few are huge), a self-hosted model billed by GPU
//! time, and exact provider costs. Prices are list prices per million tokens; they matter only
//! in that they make `provider_cost` realistic and exercise decimal scales up to 8 digits.

use std::str::FromStr;

use anyhow::Context as _;
use meterflow_core::meter::MeterCatalog;
use meterflow_core::UsageEvent;
use rand::distr::weighted::WeightedIndex;
use rand::Rng;
use rand_distr::{Distribution, LogNormal, Zipf};
use rust_decimal::Decimal;

/// Meter names the workload emits (those missing from the meters file are skipped).
pub const INPUT_TOKENS: &str = "input_tokens";
pub const OUTPUT_TOKENS: &str = "output_tokens";
pub const REQUESTS: &str = "requests";
pub const GPU_SECONDS: &str = "gpu_seconds";

pub const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// A log-normal token count: `median` and `sigma` of the underlying normal, clamped to `max`.
#[derive(Debug, Clone, Copy)]
struct Tokens {
    median: f64,
    sigma: f64,
    max: u64,
}

/// A model offered on the platform.
#[derive(Debug, Clone, Copy)]
pub struct Model {
    pub name: &'static str,
    /// Share of requests platform-wide (each tenant skews it, see [`Workload::new`]).
    weight: f64,
    input: Tokens,
    /// None for embedding models, which produce no output tokens.
    output: Option<Tokens>,
    /// Provider list price in USD per million input / output tokens; None for the
    /// self-hosted model, whose cost is its GPU time.
    price_in_per_m: Option<&'static str>,
    price_out_per_m: Option<&'static str>,
    /// Runs on our own GPUs: emits `gpu_seconds` with a `gpu` dimension.
    pub self_hosted: bool,
}

pub const MODELS: [Model; 5] = [
    Model {
        name: "gpt-4o",
        weight: 0.20,
        input: Tokens { median: 1200.0, sigma: 1.0, max: 128_000 },
        output: Some(Tokens { median: 350.0, sigma: 0.8, max: 16_384 }),
        price_in_per_m: Some("2.50"),
        price_out_per_m: Some("10.00"),
        self_hosted: false,
    },
    Model {
        name: "gpt-4o-mini",
        weight: 0.35,
        input: Tokens { median: 800.0, sigma: 1.1, max: 128_000 },
        output: Some(Tokens { median: 250.0, sigma: 0.9, max: 16_384 }),
        price_in_per_m: Some("0.15"),
        price_out_per_m: Some("0.60"),
        self_hosted: false,
    },
    Model {
        name: "claude-sonnet",
        weight: 0.20,
        input: Tokens { median: 2000.0, sigma: 1.0, max: 200_000 },
        output: Some(Tokens { median: 500.0, sigma: 0.8, max: 8_192 }),
        price_in_per_m: Some("3.00"),
        price_out_per_m: Some("15.00"),
        self_hosted: false,
    },
    Model {
        name: "llama-70b",
        weight: 0.15,
        input: Tokens { median: 900.0, sigma: 0.9, max: 32_768 },
        output: Some(Tokens { median: 300.0, sigma: 0.8, max: 4_096 }),
        price_in_per_m: None,
        price_out_per_m: None,
        self_hosted: true,
    },
    Model {
        name: "embed-small",
        weight: 0.10,
        input: Tokens { median: 400.0, sigma: 1.0, max: 8_191 },
        output: None,
        price_in_per_m: Some("0.02"),
        price_out_per_m: None,
        self_hosted: false,
    },
];

/// A GPU type serving the self-hosted model.
#[derive(Debug, Clone, Copy)]
pub struct Gpu {
    pub name: &'static str,
    weight: f64,
    /// Cost in USD per GPU-second (hourly price / 3600, chosen to be exact).
    price_per_second: &'static str,
    /// Effective per-request throughput with batching, tokens per GPU-second.
    prefill_tps: f64,
    decode_tps: f64,
}

pub const GPUS: [Gpu; 3] = [
    Gpu { name: "h100", weight: 0.50, price_per_second: "0.0012", prefill_tps: 20_000.0, decode_tps: 400.0 },
    Gpu { name: "a100", weight: 0.35, price_per_second: "0.0008", prefill_tps: 12_000.0, decode_tps: 250.0 },
    Gpu { name: "l4", weight: 0.15, price_per_second: "0.0002", prefill_tps: 3_000.0, decode_tps: 60.0 },
];

/// Per-tenant traits drawn once from the seed.
#[derive(Debug, Clone)]
struct Tenant {
    name: String,
    home_region: usize,
    models: WeightedIndex<f64>,
}

/// The workload: tenants, models and prices, and which meters exist.
#[derive(Debug, Clone)]
pub struct Workload {
    tenants: Vec<Tenant>,
    zipf: Zipf<f64>,
    gpus: WeightedIndex<f64>,
    input_dist: Vec<LogNormal<f64>>,
    output_dist: Vec<Option<LogNormal<f64>>>,
    price_in: Vec<Option<Decimal>>,
    price_out: Vec<Option<Decimal>>,
    gpu_price: Vec<Decimal>,
    emit: [bool; 4],
    source: String,
}

/// One metered request before it is turned into events.
#[derive(Debug, Clone)]
pub struct Request {
    pub tenant: usize,
    pub model: usize,
    pub region: usize,
    pub gpu: Option<usize>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Milliseconds of GPU time (self-hosted model only).
    pub gpu_millis: u64,
}

impl Workload {
    /// `tenants` tenants named `tenant-000`.. with Zipf(`zipf_exponent`) activity. The meters
    /// file decides which of the workload's meters are emitted.
    pub fn new<R: Rng + ?Sized>(
        catalog: &MeterCatalog,
        tenants: usize,
        zipf_exponent: f64,
        source: &str,
        rng: &mut R,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(tenants >= 1, "at least one tenant is needed");
        let width = tenants.saturating_sub(1).max(1).to_string().len().max(3);
        let tenants: Vec<Tenant> = (0..tenants)
            .map(|i| -> anyhow::Result<Tenant> {
                // Each tenant favours some models: platform weights times a random factor in
                // [0.05, 2), so the per-(tenant, model) windows are unevenly populated.
                let weights: Vec<f64> = MODELS.iter().map(|m| m.weight * rng.random_range(0.05..2.0)).collect();
                Ok(Tenant {
                    name: format!("tenant-{i:0width$}"),
                    home_region: rng.random_range(0..REGIONS.len()),
                    models: WeightedIndex::new(weights).context("model weights")?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let zipf = Zipf::new(tenants.len() as f64, zipf_exponent).context("Zipf exponent must be >= 0")?;
        let per_m = Decimal::from(1_000_000);
        let price = |p: Option<&str>| -> anyhow::Result<Option<Decimal>> {
            p.map(|p| Ok(Decimal::from_str(p).with_context(|| format!("price {p:?}"))? / per_m)).transpose()
        };
        let emit = [INPUT_TOKENS, OUTPUT_TOKENS, REQUESTS, GPU_SECONDS].map(|m| catalog.get(m).is_some());
        anyhow::ensure!(
            emit.iter().any(|&e| e),
            "the meters file defines none of the workload's meters ({INPUT_TOKENS}, {OUTPUT_TOKENS}, {REQUESTS}, {GPU_SECONDS})"
        );
        let lognormal = |t: Tokens| LogNormal::new(t.median.ln(), t.sigma).context("token distribution");
        Ok(Self {
            tenants,
            zipf,
            gpus: WeightedIndex::new(GPUS.iter().map(|g| g.weight)).context("GPU weights")?,
            input_dist: MODELS.iter().map(|m| lognormal(m.input)).collect::<anyhow::Result<_>>()?,
            output_dist: MODELS.iter().map(|m| m.output.map(lognormal).transpose()).collect::<anyhow::Result<_>>()?,
            price_in: MODELS.iter().map(|m| price(m.price_in_per_m)).collect::<anyhow::Result<_>>()?,
            price_out: MODELS.iter().map(|m| price(m.price_out_per_m)).collect::<anyhow::Result<_>>()?,
            gpu_price: GPUS.iter().map(|g| Decimal::from_str(g.price_per_second).context("GPU price")).collect::<anyhow::Result<_>>()?,
            emit,
            source: source.to_owned(),
        })
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    pub fn tenant_name(&self, i: usize) -> &str {
        &self.tenants[i].name
    }

    /// A tenant drawn by activity (tenant-000 is the busiest).
    pub fn pick_tenant<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let k = self.zipf.sample(rng) as usize;
        k.clamp(1, self.tenants.len()) - 1
    }

    /// A random request of `tenant`.
    pub fn request<R: Rng + ?Sized>(&self, tenant: usize, rng: &mut R) -> Request {
        let t = &self.tenants[tenant];
        let model = t.models.sample(rng);
        let spec = &MODELS[model];
        // Most traffic stays in the tenant's home region.
        let region = if rng.random_bool(0.8) { t.home_region } else { rng.random_range(0..REGIONS.len()) };
        let draw = |d: &LogNormal<f64>, max: u64, rng: &mut R| (d.sample(rng).round() as u64).clamp(1, max);
        let input_tokens = draw(&self.input_dist[model], spec.input.max, rng);
        let output_tokens = match (&self.output_dist[model], spec.output) {
            (Some(d), Some(t)) => draw(d, t.max, rng),
            _ => 0,
        };
        let (gpu, gpu_millis) = if spec.self_hosted {
            let g = self.gpus.sample(rng);
            let secs = input_tokens as f64 / GPUS[g].prefill_tps + output_tokens as f64 / GPUS[g].decode_tps;
            // ±20% noise for scheduling and batching effects.
            let secs = secs * rng.random_range(0.8..1.2);
            (Some(g), ((secs * 1000.0).round() as u64).max(1))
        } else {
            (None, 0)
        };
        Request { tenant, model, region, gpu, input_tokens, output_tokens, gpu_millis }
    }

    /// The events a request emits, in the order a gateway would send them. Event ids are
    /// `<request id>.<meter>`: unique per tenant, and traceable back to the request.
    pub fn events(&self, req: &Request, request_id: &str, event_time_ms: i64) -> Vec<UsageEvent> {
        let mut out = Vec::with_capacity(4);
        self.gen_events(req, request_id, event_time_ms, &mut out);
        out.iter().map(|e| e.to_usage_event(self)).collect()
    }

    /// Like [`Workload::events`], in the compact form the generator's hot loop uses (an owned
    /// [`UsageEvent`] costs a dozen allocations, a [`GenEvent`] one).
    pub fn gen_events(&self, req: &Request, request_id: &str, event_time_ms: i64, out: &mut Vec<GenEvent>) {
        let spec = &MODELS[req.model];
        let endpoint = if spec.output.is_some() { "chat" } else { "embeddings" };
        let event = |meter: &'static str, quantity: Decimal, provider_cost: Option<Decimal>| {
            let mut event_id = String::with_capacity(request_id.len() + 1 + meter.len());
            event_id.push_str(request_id);
            event_id.push('.');
            event_id.push_str(meter);
            GenEvent {
                tenant: req.tenant,
                meter,
                event_id,
                quantity,
                provider_cost,
                event_time_ms,
                endpoint,
                model: spec.name,
                region: REGIONS[req.region],
                gpu: req.gpu.map(|g| GPUS[g].name),
            }
        };
        if self.emit[0] {
            let q = Decimal::from(req.input_tokens);
            out.push(event(INPUT_TOKENS, q, self.price_in[req.model].map(|p| (q * p).normalize())));
        }
        if self.emit[1] && spec.output.is_some() {
            let q = Decimal::from(req.output_tokens);
            out.push(event(OUTPUT_TOKENS, q, self.price_out[req.model].map(|p| (q * p).normalize())));
        }
        if self.emit[2] {
            out.push(event(REQUESTS, Decimal::ONE, None));
        }
        if let (true, Some(g)) = (self.emit[3], req.gpu) {
            let secs = Decimal::new(req.gpu_millis as i64, 3).normalize();
            out.push(event(GPU_SECONDS, secs, Some((secs * self.gpu_price[g]).normalize())));
        }
    }

    /// The events' `source` field.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// A generated event in compact form: everything but the id points into static tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenEvent {
    /// Index of the tenant in the [`Workload`].
    pub tenant: usize,
    pub meter: &'static str,
    pub event_id: String,
    pub quantity: Decimal,
    pub provider_cost: Option<Decimal>,
    pub event_time_ms: i64,
    /// `chat` or `embeddings`: in no meter's group_by, so the pipeline must ignore it.
    pub endpoint: &'static str,
    pub model: &'static str,
    pub region: &'static str,
    /// Self-hosted model only.
    pub gpu: Option<&'static str>,
}

impl GenEvent {
    /// The dimensions sorted by key (the order the codec writes them in).
    pub fn dimensions(&self) -> impl Iterator<Item = (&'static str, &'static str)> {
        [
            Some(("endpoint", self.endpoint)),
            self.gpu.map(|g| ("gpu", g)),
            Some(("model", self.model)),
            Some(("region", self.region)),
        ]
        .into_iter()
        .flatten()
    }

    /// The value of one dimension.
    pub fn dimension(&self, key: &str) -> Option<&'static str> {
        self.dimensions().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn to_usage_event(&self, workload: &Workload) -> UsageEvent {
        let mut ev = UsageEvent::new(
            self.event_id.as_str(),
            workload.tenant_name(self.tenant),
            self.meter,
            self.quantity,
            self.event_time_ms,
        )
        .with_source(workload.source());
        for (k, v) in self.dimensions() {
            ev = ev.with_dimension(k, v);
        }
        if let Some(c) = self.provider_cost {
            ev = ev.with_provider_cost(c);
        }
        ev
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn catalog() -> MeterCatalog {
        MeterCatalog::from_toml_str(include_str!("../../../config/meters.toml")).unwrap()
    }

    #[test]
    fn requests_emit_the_right_events() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let w = Workload::new(&catalog(), 50, 1.1, "test", &mut rng).unwrap();
        assert_eq!(w.tenant_name(0), "tenant-000");
        assert_eq!(w.tenant_name(49), "tenant-049");
        let mut seen_gpu = false;
        let mut seen_embed = false;
        for _ in 0..2000 {
            let t = w.pick_tenant(&mut rng);
            assert!(t < 50);
            let req = w.request(t, &mut rng);
            let evs = w.events(&req, "r1", 1000);
            let meters: Vec<&str> = evs.iter().map(|e| e.meter.as_str()).collect();
            let spec = &MODELS[req.model];
            match (spec.self_hosted, spec.output.is_some()) {
                (true, _) => {
                    seen_gpu = true;
                    assert_eq!(meters, [INPUT_TOKENS, OUTPUT_TOKENS, REQUESTS, GPU_SECONDS]);
                    assert!(evs[0].provider_cost.is_none());
                    assert!(evs[3].provider_cost.unwrap() > Decimal::ZERO);
                    assert!(evs[3].dimensions.contains_key("gpu"));
                }
                (false, false) => {
                    seen_embed = true;
                    assert_eq!(meters, [INPUT_TOKENS, REQUESTS]);
                }
                (false, true) => assert_eq!(meters, [INPUT_TOKENS, OUTPUT_TOKENS, REQUESTS]),
            }
            for ev in &evs {
                assert!(ev.quantity > Decimal::ZERO);
                if let Some(c) = ev.provider_cost {
                    assert!(c.scale() <= 9, "{c}");
                    // Must survive the canonical-decimal parser the pipeline uses.
                    meterflow_core::decimal::parse("provider_cost", &c.to_string()).unwrap();
                }
                meterflow_core::decimal::parse("quantity", &ev.quantity.to_string()).unwrap();
            }
        }
        assert!(seen_gpu && seen_embed);
    }

    #[test]
    fn zipf_skews_activity() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let w = Workload::new(&catalog(), 50, 1.1, "test", &mut rng).unwrap();
        let mut counts = [0u32; 50];
        for _ in 0..20_000 {
            counts[w.pick_tenant(&mut rng)] += 1;
        }
        assert!(counts[0] > 10 * counts[49].max(1), "{counts:?}");
    }
}
