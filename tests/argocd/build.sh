#!/usr/bin/env bash
# Builds the Argo CD application controller and repo server (one binary, see main.go)
# once per set of inputs and prints its path. The cache lives outside the repository
# ($SCHEMAGATE_CACHE, default ~/.cache/schemagate), keyed on the sources, go.mod, go.sum
# and the Go version, so a second call returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
version=$(cat "$here/ARGOCD_VERSION")
key=$( { cat "$here/main.go" "$here/go.mod" "$here/go.sum" "$here/build.sh"; go version; } | sha256sum | cut -c1-16)
cache=${SCHEMAGATE_CACHE:-$HOME/.cache/schemagate}/argocd/$key
bin=$cache/argocd
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"
pkg=github.com/argoproj/argo-cd/v3/common
ldflags="-s -w -X $pkg.version=${version#v} -X $pkg.buildDate=1970-01-01T00:00:00Z -X $pkg.gitTreeState=clean"
echo "argocd: building Argo CD $version (cold build takes about 6-10 minutes)" >&2
start=$(date +%s)
(cd "$here" && go build -trimpath -ldflags "$ldflags" -o "$bin.tmp" .)
# The Application and AppProject CRDs of the same version, beside the binary.
module_dir=$(cd "$here" && go list -m -f '{{.Dir}}' github.com/argoproj/argo-cd/v3)
mkdir -p "$cache/crds"
cp "$module_dir/manifests/crds/application-crd.yaml" "$module_dir/manifests/crds/appproject-crd.yaml" "$cache/crds/"
chmod u+w "$cache/crds/"*
mv "$bin.tmp" "$bin"
echo "argocd: built in $(( $(date +%s) - start ))s: $bin" >&2
echo "$bin"
