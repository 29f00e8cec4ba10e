#!/usr/bin/env bash
# Installs Helm from the Go module proxy once per version and prints its path. The chart's
# and the Helm releases' end-to-end tests use it. Cached outside the repository
# ($SCHEMAGATE_CACHE, default ~/.cache/schemagate), keyed on the version and the Go version.
#   tests/helm/build.sh      Helm 3
#   tests/helm/build.sh 4    Helm 4
set -euo pipefail
case "${1:-3}" in
  3) version=v3.19.0; module=helm.sh/helm/v3/cmd/helm ;;
  4) version=v4.3.1; module=helm.sh/helm/v4/cmd/helm ;;
  *) echo "usage: $0 [3|4]" >&2; exit 2 ;;
esac
export GOTOOLCHAIN=local
key=$(printf '%s %s' "$version" "$(go version)" | sha256sum | cut -c1-16)
bin_dir=${SCHEMAGATE_CACHE:-$HOME/.cache/schemagate}/helm/$key
if [ ! -x "$bin_dir/helm" ]; then
  echo "helm: installing helm $version (a few minutes the first time)" >&2
  mkdir -p "$bin_dir"
  GOBIN=$bin_dir GOFLAGS=-mod=mod go install "$module@$version"
fi
echo "$bin_dir/helm"
