#!/usr/bin/env python3
"""Static checks of the container deployment against the code (run by deploy/check-compose.sh).

  * deploy/docker-compose.yml, deploy/prometheus/prometheus.yml and the Grafana provisioning
    files parse as YAML; every dashboard parses as JSON and is what build_dashboards.py writes;
  * every file or directory compose mounts or builds from, and every COPY source of
    deploy/Dockerfile, exists;
  * service HTTP addresses bind 0.0.0.0 on the services' default ports (aggregator 9101, rater
    9102, producer 9103, api 9104), published 1:1 on 127.0.0.1 only, and Prometheus scrapes exactly those (same jobs as
    deploy/local/services.sh); Kafka 9092, ClickHouse 8123, Prometheus 9090, Grafana 3000
    are published like the local setup;
  * profile `cluster`: ZooKeeper and two ClickHouse nodes, only in that profile; each node mounts
    deploy/clickhouse-cluster/cluster.xml (remote_servers listing exactly the compose nodes,
    ZooKeeper = the zookeeper service), its own macros (distinct replica names) and the
    consistency profile; `cluster-init` migrates --cluster with the remote_servers name through
    one of the nodes;
  * Grafana installs grafana-clickhouse-datasource; the dashboards use only provisioned data
    source uids, only the ClickHouse macros that work on 18.16, no SQL that 18.16 lacks.

What the code says (which variables each service reads, the topic defaults, the metric names
the dashboards may use) is asked of the code itself, not read out of its source:
tools/tests/deployment.rs (clap's commands, the metrics modules), run by check-compose.sh.

usage: check_compose.py   (exit 1 with a list of problems)
"""

import glob
import json
import os
import re
import subprocess
import sys

try:
    import yaml
except ImportError:  # check-compose.sh installs it
    print("check_compose.py needs PyYAML (pip install pyyaml)", file=sys.stderr)
    sys.exit(2)

DEPLOY = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DEPLOY)
COMPOSE = os.path.join(DEPLOY, "docker-compose.yml")
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
PROMETHEUS = os.path.join(DEPLOY, "prometheus", "prometheus.yml")
GRAFANA = os.path.join(DEPLOY, "grafana")

PORTS = {"aggregator": 9101, "rater": 9102, "producer": 9103, "api": 9104}
HTTP_VAR = {
    "aggregator": "METERFLOW_AGGREGATOR_HTTP_ADDR",
    "rater": "METERFLOW_RATER_HTTP_ADDR",
    "producer": "METERFLOW_PRODUCER_METRICS_ADDR",
    "api": "METERFLOW_API_HTTP_ADDR",
}
INFRA_PORTS = {"kafka": 9092, "clickhouse": 8123, "prometheus": 9090, "grafana": 3000}

problems: list[str] = []


def problem(msg: str):
    problems.append(msg)


def rel(p: str) -> str:
    return os.path.relpath(p, REPO)


