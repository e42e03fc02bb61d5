//! The one supervisor of service processes for the e2e tests, chaos and the bench: build the
//! binary, spawn it with an environment, log to a file, wait for `/healthz`, signal it, stop
//! it and check how it exited. Real processes, so that a test can SIGKILL one at any moment.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use meterflow_runtime::args::{ClickHouseArgs, KafkaArgs, TopicArgs};
pub use rustix::process::Signal;
use rustix::process::{kill_process, Pid};

pub use crate::repo_root;

/// How long a graceful stop (flush, checkpoint) may take before SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(40);

/// The workspace's binary `name`, built next to the running executable (same profile). Always
/// asks cargo: a no-op when up to date, and a stale binary would test old code.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>  or  target/<profile>/<bin>
    let mut dir = exe.parent().context("the executable has no parent dir")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Every meterflow binary lives in the package of the same name.
    cmd.args(["build", "--quiet", "-p", name, "--bin", name]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().with_context(|| format!("running cargo build --bin {name}"))?;
    anyhow::ensure!(status.success(), "cargo build --bin {name} failed");
    anyhow::ensure!(path.exists(), "{} was not built", path.display());
    Ok(path)
}

/// Environment that points a service at the given broker, topics and database.
pub fn service_env(kafka: &KafkaArgs, topics: &TopicArgs, ch: &ClickHouseArgs) -> Vec<(String, String)> {
    let mut env = vec![
        ("METERFLOW_KAFKA_BROKERS", kafka.brokers.clone()),
        ("METERFLOW_USAGE_TOPIC", topics.usage_topic.clone()),
        ("METERFLOW_AGGREGATES_TOPIC", topics.aggregates_topic.clone()),
        ("METERFLOW_DEAD_LETTER_TOPIC", topics.dead_letter_topic.clone()),
        ("METERFLOW_CHARGES_TOPIC", topics.charges_topic.clone()),
        ("METERFLOW_WALLET_TOPIC", topics.wallet_topic.clone()),
        ("METERFLOW_ALERTS_TOPIC", topics.alerts_topic.clone()),
        ("METERFLOW_PROVISIONAL_TOPIC", topics.provisional_topic.clone()),
        ("METERFLOW_BALANCES_TOPIC", topics.balances_topic.clone()),
        ("METERFLOW_CLICKHOUSE_URL", ch.url.clone()),
        ("METERFLOW_CLICKHOUSE_DATABASE", ch.database.clone()),
        ("METERFLOW_CLICKHOUSE_USER", ch.user.clone()),
        ("METERFLOW_CLICKHOUSE_PASSWORD", ch.password.clone()),
    ];
    if !kafka.properties.is_empty() {
        env.push(("METERFLOW_KAFKA_PROPERTIES", kafka.properties.join(",")));
    }
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Turns environment pairs into the command line of a clap parser, so an in-process run is
/// configured exactly like a process (each pair's variable maps to the flag that reads it).
pub fn parse_with_env<P: clap::Parser>(env: &[(String, String)]) -> Result<P> {
    let cmd = P::command();
    let mut args = vec![cmd.get_name().to_owned()];
    for (k, v) in env {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == k.as_str()))
            .with_context(|| format!("{} reads no variable {k}", cmd.get_name()))?;
        let long = arg.get_long().with_context(|| format!("{k} maps to a flag without a long name"))?;
        args.push(format!("--{long}={v}"));
    }
    Ok(P::try_parse_from(args)?)
}

/// One supervised process, restartable with the same command. Dropping it SIGKILLs it.
#[derive(Debug)]
pub struct ServiceProc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    cwd: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    own_group: bool,
    /// How many times it was started.
    pub starts: u32,
}

impl ServiceProc {
    /// The workspace binary `name` (built first), run from the repository root; its output
    /// goes to `log`, appended across restarts.
    pub fn new(name: &str, env: Vec<(String, String)>, log: PathBuf) -> Result<Self> {
        Ok(Self::program(name, bin_path(name)?, Vec::new(), repo_root(), log).with_env(env))
    }

    /// Any other program (Prometheus, ...), with arguments, run in `cwd`.
    pub fn program(name: &str, program: PathBuf, args: Vec<String>, cwd: PathBuf, log: PathBuf) -> Self {
        Self { name: name.to_owned(), program, args, cwd, env: Vec::new(), log, child: None, own_group: false, starts: 0 }
    }

    pub fn with_env(mut self, env: Vec<(String, String)>) -> Self {
        self.env = env;
        self
    }

