//! The hot tier: an ordered linear-probing table of 111-bit keys (see the parent module docs).

use super::{BUCKET_BITS, BUCKET_MASK};

/// The hot key of a hash: the kept 111 bits, low 16 bits zero, never zero.
#[inline]
pub(super) fn key_of(hash: u128) -> u128 {
    (hash | (1 << BUCKET_BITS)) & !BUCKET_MASK
}

/// The cold fingerprint of a key.
#[inline]
pub(super) fn fp_of(key: u128) -> u32 {
    (key >> 96) as u32
}

/// Home slot of `key` in a table with `cap` home slots: monotone in the key.
#[inline]
pub(super) fn home(key: u128, cap: usize) -> usize {
    ((u128::from((key >> 64) as u64) * cap as u128) >> 64) as usize
}

/// Tail slots beyond the home range, for clusters that run past the last home slot.
pub(super) fn slack(cap: usize) -> usize {
    64 + cap / 256
}

/// Capacity for `n` entries at load 0.72.
pub(super) fn cap_for(n: usize) -> usize {
    (n * 25 / 18).max(64)
}

/// The hot table: ordered linear probing over uniform keys (see the module docs).
#[derive(Default)]
pub(super) struct Table {
    /// `cap + slack(cap)` slots; 0 is empty. Non-empty slots are sorted and each entry sits
    /// at or after its home slot.
    pub(super) slots: Vec<u128>,
    pub(super) cap: usize,
    pub(super) len: usize,
}

impl Table {
    pub(super) fn with_sorted(entries: &[u128]) -> Self {
        let mut cap = cap_for(entries.len());
        loop {
            let mut slots = vec![0u128; cap + slack(cap)];
            let mut next = 0usize;
            let mut fits = true;
            for &e in entries {
                let at = home(e, cap).max(next);
                if at >= slots.len() {
                    fits = false;
                    break;
                }
                slots[at] = e;
                next = at + 1;
            }
            if fits {
                return Self {
                    slots,
                    cap,
                    len: entries.len(),
                };
            }
            cap += cap / 4;
        }
    }

    /// `Ok(slot)` of the entry with `key`, or `Err(slot)` where it belongs.
    #[inline]
    pub(super) fn find(&self, key: u128) -> std::result::Result<usize, usize> {
        if self.cap == 0 {
            return Err(0);
        }
        let mut i = home(key, self.cap);
        while let Some(&e) = self.slots.get(i) {
            if e == 0 {
                return Err(i);
            }
            let k = e & !BUCKET_MASK;
            if k == key {
                return Ok(i);
            }
            if k > key {
                return Err(i);
            }
            i += 1;
        }
        Err(i)
    }

    /// Inserts an entry whose key is absent, at `at` (from [`Self::find`]).
    pub(super) fn insert_at(&mut self, at: usize, entry: u128) {
        let free = self.slots.get(at..).and_then(|s| s.iter().position(|&e| e == 0)).map(|p| at + p);
        match free {
            Some(end) if (self.len + 1) * 100 <= self.cap * 88 => {
                self.slots.copy_within(at..end, at + 1);
                self.slots[at] = entry;
                self.len += 1;
            }
            _ => {
                // Full (or the cluster reached the end): rebuild larger, a linear pass.
                let mut all: Vec<u128> = Vec::with_capacity(self.len + 1);
                let mut placed = false;
                for &e in self.slots.iter().filter(|&&e| e != 0) {
                    if !placed && e > entry {
                        all.push(entry);
                        placed = true;
                    }
                    all.push(e);
                }
                if !placed {
                    all.push(entry);
                }
                *self = Self::with_sorted(&all);
            }
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = u128> + '_ {
        self.slots.iter().copied().filter(|&e| e != 0)
    }

    pub(super) fn bytes(&self) -> usize {
        self.slots.capacity() * 16
    }
}
