"""Rows and groups from MLflow: a sweep's parent and child runs, each run's config and numbers
as a ``Row``, runs that differ only in their seed grouped (mean, sd, 95 % CI), and the
differences between groups (Welch, or a pooled sd where a side has one run)."""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fer_sweep.errors import FerSweepError
from fer_sweep.sweep.identity import VOLATILE
from fer_sweep.sweep.store import newest_runs
from fer_sweep.tools.replicates import (
    SEED_KEYS,
    Difference,
    PooledSd,
    Summary,
    difference,
    summarize,
)
from fer_sweep.tools.replicates import group as replicate_groups
from fer_sweep.tools.report.study import (
    STUDY_BY_MODEL,
    StudyRow,
    describe_network,
    describe_transforms,
)

ROLE = "fer_sweep.role"


# Params that differ between runs without being a setting of the experiment: those left out of
# a run's identity, and what a run measured or resolved at its start (its data's sizes, device,
# precision, a time budget's plan and speeds).
_MEASURED = re.compile(
    r"^(mlflow\.|sweep\.|budget\.|data\.(n_|mean_used|std_used|converted)|"
    r"trainer\.(device|device_used|precision|epochs_planned)$)"
)


def not_swept(key: str) -> bool:
    return key in VOLATILE or bool(_MEASURED.match(key))


_GROUPS = ("model", "transforms", "optimizer", "scheduler", "data")


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


def run_config(client: MlflowClient | None, run: Run, tmp: Path) -> dict[str, Any]:
    """The job's resolved config: its config.yaml artifact, else its params."""
    path = None
    if client is not None:
        path = download(client, run.info.run_id, "config.yaml", tmp / run.info.run_id)
    if path is not None:
        loaded = yaml.safe_load(path.read_text())
        if isinstance(loaded, dict):
            return loaded
    return unflatten(run.data.params)


def swept_keys(params: Sequence[Mapping[str, str]]) -> list[str]:
    """The settings that differ between runs: the columns that tell the rows apart.

    A config group whose option differs (model=cnn2,cnn3) is one column named after the group,
    instead of one per key the options happen to set; a key inside a group stays a column only
    where it differs between runs of the same option (model.dropout=0.1,0.5).
    """
    keys = sorted({k for p in params for k in p})
    differing = [k for k in keys if not not_swept(k) and len(_values(params, k)) > 1]
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


def _values(params: Sequence[Mapping[str, str]], key: str) -> set[str | None]:
    """A setting's values over the runs; where every run that logged it has one value, the
    runs without it (begun before fer_sweep had the setting, whose default keeps the old
    behaviour) are not told apart by it: one value."""
    values = {p.get(key) for p in params}
    return values - {None} if len(values - {None}) == 1 else values


def superseded(runs: Sequence[Run]) -> list[tuple[Run, Run]]:
    """(run, its replacement) for each run that did not finish and was trained again: a FINISHED
    run with the same settings and seeds (sweep.resume starts a job again when its run was
    stopped before its first checkpoint). Such a run is no replicate of its replacement."""
    finished = [r for r in runs if r.info.status == "FINISHED"]
    out = []
    for run in runs:
        if run.info.status == "FINISHED":
            continue
        mine = {k: v for k, v in run.data.params.items() if not not_swept(k)}
        for done in finished:
            theirs = done.data.params
            if all(theirs.get(k, v) == v for k, v in mine.items()) and mine.keys() & theirs.keys():
                out.append((run, done))
                break
    return out


def swept_value(run: Run, key: str) -> str:
    params = run.data.params
    return params.get(f"{key}.name", "") if key in _GROUPS else params.get(key, "")


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

    @property
    def resumes(self) -> int:
        """How many times the run was continued from its checkpoint."""
        return as_int(self.run.data.tags.get("fer_sweep.resumes")) or 0

    @property
    def images_per_s(self) -> float | None:
        """Training images x epochs per second of the run's training time (validation,
        checkpoints and logging included: the pace a user waits for, not the bench's)."""
        n = as_int(self.run.data.params.get("data.n_train"))
        epochs = as_int(self.metrics.get("stopped_epoch"))
        return n * epochs / self.wall_seconds if n and epochs and self.wall_seconds else None


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


def as_int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def build_rows(
    client: MlflowClient | None,
    runs: Sequence[Run],
    tmp: Path,
    configs: Mapping[str, dict[str, Any]] | None = None,
) -> tuple[list[Row], list[str]]:
    """Rows in the study's order (study rows first, by model), then the others as launched.
    ``configs``: resolved configs by run id where they are known already (bundles' runs, which
    are in no store)."""
    keys = swept_keys([r.data.params for r in runs])
    rows: list[Row] = []
    for run in runs:
        known = (configs or {}).get(run.info.run_id)
        cfg = known if known is not None else run_config(client, run, tmp)
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
                epochs=as_int(
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
    groups: Sequence[Group],
    keys: Sequence[str],
    key: str | None = None,
    sd: PooledSd | None = None,
) -> list[Comparison]:
    """Differences of mean test accuracy between pairs of groups that differ in exactly one
    setting: ``key`` when given; without it, only when the sweep varies exactly one setting
    besides the seeds and some spread is known (replicates, e.g. transforms=norm,aug
    trainer.seed=0,1,2, or ``sd``, which also gives a single run's side an interval)."""
    if key is not None and key not in keys:
        raise FerSweepError(
            f"--compare {key}: this sweep does not vary {key}; it varies "
            f"{', '.join(keys) or 'nothing besides the seeds'}."
        )
    if key is None and (len(keys) != 1 or (sd is None and all(g.n < 2 for g in groups))):
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
            diff = difference(a.stats["test_acc"], b.stats["test_acc"], sd)
            out.append(Comparison(a, b, differ[0], tuple(f"{k} (unlogged)" for k in unknown), diff))
    return out