def load_yaml(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except Exception as e:  # noqa: BLE001
        problem(f"{rel(path)}: does not parse as YAML: {e}")
        return None


# --- checks --------------------------------------------------------------------------------

def check_dockerfile():
    """Checks COPY sources (its ENV: tools/tests/deployment.rs)."""
    if not os.path.isfile(DOCKERFILE):
        problem("deploy/Dockerfile is missing")
        return
    with open(DOCKERFILE, encoding="utf-8") as f:
        text = re.sub(r"\\\n", " ", f.read())
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "COPY" and not any(w.startswith("--from") for w in words[1:]):
            srcs = [w for w in words[1:-1] if not w.startswith("--")]
            for s in srcs:
                if not glob.glob(os.path.join(REPO, s)):
                    problem(f"deploy/Dockerfile: COPY {s}: no such file or directory in the build context (repository root)")


def port_of(addr) -> int | None:
    m = re.fullmatch(r"[\w.\-\[\]:]*:(\d+)", str(addr))
    return int(m.group(1)) if m else None


def published(svc: dict) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for p in svc.get("ports", []) or []:
        parts = str(p).split(":")
        if len(parts) >= 2:
            out[int(parts[-1].split("/")[0])] = int(parts[-2])
    return out


def check_compose():
    doc = load_yaml(COMPOSE)
    if not isinstance(doc, dict) or "services" not in doc:
        problem("deploy/docker-compose.yml has no services")
        return None
    services = doc["services"]
    base = DEPLOY

    # Images of the infrastructure.
    expect_images = {"kafka": "apache/kafka", "clickhouse": "clickhouse/clickhouse-server",
                     "prometheus": "prom/prometheus", "grafana": "grafana/grafana"}
    for name, image in expect_images.items():
        img = str(services.get(name, {}).get("image", ""))
        if not img.startswith(image + ":"):
            problem(f"compose: service {name} must run a pinned {image} image, not {img!r}")
    kenv = services.get("kafka", {}).get("environment", {}) or {}
    if "controller" not in str(kenv.get("KAFKA_PROCESS_ROLES", "")):
        problem("compose: kafka must run in KRaft mode (KAFKA_PROCESS_ROLES with controller)")

    # Mounts and build contexts exist.
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            ctx = os.path.normpath(os.path.join(base, build.get("context", ".") if isinstance(build, dict) else build))
            if not os.path.isdir(ctx):
                problem(f"compose: {name}: build context {rel(ctx)} does not exist")
            df = os.path.normpath(os.path.join(ctx, build.get("dockerfile", "Dockerfile"))) if isinstance(build, dict) else os.path.join(ctx, "Dockerfile")
            if not os.path.isfile(df):
                problem(f"compose: {name}: dockerfile {rel(df)} does not exist")
        for v in svc.get("volumes", []) or []:
            src = v.get("source") if isinstance(v, dict) else str(v).split(":")[0]
            if src and (src.startswith(".") or src.startswith("/")):
                path = os.path.normpath(os.path.join(base, src))
                if not os.path.exists(path):
                    problem(f"compose: {name}: mounted {src} ({rel(path)}) does not exist")
            elif src and src not in (doc.get("volumes") or {}):
                problem(f"compose: {name}: named volume {src} is not declared under volumes:")

    # meterflow services: ports (their variables: tools/tests/deployment.rs).
    meterflow = {}
    for name, svc in services.items():
        cmd = svc.get("command")
        if not isinstance(cmd, list) or not cmd or not str(cmd[0]).startswith("meterflow-"):
            continue
        meterflow[name] = svc
        if "build" not in svc and not svc.get("image"):
            problem(f"compose: {name}: neither build nor image")
    for name, var in HTTP_VAR.items():
        svc = meterflow.get(name)
        if svc is None:
            problem(f"compose: no {name} service")
            continue
        addr = (svc.get("environment") or {}).get(var)
        if not addr or not str(addr).startswith("0.0.0.0:"):
            problem(f"compose: {name}: {var} must bind 0.0.0.0 inside the container (got {addr!r})")
        if port_of(addr) != PORTS[name]:
            problem(f"compose: {name}: {var}={addr}, expected port {PORTS[name]} (the local setup's)")
        if published(svc).get(PORTS[name]) != PORTS[name]:
            problem(f"compose: {name}: must publish {PORTS[name]}:{PORTS[name]}")
    init = services.get("init")
    if not init or init.get("command") != ["meterflow-admin", "init"]:
        problem("compose: a one-shot `init` service must run [meterflow-admin, init]")
    else:
        for name in ("aggregator", "rater"):
            dep = (services.get(name, {}).get("depends_on") or {})
            if not isinstance(dep, dict) or dep.get("init", {}).get("condition") != "service_completed_successfully":
                problem(f"compose: {name} must depend on init with condition service_completed_successfully")
    # Infrastructure ports like the local setup.
    kafka_host = published(services.get("kafka", {}))
    if 9092 not in kafka_host.values():
        problem("compose: kafka must be published on host port 9092")
    for name in ("clickhouse", "prometheus", "grafana"):
        port = INFRA_PORTS[name]
        if published(services.get(name, {})).get(port) != port:
            problem(f"compose: {name} must publish {port}:{port}")
    if "kafka:9092" not in str(runtime_env_value(services, "METERFLOW_KAFKA_BROKERS")):
        problem("compose: METERFLOW_KAFKA_BROKERS must point at kafka:9092")
    if "clickhouse:8123" not in str(runtime_env_value(services, "METERFLOW_CLICKHOUSE_URL")):
        problem("compose: METERFLOW_CLICKHOUSE_URL must point at http://clickhouse:8123")

    # Least privilege: every published port on loopback; secrets from the environment.
    for name, svc in services.items():
        for p in svc.get("ports", []) or []:
            if not str(p).startswith("127.0.0.1:"):
                problem(f"compose: {name} publishes {p!r}; publish on 127.0.0.1 only")
    genv = services.get("grafana", {}).get("environment", {}) or {}
    if str(genv.get("GF_AUTH_ANONYMOUS_ENABLED", "false")).lower() != "false":
        problem("compose: grafana must not allow anonymous access (GF_AUTH_ANONYMOUS_ENABLED)")
    if not str(genv.get("GF_SECURITY_ADMIN_PASSWORD", "")).startswith("${"):
        problem("compose: grafana's admin password must come from the environment")
    for var in ("METERFLOW_CH_WRITER_PASSWORD", "METERFLOW_CH_ANALYST_PASSWORD"):
        if not str((services.get("clickhouse", {}).get("environment") or {}).get(var, "")).startswith("${"):
            problem(f"compose: clickhouse: {var} must come from the environment")

    # Grafana.
    if "grafana-clickhouse-datasource" not in str(genv.get("GF_INSTALL_PLUGINS", "")):
        problem("compose: grafana must install grafana-clickhouse-datasource via GF_INSTALL_PLUGINS")
    home = genv.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        name = os.path.basename(str(home))
        if not os.path.isfile(os.path.join(GRAFANA, "dashboards", name)):
            problem(f"compose: GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH names {name}, not in deploy/grafana/dashboards")
    return services


def check_cluster_profile(services):
    """The compose `cluster` profile against deploy/clickhouse-cluster/*.xml."""
    import xml.etree.ElementTree as ET

    if services is None:
        return
    cdir = os.path.join(DEPLOY, "clickhouse-cluster")
    nodes = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("clickhouse/clickhouse-server:") and n != "clickhouse"}
    zk = services.get("zookeeper")
    if not zk or not str(zk.get("image", "")).startswith("zookeeper:"):
        problem("compose: profile cluster needs a zookeeper service running a pinned zookeeper image")
    if len(nodes) < 2:
        problem(f"compose: profile cluster needs two ClickHouse nodes, found {sorted(nodes)}")
    for n, svc in list(nodes.items()) + ([("zookeeper", zk)] if zk else []):
        if svc.get("profiles") != ["cluster"]:
            problem(f"compose: {n} must be in profile cluster only (got {svc.get('profiles')})")
    try:
        root = ET.parse(os.path.join(cdir, "cluster.xml")).getroot()
    except (OSError, ET.ParseError) as e:
        problem(f"deploy/clickhouse-cluster/cluster.xml: {e}")
        return
    clusters = root.find("remote_servers")
    names = [c.tag for c in clusters] if clusters is not None else []
    if len(names) != 1:
        problem(f"cluster.xml: expected one cluster in remote_servers, found {names}")
        return
    cluster = names[0]
    hosts = sorted(r.findtext("host") for r in clusters.iter("replica"))
    if hosts != sorted(nodes):
        problem(f"cluster.xml: remote_servers replicas {hosts} are not the compose nodes {sorted(nodes)}")
    if any(s.findtext("internal_replication") != "true" for s in clusters.iter("shard")):
        problem("cluster.xml: every shard needs internal_replication=true (replicated tables)")
    zk_hosts = [z.findtext("host") for z in root.iter("node")]
    if zk_hosts != ["zookeeper"]:
        problem(f"cluster.xml: zookeeper nodes {zk_hosts}, expected the zookeeper service")
    replicas = {}
    for n, svc in nodes.items():
        mounts = [str(v).split(":")[0:2] for v in svc.get("volumes", []) or []]
        targets = {t: src for src, t in mounts}
        if targets.get("/etc/clickhouse-server/config.d/cluster.xml") != "./clickhouse-cluster/cluster.xml":
            problem(f"compose: {n} must mount ./clickhouse-cluster/cluster.xml into config.d")
        if targets.get("/etc/clickhouse-server/users.d/consistency.xml") != "./clickhouse-cluster/consistency.xml":
            problem(f"compose: {n} must mount ./clickhouse-cluster/consistency.xml into users.d")
        macros_src = targets.get("/etc/clickhouse-server/config.d/macros.xml")
        if not macros_src:
            problem(f"compose: {n} mounts no macros.xml")
            continue
        try:
            m = ET.parse(os.path.normpath(os.path.join(DEPLOY, macros_src))).getroot()
        except (OSError, ET.ParseError) as e:
            problem(f"{macros_src}: {e}")
            continue
        rep = m.findtext("macros/replica")
        if rep != n or m.findtext("interserver_http_host") != n or not m.findtext("macros/shard"):
            problem(f"{macros_src}: replica macro and interserver_http_host must be {n} and a shard set")
        replicas[n] = rep
    if len(set(replicas.values())) != len(replicas):
        problem(f"compose: replica macros are not distinct: {replicas}")
    try:
        prof = ET.parse(os.path.join(cdir, "consistency.xml")).getroot().find("profiles/default")
        if prof is None or prof.findtext("insert_distributed_sync") != "1" or prof.findtext("load_balancing") != "in_order":
            problem("consistency.xml: the default profile must set insert_distributed_sync=1 and load_balancing=in_order")
    except (OSError, ET.ParseError) as e:
        problem(f"deploy/clickhouse-cluster/consistency.xml: {e}")
    init = services.get("cluster-init") or {}
    env = init.get("environment") or {}
    if init.get("command") != ["meterflow-admin", "migrate"] or env.get("METERFLOW_CLICKHOUSE_CLUSTER") != cluster:
        problem(f"compose: cluster-init must run [meterflow-admin, migrate] with METERFLOW_CLICKHOUSE_CLUSTER={cluster}")
    url = str(env.get("METERFLOW_CLICKHOUSE_URL", ""))
    if not any(url == f"http://{n}:8123" for n in nodes):
        problem(f"compose: cluster-init must migrate through a cluster node, not {url!r}")
    # The local cluster's settings are the same.
    with open(os.path.join(DEPLOY, "local", "cluster.sh"), encoding="utf-8") as f:
        local = f.read()
    for setting in ("<insert_distributed_sync>1</insert_distributed_sync>", "<load_balancing>in_order</load_balancing>",
                    "<internal_replication>true</internal_replication>", f"CLUSTER_NAME={cluster}"):
        if setting not in local:
            problem(f"deploy/local/cluster.sh lacks {setting} (compose's cluster profile has it)")


