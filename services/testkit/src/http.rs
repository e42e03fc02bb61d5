//! HTTP against the services under test (`/metrics`, `/healthz`, Prometheus's API).

use std::time::Duration;

use anyhow::{Context as _, Result};

/// A free TCP port on loopback (bound, read, released: a tiny race, fine on a test machine).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `GET url` with a 30 s timeout: the status and the body.
pub async fn get(url: &str) -> Result<(u16, String)> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let resp = client.get(url).send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await.with_context(|| format!("GET {url}: reading the body"))?))
}

/// The body of `GET url`, which must answer 200.
pub async fn get_ok(url: &str) -> Result<String> {
    let (status, body) = get(url).await?;
    anyhow::ensure!(status == 200, "GET {url}: HTTP {status}: {body}");
    Ok(body)
}

/// Sum of every series of metric `name` in a Prometheus text exposition; `None` if it has none.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(None, |sum, v| Some(sum.unwrap_or(0.0) + v))
}

/// [`metric`], 0 when absent.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    metric(text, name).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_series_of_one_metric_only() {
        let text = "# HELP x_total x\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3.5\nx_total_other 100\nx_total 1\n";
        assert_eq!(metric_sum(text, "x_total"), 6.5);
        assert_eq!(metric_sum(text, "y"), 0.0);
        assert_eq!(metric(text, "y"), None);
    }
}
