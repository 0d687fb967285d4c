#!/usr/bin/env bash
# The crate's own ops on CUDA (the fused batch norm as ATen operations, the direct convolution
# double backward), which `auto` leaves off there until this script has timed them: the
# gradcheck on the GPU first, then ResNet-18 grouped steps (the seed's setting) with and
# without each op, alternating, profiles of both, then the default step and a short crafting
# run with both on.
# Like gpu-proof.sh: carry target/release/metapoison built with `--features timing`; parts in priority order under BUDGET_S
# (default 420). Everything lands in ${OUT:-gpu-own-ops}/r/, packed into one results.tar.gz.
set -u
OUT=${OUT:-gpu-own-ops}
mkdir -p "$OUT/r"
BUDGET_S=${BUDGET_S:-420}
LOGS="$OUT/r"
source "$(dirname "${BASH_SOURCE[0]}")/gpu-lib.sh"
require_timing
J="$LOGS/bench.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$LOGS/gpu.txt" 2>&1

# Both ops on CUDA, against finite differences in float64 (the suite's own-ops cases), and
# libtorch's ops on the same cases.
part 90 gradcheck "$B" bench --gradcheck --device cuda --out "$J"
R18=(bench --device cuda --setting cifar-resnet18 --grouped --ensemble 4 --reps 5 --warmup 2 --out "$J")
# The ratio to PyTorch eager with both ops on; then ours alone, alternating, each op alone.
part 60 r18-own "$B" "${R18[@]}" --own-ops-on-cuda
part 35 r18-libtorch "$B" "${R18[@]}" --no-reference
part 35 r18-own-2 "$B" "${R18[@]}" --no-reference --own-ops-on-cuda
part 35 r18-conv-only "$B" "${R18[@]}" --no-reference --own-ops-on-cuda --native-batch-norm
part 35 r18-bn-only "$B" "${R18[@]}" --no-reference --own-ops-on-cuda --libtorch-conv-double-backward
part 35 r18-libtorch-2 "$B" "${R18[@]}" --no-reference
# Where a grouped ResNet-18 step's GPU time goes, ours with and without the ops (device time
# by kernel and by launching operator, in bench.jsonl and parts.log; the traces stay behind).
P18=(bench --device cuda --setting cifar-resnet18 --grouped --ensemble 4 --reps 1 --warmup 2 --no-reference --out "$J")
T=$(mktemp -d)
part 40 r18-profile-own "$B" "${P18[@]}" --own-ops-on-cuda --profile "$T/own.json"
part 40 r18-profile-libtorch "$B" "${P18[@]}" --profile "$T/libtorch.json"
# The default step (ConvNetBN, launch-bound on a GPU), grouped M 4, without and with.
part 30 default-libtorch "$B" bench --device cuda --grouped --reps 10 --no-reference --out "$J"
part 30 default-own "$B" bench --device cuda --grouped --reps 10 --no-reference --own-ops-on-cuda --out "$J"
# End to end with both ops: a short crafting run on CUDA.
D=$(mktemp -d)
# (cuda-short.toml ends in its [run] table, which the two lines join.)
{ cat benches/cuda-short.toml; printf 'fused_batch_norm = true\ndirect_conv_double_backward = true\n'; } >"$D/own.toml"
part 90 craft-own "$B" craft --config "$D/own.toml" --data-dir "$D" --run-dir "$D/own" --headless
echo "== $(date +%T) done after ${SECONDS}s" | tee -a "$LOGS/progress.log"
tar -czf "$OUT/results.tar.gz" -C "$OUT" r
