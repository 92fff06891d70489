"""``python -m fer_sweep.report --export DIR``: each finished run of a sweep as a small folder
that anyone can check without the MLflow store (the store stays on the machine that trained).

One folder per run, ``<run name>-<run id[:8]>/``:

- ``config.yaml``: the resolved config the run trained with;
- ``history.csv``: one line per epoch (1-based): train loss and accuracy, validation loss and
  accuracy, the learning rate it trained with, seconds, and ``resumes`` (how many times the run
  had been continued from its checkpoint when that epoch was trained);
- ``metrics.json``: the final metrics, the run's params and tags, its class counts per split
  (``class_counts``, for Table 1), and the checks below;
- ``predictions.csv``: one line per test image: its path relative to the data root (or
  ``<csv>:<line>``), true class, predicted class (the best-validation weights, no TTA).

``metrics.json`` records what the folder proves: ``epochs_logged`` (each epoch exactly once,
no gap), and ``test_acc_recomputed`` from predictions.csv beside the logged ``test_acc``.
"""

from __future__ import annotations

import csv
import json
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fer_sweep.errors import FerSweepError
from fer_sweep.sweep import tracking
from fer_sweep.sweep.job import TRIAL_STATE

HISTORY = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds")
TAGS = (
    "model",
    "transforms",
    "data",
    "synthetic",
    "precision",
    "device",
    "device_name",
    "overrides",
)


def _shown(tag: str) -> bool:
    """The tags a bundle keeps: what the run was and did, not an error's traceback."""
    return tag in TAGS or (tag.startswith("fer_sweep.") and tag != tracking.ERROR_TAG)


def bundle_name(run: Run) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", run.info.run_name or "run")
    return f"{name}-{run.info.run_id[:8]}"


def epoch_check(steps: Sequence[int]) -> dict[str, Any]:
    """Whether a metric's steps are the epochs 0..n-1 exactly once each (``steps`` as logged)."""
    seen = sorted(steps)
    n = max(seen) + 1 if seen else 0
    repeated = sorted({s for s in seen if seen.count(s) > 1})
    missing = sorted(set(range(n)) - set(seen))
    exactly_once = not repeated and not missing
    return {"epochs": n, "exactly_once": exactly_once, "repeated": repeated, "missing": missing}


def _history(client: MlflowClient, run_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    per_key = {k: client.get_metric_history(run_id, k) for k in HISTORY}
    check = epoch_check([m.step for m in per_key["val_acc"]])
    marks = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "resumes"))
    rows = []
    for step in range(check["epochs"]):
        row: dict[str, Any] = {"epoch": step + 1}
        for key, hist in per_key.items():
            values = [m.value for m in hist if m.step == step]
            row[key] = values[-1] if values else ""
        row["resumes"] = int(max((v for s, v in marks if s <= step), default=0))
        rows.append(row)
    return rows, check


def _data_counts(client: MlflowClient, run_id: str, tmp: str) -> dict[str, Any] | None:
    """The class counts per split the run trained and was tested on (its data.json), for
    Table 1; None for a run without one."""
    try:
        path = client.download_artifacts(run_id, "data.json", tmp)
        return json.loads(Path(path).read_text()).get("counts")
    except Exception:
        return None


def write_bundle(client: MlflowClient, run: Run, folder: Path) -> dict[str, Any]:
    """Write one run's bundle into ``folder``; returns its metrics.json content."""
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
            with np.load(client.download_artifacts(run_id, "predictions.npz", tmp)) as npz:
                probs, y = np.asarray(npz["test_probs"]), np.asarray(npz["test_y"])
                classes = [str(c) for c in npz["classes"]]
                ids = [str(i) for i in npz["test_ids"]] if "test_ids" in npz.files else []
            counts = _data_counts(client, run_id, tmp)
        except Exception as err:  # an artifact missing or unreadable: this run cannot be shown
            raise FerSweepError(
                f"run {run_id} ({run.info.run_name}) has no readable config.yaml and "
                f"predictions.npz artifacts ({err}); was it logged by fer_sweep and finished?"
            ) from None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config)
    pred = probs.argmax(1)
    with (folder / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted"])
        for i in range(len(y)):
            w.writerow([ids[i] if ids else f"#{i}", classes[y[i]], classes[pred[i]]])
    rows, check = _history(client, run_id)
    with (folder / "history.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", *HISTORY, "resumes"])
        w.writeheader()
        w.writerows(rows)
    metrics = dict(sorted(run.data.metrics.items()))
    info = {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "start_time_ms": run.info.start_time,
        "end_time_ms": run.info.end_time,
        "resumes": int(run.data.tags.get("fer_sweep.resumes", "0")),
        "epochs_logged": check,
        "test_images": len(y),
        "test_paths_known": bool(ids),
        "test_acc": metrics.get("test_acc"),
        "test_acc_recomputed": float((pred == y).mean()) if len(y) else math.nan,
        "class_counts": counts,
        "metrics": metrics,
        "tags": {k: v for k, v in sorted(run.data.tags.items()) if _shown(k)},
        "params": dict(sorted(run.data.params.items())),
    }
    (folder / "metrics.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def export(client: MlflowClient, runs: Sequence[Run], out: Path) -> list[Path]:
    """A bundle per FINISHED run in ``runs`` under ``out`` (a pruned trial ends FINISHED
    untested: none for it); the folders written."""
    done = [
        r for r in runs if r.info.status == "FINISHED" and r.data.tags.get(TRIAL_STATE) != "PRUNED"
    ]
    if not done:
        raise FerSweepError(
            f"nothing to export: none of the sweep's {len(runs)} runs has FINISHED yet "
            "(pruned trials have no test predictions)."
        )
    folders = []
    for run in done:
        folder = out / bundle_name(run)
        write_bundle(client, run, folder)
        folders.append(folder)
    return folders