def runtime_env_value(services, var):
    for svc in services.values():
        env = svc.get("environment") or {}
        if isinstance(env, dict) and var in env:
            return env[var]
    return None


def check_prometheus():
    doc = load_yaml(PROMETHEUS)
    if not doc:
        return
    jobs = {}
    for sc in doc.get("scrape_configs", []):
        targets = [t for s in sc.get("static_configs", []) for t in s.get("targets", [])]
        jobs[sc.get("job_name")] = targets
    for name, port in PORTS.items():
        if jobs.get(name) != [f"{name}:{port}"]:
            problem(f"deploy/prometheus/prometheus.yml: job {name} must scrape [{name}:{port}], got {jobs.get(name)}")
    # Same jobs and ports as the local Prometheus.
    local = os.path.join(REPO, "deploy", "local", "services.sh")
    if os.path.isfile(local):
        with open(local, encoding="utf-8") as f:
            text = f.read()
        local_jobs = dict(re.findall(r"job_name:\s*(\w+)\s*\n\s*static_configs:\s*\n\s*- targets: \['127\.0\.0\.1:(\d+)'\]", text))
        for job, port in local_jobs.items():
            if job in PORTS and int(port) != PORTS[job]:
                problem(f"deploy/local/services.sh scrapes {job} on {port}, compose on {PORTS[job]}")
        missing = {j for j in local_jobs if j in PORTS} ^ set(PORTS)
        if missing:
            problem(f"jobs {sorted(missing)} are not scraped by both deploy/local/services.sh and deploy/prometheus/prometheus.yml")


