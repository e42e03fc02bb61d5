//! `meterflow-demo-summary reset` and `top-up`: a clean slate and the demo's prepaid credits.

use super::*;

pub(crate) async fn reset(conn: &Conn, groups: &[String]) -> anyhow::Result<()> {
    let db = &conn.clickhouse.database;
    anyhow::ensure!(
        !db.is_empty() && db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "refusing to drop database {db:?}: not a plain identifier"
    );
    let admin: AdminClient<DefaultClientContext> = meterflow_runtime::kafka::base_config(&conn.kafka)?.create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // Somebody else's aggregator or rater on these topics would lose its input under its feet.
    for g in groups {
        if let Ok(list) = admin.inner().fetch_group_list(Some(g), Duration::from_secs(10)) {
            if let Some(members) = list.groups().iter().find(|x| x.name() == g).map(|x| x.members().len()).filter(|n| *n > 0) {
                anyhow::bail!(
                    "consumer group {g} still has {members} member(s): a meterflow service still consumes these \
                     topics (`make demo-stop` stops only the demo's own); stop it first (the reset deletes \
                     topics {} and drops database {db})",
                    conn.topics.all().join(", ")
                );
            }
        }
    }
    let names = conn.topics.all();
    let mut deleted = Vec::new();
    for r in admin.delete_topics(&names, &opts).await.context("deleting topics")? {
        match r {
            Ok(t) => deleted.push(t),
            Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((t, code)) => anyhow::bail!("deleting topic {t}: {code}"),
        }
    }
    // Deletion is asynchronous in Kafka: wait until the metadata no longer lists them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let md = admin.inner().fetch_metadata(None, Duration::from_secs(10)).context("listing topics")?;
        let left: Vec<String> =
            md.topics().iter().map(|t| t.name().to_owned()).filter(|n| names.contains(&n.as_str())).collect();
        if left.is_empty() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "topics still listed 60 s after deletion: {left:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("topics: deleted {}", if deleted.is_empty() { "none (none existed)".to_owned() } else { deleted.join(", ") });
    let group_refs: Vec<&str> = groups.iter().map(String::as_str).collect();
    match admin.delete_groups(&group_refs, &opts).await {
        Ok(results) => {
            for r in results {
                match r {
                    Ok(g) => println!("consumer group {g}: deleted"),
                    Err((g, RDKafkaErrorCode::GroupIdNotFound)) => println!("consumer group {g}: none"),
                    // A stale committed offset is harmless anyway: it points past the end of
                    // the new, empty topic, and the services reset to the earliest offset.
                    Err((g, code)) => println!("consumer group {g}: not deleted ({code}); its stale offsets will be reset"),
                }
            }
        }
        Err(e) => println!("consumer groups: not deleted ({e}); stale offsets will be reset"),
    }
    meterflow_runtime::clickhouse::admin_client(&conn.clickhouse)
        .query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute()
        .await
        .with_context(|| format!("dropping database {db}"))?;
    println!("database {db}: dropped");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// top-up

pub(crate) async fn top_up(conn: &Conn, credits_path: &Path) -> anyhow::Result<()> {
    let producer: FutureProducer = meterflow_runtime::kafka::producer_config(&conn.kafka)?.create()?;
    let run = now_ms();
    let mut credits: BTreeMap<String, String> = BTreeMap::new();
    let adjustments: Vec<WalletAdjustment> = TOP_UPS
        .iter()
        .map(|(tenant, usd)| WalletAdjustment {
            idempotency_key: format!("demo_{run}_{tenant}"),
            tenant: (*tenant).to_owned(),
            currency: "USD".into(),
            amount: Decimal::from(*usd),
            kind: "top_up".into(),
            reason: "make demo: prepaid credit".into(),
            created_at: run,
            expires_at: None,
            priority: 0,
        })
        .collect();
    // Twice: the second publish is what a producer retry looks like; it must not count.
    for _ in 0..2 {
        for a in &adjustments {
            let payload = a.to_avro()?;
            producer
                .send(FutureRecord::to(&conn.topics.wallet_topic).key(&a.tenant).payload(&payload), Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .with_context(|| format!("publishing the top-up of {}", a.tenant))?;
        }
    }
    for a in &adjustments {
        credits.insert(a.tenant.clone(), meterflow_core::decimal::format(&a.amount));
    }
    std::fs::write(credits_path, serde_json::to_string_pretty(&credits)? + "\n")
        .with_context(|| format!("writing {}", credits_path.display()))?;
    let total: i64 = TOP_UPS.iter().map(|(_, a)| a).sum();
    println!(
        "published {} wallet top-ups (USD {total} in total, each sent twice with the same idempotency key) to {}",
        adjustments.len(),
        conn.topics.wallet_topic
    );
    for (t, a) in &credits {
        println!("  {t:<12} USD {a:>8}");
    }
    Ok(())
}

pub(crate) async fn top_up_api(conn: &Conn, credits_path: &Path, api: &str) -> anyhow::Result<()> {
    let credits = demo_api::top_up(api, &conn.clickhouse, TOP_UPS, now_ms()).await?;
    std::fs::write(credits_path, serde_json::to_string_pretty(&credits)? + "\n")
        .with_context(|| format!("writing {}", credits_path.display()))?;
    println!("posted {} wallet top-ups to {api}/v1/wallets/{{tenant}}/adjustments, each twice with one Idempotency-Key (the retry was answered as a replay)", credits.len());
    for (t, a) in &credits {
        println!("  {t:<12} USD {a:>8}");
    }
    Ok(())
}
