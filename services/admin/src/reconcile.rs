//! Shadow mode: compares an external biller's invoice lines with meterflow's charges.
//!
//! A platform adopting meterflow first runs it beside the biller it already has and compares
//! the two per tenant, price, billing period and currency. The comparison itself
//! ([`compare`]) is pure; reading the export ([`parse_external`]), reading meterflow's charges
//! ([`load_meterflow`]) and writing the result ([`write_results`]) are the I/O around it.
//!
//! # External formats
//!
//! * `meterflow` (the documented neutral format): a CSV with a header naming at least
//!   `tenant, price, period_start, currency, amount`, optionally `quantity` and `line_id`.
//!   `period_start` is `YYYY-MM`, a date or an RFC 3339 time in the billing month;
//!   `amount` is a decimal in major units (`12.34` dollars).
//! * `stripe`: Stripe's invoice line items as exported (Dashboard / Sigma / API field names):
//!   `id` (or `invoice_line_item_id`), `customer` (or `customer_id`), `price` (or `price_id`,
//!   `price.id`, `plan_id`), `amount` (integer, minor units: cents), `currency` (lowercase ISO),
//!   `period_start` (or `period.start`; Unix seconds or `YYYY-MM-DD[ HH:MM[:SS]]`), optional
//!   `quantity`, `invoice` (or `invoice_id`). Column names are matched case-insensitively and
//!   with ` (UTC)` suffixes ignored. Customers and prices are translated by the mapping file.
//!
//! # Sign convention
//!
//! `difference = external - meterflow`. A positive difference beyond the tolerance is
//! **over-billing** (the biller charges more than was metered), a negative one
//! **under-billing** (revenue leaks).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rust_decimal::Decimal;
use serde::Deserialize;

use meterflow_core::pricing::{self, Catalog};

mod external;
mod meterflow;
pub use external::{parse_external, parse_time};
pub use meterflow::{load_meterflow, meterflow_sides, parse_dimensions_key, price_of, write_results, ChargeGroup};

/// Price key of minimum-commitment true-ups on the meterflow side.
pub const TRUE_UP_PRICE: &str = "true_up";

/// The mapping file (`mapping.toml`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// `meterflow` or `stripe`.
    #[serde(default = "default_format")]
    pub format: String,
    /// Absolute tolerance per (tenant, price, period, currency), in major units. Stripe
    /// rounds each line to a cent while meterflow keeps 9 digits, so a cent is the default.
    #[serde(default = "default_tolerance", with = "rust_decimal::serde::str")]
    pub tolerance: Decimal,
    /// Relative tolerance (fraction of the larger side), added to the absolute one; 0 default.
    #[serde(default, with = "rust_decimal::serde::str")]
    pub tolerance_ratio: Decimal,
    /// External customer id -> meterflow tenant. Unmapped customers are taken as tenants.
    #[serde(default)]
    pub customers: BTreeMap<String, String>,
    /// External price id -> meterflow price name (`true_up` for minimum commitments).
    /// Unmapped prices keep their external id (and so show up as extra lines).
    #[serde(default)]
    pub prices: BTreeMap<String, String>,
    /// Currency (upper case) -> number of minor-unit digits, for `stripe` amounts. Defaults
    /// to 2, with Stripe's zero- and three-decimal currencies built in.
    #[serde(default)]
    pub currency_exponents: BTreeMap<String, u32>,
}

fn default_format() -> String {
    "meterflow".into()
}

fn default_tolerance() -> Decimal {
    Decimal::new(1, 2)
}

impl Mapping {
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let m: Self = toml::from_str(text).context("parsing the mapping file")?;
        if !matches!(m.format.as_str(), "meterflow" | "stripe") {
            bail!("mapping: format {:?} is neither \"meterflow\" nor \"stripe\"", m.format);
        }
        if m.tolerance < Decimal::ZERO || m.tolerance_ratio < Decimal::ZERO {
            bail!("mapping: tolerances must not be negative");
        }
        Ok(m)
    }

    fn exponent(&self, currency: &str) -> u32 {
        if let Some(e) = self.currency_exponents.get(currency) {
            return *e;
        }
        // Stripe's zero- and three-decimal currencies.
        const ZERO: &[&str] =
            &["BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF"];
        const THREE: &[&str] = &["BHD", "JOD", "KWD", "OMR", "TND"];
        if ZERO.contains(&currency) {
            0
        } else if THREE.contains(&currency) {
            3
        } else {
            2
        }
    }
}

/// Compared key: who, what, which month, in which currency.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub tenant: String,
    pub price: String,
    /// Start of the billing month, Unix ms (UTC).
    pub period_start: i64,
    pub currency: String,
}

/// One side's total for a key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Side {
    pub amount: Decimal,
    pub quantity: Decimal,
    /// Lines (external) or charges (meterflow) summed.
    pub lines: u64,
}

