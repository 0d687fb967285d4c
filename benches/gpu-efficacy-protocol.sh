#!/usr/bin/env bash
# The efficacy benchmark (`campaign --protocol`) on a GPU for settings a CPU cannot afford:
# each setting of benches/efficacy/settings/ runs as its own campaign, side by side on the
# card (ConvNetBN is launch-bound, so concurrent processes share it well), judged by the
# protocol's victims (8 an arm, grouped on CUDA). SETTINGS lists NAME or NAME:N (only the
# protocol's first N targets). Campaigns still running at BUDGET_S are stopped with SIGTERM,
# which keeps the targets finished so far.
# Carry target/release/metapoison. Everything lands in ${OUT:-gpu-efficacy-protocol}/r and is
# packed into $OUT/results.tar.gz.
#   SETTINGS="m24:3 gm1 gm4:5" PROTOCOL=standard BUDGET_S=480 OUT=$OUT bash benches/gpu-efficacy-protocol.sh
# The authors' whole setting on all 10 targets, and the default and the best setting so far
# judged by the standard protocol's ResNet-20 victims too (docs/efficacy.md, Figures; a CPU
# measured m16-61 on all 10 and m24 on 3, gray-box only):
#   SETTINGS="m24 default m16-61" PROTOCOL=standard ...
set -u
OUT=${OUT:-gpu-efficacy-protocol}
mkdir -p "$OUT/r"
BUDGET_S=${BUDGET_S:-480}
SETTINGS=${SETTINGS:-"m24:3 gm1 gm4:5"}
PROTOCOL=${PROTOCOL:-standard}
LOGS="$OUT/r"
source "$(dirname "${BASH_SOURCE[0]}")/gpu-lib.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/r/gpu.txt" 2>&1
W=$(mktemp -d)

pids=()
for setting in $SETTINGS; do
  name=${setting%%:*}
  first=""
  [ "$name" != "$setting" ] && first="--first ${setting#*:}"
  cfg="benches/efficacy/settings/$name.toml"
  if [ ! -f "$cfg" ]; then
    echo "no setting $cfg" >&2
    exit 1
  fi
  mkdir -p "$OUT/r/$name"
  cp "$cfg" "$OUT/r/$name/setting.toml"
  # shellcheck disable=SC2086 # $first is one flag and its value, or nothing
  campaign_in_background "$name" "$cfg" --protocol "$PROTOCOL" $first
done
for p in "${pids[@]}"; do wait "$p"; done
sleep 2
for setting in $SETTINGS; do
  name=${setting%%:*}
  cp "$W/$name"/campaign.{json,md,csv} "$OUT/r/$name/" 2>/dev/null
  for t in "$W/$name"/target-*; do
    [ -d "$t" ] || continue
    cp "$t/run/config.toml" "$OUT/r/$name/$(basename "$t").config.toml" 2>/dev/null
    cp "$t"/export/eval-*.json "$OUT/r/$name/" 2>/dev/null &&
      for e in "$t"/export/eval-*.json; do mv "$OUT/r/$name/$(basename "$e")" "$OUT/r/$name/$(basename "$t")-$(basename "$e")"; done
  done
done
echo "== $(date +%T) done after ${SECONDS}s" | tee -a "$LOGS/progress.log"
tar -czf "$OUT/results.tar.gz" -C "$OUT" r
