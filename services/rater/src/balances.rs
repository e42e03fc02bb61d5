//! Real-time balances: pending spend of open windows plus the settled state, published per
//! tenant to the compacted balances topic whenever it changes.
//!
//! Two inputs meet in the [`Desk`]:
//! * provisional totals, read by [`run`] from the provisional topic (every partition, from
//!   the end: a restart loses nothing that the next flush of each changed window or its
//!   settlement does not bring back);
//! * the settled state of the tenants this instance rates, handed over by the rating loop
//!   after each successful flush (so a balance never shows a charge that is not written),
//!   together with the windows that settled.
//!
//! Only tenants of owned aggregates partitions are published: with several raters each
//! tenant has one publisher. The pure parts (pricing the pending windows, composing the
//! balance, limit crossings) are `meterflow_core::rating::{pending, balance}`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use meterflow_core::auth::{self, RecordKey};
use meterflow_core::partitioning::partition_for;
use meterflow_core::pricing::Catalog;
use meterflow_core::rating::balance::{compose, limit_alerts, Balance, TenantSettled};
use meterflow_core::rating::pending::PendingBook;
use meterflow_core::rating::Alert;
use meterflow_core::records::{AlertRecord, AvroRecord, MeterAggregate, ProvisionalTotal};
use meterflow_runtime::args::{KafkaArgs, TopicArgs};
use meterflow_runtime::record::{AsRecord as _, Record};
use meterflow_runtime::tail::{self, Start};
use metrics::{counter, gauge, histogram};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::rows::AlertRow;

/// How often changed balances are published.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// Pending windows and settled state of the tenants, shared by the rating loop and [`run`].
#[derive(Debug, Default)]
pub struct Desk {
    book: PendingBook,
    settled: BTreeMap<String, TenantSettled>,
    /// Owned aggregates partitions and the topic's partition count.
    owned: BTreeSet<i32>,
    partitions: i32,
    dirty: BTreeSet<String>,
    /// The last balance published per tenant (change detection, limit crossing edges).
    published: BTreeMap<String, Balance>,
}

/// Shared handle.
pub type SharedDesk = Arc<Mutex<Desk>>;

impl Desk {
    fn owns(&self, tenant: &str) -> bool {
        self.partitions > 0 && self.owned.contains(&partition_for(tenant.as_bytes(), self.partitions))
    }

    pub fn on_provisional(&mut self, p: &ProvisionalTotal) {
        if self.book.on_provisional(p) {
            self.dirty.insert(p.tenant.clone());
        }
    }

    /// The final aggregate (or a restatement) of a window was rated and written.
    pub fn on_settled(&mut self, agg: &MeterAggregate) {
        self.book.on_settled(agg, agg.window_end);
        self.dirty.insert(agg.tenant.clone());
    }

    /// The tenant's settled state after a flush.
    pub fn update(&mut self, tenant: String, settled: TenantSettled) {
        self.dirty.insert(tenant.clone());
        self.settled.insert(tenant, settled);
    }

    pub fn own(&mut self, partition: i32, partitions: i32) {
        self.owned.insert(partition);
        self.partitions = partitions;
    }

    /// Forgets the settled state of the partition's tenants (its new owner publishes them).
    pub fn disown(&mut self, partition: i32) {
        self.owned.remove(&partition);
        let n = self.partitions;
        let theirs = |t: &String| n > 0 && partition_for(t.as_bytes(), n) == partition;
        self.settled.retain(|t, _| !theirs(t));
        self.published.retain(|t, _| !theirs(t));
    }

