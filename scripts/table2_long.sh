#!/usr/bin/env bash
# Table 2's ResNet rows on this CPU (docs/results.md), in two stages, each ONE multirun that is
# continued after every interruption with sweep.resume=latest:
#   rows   table2=row5,row6,row7           the study's three ResNets, seed 0
#   seeds  table2=row6 trainer.seed=1,2    its headline (row 6) twice more, for a mean and interval
# The seeds stage starts once the rows' multirun has ended with every run finished
# (runs/table2/rows.done); SEEDS= (empty) leaves it out. Run this again whenever it is not
# running: a stage whose sweep folder exists is resumed (finished runs skipped, an interrupted one
# continued from its checkpoint in the same MLflow run), otherwise started. Low priority (nice),
# in the background; store, checkpoints, sweep folders and logs stay in runs/table2/ (git-ignored).
#
#   FER2013_ROOT=/path/to/fer2013 bash scripts/table2_long.sh        # start or continue
#   kill -TERM "$(cat runs/table2/pid)"                                 # stop cleanly (exit 143)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=runs/table2
mkdir -p "$dir"
py=${PYTHON:-python}

running() {  # a live process (an ended one may wait a while to be reaped: not running)
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $state != Z* ]]
}

if [ "${1:-}" != --run ]; then
    if [ -f "$dir/pid" ] && running "$(cat "$dir/pid")"; then
        echo "already running (pid $(cat "$dir/pid")); log: $(ls -t "$dir"/log-*.txt | head -1)"
        exit 0
    fi
    log="$dir/log-$(date -u +%Y%m%d-%H%M%S).txt"
    nohup nice -n 19 bash "$0" --run >"$log" 2>&1 &
    echo $! >"$dir/pid"
    echo "started pid $!; log: $log"
    exit 0
fi

# where things go, and how it runs: none of these changes what a run computes
# (the cores measurement, scripts/cores_choice.py and docs/performance.md, chose eager)
common=(
    "mlflow.tracking_uri=sqlite:///$PWD/$dir/mlflow.db" mlflow.experiment=table2
    "trainer.checkpoint_dir=$PWD/$dir/checkpoints" trainer.progress=false
    "trainer.threads=${THREADS:-2}"
)
child=
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"; exit 143' TERM INT

stage() {  # NAME SWEEP_ROOT OVERRIDE...: run (or continue) one stage's multirun to its end
    local name=$1 root=$2
    shift 2
    if [ -f "$dir/$name.done" ]; then return 0; fi
    local args=("$@" "${common[@]}" "hydra.sweep.dir=$root/\${now:%Y-%m-%d_%H-%M-%S}")
    # only the stage in progress can be the experiment's latest sweep: rows ends before seeds
    if compgen -G "$root/*/mlflow_parent.json" >/dev/null; then args+=(sweep.resume=latest); fi
    echo "$(date -u +%FT%TZ) stage $name: $py -m fer_sweep ${args[*]}"
    "$py" -m fer_sweep "${args[@]}" &
    child=$!
    local rc=0
    wait "$child" || rc=$?
    child=
    if [ "$rc" -ne 0 ]; then
        echo "$(date -u +%FT%TZ) stage $name ended with exit $rc; run this script again"
        exit "$rc"
    fi
    touch "$dir/$name.done"
}

stage rows "$dir/multirun" experiment=table2 "table2=${ROWS:-row5,row6,row7}"
if [ -n "${SEEDS-1,2}" ]; then
    stage seeds "$dir/seeds" experiment=table2 table2=row6 "trainer.seed=${SEEDS-1,2}"
fi
echo "$(date -u +%FT%TZ) all stages done"
