#!/usr/bin/env bash
# The CUDA proof and GPU figures of BENCHMARKS.md, on a machine with an NVIDIA GPU and a
# python3 that has torch 2.11 (no Rust needed: carry target/release/metapoison there).
# Writes everything under ${OUT:-gpu-proof}/. Each part has its own time limit, so one
# failure does not cost the rest.
set -u
OUT=${OUT:-gpu-proof}
mkdir -p "$OUT"
B=${METAPOISON_BIN:-target/release/metapoison}
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export METAPOISON_PYTHON=${METAPOISON_PYTHON:-python3}
J="$OUT/bench.jsonl"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/progress.log"; }

log start
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
"$B" --version >"$OUT/version.txt" 2>&1

log gradcheck
timeout 120 "$B" bench --gradcheck --device cuda --out "$J" 2>"$OUT/gradcheck.log" >/dev/null

log "bench default (M 4) and default at the GPU ensemble (M 24)"
timeout 90 "$B" bench --device cuda --reps 10 --out "$J" 2>>"$OUT/bench.log" >/dev/null
timeout 90 "$B" bench --device cuda --ensemble 24 --reps 5 --out "$J" 2>>"$OUT/bench.log" >/dev/null

log "bench cifar-resnet18 (M 8, M 24)"
timeout 120 "$B" bench --device cuda --setting cifar-resnet18 --ensemble 8 --reps 5 --out "$J" 2>>"$OUT/bench.log" >/dev/null
timeout 150 "$B" bench --device cuda --setting cifar-resnet18 --ensemble 24 --reps 3 --warmup 1 --out "$J" 2>>"$OUT/bench.log" >/dev/null

log "scaling: K, batch, ensemble (resnet18, ours only)"
S="$OUT/scaling.jsonl"
for k in 1 2 3 4; do
  timeout 60 "$B" bench --device cuda --setting cifar-resnet18 --ensemble 1 --unroll $k --reps 5 --no-reference --out "$S" 2>>"$OUT/scaling.log" >/dev/null
done
for b in 64 250 500; do
  timeout 60 "$B" bench --device cuda --setting cifar-resnet18 --ensemble 1 --batch $b --poisons-in-batch $((b / 10)) --reps 5 --no-reference --out "$S" 2>>"$OUT/scaling.log" >/dev/null
done
for m in 2 4; do
  timeout 60 "$B" bench --device cuda --setting cifar-resnet18 --ensemble $m --reps 5 --no-reference --out "$S" 2>>"$OUT/scaling.log" >/dev/null
done

log "short crafting run on CUDA (benches/cuda-short.toml), export, verify, eval"
R=$(mktemp -d)/run
timeout 240 "$B" craft --config benches/cuda-short.toml --run-dir "$R" >"$OUT/craft.jsonl" 2>"$OUT/craft.log"
echo "craft rc=$?" >>"$OUT/progress.log"
"$B" export "$R" --out "$R-export" >"$OUT/export.log" 2>&1
"$B" export --verify "$R-export" >>"$OUT/export.log" 2>&1
echo "verify rc=$?" >>"$OUT/progress.log"
timeout 120 "$B" eval "$R-export" --config benches/cuda-short.toml --trials 1 --epochs 20 --headless >"$OUT/eval.jsonl" 2>"$OUT/eval.log"
cp "$R-export/eval.json" "$OUT/" 2>/dev/null
log done
