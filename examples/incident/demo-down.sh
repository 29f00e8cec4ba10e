#!/usr/bin/env bash
# Stops what examples/incident/demo.sh started: the operator, then the local cluster.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
demo=${CARGO_TARGET_DIR:-$root/target}/demo
for name in operator cluster; do
  file=$demo/$([ $name = cluster ] && echo pid || echo operator.pid)
  [ -f "$file" ] || continue
  pid=$(cat "$file")
  if kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
done
echo "demo: stopped"
