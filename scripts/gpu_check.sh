#!/usr/bin/env bash
# The GPU check: on a bare H100/H200 with a CUDA build of PyTorch installed and NO network,
# from a source checkout, in at most GPU_CHECK_BUDGET_S seconds (default 480 = 8 minutes):
#
#   FER2013_ROOT=/path/to/fer2013 OUT=/some/folder bash scripts/gpu_check.sh
#
# Phases, each under its own `timeout` and each recorded (ok / failed / timeout / skipped /
# not_run / interrupted) with its seconds, whatever happens; a phase that fails or times out
# does not stop the later ones (except the first two, without which nothing else can run):
#   env      the environment first: every dependency fer_sweep declares (pyproject.toml) is
#            installed, at the declared version, and importable, else the missing ones are
#            listed and the check stops (nothing is installed from the network; only
#            `pip install --no-deps --no-build-isolation -e .` of this checkout, offline, where
#            fer_sweep is not installed yet); CUDA visible and working (not in smoke mode);
#            torch / CUDA / cuDNN versions, the GPU's name and memory -> $OUT/env.json
#   prepare  the MLflow store (a sqlite file) and its experiment created by ONE process before
#            anything runs in parallel, and FER2013 decoded once into the cache every job reads
#   bench    python -m fer_sweep.bench --quick --models cnn2,resnet --no-compile --json
#            $OUT/bench.json (fp32 vs bf16 eager ceilings, fer_sweep vs ceiling vs naive)
#   table2   the whole Table 2 (experiment=table2: seven jobs, each row once) with
#            trainer.stop_at_min_lr=true (caps rows 2-3's 500 epochs where the learning rate
#            cannot fall any more), hydra/launcher=joblib with n_jobs=2 (GPU_CHECK_TABLE2_JOBS):
#            two processes share the GPU, not seven
#   compile  one trainer.compile=true run (cnn2 + norm, 3 epochs): torch.compile on CUDA
#   fast     the 30-minute CPU recipe (`python -m fer_sweep experiment=fast`) on the GPU, its
#            time budget set to the phase's cap less 30 s (trainer.time_budget_min): the epochs
#            planned on the device (at most 60), its test accuracy and seconds per epoch
#   report   python -m fer_sweep.report --out $OUT/report --no-log (Table 2 from MLflow)
#   bench_channels_last_off   the benchmark again with trainer.channels_last=false, only when
#            at least GPU_CHECK_CL_OFF_MIN_S (60) seconds of the budget are left (else
#            "skipped", which is not a failure)
#
# Its Python parts are scripts/gpu_check/{env_check,prepare,summary}.py (the env and prepare
# phases, and the summary written on exit).
#
# Always written, by a trap on EXIT: $OUT/gpu_check.json and $OUT/gpu_check.md (phases, per run:
# device tag, GPU name, precision, epochs run, mean epoch seconds, test accuracy vs the study's
# value minus 5 points, and the checks), plus $OUT/logs/, $OUT/mlflow.db (the runs' store).
# Exit status: 0 when every phase is ok and every check passes; 1 when a phase failed or timed
# out, a Table 2 row is missing or below its floor, or a run was not on CUDA; 2 when the
# environment check stopped the run.
#
# Environment:
#   GPU_CHECK_BUDGET_S      total wall-clock budget in seconds (480)
#   GPU_CHECK_SMOKE=1       try the script itself on any machine (CPU too): every phase on a tiny
#                           subset (one epoch, 20 images per class), a two-batch benchmark without
#                           torch.compile, no accuracy floor, no CUDA requirement
#   GPU_CHECK_OVERRIDES     extra Hydra overrides (space-separated) appended to every fer_sweep
#                           command, e.g. "data=synthetic" (then FER2013_ROOT is not needed)
#   GPU_CHECK_TABLE2_JOBS   Table 2 jobs at once on the GPU (2)
#   GPU_CHECK_BENCH_ARGS    the benchmark's arguments (GPU: --quick --models cnn2,resnet
#                           --no-compile; the torch.compile ceilings cost ~40 s per model and
#                           precision, too much for the 8 minutes)
#   GPU_CHECK_BENCH_S, GPU_CHECK_COMPILE_S, GPU_CHECK_FAST_S, GPU_CHECK_REPORT_S   those
#                           phases' caps (GPU: 120, 120, 150, 60 s); Table 2 gets the rest of
#                           the budget less 257 s for them
#   GPU_CHECK_CL_OFF_MIN_S  the last, optional phase runs only with this much time left (60)
#   GPU_CHECK_KEEP_WORK=1   keep the work folder (Hydra outputs, MLflow artifacts)
#   FER2013_ROOT            FER2013's image folders (train/, test/); default shared/fer2013 or
#                           ../shared/fer2013 when present
#   FER_SWEEP_CACHE         the decoded-data cache (default: a temporary folder)
#   PY                      the Python interpreter (python)
set -uo pipefail   # no -e: every phase is recorded, whatever happens to it
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-480}
PY=${PY:-python}
SMOKE=${GPU_CHECK_SMOKE:-0}
[ "$SMOKE" = 1 ] || SMOKE=0
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_out.XXXXXX")}
mkdir -p "$OUT/logs" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")
PHASES=$WORK/phases.tsv
: > "$PHASES"
rm -f "$OUT/gpu_check.json" "$OUT/gpu_check.md"
read -r -a EXTRA <<< "${GPU_CHECK_OVERRIDES:-}"
SYNTHETIC=0
for o in "${EXTRA[@]}"; do [ "$o" = data=synthetic ] && SYNTHETIC=1; done

