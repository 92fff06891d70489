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
#            time budget set to the phase's cap less 20 s (trainer.time_budget_min): the epochs
#            planned on the device (at most 60), its test accuracy and seconds per epoch
#   report   python -m fer_sweep.report --out $OUT/report --no-log (Table 2 from MLflow)
#   bench_channels_last_off   the benchmark again with trainer.channels_last=false, only when
#            at least GPU_CHECK_CL_OFF_MIN_S (60) seconds of the budget are left (else
#            "skipped", which is not a failure)
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
  FAST_MARGIN=60   # start-up, speed probe and test pass on a CPU that CI may be loading
else
  TRAIN_ARGS=()
  COMPILE_ARGS=(trainer.epochs=3)
  DEVICE_ARGS=(trainer.device=cuda)   # fail, never fall back to the CPU
  read -r -a BENCH_ARGS <<< "${GPU_CHECK_BENCH_ARGS:---quick --models cnn2,resnet --no-compile}"
  BENCH_CAP=120; COMPILE_CAP=120; FAST_CAP=150; REPORT_CAP=60; CL_OFF_MIN=${GPU_CHECK_CL_OFF_MIN_S:-60}
  FAST_MARGIN=20
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
    timeout -k 5 120 "$PY" "$WORK/summary.py"
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

# --------------------------------------------------------------------------- embedded Python
cat > "$WORK/env_check.py" <<'EOF'
"""The environment, checked before anything runs: fer_sweep's declared dependencies installed
(at the declared versions) and importable, CUDA working (not in smoke mode), the data there."""
import json, os, platform, re, subprocess, sys, time
from importlib import import_module, metadata
from pathlib import Path

repo, out = Path(os.environ["GPU_CHECK_REPO"]), Path(os.environ["GPU_CHECK_OUT"])
smoke = os.environ["GPU_CHECK_SMOKE"] == "1"
info = {"python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(), "smoke": smoke}
problems, warnings = [], []
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
import tomllib

# fer_sweep itself: PYTHONPATH points at this checkout; register it with pip too (offline,
# no dependencies) so that `python -m fer_sweep` works after the check as well.
try:
    info["fer_sweep_installed"] = metadata.version("fer_sweep")
except metadata.PackageNotFoundError:
    if smoke:
        info["fer_sweep_installed"] = None
    else:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--no-build-isolation", "--no-index", "-e", str(repo)],
                           capture_output=True, text=True)
        info["pip_install_e"] = {"rc": r.returncode, "seconds": round(time.time() - t0, 1),
                                 "stderr": r.stderr[-1500:]}
        if r.returncode:
            warnings.append("pip install --no-deps --no-build-isolation -e . failed (setuptools "
                            ">= 64 missing?); fer_sweep runs from the checkout via PYTHONPATH")

declared = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
ENV = {"extra": ""}


def top_modules(dist):
    """The importable top-level modules of an installed distribution (hydra_plugins.X for
    Hydra's namespace plugins)."""
    mods = set()
    top = (dist.read_text("top_level.txt") or "").split()
    for f in dist.files or []:
        parts = f.parts
        if not parts or parts[0].endswith((".dist-info", ".egg-info", ".data")) \
                or parts[0] in ("..", "__pycache__"):
            continue
        if parts[0] == "hydra_plugins" and len(parts) > 2:
            mods.add(f"hydra_plugins.{parts[1]}")
        elif parts[0] != "hydra_plugins" and (len(parts) > 1 or parts[0].endswith(".py")):
            name = parts[0][:-3] if parts[0].endswith(".py") else parts[0]
            if name.isidentifier() and not name.startswith("_"):
                mods.add(name)
    if not mods:
        mods = {t for t in top if t.isidentifier()}
    return sorted(mods) or [dist.metadata["Name"].replace("-", "_").lower()]


