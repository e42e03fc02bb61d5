//! The customer page's HTML, rendered from data already read: pure functions of their input.
//! The chart is inline SVG computed here (bar heights in exact decimal arithmetic, rounded to
//! whole pixels), so the page needs no script and no asset. Every number is printed the way
//! the API prints it, and carries a `data-*` attribute naming what it is, so a test (or a
//! customer's tooling) can find it.

use std::fmt::Write as _;

use rust_decimal::prelude::ToPrimitive as _;
use rust_decimal::Decimal;

use crate::invoice::InvoiceResponse;
use meterflow_core::time::format_rfc3339_s;
use meterflow_core::decimal;

pub const DAY_MS: i64 = 86_400_000;
const CHART_W: i64 = 620;
const CHART_H: i64 = 140;

/// One meter's usage in the month, by UTC day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterUsage {
    pub meter: String,
    pub aggregation: &'static str,
    /// (day start ms, value), days with usage only.
    pub days: Vec<(i64, Decimal)>,
}

impl MeterUsage {
    pub fn total(&self) -> Decimal {
        self.days.iter().map(|(_, v)| *v).sum()
    }
}

/// A balance in one currency; `pending` and `available` are `None` when only the settled
/// wallet balance is known (see `balance_view`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub currency: String,
    pub settled: Decimal,
    pub pending: Option<Decimal>,
    pub available: Option<Decimal>,
}

#[derive(Debug, Clone)]
pub struct PageData {
    pub tenant: String,
    pub now_ms: i64,
    pub expires_at_ms: i64,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    pub meters: Vec<MeterUsage>,
    pub balances: Vec<Balance>,
    pub invoice: InvoiceResponse,
}

