"""``python -m fer_sweep.ensemble``: average the test-set softmax outputs of a sweep's best runs
and log the result as an MLflow run of its own.

Members are chosen by a validation metric only (best_val_acc by default): choosing them by test
accuracy would tune on the test set and overstate the ensemble. Every job saves its test-split
probabilities (predictions.npz: test_probs (N, 7), test_y (N,)), so no model is re-run here;
the members must have been evaluated on the very same test images, which is checked.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fer_sweep.core import figures
from fer_sweep.errors import FerSweepError
from fer_sweep.sweep import store, tracking
from fer_sweep.tools.cli import add_store_args, run_command
from fer_sweep.tools.report.runs import ROLE, download, find_parent
from fer_sweep.tools.report.study import STUDY_ENSEMBLE_ACC
from fer_sweep.tools.report.tables import markdown_table

PREDICTIONS = "predictions.npz"
# The only metrics members may be ranked by: each is measured on the validation split (the
# last epoch's, the best epoch's, with TTA, of the un-averaged weights), higher is better.
# Every other logged metric (test_*, macro_f1, n_params, ...) is refused by name.
RANKABLE = ("best_val_acc", "val_acc", "val_acc_tta", "val_acc_raw")
EPS = 1e-12


@dataclass
class Member:
    run: Run
    score: float
    probs: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...] | None

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run_id[:8]

    @property
    def test_acc(self) -> float:
        return float((self.probs.argmax(1) == self.y).mean())


def candidates(client: MlflowClient, exp_id: str, parent_id: str | None, by: str) -> list[Run]:
    """FINISHED job runs (of the parent, or of the whole experiment) that logged ``by``,
    best first (ties: the earlier run)."""
    query = f"tags.`{ROLE}` = 'job' and attributes.status = 'FINISHED'"
    if parent_id:
        query += f" and tags.mlflow.parentRunId = '{parent_id}'"
    runs = client.search_runs(
        [exp_id], query, order_by=["attributes.start_time ASC"], max_results=50000
    )
    runs = [r for r in runs if by in r.data.metrics and math.isfinite(r.data.metrics[by])]
    return sorted(runs, key=lambda r: -r.data.metrics[by])


def load_members(
    client: MlflowClient, runs: Sequence[Run], by: str, k: int, tmp: Path
) -> tuple[list[Member], list[str]]:
    """The first ``k`` runs that have predictions.npz; the names of those skipped without it."""
    members: list[Member] = []
    skipped: list[str] = []
    for run in runs:
        if len(members) == k:
            break
        path = download(client, run.info.run_id, PREDICTIONS, tmp / run.info.run_id)
        if path is None:
            skipped.append(run.info.run_name or run.info.run_id)
            continue
        with np.load(path, allow_pickle=False) as npz:
            probs = np.asarray(npz["test_probs"], dtype=np.float64)
            y = np.asarray(npz["test_y"], dtype=np.int64)
            classes = tuple(str(c) for c in npz["classes"]) if "classes" in npz else None
        members.append(Member(run, float(run.data.metrics[by]), probs, y, classes))
    return members, skipped


def check_compatible(members: Sequence[Member]) -> None:
    """Averaging is only meaningful over the same test images, in the same order and classes."""
    first = members[0]
    for m in members[1:]:
        problem = None
        if m.probs.shape != first.probs.shape or m.y.shape != first.y.shape:
            problem = (
                f"{first.name} has {first.probs.shape[0]} test predictions x "
                f"{first.probs.shape[1]} classes, {m.name} has {m.probs.shape[0]} x "
                f"{m.probs.shape[1]}"
            )
        elif not np.array_equal(m.y, first.y):
            problem = (
                f"their test labels differ at {int((m.y != first.y).sum())} of "
                f"{m.y.size} positions ({first.name} vs {m.name})"
            )
        elif first.classes and m.classes and first.classes != m.classes:
            problem = f"their class orders differ ({first.classes} vs {m.classes})"
        if problem:
            raise FerSweepError(
                f"the chosen runs were not evaluated on the same test set: {problem}. Ensemble "
                "runs trained with the same data settings (data=..., data.limit_per_class=...): "
                "pick one sweep with --parent RUN_ID."
            )


def ensemble_metrics(probs: np.ndarray, y: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Accuracy, NLL of the averaged probabilities, macro F1 and per-class accuracy."""
    pred = probs.argmax(1)
    p_true = np.clip(probs[np.arange(y.size), y], EPS, 1.0)
    out = {
        "test_acc": float((pred == y).mean()),
        "test_loss": float(-np.log(p_true).mean()),
        "macro_f1": figures.macro_f1(y, pred, len(classes)),
    }
    for name, acc in zip(classes, figures.per_class_accuracy(y, pred, len(classes)), strict=True):
        out[f"test_acc_{name}"] = acc
    return out


