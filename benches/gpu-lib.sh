# Sourced by the GPU scripts (bash): the carried binary, libtorch from this machine's python3
# torch, and `part`, which runs one measured step under its own time limit.
# Set before sourcing: LOGS (the folder parts write into) and BUDGET_S (seconds in all).
B=${METAPOISON_BIN:-target/release/metapoison}
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export METAPOISON_PYTHON=${METAPOISON_PYTHON:-python3}

# part LIMIT NAME COMMAND...: runs COMMAND (stdout to $LOGS/NAME.out, stderr to
# $LOGS/parts.log), or skips it when less than LIMIT seconds are left of BUDGET_S.
part() {
  local limit=$1 name=$2
  shift 2
  if (( SECONDS + limit > BUDGET_S )); then
    echo "== $(date +%T) skip $name (${SECONDS}s used of $BUDGET_S)" | tee -a "$LOGS/progress.log"
    return
  fi
  echo "== $(date +%T) $name" | tee -a "$LOGS/progress.log"
  echo "== $name" >>"$LOGS/parts.log"
  timeout "$limit" "$@" >>"$LOGS/$name.out" 2>>"$LOGS/parts.log"
  echo "   rc=$? after ${SECONDS}s" | tee -a "$LOGS/progress.log"
}

# campaign_in_background NAME CONFIG CAMPAIGN_ARGS...: one campaign (headless, its own data dir)
# in $W/NAME, stopped with SIGTERM after BUDGET_S; stdout and time-stamped progress land in
# $OUT/r/NAME. Its pid is added to the array `pids`. Set W and OUT first.
campaign_in_background() {
  local name=$1 cfg=$2
  shift 2
  mkdir -p "$OUT/r/$name"
  (
    timeout -s TERM "$BUDGET_S" "$B" --config "$cfg" campaign "$@" \
      --dir "$W/$name" --data-dir "$W/dd-$name" --headless \
      >"$OUT/r/$name/stdout.log" 2> >(while IFS= read -r l; do echo "$SECONDS $l"; done >"$OUT/r/$name/progress.log")
    echo "rc=$? after ${SECONDS}s" >>"$OUT/r/$name/progress.log"
  ) &
  pids+=($!)
}

# The speed harness is a build feature (left out of the user binary): scripts that time steps
# call this first, so a binary built without it fails at once, not after the device started.
require_timing() {
    if "$B" bench --reps 0 --no-reference 2>&1 | grep -q "no timing harness"; then
        echo "$B has no timing harness: build it with cargo build --release --features timing" >&2
        exit 2
    fi
}