checked, missing, bad_version, not_importable = {}, [], [], []
for line in declared:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate(ENV):
        continue
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        missing.append(str(req))
        continue
    ver = dist.version
    entry = {"version": ver}
    if req.specifier and not req.specifier.contains(ver, prereleases=True):
        bad_version.append(f"{req} (installed: {ver})")
    mods = top_modules(dist)
    if req.name == "pyyaml":
        mods = ["yaml"]
    entry["modules"] = mods
    for mod in mods:
        try:
            import_module(mod)
        except Exception as err:  # noqa: BLE001 - any import failure is the finding
            not_importable.append(f"{req.name} (import {mod}: {type(err).__name__}: {err})")
    # One level down: what the dependency itself needs (pip would have installed it).
    for sub in dist.requires or []:
        sreq = Requirement(sub)
        if sreq.marker is not None and not sreq.marker.evaluate(ENV):
            continue
        try:
            metadata.distribution(sreq.name)
        except metadata.PackageNotFoundError:
            warnings.append(f"{sreq} (needed by {req.name}) is not installed")
    checked[req.name] = entry
info["dependencies"] = checked
# fer_sweep's own modules: whatever else they import at module level.
for mod in ("fer_sweep.sweep.job", "fer_sweep.core.train", "fer_sweep.tools.bench.cli", "fer_sweep.tools.report.cli",
            "fer_sweep.sweep.tracking", "hydra_plugins.hydra_joblib_launcher.joblib_launcher",
            "hydra_plugins.hydra_submitit_launcher.submitit_launcher"):
    try:
        import_module(mod)
    except Exception as err:  # noqa: BLE001
        not_importable.append(f"{mod} ({type(err).__name__}: {err})")
if missing:
    problems.append("missing (not installed): " + ", ".join(missing))
if bad_version:
    problems.append("installed at a version fer_sweep does not declare: " + ", ".join(bad_version))
if not_importable:
    problems.append("installed but not importable: " + "; ".join(not_importable))

# torch, CUDA, the GPU.
try:
    import torch

    cuda = torch.cuda.is_available()
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                cuda_available=cuda, gpu_count=torch.cuda.device_count() if cuda else 0,
                cudnn_benchmark_default=torch.backends.cudnn.benchmark,
                float32_matmul_precision=torch.get_float32_matmul_precision(),
                cpu_count=os.cpu_count(),
                cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_name=torch.cuda.get_device_name(0),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_capability=f"{p.major}.{p.minor}",
                    bf16_supported=torch.cuda.is_bf16_supported())
        try:
            a = torch.randn(256, 256, device="cuda")
            info["cuda_matmul_ok"] = bool(torch.isfinite((a @ a).sum()).item())
        except Exception as err:  # noqa: BLE001
            info["cuda_matmul_ok"] = False
            problems.append(f"a matmul on the GPU failed: {type(err).__name__}: {err}")
    elif not smoke:
        problems.append(f"PyTorch sees no CUDA GPU (torch {torch.__version__}, built for CUDA "
                        f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
except Exception as err:  # noqa: BLE001
    problems.append(f"import torch failed: {type(err).__name__}: {err}")
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:300]
    m = re.search(r"CUDA Version: ([\d.]+)",
                  subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                                 timeout=20).stdout)
    info["driver_cuda"] = m.group(1) if m else None
except (OSError, subprocess.SubprocessError):
    info["nvidia_smi"] = None

# The data.
if os.environ.get("GPU_CHECK_SYNTHETIC") == "1":
    info["data"] = "synthetic (data=synthetic)"
else:
    root = os.environ.get("FER2013_ROOT", "")
    info["data"] = root
    if not root or not (Path(root, "train").is_dir() and Path(root, "test").is_dir()):
        problems.append(f"FER2013_ROOT={root!r} must point at FER2013's image folders (train/ "
                        "and test/), e.g. FER2013_ROOT=/data/fer2013 bash scripts/gpu_check.sh "
                        "(or GPU_CHECK_OVERRIDES=data=synthetic to try the script)")

info["problems"], info["warnings"] = problems, warnings
(out / "env.json").write_text(json.dumps(info, indent=2))
for key in ("python", "torch", "torch_cuda", "cudnn", "driver_cuda", "gpu_name", "gpu_memory_gib",
            "gpu_capability", "bf16_supported", "nvidia_smi", "data"):
    print(f"{key:16s} {info.get(key)}")
