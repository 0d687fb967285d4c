#!/usr/bin/env bash
# Grouped surrogates on a GPU: the bench against the PyTorch reference (which runs the
# surrogates one after another), and whole crafting steps grouped and not. Like gpu-proof.sh:
# carry target/release/metapoison; parts in priority order under BUDGET_S (default 230).
# Everything lands in ${OUT:-gpu-grouped}/ and is packed into one results.tar.gz.
set -u
OUT=${OUT:-gpu-grouped}
mkdir -p "$OUT/r"
B=${METAPOISON_BIN:-target/release/metapoison}
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export METAPOISON_PYTHON=${METAPOISON_PYTHON:-python3}
BUDGET_S=${BUDGET_S:-230}
J="$OUT/r/bench.jsonl"
LOG="$OUT/r/progress.log"
part() {
  local limit=$1 name=$2
  shift 2
  if (( SECONDS + limit > BUDGET_S )); then
    echo "== $(date +%T) skip $name (${SECONDS}s used of $BUDGET_S)" | tee -a "$LOG"
    return
  fi
  echo "== $(date +%T) $name" | tee -a "$LOG"
  echo "== $name" >>"$OUT/r/parts.log"
  timeout "$limit" "$@" >>"$OUT/r/$name.out" 2>>"$OUT/r/parts.log"
  echo "   rc=$? after ${SECONDS}s" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/r/gpu.txt" 2>&1

part 40 default-m4 "$B" bench --device cuda --grouped --reps 10 --out "$J"
part 45 default-m24 "$B" bench --device cuda --grouped --ensemble 24 --reps 5 --out "$J"
part 50 r18-m4 "$B" bench --device cuda --setting cifar-resnet18 --grouped --ensemble 4 --reps 5 --out "$J"
D=$(mktemp -d)
sed 's/^steps = 2/steps = 2\ngrouped_surrogates = false/' benches/cuda-short.toml >"$D/sequential.toml"
part 45 craft-m4-grouped "$B" craft --config benches/cuda-short.toml --data-dir "$D" --run-dir "$D/g4" --headless
part 45 craft-m4-sequential "$B" craft --config "$D/sequential.toml" --data-dir "$D" --run-dir "$D/s4" --headless
part 60 r18-m24 "$B" bench --device cuda --setting cifar-resnet18 --grouped --ensemble 24 --reps 3 --warmup 1 --out "$J"
part 150 craft-m24-grouped "$B" craft --config benches/cuda-m24.toml --data-dir "$D" --run-dir "$D/g24" --headless
echo "== $(date +%T) done after ${SECONDS}s" | tee -a "$LOG"
tar -czf "$OUT/results.tar.gz" -C "$OUT" r
