"""Exported bundles (``--export``) read back: for ``--verify``, which checks them, and for the
report, where ``--bundles DIR`` makes them rows of Table 2 like the store's runs, so that a
table survives the store it was trained in (e.g. ``results/``, committed; the stores are not)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag

from fer_sweep.errors import FerSweepError

FILES = ("config.yaml", "history.csv", "metrics.json", "predictions.csv")


def find(top: Path, option: str = "--verify") -> list[Path]:
    """The bundle folders at or under ``top`` (each holds a metrics.json)."""
    if not top.is_dir():
        raise FerSweepError(f"{option} {top}: no such folder; give the folder --export wrote.")
    found = sorted(p.parent for p in top.rglob("metrics.json"))
    if not found:
        raise FerSweepError(
            f"{option} {top}: no bundle (a folder with metrics.json) in it; "
            "write them with python -m fer_sweep.report --export DIR."
        )
    return found


def read(folder: Path) -> tuple[dict[str, Any], list[dict[str, str]], dict, list[dict[str, str]]]:
    """(config, history lines, metrics.json, prediction lines) of one bundle folder."""
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise FerSweepError(f"{folder} is not a whole bundle: {', '.join(missing)} missing")
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        info = json.loads((folder / "metrics.json").read_text())
        with (folder / "history.csv").open(newline="") as f:
            history = list(csv.DictReader(f))
        with (folder / "predictions.csv").open(newline="") as f:
            predictions = list(csv.DictReader(f))
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise FerSweepError(f"{folder}: a file cannot be read ({err})") from None
    return config, history, info, predictions


@dataclass(frozen=True)
class Bundle:
    """One exported run, as the report uses a store's run."""

    folder: Path
    run: Run  # rebuilt from metrics.json: id, name, status, times, final metrics, params, tags
    config: dict[str, Any]
    history: dict[str, list[float]]  # per-epoch values by metric (history.csv's columns)
    counts: dict[str, dict[str, int]] | None  # class counts per split (Table 1), if exported


def _run(info: dict[str, Any]) -> Run:
    """The MLflow run a bundle was exported from, as far as its metrics.json keeps it."""
    end = info.get("end_time_ms") or 0
    return Run(
        RunInfo(
            run_id=str(info["run_id"]),
            experiment_id="",
            user_id="",
            status=str(info.get("status", "FINISHED")),
            start_time=int(info.get("start_time_ms") or 0),
            end_time=int(end) if end else None,
            lifecycle_stage="active",
            run_name=info.get("run_name"),
        ),
        RunData(
            metrics=[Metric(k, float(v), int(end), 0) for k, v in info["metrics"].items()],
            params=[Param(k, str(v)) for k, v in info.get("params", {}).items()],
            tags=[RunTag(k, str(v)) for k, v in info.get("tags", {}).items()],
        ),
    )


def load(folder: Path) -> Bundle:
    config, history, info, _ = read(folder)
    try:
        run = _run(info)
        columns = [c for c in (history[0] if history else {}) if c != "epoch"]
        per_epoch = {c: [float(line[c]) for line in history if line[c] != ""] for c in columns}
        if not (isinstance(config, dict) and config.get("model")):
            raise ValueError("config.yaml holds no model section")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise FerSweepError(
            f"{folder}: a file lacks or garbles a field ({err}); export the run again with "
            "python -m fer_sweep.report --export."
        ) from None
    return Bundle(folder, run, config, per_epoch, info.get("class_counts"))


def load_all(tops: Sequence[Path]) -> list[Bundle]:
    """Every bundle under each of ``tops`` (``--bundles``), each run once: two folders of one
    run must hold the same metrics.json (copies), else which one counts would be a guess."""
    out: dict[str, Bundle] = {}
    for top in tops:
        for folder in find(top, "--bundles"):
            bundle = load(folder)
            seen = out.setdefault(bundle.run.info.run_id, bundle)
            same = (seen.folder / "metrics.json").read_bytes() == (
                folder / "metrics.json"
            ).read_bytes()
            if not same:
                raise FerSweepError(
                    f"--bundles: {seen.folder} and {folder} are two different exports of run "
                    f"{bundle.run.info.run_id}; keep one (export it again if in doubt)."
                )
    return list(out.values())
