#!/usr/bin/env bash
# Exploratory campaign on a GPU: the CPU default crafting settings (M 4, stagger 2, meta step
# at 15% of poison-holding batches; or FRACTION) run on CUDA for several targets, each exported
# and evaluated with fresh victims. Appends one line per target to $OUT/campaign.tsv.
set -u
OUT=${OUT:-gpu-campaign}
mkdir -p "$OUT"
B=${METAPOISON_BIN:-target/release/metapoison}
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
TARGETS=${TARGETS:-27 29 40 23 57}
FRACTION=${FRACTION:-0.15}
EPOCHS=${EPOCHS:-40}
TRIALS=${TRIALS:-2}
W=$(mktemp -d)
for t in $TARGETS; do
  cat >"$W/c$t.toml" <<TOML
[threat]
target_ids = [$t]
[craft]
ensemble_size = 4
stagger = 2
meta_batch_fraction = $FRACTION
[run]
device = "cuda"
checkpoint_every = 0
TOML
  start=$(date +%s)
  "$B" craft --config "$W/c$t.toml" --run-dir "$W/r$t" >"$OUT/craft-$t-$FRACTION.jsonl" 2>"$OUT/craft-$t.log" || continue
  "$B" export "$W/r$t" --out "$W/e$t" --format npz >/dev/null 2>&1 || continue
  "$B" eval "$W/e$t" --config "$W/c$t.toml" --trials "$TRIALS" --epochs "$EPOCHS" --headless >/dev/null 2>"$OUT/eval-$t.log"
  python3 - "$W/e$t/eval.json" "$t" "$FRACTION" "$(( $(date +%s) - start ))" >>"$OUT/campaign.tsv" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))
p, c = e["poisoned"], e["control"]
# p(poison class 0) of the target, per trial and arm
adv = ["%s:%.2f" % (t["arm"][0], t["target_probs"][0][0]) for t in e["trials"]]
print(sys.argv[2], sys.argv[3], sys.argv[4], p["successes"], p["trials"], c["successes"], c["trials"],
      round(p["accuracy_mean"], 4), round(c["accuracy_mean"], 4), " ".join(adv), sep="\t")
PY
done
