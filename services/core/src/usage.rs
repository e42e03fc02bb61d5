//! Usage queries: which table answers `GET /v1/usage`, the SQL, and how its rows fold into the
//! answer. No I/O: the API runs the SQL this module builds and hands the rows back to
//! [`UsagePlan::fold`].
//!
//! # Sources
//!
//! * `sum` and `count` meters are answered from the rollups of migration 016
//!   (`usage_rollup_day`, `usage_rollup_hour`): the coarsest one whose buckets tile the
//!   requested range and the requested window size. A month of one meter then reads ~30 rows
//!   per dimension set instead of ~43,000 minute windows (or millions of events).
//! * Everything else, and ranges that only the meter's own windows tile, is answered from the
//!   windows themselves: the latest revision of each window in `meter_aggregates` (what the
//!   `meter_totals` view computes, with the tenant and meter filters pushed into the scan).
//!
//! # What combines
//!
//! A bucket coarser than the meter's window combines several windows (and a `group_by`
//! narrower than the meter's dimensions combines several dimension sets): `sum`/`count` add,
//! `min`/`max` take the min/max, `latest` takes the latest window's value (one dimension set at
//! a time: the latest of two different series means nothing, so `latest` needs the meter's
//! whole `group_by`), and `avg`/`unique_count` do not combine at all (an average of averages
//! or a sum of distinct counts would be wrong): they are answered per window with the meter's
//! whole `group_by`, or refused.
//!
//! # Time
//!
//! `from` and `to` must fall on the meter's window boundaries (windows never straddle the
//! range). Buckets are UTC: hours and days from the Unix epoch, calendar months. A bucket only
//! partly inside the range is reported clipped to it.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::meter::{Aggregation, MeterDef};
use crate::pricing;

/// Milliseconds of an hour and of a day.
pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;
/// Most buckets one query may ask for: bounds the answer, not the rows scanned.
pub const MAX_BUCKETS: i64 = 50_000;

/// The buckets of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[derive(strum::IntoStaticStr, strum::EnumString)]
#[strum(serialize_all = "snake_case")]
pub enum WindowSize {
    Minute,
    Hour,
    Day,
    Month,
}

impl WindowSize {
    pub fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Length of a bucket; `None` for calendar months.
    pub fn fixed_ms(self) -> Option<i64> {
        match self {
            Self::Minute => Some(60_000),
            Self::Hour => Some(HOUR_MS),
            Self::Day => Some(DAY_MS),
            Self::Month => None,
        }
    }

    /// Start of the bucket holding `ms`.
    pub fn bucket_start(self, ms: i64) -> i64 {
        match self.fixed_ms() {
            Some(size) => ms.div_euclid(size) * size,
            None => pricing::period_start(ms),
        }
    }

    /// End (exclusive) of the bucket starting at `start`.
    pub fn bucket_end(self, start: i64) -> i64 {
        match self.fixed_ms() {
            Some(size) => start + size,
            None => pricing::period_end(start),
        }
    }
}

/// A request as the API parsed it; [`plan`] validates it against the meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRequest {
    pub tenant: String,
    pub meter: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub window_size: WindowSize,
    /// Dimensions to split by, in the order the caller gave them.
    pub group_by: Vec<String>,
}

/// Where the rows come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The latest revision of every window (`meter_aggregates`).
    Windows,
    HourRollup,
    DayRollup,
}

impl Source {
    /// The table (or, for windows, the view whose query is inlined) it reads.
    pub fn table(self) -> &'static str {
        match self {
            Self::Windows => "meter_totals",
            Self::HourRollup => "usage_rollup_hour",
            Self::DayRollup => "usage_rollup_day",
        }
    }
}

/// How the values of one bucket combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    Sum,
    Min,
    Max,
    /// The value of the latest window (also used for one-window buckets of avg/unique_count).
    Latest,
}

/// A bound SQL parameter, in the order of the `?` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    Str(String),
    Int(i64),
}

/// Why a request cannot be answered (a 400 for the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, UsageError> {
    Err(UsageError(msg.into()))
}

/// The plan of one usage query: the SQL (rows `(bucket_ms Int64, dims Array(String),
/// value Decimal(38, 9), last_ms Int64)`) and how to fold them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsagePlan {
    pub request: UsageRequest,
    pub aggregation: Aggregation,
    pub source: Source,
    pub combine: Combine,
    pub sql: String,
    pub binds: Vec<Bind>,
}

