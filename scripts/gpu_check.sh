#!/usr/bin/env bash
# The GPU check, on a bare GPU machine with PyTorch (CUDA) installed, from a source checkout:
#
#   FER2013_ROOT=/path/to/fer2013 OUT=/some/folder bash scripts/gpu_check.sh
#
# 1. pip install -e . without touching what is already installed (torch above all);
# 2. python -m fer_sweep.bench --json $OUT/bench_gpu.json (ceiling / fer_sweep / naive, bf16,
#    channels_last, data resident on the GPU);
# 3. a full `python -m fer_sweep model=resnet transforms=aug trainer.epochs=100` run and
# 4. the whole Table 2 sweep (experiment=table2: seven jobs, joblib launcher), 3 and 4 side by
#    side on the one GPU, on the real data, then Table 2 rebuilt from MLflow (fer_sweep.report).
# Budget: 8 minutes in all (GPU_CHECK_BUDGET_S). Prints each phase's time; exits non-zero when
# anything fails, a run did not finish, an accuracy is implausible, or the budget is exceeded.
# $OUT gets bench_gpu.json/.md, the logs, gpu_check.json (one line per run) and report/.
# GPU_CHECK_SMOKE=1 tries the script itself on any machine (CPU too) where fer_sweep is already
# installed: no pip install, one epoch on 20 images per class, a tiny benchmark, no accuracy floor.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-480}
PY=${PY:-python}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)  # Hydra folders, the MLflow store and artifacts, checkpoints: big, not $OUT

SMOKE=${GPU_CHECK_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  RESNET_EPOCHS=(trainer.epochs=1); SMOKE_ARGS=(trainer.epochs=1 data.limit_per_class=20)
  BENCH_ARGS=(--quick --steps 2 --repeats 1 --warmup 1); MIN_ACC=0
else
  RESNET_EPOCHS=(trainer.epochs=100); SMOKE_ARGS=(); BENCH_ARGS=(); MIN_ACC=0.40
fi

phase() { echo; echo "== [$((SECONDS - START)) s] $*"; }
die() { echo "gpu_check: error: $*" >&2; exit 1; }
left() { echo $((BUDGET - (SECONDS - START))); }

# --------------------------------------------------------------------------- data
if [ -z "${FER2013_ROOT:-}" ]; then
  for c in shared/fer2013 ../shared/fer2013; do
    if [ -d "$c/train" ]; then FER2013_ROOT=$(cd "$c" && pwd); break; fi
  done
fi
if [ -z "${FER2013_ROOT:-}" ] || [ ! -d "$FER2013_ROOT/train" ] || [ ! -d "$FER2013_ROOT/test" ]; then
  die "FER2013_ROOT='${FER2013_ROOT:-}' must point at FER2013's image folders (train/ and test/);
  e.g. FER2013_ROOT=/data/fer2013 bash scripts/gpu_check.sh"
fi
export FER2013_ROOT
export FER_SWEEP_CACHE=${FER_SWEEP_CACHE:-$WORK/cache}
export MPLBACKEND=Agg
echo "FER2013_ROOT=$FER2013_ROOT  OUT=$OUT  WORK=$WORK  budget ${BUDGET} s"

# --------------------------------------------------------------------------- install
phase "install: pip install -e . (installed packages, torch above all, left as they are)"
[ "$SMOKE" = 1 ] || $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || die "PyTorch sees no CUDA GPU (torch $($PY -c 'import torch; print(torch.__version__)' 2>&1))"
if [ "$SMOKE" = 1 ]; then
  echo "smoke: the existing install is used as it is"
else
  $PY -m pip install -q --no-deps --no-build-isolation -e . \
    || die "pip install --no-deps -e . failed (setuptools >= 64 is needed to build)"
fi
# The declared dependencies that are missing or unsatisfied; torch is pinned to the installed one
# so that pip never swaps the CUDA build for another.
MISSING=$($PY - <<'EOF'
from importlib.metadata import PackageNotFoundError, requires, version
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
for line in requires("fer_sweep") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra (dev)
    try:
        ok = req.specifier.contains(version(req.name), prereleases=True)
    except PackageNotFoundError:
        ok = False
    if not ok:
        print(str(req))
EOF
)
if [ -n "$MISSING" ]; then
  echo "installing the missing dependencies: $(echo $MISSING)"
  $PY -c 'import torch; print("torch==" + torch.__version__)' > "$WORK/constraints.txt"
  # shellcheck disable=SC2086
  $PY -m pip install -q -c "$WORK/constraints.txt" $MISSING \
    || die "could not install $(echo $MISSING) (offline? install them, or give pip a wheel folder
  with PIP_FIND_LINKS=/path/to/wheels PIP_NO_INDEX=1)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch, torchvision; print("torch", torch.__version__, "cuda", torch.version.cuda,
"torchvision", torchvision.__version__, "|", torch.cuda.get_device_name(0)
if torch.cuda.is_available() else "no GPU")'

# --------------------------------------------------------------------------- data cache
phase "decode FER2013 once into the cache that every job reads"
$PY -c 'import os; from fer_sweep.data import load_source
tr, te, info = load_source(os.environ["FER2013_ROOT"])
print(len(tr), "train", len(te), "test images in", info["load_seconds"], "s")'

