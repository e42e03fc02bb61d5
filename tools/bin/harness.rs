//! What `meterflow-bench` and `meterflow-chaos` share (`mod harness;` in both): a private
//! broker + ClickHouse started through `deploy/local/services.sh` on free ports with their own
//! state dir (so restarting the broker or stopping ClickHouse never disturbs anybody using the
//! shared instances on 9092/8123), and the services' environments. The processes themselves
//! run under `meterflow_testkit::procs`.

// Each binary uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result};
use meterflow_testkit::http::free_port;
use meterflow_testkit::procs::{repo_root, service_env};
use meterflow_runtime::args::{ClickHouseArgs, KafkaArgs, TopicArgs};

/// Seconds since `t` with millisecond precision, for timelines.
pub fn secs(t: Instant) -> f64 {
    (t.elapsed().as_millis() as f64) / 1000.0
}

/// The 1/5/15-minute load averages, as `/proc/loadavg` shows them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// A broker and a ClickHouse of our own. Dropping it stops both; the state dir is removed
/// unless `keep` is set (logs stay readable after a failure).
#[derive(Debug)]
pub struct Stack {
    pub state: PathBuf,
    pub broker_port: u16,
    pub ch_http_port: u16,
    pub ch_tcp_port: u16,
    /// `memory` or `sqlite`.
    pub storage: String,
    pub keep: bool,
}

impl Stack {
    /// Starts a broker with `storage` and a ClickHouse under a fresh `state` dir.
    pub fn start(state: &Path, storage: &str) -> Result<Self> {
        let _ = std::fs::remove_dir_all(state);
        std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
        let state = state.canonicalize()?;
        let stack = Self {
            state,
            broker_port: free_port()?,
            ch_http_port: free_port()?,
            ch_tcp_port: free_port()?,
            storage: storage.to_owned(),
            keep: false,
        };
        stack.services("start", "broker")?;
        stack.services("start", "clickhouse")?;
        Ok(stack)
    }

    /// `deploy/local/services.sh ACTION COMPONENT` against this stack (blocks; `start` waits
    /// until the component answers).
    pub fn services(&self, action: &str, component: &str) -> Result<()> {
        let script = repo_root().join("deploy/local/services.sh");
        let out = Command::new("bash")
            .arg(&script)
            .args([action, component])
            .env("METERFLOW_STATE", &self.state)
            .env("METERFLOW_BROKER_STORAGE", &self.storage)
            .env("METERFLOW_BROKER_PORT", self.broker_port.to_string())
            .env("METERFLOW_CLICKHOUSE_HTTP_PORT", self.ch_http_port.to_string())
            .env("METERFLOW_CLICKHOUSE_TCP_PORT", self.ch_tcp_port.to_string())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "services.sh {action} {component} (state {}) failed: {}\n{}{}",
            self.state.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.broker_port)
    }

    pub fn clickhouse_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ch_http_port)
    }

    /// Points meterflow-testkit (`TestEnv`) at this stack. Must run before any other thread
    /// exists (call it from `main` before building the tokio runtime).
    pub fn export_env(&self) {
        std::env::set_var("METERFLOW_KAFKA_BROKERS", self.brokers());
        std::env::set_var("METERFLOW_CLICKHOUSE_URL", self.clickhouse_url());
        std::env::remove_var("METERFLOW_KAFKA_PROPERTIES");
    }

    /// Pid of one of the stack's components (`broker`, `clickhouse`), from its pid file.
    pub fn pid(&self, component: &str) -> Option<u32> {
        std::fs::read_to_string(self.state.join(component).join(format!("{component}.pid"))).ok()?.trim().parse().ok()
    }

    pub fn describe(&self) -> String {
        format!(
            "broker 127.0.0.1:{} ({} storage), ClickHouse {}; state {}",
            self.broker_port,
            self.storage,
            self.clickhouse_url(),
            self.state.display()
        )
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.services("stop", "clickhouse");
        let _ = self.services("stop", "broker");
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.state);
        }
    }
}

/// Environment of an aggregator process on `kafka`/`topics`/`ch`.
pub fn aggregator_env(
    kafka: &KafkaArgs,
    topics: &TopicArgs,
    ch: &ClickHouseArgs,
    group: &str,
    http: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let meters = repo_root().join("config/meters.toml").display().to_string();
    let own = [
        ("METERFLOW_AGGREGATOR_GROUP", group),
        ("METERFLOW_AGGREGATOR_HTTP_ADDR", http),
        ("METERFLOW_METERS", &meters),
        ("METERFLOW_LOG", "info"),
    ];
    with_overrides(service_env(kafka, topics, ch), own.iter().chain(extra))
}

/// `env` with each `(key, value)` of `overrides` replacing any earlier value of its key.
fn with_overrides<'a>(mut env: Vec<(String, String)>, overrides: impl Iterator<Item = &'a (&'a str, &'a str)>) -> Vec<(String, String)> {
    for (k, v) in overrides {
        env.retain(|(key, _)| key != k);
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    env
}

/// Environment of a rater process.
pub fn rater_env(
    kafka: &KafkaArgs,
    topics: &TopicArgs,
    ch: &ClickHouseArgs,
    group: &str,
    http: &str,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let catalog = repo_root().join("config/catalog.toml").display().to_string();
    let own = [
        ("METERFLOW_RATER_GROUP", group),
        ("METERFLOW_RATER_HTTP_ADDR", http),
        ("METERFLOW_CATALOG", &catalog),
        ("METERFLOW_LOG", "info"),
    ];
    with_overrides(service_env(kafka, topics, ch), own.iter().chain(extra))
}

/// CPU seconds (user + system) process `pid` has used so far (`/proc/<pid>/stat`, clock
/// ticks of 1/100 s).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Directory for logs of one run (`target/<what>/logs`).
pub fn log_dir(what: &str) -> Result<PathBuf> {
    let dir = repo_root().join("target").join(what).join("logs");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
