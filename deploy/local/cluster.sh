#!/usr/bin/env bash
# A local ClickHouse *cluster* for the cluster tests, beside (never instead of) the single-node
# services of services.sh: ZooKeeper and three clickhouse-server 18.16 processes, all on
# loopback, from generated configs:
#
#   zookeeper  127.0.0.1:12181 (Debian's zookeeper 3.8 on the installed Java runtime)
#   ch1        shard 1, replica ch1   HTTP 127.0.0.1:18123  native 19000  interserver 19009
#   ch2        shard 1, replica ch2   HTTP 127.0.0.1:18124  native 19001  interserver 19010
#   ch3        shard 2, replica ch3   HTTP 127.0.0.1:18125  native 19002  interserver 19011
#
# Two shards (a tenant lives on one: the Distributed tables shard by cityHash64(tenant)) and a
# replicated first shard (so a replica can be stopped and must catch up), in three processes:
# the smallest topology that exercises both on a shared 2-core machine. The cluster is named
# `meterflow` in remote_servers; `meterflow-admin migrate --cluster meterflow` creates the
# replicated and Distributed tables through any node.
#
# usage: cluster.sh start|stop|restart|status [all|zookeeper|ch1|ch2|ch3]...
#
# State is in $METERFLOW_STATE/cluster/<component> (data, logs, pid file, generated config).
# Like services.sh: `start` installs what is missing, is a no-op for what runs, waits until each
# answers (METERFLOW_READY_TIMEOUT, default 60 s) and names the log on failure; `stop` only
# signals processes it started (pid file checked against the command line and state dir);
# `status` exits 3 unless every named component runs. Ports move with
# METERFLOW_CLUSTER_ZK_PORT (12181), METERFLOW_CLUSTER_HTTP_PORT (18123, +1 per node),
# METERFLOW_CLUSTER_TCP_PORT (19000, +1 per node), METERFLOW_CLUSTER_INTERSERVER_PORT (19009).
set -euo pipefail
# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CLUSTER_NAME=meterflow
ZK_PORT="${METERFLOW_CLUSTER_ZK_PORT:-12181}"
HTTP_BASE="${METERFLOW_CLUSTER_HTTP_PORT:-18123}"
TCP_BASE="${METERFLOW_CLUSTER_TCP_PORT:-19000}"
INTERSERVER_BASE="${METERFLOW_CLUSTER_INTERSERVER_PORT:-19009}"
# node -> shard; the replica name is the node name.
NODES=(ch1 ch2 ch3)
declare -A NODE_SHARD=([ch1]=1 [ch2]=1 [ch3]=2)
declare -A NODE_INDEX=([ch1]=0 [ch2]=1 [ch3]=2)
CLUSTER_COMPONENTS=(zookeeper "${NODES[@]}")

