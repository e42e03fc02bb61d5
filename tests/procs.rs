//! The services as real processes, so that tests can SIGKILL them at any moment.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use meterflow_runtime::args::{ClickHouseArgs, KafkaArgs, TopicArgs};

/// The workspace's binary `name`, built next to the running test executable (same profile);
/// built with cargo when missing.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test>  or  target/<profile>/<bin>
    let mut dir = exe.parent().context("test executable has no parent dir")?.to_path_buf();
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
    // Always ask cargo: it is a no-op when up to date, and a stale binary would test old code.
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

/// The workspace root (for config/ and schemas/).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// One service process, restartable with the same configuration.
pub struct ServiceProc {
    pub name: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    pub starts: u32,
}

impl ServiceProc {
    /// `name` is the binary; output goes to `log` (appended across restarts).
    pub fn new(name: &str, env: Vec<(String, String)>, log: PathBuf) -> anyhow::Result<Self> {
        Ok(Self { name: name.to_owned(), bin: bin_path(name)?, env, log, child: None, starts: 0 })
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.bin)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// SIGKILL: no flush, no checkpoint, no goodbye.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait (graceful shutdown flushes and checkpoints).
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
            loop {
                if c.try_wait()?.is_some() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    c.kill()?;
                    c.wait()?;
                    anyhow::bail!("{} did not stop within 40 s of SIGTERM", self.name);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the running process; false if not running.
    pub fn signal(&self, signal: &str) -> anyhow::Result<bool> {
        let Some(c) = self.child.as_ref() else { return Ok(false) };
        let status = Command::new("kill").args([format!("-{signal}"), c.id().to_string()]).status()?;
        Ok(status.success())
    }

    /// Fails if the process died on its own.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                anyhow::bail!("{} exited by itself with {status}; see {}", self.name, self.log.display());
            }
        }
        Ok(())
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// Turns environment pairs into the command line of a clap parser, so an in-process run is
/// configured exactly like a process (each pair's variable maps to the flag that reads it).
pub fn parse_with_env<P: clap::Parser>(env: &[(String, String)]) -> anyhow::Result<P> {
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
