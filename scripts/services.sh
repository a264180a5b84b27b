#!/usr/bin/env bash
# Local services for hmis-flow development and tests: a Kafka-protocol broker (nisshi)
# and PostgreSQL 15, both on loopback, with their data under the repository's
# git-ignored `.hmis/` folder.
#
#   scripts/services.sh start    install what is missing, start both, wait until ready
#   scripts/services.sh stop     stop both cleanly (pg_ctl -m fast, SIGTERM to the broker)
#   scripts/services.sh restart  stop, then start
#   scripts/services.sh status   show what runs; exit 0 only when both are up
#   scripts/services.sh env      print `export ...` lines: eval "$(scripts/services.sh env)"
#
# Settings (environment, defaults in brackets):
#   HMIS_KAFKA_PORT        broker port [19092]
#   HMIS_PG_PORT           PostgreSQL port [15432]
#   HMIS_BROKER_STORAGE    sqlite | memory | a full nisshi storage URL [sqlite]
#                          (memory: nothing survives a restart, but it is ~4x faster)
#   HMIS_START_TIMEOUT     seconds to wait for each service to become ready [90]
#   HMIS_NISSHI_VERSION    version cargo installs when nisshi is missing [0.8.1]
#   HMIS_STATE_DIR         where data, logs and pid files go [<repo>/.hmis]; with other
#                          ports, a second independent set of services
#   HMIS_PG_DIR            the PostgreSQL folder (data/, server.log, socket) [$HMIS_STATE_DIR/pg]
#
# Layout of .hmis/:
#   nisshi/            the broker's working directory (nisshi.db for SQLite storage)
#   nisshi.pid, nisshi.log, nisshi.storage
#   pg/data            the PostgreSQL cluster; pg/server.log; the Unix socket in pg/
# When running as root, PostgreSQL runs as the `postgres` user (initdb refuses root).
# If that user cannot reach .hmis/ (e.g. a clone under /root, mode 700), the cluster
# lives in /tmp/hmis-pg-<hash of the repo path> instead and `status` says so.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${HMIS_STATE_DIR:-$ROOT/.hmis}"

KAFKA_PORT="${HMIS_KAFKA_PORT:-19092}"
PG_PORT="${HMIS_PG_PORT:-15432}"
BROKER_STORAGE="${HMIS_BROKER_STORAGE:-sqlite}"
START_TIMEOUT="${HMIS_START_TIMEOUT:-90}"
NISSHI_VERSION="${HMIS_NISSHI_VERSION:-0.8.1}"
PG_VERSION=15
PG_DB=hmis
PG_SUPERUSER=postgres

NISSHI_DIR="$STATE/nisshi"
NISSHI_PID="$STATE/nisshi.pid"
NISSHI_LOG="$STATE/nisshi.log"
NISSHI_STORAGE_FILE="$STATE/nisshi.storage"

# cargo-installed binaries are often not on a non-interactive PATH.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }
now() { date +%s; }

