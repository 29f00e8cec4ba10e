#!/usr/bin/env bash
# Installs Helm from the Go module proxy once per version and prints its path. The chart's
# end-to-end test installs charts/schemagate with it. Cached outside the repository
# ($SCHEMAGATE_CACHE, default ~/.cache/schemagate), keyed on the version and the Go version.
set -euo pipefail
version=v3.19.0
export GOTOOLCHAIN=local
key=$(printf '%s %s' "$version" "$(go version)" | sha256sum | cut -c1-16)
bin_dir=${SCHEMAGATE_CACHE:-$HOME/.cache/schemagate}/helm/$key
if [ ! -x "$bin_dir/helm" ]; then
  echo "helm: installing helm $version (a few minutes the first time)" >&2
  mkdir -p "$bin_dir"
  GOBIN=$bin_dir GOFLAGS=-mod=mod go install "helm.sh/helm/v3/cmd/helm@$version"
fi
echo "$bin_dir/helm"
