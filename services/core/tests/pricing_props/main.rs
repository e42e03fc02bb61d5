//! Pricing, rating and wallet tests: hand-computed examples for every price model, the demo
//! catalog, and properties (256 cases each) for the invariants the bill depends on.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions: a failed unwrap is a failed run

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use meterflow_core::meter::MeterCatalog;
use meterflow_core::pricing::{self, parse_rfc3339_ms, Catalog};
use meterflow_core::rating::{
    AdjustmentOutcome, ParkReason, RateOutcome, RatingConfig, RatingState, WalletConfig, Wallets, ALERT_EXHAUSTED, ALERT_LOW_BALANCE,
    KIND_TRUE_UP, KIND_USAGE,
};
use meterflow_core::records::{Charge, MeterAggregate, WalletAdjustment};
use meterflow_core::Error;
use proptest::prelude::*;
use rust_decimal::Decimal;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// A state through the bytes a checkpoint holds (postcard, as `rating::partition` writes it).
fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(x: &T) -> T {
    postcard::from_bytes(&bytes(x)).unwrap()
}

fn bytes<T: serde::Serialize>(x: &T) -> Vec<u8> {
    postcard::to_allocvec(x).unwrap()
}

fn ts(s: &str) -> i64 {
    parse_rfc3339_ms(s).unwrap()
}

const MINUTE: i64 = 60_000;

fn nov() -> i64 {
    ts("2026-11-01T00:00:00Z")
}

/// A revision of one window's aggregate.
#[allow(clippy::too_many_arguments)]
fn agg(
    tenant: &str,
    meter: &str,
    dims: &[(&str, &str)],
    window_start: i64,
    revision: i32,
    value: Decimal,
    previous_value: Decimal,
    source_partition: i32,
    seq: i64,
) -> MeterAggregate {
    MeterAggregate {
        tenant: tenant.into(),
        meter: meter.into(),
        aggregation: "sum".into(),
        dimensions: dims.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        window_start,
        window_end: window_start + MINUTE,
        revision,
        value,
        previous_value,
        event_count: 1,
        provider_cost: Decimal::ZERO,
        previous_provider_cost: Decimal::ZERO,
        source_partition,
        seq,
        emitted_at: window_start + MINUTE,
        uncosted_value: None,
        previous_uncosted_value: None,
    }
}

fn charged(o: RateOutcome) -> Vec<Charge> {
    match o {
        RateOutcome::Charged(c) => c,
        other => panic!("expected Charged, got {other:?}"),
    }
}

fn sum(charges: &[Charge], kind: &str) -> Decimal {
    charges.iter().filter(|c| c.kind == kind).map(|c| c.amount).sum()
}

/// One plan "p" (default plan) with one price of meter "m".
fn single_price_catalog(price_body: &str, minimum: &str) -> Catalog {
    let text = format!(
        "default_plan = \"p\"\n[[plan]]\nid = \"p\"\ncurrency = \"USD\"\nminimum_commitment = \"{minimum}\"\n[[plan.price]]\nmeter = \"m\"\n{price_body}\n"
    );
    Catalog::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn price_of(c: &Catalog, q: &str) -> Decimal {
    c.plan("p").unwrap().price("m").unwrap().price(d(q)).unwrap()
}

mod examples;
mod props;
mod wallets;
