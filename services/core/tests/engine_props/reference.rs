//! The naive reference the engine is checked against: accepted events folded per window at
//! the end, and the totals a consumer rebuilds from the emitted aggregates.

use super::*;

pub(super) type WinKey = (String, String, BTreeMap<String, String>, i64);

pub(super) struct Reference {
    pub(super) kinds: Vec<Kind>,
    pub(super) accepted: Vec<Ev>,
}

pub(super) fn reference(s: &Scenario, cat: &MeterCatalog) -> Reference {
    let cfg = &s.cfg;
    let mut now: Option<i64> = None;
    // (tenant, meter, id) → event time of the accepted copy; a copy counts while its
    // bucket is at or after the bucket of partition time minus the horizon.
    let mut seen: HashMap<(String, String, String), i64> = HashMap::new();
    let mut kinds = Vec::new();
    let mut accepted = Vec::new();
    for (offset, item) in s.items.iter().enumerate() {
        let e = match item {
            Item::Tick(t) => {
                now = Some(now.map_or(*t, |n| n.max(*t)));
                kinds.push(Kind::Tick);
                continue;
            }
            Item::Garbage if offset % 3 == 1 => {
                kinds.push(Kind::Rejected(RejectReason::WrongPartition));
                continue;
            }
            Item::Garbage if offset % 3 == 2 => {
                kinds.push(Kind::Rejected(RejectReason::Unauthenticated));
                continue;
            }
            Item::Garbage => {
                kinds.push(Kind::Rejected(RejectReason::Undecodable));
                continue;
            }
            Item::Event(e) => e,
        };
        let k = (|| {
            if e.tenant.is_empty() {
                return Kind::Rejected(RejectReason::MissingTenant);
            }
            if e.id.is_empty() {
                return Kind::Rejected(RejectReason::MissingEventId);
            }
            let Some(m) = cat.get(e.meter) else {
                return Kind::Rejected(RejectReason::UnknownMeter);
            };
            if e.time < -MAX_ABS_EVENT_TIME_MS || now.is_some_and(|n| e.time < n - cfg.dedup_horizon_ms) {
                return Kind::Rejected(RejectReason::TooLate);
            }
            if e.time > MAX_ABS_EVENT_TIME_MS || now.is_some_and(|n| e.time > n + m.max_future_ms) {
                return Kind::Rejected(RejectReason::TooEarly);
            }
            let key = (e.tenant.to_string(), e.meter.to_string(), e.id.clone());
            let floor_bucket = now.map_or(i64::MIN, |n| (n - cfg.dedup_horizon_ms).div_euclid(cfg.dedup_bucket_ms));
            if seen.get(&key).is_some_and(|t| t.div_euclid(cfg.dedup_bucket_ms) >= floor_bucket) {
                return Kind::Duplicate;
            }
            let Ok(q) = decimal::parse("quantity", e.quantity) else {
                return Kind::Rejected(RejectReason::BadQuantity);
            };
            if q < Decimal::ZERO && !m.allow_negative {
                return Kind::Rejected(RejectReason::NegativeQuantity);
            }
            if m.max_quantity.is_some_and(|max| q.abs() > max) {
                return Kind::Rejected(RejectReason::QuantityOutOfRange);
            }
            if let Some(c) = e.cost {
                if decimal::parse("provider_cost", c).is_err() {
                    return Kind::Rejected(RejectReason::BadProviderCost);
                }
            }
            seen.insert(key, e.time);
            Kind::Accepted
        })();
        if k == Kind::Accepted {
            accepted.push(e.clone());
            now = Some(now.map_or(e.time, |n| n.max(e.time)));
        }
        kinds.push(k);
    }
    Reference { kinds, accepted }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Total {
    pub(super) value: Decimal,
    pub(super) event_count: i64,
    pub(super) provider_cost: Decimal,
}

pub(super) fn dim<'a>(e: &'a Ev, k: &str) -> &'a str {
    e.dims.iter().find(|(n, _)| *n == k).map_or("", |(_, v)| v)
}

