"""Does pruning pay? The same Optuna search twice on real FER2013, with a pruner and without.

    FER2013_ROOT=/path/to/fer2013 python scripts/pruning_benchmark.py --out runs/pruning

Both searches: hparams_search=cnn2_optuna (learning rate, weight decay, batch size, dropout),
trainer.epochs=30, 24 trials, TPE seeded 0 (worker N: seed N), two joblib workers of one thread
each. The pruned one uses hydra/sweeper/pruner=asha (or --pruner); the other none. Each search
logs to its own MLflow experiment in <out>/mlflow.db; the script then reads the trials back and
writes <out>/<name>.json and <out>/<name>.md (--name: the pruned search's study and experiment,
default pruned): epochs trained, wall time and the best validation accuracy of each search, and
their ratios. --resume continues searches a stop cut off
(sweep.resume=latest). The pruned search runs first (it is the shorter).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient


def search(out: Path, name: str, pruner: str, args: argparse.Namespace) -> float:
    """Run (or resume) one search; returns its wall time in seconds."""
    cmd = [
        sys.executable,
        "-m",
        "fer_sweep",
        "-m",
        "hparams_search=cnn2_optuna",
        f"hydra/sweeper/pruner={pruner}",
        f"hydra.sweeper.n_trials={args.trials}",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.sampler.seed=0",
        f"hydra.sweeper.study_name={name}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "trainer.threads=1",
        f"trainer.epochs={args.epochs}",
        "trainer.progress=false",
        "mlflow.log_model=false",
        f"mlflow.tracking_uri=sqlite:///{(out / 'mlflow.db').resolve()}",
        f"mlflow.experiment={name}",
        f"hydra.job.name={name}",
        f"hydra.sweep.dir={(out / name / time.strftime('%H-%M-%S')).resolve()}",
        *(["sweep.resume=latest"] if args.resume else []),
        *args.override,
    ]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(out / f"{name}.log", "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - t0


def summary(client: MlflowClient, name: str, epochs_cap: int) -> dict:
    """Epochs trained, trials by state, the best validation accuracy of one search."""
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    parents = [r for r in runs if r.data.tags.get("fer_sweep.role") == "parent"]
    trials = [r for r in runs if "fer_sweep.trial_number" in r.data.tags]
    states: dict[str, int] = {}
    epochs = 0
    for r in trials:
        state = r.data.tags.get("fer_sweep.trial_state", "?")
        states[state] = states.get(state, 0) + 1
        epochs += int(r.data.metrics.get("stopped_epoch", epochs_cap))
    best = max(trials, key=lambda r: r.data.metrics.get("best_val_acc", -1.0))
    wall = sum((p.info.end_time or 0) - p.info.start_time for p in parents) / 1000
    return {
        "trials": len(trials),
        "states": states,
        "epochs_trained": epochs,
        "best_val_acc": best.data.metrics.get("best_val_acc"),
        "best_trial": int(best.data.tags["fer_sweep.trial_number"]),
        "best_params": {
            k: best.data.params[k]
            for k in (
                "optimizer.lr",
                "optimizer.weight_decay",
                "trainer.batch_size",
                "model.dropout",
            )
        },
        "best_test_acc": best.data.metrics.get("test_acc"),
        "parent_wall_s": round(wall),
    }


def percent(value: float | None) -> str:
    """A fraction as a percentage; "—" where there is none (a pruned best trial has no test
    accuracy: the test split is never read for it)."""
    return "—" if value is None else f"{100 * value:.2f} %"


def table_row(kind: str, pruner: str, s: dict) -> str:
    return (
        f"| {kind} ({pruner}) | {s['trials']} {s['states']} | {s['epochs_trained']} "
        f"| {percent(s['best_val_acc'])} | {percent(s['best_test_acc'])} |"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/pruning"))
    p.add_argument("--pruner", default="asha")
    p.add_argument(
        "--name",
        default="pruned",
        help="the pruned search's study and MLflow experiment (another name keeps earlier ones)",
    )
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--only", choices=("pruned", "unpruned"), help="run one of the two")
    p.add_argument("--report-only", action="store_true", help="summarise finished searches")
    p.add_argument("--override", action="append", default=[], help="one more override")
    args = p.parse_args()
    if not args.report_only and not os.environ.get("FER2013_ROOT"):
        p.error("set FER2013_ROOT to the real FER2013 (this benchmark is about real data)")
    args.out.mkdir(parents=True, exist_ok=True)
    names = {args.name: args.pruner, "unpruned": "none"}
    if not args.report_only:
        runs = (("pruned", args.name, args.pruner), ("unpruned", "unpruned", "none"))
        for kind, name, pruner in runs:
            if args.only in (None, kind):
                search(args.out, name, pruner, args)
    client = MlflowClient(f"sqlite:///{(args.out / 'mlflow.db').resolve()}")
    result = {name: summary(client, name, args.epochs) for name in names}
    pr, un = result[args.name], result["unpruned"]
    result["epochs_ratio"] = round(pr["epochs_trained"] / un["epochs_trained"], 3)
    result["best_val_acc_diff_points"] = round(100 * (pr["best_val_acc"] - un["best_val_acc"]), 2)
    result["host"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    result["settings"] = vars(args) | {"out": str(args.out)}
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    rows = [
        "| search | trials (states) | epochs trained | best val acc | best trial's test acc |",
        "|---|---|---:|---:|---:|",
    ]
    rows += [table_row(kind, names[kind], result[kind]) for kind in names]
    rows.append("")
    rows.append(
        f"pruned / unpruned epochs: {result['epochs_ratio']:.3f}; best validation accuracy, "
        f"pruned - unpruned: {result['best_val_acc_diff_points']:+.2f} points"
    )
    (args.out / f"{args.name}.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
