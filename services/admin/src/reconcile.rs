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

/// Normalised column name: lower case, ` (utc)` and surrounding blanks dropped, spaces to `_`.
fn norm(h: &str) -> String {
    h.trim().to_lowercase().replace("(utc)", "").trim().replace([' ', '-'], "_")
}

struct Columns {
    index: BTreeMap<String, usize>,
}

impl Columns {
    fn new(headers: &csv::StringRecord) -> Self {
        Self { index: headers.iter().enumerate().map(|(i, h)| (norm(h), i)).collect() }
    }

    fn find(&self, names: &[&str]) -> Option<usize> {
        names.iter().find_map(|n| self.index.get(*n).copied())
    }

    fn require(&self, names: &[&str]) -> Result<usize> {
        self.find(names).with_context(|| format!("the export has no column {}", names.join(" / ")))
    }
}

/// `YYYY-MM`, `YYYY-MM-DD`, `YYYY-MM-DD HH:MM[:SS]`, RFC 3339, or Unix seconds -> Unix ms.
pub fn parse_time(s: &str) -> Result<i64> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: i64 = s.parse().with_context(|| format!("time {s:?}"))?;
        return secs.checked_mul(1000).with_context(|| format!("time {s:?} out of range"));
    }
    let rfc = match s.len() {
        7 => format!("{s}-01T00:00:00Z"),
        10 => format!("{s}T00:00:00Z"),
        16 => format!("{}T{}:00Z", &s[..10], &s[11..]),
        19 if s.as_bytes()[10] == b' ' => format!("{}T{}Z", &s[..10], &s[11..]),
        _ => s.to_owned(),
    };
    pricing::parse_rfc3339_ms(&rfc).map_err(|e| anyhow::anyhow!("time {s:?}: {e}"))
}