    /// Balances that changed since the last call (owned tenants only) and the limit alerts
    /// they crossed.
    pub fn take_changes(&mut self, catalog: &Catalog, now_ms: i64) -> (Vec<Balance>, Vec<Alert>) {
        let expired = self.book.expire(now_ms);
        self.dirty.extend(expired);
        gauge!(m::PENDING_WINDOWS).set(self.book.len() as f64);
        let (mut balances, mut alerts) = (Vec::new(), Vec::new());
        let empty = TenantSettled::default();
        for tenant in std::mem::take(&mut self.dirty) {
            if !self.owns(&tenant) {
                continue;
            }
            let settled = self.settled.get(&tenant).unwrap_or(&empty);
            let b = match compose(catalog, &tenant, now_ms, settled, &self.book) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(tenant, error = %e, "cannot compose the balance");
                    continue;
                }
            };
            let prev = self.published.get(&tenant);
            if prev.is_some_and(|p| Balance { updated_at: b.updated_at, ..p.clone() } == b) {
                continue;
            }
            alerts.extend(limit_alerts(prev, &b));
            self.published.insert(tenant, b.clone());
            balances.push(b);
        }
        (balances, alerts)
    }
}

/// Where [`run`] publishes.
pub struct Publishing {
    pub kafka: KafkaArgs,
    pub topics: TopicArgs,
    pub record_key: RecordKey,
    pub producer: FutureProducer,
    pub client: clickhouse::Client,
    pub catalog: Arc<Catalog>,
}

/// Reads provisional totals into `desk` and publishes changed balances until `shutdown`.
pub async fn run(p: Publishing, desk: SharedDesk, shutdown: CancellationToken) {
    let Some(tail) = tail::open_when_ready(&p.kafka, &p.topics.provisional_topic, Start::End, &shutdown).await else {
        return;
    };
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = tail.consumer.recv() => match msg {
                Ok(msg) => on_message(&p.record_key, &desk, &msg.record()),
                Err(e) => {
                    tracing::warn!(error = %e, "provisional topic");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
            _ = tick.tick() => {
                let (balances, alerts) = desk.lock().unwrap_or_else(PoisonError::into_inner).take_changes(&p.catalog, wall_ms());
                publish(&p, balances, alerts).await;
            }
        }
    }
}

fn on_message(key: &RecordKey, desk: &SharedDesk, msg: &Record<'_>) {
    let payload = msg.payload;
    let tag = msg.header(auth::HEADER);
    if !tag.is_some_and(|t| auth::verify(key, &[auth::PURPOSE_PROVISIONAL, payload], t)) {
        counter!(m::PROVISIONAL_IN, "outcome" => "unauthenticated").increment(1);
        return;
    }
    match ProvisionalTotal::from_avro(payload) {
        Ok(p) => {
            counter!(m::PROVISIONAL_IN, "outcome" => "accepted").increment(1);
            histogram!(m::PROVISIONAL_LAG).record((wall_ms() - p.published_at).max(0) as f64 / 1000.0);
            desk.lock().unwrap_or_else(PoisonError::into_inner).on_provisional(&p);
        }
        Err(_) => counter!(m::PROVISIONAL_IN, "outcome" => "undecodable").increment(1),
    }
}

/// Produces the balances (keyed by tenant: compaction keeps the newest) and the alerts; both
/// best effort (a lost balance is superseded by the tenant's next one).
async fn publish(p: &Publishing, balances: Vec<Balance>, alerts: Vec<Alert>) {
    if balances.is_empty() && alerts.is_empty() {
        return;
    }
    let mut deliveries = Vec::with_capacity(balances.len() + alerts.len());
    for b in &balances {
        let json = serde_json::to_vec(b).map_err(|e| e.to_string());
        queue(p, &p.topics.balances_topic, &b.tenant, json, &mut deliveries);
    }
    let now = wall_ms();
    for a in &alerts {
        counter!(m::ALERTS, "kind" => a.kind.clone()).increment(1);
        let avro = AlertRecord::crossing(a, now).to_avro().map_err(|e| e.to_string());
        queue(p, &p.topics.alerts_topic, &a.tenant, avro, &mut deliveries);
    }
    for d in deliveries {
        let outcome = match d.await {
            Ok(Ok(_)) => "published",
            _ => "failed",
        };
        counter!(m::BALANCES, "outcome" => outcome).increment(1);
    }
    if !alerts.is_empty() {
        // One attempt: the alert is on the topic already, and the table folds re-inserts.
        if let Err(e) = insert_alerts(&p.client, &alerts).await {
            tracing::warn!(error = %e, "spend-limit alerts not stored in wallet_alerts");
        }
    }
}

