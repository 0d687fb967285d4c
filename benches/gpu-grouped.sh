#!/usr/bin/env bash
# Grouped surrogates on a GPU: the bench against the PyTorch reference (which runs the
# surrogates one after another), and whole crafting steps grouped and not. Like gpu-proof.sh:
# carry target/release/metapoison built with `--features timing`; parts in priority order under BUDGET_S (default 230).
# Everything lands in ${OUT:-gpu-grouped}/ and is packed into one results.tar.gz.
set -u
OUT=${OUT:-gpu-grouped}
mkdir -p "$OUT/r"
BUDGET_S=${BUDGET_S:-230}
LOGS="$OUT/r"
source "$(dirname "${BASH_SOURCE[0]}")/gpu-lib.sh"
require_timing
J="$OUT/r/bench.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/r/gpu.txt" 2>&1

part 40 default-m4 "$B" bench --device cuda --grouped --reps 10 --out "$J"
part 45 default-m24 "$B" bench --device cuda --grouped --ensemble 24 --reps 5 --out "$J"
part 50 r18-m4 "$B" bench --device cuda --setting cifar-resnet18 --grouped --ensemble 4 --reps 5 --out "$J"
D=$(mktemp -d)
sed 's/^steps = 2/steps = 2\ngrouped_surrogates = false/' benches/cuda-short.toml >"$D/sequential.toml"
part 45 craft-m4-grouped "$B" craft --config benches/cuda-short.toml --data-dir "$D" --run-dir "$D/g4" --headless
part 45 craft-m4-sequential "$B" craft --config "$D/sequential.toml" --data-dir "$D" --run-dir "$D/s4" --headless
# 24 ResNet-18 surrogates do not fit in one group on an 80 GB card (about 4 GB each).
part 60 r18-m24 "$B" bench --device cuda --setting cifar-resnet18 --grouped --group-size 8 --ensemble 24 --reps 3 --warmup 1 --out "$J"
part 150 craft-m24-grouped "$B" craft --config benches/cuda-m24.toml --data-dir "$D" --run-dir "$D/g24" --headless
echo "== $(date +%T) done after ${SECONDS}s" | tee -a "$LOGS/progress.log"
tar -czf "$OUT/results.tar.gz" -C "$OUT" r
