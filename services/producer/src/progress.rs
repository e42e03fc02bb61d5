//! Progress reporting for long generator runs: a bar for a person at a terminal, a log line
//! every few seconds for CI logs and files (where a redrawn bar would be noise).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How [`crate::generate`] reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing (tests, benches).
    Hidden,
    /// An indicatif bar on stderr.
    Bar,
    /// An `info` log line at this interval.
    Lines(Duration),
}

impl Progress {
    /// A bar if stderr is a terminal, otherwise a line every 5 seconds.
    pub fn auto() -> Self {
        if std::io::stderr().is_terminal() {
            Progress::Bar
        } else {
            Progress::Lines(Duration::from_secs(5))
        }
    }
}

/// The live reporter of one run.
#[derive(Debug)]
pub(crate) struct Reporter {
    mode: Progress,
    bar: Option<ProgressBar>,
    total_events: Option<u64>,
    total_duration: Option<Duration>,
    started: Instant,
    last_line: Instant,
    last_sent: u64,
}

impl Reporter {
    pub(crate) fn new(mode: Progress, total_events: Option<u64>, total_duration: Option<Duration>) -> Self {
        let bar = (mode == Progress::Bar).then(|| {
            let len = total_events.unwrap_or(0);
            let bar = ProgressBar::with_draw_target(total_events, ProgressDrawTarget::stderr_with_hz(4));
            let template = if len > 0 {
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events ({per_sec}, eta {eta}) {msg}"
            } else {
                "{spinner} [{elapsed_precise}] {human_pos} events ({per_sec}) {msg}"
            };
            bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
            bar
        });
        let now = Instant::now();
        Self {
            mode,
            bar,
            total_events,
            total_duration,
            started: now,
            last_line: now,
            last_sent: 0,
        }
    }

    /// Called every so often with the number of messages handed over so far.
    pub(crate) fn update(&mut self, sent: u64, in_flight: usize, errors: u64) {
        match self.mode {
            Progress::Hidden => {}
            Progress::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(sent);
                    if errors > 0 {
                        bar.set_message(format!("in flight {in_flight}, {errors} send errors"));
                    } else {
                        bar.set_message(format!("in flight {in_flight}"));
                    }
                }
            }
            Progress::Lines(every) => {
                let now = Instant::now();
                let since = now.duration_since(self.last_line);
                if since < every {
                    return;
                }
                let rate = (sent - self.last_sent) as f64 / since.as_secs_f64();
                let of = match (self.total_events, self.total_duration) {
                    (Some(n), _) => format!("/{n}"),
                    (None, Some(d)) => format!(" ({:.0}s of {}s)", self.started.elapsed().as_secs_f64(), d.as_secs()),
                    (None, None) => String::new(),
                };
                tracing::info!("sent {sent}{of} events, {rate:.0} events/s, {in_flight} in flight, {errors} send errors");
                self.last_line = now;
                self.last_sent = sent;
            }
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
