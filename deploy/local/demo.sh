#!/usr/bin/env bash
# `make demo`: the whole pipeline on ~1M events, on one machine, checked against the ground truth.
#
# usage: demo.sh run | stop | status | summary
#
#   run      1. start the local services (services.sh start all: broker, ClickHouse, Prometheus;
#               installs/builds what is missing)
#            2. build the release binaries (admin, aggregator, rater, producer, demo-summary)
#            3. stop the aggregator/rater a previous demo left running
#            4. reset the default names: delete topics meterflow.* and the consumer groups,
#               drop database meterflow; then `meterflow-admin init` recreates them empty
#            5. start meterflow-aggregator, meterflow-rater and meterflow-api on their default
#               ports 9101/9102/9104 (Prometheus scrapes them): meterflow-demo-summary start,
#               the testkit supervisor, detached so that they outlive the demo
#            6. publish prepaid wallet top-ups for ten tenants
#            7. meterflow-producer generate: METERFLOW_DEMO_EVENTS messages (1,000,000) at
#               METERFLOW_DEMO_RATE messages/s (16,667: one minute), real-time event time,
#               10% duplicates, 5% late, 1% malformed, 0.1% too late; ground truth to
#               .state/demo/truth.json
#            8. wait until ClickHouse equals the ground truth (METERFLOW_DEMO_TIMEOUT s, 900)
#            9. print the summary (meterflow-demo-summary report) and where to look next
#            The aggregator and the rater keep running afterwards.
#   stop     stop the demo's aggregator and rater (the local services stay up: `make down`)
#   status   are they running; where are their logs
#   summary  print the summary of the last run again (re-checked against ClickHouse)
#
# The work is meterflow-demo-summary's (tools/bin/demo_summary.rs: reset, start/stop/status of
# the services under the testkit supervisor, top-ups, API traffic, wait, report, balance). What
# stays here needs a shell or must run before that binary exists: `make up` (installs), the
# cargo builds, the producer with its progress bar on the terminal, and the step timings.
#
# Every run starts from empty topics and an empty database, so its summary is about that run
# only; the previous run's data is gone. State: .state/demo/ (pid files, logs, truth.json,
# wallets.json, summary.txt). Other METERFLOW_* variables (topics, database, brokers, ...)
# are honoured by every step, as by the services themselves.
set -euo pipefail
# shellcheck source=deploy/local/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEMO_DIR="$MF_STATE/demo"
EVENTS="${METERFLOW_DEMO_EVENTS:-1000000}"
RATE="${METERFLOW_DEMO_RATE:-16667}"
TIMEOUT="${METERFLOW_DEMO_TIMEOUT:-900}"
TARGET_DIR="${CARGO_TARGET_DIR:-$MF_REPO/target}"
BIN="$TARGET_DIR/release"
CARGO="${CARGO:-cargo}"
AGG_PORT=9101
RATER_PORT=9102
PRODUCER_PORT=9103
API_PORT=9104
# CloudEvents sent through meterflow-api (each feeds three meters); 0 sends none.
API_EVENTS="${METERFLOW_DEMO_API_EVENTS:-20000}"
CH_HTTP="http://$MF_HOST:$CLICKHOUSE_HTTP_PORT"
DATABASE="${METERFLOW_CLICKHOUSE_DATABASE:-meterflow}"
# The aggregator, the rater and the producer find config/ relative to the repository.
export METERFLOW_CLICKHOUSE_URL="${METERFLOW_CLICKHOUSE_URL:-$CH_HTTP}"
export METERFLOW_KAFKA_BROKERS="${METERFLOW_KAFKA_BROKERS:-$MF_HOST:$BROKER_PORT}"

# Seconds since a `date +%s.%N` timestamp, one decimal.
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

step_no=0
step_started=0
TIMINGS=()
step() {
    finish_step
    step_no=$((step_no + 1))
    step_name="$1"
    step_started="$(date +%s.%N)"
    printf '\n\033[1m==> [%d/10] %s\033[0m\n' "$step_no" "$1"
}
finish_step() {
    if ((step_no > 0)) && [[ -n "${step_name:-}" ]]; then
        TIMINGS+=("$(printf '%-46s %6s s' "$step_name" "$(since "$step_started")")")
        step_name=""
    fi
}

# ---------------------------------------------------------------------------------------------
# the demo's own processes: pid files in .state/demo, recognised by a marker in their
# environment; meterflow-demo-summary start/stop/status manage them (tools/bin/demo_services.rs)

svc_log() { printf '%s/%s.log' "$DEMO_DIR" "$1"; }