fn decimal(field: &'static str, s: &str) -> Result<Decimal> {
    meterflow_core::decimal::parse(field, s.trim()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Reads an export in the mapping's format and translates it to meterflow's names.
pub fn parse_external(csv_text: &str, mapping: &Mapping) -> Result<Vec<ExternalLine>> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(csv_text.as_bytes());
    let cols = Columns::new(reader.headers().context("reading the CSV header")?);
    let stripe = mapping.format == "stripe";
    let (tenant_c, price_c, period_c, currency_c, amount_c) = if stripe {
        (
            cols.require(&["customer", "customer_id"])?,
            cols.require(&["price", "price_id", "price.id", "plan_id", "plan"])?,
            cols.require(&["period_start", "period.start", "line_item_period_start"])?,
            cols.require(&["currency"])?,
            cols.require(&["amount", "invoice_line_item_amount"])?,
        )
    } else {
        (
            cols.require(&["tenant"])?,
            cols.require(&["price"])?,
            cols.require(&["period_start", "period"])?,
            cols.require(&["currency"])?,
            cols.require(&["amount"])?,
        )
    };
    let quantity_c = cols.find(&["quantity"]);
    let id_c = if stripe { cols.find(&["id", "invoice_line_item_id", "line_id"]) } else { cols.find(&["line_id", "id"]) };
    let mut out = Vec::new();
    for (n, rec) in reader.records().enumerate() {
        let line = n + 2;
        let rec = rec.with_context(|| format!("CSV line {line}"))?;
        let get = |i: usize| rec.get(i).unwrap_or("").trim();
        let ctx = || format!("CSV line {line}");
        let currency = get(currency_c).to_uppercase();
        if currency.is_empty() {
            bail!("{}: empty currency", ctx());
        }
        let raw_amount = get(amount_c);
        let amount = if stripe {
            let minor: i64 = raw_amount
                .parse()
                .with_context(|| format!("{}: Stripe amount {raw_amount:?} is not an integer of minor units", ctx()))?;
            Decimal::new(minor, mapping.exponent(&currency))
        } else {
            decimal("amount", raw_amount).with_context(ctx)?
        };
        let quantity = match quantity_c.map(get) {
            Some(q) if !q.is_empty() => decimal("quantity", q).with_context(ctx)?,
            _ => Decimal::ZERO,
        };
        let ext_tenant = get(tenant_c);
        let ext_price = get(price_c);
        if ext_tenant.is_empty() || ext_price.is_empty() {
            bail!("{}: empty customer/tenant or price", ctx());
        }
        let tenant = mapping.customers.get(ext_tenant).cloned().unwrap_or_else(|| ext_tenant.to_owned());
        let price = mapping.prices.get(ext_price).cloned().unwrap_or_else(|| ext_price.to_owned());
        let at = parse_time(get(period_c)).with_context(ctx)?;
        if !(pricing::MIN_TIME_MS..pricing::MAX_TIME_MS).contains(&at) {
            bail!("{}: period start out of range", ctx());
        }
        out.push(ExternalLine {
            key: Key { tenant, price, period_start: pricing::period_start(at), currency },
            amount,
            quantity,
            line_id: id_c.map(get).unwrap_or_default().to_owned(),
        });
    }
    Ok(out)
}

/// Inverse of `meterflow_core::records::dimensions_key` (`k=v,k=v` with `\` escapes).
pub fn parse_dimensions_key(key: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let (mut k, mut v, mut in_value, mut esc) = (String::new(), String::new(), false, false);
    for c in key.chars() {
        let cur = if in_value { &mut v } else { &mut k };
        if esc {
            cur.push(c);
            esc = false;
        } else if c == '\\' {
            esc = true;
        } else if c == '=' && !in_value {
            in_value = true;
        } else if c == ',' {
            out.insert(std::mem::take(&mut k), std::mem::take(&mut v));
            in_value = false;
        } else {
            cur.push(c);
        }
    }
    if in_value || !k.is_empty() {
        out.insert(k, v);
    }
    out
}

/// The catalog price a charge was rated by: its plan's price for its meter and dimensions,
/// `true_up` for minimum commitments, else `meter` (+ `{dimensions}`) when the catalog no
/// longer has it.
pub fn price_of(catalog: Option<&Catalog>, kind: &str, plan: &str, meter: &str, dimensions_key: &str) -> String {
    if kind == "true_up" {
        return TRUE_UP_PRICE.into();
    }
    let dims = parse_dimensions_key(dimensions_key);
    if let Some(p) = catalog.and_then(|c| c.plan(plan)).and_then(|p| p.price_for(meter, &dims)) {
        return p.name.clone();
    }
    if dimensions_key.is_empty() {
        meter.to_owned()
    } else {
        format!("{meter}{{{dimensions_key}}}")
    }
}

/// One group of meterflow charges as read from ClickHouse.
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
pub struct ChargeGroup {
    pub tenant: String,
    pub kind: String,
    pub plan: String,
    pub currency: String,
    pub meter: String,
    pub dimensions_key: String,
    /// Unix seconds.
    pub period_s: u32,
    pub total: i128,
    pub qty: i128,
    pub charges: u64,
}

/// Sums charge groups per key.
pub fn meterflow_sides(groups: &[ChargeGroup], catalog: Option<&Catalog>) -> BTreeMap<Key, Side> {
    let mut out: BTreeMap<Key, Side> = BTreeMap::new();
    for g in groups {
        let key = Key {
            tenant: g.tenant.clone(),
            price: price_of(catalog, &g.kind, &g.plan, &g.meter, &g.dimensions_key),
            period_start: i64::from(g.period_s) * 1000,
            currency: g.currency.clone(),
        };
        let s = out.entry(key).or_default();
        s.amount += meterflow_core::decimal::from_ch_i128(g.total);
        s.quantity += meterflow_core::decimal::from_ch_i128(g.qty);
        s.lines += g.charges;
    }
    out
}

/// meterflow's charges grouped by everything that decides the price (never by a Decimal:
/// ClickHouse 18.16 crashes on that).
pub async fn load_meterflow(client: &clickhouse::Client) -> Result<Vec<ChargeGroup>> {
    client
        .query(
            "SELECT tenant, kind, plan, currency, meter, dimensions_key, toUInt32(period_start) AS period_s, \
             sum(amount) AS total, sum(quantity) AS qty, count() AS charges \
             FROM charges_dedup GROUP BY tenant, kind, plan, currency, meter, dimensions_key, period_start",
        )
        .fetch_all::<ChargeGroup>()
        .await
        .context("reading charges_dedup")
}

#[derive(Debug, Clone, clickhouse::Row, serde::Serialize)]
struct ResultRow {
    run_id: String,
    run_at: u32,
    source: String,
    tenant: String,
    price: String,
    currency: String,
    period_start: u32,
    meterflow_amount: i128,
    external_amount: i128,
    difference: i128,
    meterflow_quantity: i128,
    external_quantity: i128,
    status: String,
    finding: String,
    external_lines: u64,
    meterflow_charges: u64,
}

/// Writes every compared key of a run to `reconciliation_results`.
pub async fn write_results(client: &clickhouse::Client, run_id: &str, run_at_s: u32, source: &str, report: &Report) -> Result<()> {
    use meterflow_core::decimal::to_ch_i128;
    let mut insert = client.insert::<ResultRow>("reconciliation_results").await?;
    for r in &report.rows {
        insert
            .write(&ResultRow {
                run_id: run_id.to_owned(),
                run_at: run_at_s,
                source: source.to_owned(),
                tenant: r.key.tenant.clone(),
                price: r.key.price.clone(),
                currency: r.key.currency.clone(),
                period_start: (r.key.period_start / 1000).clamp(0, i64::from(u32::MAX)) as u32,
                meterflow_amount: to_ch_i128(&r.meterflow.amount)?,
                external_amount: to_ch_i128(&r.external.amount)?,
                difference: to_ch_i128(&r.difference)?,
                meterflow_quantity: to_ch_i128(&r.meterflow.quantity)?,
                external_quantity: to_ch_i128(&r.external.quantity)?,
                status: r.status.as_str().into(),
                finding: r.finding.as_str().into(),
                external_lines: r.external.lines,
                meterflow_charges: r.meterflow.lines,
            })
            .await?;
    }
    insert.end().await.context("writing reconciliation_results")?;
    Ok(())
}

/// `YYYY-MM` of a Unix-ms time (Howard Hinnant's civil-from-days).
pub fn month(ms: i64) -> String {
    let z = ms.div_euclid(86_400_000) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
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
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn key(t: &str, p: &str, month: &str) -> Key {
        Key { tenant: t.into(), price: p.into(), period_start: parse_time(month).unwrap(), currency: "USD".into() }
    }

    fn side(a: &str, n: u64) -> Side {
        Side { amount: d(a), quantity: Decimal::ZERO, lines: n }
    }

    #[test]
    fn stripe_export_is_translated_with_minor_units_and_mapping() {
        let csv = "id,Invoice ID,Customer,Price ID,Amount,Currency,Period Start (UTC),Period End (UTC),Quantity\n\
                   il_1,in_1,cus_A,price_in,1234,usd,2026-03-01 00:00,2026-04-01 00:00,1000\n\
                   il_2,in_1,cus_A,price_out,500,usd,1772323200,1775001600,\n\
                   il_3,in_2,cus_B,price_jp,700,jpy,2026-03-15,2026-04-01,\n";
        let mapping = Mapping::from_toml_str(
            "format = \"stripe\"\n[customers]\ncus_A = \"acme\"\n[prices]\nprice_in = \"input_tokens.gpt-4o\"\n",
        )
        .unwrap();
        let lines = parse_external(csv, &mapping).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].key, key("acme", "input_tokens.gpt-4o", "2026-03"));
        assert_eq!(lines[0].amount, d("12.34"));
        assert_eq!(lines[0].quantity, d("1000"));
        assert_eq!(lines[0].line_id, "il_1");
        // Unix seconds 1772323200 = 2026-03-01T00:00:00Z; unmapped price keeps its id.
        assert_eq!(lines[1].key, key("acme", "price_out", "2026-03"));
        assert_eq!(lines[1].amount, d("5"));
        // JPY has no minor unit; unmapped customer is taken as the tenant.
        assert_eq!(lines[2].key, Key { currency: "JPY".into(), ..key("cus_B", "price_jp", "2026-03") });
        assert_eq!(lines[2].amount, d("700"));
    }

    #[test]
    fn neutral_format_and_errors_name_the_line() {
        let m = Mapping::default();
        let m = Mapping { format: "meterflow".into(), tolerance: d("0.01"), ..m };
        let ok = parse_external("tenant,price,period_start,currency,amount\nacme,p,2026-03,usd,1.000000001\n", &m).unwrap();
        assert_eq!(ok[0].amount, d("1.000000001"));
        assert_eq!(ok[0].key.currency, "USD");
        let err = parse_external("tenant,price,period_start,currency,amount\nacme,p,2026-03,usd,1e3\n", &m).unwrap_err();
        assert!(format!("{err:#}").contains("CSV line 2"), "{err:#}");
        let err = parse_external("tenant,price,currency,amount\n", &m).unwrap_err();
        assert!(format!("{err:#}").contains("period_start"), "{err:#}");
        assert!(Mapping::from_toml_str("format = \"paypal\"").is_err());
        assert!(Mapping::from_toml_str("bogus = 1").is_err());
    }

    #[test]
    fn compare_classifies_each_kind_of_difference_and_sums_totals() {
        let mf: BTreeMap<Key, Side> = [
            (key("a", "p1", "2026-03"), side("10.004", 3)), // within a cent of 10.00
            (key("a", "p2", "2026-03"), side("5", 1)),      // not invoiced
            (key("b", "p1", "2026-03"), side("20", 2)),     // invoiced at 25
            (key("b", "p1", "2026-04"), side("99", 1)),     // April: not in the export
        ]
        .into();
        let ext: BTreeMap<Key, Side> = [
            (key("a", "p1", "2026-03"), side("10.00", 1)),
            (key("b", "p1", "2026-03"), side("25", 1)),
            (key("b", "p3", "2026-03"), side("7", 1)), // invoiced, never metered
        ]
        .into();
        let r = compare(&mf, &ext, None, d("0.01"), Decimal::ZERO);
        let got: Vec<(&str, &str, Finding, Status, Decimal)> = r
            .rows
            .iter()
            .map(|r| (r.key.tenant.as_str(), r.key.price.as_str(), r.finding, r.status, r.difference))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", "p1", Finding::Match, Status::Match, d("-0.004")),
                ("a", "p2", Finding::MissingExternal, Status::UnderBilled, d("-5")),
                ("b", "p1", Finding::AmountMismatch, Status::OverBilled, d("5")),
                ("b", "p3", Finding::ExtraExternal, Status::OverBilled, d("7")),
            ]
        );
        let usd = &r.total["USD"];
        assert_eq!((usd.over_billed, usd.under_billed, usd.mismatches), (d("12"), d("5"), 3));
        assert_eq!(usd.meterflow, d("35.004"));
        assert_eq!(usd.external, d("42.00"));
        assert_eq!(r.by_tenant[&("b".into(), "USD".into())].over_billed, d("12"));
        assert_eq!(r.by_price[&("a".into(), "p2".into(), "USD".into())].under_billed, d("5"));
        // Naming April explicitly compares it too (and finds it missing externally).
        let april: BTreeSet<i64> = [parse_time("2026-04").unwrap()].into();
        let r = compare(&mf, &ext, Some(&april), d("0.01"), Decimal::ZERO);
        assert_eq!(r.rows.len(), 1);
        assert_eq!(r.rows[0].finding, Finding::MissingExternal);
        // A relative tolerance of 25% accepts 20 vs 25.
        let r = compare(&mf, &ext, None, Decimal::ZERO, d("0.25"));
        assert!(r.rows.iter().any(|x| x.key.tenant == "b" && x.key.price == "p1" && x.status == Status::Match));
        let text = render(&r);
        assert!(text.contains("missing_external"), "{text}");
    }

    /// The worked example of docs/revenue-assurance.md.
    #[test]
    fn documented_example() {
        let csv = "id,invoice,customer,price,amount,currency,period_start,quantity\n\
                   il_1,in_9,cus_Q1w2e3,price_in_4o,1230,usd,2026-03-01 00:00,4200000\n\
                   il_2,in_9,cus_Q1w2e3,price_out_4o,4500,usd,2026-03-01 00:00,3000000\n\
                   il_3,in_9,cus_Q1w2e3,price_support,900,usd,2026-03-01 00:00,1\n";
        let mapping = Mapping::from_toml_str(
            "format = \"stripe\"\ntolerance = \"0.01\"\n[customers]\ncus_Q1w2e3 = \"acme\"\n\
             [prices]\nprice_in_4o = \"input_tokens.gpt-4o\"\nprice_out_4o = \"output_tokens.gpt-4o\"\n",
        )
        .unwrap();
        let ext = external_sides(&parse_external(csv, &mapping).unwrap());
        let mf: BTreeMap<Key, Side> = [
            (key("acme", "input_tokens.gpt-4o", "2026-03"), side("12.300000000", 40)),
            (key("acme", "output_tokens.gpt-4o", "2026-03"), side("40.000000000", 40)),
            (key("acme", "requests.gpt-4o", "2026-03"), side("1.250000000", 40)),
        ]
        .into();
        let r = compare(&mf, &ext, None, mapping.tolerance, mapping.tolerance_ratio);
        let text = render(&r);
        println!("{text}");
        let usd = &r.total["USD"];
        assert_eq!((usd.over_billed, usd.under_billed, usd.mismatches), (d("14"), d("1.25"), 3));
        assert_eq!((usd.meterflow, usd.external), (d("53.55"), d("66.30")));
    }

    #[test]
    fn dimension_keys_round_trip_with_escapes() {
        let dims: BTreeMap<String, String> =
            [("model".to_string(), "gpt=4,o\\x".to_string()), ("region".to_string(), "eu".to_string())].into();
        let k = meterflow_core::records::dimensions_key(&dims);
        assert_eq!(parse_dimensions_key(&k), dims);
        assert!(parse_dimensions_key("").is_empty());
    }

    #[test]
    fn prices_are_named_by_the_catalog() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/catalog.toml")).unwrap();
        let cat = Catalog::from_toml_str(&text).unwrap();
        assert_eq!(price_of(Some(&cat), "usage", "starter", "input_tokens", "model=gpt-4o,region=us"), "input_tokens.gpt-4o");
        assert_eq!(price_of(Some(&cat), "true_up", "starter", "", ""), TRUE_UP_PRICE);
        assert_eq!(price_of(None, "usage", "starter", "m", "model=x"), "m{model=x}");
    }
}
