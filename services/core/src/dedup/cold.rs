//! The cold tier's fingerprint groups: sorted 32-bit fingerprints searched without I/O.

/// Sorted 32-bit fingerprints of cold ids with the range of their buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ColdGroup {
    pub(super) min_bucket: i64,
    pub(super) max_bucket: i64,
    pub(super) fps: Vec<u32>,
}

impl ColdGroup {
    pub(super) fn contains(&self, fp: u32) -> bool {
        search_u32(&self.fps, fp)
    }
}

/// Interpolation search (the fingerprints are uniform), falling back to binary search.
pub(super) fn search_u32(v: &[u32], x: u32) -> bool {
    let (mut lo, mut hi) = (0usize, v.len());
    let mut rounds = 0;
    while hi - lo > 8 && rounds < 4 {
        rounds += 1;
        let (a, b) = (u64::from(v[lo]), u64::from(v[hi - 1]));
        let x64 = u64::from(x);
        if x64 < a || x64 > b {
            return false;
        }
        let guess = lo + ((x64 - a) * (hi - 1 - lo) as u64 / (b - a).max(1)) as usize;
        match v[guess].cmp(&x) {
            std::cmp::Ordering::Equal => return true,
            std::cmp::Ordering::Less => lo = guess + 1,
            std::cmp::Ordering::Greater => hi = guess,
        }
    }
    v[lo..hi].binary_search(&x).is_ok()
}

pub(super) fn merge_u32(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

pub(super) fn empty_group() -> ColdGroup {
    ColdGroup {
        min_bucket: i64::MAX,
        max_bucket: i64::MIN,
        fps: Vec::new(),
    }
}