# common.sh's helpers (running_pid, pid_is_ours, fail_with_log, ...) call these; the cluster's
# components live under their own state dir, so the single node's pid files are never read.
comp_dir() { printf '%s/cluster/%s' "$MF_STATE" "$1"; }
comp_log() { printf '%s/cluster/%s/%s.log' "$MF_STATE" "$1" "$1"; }
comp_pidfile() { printf '%s/cluster/%s/%s.pid' "$MF_STATE" "$1" "$1"; }
comp_program() {
    case "$1" in
        zookeeper) printf 'QuorumPeerMain' ;;
        ch1 | ch2 | ch3) printf 'clickhouse' ;;
        *) die "unknown cluster component '$1' (known: ${CLUSTER_COMPONENTS[*]})" ;;
    esac
}
http_port() { echo $((HTTP_BASE + NODE_INDEX[$1])); }
tcp_port() { echo $((TCP_BASE + NODE_INDEX[$1])); }
interserver_port() { echo $((INTERSERVER_BASE + NODE_INDEX[$1])); }
comp_main_port() {
    case "$1" in
        zookeeper) echo "$ZK_PORT" ;;
        *) http_port "$1" ;;
    esac
}
comp_ports() {
    case "$1" in
        zookeeper) echo "$ZK_PORT" ;;
        *) echo "$(http_port "$1") $(tcp_port "$1") $(interserver_port "$1")" ;;
    esac
}
comp_describe() {
    case "$1" in
        zookeeper) echo "ZooKeeper 127.0.0.1:$ZK_PORT" ;;
        *) echo "shard ${NODE_SHARD[$1]} replica $1, HTTP 127.0.0.1:$(http_port "$1"), native $(tcp_port "$1")" ;;
    esac
}
# Overrides common.sh's: the cluster's ClickHouse logs are in the node's dir.
fail_with_log() {
    local comp="$1" msg="$2" logf dir
    logf="$(comp_log "$comp")"
    dir="$(comp_dir "$comp")"
    {
        printf '[meterflow] ERROR: %s: %s\n' "$comp" "$msg"
        printf '[meterflow] ERROR: read the log: %s\n' "$logf"
        if [[ -s "$logf" ]]; then
            printf '[meterflow] ---- last lines of %s ----\n' "$logf"
            tail -n 15 "$logf" | sed 's/^/    /'
        fi
        if [[ -s "$dir/clickhouse-server.err.log" ]]; then
            printf '[meterflow] ---- ClickHouse error log %s ----\n' "$dir/clickhouse-server.err.log"
            grep -v '^[0-9]*\. ' "$dir/clickhouse-server.err.log" | tail -n 5 | cut -c1-300 | sed 's/^/    /'
        fi
    } >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# install

# Debian's zookeeper 3.8 (it pulls a Java runtime). Only the jars are used: the server runs from
# our generated zoo.cfg, never as a system service.
install_zookeeper() {
    if [[ -f /usr/share/java/zookeeper.jar ]] && have java; then
        return 0
    fi
    log "zookeeper: installing zookeeper (and a Java runtime)"
    apt_install --no-install-recommends zookeeper || die "zookeeper: apt-get install failed"
    [[ -f /usr/share/java/zookeeper.jar ]] || die "zookeeper: /usr/share/java/zookeeper.jar missing after install"
}

# ---------------------------------------------------------------------------------------------
# generated configs

write_zookeeper_config() {
    local dir="$1"
    mkdir -p "$dir/data"
    cat >"$dir/zoo.cfg" <<EOF
# Generated by deploy/local/cluster.sh; edits are overwritten on start.
tickTime=2000
initLimit=10
syncLimit=5
dataDir=$dir/data
clientPort=$ZK_PORT
clientPortAddress=$MF_HOST
# No Jetty admin server (it would take 8080 on every address).
admin.enableServer=false
maxClientCnxns=200
autopurge.snapRetainCount=3
autopurge.purgeInterval=1
EOF
}

write_node_config() {
    local node="$1" dir="$2" n shard_xml=""
    mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas"
    # remote_servers: every node knows the whole cluster. internal_replication: a Distributed
    # insert goes to one replica of the shard and ReplicatedMergeTree copies it to the others
    # (without it the Distributed table would write every replica itself, and a replica down
    # would diverge for good).
    local s
    for s in $(printf '%s\n' "${NODE_SHARD[@]}" | sort -u); do
        shard_xml+="      <shard>
        <internal_replication>true</internal_replication>
"
        for n in "${NODES[@]}"; do
            if [[ "${NODE_SHARD[$n]}" == "$s" ]]; then
                shard_xml+="        <replica><host>$MF_HOST</host><port>$(tcp_port "$n")</port></replica>
"
            fi
        done
        shard_xml+="      </shard>
"
    done
    cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<!-- Generated by deploy/local/cluster.sh; edits are overwritten on start. -->
<yandex>
  <logger>
    <level>information</level>
    <log>$dir/clickhouse-server.log</log>
    <errorlog>$dir/clickhouse-server.err.log</errorlog>
    <size>100M</size>
    <count>2</count>
  </logger>
  <http_port>$(http_port "$node")</http_port>
  <tcp_port>$(tcp_port "$node")</tcp_port>
  <interserver_http_port>$(interserver_port "$node")</interserver_http_port>
  <interserver_http_host>$MF_HOST</interserver_http_host>
  <listen_host>$MF_HOST</listen_host>
  <max_connections>512</max_connections>
  <keep_alive_timeout>10</keep_alive_timeout>
  <max_concurrent_queries>100</max_concurrent_queries>
  <uncompressed_cache_size>268435456</uncompressed_cache_size>
  <mark_cache_size>268435456</mark_cache_size>
  <path>$dir/data/</path>
  <tmp_path>$dir/tmp/</tmp_path>
  <user_files_path>$dir/user_files/</user_files_path>
  <format_schema_path>$dir/format_schemas/</format_schema_path>
  <users_config>$dir/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mlock_executable>false</mlock_executable>
  <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
  <max_session_timeout>3600</max_session_timeout>
  <default_session_timeout>60</default_session_timeout>
  <remote_servers>
    <$CLUSTER_NAME>
$shard_xml    </$CLUSTER_NAME>
  </remote_servers>
  <zookeeper>
    <node><host>$MF_HOST</host><port>$ZK_PORT</port></node>
    <session_timeout_ms>10000</session_timeout_ms>
  </zookeeper>
  <macros>
    <cluster>$CLUSTER_NAME</cluster>
    <shard>${NODE_SHARD[$node]}</shard>
    <replica>$node</replica>
  </macros>
  <distributed_ddl>
    <path>/clickhouse/task_queue/ddl</path>
  </distributed_ddl>
</yandex>
EOF
    # The default profile carries the consistency the services rely on (docs/scaling.md,
    # "Consistency"): a Distributed insert returns once the shard's replica has the rows
    # (insert_distributed_sync), and reads and writes go to the first live replica of each shard
    # (load_balancing in_order), so a checkpoint is read from the replica that wrote it while
    # that replica lives.
    cat >"$dir/users.xml" <<EOF
<?xml version="1.0"?>
<!-- Generated by deploy/local/cluster.sh; edits are overwritten on start. -->
<yandex>
  <profiles>
    <default>
      <max_memory_usage>4000000000</max_memory_usage>
      <use_uncompressed_cache>0</use_uncompressed_cache>
      <load_balancing>in_order</load_balancing>
      <insert_distributed_sync>1</insert_distributed_sync>
      <distributed_ddl_task_timeout>120</distributed_ddl_task_timeout>
    </default>
    <readonly>
      <readonly>1</readonly>
    </readonly>
  </profiles>
  <users>
    <default>
      <password></password>
      <networks replace="replace">
        <ip>127.0.0.1</ip>
        <ip>::1</ip>
      </networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas>
    <default>
      <interval>
        <duration>3600</duration>
        <queries>0</queries>
        <errors>0</errors>
        <result_rows>0</result_rows>
        <read_rows>0</read_rows>
        <execution_time>0</execution_time>
      </interval>
    </default>
  </quotas>
</yandex>
EOF
}

# ---------------------------------------------------------------------------------------------
# per-component command line and readiness

comp_command() {
    local comp="$1" dir
    dir="$(comp_dir "$comp")"
    case "$comp" in
        zookeeper)
            # zookeeper.jar's manifest names its dependencies; slf4j-simple logs to stderr.
            CMD=(java -Xms64m -Xmx256m -XX:+UseSerialGC
                -Dzookeeper.4lw.commands.whitelist=ruok,srvr,stat,mntr
                -Dzookeeper.log.dir="$dir"
                -cp "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar"
                org.apache.zookeeper.server.quorum.QuorumPeerMain "$dir/zoo.cfg")
            ;;
        *)
            CMD=(clickhouse-server "--config-file=$dir/config.xml")
            ;;
    esac
}

