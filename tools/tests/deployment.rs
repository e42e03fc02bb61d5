//! The container deployment against the code, asked directly instead of read out of the Rust
//! sources with regexes: clap's `Command` of each binary says which environment variables a
//! service reads (and their defaults), and the services' metrics modules, run under a
//! collecting recorder, say which metric names exist. A renamed flag or metric therefore
//! fails here even when its spelling in the source changes shape (a `const`, a flattened
//! group, a builder call), which the old regexes could not see.
//!
//! What needs only the files (mounts, ports, the cluster profile, Grafana provisioning) is
//! deploy/check_compose.py; the dashboard SQL on ClickHouse is deploy/grafana/check_sql.py.
//! `make check-compose` runs all three. No services needed.
#![allow(clippy::expect_used, reason = "an integration test: its helpers' expects are the test's assertions")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{ensure, Context as _, Result};
use clap::{Args as _, CommandFactory as _};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use serde_norway::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tools/ is inside the repository").to_owned()
}

/// Environment variable -> clap default of the command's own arguments (not its subcommands').
fn env_of(cmd: &clap::Command) -> BTreeMap<String, Option<String>> {
    cmd.get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_string_lossy().into_owned();
            let default = a.get_default_values().first().map(|d| d.to_string_lossy().into_owned());
            Some((env, default))
        })
        .collect()
}

/// Every variable the command or any of its subcommands reads.
fn env_all(cmd: &clap::Command) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = env_of(cmd).into_keys().collect();
    for sub in cmd.get_subcommands() {
        out.extend(env_all(sub));
    }
    out
}

/// The command line of each binary the image ships.
fn binaries() -> BTreeMap<&'static str, clap::Command> {
    BTreeMap::from([
        ("meterflow-admin", meterflow_admin::cli::Cli::command()),
        ("meterflow-aggregator", meterflow_aggregator::Config::command()),
        ("meterflow-api", meterflow_api::Config::command()),
        ("meterflow-producer", meterflow_producer::Cli::command()),
        ("meterflow-rater", meterflow_rater::Config::command()),
    ])
}

/// What `argv` (a compose `command`) reads: the root's variables and those of each
/// subcommand it names.
fn env_of_invocation(argv: &[String]) -> Result<BTreeMap<String, Option<String>>> {
    let bins = binaries();
    let (bin, rest) = argv.split_first().context("empty command")?;
    let mut cmd = bins.get(bin.as_str()).with_context(|| format!("{bin} is not a binary of the image ({:?})", bins.keys()))?;
    let mut out = env_of(cmd);
    for word in rest.iter().take_while(|w| !w.starts_with('-')) {
        cmd = cmd.find_subcommand(word).with_context(|| format!("{bin} has no subcommand {word}"))?;
        out.extend(env_of(cmd));
    }
    Ok(out)
}

/// A meterflow service of the compose file: its name, command and METERFLOW_* environment.
struct ComposeService {
    name: String,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
}

fn compose() -> Result<Value> {
    let path = repo().join("deploy/docker-compose.yml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let mut doc: Value = serde_norway::from_str(&text).context("deploy/docker-compose.yml")?;
    doc.apply_merge().context("compose merge keys (<<: *anchor)")?;
    Ok(doc)
}

fn env_map(v: Option<&Value>) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for (k, v) in v.and_then(Value::as_mapping).into_iter().flatten() {
        let k = k.as_str().context("compose: environment key")?.to_owned();
        let v = match v {
            Value::String(s) => s.clone(),
            other => serde_norway::to_string(other)?.trim().to_owned(),
        };
        env.insert(k, v);
    }
    Ok(env)
}

/// The environment every meterflow service gets (`x-meterflow-env`: where Kafka and
/// ClickHouse are). Like the Dockerfile's ENV, each variable must be read by some binary, not
/// by each: the producer does not talk to ClickHouse.
fn shared_env() -> Result<BTreeMap<String, String>> {
    let shared = env_map(compose()?.get("x-meterflow-env"))?;
    ensure!(shared.contains_key("METERFLOW_KAFKA_BROKERS"), "compose: x-meterflow-env has no METERFLOW_KAFKA_BROKERS");
    Ok(shared)
}

