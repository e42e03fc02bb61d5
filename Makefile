# meterflow developer targets. Local services (broker, ClickHouse, Prometheus) are managed by
# deploy/local/services.sh; see docs/configuration.md "Local services".
#
#   make up | down | status          start / stop / show the local services
#   make restart-broker              (also start-/stop-/restart- + broker|clickhouse|prometheus)
#   make build                       release build of the workspace
#   make test                        make up, cargo test, DDL check on current ClickHouse, clippy
#   make init                        topics + migrations for the default names (meterflow.*)
#   make demo                        the whole pipeline on ~1M events, checked (demo-stop, demo-status, demo-summary)
#   make bench | chaos               benchmark table (target/bench/bench.md) / fault-injection run
#   make bench-core                  criterion benchmarks of meterflow-core
#   make up-cluster | down-cluster   ZooKeeper + 3 ClickHouse nodes (2 shards, shard 1 replicated) beside `make up`
#   make status-cluster | test-cluster   the cluster's processes / meterflow on the cluster (tests/e2e/cluster.rs)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
SERVICES := deploy/local/services.sh
COMPONENTS := broker clickhouse prometheus
# The admin binary, built on demand (release, shared with `make build`).
ADMIN := $(CARGO) run --quiet --release -p meterflow-admin --

.PHONY: help up down status install build test test-rust pyenv check-ddl check-compose clippy machete init demo bench bench-usage chaos bench-core \
	$(foreach c,$(COMPONENTS),start-$(c) stop-$(c) restart-$(c) status-$(c))

help:
	@sed -n 's/^#   //p' $(MAKEFILE_LIST)

## --- local services ---------------------------------------------------------------------

# Installs what is missing (the broker is built once into ~/.cache/meterflow, ~25 min on a
# fresh machine), starts broker, ClickHouse and Prometheus on loopback and waits until each
# answers. A no-op for what already runs. METERFLOW_BROKER_STORAGE=memory for benchmarks.
up:
	@$(SERVICES) start all

# Stops what `make up` started (and nothing else), and the local cluster if it runs.
down:
	@deploy/local/demo.sh stop
	@$(SERVICES) stop all
	@deploy/local/cluster.sh stop all

# The local ClickHouse cluster (deploy/local/cluster.sh; docs/clickhouse.md "A ClickHouse cluster"): ZooKeeper
# on 127.0.0.1:12181 and ch1/ch2/ch3 on HTTP 18123-18125, native 19000-19002. It never touches
# the single node on 8123/9000; the broker still comes from `make up`.
.PHONY: up-cluster down-cluster status-cluster test-cluster
up-cluster:
	@deploy/local/cluster.sh start all

down-cluster:
	@deploy/local/cluster.sh stop all

status-cluster:
	@deploy/local/cluster.sh status all || true

# meterflow with the cluster form of the schema: schema on every node, checkpoint
# read-your-writes, services writing through the cluster exactly, a replica SIGKILLed during
# ingest catching up; then the rater's end-to-end test unchanged, on a cluster-form database
# (meterflow-testkit reads METERFLOW_CLICKHOUSE_CLUSTER). Needs the broker (make up) too.
test-cluster:
	@$(MAKE) --no-print-directory up
	@$(MAKE) --no-print-directory up-cluster
	$(CARGO) test -p meterflow-e2e --features cluster --test cluster -- --nocapture
	METERFLOW_CLICKHOUSE_URL=http://127.0.0.1:18123 METERFLOW_CLICKHOUSE_CLUSTER=meterflow \
		$(CARGO) test -p meterflow-e2e --test rater charges_wallets_and_metrics_match_ground_truth

status:
	@$(SERVICES) status all || true

install:
	@deploy/local/install.sh all

define component_targets
start-$(1):
	@$(SERVICES) start $(1)
stop-$(1):
	@$(SERVICES) stop $(1)
restart-$(1):
	@$(SERVICES) restart $(1)
status-$(1):
	@$(SERVICES) status $(1)
endef
$(foreach c,$(COMPONENTS),$(eval $(call component_targets,$(c))))

## --- build and test ---------------------------------------------------------------------

build:
	$(CARGO) build --release --workspace

# Tests create their own database and topics (meterflow-testkit), so no `init` here.
# Sequential even under `make -j`.
test:
	@$(MAKE) --no-print-directory up
	@$(MAKE) --no-print-directory check-ddl
	@$(MAKE) --no-print-directory check-compose
	@$(MAKE) --no-print-directory pyenv
	@deploy/local/install.sh chromium
	@$(MAKE) --no-print-directory test-rust
	@$(MAKE) --no-print-directory fuzz-short
	@$(MAKE) --no-print-directory clippy
	@$(MAKE) --no-print-directory machete

test-rust:
	$(CARGO) test --workspace --no-fail-fast

# fastavro (PyPI) in ~/.cache/meterflow/py-venv: the Avro interop tests decode its bytes.
pyenv:
	deploy/local/pyenv.sh

# The DDL must work on current ClickHouse too (the local server is 18.16): chdb-core.
check-ddl:
	deploy/local/check-ddl-current.sh