# Offline, quiet, and nothing written into the checkout or $HOME.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's fer_sweep, installed or not
export FER_SWEEP_CACHE=${FER_SWEEP_CACHE:-$WORK/cache}
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor        # cold compile caches: honest compile times
export TRITON_CACHE_DIR=$WORK/triton
export MPLBACKEND=Agg HYDRA_FULL_ERROR=1 PYTHONUNBUFFERED=1
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export GPU_CHECK_REPO=$REPO GPU_CHECK_SMOKE=$SMOKE GPU_CHECK_OUT=$OUT GPU_CHECK_WORK=$WORK

if [ "$SMOKE" = 1 ]; then
  TRAIN_ARGS=(trainer.epochs=1 data.limit_per_class=20)
  COMPILE_ARGS=()   # batch 100 of 140 images: the 40-image last batch runs eagerly (train.py)
  DEVICE_ARGS=()
  read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:---quick --models cnn2 --transforms norm --steps 2 --repeats 1 --warmup 1 --no-compile}"
  BENCH_CAP=150; COMPILE_CAP=180; FAST_CAP=120; REPORT_CAP=90; CL_OFF_MIN=20
else
  TRAIN_ARGS=()
  COMPILE_ARGS=(trainer.epochs=3)
  DEVICE_ARGS=(trainer.device=cuda)   # fail, never fall back to the CPU
  read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:---quick --models cnn2,resnet --no-compile}"
  BENCH_CAP=120; COMPILE_CAP=120; FAST_CAP=150; REPORT_CAP=60; CL_OFF_MIN=${GPU_CHECK_CL_OFF_MIN_S:-60}
fi
BENCH_CAP=${GPU_CHECK_BENCH_S:-$BENCH_CAP}
COMPILE_CAP=${GPU_CHECK_COMPILE_S:-$COMPILE_CAP}
FAST_CAP=${GPU_CHECK_FAST_S:-$FAST_CAP}
REPORT_CAP=${GPU_CHECK_REPORT_S:-$REPORT_CAP}
FINAL_RESERVE=10   # the summary at the end
[ "$SYNTHETIC" = 1 ] && BENCH_ARGS+=(--synthetic)
for o in "${EXTRA[@]}"; do [ "$o" = data=synthetic ] || BENCH_ARGS+=(--override "$o"); done

# --------------------------------------------------------------------------- data
if [ "$SYNTHETIC" = 0 ] && [ -z "${FER2013_ROOT:-}" ]; then
  for c in shared/fer2013 ../shared/fer2013; do
    if [ -d "$c/train" ]; then FER2013_ROOT=$(cd "$c" && pwd); break; fi
  done
fi
export FER2013_ROOT=${FER2013_ROOT:-}
export GPU_CHECK_SYNTHETIC=$SYNTHETIC

URI="sqlite:///$WORK/mlflow.db"
EXPERIMENT=gpu_check
export GPU_CHECK_URI=$URI GPU_CHECK_EXPERIMENT=$EXPERIMENT
COMMON=(trainer.progress=false "mlflow.tracking_uri=$URI" "mlflow.experiment=$EXPERIMENT"
        "trainer.checkpoint_dir=$WORK/checkpoints" "${DEVICE_ARGS[@]}" "${TRAIN_ARGS[@]}"
        "${EXTRA[@]}")

