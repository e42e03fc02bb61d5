//! Compaction: purging expired ids and evicting the oldest hot buckets to the cold tier.

use super::*;

impl Deduplicator {
    /// Drops expired ids and, with `evict`, moves the oldest buckets to the cold tier until
    /// at most 7/8 of `hot_max_ids` remain. A linear pass over the (sorted) table.
    pub(super) fn compact<C: ColdStore + ?Sized>(&mut self, evict: bool, cold: &mut C) {
        self.stats.compactions += 1;
        let floor_b = self.floor_bucket();
        // Eviction cut: the lowest bucket kept. Whole buckets, newest first, while they fit.
        let mut cut = floor_b;
        if evict {
            let mut per_bucket: std::collections::BTreeMap<i64, u64> = self
                .counts
                .iter()
                .enumerate()
                .filter(|&(_, &c)| c > 0)
                .map(|(i, &c)| (self.base + i as i64, u64::from(c)))
                .collect();
            for &b in self.side.values() {
                *per_bucket.entry(b).or_default() += 1;
            }
            let target = (self.cfg.hot_max_ids - self.cfg.hot_max_ids / 8) as u64;
            let mut kept = 0u64;
            for (&b, &c) in per_bucket.range(floor_b..).rev() {
                if kept + c > target {
                    cut = b + 1;
                    break;
                }
                kept += c;
            }
        }
        let new_base = if floor_b == i64::MIN { self.base } else { floor_b };
        let mut kept: Vec<u128> = Vec::with_capacity(self.table.len);
        let mut side = HashMap::new();
        let mut evicted = empty_group();
        let mut evicted_buckets = std::collections::BTreeSet::new();
        let mut visit = |key: u128, b: i64, kept: &mut Vec<u128>, stats: &mut DedupStats| {
            if b < floor_b {
                stats.expired_ids += 1;
            } else if b < cut {
                evicted.fps.push(fp_of(key));
                evicted.min_bucket = evicted.min_bucket.min(b);
                evicted.max_bucket = evicted.max_bucket.max(b);
                evicted_buckets.insert(b);
            } else if (0..BUCKET_SPAN).contains(&(b - new_base)) {
                kept.push(key | (b - new_base) as u128);
            } else {
                side.insert(key, b);
            }
        };
        let base = self.base;
        for e in self.table.iter() {
            visit(e & !BUCKET_MASK, base + (e & BUCKET_MASK) as i64, &mut kept, &mut self.stats);
        }
        let mut side_old: Vec<(u128, i64)> = self.side.drain().collect();
        side_old.sort_unstable();
        let had_side = !side_old.is_empty();
        for (k, b) in side_old {
            visit(k, b, &mut kept, &mut self.stats);
        }
        if had_side {
            // Side entries that now fit the table were appended out of order.
            kept.sort_unstable();
        }
        self.base = new_base;
        self.counts.clear();
        for &e in &kept {
            let rel = (e & BUCKET_MASK) as usize;
            if self.counts.len() <= rel {
                self.counts.resize(rel + 1, 0);
            }
            self.counts[rel] += 1;
        }
        self.table = Table::with_sorted(&kept);
        self.side = side;
        if !evicted.fps.is_empty() {
            evicted.fps.sort_unstable();
            let n = evicted.fps.len();
            self.stats.evicted_ids += n as u64;
            self.stats.evicted_buckets += evicted_buckets.len() as u64;
            self.cold_below = self.cold_below.max(cut);
            self.push_cold(evicted);
            cold.evicted(self.cold_below.saturating_mul(self.cfg.bucket_ms), n);
        }
        self.drop_expired_cold(floor_b);
    }

    /// Adds a group of cold fingerprints, merging the adjacent pair with the fewest ids while
    /// there are too many groups.
    pub(super) fn push_cold(&mut self, g: ColdGroup) {
        let at = self.cold.partition_point(|x| x.min_bucket <= g.min_bucket);
        self.cold.insert(at, g);
        while self.cold.len() > MAX_COLD_GROUPS {
            let i = (0..self.cold.len() - 1)
                .min_by_key(|&i| self.cold[i].fps.len() + self.cold[i + 1].fps.len())
                .expect("at least two groups");
            let b = self.cold.remove(i + 1);
            let a = &mut self.cold[i];
            a.fps = merge_u32(&a.fps, &b.fps);
            a.min_bucket = a.min_bucket.min(b.min_bucket);
            a.max_bucket = a.max_bucket.max(b.max_bucket);
        }
    }

    pub(super) fn drop_expired_cold(&mut self, floor_b: i64) {
        self.cold.retain(|g| g.max_bucket >= floor_b);
        if !self.late.fps.is_empty() && self.late.max_bucket < floor_b {
            self.late = empty_group();
        }
    }
}