    /// Starts it in a process group of its own, so that a Ctrl-C in the terminal that ran the
    /// supervisor does not reach it: for services meant to outlive it ([`ServiceProc::detach`]).
    pub fn in_own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    pub fn start(&mut self) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = Command::new(&self.program);
        if self.own_group {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let child = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Leaves the process running when this handle is dropped (the demo's services keep
    /// running after the command that started them; `make demo-stop` stops them by pid).
    /// Returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }

    /// SIGKILL: no flush, no checkpoint, no goodbye.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait (a graceful stop flushes and checkpoints); SIGKILL and an error after
    /// 40 s. The exit status, or `None` if it was not running.
    pub fn terminate(&mut self) -> Result<Option<ExitStatus>> {
        let Some(mut c) = self.child.take() else { return Ok(None) };
        kill_process(Pid::from_child(&c), Signal::TERM).with_context(|| format!("SIGTERM to {}", self.name))?;
        let deadline = Instant::now() + TERMINATE_GRACE;
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                c.kill()?;
                c.wait()?;
                bail!("{} did not stop within {TERMINATE_GRACE:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`ServiceProc::terminate`], and the process must exit with status 0: a service that
    /// fails its graceful shutdown failed.
    pub fn stop(&mut self) -> Result<()> {
        match self.terminate()? {
            Some(status) if !status.success() => {
                bail!("{} exited with {status} after SIGTERM; its log ends:\n{}", self.name, self.log_tail(20))
            }
            _ => Ok(()),
        }
    }

    /// Sends `signal` (e.g. [`Signal::STOP`], [`Signal::CONT`]); false if not running.
    pub fn signal(&self, signal: Signal) -> Result<bool> {
        let Some(c) = self.child.as_ref() else { return Ok(false) };
        kill_process(Pid::from_child(c), signal).with_context(|| format!("{signal:?} to {}", self.name))?;
        Ok(true)
    }

    /// Fails if the process died on its own.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                bail!("{} exited by itself with {status}; its log ends:\n{}", self.name, self.log_tail(20));
            }
        }
        Ok(())
    }

    /// Polls `url` (a service's `/healthz` or `/readyz`) until it answers 200, failing at
    /// once if the process exits meanwhile.
    pub async fn wait_ready(&mut self, url: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if let Ok((200, _)) = crate::http::get(url).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} not ready at {url} after {timeout:?}; its log ends:\n{}", self.name, self.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Resident set size of the process (VmRSS), bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, log: &Path) -> ServiceProc {
        ServiceProc::program("sh", "/bin/sh".into(), vec!["-c".into(), script.into()], std::env::temp_dir(), log.to_owned())
    }

    #[test]
    fn signals_reach_the_process_and_exits_are_checked() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("meterflow-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // Exits 0 on SIGTERM, after saying so.
        let mut p = sh("trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.05; done", &dir.join("a.log"));
        p.start()?;
        std::thread::sleep(Duration::from_millis(300));
        assert!(p.signal(Signal::STOP)?);
        assert!(p.signal(Signal::CONT)?);
        p.check_alive()?;
        p.stop()?;
        assert!(!p.running());
        assert_eq!(p.log_tail(2), "up\nbye");
        assert!(!p.signal(Signal::CONT)?, "nothing to signal once stopped");
        // A non-zero exit after SIGTERM is an error naming it; so is dying on its own.
        let mut p = sh("trap 'exit 3' TERM; while :; do sleep 0.05; done", &dir.join("b.log"));
        p.start()?;
        std::thread::sleep(Duration::from_millis(300));
        assert!(p.stop().unwrap_err().to_string().contains("exit status: 3"));
        let mut p = sh("exit 7", &dir.join("c.log"));
        p.start()?;
        std::thread::sleep(Duration::from_millis(300));
        assert!(p.check_alive().unwrap_err().to_string().contains("exit status: 7"));
        assert_eq!(p.starts, 1);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_detached_process_outlives_its_handle_in_its_own_group() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("meterflow-procs-detach-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut p = sh("sleep 30", &dir.join("d.log")).in_own_process_group();
        p.start()?;
        let pid = p.detach().context("it was started")?;
        // Dropped without SIGKILL: still there, leading a process group of its own.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let fields: Vec<&str> = stat.rsplit_once(')').context("stat has a comm")?.1.split_whitespace().collect();
        assert_ne!(fields[0], "Z", "the detached process is running");
        assert_eq!(fields[2], pid.to_string(), "its process group is its own pid");
        let raw = rustix::process::Pid::from_raw(i32::try_from(pid)?).context("a pid is not 0")?;
        kill_process(raw, Signal::KILL)?;
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
