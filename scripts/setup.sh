#!/usr/bin/env bash
# Idempotent set-up: installs libtorch 2.11.0 (from the PyPI torch wheel) into a project-local
# virtual environment and links it at .libtorch, where .cargo/config.toml tells torch-sys to look.
# A user who already has libtorch 2.11 can export LIBTORCH=/path/to/libtorch and skip the download.
set -euo pipefail

TORCH_VERSION="2.11.0"   # pinned together with tch/torch-sys 0.24 in Cargo.toml
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
link="$root/.libtorch"

export PYTHONWARNINGS=ignore  # torch warns about numpy being absent; irrelevant here
say() { printf '[setup] %s\n' "$*" >&2; }

check_libtorch_dir() {
    # libtorch's build-version file says which release a directory holds.
    local dir="$1" version
    [ -f "$dir/lib/libtorch_cpu.so" ] || return 1
    version="$(cat "$dir/build-version" 2>/dev/null || true)"
    case "$version" in
        "$TORCH_VERSION"*) return 0 ;;
        *) say "libtorch at $dir is version '${version:-unknown}', need $TORCH_VERSION"; return 1 ;;
    esac
}

if [ -n "${LIBTORCH:-}" ]; then
    if check_libtorch_dir "$LIBTORCH"; then
        say "using LIBTORCH=$LIBTORCH (libtorch $TORCH_VERSION), nothing to install"
        exit 0
    fi
    say "LIBTORCH=$LIBTORCH is not a libtorch $TORCH_VERSION folder: unset it or point it at one"
    exit 1
fi

if [ -L "$link" ] && check_libtorch_dir "$link"; then
    say "libtorch $TORCH_VERSION already installed at $link"
    exit 0
fi

command -v python3 >/dev/null || { say "python3 (3.9 or newer) is needed to install libtorch from PyPI"; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
    say "creating virtual environment $venv"
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
    say "installing torch==$TORCH_VERSION from PyPI into $venv"
    say "  (first time only: downloads ~2.5 GB and takes ~4.7 GB of disk; about a minute on a fast link)"
    "$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off "torch==$TORCH_VERSION"
fi
torch_dir="$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
ln -sfn "$torch_dir" "$link"
# PyPI wheels carry no build-version file at the top; record it so the check above is cheap next time.
[ -f "$torch_dir/build-version" ] || "$venv/bin/python" -c 'import torch; print(torch.__version__)' > "$torch_dir/build-version"
check_libtorch_dir "$link"
say "libtorch $TORCH_VERSION ready at $link -> $torch_dir"
