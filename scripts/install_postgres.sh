#!/usr/bin/env bash
# The PostgreSQL tests and benchmarks start a real, throwaway server of their own
# (scripts/postgres.sh: initdb + pg_ctl in a temporary folder, 127.0.0.1 only): they need
# Debian's server binaries (/usr/lib/postgresql/VERSION/bin), never a server a tool downloads.
# Does nothing when they are already installed.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "[afinar] PostgreSQL is missing and only root can install it: apt-get install postgresql" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "[afinar] installing Debian's postgresql for the PostgreSQL tests" >&2
# Debian's package would create and start its own cluster ("main", port 5432); the tests never use
# it, so ask postgresql-common not to create one (no cluster: nothing for the service to start).
# --force-confold keeps this file when the package brings its own copy.
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
  $sudo mkdir -p /etc/postgresql-common
  echo "create_main_cluster = false" | $sudo tee /etc/postgresql-common/createcluster.conf >/dev/null
fi
install_postgresql() {
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold postgresql >/dev/null
}
# The package lists are refreshed only when the install fails without them (offline-friendly).
install_postgresql || { $sudo apt-get update -qq >/dev/null; install_postgresql; }
