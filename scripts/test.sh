#!/usr/bin/env bash
# The whole test suite: starts the local broker and PostgreSQL (installing them when
# missing, see scripts/services.sh), points the tests at them, runs every test in release
# mode. Services stay up afterwards (`scripts/services.sh stop` stops them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
scripts/services.sh start
eval "$(scripts/services.sh env)"
# promtool (Debian's `prometheus` package) checks /metrics in tests/operations.rs; installed
# like PostgreSQL in scripts/services.sh (root + apt-get). Only promtool is used; apt on
# these machines starts no service (policy-rc.d).
if ! command -v promtool >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing promtool (apt-get install prometheus)" >&2
    apt_prometheus() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
            >/dev/null 2>&1
    }
    apt_prometheus || { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1; apt_prometheus; } \
        || echo "test.sh: apt-get install prometheus failed; the promtool check skips (fails under CI)" >&2
fi
exec cargo test --workspace --release "$@"
