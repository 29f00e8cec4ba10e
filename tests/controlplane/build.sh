#!/usr/bin/env bash
# Builds the control-plane binary (etcd, kube-apiserver, kube-controller-manager, kubectl)
# once per set of inputs and prints its path. The cache lives outside the repository
# ($SCHEMAGATE_CACHE, default ~/.cache/schemagate), keyed on the sources, go.mod, go.sum
# and the Go version, so a second call returns at once.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export GOTOOLCHAIN=local GOFLAGS=-mod=mod
version=$(cat "$here/KUBERNETES_VERSION")
key=$( { cat "$here/main.go" "$here/go.mod" "$here/go.sum" "$here/build.sh"; go version; } | sha256sum | cut -c1-16)
cache=${SCHEMAGATE_CACHE:-$HOME/.cache/schemagate}/controlplane/$key
bin=$cache/k8s
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"
minor=${version#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
echo "controlplane: building Kubernetes $version (cold build takes 10-20 minutes)" >&2
start=$(date +%s)
(cd "$here" && go build -trimpath -ldflags "$ldflags" -o "$bin.tmp" .)
mv "$bin.tmp" "$bin"
echo "controlplane: built in $(( $(date +%s) - start ))s: $bin" >&2
echo "$bin"