/// An external invoice line, already translated to meterflow's names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalLine {
    pub key: Key,
    pub amount: Decimal,
    pub quantity: Decimal,
    pub line_id: String,
}

/// What a compared key turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Finding {
    /// Within tolerance.
    Match,
    /// Both sides have it, amounts differ beyond tolerance.
    AmountMismatch,
    /// meterflow charged it, the external biller has no line: usage not invoiced.
    MissingExternal,
    /// The external biller has a line meterflow has no charge for.
    ExtraExternal,
}

impl Finding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Match => "match",
            Self::AmountMismatch => "amount_mismatch",
            Self::MissingExternal => "missing_external",
            Self::ExtraExternal => "extra_external",
        }
    }
}

/// Direction of a difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Match,
    /// External > meterflow.
    OverBilled,
    /// External < meterflow.
    UnderBilled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Match => "match",
            Self::OverBilled => "over_billed",
            Self::UnderBilled => "under_billed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub key: Key,
    pub meterflow: Side,
    pub external: Side,
    /// external - meterflow.
    pub difference: Decimal,
    pub finding: Finding,
    pub status: Status,
}

/// Over- and under-billing sums.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub meterflow: Decimal,
    pub external: Decimal,
    /// Sum of positive differences beyond tolerance.
    pub over_billed: Decimal,
    /// Sum of |negative differences| beyond tolerance.
    pub under_billed: Decimal,
    pub mismatches: u64,
}

