#!/usr/bin/env bash
# Compares crafting settings on the embedded data by campaign results: one campaign per
# variant, run in parallel (meant for a GPU box; on 2 CPU cores run one at a time).
# Usage: OUT=dir TARGETS=27,29 DEVICE=cuda EPOCHS=40 benches/explore-defaults.sh
set -u
OUT=${OUT:-explore}; TARGETS=${TARGETS:-27}; DEVICE=${DEVICE:-cuda}; EPOCHS=${EPOCHS:-40}
B=${METAPOISON_BIN:-target/release/metapoison}
mkdir -p "$OUT"
variant() { # name, extra TOML for [threat] and [craft]
  local name=$1 threat=$2 craft=$3
  printf '[threat]\n%s\n[craft]\nensemble_size = 4\nstagger = 2\n%s\n[run]\ndevice = "%s"\ncheckpoint_every = 0\n' \
    "$threat" "$craft" "$DEVICE" >"$OUT/$name.toml"
  "$B" --data-dir "$OUT/data-$name" --config "$OUT/$name.toml" campaign --targets "$TARGETS" \
    --trials 2 --epochs "$EPOCHS" --dir "$OUT/$name" >"$OUT/$name.txt" 2>"$OUT/$name.log"
}
variant frac100 "" "meta_batch_fraction = 1.0" &
variant eps16 "eps = 16.0" "meta_batch_fraction = 0.15" &
variant p500 "npoison = 500" "meta_batch_fraction = 0.15" &
variant eps16p500 $'eps = 16.0\nnpoison = 500' "meta_batch_fraction = 0.5" &
wait
for f in "$OUT"/*.txt; do echo "== $f"; cat "$f"; done
