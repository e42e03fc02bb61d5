//! The deduplicator's section of the engine snapshot.

use super::table::{key_of, Table};
use super::{ColdGroup, DedupConfig, DedupStats, Deduplicator, BUCKET_BITS, BUCKET_MASK};
use crate::engine::snapshot::{Reader, Writer};
use crate::{Error, Result};

impl Deduplicator {
    pub(crate) fn write_snapshot(&self, w: &mut Writer) {
        w.u128(self.key);
        w.i64(self.cfg.bucket_ms);
        w.opt_i64(self.now);
        w.i64(self.cold_below);
        self.stats.write(w);
        w.i64(self.base);
        // Sorted entries, raw little-endian, 16 bytes per id.
        w.len(self.table.len);
        for e in self.table.iter() {
            w.u128(e);
        }
        let mut side: Vec<(u128, i64)> = self.side.iter().map(|(&k, &b)| (k, b)).collect();
        side.sort_unstable();
        w.len(side.len());
        for (k, b) in side {
            w.u128(k);
            w.i64(b);
        }
        w.len(self.cold.len());
        for g in self.cold.iter().chain(std::iter::once(&self.late)) {
            w.i64(g.min_bucket);
            w.i64(g.max_bucket);
            w.len(g.fps.len());
            for &fp in &g.fps {
                w.u32(fp);
            }
        }
    }

    pub(crate) fn read_snapshot(cfg: DedupConfig, r: &mut Reader<'_>) -> Result<Self> {
        let key = r.u128()?;
        let mut d = Self::with_key(cfg, key)?;
        let bucket_ms = r.i64()?;
        if bucket_ms != d.cfg.bucket_ms {
            return Err(Error::Snapshot(format!(
                "dedup bucket size changed from {bucket_ms} ms to {} ms",
                d.cfg.bucket_ms
            )));
        }
        d.now = r.opt_i64()?;
        d.floor_b = d.compute_floor_bucket();
        d.cold_below = r.i64()?;
        d.stats = DedupStats::read(r)?;
        d.base = r.i64()?;
        let n = r.len(16)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let e = r.u128()?;
            if e & (1 << BUCKET_BITS) == 0 || entries.last().is_some_and(|&l: &u128| l & !BUCKET_MASK >= e & !BUCKET_MASK) {
                return Err(Error::Snapshot("dedup ids not strictly sorted".into()));
            }
            let rel = (e & BUCKET_MASK) as usize;
            if d.counts.len() <= rel {
                d.counts.resize(rel + 1, 0);
            }
            d.counts[rel] += 1;
            entries.push(e);
        }
        d.table = Table::with_sorted(&entries);
        let n = r.len(24)?;
        for _ in 0..n {
            let k = r.u128()?;
            let b = r.i64()?;
            if k != key_of(k) || d.side.insert(k, b).is_some() {
                return Err(Error::Snapshot("dedup side entries invalid".into()));
            }
        }
        let n = r.len(20)?;
        let mut groups = Vec::with_capacity(n + 1);
        for _ in 0..=n {
            let min_bucket = r.i64()?;
            let max_bucket = r.i64()?;
            let k = r.len(4)?;
            let mut fps = Vec::with_capacity(k);
            for _ in 0..k {
                fps.push(r.u32()?);
            }
            if fps.windows(2).any(|w| w[0] > w[1]) {
                return Err(Error::Snapshot("dedup cold fingerprints not sorted".into()));
            }
            groups.push(ColdGroup { min_bucket, max_bucket, fps });
        }
        d.late = groups.pop().expect("n + 1 groups");
        d.cold = groups;
        Ok(d)
    }

    /// Reads the dedup section of a version-1 snapshot (ids keyed by `(tenant, event_id)`
    /// without the meter, in per-minute buckets). Those hashes cannot be re-keyed with the
    /// meter, so a non-empty version-1 dedup state is refused: restoring it would forget ids
    /// and count their retries twice.
    pub(crate) fn read_snapshot_v1(cfg: DedupConfig, r: &mut Reader<'_>) -> Result<Self> {
        let key = r.u128()?;
        let _bucket_ms = r.i64()?;
        let cold_below = r.i64()?;
        let now = r.opt_i64()?;
        for _ in 0..5 {
            r.u64()?;
        }
        let n = r.len(9)?;
        let mut ids = 0usize;
        for _ in 0..n {
            r.i64()?;
            r.bool()?;
            let count = r.len(16)?;
            r.take(count * 16)?;
            ids += count;
        }
        if ids > 0 || cold_below != i64::MIN {
            return Err(Error::Snapshot(format!(
                "snapshot version 1 remembers {ids} event ids keyed by (tenant, event_id); this build keys \
                 dedup by (tenant, meter, event_id) and cannot convert them without losing exactness: \
                 drain the partition with the previous build (or start it from a fresh checkpoint after \
                 the dedup horizon) before upgrading"
            )));
        }
        let mut d = Self::with_key(cfg, key)?;
        d.now = now;
        d.floor_b = d.compute_floor_bucket();
        Ok(d)
    }
}

impl DedupStats {
    /// The counters as snapshots and deltas carry them.
    pub(super) fn write(&self, w: &mut Writer) {
        let s = self;
        for v in [s.cold_lookups, s.cold_misses, s.compactions, s.evicted_buckets, s.evicted_ids, s.expired_ids] {
            w.u64(v);
        }
    }

    pub(super) fn read(r: &mut Reader<'_>) -> Result<Self> {
        Ok(Self {
            cold_lookups: r.u64()?,
            cold_misses: r.u64()?,
            compactions: r.u64()?,
            evicted_buckets: r.u64()?,
            evicted_ids: r.u64()?,
            expired_ids: r.u64()?,
        })
    }
}