zk_ask() {
    timeout 3 bash -c "exec 3<>/dev/tcp/$MF_HOST/$ZK_PORT; printf '%s' '$1' >&3; cat <&3" 2>/dev/null
}

ch_query() {
    local node="$1" q="$2"
    curl -fsS --max-time 5 "http://$MF_HOST:$(http_port "$node")/" --data-binary "$q" 2>/dev/null
}

comp_ready() {
    local comp="$1" pid="$2"
    case "$comp" in
        zookeeper)
            pid_listens_on "$pid" "$ZK_PORT" || return 1
            [[ "$(zk_ask ruok)" == imok ]]
            ;;
        *)
            pid_listens_on "$pid" "$(http_port "$comp")" || return 1
            [[ "$(ch_query "$comp" 'SELECT 1')" == 1 ]] || return 1
            # Replicated tables and ON CLUSTER DDL need the ZooKeeper session.
            [[ "$(ch_query "$comp" "SELECT count() > 0 FROM system.zookeeper WHERE path = '/'")" == 1 ]]
            ;;
    esac
}

# ---------------------------------------------------------------------------------------------
# actions (the same shape as services.sh)

start_one() {
    local comp="$1" dir logf pidfile pid
    if pid="$(running_pid "$comp")"; then
        log "$comp: already running (pid $pid; $(comp_describe "$comp"))"
        return 0
    fi
    case "$comp" in
        zookeeper) install_zookeeper ;;
        *)
            "$HERE/install.sh" clickhouse
            # A node needs ZooKeeper to be ready.
            running_pid zookeeper >/dev/null || start_one zookeeper
            ;;
    esac
    dir="$(comp_dir "$comp")"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd -P)"
    logf="$(comp_log "$comp")"
    pidfile="$(comp_pidfile "$comp")"

    local port holders
    for port in $(comp_ports "$comp"); do
        if port_in_use "$port"; then
            holders="$(listeners_on "$port" | while read -r p; do describe_pid "$p"; echo; done)"
            printf '[meterflow] %s: 127.0.0.1:%s is already in use by %s\n' "$comp" "$port" "${holders:-another process}" >>"$logf"
            fail_with_log "$comp" "port $port is already in use by ${holders:-another process} (not started by this script); stop it or free the port"
        fi
    done

    case "$comp" in
        zookeeper) write_zookeeper_config "$dir" ;;
        *) write_node_config "$comp" "$dir" ;;
    esac
    comp_command "$comp"
    printf '\n[meterflow] ==== %s starting at %s: %s\n' "$comp" "$(date -u +%FT%TZ)" "${CMD[*]}" >>"$logf"
    (cd "$dir" && exec setsid "${CMD[@]}" >>"$logf" 2>&1 </dev/null) &
    pid=$!
    echo "$pid" >"$pidfile"
    log "$comp: started (pid $pid), waiting up to ${MF_READY_TIMEOUT}s for it to be ready; log: $logf"

    local start
    start="$(now_s)"
    while true; do
        if ! kill -0 "$pid" 2>/dev/null || [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]]; then
            wait "$pid" 2>/dev/null || true
            rm -f "$pidfile"
            fail_with_log "$comp" "exited during start-up"
        fi
        if comp_ready "$comp" "$pid"; then
            break
        fi
        if (($(now_s) - start >= MF_READY_TIMEOUT)); then
            kill -TERM "$pid" 2>/dev/null || true
            sleep 1
            kill -KILL "$pid" 2>/dev/null || true
            rm -f "$pidfile"
            fail_with_log "$comp" "not ready after ${MF_READY_TIMEOUT}s (stopped it again)"
        fi
        sleep 0.5
    done
    log "$comp: ready in $(($(now_s) - start))s ($(comp_describe "$comp"))"
}

