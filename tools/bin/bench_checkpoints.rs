//! The checkpoint rows of the bench: time and size of delta checkpoints at 1M, 5M and 10M
//! events read, and of the full ones (compactions) separately, from the aggregator's
//! `checkpoint_seconds{kind}`, `checkpoints_total{kind}` and `checkpoint_bytes_total{kind}`.

use super::*;

/// Checkpoint counters of one scrape, per kind.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counters {
    /// Seconds summed over checkpoint batches, and batches.
    secs: f64,
    batches: f64,
    /// State bytes summed over partition checkpoints, and partition checkpoints.
    bytes: f64,
    parts: f64,
}

/// One kind's checkpoint: seconds per batch and state bytes per partition.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cost {
    pub(super) secs: f64,
    pub(super) bytes: f64,
}

/// The first delta and the first full checkpoint completed after `events` were read.
#[derive(Debug, Clone, Copy)]
pub(super) struct AtMark {
    pub(super) events: u64,
    pub(super) delta: Option<Cost>,
    pub(super) full: Option<Cost>,
}

/// Sum of the series of `name` with `kind="<kind>"`.
fn kind_sum(text: &str, name: &str, kind: &str) -> f64 {
    let label = format!("kind=\"{kind}\"");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn counters(text: &str, kind: &str) -> Counters {
    Counters {
        secs: kind_sum(text, "meterflow_aggregator_checkpoint_seconds_sum", kind),
        batches: kind_sum(text, "meterflow_aggregator_checkpoint_seconds_count", kind),
        bytes: kind_sum(text, "meterflow_aggregator_checkpoint_bytes_total", kind),
        parts: kind_sum(text, "meterflow_aggregator_checkpoints_total", kind),
    }
}

fn cost(before: Counters, now: Counters) -> Option<Cost> {
    (now.batches > before.batches && now.parts > before.parts).then(|| Cost {
        secs: (now.secs - before.secs) / (now.batches - before.batches),
        bytes: (now.bytes - before.bytes) / (now.parts - before.parts),
    })
}

/// Follows the scrapes of one run and records the checkpoints after each mark.
#[derive(Debug, Default)]
pub(super) struct Tracker {
    last: [Counters; 2],
    waiting: Option<AtMark>,
    pub(super) marks: Vec<AtMark>,
    /// Full checkpoints over the whole run (total, for the mean).
    pub(super) full_total: Counters,
}

impl Tracker {
    /// One scrape: `reached` is the mark just passed, if any.
    pub(super) fn scrape(&mut self, text: &str, reached: Option<u64>) {
        let now = [counters(text, "delta"), counters(text, "full")];
        if let Some(w) = self.waiting.as_mut() {
            w.delta = w.delta.or_else(|| cost(self.last[0], now[0]));
            w.full = w.full.or_else(|| cost(self.last[1], now[1]));
        }
        self.last = now;
        self.full_total = now[1];
        if let Some(events) = reached {
            self.marks.extend(self.waiting.take());
            self.waiting = Some(AtMark { events, delta: None, full: None });
        }
    }

    /// The mark still waiting counts with what it saw.
    pub(super) fn finish(&mut self) {
        self.marks.extend(self.waiting.take());
    }
}

/// KiB below a MiB (deltas are small), else MiB.
fn human_bytes(b: f64) -> String {
    if b < 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        mib(b as u64)
    }
}

/// The checkpoint rows and the goal "delta checkpoint time independent of state size".
pub(super) fn report_checkpoints(report: &mut Report, t: &Tracker, partitions: i32) {
    let ms = |c: Option<Cost>| c.map_or("none yet".to_owned(), |c| format!("{:.0} ms", c.secs * 1e3));
    let size = |c: Option<Cost>| c.map_or(String::new(), |c| format!(", {} per partition", human_bytes(c.bytes)));
    for m in &t.marks {
        report.row(
            "checkpoint",
            format!("delta checkpoint after {} events (snapshot + fencing check + save, {partitions} partitions)", fmt_rate(m.events as f64)),
            ms(m.delta),
            format!("the first delta completed after that many records were read{}", size(m.delta)),
        );
        report.row(
            "checkpoint",
            format!("full checkpoint (compaction) after {} events", fmt_rate(m.events as f64)),
            ms(m.full),
            format!("the first full one after that point, if any before the next mark{}", size(m.full)),
        );
    }
    let f = t.full_total;
    if f.batches > 0.0 {
        report.row(
            "checkpoint",
            "full checkpoints over the run (a base every --checkpoint-full-every deltas or past --checkpoint-full-ratio)",
            format!("{:.0} ms", f.secs / f.batches * 1e3),
            format!("mean of {:.0}; {} per partition on average", f.batches, human_bytes(f.bytes / f.parts.max(1.0))),
        );
    }
    let deltas: Vec<(u64, Cost)> = t.marks.iter().filter_map(|m| Some((m.events, m.delta?))).collect();
    match (deltas.first(), deltas.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => report.goal(
            "checkpoint time independent of state size (delta checkpoints)",
            format!("{:.0} ms at {} events, {:.0} ms at {} events", a.1.secs * 1e3, fmt_rate(a.0 as f64), b.1.secs * 1e3, fmt_rate(b.0 as f64)),
            Some(b.1.secs <= 1.5 * a.1.secs),
        ),
        _ => report.goal(
            "checkpoint time independent of state size (delta checkpoints)",
            "needs --events >= 5000000 (marks 1M, 5M, 10M) and a delta after two of them",
            None,
        ),
    }
}