/// One row of the plan's SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRow {
    pub bucket_ms: i64,
    /// Values of the request's `group_by`, in its order.
    pub dims: Vec<String>,
    pub value: Decimal,
    /// Start of the latest window (or rollup bucket) the row saw.
    pub last_ms: i64,
}

/// One bucket of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsagePoint {
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub dimensions: BTreeMap<String, String>,
    pub value: Decimal,
}

/// Validates `req` against its meter and plans it.
pub fn plan(meter: &MeterDef, req: &UsageRequest) -> Result<UsagePlan, UsageError> {
    validate(meter, req)?;
    let aggregation = meter.aggregation;
    let full_group = {
        let mut g = req.group_by.clone();
        g.sort();
        g == meter.group_by
    };
    let per_window = req.window_size.fixed_ms() == Some(meter.window_ms);
    let combine = match aggregation {
        Aggregation::Sum | Aggregation::Count => Combine::Sum,
        Aggregation::Min => Combine::Min,
        Aggregation::Max => Combine::Max,
        Aggregation::Latest if full_group => Combine::Latest,
        Aggregation::Latest => return refuse("a `latest` meter is only answered per dimension set: group_by all of its dimensions"),
        Aggregation::Avg | Aggregation::UniqueCount if full_group && per_window => Combine::Latest,
        Aggregation::Avg | Aggregation::UniqueCount => {
            return refuse(format!(
                "{} values do not combine across windows or dimension sets: ask for window_size equal to the meter's window \
                 ({} s) and group_by all of its dimensions ({})",
                aggregation.as_str(),
                meter.window_ms / 1000,
                meter.group_by.join(",")
            ))
        }
    };
    let source = if combine == Combine::Sum { rollup_for(meter, req) } else { Source::Windows };
    let (sql, binds) = build_sql(req, source, combine);
    Ok(UsagePlan { request: req.clone(), aggregation, source, combine, sql, binds })
}

fn validate(meter: &MeterDef, req: &UsageRequest) -> Result<(), UsageError> {
    if req.tenant.is_empty() {
        return refuse("tenant must not be empty");
    }
    if req.from_ms >= req.to_ms {
        return refuse("from must be before to");
    }
    if req.from_ms < pricing::MIN_TIME_MS || req.to_ms > pricing::MAX_TIME_MS {
        return refuse("from and to must lie between 1970 and 9999");
    }
    let w = meter.window_ms;
    if req.from_ms.rem_euclid(w) != 0 || req.to_ms.rem_euclid(w) != 0 {
        return refuse(format!("from and to must fall on the meter's window boundaries (every {} s from the Unix epoch)", w / 1000));
    }
    let bucket_fits = match req.window_size.fixed_ms() {
        Some(size) => size % w == 0,
        None => DAY_MS % w == 0,
    };
    if !bucket_fits {
        return refuse(format!("window_size {} is not a whole number of the meter's {} s windows", req.window_size.as_str(), w / 1000));
    }
    let buckets = match req.window_size.fixed_ms() {
        Some(size) => (req.to_ms - req.from_ms).div_euclid(size) + 1,
        None => (req.to_ms - req.from_ms).div_euclid(28 * DAY_MS) + 1,
    };
    if buckets > MAX_BUCKETS {
        return refuse(format!("{buckets} buckets of {} asked for; at most {MAX_BUCKETS}", req.window_size.as_str()));
    }
    for (i, d) in req.group_by.iter().enumerate() {
        if !meter.group_by.contains(d) {
            return refuse(format!("meter {:?} does not group by {d:?} (its dimensions: {})", meter.name, meter.group_by.join(",")));
        }
        if req.group_by[..i].contains(d) {
            return refuse(format!("group_by names {d:?} twice"));
        }
    }
    Ok(())
}

/// The coarsest rollup whose buckets tile the range and the answer's buckets, if the meter's
/// windows tile the rollup's buckets.
fn rollup_for(meter: &MeterDef, req: &UsageRequest) -> Source {
    for (source, g) in [(Source::DayRollup, DAY_MS), (Source::HourRollup, HOUR_MS)] {
        let tiles_answer = match req.window_size.fixed_ms() {
            Some(size) => size % g == 0,
            None => true, // months are whole days
        };
        if g % meter.window_ms == 0 && req.from_ms % g == 0 && req.to_ms % g == 0 && tiles_answer {
            return source;
        }
    }
    Source::Windows
}

