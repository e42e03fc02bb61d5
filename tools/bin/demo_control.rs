//! The demo's last look at meterflow-api: a balance and an entitlement check answered from
//! the API's memory, and a customer-page link. Each makes its own admin key, as an operator
//! would; the API picks keys up within its `--key-refresh`.

use anyhow::{Context as _, Result};
use meterflow_api::keys::Scope;
use meterflow_runtime::args::ClickHouseArgs;
use serde_json::{json, Value};

use crate::demo_api::wait_until_known;

/// Prints tenant-000's balance (settled, pending, available) and an entitlement check for
/// 2,000 gpt-4o input tokens, as the API answers them.
pub async fn balance(api: &str, ch: &ClickHouseArgs) -> Result<()> {
    let (_, key) = meterflow_admin::keys::create(ch, "demo-ops", Scope::Admin).await?;
    let client = reqwest::Client::new();
    wait_until_known(&client, api, &key, "tenant-000").await?;
    let path = "/v1/customers/tenant-000/balance";
    let r = client.get(format!("{api}{path}")).bearer_auth(&key).send().await?.error_for_status()?;
    println!("  GET  {path}  {}", r.text().await?);
    let check = json!({"tenant": "tenant-000", "meter": "input_tokens", "quantity": "2000",
        "dimensions": {"model": "gpt-4o", "region": "eu-west"}});
    let r = client.post(format!("{api}/v1/entitlements/check")).bearer_auth(&key).json(&check).send().await?.error_for_status()?;
    println!("  POST /v1/entitlements/check (tenant-000, 2000 gpt-4o input tokens)  {}", r.text().await?);
    Ok(())
}

/// A signed customer-page link for `tenant`, valid 24 h (docs/api.md "Customer page").
pub async fn portal_link(api: &str, ch: &ClickHouseArgs, tenant: &str) -> Result<String> {
    let (_, key) = meterflow_admin::keys::create(ch, "demo-portal", Scope::Admin).await?;
    let client = reqwest::Client::new();
    wait_until_known(&client, api, &key, tenant).await?;
    let body = json!({"tenant": tenant, "ttl": "24h"});
    let r = client.post(format!("{api}/v1/portal/tokens")).bearer_auth(&key).json(&body).send().await?.error_for_status()?;
    let v: Value = r.json().await?;
    let url = v["url"].as_str().with_context(|| format!("no url in {v}"))?;
    Ok(format!("{api}{url}"))
}
