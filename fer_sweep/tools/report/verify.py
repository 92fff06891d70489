"""``python -m fer_sweep.report --verify DIR``: check exported bundles (``--export``) from
their files alone: no MLflow store, no model, nothing trained.

What a bundle must show, and how it is checked:

- **the test accuracy**: recomputed from predictions.csv (one line per test image) equals the
  logged ``test_acc``; the number of lines equals the run's test split (``data.n_test``);
- **the predictions are the test images**: each path lies in its true class's folder; with
  ``--data-root``, each is a file there and (for a run on the whole split) they are every test
  image of the data root, each once;
- **the training ran whole**: history.csv has epochs 1..N exactly once each, N = the epochs the
  config asked for (or where the run's logged stop reason stopped it), and the best epoch and
  best validation accuracy are those of the history;
- **the schedule survived every resume**: with ``scheduler=plateau``, torch's own
  ReduceLROnPlateau is replayed on the logged validation losses, from the config's learning
  rate, and must give the learning rate of every epoch. A scheduler restarted at a resume
  (its patience count or its cuts forgotten) gives a different rate, at a named epoch.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fer_sweep.core.sources import image_paths
from fer_sweep.errors import FerSweepError
from fer_sweep.tools.report import bundles


@dataclass
class Verdict:
    """One bundle's checks: what held (``passed``) and what did not (``failed``)."""

    name: str
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def check(self, ok: bool, good: str, bad: str) -> bool:
        (self.passed if ok else self.failed).append(good if ok else bad)
        return ok

    def line(self) -> str:
        status = "ok  " if not self.failed else "FAIL"
        return f"{status}  {self.name}: " + "; ".join(self.failed or self.passed)


def replay_plateau(
    val_losses: Sequence[float], lr: float, factor: float, patience: int, min_lr: float
) -> list[float]:
    """The learning rate of each epoch that ReduceLROnPlateau (as training builds it: mode
    min, stepped once per epoch on the validation loss) gives for these validation losses."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=factor, patience=patience, min_lr=min_lr
    )
    rates = []
    for loss in val_losses:
        rates.append(opt.param_groups[0]["lr"])
        sched.step(math.copysign(math.inf, loss) if abs(loss) >= sys.float_info.max else loss)
    return rates


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


def _check_predictions(
    v: Verdict, config: dict, info: dict, rows: list[dict[str, str]], root: Path | None
) -> None:
    n = len(rows)
    correct = sum(r["true"] == r["predicted"] for r in rows)
    logged = info.get("test_acc")
    v.check(
        logged is not None and n > 0 and _close(correct / n, logged),
        f"test_acc {correct / max(n, 1):.2%} = {correct}/{n} predictions",
        f"the predictions give {correct}/{n} = {correct / max(n, 1):.4%}, the run logged "
        f"test_acc {logged}",
    )
    expected = info.get("params", {}).get("data.n_test")
    if expected is not None:
        v.check(
            int(expected) == n,
            f"{n} lines = data.n_test",
            f"{n} prediction lines, but the run's test split had {expected} images",
        )
    paths = [r["path"] for r in rows]
    if not all(p.startswith("test/") for p in paths):  # "<csv>:<line>" (or "#i": no names)
        v.passed.append("paths not checked (not the image-folder layout's test/<class>/ names)")
        return
    astray = [p for p, r in zip(paths, rows, strict=True) if p.split("/")[1].lower() != r["true"]]
    v.check(
        not astray and len(set(paths)) == n,
        "each path in its true class's folder, once",
        f"{len(astray)} paths outside their true class's folder"
        + (f" (first: {astray[0]})" if astray else "")
        + f", {n - len(set(paths))} paths repeated",
    )
    if root is None:
        return
    absent = [p for p in paths if not (root / p).is_file()]
    v.check(
        not absent,
        f"every path a file under {root}",
        f"{len(absent)} paths are not files under {root} (first: {absent[0] if absent else ''})",
    )
    data = config.get("data") or {}
    if data.get("limit_per_class") is not None or data.get("skip_bad_images"):
        v.passed.append("not every test image expected (data.limit_per_class/skip_bad_images)")
        return
    images = _test_images(root)
    left = images - set(paths)
    v.check(
        not left,
        f"all {len(images)} test images of the data root",
        f"{len(left)} test images of {root} have no prediction"
        + (f" (first: {sorted(left)[0]})" if left else ""),
    )


@functools.cache
def _test_images(root: Path) -> frozenset[str]:
    """The data root's test images, listed once for all the bundles checked against it."""
    return frozenset(image_paths(root, "test"))


