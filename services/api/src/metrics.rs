//! The API's metrics. Labels are bounded: route (a fixed set), status class, reject reason
//! (the fixed set of reasons), result.

/// Requests by `route` and `status` (the HTTP status code).
pub const REQUESTS: &str = "meterflow_api_requests_total";
/// Request latency by `route`, seconds.
pub const REQUEST_SECONDS: &str = "meterflow_api_request_seconds";
/// Usage events written to the usage topic (acknowledged by the broker).
pub const EVENTS_ACCEPTED: &str = "meterflow_api_events_accepted_total";
/// Items rejected, by `reason`.
pub const EVENTS_REJECTED: &str = "meterflow_api_events_rejected_total";
/// Requests answered 429, by `cause` (`rate_limit`, `backpressure`).
pub const THROTTLED: &str = "meterflow_api_throttled_total";
/// Produce failures (the request was answered 503).
pub const PRODUCE_ERRORS: &str = "meterflow_api_produce_errors_total";
/// Wallet adjustments by `result` (`created`, `replayed`, `conflict`).
pub const ADJUSTMENTS: &str = "meterflow_api_wallet_adjustments_total";
/// Entitlement checks by `reason` (`ok`, `no_price`, `insufficient_balance`, `hard_limit`).
pub const ENTITLEMENT_CHECKS: &str = "meterflow_api_entitlement_checks_total";
/// Balance records that could not be read.
pub const BALANCES_UNREADABLE: &str = "meterflow_api_balances_unreadable_total";
/// Active (not revoked) keys in the cache.
pub const KEYS: &str = "meterflow_api_keys";
/// Failed key refreshes.
pub const KEY_REFRESH_ERRORS: &str = "meterflow_api_key_refresh_errors_total";
/// Events waiting for the broker's acknowledgement.
pub const IN_FLIGHT: &str = "meterflow_api_events_in_flight";
/// From handing a request's events to librdkafka to the last acknowledgement, seconds.
pub const PRODUCE_SECONDS: &str = "meterflow_api_produce_seconds";
/// Usage queries by `source` (`usage_rollup_day`, `usage_rollup_hour`, `meter_totals`).
pub const USAGE_QUERIES: &str = "meterflow_api_usage_queries_total";
/// Invoice previews by `true_up` (`charged`, `projected`, `none`).
pub const INVOICE_PREVIEWS: &str = "meterflow_api_invoice_previews_total";
/// Customer page requests by `result` (`ok`, `expired`, `invalid`).
pub const PORTAL_VIEWS: &str = "meterflow_api_portal_views_total";

/// HELP and unit lines for `/metrics`. Also the list of what the API exports: the deployment
/// check (tools/tests/deployment.rs) collects these names to validate the dashboards.
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUESTS, "Requests by route and status (the HTTP status code).");
    describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "Request latency by route.");
    describe_counter!(EVENTS_ACCEPTED, "Usage events written to the usage topic (acknowledged by the broker).");
    describe_counter!(EVENTS_REJECTED, "Items rejected, by reason.");
    describe_counter!(THROTTLED, "Requests answered 429, by cause (rate_limit, backpressure).");
    describe_counter!(PRODUCE_ERRORS, "Produce failures (the request was answered 503).");
    describe_counter!(ADJUSTMENTS, "Wallet adjustments by result (created, replayed, conflict).");
    describe_counter!(ENTITLEMENT_CHECKS, "Entitlement checks by reason (ok, no_price, insufficient_balance, hard_limit).");
    describe_counter!(BALANCES_UNREADABLE, "Balance records that could not be read.");
    describe_gauge!(KEYS, "Active (not revoked) keys in the cache.");
    describe_counter!(KEY_REFRESH_ERRORS, "Failed key refreshes.");
    describe_gauge!(IN_FLIGHT, "Events waiting for the broker's acknowledgement.");
    describe_histogram!(PRODUCE_SECONDS, Unit::Seconds, "From handing a request's events to librdkafka to the last acknowledgement.");
    describe_counter!(USAGE_QUERIES, "Usage queries by source (usage_rollup_day, usage_rollup_hour, meter_totals).");
    describe_counter!(INVOICE_PREVIEWS, "Invoice previews by true_up (charged, projected, none).");
    describe_counter!(PORTAL_VIEWS, "Customer page requests by result (ok, expired, invalid).");
}
