//! `meterflow-admin keys create|list|revoke`: per-tenant API keys for meterflow-api.
//!
//! The key is printed once by `create` and never stored: `api_keys` holds its SHA-256 (see
//! `meterflow_api::keys` for why SHA-256). The API re-reads the table every few seconds
//! (`--key-refresh`), so a revocation takes effect within that interval.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use meterflow_api::keys::{self, Scope};
use meterflow_runtime::args::ClickHouseArgs;

#[derive(Debug, Args)]
pub struct KeysCmd {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (once: only its hash is stored).
    Create {
        /// The tenant the key acts for.
        #[arg(long, env = "METERFLOW_KEY_TENANT")]
        tenant: String,
        /// ingest (POST /v1/events), read (GET, own tenant) or admin (everything, any tenant).
        #[arg(long, env = "METERFLOW_KEY_SCOPE", default_value = "ingest")]
        scope: Scope,
        #[command(flatten)]
        clickhouse: ClickHouseArgs,
    },
    /// List keys (ids, tenants, scopes; never the keys).
    List {
        /// Only this tenant's keys.
        #[arg(long, env = "METERFLOW_KEY_TENANT")]
        tenant: Option<String>,
        #[command(flatten)]
        clickhouse: ClickHouseArgs,
    },
    /// Revoke a key by its id (the 12 hex digits after `mf_`).
    Revoke {
        #[arg(env = "METERFLOW_KEY_ID")]
        key_id: String,
        #[command(flatten)]
        clickhouse: ClickHouseArgs,
    },
}

/// Creates a key for `tenant` and returns `(key_id, key)`.
pub async fn create(clickhouse: &ClickHouseArgs, tenant: &str, scope: Scope) -> Result<(String, String)> {
    if tenant.is_empty() {
        bail!("--tenant must not be empty");
    }
    let client = meterflow_runtime::clickhouse::client(clickhouse);
    let (key_id, key) = keys::generate();
    keys::insert(&client, &key_id, tenant, scope, &keys::hash(&key), false).await?;
    Ok((key_id, key))
}

/// Revokes `key_id`; errors if no such key exists.
pub async fn revoke(clickhouse: &ClickHouseArgs, key_id: &str) -> Result<()> {
    let client = meterflow_runtime::clickhouse::client(clickhouse);
    let all = keys::load(&client).await?;
    let Some(k) = all.into_iter().find(|k| k.key_id == key_id) else {
        bail!("no key with id {key_id:?} (meterflow-admin keys list)");
    };
    let scope = Scope::parse(&k.scope).unwrap_or(Scope::Ingest);
    keys::insert(&client, key_id, &k.tenant, scope, &k.key_hash, true).await?;
    Ok(())
}

pub async fn run(cmd: &KeysCmd) -> Result<()> {
    match &cmd.command {
        KeysCommand::Create { tenant, scope, clickhouse } => {
            let (key_id, key) = create(clickhouse, tenant, *scope).await?;
            eprintln!("created key {key_id} for tenant {tenant} with scope {}; it is shown once, store it now:", scope.as_str());
            println!("{key}");
        }
        KeysCommand::List { tenant, clickhouse } => {
            let client = meterflow_runtime::clickhouse::client(clickhouse);
            println!("{:<14} {:<24} {:<8} {:<8}", "key_id", "tenant", "scope", "state");
            for k in keys::load(&client).await? {
                if tenant.as_ref().is_some_and(|t| *t != k.tenant) {
                    continue;
                }
                let state = if k.revoked != 0 { "revoked" } else { "active" };
                println!("{:<14} {:<24} {:<8} {:<8}", k.key_id, k.tenant, k.scope, state);
            }
        }
        KeysCommand::Revoke { key_id, clickhouse } => {
            revoke(clickhouse, key_id).await?;
            println!("revoked {key_id} (meterflow-api stops accepting it within its --key-refresh interval)");
        }
    }
    Ok(())
}