/// Queues one record keyed by `tenant`; one that cannot be encoded or queued is dropped
/// (counted and logged: publishing is best effort).
fn queue(p: &Publishing, topic: &str, tenant: &str, payload: Result<Vec<u8>, String>, deliveries: &mut Vec<DeliveryFuture>) {
    let queued = payload.and_then(|payload| {
        let rec = FutureRecord::to(topic).key(tenant.as_bytes()).payload(&payload);
        p.producer.send_result(rec).map_err(|(e, _)| e.to_string())
    });
    match queued {
        Ok(d) => deliveries.push(d),
        Err(e) => {
            tracing::warn!(error = %e, topic, tenant, "not published");
            counter!(m::BALANCES, "outcome" => "dropped").increment(1);
        }
    }
}

async fn insert_alerts(client: &clickhouse::Client, alerts: &[Alert]) -> anyhow::Result<()> {
    let now = wall_ms();
    let mut insert = client.insert::<AlertRow>("wallet_alerts").await?;
    for a in alerts {
        insert.write(&AlertRow::new(a, now)?).await?;
    }
    insert.end().await?;
    Ok(())
}

/// The settled view of `tenant` from its partition's rating state and wallets.
pub fn settled_of(rating: &meterflow_core::rating::RatingState, wallets: &meterflow_core::rating::Wallets, tenant: &str) -> TenantSettled {
    TenantSettled {
        usage: rating.settled_usage(tenant),
        wallet: wallets.balances().get(tenant).cloned().unwrap_or_default(),
        prepaid: wallets.has_wallet(tenant),
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// What the rating loop learned since the last batch was taken for writing.
#[derive(Debug, Default)]
pub struct DeskFeed {
    /// Aggregates rated (their windows settled).
    pub settled: Vec<MeterAggregate>,
    /// Tenants whose settled state changed (charges, adjustments, a restored partition).
    pub touched: BTreeSet<String>,
}

/// A [`DeskFeed`] frozen with the batch it belongs to: the settled states are read when the
/// batch is taken, because records handled while it is written change the state again and
/// their charges are not written yet (a balance never shows a charge before ClickHouse has it).
#[derive(Debug, Default)]
pub struct SealedFeed {
    settled: Vec<MeterAggregate>,
    tenants: Vec<(String, TenantSettled)>,
}

impl DeskFeed {
    /// Freezes what was learned so far; `settled_of` gives a touched tenant's settled state
    /// now (`None`: not held here any more).
    pub fn seal(&mut self, settled_of: impl Fn(&str) -> Option<TenantSettled>) -> SealedFeed {
        let tenants = std::mem::take(&mut self.touched).into_iter().filter_map(|t| settled_of(&t).map(|s| (t, s))).collect();
        SealedFeed { settled: std::mem::take(&mut self.settled), tenants }
    }
}

impl SealedFeed {
    /// Moves everything into `desk`, once its batch is written.
    pub fn hand_over(self, desk: &SharedDesk) {
        if self.settled.is_empty() && self.tenants.is_empty() {
            return;
        }
        let mut d = desk.lock().unwrap_or_else(PoisonError::into_inner);
        for agg in &self.settled {
            d.on_settled(agg);
        }
        for (t, s) in self.tenants {
            d.update(t, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rust_decimal::Decimal;

    use super::*;

    const CATALOG: &str = "default_plan = \"p\"\n[[plan]]\nid = \"p\"\ncurrency = \"USD\"\n[[plan.price]]\nmeter = \"m\"\nmodel = \"per_unit\"\nunit_price = \"0.5\"\n\
[[spend_limit]]\ntenant = \"t\"\ncurrency = \"USD\"\namount = \"3\"\nkind = \"soft\"\n";
    const NOW: i64 = 1_800_000_000_000;

    fn total(value: i64, offset: i64) -> ProvisionalTotal {
        ProvisionalTotal {
            tenant: "t".into(),
            meter: "m".into(),
            aggregation: "sum".into(),
            dimensions: BTreeMap::new(),
            window_start: NOW - 60_000,
            window_end: NOW,
            closes_at: NOW + 10_000,
            value: Decimal::from(value),
            event_count: 1,
            source_partition: 0,
            as_of_offset: offset,
            published_at: NOW,
        }
    }

    #[test]
    fn publishes_owned_changes_once_and_alerts_on_the_crossing() {
        let catalog = Catalog::from_toml_str(CATALOG).unwrap();
        let mut desk = Desk::default();
        desk.on_provisional(&total(4, 1));
        assert!(desk.take_changes(&catalog, NOW).0.is_empty(), "not owned: nothing published");
        let p = partition_for(b"t", 4);
        desk.own(p, 4);
        desk.on_provisional(&total(4, 2));
        let (b, alerts) = desk.take_changes(&catalog, NOW);
        assert_eq!((b.len(), b[0].pending, b[0].available), (1, Decimal::from(2), Decimal::from(-2)));
        assert!(alerts.is_empty(), "2 < 3");
        desk.on_provisional(&total(4, 2)); // re-delivery
        assert!(desk.take_changes(&catalog, NOW).0.is_empty(), "unchanged: not published again");
        desk.on_provisional(&total(7, 3));
        let (b, alerts) = desk.take_changes(&catalog, NOW + 1);
        assert_eq!(b[0].pending, Decimal::new(35, 1));
        assert_eq!((alerts.len(), alerts[0].kind.as_str()), (1, "spend_limit_soft"));
        // The settled state arrives with a top-up: published, no second alert.
        desk.update("t".into(), TenantSettled { wallet: [("USD".to_owned(), Decimal::from(10))].into(), prepaid: true, ..Default::default() });
        let (b, alerts) = desk.take_changes(&catalog, NOW + 2);
        assert_eq!((b[0].settled, b[0].available, alerts.len()), (Decimal::from(10), Decimal::new(65, 1), 0));
        desk.disown(p);
        desk.on_provisional(&total(9, 4));
        assert!(desk.take_changes(&catalog, NOW + 3).0.is_empty(), "disowned: its new owner publishes");
    }

    #[test]
    fn a_sealed_feed_carries_the_state_of_its_batch_not_later_records() {
        let catalog = Catalog::from_toml_str(CATALOG).unwrap();
        let desk: SharedDesk = Arc::default();
        desk.lock().unwrap().own(partition_for(b"t", 4), 4);
        let wallet = |v: i64| TenantSettled { wallet: [("USD".to_owned(), Decimal::from(v))].into(), prepaid: true, ..Default::default() };
        let mut feed = DeskFeed::default();
        feed.touched.insert("t".into());
        // The batch is taken while the wallet holds 10; records handled during its write
        // move it to 4 before the write completes.
        let sealed = feed.seal(|_| Some(wallet(10)));
        feed.touched.insert("t".into());
        assert!(desk.lock().unwrap().take_changes(&catalog, NOW).0.is_empty(), "nothing before the write completes");
        sealed.hand_over(&desk);
        let (b, _) = desk.lock().unwrap().take_changes(&catalog, NOW);
        assert_eq!(b[0].settled, Decimal::from(10), "the written batch's state, not the one still being written");
        feed.seal(|_| Some(wallet(4))).hand_over(&desk);
        assert_eq!(desk.lock().unwrap().take_changes(&catalog, NOW + 1).0[0].settled, Decimal::from(4));
    }
}
