#!/usr/bin/env bash
# The main job: installs what is missing (libtorch via scripts/setup.sh), builds the release
# binary, and runs it. With no arguments it opens the dashboard crafting poisons on the embedded
# data set with the default config (headless JSON lines when not on a terminal); any arguments
# are passed to the binary instead (e.g. `scripts/run.sh --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
command -v cargo >/dev/null || { echo "[run] Rust (cargo) is needed: https://rustup.rs" >&2; exit 1; }
echo "[run] building the release binary (first time: ~4 minutes on 2 cores)" >&2
cargo build --release --locked --quiet
exec target/release/metapoison "$@"