for w in warnings:
    print(f"warning: {w}")
if problems:
    print("\ngpu_check: the environment is not ready; nothing was installed. Fix this first:",
          file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    if missing or bad_version:
        print("  (offline: pip install --no-index --find-links /path/to/wheels <package>)",
              file=sys.stderr)
    sys.exit(1)
print("environment ok")
EOF

cat > "$WORK/prepare.py" <<'EOF'
"""Create the MLflow store and experiment in ONE process, before any parallel job, and decode
the data into the cache every job reads."""
import os, sys, time

from mlflow.tracking import MlflowClient

uri, name, work = os.environ["GPU_CHECK_URI"], os.environ["GPU_CHECK_EXPERIMENT"], \
    os.environ["GPU_CHECK_WORK"]
t0 = time.time()
client = MlflowClient(uri)
client.search_experiments()  # creates the sqlite schema
if client.get_experiment_by_name(name) is None:
    client.create_experiment(name, artifact_location=os.path.join(work, "artifacts"))
print(f"MLflow store {uri}, experiment {name!r}: {time.time() - t0:.1f} s")

from fer_sweep.sweep.compose import compose_config  # noqa: E402
from fer_sweep.core.data import load_dataset  # noqa: E402

t0 = time.time()
conf = compose_config(sys.argv[1:])
data = load_dataset(conf.data)
print(f"data {conf.data.name}: train {len(data.train)} val {len(data.val)} test {len(data.test)}"
      f" ({'cache hit' if data.info.get('cache_hit') else 'decoded'}) in {time.time() - t0:.1f} s"
      f" -> {conf.data.cache_dir}")
EOF

cat > "$WORK/summary.py" <<'EOF'
"""$OUT/gpu_check.json and .md from the phase records, env.json, the benchmark JSONs and the
runs in the MLflow store; exit 0 (all good), 1 (a failure) or 2 (the environment stopped it)."""
import json, os, statistics, sys
from pathlib import Path

out, work = Path(os.environ["GPU_CHECK_OUT"]), Path(os.environ["GPU_CHECK_WORK"])
smoke = os.environ["GPU_CHECK_SMOKE"] == "1"
uri, exp_name = os.environ["GPU_CHECK_URI"], os.environ["GPU_CHECK_EXPERIMENT"]
budget, total = int(os.environ["GPU_CHECK_BUDGET_S"]), int(os.environ["GPU_CHECK_TOTAL_S"])
# The study's Table 2 (test accuracy, %); the floor is 5 points below.
STUDY = {"row1": ("cnn2", 52.6), "row2": ("cnn2_fc1000", 51.3), "row3": ("cnn2_fc3", 51.4),
         "row4": ("cnn3", 50.4), "row5": ("resnet_small", 60.4), "row6": ("resnet", 65.9),
         "row7": ("resnet_dropout", 63.3)}
MARGIN = 5.0
REQUIRED = ["env", "prepare", "bench", "table2", "compile", "fast", "report"]
OPTIONAL = ["bench_channels_last_off"]  # skipped for lack of budget is not a failure


def load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


phases = []
for line in (work / "phases.tsv").read_text().splitlines():
    f = (line.split("\t") + [""] * 6)[:6]
    phases.append({"name": f[0], "status": f[1], "seconds": int(f[2] or 0),
                   "limit_s": int(f[3]) if f[3].lstrip("-").isdigit() else None,
                   "rc": int(f[4]) if f[4].lstrip("-").isdigit() else None, "note": f[5],
                   "log": f"logs/{f[0]}.log"})
seen = {p["name"] for p in phases}
for name in REQUIRED + OPTIONAL:
    if name not in seen:  # the script stopped (interrupted) before it
        phases.append({"name": name, "status": "not_run", "seconds": 0, "limit_s": None,
                       "rc": None, "note": "the script ended before this phase",
                       "log": None})
env = load_json(out / "env.json") or {}

# ------------------------------------------------------------------ runs, from MLflow
runs, store_error = [], None
try:
    from mlflow.tracking import MlflowClient

    if (work / "mlflow.db").exists():
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(exp_name)
        found = client.search_runs([exp.experiment_id], "tags.`fer_sweep.role` = 'job'",
                                   max_results=1000) if exp else []
        for r in sorted(found, key=lambda r: r.info.start_time):
            t, m, p = r.data.tags, r.data.metrics, r.data.params
            name = r.info.run_name or ""
            bare = name.removeprefix("SYNTHETIC-")  # data=synthetic runs are named so
            row = t.get("fer_sweep.choice.table2") or \
                (bare.split("-")[0] if bare.startswith("row") else None)
            compiled = str(p.get("trainer.compile")).lower() == "true"
            secs = [x.value for x in sorted(client.get_metric_history(r.info.run_id,
                                                                       "epoch_seconds"),
                                            key=lambda x: x.step)]
            acc = m.get("test_acc")
            study = STUDY.get(row, (None, None))[1] if row else None
            floor = round(study - MARGIN, 1) if study is not None else None
            device = t.get("device", "")
            runs.append({
                "kind": "table2" if row else ("compile" if compiled
                                              else "fast" if bare == "fast" else "other"),
                "row": row, "name": name, "run_id": r.info.run_id, "model": t.get("model"),
                "transforms": t.get("transforms"), "status": r.info.status,
                "device": device, "device_name": t.get("device_name"),
                "precision": t.get("precision"),
                "compile": p.get("trainer.compile"), "channels_last": p.get("trainer.channels_last"),
                "stop_reason": t.get("fer_sweep.stop_reason"),
                "epochs_configured": int(p["trainer.epochs"]) if p.get("trainer.epochs") else None,
                "epochs_run": int(m["stopped_epoch"]) if "stopped_epoch" in m else len(secs),
                "best_epoch": int(m["best_epoch"]) if "best_epoch" in m else None,
                "epoch_seconds_mean": round(statistics.mean(secs), 3) if secs else None,
                "epoch_seconds_mean_after_first":
                    round(statistics.mean(secs[1:]), 3) if len(secs) > 1 else None,
                "first_epoch_seconds": round(secs[0], 3) if secs else None,
                "train_seconds": round(m["train_seconds"], 1) if "train_seconds" in m else None,
                "test_acc": acc, "test_acc_pct": round(100 * acc, 2) if acc is not None else None,
                "study_pct": study, "floor_pct": floor,
                "pass_floor": None if (floor is None or smoke)
                else bool(acc is not None and 100 * acc >= floor),
                "on_cuda": device.startswith("cuda"),
                "error": t.get("fer_sweep.error"),
            })
except Exception as err:  # noqa: BLE001 - the summary is written regardless
    store_error = f"{type(err).__name__}: {err}"

# ------------------------------------------------------------------ benchmark digest
def bench_digest(path):
    b = load_json(path)
    if not b:
        return None
    fer = {(r["model"], r["transforms"]): r["images_per_second"]
           for r in b.get("records", []) if r.get("pipeline") == "fer_sweep"}
    return {"file": Path(path).name, "device": b.get("device"), "device_name": b.get("device_name"),
            "torch": b.get("torch"), "seconds": b.get("bench_seconds"), "load": b.get("load"),
            "overrides": b.get("overrides"),
            "ratios": b.get("ratios"),
            "ceilings": {f"{c['model']} {c['variant']}": c["images_per_second"]
                         for c in b.get("ceilings", [])},
            "fer_sweep_images_per_second": {f"{m} {t}": v for (m, t), v in fer.items()}}


bench = {"default": bench_digest(out / "bench.json"),
         "channels_last_off": bench_digest(out / "bench_channels_last_off.json")}
decisions = {}
if bench["default"]:
    # bf16 vs fp32: the eager ceilings, per model.
    cz = bench["default"]["ceilings"]
    for model in sorted({k.split()[0] for k in cz}):
        f32, b16 = cz.get(f"{model} fp32_eager"), cz.get(f"{model} bf16_eager")
        if f32 and b16:
            decisions[f"{model}: bf16/fp32 eager ceiling"] = round(b16 / f32, 3)
        c = max((v for k, v in cz.items() if k.startswith(f"{model} ") and "compile" in k),
                default=None)
        if c and f32:
            decisions[f"{model}: best compiled/fp32 eager ceiling"] = round(c / f32, 3)
if bench["default"] and bench["channels_last_off"]:
    on = bench["default"]["fer_sweep_images_per_second"]
    off = bench["channels_last_off"]["fer_sweep_images_per_second"]
    for key in sorted(set(on) & set(off)):
        if off[key]:
            decisions[f"{key}: channels_last on/off (fer_sweep img/s)"] = round(on[key] / off[key], 3)
row1 = next((r for r in runs if r["row"] == "row1"), None)
comp = next((r for r in runs if r["kind"] == "compile"), None)
if row1 and comp and row1["epoch_seconds_mean_after_first"] and comp["epoch_seconds_mean_after_first"] \
        and not smoke:
    decisions["cnn2 norm: compiled/eager epoch seconds (after the 1st epoch; row1 shared the "
              "GPU with another job, so approximate)"] = round(
        comp["epoch_seconds_mean_after_first"] / row1["epoch_seconds_mean_after_first"], 3)

# ------------------------------------------------------------------ checks
checks = []


def check(name, ok, detail=""):
    checks.append({"check": name, "ok": bool(ok), "detail": detail})


for p in phases:
    if p["name"] in OPTIONAL and p["status"] in ("ok", "skipped"):
        continue
    check(f"phase {p['name']}", p["status"] == "ok",
          f"{p['status']} after {p['seconds']} s" + (f" ({p['note']})" if p["note"] else ""))
t2 = [r for r in runs if r["kind"] == "table2"]
rows_done = sorted({r["row"] for r in t2 if r["status"] == "FINISHED"})
check("Table 2: all seven rows FINISHED, each once", rows_done == sorted(STUDY)
      and len(t2) == len(STUDY), f"finished {rows_done}; {len(t2)} Table 2 runs")
check("compile run FINISHED", comp is not None and comp["status"] == "FINISHED",
      "no compile run" if comp is None else comp["status"])
fast = next((r for r in runs if r["kind"] == "fast"), None)
check("experiment=fast FINISHED", fast is not None and fast["status"] == "FINISHED",
      "no experiment=fast run" if fast is None else fast["status"])
for r in runs:
    if not r["device"] or not r["precision"]:
        check(f"{r['name']}: device and precision tags", False, f"{r['device']!r} {r['precision']!r}")
    if not smoke:
        check(f"{r['name']}: on CUDA", r["on_cuda"], f"device tag {r['device']!r}")
        if r["floor_pct"] is not None:
            check(f"{r['name']}: test accuracy >= {r['floor_pct']} %", r["pass_floor"],
                  f"{r['test_acc_pct']} % (study {r['study_pct']} %)")
if store_error:
    check("runs read from MLflow", False, store_error)
check(f"within the budget ({budget} s)", total <= budget, f"{total} s")

ok = all(c["ok"] for c in checks)
env_stopped = any(p["name"] == "env" and p["status"] != "ok" for p in phases)
code = 0 if ok else (2 if env_stopped else 1)
summary = {"ok": ok, "exit_code": code, "smoke": smoke, "budget_s": budget, "total_seconds": total,
           "failed_checks": [c["check"] for c in checks if not c["ok"]],
           "env": env, "phases": phases, "runs": runs, "checks": checks, "bench": bench,
           "decision_inputs": decisions, "mlflow_store": "mlflow.db", "store_error": store_error}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))


