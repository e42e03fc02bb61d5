//! Least privilege of the local setup's ClickHouse users (deploy/local/services.sh): a
//! private clickhouse-server on free ports, started with exactly the config `services.sh`
//! generates, proves that `meterflow_analyst` can read (and set per-query settings, as
//! Grafana does) but cannot insert, alter, drop, create or lift its read-only mode, while
//! `meterflow_writer` can do what the services need. A private server, because the shared one
//! may predate the users and must not be restarted by a test.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use meterflow_testkit::http::free_port;
use meterflow_testkit::procs::{repo_root, ServiceProc};

/// The private server; its directory goes with it.
struct Server {
    proc: ServiceProc,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.proc.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// (status, body) of `sql` as `user`.
async fn run(c: &reqwest::Client, port: u16, user: &str, password: &str, sql: &str) -> anyhow::Result<(u16, String)> {
    let r = c.post(format!("http://127.0.0.1:{port}/")).basic_auth(user, Some(password)).body(sql.to_owned()).send().await?;
    Ok((r.status().as_u16(), r.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyst_is_read_only_and_writer_can_write() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("meterflow-ch-users-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (http, tcp) = (free_port()?, free_port()?);
    let status = Command::new(repo_root().join("deploy/local/services.sh"))
        .args(["clickhouse-config", dir.to_str().expect("utf-8 temp dir")])
        .env("METERFLOW_CLICKHOUSE_HTTP_PORT", http.to_string())
        .env("METERFLOW_CLICKHOUSE_TCP_PORT", tcp.to_string())
        .env("METERFLOW_CH_WRITER_PASSWORD", "w-secret")
        .env("METERFLOW_CH_ANALYST_PASSWORD", "a-secret")
        .status()?;
    anyhow::ensure!(status.success(), "services.sh clickhouse-config failed");
    let users = std::fs::read_to_string(dir.join("users.xml"))?;
    assert!(!users.contains("a-secret") && !users.contains("w-secret"), "passwords are stored hashed");
    let args = vec![format!("--config-file={}", dir.join("config.xml").display())];
    let proc = ServiceProc::program("clickhouse-server", "clickhouse-server".into(), args, dir.clone(), dir.join("server.log"));
    let mut server = Server { proc, dir: dir.clone() };
    server.proc.start()?;
    server.proc.wait_ready(&format!("http://127.0.0.1:{http}/ping"), Duration::from_secs(60)).await?;
    let c = reqwest::Client::new();

    // The writer: what the services and migrations do.
    for sql in [
        "CREATE DATABASE IF NOT EXISTS lp",
        "CREATE TABLE lp.t (k String, v Decimal(38, 9)) ENGINE = MergeTree ORDER BY k",
        "INSERT INTO lp.t VALUES ('a', 1.5)",
        "ALTER TABLE lp.t ADD COLUMN n UInt8 DEFAULT 0",
        "CREATE TABLE lp.gone (x UInt8) ENGINE = Memory",
        "DROP TABLE lp.gone",
    ] {
        let (s, body) = run(&c, http, "meterflow_writer", "w-secret", sql).await?;
        assert_eq!(s, 200, "writer: {sql}: {body}");
    }
    let (s, _) = run(&c, http, "meterflow_writer", "wrong", "SELECT 1").await?;
    assert_ne!(s, 200, "a wrong password is refused");

    // The analyst: reads, with per-query settings...
    let (s, body) = run(&c, http, "meterflow_analyst", "a-secret", "SELECT k, n FROM lp.t SETTINGS max_threads = 1").await?;
    assert_eq!((s, body.trim()), (200, "a\t0"));
    // ...but changes nothing.
    for sql in [
        "INSERT INTO lp.t (k, v) VALUES ('b', 2)",
        "ALTER TABLE lp.t DROP COLUMN n",
        "ALTER TABLE lp.t DELETE WHERE k = 'a'",
        "DROP TABLE lp.t",
        "DROP DATABASE lp",
        "TRUNCATE TABLE lp.t",
        "CREATE TABLE lp.x (x UInt8) ENGINE = Memory",
        "RENAME TABLE lp.t TO lp.t2",
        "SELECT 1 SETTINGS readonly = 0",
    ] {
        let (s, body) = run(&c, http, "meterflow_analyst", "a-secret", sql).await?;
        assert_ne!(s, 200, "analyst must not: {sql}");
        assert!(body.contains("readonly") || body.contains("read-only") || body.contains("Code: 164"), "analyst {sql}: {body}");
    }
    // Nothing changed.
    let (_, body) = run(&c, http, "default", "", "SELECT count(), sum(n) FROM lp.t").await?;
    assert_eq!(body.trim(), "1\t0");
    let (_, body) = run(&c, http, "default", "", "SELECT count() FROM system.columns WHERE database = 'lp' AND table = 't'").await?;
    assert_eq!(body.trim(), "3", "no column dropped");
    Ok(())
}
