#!/usr/bin/env bash
# The main job: installs what is missing (libtorch via scripts/setup.sh), builds the release
# binary, and runs it. With no arguments it crafts poisons on the embedded data set with the
# default config; any arguments are passed to the binary instead (e.g. `scripts/run.sh --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
command -v cargo >/dev/null || { echo "[run] Rust (cargo) is needed: https://rustup.rs" >&2; exit 1; }
echo "[run] building the release binary (first time: ~4 minutes on 2 cores)" >&2
cargo build --release --locked --quiet
if [ "$#" -eq 0 ]; then
    set -- craft
fi
exec target/release/metapoison "$@"
