//! Consumer lag, reported beside the loop: the broker's end offsets are fetched with a
//! blocking call, which must not stall record handling.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meterflow_runtime::kafka;
use metrics::gauge;
use rdkafka::consumer::Consumer as _;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics as m;

/// Every 5 s, the end offset of each owned partition minus what the aggregator covers, from
/// a separate client on a blocking thread.
pub(crate) fn spawn_lag_reporter(
    config: &Config,
    positions: Arc<Mutex<BTreeMap<i32, i64>>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client: rdkafka::consumer::BaseConsumer = kafka::base_config(&config.service.conn.kafka)?.create()?;
    let topic = config.service.conn.topics.usage_topic.clone();
    tokio::task::spawn_blocking(move || {
        while !shutdown.is_cancelled() {
            let owned = positions.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for (p, next) in owned {
                if let Ok((_, high)) = client.fetch_watermarks(&topic, p, Duration::from_secs(2)) {
                    gauge!(m::CONSUMER_LAG, "partition" => p.to_string()).set((high - next).max(0) as f64);
                }
            }
            for _ in 0..50 {
                if shutdown.is_cancelled() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    Ok(())
}