# SIGTERM, then SIGKILL after 30 s; `kill` sends SIGKILL at once (a crash, for fault tests).
stop_one() {
    local comp="$1" signal="${2:-TERM}" pid pidfile start
    pidfile="$(comp_pidfile "$comp")"
    if ! pid="$(running_pid "$comp")"; then
        log "$comp: not running (nothing to stop)"
        return 0
    fi
    log "$comp: stopping (pid $pid, SIG$signal)"
    kill "-$signal" "$pid" 2>/dev/null || true
    start="$(now_s)"
    while pid_is_ours "$comp" "$pid"; do
        if (($(now_s) - start >= 30)); then
            warn "$comp: pid $pid did not exit 30s after SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.2
    done
    rm -f "$pidfile"
    local port
    for port in $(comp_ports "$comp"); do
        start="$(now_s)"
        while pid_listens_on "$pid" "$port" && (($(now_s) - start < 10)); do sleep 0.2; done
    done
    log "$comp: stopped"
}

status_one() {
    local comp="$1" pid
    if pid="$(running_pid "$comp")"; then
        if comp_ready "$comp" "$pid"; then
            printf '%-10s running  pid %-7s %s; log %s\n' "$comp" "$pid" "$(comp_describe "$comp")" "$(comp_log "$comp")"
            return 0
        fi
        printf '%-10s UNHEALTHY pid %-7s (process up but not answering) %s; log %s\n' "$comp" "$pid" "$(comp_describe "$comp")" "$(comp_log "$comp")"
        return 3
    fi
    printf '%-10s stopped\n' "$comp"
    return 3
}

usage() {
    echo "usage: $0 start|stop|kill|restart|status [all|${CLUSTER_COMPONENTS[*]// /|}]..." >&2
    exit 2
}

main() {
    (($# >= 1)) || usage
    local action="$1" comps=() c i rc=0
    shift
    for a in "$@"; do
        case "$a" in
            all) comps+=("${CLUSTER_COMPONENTS[@]}") ;;
            zookeeper | ch1 | ch2 | ch3) comps+=("$a") ;;
            *) usage ;;
        esac
    done
    ((${#comps[@]})) || comps=("${CLUSTER_COMPONENTS[@]}")
    mkdir -p "$MF_STATE/cluster"
    case "$action" in
        start) for c in "${comps[@]}"; do start_one "$c"; done ;;
        stop) for ((i = ${#comps[@]} - 1; i >= 0; i--)); do stop_one "${comps[$i]}"; done ;;
        kill) for ((i = ${#comps[@]} - 1; i >= 0; i--)); do stop_one "${comps[$i]}" KILL; done ;;
        restart)
            for ((i = ${#comps[@]} - 1; i >= 0; i--)); do stop_one "${comps[$i]}"; done
            for c in "${comps[@]}"; do start_one "$c"; done
            ;;
        status)
            log "cluster state dir: $MF_STATE/cluster (cluster '$CLUSTER_NAME': shard 1 = ch1, ch2; shard 2 = ch3)"
            for c in "${comps[@]}"; do status_one "$c" || rc=3; done
            ;;
        *) usage ;;
    esac
    return "$rc"
}

main "$@"
