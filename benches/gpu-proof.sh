#!/usr/bin/env bash
# The CUDA proof and GPU figures of BENCHMARKS.md, on a machine with an NVIDIA GPU and a
# python3 that has torch 2.11 (no Rust needed: carry target/release/metapoison there, built with `cargo build --release --features timing`).
# Writes everything under ${OUT:-gpu-proof}/r/, packed at the end into ${OUT}/results.tar.gz
# (the device tool brings back at most 8 files). Parts run in priority order, each under its own
# time limit, and a part is skipped when less than its limit is left of BUDGET_S (default 520),
# so one slow part never costs the rest of a short device lease.
set -u
OUT=${OUT:-gpu-proof}
mkdir -p "$OUT/r"
BUDGET_S=${BUDGET_S:-520}
LOGS="$OUT/r"
source "$(dirname "${BASH_SOURCE[0]}")/gpu-lib.sh"
require_timing
J="$LOGS/bench.jsonl"
S="$LOGS/scaling.jsonl"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$LOGS/gpu.txt" 2>&1
"$B" --version >>"$LOGS/gpu.txt" 2>&1

part 90 gradcheck "$B" bench --gradcheck --device cuda --out "$J"
# ResNet-18 on CIFAR shapes (the seed's setting), M 4: both NCHW; ours channels-last against the
# reference as written (NCHW); both channels-last.
R18=(bench --device cuda --setting cifar-resnet18 --ensemble 4 --reps 5 --out "$J")
part 75 r18-nchw "$B" "${R18[@]}"
part 75 r18-cl "$B" "${R18[@]}" --channels-last
part 75 r18-cl-both "$B" "${R18[@]}" --channels-last --reference-channels-last
# The default step (ConvNetBN, Fashion-MNIST shapes, M 4), both layouts of ours.
part 60 default-nchw "$B" bench --device cuda --reps 10 --out "$J"
part 60 default-cl "$B" bench --device cuda --reps 10 --channels-last --out "$J"
# End to end: a short crafting run on CUDA, export, verify, one victim.
D=$(mktemp -d)
R=$D/run
part 150 craft "$B" craft --config benches/cuda-short.toml --data-dir "$D" --run-dir "$R" --headless
part 30 export "$B" export "$R" --out "$R-export"
part 30 verify "$B" export --verify "$R-export"
part 90 eval "$B" eval "$R-export" --config benches/cuda-short.toml --data-dir "$D" --trials 1 --epochs 20 --headless
cp "$R-export/eval.json" "$LOGS/" 2>/dev/null

# Two or four surrogates at once on their own threads (one CUDA stream: what overlaps is the
# host side's kernel launches, which bound ConvNetBN on a GPU).
part 60 default-cl-w2 "$B" bench --device cuda --reps 10 --channels-last --workers 2 --out "$J"
part 60 default-cl-w4 "$B" bench --device cuda --reps 10 --channels-last --workers 4 --out "$J"
part 75 r18-cl-w2 "$B" "${R18[@]}" --channels-last --workers 2
# Whether batching the surrogates as grouped convolutions pays on a GPU (PyTorch side).
part 60 grouped python3 benches/experiments/grouped_surrogates_and_channels_last.py cuda 4
part 60 grouped24 python3 benches/experiments/grouped_surrogates_and_channels_last.py cuda 24

# Scaling in the batch (ours alone, ResNet-18, M 1), channels-last and NCHW.
for b in 64 250 500; do
  part 40 "scaling-b$b" "$B" bench --device cuda --setting cifar-resnet18 --ensemble 1 --batch $b \
    --poisons-in-batch $((b / 10)) --reps 5 --no-reference --channels-last --out "$S"
done
for b in 64 250 500; do
  part 40 "scaling-nchw-b$b" "$B" bench --device cuda --setting cifar-resnet18 --ensemble 1 --batch $b \
    --poisons-in-batch $((b / 10)) --reps 5 --no-reference --out "$S"
done
echo "== $(date +%T) done after ${SECONDS}s" | tee -a "$LOGS/progress.log"
tar -czf "$OUT/results.tar.gz" -C "$OUT" r
