# meterflow developer targets. Local services (broker, ClickHouse, Prometheus) are managed by
# deploy/local/services.sh; see README.md "Local services".
#
#   make up | down | status          start / stop / show the local services
#   make restart-broker              (also start-/stop-/restart- + broker|clickhouse|prometheus)
#   make build                       release build of the workspace
#   make test                        make up, cargo test, DDL check on current ClickHouse, clippy
#   make init                        topics + migrations for the default names (meterflow.*)
#   make demo                        the whole pipeline on ~1M events, checked (demo-stop, demo-status, demo-summary)
#   make bench | chaos               benchmark table (target/bench/bench.md) / fault-injection run
#   make bench-core                  criterion benchmarks of meterflow-core

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
SERVICES := deploy/local/services.sh
COMPONENTS := broker clickhouse prometheus
# The admin binary, built on demand (release, shared with `make build`).
ADMIN := $(CARGO) run --quiet --release -p meterflow-admin --

.PHONY: help up down status install build test test-rust check-ddl check-compose clippy init demo bench chaos bench-core \
	$(foreach c,$(COMPONENTS),start-$(c) stop-$(c) restart-$(c) status-$(c))

help:
	@sed -n 's/^#   //p' $(MAKEFILE_LIST)

## --- local services ---------------------------------------------------------------------

# Installs what is missing (the broker is built once into ~/.cache/meterflow, ~25 min on a
# fresh machine), starts broker, ClickHouse and Prometheus on loopback and waits until each
# answers. A no-op for what already runs. METERFLOW_BROKER_STORAGE=memory for benchmarks.
up:
	@$(SERVICES) start all

# Stops what `make up` started (and nothing else).
down:
	@deploy/local/demo.sh stop
	@$(SERVICES) stop all

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
	@$(MAKE) --no-print-directory test-rust
	@$(MAKE) --no-print-directory clippy

test-rust:
	$(CARGO) test --workspace --no-fail-fast

# The DDL must work on current ClickHouse too (the local server is 18.16): chdb-core.
check-ddl:
	deploy/local/check-ddl-current.sh

# Compose file, Dockerfile, Prometheus and Grafana provisioning are consistent with the
# services; every dashboard SQL query runs on current ClickHouse (chdb) and on 18.16.
check-compose:
	deploy/check-compose.sh

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

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

# bench: throughput/latency benchmark of the whole pipeline. Owner: fills this in
# (tip: METERFLOW_BROKER_STORAGE=memory make restart-broker for the in-memory broker).
bench: up
	@echo "bench: not written yet"

# chaos: fault-injection tests (stop ClickHouse, restart the broker) via deploy/local/services.sh.
# Owner: fills this in.
chaos: up
	@echo "chaos: not written yet"

bench-core:
	$(CARGO) bench -p meterflow-core --bench core_bench