# ------------------------------------------------------------------ markdown
def fmt(v, nd=None):
    if v is None:
        return "-"
    return f"{v:.{nd}f}" if nd is not None and isinstance(v, (int, float)) else str(v)


md = [f"# GPU check: {'OK' if ok else 'FAILED'}{' (smoke mode: no CUDA requirement, no accuracy floor)' if smoke else ''}",
      "", f"{total} s of a {budget} s budget; exit status {code}.", "",
      f"- GPU: {env.get('gpu_name') or 'none'} ({fmt(env.get('gpu_memory_gib'))} GiB, "
      f"capability {fmt(env.get('gpu_capability'))}), nvidia-smi: {fmt(env.get('nvidia_smi'))}",
      f"- torch {fmt(env.get('torch'))}, CUDA {fmt(env.get('torch_cuda'))} (driver "
      f"{fmt(env.get('driver_cuda'))}), cuDNN {fmt(env.get('cudnn'))}, Python "
      f"{fmt(env.get('python'))}, {fmt(env.get('cpu_count'))} CPUs",
      f"- data: {fmt(env.get('data'))}", ""]
for prob in env.get("problems", []):
    md += [f"- **environment problem**: {prob}", ""]
md += ["## Phases", "", "| phase | status | seconds | limit s | note |", "|---|---|---:|---:|---|"]
md += [f"| {p['name']} | {p['status']} | {p['seconds']} | {fmt(p['limit_s'])} | {p['note']} |"
       for p in phases]