# --------------------------------------------------------------------------- benchmark
phase "benchmark: python -m fer_sweep.bench --json \$OUT/bench_gpu.json"
timeout 240 $PY -m fer_sweep.bench "${BENCH_ARGS[@]}" --json "$OUT/bench_gpu.json" 2> "$OUT/bench_gpu.log" \
  | tee "$OUT/bench_gpu.md" || { tail -20 "$OUT/bench_gpu.log"; die "the benchmark failed"; }

# --------------------------------------------------------------------------- training
URI="sqlite:///$WORK/mlflow.db"
COMMON=(trainer.progress=false "mlflow.tracking_uri=$URI" mlflow.experiment=gpu_check
        "trainer.checkpoint_dir=$WORK/checkpoints" "${SMOKE_ARGS[@]}")
LIMIT=$(left)
[ "$LIMIT" -gt 60 ] || die "no time left for training (budget ${BUDGET} s)"
phase "training, ${LIMIT} s left: resnet aug 100 epochs + Table 2 (7 jobs), side by side"
cd "$WORK"
# Eight processes share 16-ish cores; their work is on the GPU, so few CPU threads each.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
timeout "$LIMIT" $PY -m fer_sweep model=resnet transforms=aug "${RESNET_EPOCHS[@]}" "${COMMON[@]}" \
  hydra.run.dir="$WORK/outputs/resnet" > "$OUT/resnet.log" 2>&1 &
RESNET=$!
timeout "$LIMIT" $PY -m fer_sweep experiment=table2 hydra/launcher=joblib \
  hydra.launcher.n_jobs=7 "${COMMON[@]}" hydra.sweep.dir="$WORK/multirun/table2" \
  > "$OUT/table2.log" 2>&1 &
TABLE2=$!
RC=0
wait $RESNET || { RC=1; echo "resnet run failed:"; tail -20 "$OUT/resnet.log"; }
wait $TABLE2 || { RC=1; echo "Table 2 sweep failed:"; tail -30 "$OUT"/table2*.log; }
cd "$REPO"
phase "training done"

# --------------------------------------------------------------------------- results
$PY - "$URI" "$OUT/gpu_check.json" "$MIN_ACC" <<'EOF' || RC=1
import json, sys
from mlflow.tracking import MlflowClient

uri, out, min_acc = sys.argv[1], sys.argv[2], float(sys.argv[3])
client = MlflowClient(uri)
exp = client.get_experiment_by_name("gpu_check")
runs = client.search_runs([exp.experiment_id], "tags.`fer_sweep.role` = 'job'") if exp else []
study = {("cnn2", 50): 52.6, ("cnn2_fc1000", 500): 51.3, ("cnn2_fc3", 500): 51.4,
         ("cnn3", 100): 50.4, ("resnet_small", 100): 60.4, ("resnet", 100): 65.9,
         ("resnet_dropout", 100): 63.3}
rows, bad = [], []
for r in sorted(runs, key=lambda r: r.info.start_time):
    p, m = r.data.params, r.data.metrics
    model, epochs = r.data.tags.get("model", "?"), int(p.get("trainer.epochs", 0))
    row = {"run": r.info.run_id, "name": r.info.run_name, "model": model,
           "transforms": r.data.tags.get("transforms"), "epochs": epochs,
           "status": r.info.status, "test_acc": m.get("test_acc"),
           "study": study.get((model, epochs)), "train_seconds": m.get("train_seconds")}
    rows.append(row)
    if r.info.status != "FINISHED" or (row["test_acc"] or 0) < min_acc:
        bad.append(row)
print(f"{'run':34s} {'epochs':>6s} {'status':9s} {'test acc':>8s} {'study':>6s} {'train s':>8s}")
for row in rows:
    acc = f"{100 * row['test_acc']:.1f}" if row["test_acc"] is not None else "-"
    ts = f"{row['train_seconds']:.0f}" if row["train_seconds"] is not None else "-"
    print(f"{row['name'] or row['run']:34s} {row['epochs']:6d} {row['status']:9s} {acc:>8s} "
          f"{row['study'] or '':>6} {ts:>8s}")
json.dump({"runs": rows}, open(out, "w"), indent=2)
if len(rows) != 8:
    sys.exit(f"gpu_check: error: expected 8 finished runs (resnet + 7 Table 2 rows), got {len(rows)}")
if bad:
    sys.exit(f"gpu_check: error: runs not FINISHED or below {min_acc:.0%} test accuracy: "
             f"{[b['name'] for b in bad]}")
EOF
if [ $RC -eq 0 ]; then
  phase "Table 2 rebuilt from MLflow (python -m fer_sweep.report)"
  $PY -m fer_sweep.report --tracking-uri "$URI" --experiment gpu_check --out "$OUT/report" \
    --no-log > "$OUT/report.log" 2>&1 || { RC=1; tail -20 "$OUT/report.log"; }
  cat "$OUT/report/table2.md" 2>/dev/null || true
fi

TOTAL=$((SECONDS - START))
phase "total ${TOTAL} s (budget ${BUDGET} s)"
[ $RC -eq 0 ] || die "see the messages above and the logs in $OUT"
[ "$TOTAL" -le "$BUDGET" ] || { echo "gpu_check: error: over the ${BUDGET} s budget" >&2; exit 3; }
echo "gpu_check: OK"
