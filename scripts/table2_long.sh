#!/usr/bin/env bash
# Table 2's ResNet rows (5-7) on this CPU, as ONE multirun continued after every interruption
# (docs/results.md). Run it again whenever it is not running: the first call starts the sweep,
# every later one adds sweep.resume=latest, which skips finished rows and continues an
# interrupted one from its checkpoint in the same MLflow run. Low priority (nice), in the
# background; the store, checkpoints, sweep folders and logs stay in runs/table2/ (git-ignored).
#
#   FER2013_ROOT=/path/to/fer2013 bash scripts/table2_long.sh        # start or continue
#   kill -TERM "$(cat runs/table2/pid)"                                 # stop cleanly (exit 143)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=runs/table2
mkdir -p "$dir"
if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    echo "already running (pid $(cat "$dir/pid")); log: $(ls -t "$dir"/log-*.txt | head -1)"
    exit 0
fi
args=(
    experiment=table2 "table2=${ROWS:-row5,row6,row7}"
    # where things go, and how it runs: none of these changes what a run computes
    "mlflow.tracking_uri=sqlite:///$PWD/$dir/mlflow.db" mlflow.experiment=table2
    "trainer.checkpoint_dir=$PWD/$dir/checkpoints" trainer.progress=false
    "trainer.threads=${THREADS:-2}"
    "hydra.sweep.dir=$dir/multirun/\${now:%Y-%m-%d_%H-%M-%S}"
)
# The cores measurement (scripts/cores_choice.py, docs/performance.md) chose eager.
mode=new
if [ -f "$dir/mlflow.db" ]; then mode=resume; args+=(sweep.resume=latest); fi
log="$dir/log-$(date -u +%Y%m%d-%H%M%S).txt"
nohup nice -n 19 "${PYTHON:-python}" -m fer_sweep "${args[@]}" >"$log" 2>&1 &
echo $! >"$dir/pid"
echo "started pid $! ($mode); log: $log"
