"""The measurement scripts' own small pieces (scripts/ is not a package: loaded by path)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.conftest import REPO


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pruning_benchmark_prints_a_dash_for_a_best_trial_without_test_accuracy() -> None:
    bench = _script("pruning_benchmark")
    summary = {"trials": 6, "states": "{}", "epochs_trained": 40, "best_val_acc": 0.51}
    pruned = bench.table_row("asha", "asha", {**summary, "best_test_acc": None})
    assert pruned.endswith("| 51.00 % | — |") and "0.00 %" not in pruned
    done = bench.table_row("unpruned", "none", {**summary, "best_test_acc": 0.5})
    assert done.endswith("| 51.00 % | 50.00 % |")
