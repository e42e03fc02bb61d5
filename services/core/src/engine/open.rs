//! Provisional totals: the running totals of open windows, for real-time balances.
//!
//! A window's final aggregate exists only once it closes (its end plus the meter's allowed
//! lateness, 60-70 s after the usage for one-minute windows). Spend control cannot wait that
//! long, so on each flush the aggregator asks the engine which open windows changed since the
//! previous call and publishes their running totals. They are not part of the exactly-once
//! protocol: nothing is checkpointed about them, a restored engine starts with none touched,
//! and the value is the one the window's final aggregate would carry if it closed now.

use crate::records::ProvisionalTotal;

use super::PartitionEngine;

impl PartitionEngine {
    /// The open windows changed since the previous call (in the order they were first
    /// touched), as provisional totals stamped with `published_at`; resets their marks.
    /// Windows that closed meanwhile are left out: their final aggregate settles them.
    pub fn take_provisional(&mut self, published_at: i64) -> Vec<ProvisionalTotal> {
        let slots = std::mem::take(&mut self.touched);
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            let Some(w) = self.slab.get_mut(slot as usize).and_then(Option::as_mut) else { continue };
            if !w.touched {
                continue; // a stale slot (reused, or listed before): already reported
            }
            w.touched = false;
            if w.closed {
                continue;
            }
            let m = &self.meters[usize::from(w.key.meter)].def;
            let window_end = w.key.window_start + m.window_ms;
            out.push(ProvisionalTotal {
                tenant: w.key.tenant().to_owned(),
                meter: m.name.clone(),
                aggregation: m.aggregation.as_str().to_owned(),
                dimensions: m.group_by.iter().cloned().zip(w.key.dims().map(str::to_owned)).collect(),
                window_start: w.key.window_start,
                window_end,
                closes_at: window_end.saturating_add(m.allowed_lateness_ms),
                value: w.value(m.aggregation),
                event_count: w.event_count,
                source_partition: self.partition,
                as_of_offset: self.next_offset,
                published_at,
            });
        }
        out
    }

    /// Drops stale entries of the touched list when nobody takes provisional totals (an
    /// engine used without them, e.g. in benchmarks), so the list stays bounded by the
    /// windows in memory.
    pub(super) fn compact_touched(&mut self) {
        if self.touched.len() <= 2 * self.slab.len() + 1024 {
            return;
        }
        let slab = &self.slab;
        self.touched.retain(|&s| slab[s as usize].as_ref().is_some_and(|w| w.touched && !w.closed));
        self.touched.sort_unstable();
        self.touched.dedup();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rust_decimal::Decimal;

    use crate::engine::{EngineConfig, MemoryStore, PartitionEngine};
    use crate::event::UsageEventRef;
    use crate::meter::MeterCatalog;

    const METERS: &str = r#"
[[meter]]
name = "tokens"
aggregation = "sum"
window = "minute"
allowed_lateness = "10s"
group_by = ["model"]
"#;

    fn ev<'a>(id: &'a str, t: i64, q: &'a str, model: &'a str) -> UsageEventRef<'a> {
        UsageEventRef {
            event_id: id,
            tenant: "t1",
            meter: "tokens",
            event_time_ms: t,
            quantity: q,
            dimensions: vec![("model", model)],
            provider_cost: None,
            source: "",
        }
    }

    #[test]
    fn lists_changed_open_windows_once_and_never_closed_ones() {
        let cat = Arc::new(MeterCatalog::from_toml_str(METERS).unwrap());
        let mut e = PartitionEngine::with_dedup_key(cat.clone(), EngineConfig::default(), 0, 7).unwrap();
        let mut store = MemoryStore::new(&cat);
        let base: i64 = 1_800_000_000_000; // a minute boundary
        e.on_event(0, &ev("a", base + 1, "2", "x"), &mut store).unwrap();
        e.on_event(1, &ev("b", base + 2, "3", "x"), &mut store).unwrap();
        e.on_event(2, &ev("c", base + 3, "5", "y"), &mut store).unwrap();
        let p = e.take_provisional(42);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!((p[0].dimensions["model"].as_str(), p[0].value, p[0].event_count), ("x", Decimal::from(5), 2));
        assert_eq!((p[1].dimensions["model"].as_str(), p[1].value, p[1].as_of_offset), ("y", Decimal::from(5), 3));
        assert_eq!(p[0].closes_at, base + 70_000);
        assert!(e.take_provisional(43).is_empty(), "nothing changed since");
        e.on_event(3, &ev("d", base + 4, "1", "x"), &mut store).unwrap();
        let p = e.take_provisional(44);
        assert_eq!((p.len(), p[0].value, p[0].as_of_offset), (1, Decimal::from(6), 4));
        // Touched, then closed before the next take: its final aggregate settles it instead.
        e.on_event(4, &ev("e", base + 5, "1", "y"), &mut store).unwrap();
        e.on_event(5, &ev("f", base + 70_000, "1", "z"), &mut store).unwrap();
        assert_eq!(e.drain_output().count(), 2, "x and y closed");
        let p = e.take_provisional(45);
        assert_eq!(p.iter().map(|p| p.dimensions["model"].as_str()).collect::<Vec<_>>(), vec!["z"]);
    }
}