md += ["", "## Runs", "", "| run | model | status | device | device name | precision | epochs run "
       "(of) | stop | mean epoch s | test acc % | floor % | pass |",
       "|---|---|---|---|---|---|---:|---|---:|---:|---:|---|"]
for r in runs:
    md.append(f"| {r['name']} | {r['model']} | {r['status']} | {r['device']} | {r['device_name']} | "
              f"{r['precision']} | {r['epochs_run']} ({fmt(r['epochs_configured'])}) | "
              f"{fmt(r['stop_reason'])} | {fmt(r['epoch_seconds_mean'], 2)} | "
              f"{fmt(r['test_acc_pct'], 1)} | {fmt(r['floor_pct'])} | "
              f"{'-' if r['pass_floor'] is None else ('yes' if r['pass_floor'] else '**NO**')} |")
if not runs:
    md.append(f"| (no runs{': ' + store_error if store_error else ''}) |||||||||||")
md += ["", "## Checks", ""]
md += [f"- [{'x' if c['ok'] else ' '}] {c['check']}: {c['detail']}" for c in checks]
if decisions:
    md += ["", "## Inputs to the GPU decisions (ratios > 1: the first is faster)", ""]
    md += [f"- {k}: {v}" for k, v in decisions.items()]
for key, b in bench.items():
    if b and b.get("ratios"):
        md += ["", f"## Benchmark ({b['file']}: {b['device']} {b['device_name']}, "
               f"{fmt(b['seconds'])} s)", "",
               "| model | transforms | precision | fer_sweep/ceiling | best ceiling | "
               "fer_sweep/best ceiling |", "|---|---|---|---:|---|---:|"]
        md += [f"| {x['model']} | {x['transforms']} | {x.get('fer_sweep_precision')} | "
               f"{fmt(x.get('fer_sweep_over_ceiling'))} | {x.get('best_ceiling')} | "
               f"{fmt(x.get('fer_sweep_over_best_ceiling'))} |" for x in b["ratios"]]
