//! Where a service gets the deployment's record key: `--record-key`, else the ClickHouse
//! table `record_keys` (filled at random by `meterflow-admin migrate`). Why ClickHouse: every
//! service already needs it and a deployment's services share it, so a fresh deployment is
//! authenticated without an extra secret to distribute; `--record-key` is for deployments that
//! keep secrets elsewhere.

use anyhow::Context as _;
use clickhouse::Client;
use meterflow_core::auth::RecordKey;

use crate::args::AuthArgs;

/// The table holding the generated key (migration 007).
pub const TABLE: &str = "record_keys";

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct KeyRow {
    key_hex: String,
}

/// The key from `args`, else the oldest key in `record_keys`.
pub async fn resolve(args: &AuthArgs, client: &Client) -> anyhow::Result<RecordKey> {
    if let Some(hex) = &args.record_key {
        return RecordKey::from_hex(hex).context("--record-key / METERFLOW_RECORD_KEY");
    }
    // A service (re)started during a ClickHouse outage waits for it, like everything else it
    // reads from ClickHouse; a missing table is not an outage and fails at once.
    let mut delay = std::time::Duration::from_millis(100);
    let mut attempts = 0;
    let rows: Vec<KeyRow> = loop {
        match client.query("SELECT key_hex FROM record_keys ORDER BY created_at, key_hex LIMIT 1").fetch_all().await {
            Ok(rows) => break rows,
            Err(e @ clickhouse::error::Error::Network(_)) if attempts < 600 => {
                attempts += 1;
                tracing::warn!(error = %e, attempt = attempts, "reading the record key from ClickHouse failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => {
                return Err(e).context(
                    "reading the record key from ClickHouse table record_keys (run `meterflow-admin migrate`, or pass --record-key)",
                )
            }
        }
    };
    let row = rows
        .into_iter()
        .next()
        .context("ClickHouse table record_keys is empty: run `meterflow-admin migrate`, or pass --record-key")?;
    RecordKey::from_hex(&row.key_hex).context("the key in ClickHouse table record_keys")
}
