#!/usr/bin/env bash
# Efficacy of the CPU default setting and variants, measured on a GPU where a 10-target
# campaign takes minutes instead of hours: one `campaign` per arm, the arms side by side (the
# ConvNetBN step is launch-bound, so concurrent processes share the card well), every arm on
# the same targets with 4 victims an arm. Each arm is the CPU default written out
# (benches/dense-cpu.toml) with device cuda and the arm's overrides.
# Carry target/release/metapoison. Everything lands in ${OUT:-gpu-efficacy}/r and is packed
# into $OUT/results.tar.gz; campaigns still running at BUDGET_S (default 420) are stopped with
# SIGTERM, which saves the targets finished so far.
#   ARMS="p150:npoison=150 p190:npoison=190" TARGETS=81,120,... bash benches/gpu-efficacy.sh
# An override's key must have a line in dense-cpu.toml; string values keep their quotes:
#   ARMS='m24:ensemble_size=24,stagger=1 poison:trajectory="poison"'
set -u
OUT=${OUT:-gpu-efficacy}
mkdir -p "$OUT/r"
BUDGET_S=${BUDGET_S:-420}
TARGETS=${TARGETS:-81,120,57,11,139,171,173,17,169,59}
# The embedded split holds 194 eligible T-shirts (poison candidates): npoison at most 194.
ARMS=${ARMS:-"p150:npoison=150 p190:npoison=190"}
TRIALS=${TRIALS:-4}
DEVICE=${DEVICE:-cuda}
LOGS="$OUT/r"
source "$(dirname "${BASH_SOURCE[0]}")/gpu-lib.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/r/gpu.txt" 2>&1
W=$(mktemp -d)

# arm_config NAME OVERRIDES: dense-cpu.toml on CUDA, with KEY=VALUE overrides (comma separated)
# replacing the line of the same key.
arm_config() {
  local file="$W/$1.toml" kv
  sed -e "s/^device = \"cpu\"/device = \"$DEVICE\"/" -e 's/^checkpoint_every = 5/checkpoint_every = 0/' \
    benches/dense-cpu.toml >"$file"
  IFS=',' read -ra kv <<<"$2"
  for pair in "${kv[@]}"; do
    [ -n "$pair" ] || continue
    # A key the file lacks would leave the arm silently equal to the default.
    if ! grep -q "^${pair%%=*} = " "$file"; then
      echo "arm $1: no line \"${pair%%=*} = ...\" in benches/dense-cpu.toml to override" >&2
      return 1
    fi
    sed -i "s/^${pair%%=*} = .*/${pair%%=*} = ${pair#*=}/" "$file"
  done
  echo "$file"
}

pids=()
for arm in $ARMS; do
  name=${arm%%:*}
  cfg=$(arm_config "$name" "${arm#*:}") || exit 1
  mkdir -p "$OUT/r/$name"
  cp "$cfg" "$OUT/r/$name/arm.toml"
  campaign_in_background "$name" "$cfg" --targets "$TARGETS" --trials "$TRIALS"
done
for p in "${pids[@]}"; do wait "$p"; done
sleep 2
for arm in $ARMS; do
  name=${arm%%:*}
  cp "$W/$name"/campaign.{json,md,csv} "$OUT/r/$name/" 2>/dev/null
  # Each target's effective config (its run folder stays behind).
  for t in "$W/$name"/target-*; do
    [ -d "$t/run" ] && cp "$t/run/config.toml" "$OUT/r/$name/$(basename "$t").config.toml" 2>/dev/null
  done
done
echo "== $(date +%T) done after ${SECONDS}s" | tee -a "$LOGS/progress.log"
tar -czf "$OUT/results.tar.gz" -C "$OUT" r
