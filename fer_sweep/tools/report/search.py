"""A search's report: every trial (number, state, parameters, best validation accuracy, epochs
trained), the best trial, and Optuna's optimization-history and parameter-importance figures.

Like the rest of the report it reads the store only: the trials are the parent's child runs
(tagged with their trial number and state), the search space is recorded on the parent, and the
figures are drawn from an in-memory study rebuilt from those runs, so a report works where the
study's journal file is not at hand.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fer_sweep.sweep.job import TRIAL_STATE
from fer_sweep.sweep.search import DIRECTION_TAG, SEEDS_TAG, SPACE_TAG, TRIAL_NUMBER, Space
from fer_sweep.tools.report.tables import write_csv

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")


@dataclass
class Trial:
    number: int
    state: str
    params: dict[str, Any]
    best_val_acc: float | None  # with several seeds: the mean of its runs' best (so far)
    epochs: int | None  # all its runs together
    curve: dict[int, float]  # epoch -> validation accuracy (the first seed's run)
    run_id: str  # the first seed's run
    seeds: dict[int, float | None]  # trainer.seed -> that run's best validation accuracy


def is_search(parent: Run) -> bool:
    return SPACE_TAG in parent.data.tags


def _value(raw: str | None, dist: Any) -> Any:
    """A run's param string back to the distribution's type (a choice keeps its own type)."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if raw is None:
        return None
    if isinstance(dist, CategoricalDistribution):
        return next((c for c in dist.choices if str(c) == raw), raw)
    return int(float(raw)) if isinstance(dist, IntDistribution) else float(raw)


def _state(run: Run) -> str:
    if run.info.status in ("FAILED", "KILLED"):
        return "FAIL"
    return run.data.tags.get(TRIAL_STATE, "RUNNING")


def _trial(client: MlflowClient, runs: Sequence[Run], space: dict[str, Any], seeds: int) -> Trial:
    """One trial from its runs (one, or one per seed with hydra.sweeper.seeds_per_trial): pruned
    or failed if one of them was, complete once ``seeds`` runs are."""
    runs = sorted(runs, key=lambda r: (int(r.data.params.get("trainer.seed", 0)), r.info.run_id))
    states = [_state(r) for r in runs]
    state = next((s for s in ("PRUNED", "FAIL", "RUNNING") if s in states), "COMPLETE")
    if state == "COMPLETE" and len(runs) < seeds:
        state = "RUNNING"
    first, per_seed, epochs, curve = runs[0], {}, 0, {}
    for run in runs:
        metrics = run.data.metrics
        history = client.get_metric_history(run.info.run_id, "val_acc")
        steps = {int(m.step): float(m.value) for m in history}
        if run is first:
            curve = steps  # the first seed's: what the pruner saw
        epochs += int(metrics["stopped_epoch"]) if "stopped_epoch" in metrics else len(steps)
        seed = int(run.data.params.get("trainer.seed", 0))
        per_seed[seed] = metrics.get("best_val_acc", max(steps.values(), default=None))
    values = [v for v in per_seed.values() if v is not None]  # so far, for a running trial
    params = first.data.params
    return Trial(
        number=int(first.data.tags[TRIAL_NUMBER]),
        state=state,
        params={k: _value(params.get(k, params.get(f"{k}.name")), d) for k, d in space.items()},
        best_val_acc=statistics.fmean(values) if values else None,
        epochs=epochs,
        curve=curve,
        run_id=first.info.run_id,
        seeds=per_seed,
    )


def trials(
    client: MlflowClient, runs: Sequence[Run], space: dict[str, Any], seeds: int = 1
) -> list[Trial]:
    """The search's trials, by number, from its child runs (``seeds``: runs a trial trains)."""
    by_number: dict[str, list[Run]] = {}
    for run in runs:
        if TRIAL_NUMBER in run.data.tags:
            by_number.setdefault(run.data.tags[TRIAL_NUMBER], []).append(run)
    found = [_trial(client, group, space, seeds) for group in by_number.values()]
    return sorted(found, key=lambda t: t.number)


def best(found: Sequence[Trial]) -> Trial | None:
    done = [t for t in found if t.state == "COMPLETE" and t.best_val_acc is not None]
    return max(done, key=lambda t: t.best_val_acc) if done else None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _per_seed(t: Trial) -> str:
    return ", ".join(f"{seed}: {100 * v:.2f}" for seed, v in t.seeds.items() if v is not None)