# Compose file, Dockerfile, Prometheus and Grafana provisioning are consistent with the
# services; every dashboard SQL query runs on current ClickHouse (chdb) and on 18.16.
check-compose:
	deploy/check-compose.sh

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Dependencies a crate declares but never uses (cargo-machete reads the sources, so a
# dependency used only by a macro is listed under [package.metadata.cargo-machete] ignored).
# Installed once into the cache, pinned.
MACHETE_VERSION := 0.9.2
MACHETE_ROOT := $(or $(METERFLOW_CACHE),$(HOME)/.cache/meterflow)/cargo-machete-$(MACHETE_VERSION)
.PHONY: machete-install
machete-install:
	@test -x "$(MACHETE_ROOT)/bin/cargo-machete" || cargo install cargo-machete --locked --version $(MACHETE_VERSION) --root "$(MACHETE_ROOT)"

machete: machete-install
	"$(MACHETE_ROOT)/bin/cargo-machete"

# Topics and tables for the default names, as the services use them outside tests.
init: up
	$(ADMIN) init

## --- placeholders: their owners fill the bodies -----------------------------------------

# demo: the whole pipeline on ~1M events, checked against the ground truth (deploy/local/demo.sh;
# README "The demo"). Resets topics meterflow.* and database meterflow first; leaves the
# aggregator and the rater running (demo-stop stops them). METERFLOW_DEMO_EVENTS,
# METERFLOW_DEMO_RATE (messages/s), METERFLOW_DEMO_TIMEOUT (s) change the run.
.PHONY: demo-stop demo-status demo-summary
demo:
	@deploy/local/demo.sh run

demo-stop:
	@deploy/local/demo.sh stop

demo-status:
	@deploy/local/demo.sh status || true

# The last demo's summary again, re-read from ClickHouse and re-checked.
demo-summary:
	@deploy/local/demo.sh summary

## --- benchmarks, chaos, fuzzing (docs/testing.md) -------------------------
# bench and chaos start their own broker and ClickHouse on free ports under target/bench/ and
# target/chaos/ (deploy/local/services.sh with METERFLOW_STATE and port variables), so they
# never restart or stop the shared ones on 9092/8123; no `make up` needed.
#   make bench [BENCH_ARGS='--events 10000000']     meterflow vs raw consume and a raw-events baseline -> target/bench/bench.md
#   make chaos [CHAOS_ARGS='--events 100000 ...']   SIGKILLs, broker restart, ClickHouse outage, then exact verification
#   make bench-usage [BENCH_USAGE_ARGS=...]          GET /v1/usage at 10M events (shared services: make up) -> target/bench/bench-usage.md
#   make fuzz [FUZZ_SECS=150] | fuzz-short          cargo-fuzz (nightly) on the event and record decoders
BENCH_ARGS ?=
CHAOS_ARGS ?=
bench:
	$(CARGO) run --quiet --release -p meterflow-tools --bin meterflow-bench -- $(BENCH_ARGS)

chaos:
	$(CARGO) run --quiet --release -p meterflow-tools --bin meterflow-chaos -- $(CHAOS_ARGS)

BENCH_USAGE_ARGS ?=
bench-usage:
	@$(MAKE) --no-print-directory up
	$(CARGO) run --quiet --release -p meterflow-tools --bin meterflow-bench-usage -- $(BENCH_USAGE_ARGS)

# Fuzz targets live in services/core/fuzz (their own cargo workspace). The corpus in
# services/core/fuzz/corpus is kept in git and only read by a run; new inputs go to
# target/fuzz/corpus/, and `make fuzz` merges those that add coverage back into the repo's.
# cargo-fuzz is installed once into the cache. A crash (or a single allocation over 256 MB)
# leaves its input in services/core/fuzz/artifacts/<target>/ and fails.
FUZZ_SECS ?= 150
FUZZ_TARGETS := decode_event decode_records decode_ingest
FUZZ_ROOT := $(or $(METERFLOW_CACHE),$(HOME)/.cache/meterflow)/cargo-fuzz
FUZZ := PATH="$(FUZZ_ROOT)/bin:$$PATH" CARGO_TARGET_DIR="$(CURDIR)/target/fuzz" cargo +nightly fuzz
FUZZ_NEW := $(CURDIR)/target/fuzz/corpus
.PHONY: fuzz fuzz-short fuzz-install fuzz-run
fuzz-install:
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
	@test -x "$(FUZZ_ROOT)/bin/cargo-fuzz" || cargo install cargo-fuzz --locked --root "$(FUZZ_ROOT)"

# Each target FUZZ_SECS seconds, after replaying the corpus; FUZZ_MERGE=1 folds new coverage
# into the repo's corpus.
fuzz-run: fuzz-install
	@cd services/core && for t in $(FUZZ_TARGETS); do \
		mkdir -p "$(FUZZ_NEW)/$$t"; log="$(FUZZ_NEW)/$$t.log"; \
		echo "== fuzz $$t: corpus replay + $(FUZZ_SECS) s (log $$log)"; \
		if $(FUZZ) run $$t "$(FUZZ_NEW)/$$t" fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECS) \
				-rss_limit_mb=4096 -malloc_limit_mb=256 -print_final_stats=1 >"$$log" 2>&1; then \
			grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)' "$$log" || true; \
		else \
			{ grep -E 'error|ERROR|panicked|SUMMARY|Test unit written' "$$log" | head -20 || true; }; \
			echo "fuzz $$t FAILED: input in services/core/fuzz/artifacts/$$t/, log $$log"; exit 1; \
		fi; \
		if [[ "$(FUZZ_MERGE)" == 1 ]]; then \
			$(FUZZ) run $$t fuzz/corpus/$$t "$(FUZZ_NEW)/$$t" -- -merge=1 -max_len=512 >>"$$log" 2>&1 && \
			echo "   corpus: $$(ls fuzz/corpus/$$t | wc -l) files in services/core/fuzz/corpus/$$t"; \
		fi; \
	done

fuzz:
	@$(MAKE) --no-print-directory fuzz-run FUZZ_MERGE=1

# The short pass for `make test`: corpus replay plus 15 s of new inputs per target (~35 s
# once built; the first build of the targets takes ~4 minutes on 2 cores).
fuzz-short:
	@$(MAKE) --no-print-directory fuzz-run FUZZ_SECS=15 FUZZ_MERGE=0

bench-core:
	$(CARGO) bench -p meterflow-core --bench core_bench
