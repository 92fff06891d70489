#!/usr/bin/env bash
# Table 2's ResNet rows on this CPU (docs/results.md), in two stages, each ONE multirun that is
# continued after every interruption with sweep.resume=<its parent run>:
#   rows   table2=row5,row6,row7           the study's three ResNets, seed 0
#   seeds  table2=row6 trainer.seed=1,2    its headline (row 6) twice more, for a mean and interval
# The seeds stage starts once the rows' multirun has ended with every run finished
# (runs/table2/rows.done); SEEDS= (empty) leaves it out; ROWS=row6,row7 trains only those
# rows (kept in runs/table2/rows.list for every later call). Run this again whenever it is not
# running: a stage whose sweep folder exists is resumed (finished runs skipped, an interrupted one
# continued from its checkpoint in the same MLflow run), otherwise started. Low priority (nice),
# in the background; store, checkpoints, sweep folders and logs stay in runs/table2/ (git-ignored).
# Keep THREADS (default 2) the same within a stage: sweep.resume checks the sweep's overrides.
#
#   FER2013_ROOT=/path/to/fer2013 bash scripts/table2_long.sh        # start or continue
#   kill -TERM "$(cat runs/table2/pid)"                                 # stop cleanly (exit 143)
#   tail -f "$(ls -t runs/table2/log-*.txt | head -1)"                  # each epoch, as it ends
set -euo pipefail
{ # read whole before it runs: an edit to this file cannot reach a runner of many hours
cd "$(dirname "$0")/.."
dir=runs/table2
mkdir -p "$dir"
py=${PYTHON:-python}

# ROWS= picks the rows (e.g. row6,row7 where row 5's bundle is committed already); the store
# keeps the choice it began with, so a later call without ROWS continues the same sweep
if [ -f "$dir/rows.list" ]; then
    began=$(cat "$dir/rows.list")
    if [ -n "${ROWS:-}" ] && [ "$ROWS" != "$began" ]; then
        echo "ROWS=$ROWS, but this store's rows stage began with $began (runs/table2/rows.list):" \
            "leave ROWS out to continue it, or move runs/table2 away to start another" >&2
        exit 2
    fi
    ROWS=$began
fi
export ROWS=${ROWS:-row5,row6,row7}
[ -f "$dir/rows.list" ] || echo "$ROWS" >"$dir/rows.list"

if [ "${1:-}" != --run ]; then
    # the runner holds this lock, and its training inherits it: even a runner killed outright
    # leaves the lock held until its training has ended too
    if ! flock -n "$dir/lock" true; then
        echo "already running (pid $(cat "$dir/pid")); log: $(ls -t "$dir"/log-*.txt | head -1)"
        exit 0
    fi
    log="$dir/log-$(date -u +%Y%m%d-%H%M%S).txt"
    # a session of its own: a signal to the caller's process group does not reach the training
    # twice (once directly, once forwarded), which would cut an epoch short
    setsid nohup nice -n 19 bash "$0" --run >"$log" 2>&1 &
    echo $! >"$dir/pid"
    echo "started pid $!; log: $log"
    exit 0
fi
exec 9>"$dir/lock"
flock -n 9 || { echo "another runner holds $dir/lock"; exit 0; }
echo $$ >"$dir/pid" # the runner that holds the lock (a second quick call's runner exits above)

# where things go, and how it runs: none of these changes what a run computes
# (the cores measurement, scripts/cores_choice.py and docs/performance.md, chose eager)
common=(
    "mlflow.tracking_uri=sqlite:///$PWD/$dir/mlflow.db" mlflow.experiment=table2
    "trainer.checkpoint_dir=$PWD/$dir/checkpoints" trainer.progress=false
    "trainer.threads=${THREADS:-2}"
)
stop() {  # SIGTERM: the training marks its run and checkpoints (exit 143); no further stage
    local jobs
    jobs=$(jobs -p)
    if [ -n "$jobs" ]; then kill -TERM $jobs 2>/dev/null || true; fi
    wait || true
    exit 143
}
trap stop TERM

parent_of() {  # the MLflow parent run of a stage's sweep folders, if it has begun
    local f
    f=$(ls -t "$1"/*/mlflow_parent.json 2>/dev/null | head -1 || true)
    if [ -n "$f" ]; then sed -n 's/.*"parent_run_id": *"\([0-9a-f]*\)".*/\1/p' "$f"; fi
}

stage() {  # NAME SWEEP_ROOT OVERRIDE...: run (or continue) one stage's multirun to its end
    local name=$1 root=$2
    shift 2
    # done only for these overrides (ROWS=, SEEDS= may change what a stage is)
    if [ "$(cat "$dir/$name.done" 2>/dev/null)" = "$*" ]; then return 0; fi
    local args=("$@" "${common[@]}" "hydra.sweep.dir=$root/\${now:%Y-%m-%d_%H-%M-%S}")
    local parent rc=0
    parent=$(parent_of "$root")
    if [ -n "$parent" ]; then args+=("sweep.resume=$parent"); fi
    echo "$(date -u +%FT%TZ) stage $name: $py -m fer_sweep ${args[*]}"
    "$py" -m fer_sweep "${args[@]}" &
    wait $! || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "$(date -u +%FT%TZ) stage $name ended with exit $rc; run this script again"
        exit "$rc"
    fi
    echo "$*" >"$dir/$name.done"
}

stage rows "$dir/multirun" experiment=table2 "table2=$ROWS"
if [ -n "${SEEDS-1,2}" ]; then
    stage seeds "$dir/seeds" experiment=table2 table2=row6 "trainer.seed=${SEEDS-1,2}"
fi
echo "$(date -u +%FT%TZ) all stages done"
exit
}