def log_ensemble(
    client: MlflowClient,
    exp_id: str,
    parent_id: str | None,
    members: Sequence[Member],
    by: str,
    k: int,
    probs: np.ndarray,
    metrics: dict[str, float],
    classes: Sequence[str],
) -> str:
    """The ensemble as its own FINISHED run (under the parent when given).

    Kept whole on purpose: the run is created, filled and closed in one place, so no path
    leaves it RUNNING."""
    synthetic = any(m.run.data.tags.get("synthetic") == "true" for m in members)
    ids = [m.run_id for m in members]
    name = f"ensemble-top{len(members)}-{by}"
    tags = {
        ROLE: "ensemble",
        "fer_sweep.members": ",".join(ids),
        "data": members[0].run.data.tags.get("data", ""),
        "model": "ensemble(" + ",".join(m.run.data.tags.get("model", "?") for m in members) + ")",
    }
    run_id = tracking.create_run(
        client,
        exp_id,
        name,
        tags,
        parent_id=parent_id,
        synthetic=synthetic,
        what="An ensemble of runs",
    )
    try:
        tracking.log_params(
            client,
            run_id,
            {
                "ensemble.top_k": str(k),
                "ensemble.by": by,
                "ensemble.n_members": str(len(ids)),
                "ensemble.members": ",".join(ids),
                "ensemble.parent": parent_id or "",
                "ensemble.combine": "mean of softmax probabilities",
            },
        )
        member_acc = [m.test_acc for m in members]
        tracking.log_metrics(
            client,
            run_id,
            {
                **metrics,
                "n_members": len(members),
                "best_member_test_acc": max(member_acc),
                "mean_member_test_acc": float(np.mean(member_acc)),
                "gain_over_best_member": metrics["test_acc"] - max(member_acc),
            },
        )
        listing = [
            {
                "run_id": m.run_id,
                "run_name": m.name,
                "model": m.run.data.tags.get("model"),
                "transforms": m.run.data.tags.get("transforms"),
                by: m.score,
                "test_acc": m.test_acc,
            }
            for m in members
        ]
        with tempfile.TemporaryDirectory() as tmp_name:
            out = Path(tmp_name)
            (out / "members.json").write_text(json.dumps(listing, indent=2))
            np.savez_compressed(
                out / PREDICTIONS,
                test_probs=probs.astype(np.float32),
                test_y=members[0].y,
                classes=np.array(list(classes)),
            )
            pred = probs.argmax(1)
            figures.confusion_matrix(
                members[0].y,
                pred,
                classes,
                out / "confusion_matrix.png",
                title=f"{name}: test accuracy {metrics['test_acc']:.1%}",
            )
            client.log_artifacts(run_id, str(out))
        tracking.retry(client.set_terminated, run_id, status="FINISHED")
    except BaseException as err:
        tracking.record_failure(client, run_id, err)
        raise
    return run_id