brokers() { echo "127.0.0.1:$KAFKA_PORT"; }
database_url() { echo "postgres://$PG_SUPERUSER@127.0.0.1:$PG_PORT/$PG_DB"; }

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() {
    is_root || return 1
    command -v apt-get >/dev/null || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 && return 0
    # A fresh machine has no package lists yet.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}

# ---------------------------------------------------------------- PostgreSQL ----

PGBIN=""
find_pgbin() {
    local d
    for d in "/usr/lib/postgresql/$PG_VERSION/bin" "${HMIS_PGBIN:-}"; do
        if [ -n "$d" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ]; then PGBIN="$d"; return 0; fi
    done
    return 1
}

ensure_postgres_installed() {
    find_pgbin && return 0
    is_root || die "PostgreSQL $PG_VERSION not found in /usr/lib/postgresql/$PG_VERSION/bin and not root: install postgresql-$PG_VERSION (or set HMIS_PGBIN)"
    log "installing PostgreSQL $PG_VERSION (apt-get)"
    apt_install "postgresql-$PG_VERSION" || apt_install postgresql \
        || die "apt-get install postgresql-$PG_VERSION failed"
    find_pgbin || die "PostgreSQL installed but /usr/lib/postgresql/$PG_VERSION/bin/pg_ctl is missing (another major version?)"
}

# Runs a command line as the cluster's owner: `postgres` when we are root, else us.
as_pg() {
    if is_root; then
        # From /: the caller's directory may be closed to postgres (pg_ctl complains).
        (cd / && su postgres -s /bin/bash -c "$1")
    else
        bash -c "$1"
    fi
}

PG_DIR=""
choose_pg_dir() {
    if [ -n "${HMIS_PG_DIR:-}" ]; then PG_DIR="$HMIS_PG_DIR"; return; fi
    PG_DIR="$STATE/pg"
    # A socket path is limited to 107 bytes; a deep checkout can exceed it.
    local sock_len=$(( ${#PG_DIR} + ${#PG_PORT} + 10 ))
    local fallback
    fallback="/tmp/hmis-pg-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
    if [ "$sock_len" -gt 100 ]; then PG_DIR="$fallback"; return; fi
    if is_root; then
        getent passwd postgres >/dev/null || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
        # Already set up in one place or the other: keep using it.
        if [ -d "$fallback/data" ] && [ ! -d "$STATE/pg/data" ]; then PG_DIR="$fallback"; return; fi
        mkdir -p "$STATE"
        if ! su postgres -s /bin/bash -c "test -x '$STATE'" 2>/dev/null; then PG_DIR="$fallback"; fi
    fi
}

pg_paths() {
    choose_pg_dir
    PGDATA="$PG_DIR/data"
    PG_LOG="$PG_DIR/server.log"
    PG_SOCKDIR="$PG_DIR"
}

pg_running() {
    [ -f "$PGDATA/PG_VERSION" ] || return 1
    as_pg "'$PGBIN/pg_ctl' status -D '$PGDATA'" >/dev/null 2>&1
}

pg_ready() {
    "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -d postgres -U "$PG_SUPERUSER" -t 2
}

psql_admin() {
    "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres "$@"
}

pg_start() {
    ensure_postgres_installed
    pg_paths
    if [ ! -f "$PGDATA/PG_VERSION" ]; then
        log "initdb $PGDATA"
        mkdir -p "$PGDATA"
        chmod 700 "$PGDATA"
        if is_root; then chown -R postgres: "$PG_DIR"; fi
        as_pg "'$PGBIN/initdb' -D '$PGDATA' --auth=trust --username=$PG_SUPERUSER --encoding=UTF8 --locale=C.UTF-8 >'$PG_DIR/initdb.log' 2>&1" \
            || die "initdb failed, see $PG_DIR/initdb.log"
    fi
    # Under load the status check can miss a running server once: ask again before deciding
    # that the port belongs to someone else.
    local tries=0
    while ! pg_running && port_open "$PG_PORT" && [ "$tries" -lt 5 ]; do
        tries=$((tries + 1))
        sleep 1
    done
    if pg_running; then
        log "PostgreSQL already running (data $PGDATA)"
    else
        if port_open "$PG_PORT"; then
            die "port $PG_PORT is taken by another process; set HMIS_PG_PORT"
        fi
        log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
        as_pg "'$PGBIN/pg_ctl' start -w -t '$START_TIMEOUT' -D '$PGDATA' -l '$PG_LOG' -o \"-p $PG_PORT -c listen_addresses=127.0.0.1 -k '$PG_SOCKDIR'\"" >/dev/null \
            || { tail -n 20 "$PG_LOG" >&2 || true; die "PostgreSQL did not start, see $PG_LOG"; }
    fi
    local deadline=$(( $(now) + START_TIMEOUT ))
    until pg_ready && psql_admin -tAc 'SELECT 1' >/dev/null 2>&1; do
        if [ "$(now)" -ge "$deadline" ]; then
            tail -n 20 "$PG_LOG" >&2 || true
            die "PostgreSQL not ready on 127.0.0.1:$PG_PORT after ${START_TIMEOUT}s, see $PG_LOG"
        fi
        sleep 0.2
    done
    if [ "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
        log "creating database $PG_DB"
        psql_admin -c "CREATE DATABASE $PG_DB" >/dev/null
    fi
    log "PostgreSQL ready: $(database_url)"
}

pg_stop() {
    find_pgbin || { log "PostgreSQL not installed: nothing to stop"; return 0; }
    pg_paths
    if pg_running; then
        log "stopping PostgreSQL"
        as_pg "'$PGBIN/pg_ctl' stop -w -t '$START_TIMEOUT' -m fast -D '$PGDATA'" >/dev/null \
            || die "pg_ctl stop failed, see $PG_LOG"
    else
        log "PostgreSQL not running"
    fi
}

pg_status() {
    if ! find_pgbin; then echo "postgres: not installed"; return 1; fi
    pg_paths
    if pg_running; then
        local pid
        pid="$(head -n 1 "$PGDATA/postmaster.pid" 2>/dev/null || echo '?')"
        if pg_ready; then
            echo "postgres: running (pid $pid) on 127.0.0.1:$PG_PORT, data $PGDATA, log $PG_LOG"
            return 0
        fi
        echo "postgres: running (pid $pid) but not accepting connections on 127.0.0.1:$PG_PORT, log $PG_LOG"
        return 1
    fi
    echo "postgres: stopped (data $PGDATA)"
    return 1
}

# -------------------------------------------------------------------- nisshi ----

ensure_nisshi_installed() {
    command -v nisshi >/dev/null && return 0
    command -v cargo >/dev/null || die "nisshi is missing and cargo is not on PATH"
    log "installing nisshi $NISSHI_VERSION with cargo (a long build: ~15-40 min on 2 cores)"
    local t0; t0=$(now)
    cargo install nisshi --version "$NISSHI_VERSION" --locked --ignore-rust-version \
        || die "cargo install nisshi failed"
    log "nisshi installed in $(( $(now) - t0 ))s"
    command -v nisshi >/dev/null || die "nisshi installed but not on PATH"
}

storage_url() {
    case "$BROKER_STORAGE" in
        memory) echo "memory://nisshi/" ;;
        sqlite) echo "sqlite://nisshi.db" ;; # relative to the working dir, .hmis/nisshi/
        *://*) echo "$BROKER_STORAGE" ;;
        *) die "HMIS_BROKER_STORAGE must be sqlite, memory or a storage URL, not '$BROKER_STORAGE'" ;;
    esac
}

nisshi_pid() {
    [ -f "$NISSHI_PID" ] || return 1
    local pid
    pid="$(cat "$NISSHI_PID")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    # Guard against a recycled pid.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'nisshi' || return 1
    echo "$pid"
}

# A real Kafka round trip, with bash alone: a Metadata v1 request (all topics) on a fresh
# connection; ready when the reply carries our correlation id and at least one broker.
# (Debian 12's kcat cannot be used: its librdkafka 2.0.2 fails nisshi's ApiVersions
# reply with "Read underflow".)
broker_ready() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT" || exit 1
        # size 18 | api_key 3 | version 1 | correlation id "HMIS" | client id "hmis" | topics null
        printf '\x00\x00\x00\x12\x00\x03\x00\x01HMIS\x00\x04hmis\xff\xff\xff\xff' >&3
        # size | correlation id | number of brokers
        reply="$(timeout 3 head -c 12 <&3 | od -An -tx1 | tr -d ' \n')"
        [ "${reply:8:8}" = 484d4953 ] && [ $((16#${reply:16:8})) -ge 1 ]
    ) 2>/dev/null
}

nisshi_start() {
    ensure_nisshi_installed
    local url pid
    url="$(storage_url)"
    if pid="$(nisshi_pid)"; then
        log "nisshi already running (pid $pid, storage $(cat "$NISSHI_STORAGE_FILE" 2>/dev/null || echo '?'))"
        if [ "$(cat "$NISSHI_STORAGE_FILE" 2>/dev/null)" != "$url" ]; then
            log "note: it runs with other storage than the requested $url; restart to switch"
        fi
    else
        rm -f "$NISSHI_PID"
        if port_open "$KAFKA_PORT"; then
            die "port $KAFKA_PORT is taken by another process; set HMIS_KAFKA_PORT"
        fi
        mkdir -p "$NISSHI_DIR"
        log "starting nisshi on $(brokers), storage $url"
        (
            cd "$NISSHI_DIR"
            exec nohup nisshi broker \
                --listener-url "tcp://$(brokers)" \
                --advertised-listener-url "tcp://$(brokers)" \
                --storage-engine "$url" \
                --group-initial-rebalance-delay 0s \
                </dev/null >>"$NISSHI_LOG" 2>&1
        ) &
        echo $! >"$NISSHI_PID"
        echo "$url" >"$NISSHI_STORAGE_FILE"
    fi
    local deadline=$(( $(now) + START_TIMEOUT ))
    pid="$(cat "$NISSHI_PID")"
    until broker_ready; do
        # Only a liveness check: right after the fork the process is not nisshi yet.
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$NISSHI_LOG" >&2 || true
            die "nisshi exited during start, see $NISSHI_LOG"
        fi
        if [ "$(now)" -ge "$deadline" ]; then
            tail -n 20 "$NISSHI_LOG" >&2 || true
            die "nisshi not ready on $(brokers) after ${START_TIMEOUT}s, see $NISSHI_LOG"
        fi
        sleep 0.2
    done
    log "nisshi ready: $(brokers)"
}

nisshi_stop() {
    local pid
    if ! pid="$(nisshi_pid)"; then
        log "nisshi not running"
        rm -f "$NISSHI_PID"
        return 0
    fi
    log "stopping nisshi (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$(( $(now) + 30 ))
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$(now)" -ge "$deadline" ]; then
            log "nisshi ignored SIGTERM for 30s: sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    rm -f "$NISSHI_PID"
}

nisshi_status() {
    local pid
    if ! command -v nisshi >/dev/null; then echo "nisshi: not installed"; return 1; fi
    if pid="$(nisshi_pid)"; then
        local storage; storage="$(cat "$NISSHI_STORAGE_FILE" 2>/dev/null || echo '?')"
        if broker_ready; then
            echo "nisshi: running (pid $pid) on $(brokers), storage $storage, log $NISSHI_LOG"
            return 0
        fi
        echo "nisshi: running (pid $pid) but not answering on $(brokers), log $NISSHI_LOG"
        return 1
    fi
    echo "nisshi: stopped"
    return 1
}

# ---------------------------------------------------------------------- main ----

print_env() {
    echo "export HMIS_BROKERS=$(brokers)"
    echo "export HMIS_DATABASE_URL=$(database_url)"
    echo "export HMIS_TEST_BROKERS=$(brokers)"
    echo "export HMIS_TEST_DATABASE_URL=$(database_url)"
}

usage() {
    echo "usage: $0 start|start-pg|stop|restart|status|env" >&2
    exit 2
}

main() {
    [ $# -eq 1 ] || usage
    case "$1" in
        start)
            mkdir -p "$STATE"
            local t0; t0=$(now)
            pg_start
            nisshi_start
            log "all services ready in $(( $(now) - t0 ))s"
            ;;
        start-pg)
            # PostgreSQL only (the demo uses an in-process Kafka mock when no broker is configured).
            mkdir -p "$STATE"
            pg_start
            ;;
        stop)
            # Stop both even when one fails.
            local rc=0
            nisshi_stop || rc=1
            pg_stop || rc=1
            return $rc
            ;;
        restart)
            "$0" stop
            exec "$0" start
            ;;
        status)
            local rc=0
            pg_status || rc=3
            nisshi_status || rc=3
            return $rc
            ;;
        env) print_env ;;
        *) usage ;;
    esac
}

# Sourcing the file (for its functions) runs nothing.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