/// Text safe in HTML content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:760px;color:#1d2433;padding:0 1rem}\
h1{font-size:1.4rem;margin-bottom:.2rem}h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.3rem}\
.muted{color:#667}.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{border:1px solid #dde;border-radius:8px;padding:.8rem 1.2rem}\
.big{font-size:1.5rem;font-weight:600}table{border-collapse:collapse;width:100%}td,th{padding:.35rem .5rem;border-bottom:1px solid #eef;text-align:left}\
.num{text-align:right;font-variant-numeric:tabular-nums}svg{background:#fafbff;border:1px solid #eef;border-radius:6px}\
rect.bar{fill:#4c6ef5}tr.total td{font-weight:600;border-top:2px solid #99a}";

fn head(title: &str) -> String {
    format!("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <meta name=\"robots\" content=\"noindex\"><title>{}</title><style>{STYLE}</style></head><body>", esc(title))
}

/// The page for an expired, forged or unusable link.
pub fn render_error(title: &str, message: &str) -> String {
    format!("{}<h1>{}</h1><p class=\"muted\" id=\"error\">{}</p></body></html>\n", head(title), esc(title), esc(message))
}

/// The customer page.
pub fn render_page(d: &PageData) -> String {
    let mut h = head(&format!("Usage and billing: {}", d.tenant));
    let month = &format_rfc3339_s(d.period_start_ms)[..7];
    let _ = write!(
        h,
        "<h1>Usage and billing</h1><p class=\"muted\">Customer <strong data-tenant>{}</strong> · billing period {month} (UTC) · \
         as of {} · this link expires {}</p>",
        esc(&d.tenant),
        format_rfc3339_s(d.now_ms),
        format_rfc3339_s(d.expires_at_ms)
    );
    balances(&mut h, &d.balances);
    h.push_str("<h2>Usage this month</h2>");
    if d.meters.iter().all(|m| m.days.is_empty()) {
        h.push_str("<p class=\"muted\">No usage yet this month.</p>");
    }
    for m in &d.meters {
        usage(&mut h, m, d);
    }
    invoice(&mut h, &d.invoice);
    h.push_str("</body></html>\n");
    h
}

fn balances(h: &mut String, list: &[Balance]) {
    h.push_str("<h2>Balance</h2><div class=\"cards\">");
    if list.is_empty() {
        h.push_str("<p class=\"muted\">No prepaid balance.</p>");
    }
    for b in list {
        let shown = |d: Option<Decimal>| d.map_or_else(|| "not known yet".to_owned(), |d| decimal::format(&d));
        let _ = write!(
            h,
            "<div class=\"card\"><div class=\"muted\">{cur} settled</div><div class=\"big\" data-balance=\"{cur}\">{}</div>\
             <div class=\"muted\">pending spend (open windows): <span data-pending=\"{cur}\">{}</span></div>\
             <div class=\"muted\">available: <span data-available=\"{cur}\">{}</span></div></div>",
            decimal::format(&b.settled),
            shown(b.pending),
            shown(b.available),
            cur = esc(&b.currency)
        );
    }
    h.push_str("</div>");
}

fn usage(h: &mut String, m: &MeterUsage, d: &PageData) {
    let _ = write!(
        h,
        "<h3>{name} <span class=\"muted\">({agg})</span></h3><p>Total this month: <strong data-usage-total=\"{name}\">{}</strong></p>",
        decimal::format(&m.total()),
        name = esc(&m.meter),
        agg = m.aggregation
    );
    if !m.days.is_empty() {
        h.push_str(&chart(m, d.period_start_ms, d.period_end_ms));
    }
}

/// Daily bars over the month; each bar's tooltip is the exact value.
pub fn chart(m: &MeterUsage, start_ms: i64, end_ms: i64) -> String {
    let days = ((end_ms - start_ms) / DAY_MS).max(1);
    let slot = CHART_W / days;
    let top = m.days.iter().map(|(_, v)| *v).max().unwrap_or_default();
    let mut s = format!(
        "<svg role=\"img\" aria-label=\"daily {} this month\" width=\"{CHART_W}\" height=\"{}\" viewBox=\"0 0 {CHART_W} {}\">",
        esc(&m.meter),
        CHART_H + 20,
        CHART_H + 20
    );
    for (day_ms, v) in &m.days {
        let i = (day_ms - start_ms) / DAY_MS;
        let height = if top > Decimal::ZERO && *v > Decimal::ZERO {
            (*v * Decimal::from(CHART_H) / top).round().to_i64().unwrap_or(0).clamp(1, CHART_H)
        } else {
            0
        };
        let _ = write!(
            s,
            "<rect class=\"bar\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{height}\"><title>{}: {}</title></rect>",
            i * slot + 1,
            CHART_H - height,
            (slot - 2).max(1),
            &format_rfc3339_s(*day_ms)[..10],
            decimal::format(v)
        );
    }
    for day in (0..days).step_by(7) {
        let _ = write!(s, "<text x=\"{}\" y=\"{}\" font-size=\"10\" fill=\"#667\">{}</text>", day * slot + 1, CHART_H + 14, day + 1);
    }
    let _ = write!(s, "<text x=\"{}\" y=\"10\" font-size=\"10\" fill=\"#667\" text-anchor=\"end\">max {}</text></svg>", CHART_W - 4, decimal::format(&top));
    s
}

fn invoice(h: &mut String, inv: &InvoiceResponse) {
    let _ = write!(h, "<h2>Invoice preview ({})</h2>", esc(&inv.period));
    if inv.lines.is_empty() && inv.true_ups.is_empty() {
        h.push_str("<p class=\"muted\">Nothing charged yet this period.</p>");
        return;
    }
    h.push_str("<table><thead><tr><th>Price</th><th class=\"num\">Quantity</th><th>Tiers</th><th class=\"num\">Amount</th></tr></thead><tbody>");
    for l in &inv.lines {
        let tiers: Vec<String> = l.tiers.iter().map(|t| format!("tier {}: {} × {}", t.tier, t.units, t.unit_price)).collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"muted\">{}</td><td class=\"num\" data-line=\"{}\">{} {}</td></tr>",
            esc(l.price.as_deref().unwrap_or(&l.meter)),
            esc(&l.quantity),
            esc(&tiers.join("; ")),
            esc(l.price.as_deref().unwrap_or(&l.meter)),
            esc(&l.amount),
            esc(&l.currency)
        );
    }
    for t in &inv.true_ups {
        let _ = write!(
            h,
            "<tr><td>Minimum commitment true-up ({})</td><td></td><td></td><td class=\"num\">{} {}</td></tr>",
            esc(&t.status),
            esc(&t.amount),
            esc(&t.currency)
        );
    }
    for t in &inv.totals {
        let _ = write!(
            h,
            "<tr class=\"total\"><td>Total</td><td></td><td></td><td class=\"num\"><span data-invoice-total=\"{cur}\">{}</span> {cur}</td></tr>",
            esc(&t.total),
            cur = esc(&t.currency)
        );
    }
    let _ = write!(h, "</tbody></table><p class=\"muted\">Rounding: {}.</p>", esc(&inv.rounding));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::money;

    fn inv() -> InvoiceResponse {
        serde_json::from_value(serde_json::json!({
            "tenant": "t", "period": "2026-11", "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-12-01T00:00:00Z",
            "rounding": "r", "true_ups": [],
            "lines": [{"plan": "p", "price": "in<put>", "meter": "m", "currency": "USD", "model": "per_unit", "quantity": "10",
                       "free_units": "0", "billable_quantity": "10", "tiers": [], "charges": 2, "amount": "0.03", "amount_exact": "0.025"}],
            "totals": [{"currency": "USD", "usage": "0.03", "true_up": "0.00", "total": "0.03", "total_exact": "0.025"}]
        }))
        .unwrap()
    }

    #[test]
    fn page_escapes_and_labels_every_number() {
        const NOV: i64 = 1_793_491_200_000; // 2026-11-01
        let d = PageData {
            tenant: "<script>alert(1)</script>".into(),
            now_ms: NOV + DAY_MS,
            expires_at_ms: NOV + 2 * DAY_MS,
            period_start_ms: NOV,
            period_end_ms: NOV + 30 * DAY_MS,
            meters: vec![MeterUsage { meter: "requests".into(), aggregation: "count", days: vec![(NOV, Decimal::from(4)), (NOV + DAY_MS, Decimal::new(15, 1))] }],
            balances: vec![Balance { currency: "USD".into(), settled: Decimal::new(-125, 2), pending: Some(Decimal::new(5, 1)), available: Some(Decimal::new(-175, 2)) }],
            invoice: inv(),
        };
        let html = render_page(&d);
        assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"));
        assert!(html.contains("data-usage-total=\"requests\">5.5<"), "{html}");
        assert!(html.contains("data-balance=\"USD\">-1.25<"));
        assert!(html.contains("data-pending=\"USD\">0.5<") && html.contains("data-available=\"USD\">-1.75<"), "{html}");
        assert!(html.contains("data-invoice-total=\"USD\">0.03<"));
        assert!(html.contains("in&lt;put&gt;"));
        // The larger day is the full height, the other proportional (1.5 / 4 of 140 = 52.5 -> 52).
        assert!(html.contains("height=\"140\"><title>2026-11-01: 4</title>"), "{html}");
        assert!(html.contains("height=\"52\"><title>2026-11-02: 1.5</title>"), "{html}");
        assert_eq!(money(Decimal::new(5, 1), "USD"), "0.50");
        let e = render_error("Link not valid", "This link has <expired>.");
        assert!(e.contains("&lt;expired&gt;") && e.contains("id=\"error\""));
    }
}