impl Totals {
    fn add(&mut self, r: &Row) {
        self.meterflow += r.meterflow.amount;
        self.external += r.external.amount;
        match r.status {
            Status::OverBilled => self.over_billed += r.difference,
            Status::UnderBilled => self.under_billed -= r.difference,
            Status::Match => {}
        }
        if r.status != Status::Match {
            self.mismatches += 1;
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Every compared key, in key order.
    pub rows: Vec<Row>,
    /// Per (tenant, currency).
    pub by_tenant: BTreeMap<(String, String), Totals>,
    /// Per (tenant, price, currency), over all compared periods.
    pub by_price: BTreeMap<(String, String, String), Totals>,
    /// Per currency.
    pub total: BTreeMap<String, Totals>,
}

impl Report {
    pub fn mismatches(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.status != Status::Match)
    }
}

/// Sums external lines per key.
pub fn external_sides(lines: &[ExternalLine]) -> BTreeMap<Key, Side> {
    let mut out: BTreeMap<Key, Side> = BTreeMap::new();
    for l in lines {
        let s = out.entry(l.key.clone()).or_default();
        s.amount += l.amount;
        s.quantity += l.quantity;
        s.lines += 1;
    }
    out
}

/// Compares both sides. Keys of meterflow's side in periods the export does not cover are
/// ignored unless `periods` names them (an export of March says nothing about April).
pub fn compare(
    meterflow: &BTreeMap<Key, Side>,
    external: &BTreeMap<Key, Side>,
    periods: Option<&BTreeSet<i64>>,
    tolerance: Decimal,
    tolerance_ratio: Decimal,
) -> Report {
    let covered: BTreeSet<i64> = match periods {
        Some(p) => p.clone(),
        None => external.keys().map(|k| k.period_start).collect(),
    };
    let keys: BTreeSet<&Key> = meterflow
        .keys()
        .filter(|k| covered.contains(&k.period_start))
        .chain(external.keys().filter(|k| covered.contains(&k.period_start)))
        .collect();
    let mut report = Report::default();
    for key in keys {
        let m = meterflow.get(key).cloned().unwrap_or_default();
        let e = external.get(key).cloned().unwrap_or_default();
        let difference = e.amount - m.amount;
        let allowed = tolerance + tolerance_ratio * m.amount.abs().max(e.amount.abs());
        let status = if difference.abs() <= allowed {
            Status::Match
        } else if difference > Decimal::ZERO {
            Status::OverBilled
        } else {
            Status::UnderBilled
        };
        let finding = match (status, m.lines, e.lines) {
            (Status::Match, _, _) => Finding::Match,
            (_, _, 0) => Finding::MissingExternal,
            (_, 0, _) => Finding::ExtraExternal,
            _ => Finding::AmountMismatch,
        };
        let row = Row { key: key.clone(), meterflow: m, external: e, difference, finding, status };
        report.by_tenant.entry((key.tenant.clone(), key.currency.clone())).or_default().add(&row);
        report
            .by_price
            .entry((key.tenant.clone(), key.price.clone(), key.currency.clone()))
            .or_default()
            .add(&row);
        report.total.entry(key.currency.clone()).or_default().add(&row);
        report.rows.push(row);
    }
    report
}

/// `YYYY-MM` of a Unix-ms time.
pub fn month(ms: i64) -> String {
    let (y, m, _) = pricing::civil_from_days(ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}")
}

/// The human report: every mismatch, then totals by tenant and price, then per currency.
pub fn render(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let n = report.rows.len();
    let bad = report.mismatches().count();
    let _ = writeln!(s, "compared {n} (tenant, price, period, currency) keys: {} match, {bad} differ", n - bad);
    if bad > 0 {
        let _ = writeln!(s, "\ndifferences (external - meterflow):");
        let _ = writeln!(s, "  {:<20} {:<32} {:<7} {:<4} {:>16} {:>16} {:>16}  finding", "tenant", "price", "period", "cur", "meterflow", "external", "difference");
        for r in report.mismatches() {
            let _ = writeln!(
                s,
                "  {:<20} {:<32} {:<7} {:<4} {:>16} {:>16} {:>16}  {} ({})",
                r.key.tenant,
                r.key.price,
                month(r.key.period_start),
                r.key.currency,
                r.meterflow.amount,
                r.external.amount,
                r.difference,
                r.status.as_str(),
                r.finding.as_str()
            );
        }
    }
    let _ = writeln!(s, "\nby tenant and price:");
    for ((tenant, price, cur), t) in &report.by_price {
        if t.mismatches > 0 {
            let _ = writeln!(s, "  {tenant:<20} {price:<32} {cur:<4} over-billed {:>14}  under-billed {:>14}", t.over_billed, t.under_billed);
        }
    }
    let _ = writeln!(s, "\nby tenant:");
    for ((tenant, cur), t) in &report.by_tenant {
        let _ = writeln!(
            s,
            "  {tenant:<20} {cur:<4} meterflow {:>14}  external {:>14}  over-billed {:>14}  under-billed {:>14}",
            t.meterflow, t.external, t.over_billed, t.under_billed
        );
    }
    let _ = writeln!(s, "\ntotal:");
    for (cur, t) in &report.total {
        let _ = writeln!(
            s,
            "  {cur:<4} meterflow {}  external {}  over-billed {}  under-billed {}  ({} keys differ)",
            t.meterflow, t.external, t.over_billed, t.under_billed, t.mismatches
        );
    }
    s
}

/// `meterflow-admin reconcile`.
#[derive(Debug, clap::Args)]
pub struct ReconcileCmd {
    #[command(flatten)]
    pub clickhouse: meterflow_runtime::args::ClickHouseArgs,
    /// The external biller's export (CSV; format set in the mapping file).
    #[arg(long, env = "METERFLOW_RECONCILE_EXTERNAL")]
    pub external: std::path::PathBuf,
    /// Mapping file: format, tolerance, customer -> tenant and price -> price maps.
    #[arg(long, env = "METERFLOW_RECONCILE_MAPPING")]
    pub mapping: std::path::PathBuf,
    /// Pricing catalog, to name meterflow's prices as the catalog does.
    #[arg(long, env = "METERFLOW_CATALOG", default_value = "config/catalog.toml")]
    pub catalog: std::path::PathBuf,
    /// Only these billing months (`YYYY-MM`, repeatable) [default: the months in the export].
    #[arg(long = "period", env = "METERFLOW_RECONCILE_PERIODS", value_delimiter = ',')]
    pub periods: Vec<String>,
    /// Do not write the result to the `reconciliation_results` table.
    #[arg(long, env = "METERFLOW_RECONCILE_DRY_RUN")]
    pub dry_run: bool,
}

/// Runs a reconciliation; `Ok(false)` when something differs beyond tolerance.
pub async fn run(cmd: &ReconcileCmd) -> Result<(bool, Report)> {
    let mapping = Mapping::from_toml_str(
        &std::fs::read_to_string(&cmd.mapping).with_context(|| format!("reading {}", cmd.mapping.display()))?,
    )?;
    let text = std::fs::read_to_string(&cmd.external).with_context(|| format!("reading {}", cmd.external.display()))?;
    let lines = parse_external(&text, &mapping)?;
    let catalog = read_catalog(&cmd.catalog)?;
    let periods = if cmd.periods.is_empty() {
        None
    } else {
        Some(cmd.periods.iter().map(|p| parse_time(p).map(pricing::period_start)).collect::<Result<BTreeSet<_>>>()?)
    };
    let client = meterflow_runtime::clickhouse::client(&cmd.clickhouse);
    let groups = load_meterflow(&client).await?;
    let report = compare(
        &meterflow_sides(&groups, catalog.as_ref()),
        &external_sides(&lines),
        periods.as_ref(),
        mapping.tolerance,
        mapping.tolerance_ratio,
    );
    print!("{}", render(&report));
    if !cmd.dry_run {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let run_id = format!("{now}-{}", std::process::id());
        let source = cmd.external.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        write_results(&client, &run_id, now as u32, &source, &report).await?;
        println!("\nwritten to reconciliation_results as run {run_id}");
    }
    let ok = report.mismatches().next().is_none();
    Ok((ok, report))
}

fn read_catalog(path: &Path) -> Result<Option<Catalog>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(Catalog::from_toml_str(&text).with_context(|| format!("catalog {}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), "no catalog: meterflow prices are named meter{{dimensions}}");
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests;
