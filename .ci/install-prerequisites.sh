#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine: PostgreSQL and
# MariaDB servers, util-linux (unshare for the test node), and the Python migration tools.
# Go and Rust come with the machine.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
need=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || need+=(mariadb-server)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  echo "prerequisites: installing ${need[*]}"
  apt-get update -qq
  # Servers are started by the tests on loopback ports; keep the packages' own from starting.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -r "$here/tests/requirements.txt"
# Under pyenv, new console scripts (alembic) need their shims.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
command -v alembic >/dev/null || { echo "prerequisites: alembic is not on PATH after pip install" >&2; exit 1; }
echo "prerequisites: ready"