demo_tool() {
    [[ -x "$BIN/meterflow-demo-summary" ]] ||
        die "$BIN/meterflow-demo-summary is not built (make demo builds it; or cargo build --release -p meterflow-tools --bin meterflow-demo-summary)"
    (cd "$MF_REPO" && CARGO="$CARGO" CARGO_TARGET_DIR="$TARGET_DIR" "$BIN/meterflow-demo-summary" "$@")
}

# ---------------------------------------------------------------------------------------------

summary_args() {
    SUMMARY_ARGS=(--truth "$DEMO_DIR/truth.json" --credits "$DEMO_DIR/wallets.json"
        --catalog "$MF_REPO/config/catalog.toml")
    if [[ -f "$DEMO_DIR/api_truth.json" ]]; then
        SUMMARY_ARGS+=(--api-truth "$DEMO_DIR/api_truth.json")
    fi
}

where_next() {
    local db="$DATABASE" portal
    portal="$(demo_tool portal-link --api "http://$MF_HOST:$API_PORT" --tenant tenant-000 2>/dev/null || true)"
    cat <<EOF

== Where to look next (the aggregator and the rater keep running)
  Prometheus UI   http://$MF_HOST:$PROMETHEUS_PORT/graph?g0.expr=sum(rate(meterflow_aggregator_events_in_total%5B30s%5D))&g0.range_input=15m
                  also try: meterflow_rater_revenue, meterflow_rater_margin, meterflow_rater_wallet_balance,
                  meterflow_aggregator_dead_letters_total, meterflow_aggregator_watermark_lag_seconds
  /metrics        http://$MF_HOST:$AGG_PORT/metrics (aggregator)   http://$MF_HOST:$RATER_PORT/metrics (rater)   http://$MF_HOST:$API_PORT/metrics (api)
  HTTP API        http://$MF_HOST:$API_PORT/openapi.json; keys: $BIN/meterflow-admin keys create --tenant tenant-042 (README "HTTP API")
  customer page   ${portal:-(no link: is meterflow-api running?)}
                  (tenant-000's usage, balance and invoice preview; a signed link valid 24 h, docs/api.md "Customer page")
                  (the producer's, http://$MF_HOST:$PRODUCER_PORT/metrics, only while it generates)
  logs            $(svc_log aggregator)  $(svc_log rater)  $DEMO_DIR/producer.log
  files           $DEMO_DIR/truth.json (ground truth)  $DEMO_DIR/wallets.json  $DEMO_DIR/summary.txt
  ClickHouse      clickhouse-client --port $CLICKHOUSE_TCP_PORT --database $db
    SELECT tenant, meter, sum(value) AS usage FROM meter_totals GROUP BY tenant, meter ORDER BY usage DESC LIMIT 10;
    SELECT tenant, sum(revenue) AS revenue, sum(cost) AS cost, sum(margin) AS margin FROM revenue_daily GROUP BY tenant ORDER BY revenue DESC LIMIT 10;
    SELECT reason, count() FROM dead_letters GROUP BY reason ORDER BY count() DESC;
    SELECT * FROM wallet_balances WHERE credited > 0 ORDER BY balance;
    SELECT tenant, meter, window_start, revision, value, previous_value FROM meter_aggregates WHERE revision > 0 LIMIT 10;
  or over HTTP    curl '$CH_HTTP/?database=$db' --data-binary 'SELECT count() FROM usage_events'
  one more event  $BIN/meterflow-producer send --tenant tenant-042 --meter input_tokens --quantity 1200 -d model=gpt-4o -d region=eu-west
  re-check        make demo-summary        a fresh run: make demo
  stop            make demo-stop (aggregator + rater), then make down (broker, ClickHouse, Prometheus)
EOF
}

cmd_run() {
    mkdir -p "$DEMO_DIR"
    local t0 pid_agg pid_rater rc=0
    t0="$(date +%s.%N)"
    printf '\033[1mmeterflow demo\033[0m: %s messages at %s/s into %s, database %s (state %s)\n' \
        "$EVENTS" "$RATE" "${METERFLOW_USAGE_TOPIC:-meterflow.usage-events}" "$DATABASE" "$DEMO_DIR"

    step "local services (make up)"
    "$HERE/services.sh" start all

    step "release build"
    have "$CARGO" || die "cargo not found: install Rust (https://rustup.rs), then re-run"
    CARGO_TARGET_DIR="$TARGET_DIR" "$CARGO" build --release -p meterflow-admin -p meterflow-producer
    # One package at a time, as the testkit supervisor builds what it starts (procs::bin_path),
    # so that its build is a no-op: a combined build may unify features differently and relink.
    local svc
    for svc in aggregator rater api; do
        CARGO_TARGET_DIR="$TARGET_DIR" "$CARGO" build --release -p "meterflow-$svc" --bin "meterflow-$svc"
    done
    CARGO_TARGET_DIR="$TARGET_DIR" "$CARGO" build --release -p meterflow-tools --bin meterflow-demo-summary

    step "stop a previous demo's services"
    demo_tool stop --state "$DEMO_DIR" api rater aggregator

    step "reset topics + database, meterflow-admin init"
    demo_tool reset
    METERFLOW_LOG=warn "$BIN/meterflow-admin" init
    rm -f "$DEMO_DIR/truth.json" "$DEMO_DIR/wallets.json" "$DEMO_DIR/summary.txt" "$DEMO_DIR/api_truth.json"

    step "start aggregator + rater + api"
    # Under the testkit supervisor (meterflow_testkit::procs), like the tests' and the bench's
    # services, but detached: they keep running after the demo.
    demo_tool start --state "$DEMO_DIR" "aggregator=$AGG_PORT" "rater=$RATER_PORT" "api=$API_PORT"
    pid_agg="$(cat "$DEMO_DIR/aggregator.pid")"
    pid_rater="$(cat "$DEMO_DIR/rater.pid")"

    step "wallet top-ups (through meterflow-api), $API_EVENTS CloudEvents through meterflow-api"
    demo_tool top-up --credits "$DEMO_DIR/wallets.json" --api "http://$MF_HOST:$API_PORT"
    if ((API_EVENTS > 0)); then
        demo_tool api-traffic --api "http://$MF_HOST:$API_PORT" \
            --events "$API_EVENTS" --out "$DEMO_DIR/api_truth.json"
    fi

    step "generate $EVENTS messages"
    local metrics_addr="$MF_HOST:$PRODUCER_PORT"
    if port_in_use "$PRODUCER_PORT"; then
        warn "127.0.0.1:$PRODUCER_PORT is in use ($(listeners_on "$PRODUCER_PORT" | head -n1 | { read -r p && describe_pid "$p"; } || true)); the producer's /metrics goes to a free port instead (Prometheus will not see it)"
        metrics_addr="$MF_HOST:0"
    fi
    # Progress bar on the terminal (stderr); the summary also into producer.log.
    (cd "$MF_REPO" && "$BIN/meterflow-producer" generate --events "$EVENTS" --rate "$RATE" \
        --too-late-rate 0.001 --metrics-addr "$metrics_addr" \
        --ground-truth "$DEMO_DIR/truth.json") | tee "$DEMO_DIR/producer.log"

    step "wait for the pipeline to catch up"
    summary_args
    demo_tool wait "${SUMMARY_ARGS[@]}" --timeout "$TIMEOUT" \
        --watch-pid "aggregator=$pid_agg" --watch-pid "rater=$pid_rater" || rc=$?

    step "summary"
    demo_tool report "${SUMMARY_ARGS[@]}" | tee "$DEMO_DIR/summary.txt" || rc=1
    finish_step

    step "balance check (meterflow-api, from memory)"
    # Real-time control: answered from meterflow-api's memory, with an admin key made for it.
    demo_tool balance --api "http://$MF_HOST:$API_PORT" || rc=1
    finish_step

    where_next
    printf '\n== Timings\n'
    printf '  %s\n' "${TIMINGS[@]}"
    printf '  %-46s %6s s\n' "total" "$(since "$t0")"
    if ((rc != 0)); then
        printf '\n[meterflow] the demo did NOT end in agreement with the ground truth; logs: %s %s\n' "$(svc_log aggregator)" "$(svc_log rater)" >&2
    fi
    return "$rc"
}

cmd_stop() {
    demo_tool stop --state "$DEMO_DIR" api rater aggregator
}

cmd_status() {
    demo_tool status --state "$DEMO_DIR" "aggregator=$AGG_PORT" "rater=$RATER_PORT" "api=$API_PORT"
}

cmd_summary() {
    [[ -f "$DEMO_DIR/truth.json" && -f "$DEMO_DIR/wallets.json" ]] || die "no demo run to summarise (run 'make demo' first)"
    summary_args
    local rc=0
    demo_tool report "${SUMMARY_ARGS[@]}" | tee "$DEMO_DIR/summary.txt" || rc=1
    where_next
    return "$rc"
}

case "${1:-run}" in
    run) cmd_run ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    summary) cmd_summary ;;
    *)
        echo "usage: $0 run|stop|status|summary" >&2
        exit 2
        ;;
esac
