"""``python -m fer_sweep.report``: the study's Table 2 / Table 1 and comparison figures, rebuilt
from what a sweep logged in MLflow, and logged back onto the sweep's parent run.

Everything comes from the store (params, metrics, the config.yaml / data.json artifacts), never
from the sweep folder, so a report can be regenerated later, elsewhere, from the store alone.
It works for any sweep: rows are the parent's child runs, and the settings that differ between
them become columns. Rows whose model is one of the study's get its reported accuracy beside
ours; every other row simply has no reference.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import math
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fer_sweep import store
from fer_sweep.cli import add_store_args, run_command
from fer_sweep.errors import FerSweepError
from fer_sweep.replicates import SEED_KEYS, Difference, Summary, summarize, welch
from fer_sweep.replicates import group as replicate_groups
from fer_sweep.tracking import newest_runs

ROLE = "fer_sweep.role"


@dataclass(frozen=True)
class StudyRow:
    """One row of the study's Table 2, as printed (accuracy in percent)."""

    row: int
    model: str
    network: str
    transforms: str
    epochs: int
    train_loss: float
    acc: float


_AUG = "Normalize, RandomRotation(10), RandomAffine(degrees=0, translate=(0.1, 0.1))"
_RES = (
    "Conv2d-64-3x3, BatchNorm2d-64, Conv2d-64-3x3, BatchNorm2d-64, ResBlock-64 (x2), "
    "Conv2d-128-3x3, BatchNorm2d-128, ResBlock-128 (x2), Linear-8192-500"
)
_CNN2 = "Conv2d-10-3x3, MaxPool2d-2x2, Conv2d-20-3x3, MaxPool2d-2x2"

# The reference study, §4.1 Table 2, in its order; matched to our runs by model name
# (conf/model/<name>.yaml), which is how conf/table2/row<N>.yaml picks each row's network.
STUDY_TABLE2: tuple[StudyRow, ...] = (
    StudyRow(
        1,
        "cnn2",
        f"{_CNN2}, Linear-720-300, Linear-300-150, Linear-150-7",
        "Normalize",
        50,
        0.015543,
        52.6,
    ),
    StudyRow(
        2,
        "cnn2_fc1000",
        f"{_CNN2}, Linear-1000, Linear-250-1000, Linear-1000-7",
        "Normalize",
        500,
        0.016786,
        51.3,
    ),
    StudyRow(
        3,
        "cnn2_fc3",
        f"{_CNN2}, Linear-1000-1000, Linear-250-1000, Linear-100-250, Linear-7-100",
        "Normalize",
        500,
        0.017463,
        51.4,
    ),
    StudyRow(
        4,
        "cnn3",
        f"{_CNN2}, Conv2d-40-3x3, MaxPool2d-2x2, Linear-360-300, Linear-300-150, Linear-150-7",
        "Normalize",
        100,
        0.015525,
        50.4,
    ),
    StudyRow(
        5,
        "resnet_small",
        "Conv2d-64-3x3, BatchNorm2d-64, ResBlock-64 (2 layers), "
        "Conv2d-128-3x3, BatchNorm2d-128, ResBlock-128 (2 layers), Linear-8192-500, "
        "Linear-500-7",
        "Normalize",
        100,
        0.012914,
        60.4,
    ),
    StudyRow(6, "resnet", f"{_RES}, Linear-500-7", _AUG, 100, 0.004955, 65.9),
    StudyRow(7, "resnet_dropout", f"{_RES}, Dropout-500, Linear-500-7", _AUG, 100, 0.009753, 63.3),
)
STUDY_BY_MODEL: dict[str, StudyRow] = {r.model: r for r in STUDY_TABLE2}

# The study's Table 1 (train / validation / test), keyed by fer_sweep.data.CLASSES names.
STUDY_TABLE1: dict[str, tuple[int, int, int]] = {
    "angry": (3190, 805, 958),
    "disgust": (362, 74, 111),
    "fear": (3318, 779, 1024),
    "happy": (5770, 1445, 1774),
    "sad": (3859, 971, 1247),
    "surprise": (2487, 684, 831),
    "neutral": (3981, 984, 1233),
}
STUDY_CLASS_NAMES = {
    "angry": "Anger",
    "disgust": "Disgust",
    "fear": "Fear",
    "happy": "Happiness",
    "sad": "Sadness",
    "surprise": "Surprise",
    "neutral": "Neutral",
}

# The ensemble accuracy the study quotes (§6, Table 3, from its reference [2]).
STUDY_ENSEMBLE_ACC = 75.8

# Params that differ between runs without being a setting of the experiment.
_NOT_SWEPT = re.compile(
    r"^(mlflow\.|sweep\.|data\.(n_|mean_used|std_used|converted|cache_dir|root$)|"
    r"trainer\.(resume|progress|threads|checkpoint_dir|checkpoint_every_s|device|device_used"
    r"|precision)$)"
)
_GROUPS = ("model", "transforms", "optimizer", "scheduler", "data")

# Optional test metrics: a column appears when at least one row has the metric.
OPTIONAL_ACC = (
    ("test_acc_tta", "TTA"),
    ("test_acc_public", "PublicTest"),
    ("test_acc_private", "PrivateTest"),
)


# --------------------------------------------------------------------------------------------
# The store