def markdown(found: Sequence[Trial], space: dict[str, Any], parent: Run, seeds: int = 1) -> str:
    keys = list(space)
    counts = {s: sum(t.state == s for t in found) for s in STATES}
    top = best(found)
    epochs = sum(t.epochs or 0 for t in found)
    lines = [
        f"# Search {parent.data.tags.get('fer_sweep.study_name', '')} "
        f"(parent run {parent.info.run_id})",
        "",
        f"{len(found)} trials: "
        + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
        + f"; {epochs} epochs trained in all.",
        "",
    ]
    value = "best validation accuracy"
    if seeds > 1:  # hydra.sweeper.seeds_per_trial
        value = f"mean best validation accuracy over {seeds} seeds"
        lines += [f"Each trial trains {seeds} seeds; its value is their mean.", ""]
    if top is not None:
        lines += [
            f"Best trial: #{top.number}, {value} {100 * top.best_val_acc:.2f} % "
            f"(run {top.run_id}): " + ", ".join(f"{k}={_cell(v)}" for k, v in top.params.items()),
            "",
        ]
    extra = " per seed (%) |" if seeds > 1 else ""
    acc_head = "mean best val acc" if seeds > 1 else "best val acc"
    lines.append("| trial | state | " + " | ".join([*keys, acc_head]) + " | epochs |" + extra)
    lines.append("|---:|---|" + "---:|" * len(keys) + "---:|---:|" + ("---|" if extra else ""))
    for t in found:
        acc = "" if t.best_val_acc is None else f"{100 * t.best_val_acc:.2f} %"
        cells = [_cell(t.params.get(k)) for k in keys]
        row = f"| {t.number} | {t.state} | " + " | ".join(cells) + f" | {acc} | {t.epochs} |"
        lines.append(row + (f" {_per_seed(t)} |" if extra else ""))
    return "\n".join(lines) + "\n"


def study(found: Sequence[Trial], space: dict[str, Any], direction: str) -> Any:
    """An in-memory Optuna study holding the trials as they were (for Optuna's figures)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = optuna.create_study(direction=direction)
    for t in found:
        if t.state not in ("COMPLETE", "PRUNED") or any(v is None for v in t.params.values()):
            continue
        out.add_trial(
            create_trial(
                state=TrialState[t.state],
                value=t.best_val_acc if t.state == "COMPLETE" else None,
                params=t.params,
                distributions=space,
                intermediate_values=t.curve,
            )
        )
    return out


def figures(found: Sequence[Trial], space: dict[str, Any], direction: str, out: Path) -> list[str]:
    """optimization_history.png and, with at least two finished trials that differ,
    param_importances.png (PED-ANOVA: no extra dependency); the files written."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    written = []
    s = study(found, space, direction)
    complete = [t for t in s.trials if t.value is not None]
    if not complete:
        return written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        ax = vis.plot_optimization_history(s)
        ax.figure.savefig(out / "optimization_history.png", dpi=120, bbox_inches="tight")
        written.append("optimization_history.png")
        if len(complete) >= 2 and len({t.value for t in complete}) > 1:
            try:
                ax = vis.plot_param_importances(s, evaluator=PedAnovaImportanceEvaluator())
            except (RuntimeError, ValueError):  # too few trials for an importance
                ax = None
            if ax is not None:
                ax.figure.savefig(out / "param_importances.png", dpi=120, bbox_inches="tight")
                written.append("param_importances.png")
    import matplotlib.pyplot as plt

    plt.close("all")
    return written


def write_search(client: MlflowClient, parent: Run, runs: Sequence[Run], out: Path) -> list[str]:
    """trials.md, trials.csv and the figures in ``out``; the files written."""
    space = Space.from_json(parent.data.tags[SPACE_TAG])
    seeds = int(parent.data.tags.get(SEEDS_TAG, "1"))
    found = trials(client, runs, space, seeds)
    if not found:
        return []
    direction = parent.data.tags.get(DIRECTION_TAG, "maximize")
    (out / "trials.md").write_text(markdown(found, space, parent, seeds))
    write_csv(
        out / "trials.csv",
        [
            {
                "trial": t.number,
                "state": t.state,
                **t.params,
                "best_val_acc": None if t.best_val_acc is None else round(t.best_val_acc, 6),
                "epochs": t.epochs,
                "seeds": " ".join(f"{k}:{v:.6f}" for k, v in t.seeds.items() if v is not None),
                "run_id": t.run_id,
                "is_best": t is best(found),
            }
            for t in found
        ],
    )
    return ["trials.md", "trials.csv", *figures(found, space, direction, out)]