BANNED_SQL = [
    (r"\bDateTime64\b", "DateTime64 (not in 18.16)"),
    (r"\bLowCardinality\b", "LowCardinality (not in 18.16)"),
    (r"\bJSON\b", "the JSON type (not in 18.16)"),
    (r"\bOVER\s*\(", "window functions (not in 18.16)"),
    (r"\bWITH\s+FILL\b", "WITH FILL (not in 18.16)"),
    (r"\btoStartOfInterval\b", "toStartOfInterval (not in 18.16)"),
    (r"fromUnixTimestamp64", "fromUnixTimestamp64* (not in 18.16)"),
    (r"\$__(timeInterval|timeInterval_ms|timeFilter_ms|fromTime_ms|toTime_ms|dateTimeFilter|dt)\b",
     "a macro that expands to SQL 18.16 lacks"),
]
ALLOWED_MACROS = {"timeFilter", "dateFilter", "fromTime", "toTime", "interval_s"}
PROM_MACROS = {"rate_interval", "interval"}


def check_grafana():
    ds_doc = load_yaml(os.path.join(GRAFANA, "provisioning", "datasources", "meterflow.yml")) or {}
    uids = {d.get("uid"): d.get("type") for d in ds_doc.get("datasources", [])}
    if uids.get("clickhouse") != "grafana-clickhouse-datasource" or uids.get("prometheus") != "prometheus":
        problem(f"grafana provisioning: expected data sources clickhouse and prometheus, got {uids}")
    ch = next((d for d in ds_doc.get("datasources", []) if d.get("uid") == "clickhouse"), {})
    jd = ch.get("jsonData", {})
    if (jd.get("host"), jd.get("port"), jd.get("defaultDatabase")) != ("clickhouse", 8123, "meterflow"):
        problem(f"grafana provisioning: the ClickHouse data source must use clickhouse:8123, database meterflow (got {jd})")
    if jd.get("username") != "meterflow_analyst":
        problem(f"grafana provisioning: the ClickHouse data source must use the read-only meterflow_analyst, not {jd.get('username')!r}")
    prov = load_yaml(os.path.join(GRAFANA, "provisioning", "dashboards", "meterflow.yml")) or {}
    paths = [p.get("options", {}).get("path") for p in prov.get("providers", [])]
    if paths != ["/etc/grafana/dashboards"]:
        problem(f"grafana provisioning: dashboards provider path must be /etc/grafana/dashboards (the compose mount), got {paths}")

    r = subprocess.run([sys.executable, os.path.join(GRAFANA, "build_dashboards.py"), "--check"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        problem("dashboards are stale: " + r.stderr.strip())

    boards = sorted(glob.glob(os.path.join(GRAFANA, "dashboards", "*.json")))
    if len(boards) < 3:
        problem(f"expected the three dashboards in deploy/grafana/dashboards, found {len(boards)}")
    seen_uids = set()
    n_targets = 0
    for path in boards:
        try:
            with open(path, encoding="utf-8") as f:
                board = json.load(f)
        except Exception as e:  # noqa: BLE001
            problem(f"{rel(path)}: not JSON: {e}")
            continue
        if board.get("uid") in seen_uids:
            problem(f"{rel(path)}: duplicate dashboard uid {board.get('uid')}")
        seen_uids.add(board.get("uid"))
        ids = set()
        for panel in board.get("panels", []):
            where = f"{os.path.basename(path)} / {panel.get('title')}"
            if panel.get("id") in ids:
                problem(f"{where}: duplicate panel id {panel.get('id')}")
            ids.add(panel.get("id"))
            if panel.get("type") == "row":
                if panel.get("panels"):
                    problem(f"{where}: collapsed rows hide panels from the checks; keep rows expanded")
                continue
            targets = panel.get("targets") or []
            if not targets:
                problem(f"{where}: no queries")
            for t in targets:
                n_targets += 1
                w = f"{where} / {t.get('refId')}"
                ds = t.get("datasource") or panel.get("datasource") or {}
                if uids.get(ds.get("uid")) != ds.get("type"):
                    problem(f"{w}: data source {ds} is not provisioned")
                if ds.get("type") == "grafana-clickhouse-datasource":
                    q = t.get("rawSql", "")
                    for pat, what in BANNED_SQL:
                        if re.search(pat, q, re.I if "OVER" in pat or "FILL" in pat else 0):
                            problem(f"{w}: uses {what}")
                    for m in re.findall(r"\$__(\w+)", q):
                        if m not in ALLOWED_MACROS:
                            problem(f"{w}: macro $__{m} is not one of {sorted(ALLOWED_MACROS)}")
                    if re.search(r"\$\{|\$(?!__)\w", q):
                        problem(f"{w}: template variables are not used by these dashboards")
                    if re.search(r"\bmeterflow\.\w", q):
                        problem(f"{w}: names the database; use the data source's default database")
                elif ds.get("type") == "prometheus":
                    q = t.get("expr", "")
                    for m in re.findall(r"\$__(\w+)", q):
                        if m not in PROM_MACROS:
                            problem(f"{w}: Prometheus macro $__{m} is not one of {sorted(PROM_MACROS)}")
    return n_targets


def main() -> int:
    check_dockerfile()
    services = check_compose()
    check_cluster_profile(services)
    check_prometheus()
    n = check_grafana()
    for p in problems:
        print(f"check-compose: {p}", file=sys.stderr)
    if problems:
        print(f"check-compose: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check-compose: OK (compose, Dockerfile, Prometheus, Grafana provisioning, {n} dashboard queries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