/// SQL granularity of the rows: the answer's buckets, or days for months (folded in Rust,
/// because ClickHouse's calendar functions follow the server's time zone).
fn sql_bucket(req: &UsageRequest) -> i64 {
    req.window_size.fixed_ms().unwrap_or(DAY_MS)
}

fn build_sql(req: &UsageRequest, source: Source, combine: Combine) -> (String, Vec<Bind>) {
    let g = sql_bucket(req);
    let mut binds = Vec::new();
    let (keys, values) = if source == Source::Windows { ("ks", "vs") } else { ("dim_keys", "dim_values") };
    let dims = if req.group_by.is_empty() {
        "emptyArrayString()".to_owned()
    } else {
        let items: Vec<String> = req
            .group_by
            .iter()
            .map(|d| {
                binds.push(Bind::Str(d.clone()));
                format!("{values}[indexOf({keys}, ?)]")
            })
            .collect();
        format!("[{}]", items.join(", "))
    };
    let sql = match source {
        Source::HourRollup | Source::DayRollup => {
            binds.extend([
                Bind::Str(req.tenant.clone()),
                Bind::Str(req.meter.clone()),
                Bind::Int(req.from_ms),
                Bind::Int(req.to_ms),
            ]);
            format!(
                "SELECT intDiv(bucket_ms, {g}) * {g} AS b, {dims} AS dims, sum(value) AS v, max(bucket_ms) AS last \
                 FROM {} WHERE tenant = ? AND meter = ? AND bucket_ms >= ? AND bucket_ms < ? \
                 GROUP BY b, dims ORDER BY b, dims",
                source.table()
            )
        }
        Source::Windows => {
            let agg = match combine {
                Combine::Sum => "sum(latest)",
                Combine::Min => "min(latest)",
                Combine::Max => "max(latest)",
                Combine::Latest => "argMax(latest, ws)",
            };
            binds.extend([
                Bind::Str(req.tenant.clone()),
                Bind::Str(req.meter.clone()),
                Bind::Int(req.from_ms.div_euclid(1000)),
                Bind::Int(req.to_ms.div_euclid(1000)),
            ]);
            format!(
                "SELECT intDiv(ws, {g}) * {g} AS b, {dims} AS dims, {agg} AS v, max(ws) AS last FROM \
                 (SELECT window_start_ms AS ws, any(dim_keys) AS ks, any(dim_values) AS vs, argMax(value, revision) AS latest \
                 FROM meter_aggregates WHERE tenant = ? AND meter = ? AND window_start >= toDateTime(?) AND window_start < toDateTime(?) \
                 GROUP BY dimensions_key, window_start_ms) \
                 GROUP BY b, dims ORDER BY b, dims"
            )
        }
    };
    (sql, binds)
}

impl UsagePlan {
    /// The answer from the SQL's rows: rows of one bucket (months) and dimension values
    /// combined, buckets clipped to the range, sorted by bucket start, then dimensions.
    pub fn fold(&self, rows: Vec<SourceRow>) -> Vec<UsagePoint> {
        let req = &self.request;
        let mut acc: BTreeMap<(i64, Vec<String>), (Decimal, i64)> = BTreeMap::new();
        for row in rows {
            let key = (req.window_size.bucket_start(row.bucket_ms), row.dims);
            match acc.get_mut(&key) {
                None => {
                    acc.insert(key, (row.value, row.last_ms));
                }
                Some((v, last)) => {
                    match self.combine {
                        Combine::Sum => *v += row.value,
                        Combine::Min => *v = (*v).min(row.value),
                        Combine::Max => *v = (*v).max(row.value),
                        Combine::Latest if row.last_ms > *last => *v = row.value,
                        Combine::Latest => {}
                    }
                    *last = (*last).max(row.last_ms);
                }
            }
        }
        acc.into_iter()
            .map(|((start, dims), (value, _))| UsagePoint {
                window_start_ms: start.max(req.from_ms),
                window_end_ms: req.window_size.bucket_end(start).min(req.to_ms),
                dimensions: req.group_by.iter().cloned().zip(dims).collect(),
                value,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