pub(super) fn window_key(m: &MeterDef, e: &Ev) -> WinKey {
    (
        m.name.clone(),
        e.tenant.to_string(),
        m.group_by.iter().map(|g| (g.clone(), dim(e, g).to_string())).collect(),
        m.window_start(e.time),
    )
}

pub(super) fn reference_totals(accepted: &[Ev], cat: &MeterCatalog) -> BTreeMap<WinKey, Total> {
    let mut groups: BTreeMap<WinKey, Vec<&Ev>> = BTreeMap::new();
    for e in accepted {
        let m = cat.get(e.meter).unwrap();
        groups.entry(window_key(m, e)).or_default().push(e);
    }
    groups
        .into_iter()
        .map(|(k, evs)| {
            let m = cat.get(&k.0).unwrap();
            let qs: Vec<Decimal> = evs.iter().map(|e| Decimal::from_str(e.quantity).unwrap()).collect();
            let sum: Decimal = qs.iter().sum();
            let value = match m.aggregation {
                Aggregation::Sum => sum,
                Aggregation::Count => Decimal::from(evs.len()),
                Aggregation::Min => *qs.iter().min().unwrap(),
                Aggregation::Max => *qs.iter().max().unwrap(),
                Aggregation::Avg => decimal::round_amount(sum / Decimal::from(evs.len())),
                Aggregation::UniqueCount => {
                    let u = m.unique_dimension.as_deref().unwrap();
                    Decimal::from(evs.iter().map(|e| dim(e, u)).collect::<HashSet<_>>().len())
                }
                Aggregation::Latest => {
                    let e = evs.iter().max_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id))).unwrap();
                    Decimal::from_str(e.quantity).unwrap()
                }
            };
            let provider_cost = evs
                .iter()
                .filter_map(|e| e.cost.map(|c| Decimal::from_str(c).unwrap()))
                .sum();
            (k, Total { value, event_count: evs.len() as i64, provider_cost })
        })
        .collect()
}

/// What a consumer rebuilds from the aggregates, checking revision order on the way. Returns
/// (highest revision per window, sum of deltas per window).
pub(super) type Totals = BTreeMap<WinKey, Total>;

pub(super) fn consumer_totals(out: &[MeterAggregate]) -> Result<(Totals, Totals), TestCaseError> {
    let mut latest: BTreeMap<WinKey, (i32, Total)> = BTreeMap::new();
    let mut deltas: BTreeMap<WinKey, Total> = BTreeMap::new();
    for (i, a) in out.iter().enumerate() {
        prop_assert_eq!(a.seq, i as i64 + 1, "seq is dense from 1");
        let key = (a.meter.clone(), a.tenant.clone(), a.dimensions.clone(), a.window_start);
        let expected_rev = latest.get(&key).map_or(0, |(r, _)| r + 1);
        prop_assert_eq!(a.revision, expected_rev, "revisions of {:?} go 0, 1, 2, …", key);
        if let Some((_, prev)) = latest.get(&key) {
            prop_assert_eq!(a.previous_value, prev.value);
            prop_assert_eq!(a.previous_provider_cost, prev.provider_cost);
        } else {
            prop_assert_eq!(a.previous_value, Decimal::ZERO);
        }
        prop_assert!(a.emitted_at >= a.window_end, "closed windows only");
        let total = Total { value: a.value, event_count: a.event_count, provider_cost: a.provider_cost };
        latest.insert(key.clone(), (a.revision, total));
        let d = deltas.entry(key).or_insert(Total {
            value: Decimal::ZERO,
            event_count: a.event_count,
            provider_cost: Decimal::ZERO,
        });
        d.value += a.value - a.previous_value;
        d.provider_cost += a.provider_cost - a.previous_provider_cost;
        d.event_count = a.event_count;
    }
    Ok((latest.into_iter().map(|(k, (_, t))| (k, t)).collect(), deltas))
}
