#!/usr/bin/env bash
# A throwaway PostgreSQL server in a folder, for the tests and benchmarks (tests/postgres.py wraps
# it): Debian's binaries (scripts/install_postgres.sh), listening on 127.0.0.1 only, trust auth.
#   postgres.sh start DIR [PORT]   initdb DIR/data if missing, start, print the SQLAlchemy URL
#   postgres.sh stop DIR           fast shutdown (immediate if that fails)
#   postgres.sh restart DIR        same data, same port; prints the URL
#   postgres.sh url DIR            prints postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
# DIR holds data/, socket/, port, postgres.log and initdb.log. initdb refuses to run as root, so
# as root the server runs as Debian's `postgres` user (the folders it writes are chowned to it);
# otherwise as the current user. PG_BIN picks another bin folder.
set -euo pipefail

die() { echo "[afinar] postgres: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: postgres.sh start|stop|restart|url DIR [PORT]"
command="$1"
[ "$command" != start ] || mkdir -p "$2"
dir="$(cd "$2" 2>/dev/null && pwd)" || die "no folder $2"
data="$dir/data" socket="$dir/socket" log="$dir/postgres.log"

bin="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
[ -x "$bin/initdb" ] || die "no PostgreSQL server binaries (run scripts/install_postgres.sh)"

# As root: run the server's programs as `postgres`, from a folder it can enter.
as_server=()
if [ "$(id -u)" = 0 ]; then
  as_server=(runuser -u postgres --)
fi
run() { (cd "$dir" && "${as_server[@]}" "$@"); }

fail() {  # message, then the log's tail
  echo "[afinar] postgres: $*; the end of $log:" >&2
  tail -n 30 "$log" 2>/dev/null | sed -e '$a\' >&2
  exit 1
}

url() { echo "postgresql+psycopg://postgres@127.0.0.1:$(cat "$dir/port")/postgres"; }

# Whether the postmaster in data/postmaster.pid lives. Not `pg_ctl status`: a killed server stays a
# zombie until PID 1 reaps it, and pg_ctl (like postgres itself) takes that for a live server.
running() {
  local pid state
  pid="$(head -n 1 "$data/postmaster.pid" 2>/dev/null)" || return 1
  state="$(ps -o stat= -p "$pid" 2>/dev/null)" && [[ "$state" != Z* ]]
}

free_port() {  # the kernel's pick when python3 is there; otherwise a random port nobody answers on
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' 2>/dev/null && return
  local port
  for _ in $(seq 50); do
    port="$(shuf -i 20000-32000 -n 1)"
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
  die "found no free port"
}

prepare() {  # the folders the server writes, owned by the user that runs it
  mkdir -p "$data" "$socket"
  touch "$log"
  if [ ${#as_server[@]} -gt 0 ]; then
    chown postgres: "$data" "$socket" "$log"
    # `postgres` must be able to enter every folder above DIR (pytest's /tmp/pytest-of-root is
    # 0700): add the search bit (never read) where it is missing.
    local d="$dir"
    while [ "$d" != / ]; do
      runuser -u postgres -- test -x "$d" || chmod o+x "$d"
      d="$(dirname "$d")"
    done
  fi
  # A Unix socket's path is at most 107 bytes.
  [ $((${#socket} + 18)) -le 107 ] || die "$socket is too long for a Unix socket; use a shorter DIR"
}

start() {
  local port="${1:-}"
  if running; then url; return; fi
  # Lock files left by a killed server (its processes gone, or zombies that look alive).
  rm -f "$data/postmaster.pid" "$socket"/.s.PGSQL.*.lock
  [ -n "$port" ] || port="$(cat "$dir/port" 2>/dev/null || true)"
  [ -n "$port" ] || port="$(free_port)"
  echo "$port" > "$dir/port"
  prepare
  if [ ! -f "$data/PG_VERSION" ]; then
    run "$bin/initdb" -D "$data" -A trust -U postgres --encoding UTF8 --locale C \
      >"$dir/initdb.log" 2>&1 || { log="$dir/initdb.log"; fail "initdb failed"; }
  fi
  run "$bin/pg_ctl" start -w -t 60 -D "$data" -l "$log" \
    -o "-c listen_addresses=127.0.0.1 -p $port -k '$socket' -c fsync=on" >/dev/null 2>>"$log" \
    || fail "the server did not start on 127.0.0.1:$port"
  for _ in $(seq 100); do
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres && { url; return; }
    sleep 0.1
  done
  fail "the server does not answer on 127.0.0.1:$port"
}

stop() {
  running || return 0
  run "$bin/pg_ctl" stop -D "$data" -m fast -t 30 >/dev/null 2>>"$log" \
    || ! running || run "$bin/pg_ctl" stop -D "$data" -m immediate -t 30 >/dev/null 2>>"$log" \
    || ! running || fail "the server did not stop"
}

case "$command" in
  start) start "${3:-}" ;;
  stop) stop ;;
  restart) [ -f "$dir/port" ] || die "$dir was never started"; stop; start "$(cat "$dir/port")" ;;
  url) [ -f "$dir/port" ] || die "$dir was never started"; url ;;
  *) die "unknown command $command (start, stop, restart, url)" ;;
esac
