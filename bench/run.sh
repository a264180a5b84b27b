#!/usr/bin/env bash
# hmis-flow next to its peers on one workload, in one command (issue 14, docs/benchmarks.md):
#
#   bench/run.sh [SIZE] [peers options]     SIZE: smoke | small | medium | large [small]
#
#   1. Pathway in bench/.venv at a pinned version (created when missing or another version)
#   2. cargo build --release: hmis-flow, peers, seed_baseline, plot
#   3. the local broker and PostgreSQL (scripts/services.sh start, when they are not up)
#   4. target/release/peers: generate + load the workload, then hmis-flow end to end, the
#      seed-style baseline and Pathway on it, each checked against hmis-flow's results
#      → bench/results/peers-<size>-<date>.json (exit 1 when a peer's results differ)
#   5. target/release/plot → bench/results/plots/*.svg
#
# Settings (environment, defaults in brackets):
#   PATHWAY_VERSION        the pinned Pathway [0.33.0]
#   HMIS_BENCH_PYTHON      Python >= 3.10 that creates the venv [python3.12, python3.11, python3.10, python3]
#   HMIS_BENCH_NO_PATHWAY  1: skip Pathway (no venv; the result says it was skipped)
#   HMIS_BENCH_VENV        the virtual environment [bench/.venv]
# Every option after SIZE goes to `peers` (see `target/release/peers --help`), e.g.
#   bench/run.sh medium --workers 1 --keep
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

SIZE="${1:-small}"
[ $# -gt 0 ] && shift
PATHWAY_VERSION="${PATHWAY_VERSION:-0.33.0}"
VENV="${HMIS_BENCH_VENV:-$ROOT/bench/.venv}"
step() { printf '\n[bench] == %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

# ---- 1. Pathway ------------------------------------------------------------------------
PY_ARGS=()
if [ "${HMIS_BENCH_NO_PATHWAY:-0}" = 1 ]; then
    step "Pathway skipped (HMIS_BENCH_NO_PATHWAY=1)"
elif "$VENV/bin/python" -c "import sys, pathway; sys.exit(pathway.__version__ != '$PATHWAY_VERSION')" 2>/dev/null; then
    step "Pathway $PATHWAY_VERSION in bench/.venv"
    PY_ARGS=(--python "$VENV/bin/python")
else
    step "installing Pathway $PATHWAY_VERSION into bench/.venv"
    PY=""
    for c in ${HMIS_BENCH_PYTHON:-} python3.12 python3.11 python3.10 python3; do
        if command -v "$c" >/dev/null &&
            "$c" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            PY="$c"
            break
        fi
    done
    [ -n "$PY" ] || die "no Python >= 3.10 (Pathway needs one); set HMIS_BENCH_PYTHON"
    rm -rf "$VENV"
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 comes without venv/ensurepip.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            ver="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$ver-venv" >/dev/null 2>&1 ||
                { apt-get update -qq >/dev/null 2>&1 &&
                    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$ver-venv" >/dev/null; }
            rm -rf "$VENV"
            "$PY" -m venv "$VENV"
        else
            die "$PY -m venv failed (install the python3-venv package)"
        fi
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --progress-bar on "pathway==$PATHWAY_VERSION"
    PY_ARGS=(--python "$VENV/bin/python")
fi

# ---- 2. build --------------------------------------------------------------------------
step "cargo build --release (hmis-flow, peers, seed_baseline, plot)"
cargo build --release -p hmis-flow -p hmis-bench --bins

# ---- 3. services -----------------------------------------------------------------------
if [ -z "${HMIS_BROKERS:-}" ] || [ -z "${HMIS_DATABASE_URL:-}" ]; then
    if ! scripts/services.sh status >/dev/null 2>&1; then
        step "starting the local broker and PostgreSQL (scripts/services.sh start)"
        scripts/services.sh start
    fi
    eval "$(scripts/services.sh env)"
fi
step "broker $HMIS_BROKERS, PostgreSQL $HMIS_DATABASE_URL"

# ---- 4. peers, 5. plots ----------------------------------------------------------------
step "peers --size $SIZE $*"
rc=0
target/release/peers --size "$SIZE" "${PY_ARGS[@]}" "$@" || rc=$?
step "plots"
target/release/plot || rc=$((rc == 0 ? 1 : rc))
exit "$rc"
