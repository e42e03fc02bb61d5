//! The result of a `meterflow-bench` run: table rows, the goals judged, notes, and
//! their markdown.

use std::fmt::Write as _;

/// One line of the result table.
struct Row {
    area: &'static str,
    metric: String,
    value: String,
    note: String,
}

/// One goal of the issue, judged.
struct Goal {
    goal: &'static str,
    measured: String,
    met: Option<bool>,
}

#[derive(Default)]
pub(crate) struct Report {
    rows: Vec<Row>,
    goals: Vec<Goal>,
    notes: Vec<String>,
}

impl Report {
    pub(crate) fn row(&mut self, area: &'static str, metric: impl Into<String>, value: impl Into<String>, note: impl Into<String>) {
        let r = Row { area, metric: metric.into(), value: value.into(), note: note.into() };
        println!("  [{}] {}: {} {}", r.area, r.metric, r.value, r.note);
        self.rows.push(r);
    }

    pub(crate) fn goal(&mut self, goal: &'static str, measured: impl Into<String>, met: Option<bool>) {
        self.goals.push(Goal { goal, measured: measured.into(), met });
    }

    pub(crate) fn note(&mut self, n: impl Into<String>) {
        let n = n.into();
        println!("  note: {n}");
        self.notes.push(n);
    }

    pub(crate) fn markdown(&self, header: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# meterflow benchmark\n\n{header}\n");
        let _ = writeln!(s, "| area | metric | value | notes |\n| --- | --- | ---: | --- |");
        for r in &self.rows {
            let _ = writeln!(s, "| {} | {} | {} | {} |", r.area, r.metric, r.value, r.note.replace('|', "\\|"));
        }
        let _ = writeln!(s, "\n## Goals\n\n| goal | measured | status |\n| --- | --- | --- |");
        for g in &self.goals {
            let status = match g.met {
                Some(true) => "met",
                Some(false) => "**not met**",
                None => "not measured",
            };
            let _ = writeln!(s, "| {} | {} | {status} |", g.goal, g.measured.replace('|', "\\|"));
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }
}

pub(crate) fn fmt_rate(r: f64) -> String {
    let r = r.round() as u64;
    let s = r.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
}