fn compose_services() -> Result<Vec<ComposeService>> {
    let doc = compose()?;
    let services = doc.get("services").and_then(Value::as_mapping).context("compose: no services")?;
    let mut out = Vec::new();
    for (name, svc) in services {
        let argv: Vec<String> = match svc.get("command").and_then(Value::as_sequence) {
            Some(seq) => seq.iter().map(|v| v.as_str().map(str::to_owned).unwrap_or_default()).collect(),
            None => continue,
        };
        if !argv.first().is_some_and(|b| b.starts_with("meterflow-")) {
            continue;
        }
        let env = env_map(svc.get("environment"))?;
        let name = name.as_str().context("compose: service name")?.to_owned();
        out.push(ComposeService { name, argv, env });
    }
    Ok(out)
}

#[test]
fn compose_sets_only_variables_its_services_read() -> Result<()> {
    let services = compose_services()?;
    let names: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    for expected in ["init", "aggregator", "rater", "api", "producer", "cluster-init"] {
        ensure!(names.contains(expected), "compose has no meterflow service {expected} (has {names:?})");
    }
    let shared = shared_env()?;
    let read_by_some: BTreeSet<String> = binaries().values().flat_map(env_all).collect();
    let mut problems: Vec<String> = (shared.keys().filter(|k| !read_by_some.contains(*k)))
        .map(|k| format!("x-meterflow-env: {k} is read by no binary"))
        .collect();
    let mut checked = 0;
    for svc in &services {
        let reads = env_of_invocation(&svc.argv)?;
        for (var, value) in svc.env.iter().filter(|(k, _)| k.starts_with("METERFLOW_")) {
            checked += 1;
            if shared.get(var) == Some(value) && !reads.contains_key(var) {
                continue; // the shared block, checked above
            }
            match reads.get(var) {
                None => problems.push(format!("{} ({}): sets {var}, which no flag of that command reads", svc.name, svc.argv.join(" "))),
                // The local setup uses the default topics; compose must not diverge from it.
                Some(Some(default)) if var.ends_with("_TOPIC") && value != default => {
                    problems.push(format!("{}: {var}={value} differs from the default {default}", svc.name))
                }
                Some(_) => {}
            }
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    ensure!(checked > 20, "only {checked} variables checked: did the merge keys apply?");
    Ok(())
}

/// The operator's reference for every variable: docs/configuration.md, and the other docs
/// that describe a service's flags in context.
fn documented() -> Result<String> {
    let mut text = String::new();
    for entry in std::fs::read_dir(repo().join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            text.push_str(&std::fs::read_to_string(&path)?);
        }
    }
    text.push_str(&std::fs::read_to_string(repo().join("README.md"))?);
    Ok(text)
}

#[test]
fn every_flag_of_a_compose_service_is_set_there_or_documented() -> Result<()> {
    let docs = documented()?;
    let mut problems = Vec::new();
    for svc in compose_services()? {
        for var in env_of_invocation(&svc.argv)?.into_keys() {
            let word = |i: usize| docs.as_bytes().get(i).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
            let in_docs = docs.match_indices(&var).any(|(i, _)| !word(i + var.len()) && (i == 0 || !word(i - 1)));
            if !svc.env.contains_key(&var) && !in_docs {
                problems.push(format!("{} ({}): {var} is neither set in compose nor documented in docs/*.md", svc.name, svc.argv.join(" ")));
            }
        }
    }
    ensure!(problems.is_empty(), "{} undocumented:\n{}", problems.len(), problems.join("\n"));
    Ok(())
}

#[test]
fn dockerfile_env_is_read_by_some_binary() -> Result<()> {
    let text = std::fs::read_to_string(repo().join("deploy/Dockerfile"))?.replace("\\\n", " ");
    let set: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ENV "))
        .flat_map(|rest| rest.split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, _)| k.to_owned()))
        .filter(|k| k.starts_with("METERFLOW_"))
        .collect();
    ensure!(!set.is_empty(), "deploy/Dockerfile sets no METERFLOW_* variable: did its ENV move?");
    let read: BTreeSet<String> = binaries().values().flat_map(env_all).collect();
    let unread: Vec<&String> = set.iter().filter(|k| !read.contains(*k)).collect();
    ensure!(unread.is_empty(), "deploy/Dockerfile ENV sets {unread:?}, which no binary reads");
    Ok(())
}

