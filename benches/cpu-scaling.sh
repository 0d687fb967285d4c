#!/usr/bin/env bash
# CPU scaling of one benchmarked craft step (ours only, the default ConvNetBN shape): time and
# peak resident memory against K (M 1), the batch size (M 1, 10% poisons a batch) and M
# (two surrogates at a time, the CPU default). Appends JSON lines to ${OUT:-cpu-scaling}.jsonl,
# prints a table and plots the file's points to ${OUT:-cpu-scaling}.svg (plot_scaling.py).
# Each bench is its own process, so its peak RSS is that setting's.
set -eu
B=${METAPOISON_BIN:-target/release/metapoison}
# The timing harness is a build feature: cargo build --release --features timing.
J=${OUT:-cpu-scaling}.jsonl
run() { "$B" bench --device cpu --no-reference --warmup 2 --reps 5 --out "$J" "$@" >/dev/null 2>&1; }
for k in 1 2 3 4; do run --ensemble 1 --unroll "$k"; done
for b in 64 250 500; do run --ensemble 1 --batch "$b" --poisons-in-batch $((b / 10)); done
for m in 2 4 8; do run --ensemble "$m"; done
python3 - "$J" <<'PY'
import json, sys
print("| K | batch | poisons a batch | M | at once | median s | peak RSS GB |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for line in open(sys.argv[1]):
    r = json.loads(line)
    s = r["spec"]
    print(f"| {s['unroll_steps']} | {s['batch']} | {s['poisons_in_batch']} | {s['ensemble']} | {s['workers']} "
          f"| {r['ours']['median_s']:.2f} | {r['ours_peak_rss_bytes'] / 1e9:.2f} |")
PY
python3 "$(dirname "${BASH_SOURCE[0]}")/plot_scaling.py" "${OUT:-cpu-scaling}.svg" \
    "One craft step on the CPU ($(nproc) cores), ConvNetBN 28x28x1, $(date +%F)" "$J" >/dev/null
