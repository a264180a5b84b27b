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
exec cargo test --workspace --release "$@"