# --------------------------------------------------------------------------- helpers
now() { echo $((SECONDS - START)); }
left() { echo $((BUDGET - (SECONDS - START))); }
say() { echo "== [$(now) s] $*"; }
record() {  # name status seconds limit rc note
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${6:-}" >> "$PHASES"
}
CHILD= CURRENT= PHASE_T0=0
KILL_GRACE=10
# `timeout` runs its command in a process group of its own (its pid): when the command's main
# process ends (or is killed), what is left of that group (joblib's worker processes, which go
# on with the jobs already handed to them) is ended too: SIGTERM, then SIGKILL after 10 s.
reap() {
  local pg=$1 i
  kill -0 -- "-$pg" 2>/dev/null || return 0
  say "ending the phase's leftover processes (process group $pg)"
  kill -TERM -- "-$pg" 2>/dev/null
  for i in 1 2 3 4 5 6 7 8 9 10; do
    sleep 1
    kill -0 -- "-$pg" 2>/dev/null || return 0
  done
  kill -KILL -- "-$pg" 2>/dev/null
  return 0
}
# run_phase NAME CAP RESERVE MIN CMD...: run CMD under `timeout`, for at most CAP seconds and
# leaving RESERVE seconds of the budget to the phases after it; skipped when that leaves less
# than MIN seconds. Output to $OUT/logs/NAME.log, its tail on the console when it fails.
run_phase() {
  local name=$1 cap=$2 reserve=$3 min=$4 limit t0 rc status note=
  shift 4
  limit=$(( $(left) - reserve ))
  [ "$limit" -gt "$cap" ] && limit=$cap
  [ "$min" -gt $((KILL_GRACE + 5)) ] || min=$((KILL_GRACE + 5))
  if [ "$limit" -lt "$min" ]; then
    say "$name: skipped, ${limit} s of the budget left for it (needs ${min} s)"
    record "$name" skipped 0 "$limit" "" "budget: ${limit} s left for it, needs ${min} s"
    return 1
  fi
  say "$name (limit ${limit} s): $*"
  t0=$SECONDS CURRENT=$name PHASE_T0=$SECONDS
  # SIGTERM at limit - KILL_GRACE (fer_sweep then marks its runs KILLED), SIGKILL at the limit.
  timeout -k "$KILL_GRACE" $((limit - KILL_GRACE)) "$@" > "$OUT/logs/$name.log" 2>&1 &
  CHILD=$!
  wait "$CHILD"; rc=$?
  reap "$CHILD"
  CHILD=
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; note="hit its ${limit} s limit" ;;
    *) status=failed; note="exit status $rc" ;;
  esac
  record "$name" "$status" $((SECONDS - t0)) "$limit" "$rc" "$note"
  say "$name: $status after $((SECONDS - t0)) s${note:+ ($note)}"
  if [ "$status" != ok ]; then tail -n 25 "$OUT/logs/$name.log" | sed 's/^/    /'; fi
  [ "$status" = ok ]
}
not_run() {  # not_run GATE PHASE...: the phases that cannot run after the GATE phase failed
  local gate=$1 p
  shift
  for p in "$@"; do record "$p" not_run 0 0 "" "not run: the $gate phase failed"; done
}

