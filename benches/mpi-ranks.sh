#!/usr/bin/env bash
# MPI ranks against one process on this machine: the CPU default setting (M 4, 2,000 images,
# 150 poisons), a few craft steps each way, and per step the wall time and (with ranks) the
# time spent in collective calls. Needs a build with `--features mpi` and OpenMPI's mpirun.
# Usage: benches/mpi-ranks.sh [BINARY] [STEPS] [OUT.jsonl]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${1:-$root/target/release/metapoison}"
steps="${2:-4}"
out="${3:-$root/benches/results-mpi-cpu.jsonl}"
config="$root/benches/efficacy/settings/default.toml"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mpirun_flags=(--oversubscribe)
[ "$(id -u)" = 0 ] && mpirun_flags+=(--allow-run-as-root)
run() {
    local ranks=$1 dir="$work/ranks-$1"
    if [ "$ranks" = 1 ]; then
        "$bin" --data-dir "$work" --config "$config" craft --steps "$steps" --run-dir "$dir" > "$dir.jsonl" 2>/dev/null
    else
        mpirun "${mpirun_flags[@]}" -np "$ranks" "$bin" --data-dir "$work" --config "$config" \
            craft --steps "$steps" --run-dir "$dir" > "$dir.jsonl" 2>/dev/null
    fi
    python3 - "$dir.jsonl" "$ranks" <<'PY' | tee -a "$out"
import json, sys, platform, os
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [l for l in lines if l.get("type") == "step"]
started = next(l for l in lines if l.get("type") == "started")
# The first step carries one-off costs; the rest are the steady state.
rest = steps[1:] or steps
med = sorted(s["seconds"] for s in rest)[len(rest) // 2]
comm = [s.get("comm_seconds") for s in rest]
print(json.dumps({
    "kind": "mpi_ranks", "ranks": int(sys.argv[2]), "machine": f"{os.cpu_count()} CPU cores",
    "device": started["device"], "setting": started["config_summary"],
    "step_s": [s["seconds"] for s in steps], "median_s": med,
    "comm_s": comm, "median_comm_s": sorted(c for c in comm if c is not None)[len(rest) // 2] if comm[0] is not None else None,
}))
PY
}
run 1
run 2
