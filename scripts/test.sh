#!/usr/bin/env bash
# The whole test suite: installs what is missing (libtorch via scripts/setup.sh), then runs
# every test on the CPU. Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
command -v cargo >/dev/null || { echo "[test] Rust (cargo) is needed: https://rustup.rs" >&2; exit 1; }
# numpy lets the export tests load the .npz files the way users do; best effort.
if [ -x .venv/bin/python ]; then
    .venv/bin/python -c "import numpy" 2>/dev/null || .venv/bin/python -m pip install --disable-pip-version-check -q numpy || true
    export PATH="$root/.venv/bin:$PATH"
fi
# MPI ranks (the `mpi` feature) need OpenMPI's headers and mpirun, and libclang for the
# bindings: Debian's libopenmpi-dev, openmpi-bin and libclang-dev. Under CI they must be there
# (.ci/run installs them); elsewhere the MPI tests are left out, and this says so.
features=timing
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
    features=timing,mpi
elif [ "${CI:-}" = "true" ]; then
    echo "[test] mpicc and mpirun are missing; under CI the MPI tests must run (apt-get install libopenmpi-dev openmpi-bin libclang-dev)" >&2
    exit 1
else
    echo "[test] no MPI here (libopenmpi-dev, openmpi-bin): the MPI tests are left out" >&2
fi
cargo test --locked --features "$features" "$@"