def find_parent(client: MlflowClient, exp_id: str, parent: str | None) -> Run:
    """The named parent run, or the latest sweep parent of the experiment."""
    if parent:
        try:
            run = client.get_run(parent)
        except Exception:
            raise FerSweepError(f"--parent {parent}: no such run in this store.") from None
        if run.info.experiment_id != exp_id:
            raise FerSweepError(
                f"--parent {parent} belongs to another experiment (id "
                f"{run.info.experiment_id}); pass its --experiment."
            )
        return run
    runs = newest_runs(client, exp_id, f"tags.`{ROLE}` = 'parent'", limit=1)
    if not runs:
        raise FerSweepError(
            "no sweep parent run in this experiment: run a multirun first "
            "(python -m fer_sweep -m ... or experiment=table2), or name one "
            "with --parent RUN_ID."
        )
    return runs[0]


def children(client: MlflowClient, exp_id: str, parent_id: str, role: str = "job") -> list[Run]:
    """The parent's child runs of one role (jobs, or ensembles), oldest first."""
    runs = client.search_runs(
        [exp_id],
        f"tags.mlflow.parentRunId = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )
    return [r for r in runs if r.data.tags.get(ROLE, "job") == role]


def download(client: MlflowClient, run_id: str, path: str, dst: Path) -> Path | None:
    """A run's artifact as a local file, or None when the run has no such artifact."""
    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except Exception:
        return None


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def unflatten(params: Mapping[str, str]) -> dict[str, Any]:
    """MLflow params ({"model.hidden": "[300, 150]"}) back to a nested config."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        node = out
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = _literal(value)
    return out


def run_config(client: MlflowClient, run: Run, tmp: Path) -> dict[str, Any]:
    """The job's resolved config: its config.yaml artifact, else its params."""
    path = download(client, run.info.run_id, "config.yaml", tmp / run.info.run_id)
    if path is not None:
        loaded = yaml.safe_load(path.read_text())
        if isinstance(loaded, dict):
            return loaded
    return unflatten(run.data.params)


# --------------------------------------------------------------------------------------------
# Describing a run in the study's words


def describe_network(model_cfg: Mapping[str, Any], num_classes: int = 7) -> str:
    """Table 2's "Network configuration", read off the model the config builds."""
    from omegaconf import OmegaConf

    from fer_sweep.config import validate
    from fer_sweep.models import build_model, describe

    try:  # through the schema, as at training time
        model = validate(OmegaConf.create({"model": dict(model_cfg)})).model
        return describe(build_model(model, num_classes=num_classes))
    except Exception as err:  # a run logged by an older / newer model schema
        return f"? ({model_cfg.get('name', 'model')}: {err})"


def _num(value: Any) -> str:
    return f"{float(value):g}"


def describe_transforms(tcfg: Mapping[str, Any]) -> str:
    """Table 2's "Transformations", in torchvision's words, e.g. "Normalize, RandomRotation(10),
    RandomAffine(degrees=0, translate=(0.1, 0.1))"."""
    parts = ["Normalize"]
    rot = tcfg.get("rotation") or 0
    if isinstance(rot, (list, tuple)):
        if any(float(r) for r in rot):
            parts.append(f"RandomRotation(({_num(rot[0])}, {_num(rot[1])}))")
    elif float(rot):
        parts.append(f"RandomRotation({_num(rot)})")
    tr = tcfg.get("translate") or 0
    pair = tuple(tr) if isinstance(tr, (list, tuple)) else (tr, tr)
    if any(float(t) for t in pair):
        parts.append(f"RandomAffine(degrees=0, translate=({_num(pair[0])}, {_num(pair[1])}))")
    if tcfg.get("hflip"):
        parts.append("RandomHorizontalFlip(0.5)")
    return ", ".join(parts)


def swept_keys(params: Sequence[Mapping[str, str]]) -> list[str]:
    """The settings that differ between runs: the columns that tell the rows apart.

    A config group whose option differs (model=cnn2,cnn3) is one column named after the group,
    instead of one per key the options happen to set; a key inside a group stays a column only
    where it differs between runs of the same option (model.dropout=0.1,0.5).
    """
    keys = sorted({k for p in params for k in p})
    differing = [k for k in keys if not _NOT_SWEPT.match(k) and len({p.get(k) for p in params}) > 1]
    out: list[str] = []
    for key in differing:
        group = key.split(".", 1)[0]
        if group in _GROUPS and f"{group}.name" in differing:
            if key == f"{group}.name":
                out.append(group)
                continue
            by_option: dict[str | None, set[str | None]] = {}
            for p in params:
                by_option.setdefault(p.get(f"{group}.name"), set()).add(p.get(key))
            if all(len(v) == 1 for v in by_option.values()):
                continue
        out.append(key)
    return sorted(out, key=lambda k: (k.split(".", 1)[0], "." in k, k))  # group, then its keys


def swept_value(run: Run, key: str) -> str:
    params = run.data.params
    return params.get(f"{key}.name", "") if key in _GROUPS else params.get(key, "")


# --------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    """One child run as a row of the report."""

    run: Run
    model: str
    transforms_name: str
    network: str
    transforms: str
    epochs: int | None
    synthetic: bool
    metrics: dict[str, float]
    swept: dict[str, str] = field(default_factory=dict)
    study: StudyRow | None = None
    wall_seconds: float | None = None
    row_tag: int | None = None
    label: str = ""

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def test_acc(self) -> float | None:
        return self.metrics.get("test_acc")


def _row_tag(run: Run) -> int | None:
    """The Table 2 row a job was launched as (table2=row<N>, see conf/table2/), if any."""
    m = re.search(r"(?:^|\s)table2=row(\d+)", run.data.tags.get("overrides", ""))
    return int(m.group(1)) if m else None


def _wall_seconds(run: Run) -> float | None:
    if "train_seconds" in run.data.metrics:
        return float(run.data.metrics["train_seconds"])
    if run.info.end_time and run.info.start_time:
        return (run.info.end_time - run.info.start_time) / 1000.0
    return None


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def build_rows(client: MlflowClient, runs: Sequence[Run], tmp: Path) -> tuple[list[Row], list[str]]:
    """Rows in the study's order (study rows first, by model), then the others as launched."""
    keys = swept_keys([r.data.params for r in runs])
    rows: list[Row] = []
    for run in runs:
        cfg = run_config(client, run, tmp)
        mcfg, tcfg = cfg.get("model") or {}, cfg.get("transforms") or {}
        metrics = dict(run.data.metrics)
        if "final_train_loss" not in metrics and "train_loss" in metrics:
            metrics["final_train_loss"] = metrics["train_loss"]  # the last logged epoch's
        model = str(mcfg.get("name") or run.data.tags.get("model", "?"))
        rows.append(
            Row(
                run=run,
                model=model,
                transforms_name=str(tcfg.get("name") or run.data.tags.get("transforms", "?")),
                network=describe_network(mcfg) if mcfg else "?",
                transforms=describe_transforms(tcfg),
                epochs=_int(
                    (cfg.get("trainer") or {}).get("epochs", run.data.params.get("trainer.epochs"))
                ),
                synthetic=run.data.tags.get("synthetic") == "true"
                or str((cfg.get("data") or {}).get("synthetic")).lower() == "true",
                metrics=metrics,
                swept={k: swept_value(run, k) for k in keys},
                study=STUDY_BY_MODEL.get(model),
                wall_seconds=_wall_seconds(run),
                row_tag=_row_tag(run),
            )
        )

    def order(r: Row) -> tuple[int, float, float]:
        first = r.study.row if r.study else (r.row_tag or math.inf)
        return (0 if r.study else 1, first, r.run.info.start_time or 0)

    rows.sort(key=order)
    for i, r in enumerate(rows, 1):
        names = [r.swept[k] for k in keys if r.swept[k]] or [r.run.info.run_name or r.run_id[:8]]
        r.label = f"{i}. {' / '.join(names)}"
    return rows, keys


@dataclass
class Group:
    """Runs that differ only in their seeds (replicates.SEED_KEYS): one row of the report."""

    rows: list[Row]
    settings: dict[str, str]  # the swept settings that define the group (no seeds)
    seeds: dict[str, list[str]]  # seed key -> its values, for the seed keys that vary within
    stats: dict[str, Summary]  # metric -> summary over the group's runs (where logged)
    label: str = ""

    @property
    def first(self) -> Row:
        return self.rows[0]

    @property
    def n(self) -> int:
        return len(self.rows)

    def seeds_text(self) -> str:
        """ "trainer.seed 0, 1, 2" / "data.split_seed 0, 1 (validation split)"; '' for n = 1."""
        parts = []
        for key, values in self.seeds.items():
            note = " (validation split)" if key == "data.split_seed" else ""
            parts.append(f"{key} {', '.join(values)}{note}")
        return "; ".join(parts)


def _seed_order(value: str) -> tuple[int, float, str]:
    """Seeds in numeric order (2 before 10), anything else after, as text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


SUMMARISED = ("test_acc", "macro_f1", "test_acc_public", "test_acc_private", "test_acc_tta")


def build_groups(rows: Sequence[Row], keys: Sequence[str]) -> tuple[list[Group], list[str]]:
    """(groups in the rows' order, the swept keys that tell groups apart)."""
    group_keys = [k for k in keys if k not in SEED_KEYS]
    groups = []
    for members in replicate_groups(rows, lambda r: tuple(r.swept[k] for k in group_keys)):
        members.sort(key=lambda r: [_seed_order(r.run.data.params.get(k, "")) for k in SEED_KEYS])
        seeds = {}
        for key in SEED_KEYS:
            values = [m.run.data.params.get(key, "") for m in members]
            if len(set(values)) > 1:
                seeds[key] = values
        summaries = {
            m: summarize([r.metrics[m] for r in members if m in r.metrics]) for m in SUMMARISED
        }
        groups.append(
            Group(
                members,
                {k: members[0].swept[k] for k in group_keys},
                seeds,
                {m: v for m, v in summaries.items() if v is not None},
            )
        )
    for i, g in enumerate(groups, 1):
        names = [v for v in g.settings.values() if v] or [
            g.first.run.info.run_name or g.first.run_id[:8]
        ]
        g.label = f"{i}. {' / '.join(names)}" + (f" (n={g.n})" if g.n > 1 else "")
    return groups, group_keys


@dataclass(frozen=True)
class Comparison:
    a: Group
    b: Group
    key: str  # the setting compared
    others: tuple[str, ...]  # other settings that also differ between a and b
    diff: Difference


def compare_groups(
    groups: Sequence[Group], keys: Sequence[str], key: str | None = None
) -> list[Comparison]:
    """Differences of mean test accuracy between pairs of groups that differ in exactly one
    setting: ``key`` when given; without it, only when the sweep varies exactly one setting
    besides the seeds and has replicates (e.g. transforms=norm,aug trainer.seed=0,1,2)."""
    if key is not None and key not in keys:
        raise FerSweepError(
            f"--compare {key}: this sweep does not vary {key}; it varies "
            f"{', '.join(keys) or 'nothing besides the seeds'}."
        )
    if key is None and (len(keys) != 1 or all(g.n < 2 for g in groups)):
        return []
    out = []
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            # A setting one side never logged (runs older than the setting) is not a difference
            # of the experiment; it is listed under "Also differs" instead.
            unknown = [
                k
                for k in keys
                if a.settings[k] != b.settings[k] and "" in (a.settings[k], b.settings[k])
            ]
            differ = [k for k in keys if a.settings[k] != b.settings[k] and k not in unknown]
            if len(differ) != 1 or (key is not None and differ[0] != key):
                continue
            if "test_acc" not in a.stats or "test_acc" not in b.stats:
                continue
            diff = welch(a.stats["test_acc"], b.stats["test_acc"])
            out.append(Comparison(a, b, differ[0], tuple(f"{k} (unlogged)" for k in unknown), diff))
    return out


# --------------------------------------------------------------------------------------------
# Formatting


def _pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{int(minutes)} min {int(seconds % 60):02d} s"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    header: Sequence[str], body: Sequence[Sequence[Any]], right: Sequence[bool] | None = None
) -> str:
    right = right or [False] * len(header)
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join("---:" if r else "---" for r in right) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _optional_metrics(rows: Sequence[Row]) -> list[tuple[str, str]]:
    return [(m, title) for m, title in OPTIONAL_ACC if any(m in r.metrics for r in rows)]


def run_records(rows: Sequence[Row], keys: Sequence[str]) -> list[dict[str, Any]]:
    """runs.csv: one record per run (accuracies in percent, differences in percentage points)."""
    extra = _optional_metrics(rows)
    records = []
    for i, r in enumerate(rows, 1):
        acc = r.test_acc
        rec: dict[str, Any] = {
            "run": i,
            "run_id": r.run_id,
            "run_name": r.run.info.run_name,
            "status": r.run.info.status,
            "synthetic": str(r.synthetic).lower(),
            "model": r.model,
            "transforms_name": r.transforms_name,
        }
        rec.update({k: r.swept[k] for k in keys if k not in ("model", "transforms")})
        rec.update(
            {
                "epochs": r.epochs,
                "final_train_loss": r.metrics.get("final_train_loss"),
                "test_acc_pct": _pct_value(acc),
                "macro_f1": r.metrics.get("macro_f1"),
            }
        )
        for metric, _ in extra:
            rec[f"{metric}_pct"] = _pct_value(r.metrics.get(metric))
        rec.update(
            {
                "n_params": _int(r.metrics.get("n_params")),
                "best_epoch": _int(r.metrics.get("best_epoch")),
                "stopped_epoch": _int(r.metrics.get("stopped_epoch")),
                "best_val_acc_pct": _pct_value(r.metrics.get("best_val_acc")),
                "precision": r.run.data.params.get("trainer.precision"),
                "wall_seconds": r.wall_seconds,
            }
        )
        records.append(rec)
    return records


def _pct_value(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _summary_fields(prefix: str, s: Summary | None, scale: float = 100.0) -> dict[str, Any]:
    """{prefix}_mean, _std, _ci95_low, _ci95_high (empty where undefined: n = 1)."""

    def val(x: float | None) -> float | None:
        return None if x is None else scale * x

    return {
        f"{prefix}_mean": val(s.mean) if s else None,
        f"{prefix}_std": val(s.std) if s else None,
        f"{prefix}_ci95_low": val(s.low) if s else None,
        f"{prefix}_ci95_high": val(s.high) if s else None,
    }


def table2_records(groups: Sequence[Group], keys: Sequence[str]) -> list[dict[str, Any]]:
    """table2.csv: one record per group of replicates. Accuracies in percent (means over the
    group's runs), differences in percentage points, macro-F1 as a fraction; *_std and the
    interval are empty for a group of one run."""
    rows = [r for g in groups for r in g.rows]
    extra = _optional_metrics(rows)
    records = []
    for i, g in enumerate(groups, 1):
        r, study, acc = g.first, g.first.study, g.stats.get("test_acc")
        statuses = sorted({m.run.info.status for m in g.rows})
        rec: dict[str, Any] = {
            "row": i,
            "n": g.n,
            "run_id": " ".join(m.run_id for m in g.rows),
            "run_name": r.run.info.run_name,
            "status": "/".join(statuses),
            "synthetic": str(any(m.synthetic for m in g.rows)).lower(),
            "model": r.model,
            "transforms_name": r.transforms_name,
        }
        rec.update({k: g.settings[k] for k in keys if k not in ("model", "transforms")})
        rec.update(
            {
                "replicates": g.seeds_text(),
                "network": r.network,
                "transformations": r.transforms,
                "epochs": r.epochs,
                "final_train_loss": _mean([m.metrics.get("final_train_loss") for m in g.rows]),
                "test_acc_pct": _pct_value(acc.mean) if acc else None,
                **_summary_fields("test_acc", acc),
                "study_row": study.row if study else None,
                "study_network": study.network if study else None,
                "study_transformations": study.transforms if study else None,
                "study_epochs": study.epochs if study else None,
                "study_train_loss": study.train_loss if study else None,
                "study_acc_pct": study.acc if study else None,
                "study_in_ci95": _yes_no(acc.contains(study.acc / 100)) if study and acc else None,
                "diff_pp": (100 * acc.mean - study.acc) if study and acc else None,
            }
        )
        rec.update(_summary_fields("macro_f1", g.stats.get("macro_f1"), scale=1.0))
        for metric, _ in extra:
            summary = g.stats.get(metric)
            rec[f"{metric}_pct"] = _pct_value(summary.mean) if summary else None
            rec.update(_summary_fields(metric, summary))
        best_epochs = [_int(m.metrics.get("best_epoch")) for m in g.rows]
        rec.update(
            {
                "n_params": _int(r.metrics.get("n_params")),
                "best_epoch": _int(_median([b for b in best_epochs if b is not None])),
                "best_val_acc_pct": _pct_value(
                    _mean([m.metrics.get("best_val_acc") for m in g.rows])
                ),
                "wall_seconds": _mean([m.wall_seconds for m in g.rows]),
            }
        )
        records.append(rec)
    return records


def comparison_records(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    """compare.csv: b − a in percentage points with Welch's 95 % interval."""
    return [
        {
            "setting": c.key,
            "a": c.a.label,
            "b": c.b.label,
            "a_value": c.a.settings[c.key],
            "b_value": c.b.settings[c.key],
            "n_a": c.a.n,
            "n_b": c.b.n,
            "a_test_acc_mean": 100 * c.a.stats["test_acc"].mean,
            "b_test_acc_mean": 100 * c.b.stats["test_acc"].mean,
            "diff_pp": 100 * c.diff.delta,
            "diff_ci95_low": None if c.diff.low is None else 100 * c.diff.low,
            "diff_ci95_high": None if c.diff.high is None else 100 * c.diff.high,
            "welch_df": c.diff.df,
            "excludes_zero": _yes_no(c.diff.excludes_zero),
            "also_differs": " ".join(c.others),
        }
        for c in comparisons
    ]


def _yes_no(flag: bool | None) -> str | None:
    return None if flag is None else ("yes" if flag else "no")


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def _median(values: Sequence[float]) -> float | None:
    xs = sorted(values)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _mean_sd(s: Summary | None, digits: int = 1) -> str:
    if s is None:
        return ""
    if s.std is None:
        return _pct(s.mean, digits)
    return f"{100 * s.mean:.{digits}f} ± {100 * s.std:.{digits}f}%"


def _interval(low: float | None, high: float | None, digits: int = 1) -> str:
    if low is None or high is None:
        return ""
    return f"[{100 * low:.{digits}f}, {100 * high:.{digits}f}]"


Column = tuple[str, bool, Callable[[int, "Group"], Any]]  # title, right-aligned, cell


def _group_columns(
    keys: Sequence[str], extra: Sequence[tuple[str, str]], tta: set[str]
) -> list[Column]:
    """The main table's columns: one row per group of replicates."""

    def study(g: Group) -> StudyRow | None:
        return g.first.study

    def acc(g: Group) -> Summary | None:
        return g.stats.get("test_acc")

    def diff(g: Group) -> str:
        s, a = study(g), acc(g)
        return f"{100 * a.mean - s.acc:+.1f}" if s and a else ""

    def inside(g: Group) -> str:
        s, a = study(g), acc(g)
        return (_yes_no(a.contains(s.acc / 100)) or "") if s and a else ""

    def status(g: Group) -> str:
        other = {m.run.info.status for m in g.rows} - {"FINISHED"}
        return f" ({'/'.join(sorted(other))})" if other else ""

    def run(g: Group) -> str:
        r = g.first
        if g.n == 1:
            return f"`{r.run_id[:8]}` {r.run.info.run_name or ''}"
        return f"{g.n} runs: {g.seeds_text() or 'same seeds'}"

    def loss(g: Group) -> str:
        value = _mean([m.metrics.get("final_train_loss") for m in g.rows])
        return "" if value is None else f"{value:.6f}"

    def params(g: Group) -> str:
        n = _int(g.first.metrics.get("n_params"))
        return "" if n is None else f"{n:,}"

    def metric_column(m: str, title: str) -> Column:
        if m == "test_acc_tta" and tta:
            title = f"{title} ({'/'.join(sorted(tta))})"
        return (title, True, lambda i, g: _mean_sd(g.stats.get(m)))

    def key_column(k: str) -> Column:
        return (k, False, lambda i, g: g.settings[k])

    return [
        ("#", True, lambda i, g: i),
        *[key_column(k) for k in keys],
        ("Network configuration", False, lambda i, g: g.first.network),
        ("Transformations", False, lambda i, g: g.first.transforms),
        ("Epochs", True, lambda i, g: g.first.epochs or ""),
        ("Training loss", True, lambda i, g: loss(g)),
        ("n", True, lambda i, g: g.n),
        ("Test acc.", True, lambda i, g: _mean_sd(acc(g)) + status(g)),
        ("95 % CI", True, lambda i, g: _interval(acc(g).low, acc(g).high) if acc(g) else ""),
        (
            "Study",
            True,
            lambda i, g: f"{study(g).acc:.1f}% (row {study(g).row})" if study(g) else "—",
        ),
        ("Study in CI", False, lambda i, g: inside(g)),
        ("Δ (pp)", True, lambda i, g: diff(g)),
        *[metric_column(m, t) for m, t in extra],
        ("Params", True, lambda i, g: params(g)),
        (
            "Best epoch",
            True,
            lambda i, g: ", ".join(str(_int(m.metrics.get("best_epoch")) or "") for m in g.rows),
        ),
        ("Wall time", True, lambda i, g: _duration(_mean([m.wall_seconds for m in g.rows]))),
        (
            "Data",
            False,
            lambda i, g: "**SYNTHETIC**" if any(m.synthetic for m in g.rows) else "fer2013",
        ),
        ("Run", False, lambda i, g: run(g)),
    ]


def _table(columns: Sequence[Column], items: Sequence[Any]) -> str:
    return markdown_table(
        [c[0] for c in columns],
        [[c[2](i, item) for c in columns] for i, item in enumerate(items, 1)],
        [c[1] for c in columns],
    )


GROUPS_NOTE = (
    "Test acc.: the best-validation-epoch weights on the test split; a row with n > 1 holds "
    "runs that differ only in their seeds (mean ± sample sd, 95 % CI from Student's t with "
    "n − 1 degrees of freedom; none for n = 1). Study: the reference study's Table 2 accuracy "
    "for the same model (matched by model name; other runs have none); Study in CI: whether it "
    "lies inside our interval; Δ = ours − study, in percentage points. Training loss: the last "
    "epoch's mean training loss. Wall time: training time per run."
)


def _differences_section(comparisons: Sequence[Comparison]) -> list[str]:
    def ci(c: Comparison) -> str:
        if c.diff.low is None or c.diff.high is None:
            return ""
        return f"[{100 * c.diff.low:+.1f}, {100 * c.diff.high:+.1f}]"

    def real(c: Comparison) -> str:
        return {True: "yes", False: "not shown"}.get(
            c.diff.excludes_zero, "needs n ≥ 2 on both sides"
        )

    columns: list[Column] = [
        ("Setting", False, lambda i, c: c.key),
        ("a", False, lambda i, c: c.a.settings[c.key]),
        ("b", False, lambda i, c: c.b.settings[c.key]),
        ("n (a, b)", True, lambda i, c: f"{c.a.n}, {c.b.n}"),
        ("Test acc. a", True, lambda i, c: _pct(c.a.stats["test_acc"].mean)),
        ("Test acc. b", True, lambda i, c: _pct(c.b.stats["test_acc"].mean)),
        ("b − a (pp)", True, lambda i, c: f"{100 * c.diff.delta:+.1f}"),
        ("95 % CI (pp)", True, lambda i, c: ci(c)),
        ("Real?", False, lambda i, c: real(c)),
        ("Also differs", False, lambda i, c: " ".join(c.others) or "—"),
    ]
    return [
        "",
        "## Differences (b − a, mean test accuracy, Welch 95 % CI)",
        "",
        _table(columns, comparisons),
        "",
        "Real?: yes when the interval excludes 0 (the difference is larger than the "
        "seed-to-seed spread can explain at the 95 % level).",
    ]


def _runs_section(groups: Sequence[Group]) -> list[str]:
    runs = [(i, r) for i, g in enumerate(groups, 1) for r in g.rows]
    columns: list[Column] = [
        ("Row", True, lambda _, ir: ir[0]),
        ("Run", False, lambda _, ir: f"`{ir[1].run_id[:8]}` {ir[1].run.info.run_name or ''}"),
        *[(k, True, lambda _, ir, k=k: ir[1].run.data.params.get(k, "")) for k in SEED_KEYS],
        ("Test acc.", True, lambda _, ir: _pct(ir[1].test_acc)),
        ("Best epoch", True, lambda _, ir: _int(ir[1].metrics.get("best_epoch")) or ""),
        ("Stopped", True, lambda _, ir: _int(ir[1].metrics.get("stopped_epoch")) or ""),
        ("Status", False, lambda _, ir: ir[1].run.info.status),
        ("Wall time", True, lambda _, ir: _duration(ir[1].wall_seconds)),
    ]
    return ["", "## Runs", "", _table(columns, runs)]


def _ensembles_section(ensembles: Sequence[Run]) -> list[str]:
    def metric(e: Run, key: str) -> float | None:
        return e.data.metrics.get(key)

    columns: list[Column] = [
        ("Run", False, lambda i, e: f"`{e.info.run_id[:8]}` {e.info.run_name}"),
        ("Chosen by", False, lambda i, e: e.data.params.get("ensemble.by", "")),
        ("Members", True, lambda i, e: _int(metric(e, "n_members")) or ""),
        ("Test acc.", True, lambda i, e: _pct(metric(e, "test_acc"))),
        (
            "Test NLL",
            True,
            lambda i, e: "" if metric(e, "test_loss") is None else f"{metric(e, 'test_loss'):.4f}",
        ),
        ("Study's ensemble", True, lambda i, e: f"{STUDY_ENSEMBLE_ACC:.1f}%"),
        (
            "Δ (pp)",
            True,
            lambda i, e: (
                ""
                if metric(e, "test_acc") is None
                else f"{100 * metric(e, 'test_acc') - STUDY_ENSEMBLE_ACC:+.1f}"
            ),
        ),
    ]
    return [
        "",
        "## Ensembles of this sweep (python -m fer_sweep.ensemble)",
        "",
        _table(columns, ensembles),
        "",
        "The study quotes an ensemble of other authors' networks (its Table 3, [2]) at "
        "75.8%, not an ensemble of its Table 2.",
    ]


def table2_markdown(
    groups: Sequence[Group],
    keys: Sequence[str],
    parent: Run,
    uri: str,
    experiment: str,
    ensembles: Sequence[Run] = (),
    comparisons: Sequence[Comparison] = (),
) -> str:
    """table2.md: the groups' table, then the differences, the runs of replicated groups and
    the sweep's ensembles, where there are any."""
    rows = [r for g in groups for r in g.rows]
    tta = {r.run.data.params.get("eval.tta") for r in rows} - {None, "none"}
    replicated = any(g.n > 1 for g in groups)
    runs = f"{len(rows)} run{'' if len(rows) == 1 else 's'}"
    runs += f" in {len(groups)} groups" if replicated else ""
    out = [f"# Table 2: network configurations and their performance ({runs})", ""]
    n_syn = sum(r.synthetic for r in rows)
    if n_syn:
        out += [
            f"> **Warning: {n_syn} of {len(rows)} runs were trained on fer_sweep's "
            "SYNTHETIC faces (data=synthetic)**: a pipeline check, never a FER2013 result; "
            "their accuracies are not comparable with the study's.",
            "",
        ]
    overrides = parent.data.tags.get("fer_sweep.overrides", "")
    launched = f", launched with `{overrides}`" if overrides else ""
    out += [
        f"Sweep: parent run `{parent.info.run_id}` ({parent.info.run_name}) of experiment "
        f"`{experiment}` in `{uri}`{launched}.",
        "",
        _table(_group_columns(keys, _optional_metrics(rows), tta), groups),
        "",
        GROUPS_NOTE,
    ]
    if comparisons:
        out += _differences_section(comparisons)
    if replicated:
        out += _runs_section(groups)
    if ensembles:
        out += _ensembles_section(ensembles)
    return "\n".join(out) + "\n"


def _class_counts(
    client: MlflowClient, runs: Sequence[Run], tmp: Path
) -> list[tuple[dict[str, dict[str, int]], list[str]]]:
    """Distinct (counts per split, run names) among the runs' data.json artifacts."""
    groups: list[tuple[dict[str, dict[str, int]], list[str]]] = []
    for run in runs:
        path = download(client, run.info.run_id, "data.json", tmp / run.info.run_id)
        if path is None:
            continue
        counts = json.loads(path.read_text()).get("counts", {})
        for known, names in groups:
            if known == counts:
                names.append(run.info.run_name or run.info.run_id)
                break
        else:
            groups.append((counts, [run.info.run_name or run.info.run_id]))
    return groups


def table1_markdown(
    groups: Sequence[tuple[dict[str, dict[str, int]], list[str]]], synthetic: bool
) -> str:
    out = ["# Table 1: class counts of the splits used, beside the study's", ""]
    if synthetic:
        out += [
            "> **Warning: these runs used fer_sweep's SYNTHETIC faces (data=synthetic)**, "
            "not FER2013.",
            "",
        ]
    if not groups:
        out += ["No run of this sweep logged data.json.", ""]
    header = [
        "Emotion",
        "Train",
        "Val",
        "Test",
        "Total",
        "Study train",
        "Study val",
        "Study test",
        "Study total",
    ]
    right = [False] + [True] * 8
    for counts, names in groups:
        classes = list(dict.fromkeys(c for split in counts.values() for c in split))
        classes.sort(key=lambda c: list(STUDY_TABLE1).index(c) if c in STUDY_TABLE1 else 99)
        body, tot, stot = [], [0, 0, 0], [0, 0, 0]
        for c in classes:
            ours = [int(counts.get(s, {}).get(c, 0)) for s in ("train", "val", "test")]
            study = STUDY_TABLE1.get(c)
            tot = [a + b for a, b in zip(tot, ours, strict=True)]
            if study:
                stot = [a + b for a, b in zip(stot, study, strict=True)]
            body.append(
                [
                    STUDY_CLASS_NAMES.get(c, c),
                    *ours,
                    sum(ours),
                    *(study or ("", "", "")),
                    sum(study) if study else "",
                ]
            )
        body.append(["**Total**", *tot, sum(tot), *stot, sum(stot)])
        if len(groups) > 1:
            out += [f"Runs: {', '.join(names)}", ""]
        out += [markdown_table(header, body, right), ""]
    out += [
        "Ours: the train / validation / test images each run actually used (after "
        "data.limit_per_class and the stratified validation hold-out). Study: its Table 1."
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# The report


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in rec.items()} for rec in records)
    path.write_text(buf.getvalue())


def write_report(
    client: MlflowClient,
    uri: str,
    experiment: str,
    parent: Run,
    out: Path,
    log: bool = True,
    compare: str | None = None,
    more_parents: Sequence[Run] = (),
) -> list[Group]:
    """Write table2.md/.csv, runs.csv, compare.csv (when groups can be compared), table1.md,
    accuracy.png, curves.png to ``out``; log them and the groups' aggregates on the parent run
    (files under report/). ``more_parents``: further sweeps whose jobs join the report (e.g. the
    same rows trained in another precision), which is then logged on the first parent only."""
    from fer_sweep import figures

    exp_id = parent.info.experiment_id
    parent_id = parent.info.run_id
    runs = children(client, exp_id, parent_id)
    for other in more_parents:
        runs += children(client, other.info.experiment_id, other.info.run_id)
    if not runs:
        raise FerSweepError(
            f"parent run {parent_id} has no child job runs (yet); pick another "
            "with --parent RUN_ID."
        )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows, keys = build_rows(client, runs, tmp)
        class_counts = _class_counts(client, [r.run for r in rows], tmp)
    groups, group_keys = build_groups(rows, keys)
    comparisons = compare_groups(groups, group_keys, compare)  # a bad --compare fails first
    out.mkdir(parents=True, exist_ok=True)
    ensembles = children(client, exp_id, parent_id, role="ensemble")
    (out / "table2.md").write_text(
        table2_markdown(groups, group_keys, parent, uri, experiment, ensembles, comparisons)
    )
    _write_csv(out / "table2.csv", table2_records(groups, group_keys))
    _write_csv(out / "runs.csv", run_records(rows, keys))
    if comparisons:
        _write_csv(out / "compare.csv", comparison_records(comparisons))
    (out / "table1.md").write_text(table1_markdown(class_counts, any(r.synthetic for r in rows)))

    syn = " (SYNTHETIC data)" if any(r.synthetic for r in rows) else ""
    accs = [g.stats.get("test_acc") for g in groups]
    figures.accuracy_bars(
        [g.label for g in groups],
        [math.nan if a is None else a.mean for a in accs],
        [g.first.study.acc / 100 if g.first.study else None for g in groups],
        out / "accuracy.png",
        title=f"Test accuracy: ours vs the study{syn}",
        intervals=[(a.low, a.high) if a and a.low is not None else None for a in accs],
    )
    curves = {}
    for r in rows:
        hist = sorted(client.get_metric_history(r.run_id, "val_acc"), key=lambda m: m.step)
        label = r.label if len(groups) == len(rows) else f"{r.label} ({r.run_id[:6]})"
        curves[label] = [100 * m.value for m in hist]
    figures.overlay_curves(
        curves,
        out / "curves.png",
        ylabel="validation accuracy (%)",
        title=f"Validation accuracy per epoch{syn}",
    )
    if log:
        client.log_artifacts(parent_id, str(out), artifact_path="report")
        _log_aggregates(client, parent_id, groups)
    return groups


def _log_aggregates(client: MlflowClient, parent_id: str, groups: Sequence[Group]) -> None:
    """group<i>.<metric>_mean/_std/_ci95_low/_ci95_high and group<i>.n on the parent run, with
    the group's label as the tag fer_sweep.group<i>: the report's numbers, searchable."""
    from fer_sweep import tracking

    metrics: dict[str, float] = {}
    tags = {}
    for i, g in enumerate(groups, 1):
        tags[f"fer_sweep.group{i}"] = g.label[:5000]
        metrics[f"group{i}.n"] = g.n
        for metric, summary in g.stats.items():
            for field_name, value in (
                ("mean", summary.mean),
                ("std", summary.std),
                ("ci95_low", summary.low),
                ("ci95_high", summary.high),
            ):
                if value is not None:
                    metrics[f"group{i}.{metric}_{field_name}"] = value
    tracking.log_metrics(client, parent_id, metrics)
    tracking.set_tags(client, parent_id, tags)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fer_sweep.report",
        description="Rebuild the study's Table 2 (one row per child run of a sweep), Table 1 "
        "(class counts of the splits used) and comparison figures from MLflow; "
        "write them to --out and log them on the sweep's parent run (report/).",
        epilog="Example: python -m fer_sweep experiment=table2 && python -m fer_sweep.report",
    )
    add_store_args(p, "the sweep logged to")
    p.add_argument(
        "--parent",
        metavar="RUN_ID",
        action="append",
        help="the sweep's parent run (default: the latest parent in the experiment); "
        "repeat it to report several sweeps' jobs together (logged on the first)",
    )
    p.add_argument(
        "--out", metavar="DIR", type=Path, help="output folder (default: reports/<parent run id>)"
    )
    p.add_argument(
        "--compare",
        metavar="SETTING",
        help="state the difference of mean test accuracy (Welch 95 %% CI) between "
        "every two groups that differ in this setting, e.g. transforms or "
        "model (default: pairs that differ in exactly one setting)",
    )
    p.add_argument(
        "--no-log",
        action="store_true",
        help="only write the files; do not log them on the parent run",
    )
    return p


def _report(args: argparse.Namespace) -> int:
    client = store.open_existing(args.tracking_uri)
    store.use_store(args.tracking_uri)
    exp_id = store.require_experiment(client, args.experiment)
    parents = [find_parent(client, exp_id, p) for p in args.parent or [None]]
    parent = parents[0]
    out = args.out or Path("reports") / parent.info.run_id
    groups = write_report(
        client,
        args.tracking_uri,
        args.experiment,
        parent,
        out,
        log=not args.no_log,
        compare=args.compare,
        more_parents=parents[1:],
    )
    print((out / "table2.md").read_text())
    where = "" if args.no_log else f"; logged on run {parent.info.run_id} under report/"
    runs = sum(g.n for g in groups)
    print(
        f"{len(groups)} rows ({runs} runs) -> {out}/ (table2.md, table2.csv, runs.csv, "
        f"table1.md, accuracy.png, curves.png){where}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _report, argv)


if __name__ == "__main__":
    sys.exit(main())