def _check_history(v: Verdict, config: dict, info: dict, rows: list[dict[str, str]]) -> None:
    epochs = [int(r["epoch"]) for r in rows]
    n = len(epochs)
    metrics = info.get("metrics", {})
    trainer = config.get("trainer") or {}
    reason = (info.get("tags") or {}).get("fer_sweep.stop_reason", "epochs")
    asked = trainer.get("epochs")
    # a time budget plans its own count (<= trainer.epochs), which config.yaml does not hold
    planned = trainer.get("time_budget_min") is None and reason == "epochs"
    whole = n == metrics.get("stopped_epoch") and (n == asked if planned else n <= asked)
    once = epochs == list(range(1, n + 1)) and (info.get("epochs_logged") or {}).get(
        "exactly_once", False
    )
    v.check(
        once and whole,
        f"epochs 1..{n} once each"
        + ("" if reason == "epochs" else f" (stopped: {reason})")
        + f", {info.get('resumes', 0)} resumes",
        f"history has epochs {_span(epochs)} (logged once each: {once}); the config asked "
        f"for {asked}, the run stopped for '{reason}' after {metrics.get('stopped_epoch')}",
    )
    if not n:
        return
    # a resume marks the first epoch it trains; one after the last epoch (killed during the
    # final evaluation) trains none, so the marks may end below the run's count, never above
    marks = [int(r["resumes"]) for r in rows]
    v.check(
        marks == sorted(marks) and marks[-1] <= info.get("resumes", 0),
        "resumes marked",
        f"the history's resume marks {_span(marks)} do not rise to at most the run's "
        f"{info.get('resumes')} resumes",
    )
    device = (info.get("tags") or {}).get("device", "cpu")
    if info.get("resumes", 0) and device != "cpu" and not trainer.get("deterministic"):
        # epochs trained again after the last checkpoint keep the first try's logged values,
        # which a non-deterministic GPU need not have reproduced
        v.passed.append(
            f"best epoch and lr not replayed: resumed on {device} without "
            "trainer.deterministic (retrained epochs keep their first try's log)"
        )
        return
    val_acc = [float(r["val_acc"]) for r in rows]
    best = max(range(n), key=lambda i: (val_acc[i], -i))
    v.check(
        metrics.get("best_epoch") == best + 1
        and _close(metrics.get("best_val_acc", -1), val_acc[best]),
        f"best epoch {best + 1} ({val_acc[best]:.2%})",
        f"the history's best epoch is {best + 1} ({val_acc[best]:.4%}), the run logged "
        f"{metrics.get('best_epoch')} ({metrics.get('best_val_acc')})",
    )
    _check_rates(v, config, rows)


def _check_rates(v: Verdict, config: dict, rows: list[dict[str, str]]) -> None:
    sc, opt = config.get("scheduler") or {}, config.get("optimizer") or {}
    rates = [float(r["lr"]) for r in rows]
    if sc.get("name") == "plateau":
        want = replay_plateau(
            [float(r["val_loss"]) for r in rows],
            float(opt["lr"]),
            float(sc["factor"]),
            int(sc["patience"]),
            float(sc["min_lr"]),
        )
        off = [i for i, (a, b) in enumerate(zip(rates, want, strict=True)) if not _close(a, b)]
        cuts = sum(not _close(a, b) for a, b in itertools.pairwise(rates))
        first = off[0] if off else 0
        v.check(
            not off,
            f"lr = ReduceLROnPlateau replayed on the val losses ({rates[0]:g} -> "
            f"{rates[-1]:g}, {cuts} cuts)",
            f"epoch {first + 1} trained with lr {rates[first]:g}, ReduceLROnPlateau on the "
            f"logged val losses gives {want[first]:g}",
        )
    elif sc.get("name") == "none":
        v.check(
            all(_close(r, float(opt["lr"])) for r in rates),
            f"lr {opt['lr']} throughout",
            f"scheduler=none, yet the lr moved from {opt['lr']}",
        )
    else:
        v.passed.append(f"lr not replayed (scheduler={sc.get('name')})")


def _span(values: Sequence[int]) -> str:
    return f"{values[0]}..{values[-1]} ({len(values)} lines)" if values else "none"


def verify_bundle(folder: Path, root: Path | None = None) -> Verdict:
    """Every check above on one bundle folder."""
    v = Verdict(folder.name)
    try:
        config, history, info, predictions = bundles.read(folder)
    except FerSweepError as err:
        v.failed.append(str(err))
        return v
    try:
        _check_history(v, config, info, history)
        _check_predictions(v, config, info, predictions, root)
    except (KeyError, ValueError, TypeError, IndexError) as err:  # a field missing or mangled
        v.failed.append(f"a file lacks or garbles a field the checks need ({err!r})")
    return v


def verify(top: Path, root: Path | None = None) -> int:
    """Print one line per bundle; 0 if every check of every bundle holds, else 1."""
    if root is not None and not ((root / "test").is_dir() and (root / "train").is_dir()):
        raise FerSweepError(
            f"--data-root {root} has no train/ and test/ class folders; give FER2013's root."
        )
    _test_images.cache_clear()  # the data root as it is now
    verdicts = [verify_bundle(folder, root) for folder in bundles.find(top)]
    for v in verdicts:
        print(v.line())
    bad = sum(bool(v.failed) for v in verdicts)
    print(f"{len(verdicts) - bad} of {len(verdicts)} bundles pass every check")
    return 1 if bad else 0