finish() {
  local rc=$? code
  trap - EXIT INT TERM
  if [ -n "$CHILD" ]; then   # interrupted during a phase: end it and its process group
    kill -TERM "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
    reap "$CHILD"
    record "$CURRENT" interrupted $((SECONDS - PHASE_T0)) 0 "" "the script was interrupted"
  fi
  cp "$WORK/mlflow.db" "$OUT/mlflow.db" 2>/dev/null
  if [ -d "$WORK/multirun" ]; then   # the Table 2 jobs' own logs
    (cd "$WORK/multirun" && find . -name '*.log' -exec cp --parents {} "$OUT/logs/" \;) 2>/dev/null
  fi
  say "summary -> $OUT/gpu_check.json, $OUT/gpu_check.md"
  GPU_CHECK_TOTAL_S=$(now) GPU_CHECK_BUDGET_S=$BUDGET GPU_CHECK_SCRIPT_RC=$rc \
    timeout -k 5 120 "$PY" "$REPO/scripts/gpu_check/summary.py"
  code=$?
  if [ ! -s "$OUT/gpu_check.json" ]; then   # Python itself is broken: a minimal summary
    {
      printf '{"ok": false, "error": "the summary script failed (exit %s)", "phases": [' "$code"
      awk -F'\t' 'BEGIN{s=""} {printf "%s{\"name\": \"%s\", \"status\": \"%s\", \"seconds\": %s}", s, $1, $2, $3; s=", "}' "$PHASES"
      printf ']}\n'
    } > "$OUT/gpu_check.json"
    { echo "# GPU check: FAILED (no summary: the summary script failed)"; echo;
      awk -F'\t' '{print "- " $1 ": " $2 " (" $3 " s) " $6}' "$PHASES"; } > "$OUT/gpu_check.md"
    code=1
  fi
  [ "$code" -le 2 ] || code=1
  if [ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
  echo "gpu_check: $([ "$code" = 0 ] && echo OK || echo "FAILED (exit $code)") in $(now) s; see $OUT/gpu_check.md"
  exit "$code"
}
trap finish EXIT
trap 'echo "gpu_check: interrupted" >&2; exit 130' INT TERM

# --------------------------------------------------------------------------- phases
say "gpu_check: budget ${BUDGET} s, smoke=${SMOKE}, OUT=$OUT, work folder $WORK"
say "FER2013_ROOT=${FER2013_ROOT:-} FER_SWEEP_CACHE=$FER_SWEEP_CACHE overrides: ${EXTRA[*]:-none}"

if ! run_phase env 150 0 10 "$PY" "$REPO/scripts/gpu_check/env_check.py"; then
  not_run env prepare bench table2 compile fast report bench_channels_last_off
  exit 2
fi
sed 's/^/    /' "$OUT/logs/env.log"

if ! run_phase prepare 120 0 10 "$PY" "$REPO/scripts/gpu_check/prepare.py" "${TRAIN_ARGS[@]}" "${EXTRA[@]}"; then
  not_run prepare bench table2 compile fast report bench_channels_last_off
  exit 1
fi
sed 's/^/    /' "$OUT/logs/prepare.log"

# (a) the benchmark
run_phase bench "$BENCH_CAP" 0 20 \
  "$PY" -m fer_sweep.bench "${BENCH_ARGS[@]}" --json "$OUT/bench.json"
[ -s "$OUT/bench.json" ] && { grep -A12 '^| model' "$OUT/logs/bench.log" | head -30 | sed 's/^/    /'; }

# (b) Table 2: one multirun, each row once, two jobs at a time on the GPU.
cd "$WORK" || exit 1
run_phase table2 100000 $(((COMPILE_CAP + FAST_CAP + REPORT_CAP) * 3 / 4 + FINAL_RESERVE)) 60 \
  "$PY" -m fer_sweep experiment=table2 trainer.stop_at_min_lr=true \
  hydra/launcher=joblib "hydra.launcher.n_jobs=${GPU_CHECK_TABLE2_JOBS:-2}" \
  "hydra.sweep.dir=$WORK/multirun/table2" "${COMMON[@]}"

# (c) torch.compile on the device: one small model, a few epochs.
run_phase compile "$COMPILE_CAP" $(((FAST_CAP + REPORT_CAP) / 2 + FINAL_RESERVE)) 30 \
  "$PY" -m fer_sweep model=cnn2 transforms=norm trainer.compile=true \
  mlflow.run_name=compile-cnn2-norm "hydra.run.dir=$WORK/outputs/compile" "${COMMON[@]}" \
  "${COMPILE_ARGS[@]}"

# (d) the 30-minute CPU recipe on the device, within the phase's cap: its budget planner decides.
# The budget counts from the job's start and plans the final evaluation and exit itself
# (fer_sweep/core/budget.py); of the cap, KILL_GRACE goes before run_phase's SIGTERM and 20 s to
# the process's start-up (a short GPU_CHECK_FAST_S keeps half of itself for training).
FAST_BUDGET_MIN=$(awk "BEGIN { b = $FAST_CAP - $KILL_GRACE - 20; if (b < $FAST_CAP / 2) b = $FAST_CAP / 2; print b / 60 }")
run_phase fast "$FAST_CAP" $((REPORT_CAP / 2 + FINAL_RESERVE)) 30 \
  "$PY" -m fer_sweep experiment=fast "trainer.time_budget_min=$FAST_BUDGET_MIN" \
  "hydra.run.dir=$WORK/outputs/fast" "${COMMON[@]}"

# (e) Table 2 rebuilt from the store.
run_phase report "$REPORT_CAP" "$FINAL_RESERVE" 15 \
  "$PY" -m fer_sweep.report --tracking-uri "$URI" --experiment "$EXPERIMENT" \
  --out "$OUT/report" --no-log
cd "$REPO" || exit 1

# (a, continued) channels_last off, where the budget allows.
run_phase bench_channels_last_off "$BENCH_CAP" "$FINAL_RESERVE" "$CL_OFF_MIN" \
  "$PY" -m fer_sweep.bench "${BENCH_ARGS[@]}" --override trainer.channels_last=false \
  --json "$OUT/bench_channels_last_off.json"

exit 0   # the trap writes the summary and sets the exit status
