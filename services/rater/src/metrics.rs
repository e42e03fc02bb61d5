//! Every metric the rater exports. Money is exact in the state and converted to floating
//! point only here. Labels: currency, meter and plan come from the catalog (bounded); the
//! per-tenant wallet gauge is bounded by the number of prepaid tenants and can be disabled.

use meterflow_runtime::telemetry::RuntimeMetrics;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};

pub const AGGREGATES_IN: &str = "meterflow_rater_aggregates_in_total";
pub const SKIPPED: &str = "meterflow_rater_aggregates_skipped_total";
pub const REJECTED: &str = "meterflow_rater_aggregates_rejected_total";
pub const PARKED: &str = "meterflow_rater_aggregates_parked_total";
pub const PARKED_NOW: &str = "meterflow_rater_parked_aggregates";
pub const RERATES: &str = "meterflow_rater_rerates_total";
pub const SEQ_GAPS: &str = "meterflow_rater_seq_gaps_total";
pub const CHARGES: &str = "meterflow_rater_charges_total";
pub const REVENUE: &str = "meterflow_rater_revenue";
pub const COST: &str = "meterflow_rater_provider_cost";
pub const MARGIN: &str = "meterflow_rater_margin";
pub const WALLET_BALANCE: &str = "meterflow_rater_wallet_balance";
pub const WALLET_ADJUSTMENTS: &str = "meterflow_rater_wallet_adjustments_total";
pub const ALERTS: &str = "meterflow_rater_wallet_alerts_total";
pub const RATING_LAG: &str = "meterflow_rater_rating_lag_seconds";
pub const PROVISIONAL_IN: &str = "meterflow_rater_provisional_totals_total";
pub const PROVISIONAL_LAG: &str = "meterflow_rater_provisional_lag_seconds";
pub const PENDING_WINDOWS: &str = "meterflow_rater_pending_windows";
pub const BALANCES: &str = "meterflow_rater_balances_total";

/// What the runtime's loop and writers report for the rater.
pub const RUNTIME: RuntimeMetrics = RuntimeMetrics {
    insert_seconds: "meterflow_rater_clickhouse_insert_seconds",
    checkpoint_seconds: "meterflow_rater_checkpoint_seconds",
    flush_errors: "meterflow_rater_flush_errors_total",
    fenced: "meterflow_rater_partitions_fenced_total",
    checkpoints: "meterflow_rater_checkpoints_total",
    checkpoint_bytes: "meterflow_rater_checkpoint_bytes_total",
};

pub fn describe() {
    describe_counter!(AGGREGATES_IN, "Aggregates read.");
    describe_counter!(SKIPPED, "Aggregates skipped as re-deliveries (seq already rated).");
    describe_counter!(REJECTED, "Aggregates refused and dead-lettered, by reason (unauthenticated, bad_seq, future_window, undecodable, unrateable).");
    describe_counter!(PARKED, "Aggregates parked because they cannot be priced now, by reason (unpriced, overflow); `meterflow-admin rerate` re-rates them.");
    describe_gauge!(PARKED_NOW, "Aggregates parked now in the partitions this instance owns.");
    describe_counter!(RERATES, "Rerate requests by outcome (charged, not_parked, still_parked, rejected).");
    describe_counter!(SEQ_GAPS, "Aggregates whose seq skipped past high water + 1 for their source partition (loss upstream, or aggregates spread over partitions).");
    describe_counter!(CHARGES, "Charges produced, by kind.");
    describe_gauge!(REVENUE, "Cumulative revenue rated by the partitions this instance owns, by currency, meter and plan (sum across instances).");
    describe_gauge!(COST, "Cumulative provider cost, by currency, meter and plan.");
    describe_gauge!(MARGIN, "Cumulative margin (revenue - provider cost), by currency, meter and plan.");
    describe_gauge!(WALLET_BALANCE, "Prepaid balance by tenant and currency.");
    describe_counter!(WALLET_ADJUSTMENTS, "Wallet adjustments by outcome (applied, duplicate).");
    describe_counter!(ALERTS, "Wallet alerts by kind.");
    describe_gauge!(RATING_LAG, Unit::Seconds, "Wall clock minus the time the last rated aggregate was produced.");
    RUNTIME.describe();
    describe_counter!(PROVISIONAL_IN, "Provisional totals read, by outcome (accepted, unauthenticated, undecodable).");
    describe_histogram!(PROVISIONAL_LAG, Unit::Seconds, "Wall clock minus the aggregator's publication time of a provisional total.");
    describe_gauge!(PENDING_WINDOWS, "Open windows counted as pending spend (all tenants seen).");
    describe_counter!(BALANCES, "Balance and spend-limit alert records by outcome (published, failed, dropped).");
    for outcome in ["accepted", "unauthenticated", "undecodable"] {
        counter!(PROVISIONAL_IN, "outcome" => outcome).increment(0);
    }
    gauge!(PENDING_WINDOWS).set(0.0);
    for c in [AGGREGATES_IN, SKIPPED, REJECTED] {
        counter!(c).increment(0);
    }
    for k in meterflow_core::records::ChargeKind::ALL {
        counter!(CHARGES, "kind" => k.as_str()).increment(0);
    }
    for r in meterflow_core::rating::ParkReason::ALL {
        counter!(PARKED, "reason" => r.as_str()).increment(0);
    }
    counter!(SEQ_GAPS).increment(0);
    gauge!(PARKED_NOW).set(0.0);
    gauge!(RATING_LAG).set(0.0);
}