def result_table(members: Sequence[Member], by: str, metrics: dict[str, float]) -> str:
    body = [
        [i, m.name, m.run_id[:8], f"{m.score:.4f}", f"{100 * m.test_acc:.1f}%"]
        for i, m in enumerate(members, 1)
    ]
    body.append(
        [
            "",
            f"**ensemble (mean of {len(members)} softmaxes)**",
            "",
            "",
            f"**{100 * metrics['test_acc']:.1f}%**",
        ]
    )
    return markdown_table(
        ["#", "Run", "Id", by, "Test acc."], body, [True, False, False, True, True]
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fer_sweep.ensemble",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Ensemble the top-k runs of a sweep: average their test-set softmax outputs\n"
            "(each job's predictions.npz), score the average (test_acc, test_loss = NLL,\n"
            "macro_f1) and log it as its own MLflow run (tag fer_sweep.role=ensemble,\n"
            "members in a tag, a param and members.json).\n\n"
            f"The reference study quotes an ensemble at {STUDY_ENSEMBLE_ACC}% on FER2013 (its\n"
            "Table 3, from other authors' networks). This is how you get one from your own\n"
            "sweep, e.g.:\n"
            "  python -m fer_sweep experiment=table2\n"
            "  python -m fer_sweep.ensemble --latest --top-k 3\n"
            "Members are ranked by a VALIDATION metric, never a test metric, so the ensemble's\n"
            "test accuracy stays an honest estimate."
        ),
    )
    add_store_args(p, "the sweep logged to")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--parent",
        metavar="RUN_ID",
        help="choose among this sweep's runs, and log the ensemble under it "
        "(default: all runs of the experiment)",
    )
    src.add_argument(
        "--latest",
        action="store_true",
        help="choose among the runs of the experiment's latest sweep",
    )
    p.add_argument(
        "--top-k", type=int, default=3, metavar="K", help="number of members (default: %(default)s)"
    )
    p.add_argument(
        "--by",
        default="best_val_acc",
        metavar="METRIC",
        help=f"validation accuracy to rank runs by: {', '.join(RANKABLE)} (default: %(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _ensemble, argv)


def _ensemble(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise FerSweepError(f"--top-k {args.top_k}: need at least one member (e.g. 3).")
    if args.by not in RANKABLE:
        why = (
            "it is computed on the test set, and choosing members by it would make the "
            "ensemble's test accuracy meaningless"
            if args.by not in ("val_loss", "val_loss_raw")
            else "a loss is lower-is-better"
        )
        raise FerSweepError(
            f"--by {args.by}: members are ranked only by a validation accuracy ({why}); "
            f"use one of {', '.join(RANKABLE)}."
        )
    client = store.open_existing(args.tracking_uri)
    store.use_store(args.tracking_uri)
    exp_id = store.require_experiment(client, args.experiment)
    parent_id = None
    if args.parent or args.latest:
        parent_id = find_parent(client, exp_id, args.parent).info.run_id
    runs = candidates(client, exp_id, parent_id, args.by)
    where = f"sweep {parent_id}" if parent_id else f"experiment {args.experiment!r}"
    if not runs:
        raise FerSweepError(
            f"no FINISHED job run in {where} has the metric {args.by!r}; "
            "check --by, --parent and --experiment."
        )
    with tempfile.TemporaryDirectory() as tmp:
        members, skipped = load_members(client, runs, args.by, args.top_k, Path(tmp))
    if skipped:
        print(
            f"fer_sweep: skipped {len(skipped)} run(s) without {PREDICTIONS}: {', '.join(skipped)}",
            file=sys.stderr,
        )
    if not members:
        raise FerSweepError(
            f"none of the {len(runs)} runs in {where} logged {PREDICTIONS} "
            "(written by every job since it was added); retrain them."
        )
    if len(members) < args.top_k:
        print(
            f"fer_sweep: only {len(members)} run(s) available in {where}; the ensemble "
            f"has {len(members)} member(s), not {args.top_k}.",
            file=sys.stderr,
        )
    check_compatible(members)
    classes = members[0].classes or tuple(str(i) for i in range(members[0].probs.shape[1]))
    probs = np.mean([m.probs for m in members], axis=0)
    metrics = ensemble_metrics(probs, members[0].y, classes)
    run_id = log_ensemble(
        client, exp_id, parent_id, members, args.by, args.top_k, probs, metrics, classes
    )
    print(result_table(members, args.by, metrics))
    print(
        f"\nensemble test_acc {metrics['test_acc']:.4f}  test_loss (NLL) "
        f"{metrics['test_loss']:.4f}  macro_f1 {metrics['macro_f1']:.4f}  "
        f"(the study's quoted ensemble: {STUDY_ENSEMBLE_ACC}%)"
    )
    print(f"logged as MLflow run {run_id}" + (f" under {parent_id}" if parent_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
