//! Per-tenant API keys: generation, hashing, and the API's cache of the `api_keys` table.
//!
//! A key is `mf_<key_id>_<secret>`: `key_id` (12 hex digits) is public and names the key in
//! listings and revocations; the secret is 32 random bytes. Only SHA-256 of the whole key is
//! stored. Why SHA-256 and not argon2: a slow hash protects low-entropy secrets (passwords)
//! from guessing, but a 256-bit random key cannot be guessed whatever the hash, while argon2
//! would cost tens of milliseconds of CPU per lookup on 2 cores: a denial of service for an
//! ingest endpoint that checks a key on every request. With SHA-256 the cache is a hash map
//! from digest to key, and a stolen `api_keys` table still yields no usable key.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::Error;

/// What a key may do. `admin` may do everything, for every tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `POST /v1/events` for the key's tenant.
    Ingest,
    /// `GET` endpoints for the key's tenant.
    Read,
    /// Everything, any tenant: wallet adjustments, usage on behalf of tenants.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ingest" => Some(Scope::Ingest),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    /// Whether a key of this scope may act with `needed`.
    pub fn allows(self, needed: Scope) -> bool {
        self == Scope::Admin || self == needed
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::parse(s).ok_or_else(|| format!("{s:?} is not one of ingest, read, admin"))
    }
}

/// A key as the API knows it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub key_id: String,
    pub tenant: String,
    pub scope: Scope,
}

/// A fresh key: `(key_id, key)`. The key is shown once and never stored.
pub fn generate() -> (String, String) {
    let mut rng = rand::rng();
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let key_id = hex::encode(id);
    let key = format!("mf_{key_id}_{}", hex::encode(secret));
    (key_id, key)
}

/// Hex SHA-256 of a key, what `api_keys.key_hash` holds.
pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// One row of `api_keys` as read back (the newest version per key id).
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
pub struct KeyRow {
    pub key_id: String,
    pub tenant: String,
    pub scope: String,
    pub key_hash: String,
    pub revoked: u8,
    pub created_at: u32,
}

/// The newest state of every key. `argMax` by version rather than `FINAL`, so the answer
/// does not depend on whether ClickHouse merged the revocation row yet.
pub const SELECT_KEYS: &str = "SELECT key_id, argMax(tenant, version) AS tenant, argMax(scope, version) AS scope, \
     argMax(key_hash, version) AS key_hash, argMax(revoked, version) AS revoked, \
     toUInt32(argMax(created_at, version)) AS created_at FROM api_keys GROUP BY key_id ORDER BY key_id";

/// Reads every key's newest state.
pub async fn load(client: &clickhouse::Client) -> Result<Vec<KeyRow>, Error> {
    Ok(client.query(SELECT_KEYS).fetch_all::<KeyRow>().await?)
}

/// Inserts a key row (a new key, or a revocation with `revoked = 1` and a later version).
pub async fn insert(client: &clickhouse::Client, key_id: &str, tenant: &str, scope: Scope, key_hash: &str, revoked: bool) -> Result<(), Error> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    client
        .query("INSERT INTO api_keys (key_id, tenant, scope, key_hash, revoked, created_at, version) VALUES (?, ?, ?, ?, ?, ?, ?)")
        .bind(key_id)
        .bind(tenant)
        .bind(scope.as_str())
        .bind(key_hash)
        .bind(u8::from(revoked))
        .bind(now.as_secs() as u32)
        .bind(now.as_nanos() as u64)
        .execute()
        .await?;
    Ok(())
}

/// The API's view of `api_keys`, refreshed in the background. A key created or revoked is
/// seen within one refresh interval; a failed refresh keeps the previous view (a ClickHouse
/// outage does not lock every client out) and is counted in the metrics.
#[derive(Debug, Clone, Default)]
pub struct KeyCache {
    by_hash: Arc<RwLock<Option<HashMap<String, KeyInfo>>>>,
}

impl KeyCache {
    /// The key `presented` (the bearer token), if it is known and not revoked.
    pub fn lookup(&self, presented: &str) -> Option<KeyInfo> {
        let digest = hash(presented);
        self.by_hash.read().unwrap_or_else(|e| e.into_inner()).as_ref()?.get(&digest).cloned()
    }

    /// Whether a first load succeeded.
    pub fn is_loaded(&self) -> bool {
        self.by_hash.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Replaces the view with `rows` (revoked keys and unknown scopes dropped).
    pub fn replace(&self, rows: Vec<KeyRow>) -> usize {
        let map: HashMap<String, KeyInfo> = rows
            .into_iter()
            .filter(|r| r.revoked == 0)
            .filter_map(|r| {
                let scope = Scope::parse(&r.scope)?;
                Some((r.key_hash, KeyInfo { key_id: r.key_id, tenant: r.tenant, scope }))
            })
            .collect();
        let n = map.len();
        *self.by_hash.write().unwrap_or_else(|e| e.into_inner()) = Some(map);
        n
    }

    /// Reloads now.
    pub async fn refresh(&self, client: &clickhouse::Client) -> Result<usize, Error> {
        let rows = load(client).await?;
        Ok(self.replace(rows))
    }

    /// Reloads every `interval` until `shutdown`.
    pub fn spawn_refresh(&self, client: clickhouse::Client, interval: Duration, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let cache = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match cache.refresh(&client).await {
                    Ok(n) => metrics::gauge!(crate::metrics::KEYS).set(n as f64),
                    Err(e) => {
                        metrics::counter!(crate::metrics::KEY_REFRESH_ERRORS).increment(1);
                        tracing::warn!(error = %e, "cannot refresh API keys; keeping the previous ones");
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_hash_is_sha256() {
        let (id1, k1) = generate();
        let (id2, k2) = generate();
        assert_ne!(k1, k2);
        assert_ne!(id1, id2);
        assert!(k1.starts_with(&format!("mf_{id1}_")));
        assert_eq!(k1.len(), 3 + 12 + 1 + 64);
        // FIPS 180-2 test vector.
        assert_eq!(hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn cache_drops_revoked_keys() {
        let c = KeyCache::default();
        assert!(!c.is_loaded());
        assert_eq!(c.lookup("mf_x"), None);
        let row = |id: &str, key: &str, revoked: u8, scope: &str| KeyRow {
            key_id: id.into(),
            tenant: "acme".into(),
            scope: scope.into(),
            key_hash: hash(key),
            revoked,
            created_at: 0,
        };
        c.replace(vec![row("a", "ka", 0, "ingest"), row("b", "kb", 1, "admin"), row("c", "kc", 0, "bogus")]);
        assert_eq!(c.lookup("ka").map(|k| k.scope), Some(Scope::Ingest));
        assert_eq!(c.lookup("kb"), None);
        assert_eq!(c.lookup("kc"), None);
        assert_eq!(c.lookup("KA"), None);
        assert!(Scope::Admin.allows(Scope::Ingest) && !Scope::Read.allows(Scope::Ingest) && Scope::Ingest.allows(Scope::Ingest));
    }
}