md += ["", "Logs: logs/<phase>.log; the runs: mlflow.db (sqlite); Table 2 rebuilt: report/.", ""]
(out / "gpu_check.md").write_text("\n".join(md))
print("\n".join(md))
sys.exit(code)
EOF

# --------------------------------------------------------------------------- phases
say "gpu_check: budget ${BUDGET} s, smoke=${SMOKE}, OUT=$OUT, work folder $WORK"
say "FER2013_ROOT=${FER2013_ROOT:-} FER_SWEEP_CACHE=$FER_SWEEP_CACHE overrides: ${EXTRA[*]:-none}"

if ! run_phase env 150 0 10 "$PY" "$WORK/env_check.py"; then
  not_run env prepare bench table2 compile fast report bench_channels_last_off
  exit 2
fi
sed 's/^/    /' "$OUT/logs/env.log"

if ! run_phase prepare 120 0 10 "$PY" "$WORK/prepare.py" "${TRAIN_ARGS[@]}" "${EXTRA[@]}"; then
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
# (a short GPU_CHECK_FAST_S keeps half of itself for training)
FAST_BUDGET_MIN=$(awk "BEGIN { b = $FAST_CAP - $FAST_MARGIN; if (b < $FAST_CAP / 2) b = $FAST_CAP / 2; print b / 60 }")
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