/// The topic flags' defaults are the `meterflow.` names the tests' prefixes mirror.
#[test]
fn topic_defaults_are_the_meterflow_prefix() -> Result<()> {
    let cmd = meterflow_runtime::args::TopicArgs::augment_args(clap::Command::new("topics"));
    let defaults: BTreeSet<String> = env_of(&cmd).into_values().flatten().collect();
    let prefixed = meterflow_runtime::args::TopicArgs::with_prefix("meterflow.");
    let expected: BTreeSet<String> = prefixed.all().iter().map(|s| s.to_string()).collect();
    assert_eq!(defaults, expected);
    Ok(())
}

/// Collects the names the metrics modules describe or register.
#[derive(Default)]
struct Names(Mutex<BTreeSet<String>>);

impl Names {
    fn add(&self, name: &str) {
        self.0.lock().expect("not poisoned").insert(name.to_owned());
    }
}

impl Recorder for Names {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.add(key.as_str());
    }
    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.add(key.as_str());
    }
    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.add(key.as_str());
    }
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.add(key.name());
        Counter::noop()
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.add(key.name());
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.add(key.name());
        Histogram::noop()
    }
}

fn exported_metrics() -> BTreeSet<String> {
    let names = Names::default();
    metrics::with_local_recorder(&names, || {
        meterflow_aggregator::metrics::describe();
        meterflow_rater::metrics::describe();
        meterflow_api::metrics::describe();
        let _ = meterflow_producer::metrics::ProducerMetrics::register();
    });
    names.0.into_inner().expect("not poisoned")
}

/// `meterflow_*` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    expr.split(|c: char| !ident(c)).filter(|w| w.starts_with("meterflow_")).collect()
}

/// Prometheus queries of every panel of a dashboard (rows' nested panels included).
fn prometheus_exprs(panels: &[serde_json::Value], out: &mut Vec<(String, String)>) {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        for t in panel["targets"].as_array().into_iter().flatten() {
            let ds = if t["datasource"].is_object() { &t["datasource"] } else { &panel["datasource"] };
            if ds["type"] == "prometheus" {
                out.push((title.to_owned(), t["expr"].as_str().unwrap_or_default().to_owned()));
            }
        }
        prometheus_exprs(panel["panels"].as_array().map(Vec::as_slice).unwrap_or_default(), out);
    }
}

#[test]
fn dashboards_use_only_exported_metric_names() -> Result<()> {
    let exported = exported_metrics();
    // Evidence that the recorder saw the modules: one name of each service.
    for name in [
        meterflow_aggregator::metrics::EVENTS_IN,
        meterflow_rater::metrics::RUNTIME.insert_seconds,
        meterflow_api::metrics::REQUESTS,
        meterflow_producer::metrics::EVENTS_SENT,
    ] {
        ensure!(exported.contains(name), "{name} was not described; exported: {exported:?}");
    }
    let mut exprs = Vec::new();
    let dir = repo().join("deploy/grafana/dashboards");
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let board: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
            prometheus_exprs(board["panels"].as_array().map(Vec::as_slice).unwrap_or_default(), &mut exprs);
        }
    }
    let mut problems = Vec::new();
    let mut seen = 0;
    for (title, expr) in &exprs {
        for name in metric_names(expr) {
            seen += 1;
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            if !exported.contains(name) && !exported.contains(base) {
                problems.push(format!("{title}: {name} is not exported by any service"));
            }
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    ensure!(seen > 10, "only {seen} metric references in {} Prometheus queries", exprs.len());
    Ok(())
}

#[test]
fn metric_names_are_split_out_of_promql() {
    let expr = "histogram_quantile(0.99, sum by (le) (rate(meterflow_rater_checkpoint_seconds_bucket[$__rate_interval])))";
    assert_eq!(metric_names(expr), ["meterflow_rater_checkpoint_seconds_bucket"]);
    assert_eq!(metric_names("sum(meterflow_a_total) / sum(xmeterflow_b)"), ["meterflow_a_total"]);
}
