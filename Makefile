# schemagate — the two commands that matter are `make demo` and `make test`.
CARGO ?= cargo
CRD_FILE := crds/generated/databasemigrations.schemagate.dev.yaml
CHART_CRD_FILE := charts/schemagate/crds/databasemigrations.schemagate.dev.yaml

.PHONY: all build test lint unit e2e demo demo-down crds controlplane prerequisites

all: build

build:
	$(CARGO) build --workspace

## test: formatting, clippy -D warnings, unit tests and the end-to-end suite against a real
## local control plane, real PostgreSQL/MariaDB and real Alembic (started by the tests).
test: lint controlplane
	$(CARGO) test --workspace --no-fail-fast -- --include-ignored

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace --lib --bins

e2e: controlplane
	$(CARGO) test -p schemagate-e2e --test e2e -- --include-ignored

## controlplane: build (or find in the cache) the Kubernetes control-plane binary.
controlplane:
	tests/controlplane/build.sh >/dev/null

## crds: regenerate the CRD YAML from the Rust types (a test fails when they drift).
crds:
	$(CARGO) run -q -p schemagate -- crd > $(CRD_FILE)
	cp $(CRD_FILE) $(CHART_CRD_FILE)

## demo: the incident replayed on the local control plane (see README).
demo: controlplane
	$(CARGO) build -q -p schemagate -p schemagate-e2e --bins
	examples/incident/demo.sh

## prerequisites: Debian packages and Python tools the tests and the demo need.
prerequisites:
	.ci/install-prerequisites.sh

