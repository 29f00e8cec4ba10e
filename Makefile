# schemagate — the two commands that matter are `make demo` and `make test`.
CARGO ?= cargo
CRD_FILE := crds/generated/databasemigrations.schemagate.dev.yaml
CHART_CRD_FILE := charts/schemagate/crds/databasemigrations.schemagate.dev.yaml

.PHONY: all build test lint unit e2e gitops bench bench-scale demo demo-down crds controlplane helm argocd prerequisites image image-check

all: build

build:
	$(CARGO) build --workspace

## test: formatting, clippy -D warnings, unit tests and the end-to-end suites against a real
## local control plane, real PostgreSQL/MariaDB, real Alembic and a real Argo CD (started by
## the tests).
test: prerequisites lint controlplane helm argocd image
	$(CARGO) build -q -p schemagate -p schemagate-testenv --bins
	$(CARGO) test --workspace --all-targets --no-fail-fast -- --include-ignored
	operator/image/check.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cargo-deny --manifest-path Cargo.toml --config .ci/deny.toml check licenses bans sources

unit:
	$(CARGO) test --workspace --lib --bins

e2e: controlplane helm image
	$(CARGO) build -q -p schemagate -p schemagate-testenv --bins
	$(CARGO) test -p schemagate-e2e --test e2e -- --include-ignored

## gitops: the Argo CD suite alone (docs/argocd.md).
gitops: controlplane argocd
	$(CARGO) build -q -p schemagate -p schemagate-testenv --bins
	$(CARGO) test -p schemagate-e2e --test gitops -- --include-ignored

## controlplane: build (or find in the cache) the Kubernetes control-plane binary.
controlplane:
	tests/controlplane/build.sh >/dev/null

## helm: install (or find in the cache) the Helm the chart's end-to-end test uses.
helm:
	tests/helm/build.sh 3 >/dev/null
	tests/helm/build.sh 4 >/dev/null

## argocd: build (or find in the cache) Argo CD's application controller and repo server.
argocd:
	tests/argocd/build.sh >/dev/null

## crds: regenerate the CRD YAML from the Rust types (a test fails when they drift).
crds:
	$(CARGO) run -q -p schemagate -- crd > $(CRD_FILE)
	cp $(CRD_FILE) $(CHART_CRD_FILE)

## demo: the incident replayed on the local control plane (see README); demo-down stops it.
demo: prerequisites controlplane
	$(CARGO) build -q -p schemagate -p schemagate-testenv --bins
	examples/incident/demo.sh

demo-down:
	examples/incident/demo-down.sh

## bench: gate release latency, webhook admission latency and the backstop's early pods.
bench: controlplane
	$(CARGO) build -q -p schemagate -p schemagate-testenv --bins
	$(CARGO) run -q -p schemagate-e2e --bin schemagate-bench

## bench-scale: the figures of docs/benchmarks.md "At scale" (release build of the operator;
## sizes from SCHEMAGATE_SCALE_* variables, see tests/src/bin/bench_scale.rs).
bench-scale: controlplane
	$(CARGO) build -q --release -p schemagate
	$(CARGO) build -q -p schemagate-testenv --bins
	$(CARGO) run -q -p schemagate-e2e --bin schemagate-bench-scale

## image: the operator's OCI image, built offline with buildah into target/image (docs/install.md);
## the chart's end-to-end test runs the operator from it.
image:
	operator/image/build.sh

## image-check: builds the image twice (same digest), unpacks it, runs it (part of make test).
image-check:
	operator/image/check.sh

## prerequisites: Debian packages and Python tools the tests and the demo need.
prerequisites:
	.ci/install-prerequisites.sh


# ---- Local cluster (tests/env: the test environment crate) -------------------------------
## cluster: start the local control plane, test node and databases in the background;
## prints the kubeconfig path. Environment for scripts: target/cluster/cluster.env.
## cluster-down: stop exactly that cluster (its supervisor stops everything it started).
CLUSTER_DIR := target/cluster
CLUSTER_BIN := $(or $(CARGO_TARGET_DIR),target)/debug/schemagate-cluster
CLUSTER_START_TIMEOUT ?= 2400

.PHONY: cluster cluster-down
cluster:
	$(CARGO) build -q -p schemagate-testenv --bin schemagate-cluster
	@mkdir -p $(CLUSTER_DIR)
	@if [ -f $(CLUSTER_DIR)/pid ] && kill -0 "$$(cat $(CLUSTER_DIR)/pid)" 2>/dev/null; then \
	  echo "cluster: already running (pid $$(cat $(CLUSTER_DIR)/pid))" >&2; \
	else \
	  rm -f $(CLUSTER_DIR)/ready; \
	  nohup $(CLUSTER_BIN) up --dir $(CLUSTER_DIR) </dev/null >$(CLUSTER_DIR)/cluster.log 2>&1 & \
	  echo $$! > $(CLUSTER_DIR)/pid; \
	fi
	@pid=$$(cat $(CLUSTER_DIR)/pid); deadline=$$(( $$(date +%s) + $(CLUSTER_START_TIMEOUT) )); \
	until [ -f $(CLUSTER_DIR)/ready ]; do \
	  if ! kill -0 $$pid 2>/dev/null; then \
	    echo "cluster: schemagate-cluster exited; end of $(CLUSTER_DIR)/cluster.log:" >&2; \
	    tail -n 60 $(CLUSTER_DIR)/cluster.log >&2; rm -f $(CLUSTER_DIR)/pid; exit 1; \
	  fi; \
	  if [ $$(date +%s) -ge $$deadline ]; then \
	    echo "cluster: not ready after $(CLUSTER_START_TIMEOUT)s; see $(CLUSTER_DIR)/cluster.log" >&2; exit 1; \
	  fi; \
	  sleep 0.5; \
	done
	@echo $(CLUSTER_DIR)/kubeconfig

cluster-down:
	@if [ ! -f $(CLUSTER_DIR)/pid ]; then echo "cluster: not running"; exit 0; fi; \
	pid=$$(cat $(CLUSTER_DIR)/pid); \
	if kill -TERM $$pid 2>/dev/null; then \
	  deadline=$$(( $$(date +%s) + 60 )); \
	  while kill -0 $$pid 2>/dev/null; do \
	    if [ $$(date +%s) -ge $$deadline ]; then echo "cluster: pid $$pid ignored SIGTERM; killing" >&2; kill -KILL $$pid; fi; \
	    sleep 0.2; \
	  done; \
	fi; \
	rm -f $(CLUSTER_DIR)/pid; echo "cluster: stopped"
