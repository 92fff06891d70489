"""Shared fixtures: real data when FER2013_ROOT is set, else the synthetic dataset; every cache
and MLflow store in a temporary folder (../shared is read-only in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# What every finished job logs beside its metrics (job.log_results).
JOB_ARTIFACTS = {
    "config.yaml",
    "model_summary.txt",
    "curves.png",
    "confusion_matrix.png",
    "predictions.npz",
}

# One decoded-data cache for the whole session (subprocesses inherit it).
os.environ.setdefault("FER_SWEEP_CACHE", tempfile.mkdtemp(prefix="fer_sweep_cache_"))
os.environ.setdefault("MPLBACKEND", "Agg")


def real_data() -> bool:
    root = os.environ.get("FER2013_ROOT")
    return bool(root) and (Path(root) / "train").is_dir()


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic FER2013 (12 training, 4 test faces per class) for in-process tests."""
    from fer_sweep.core.synthetic import make_synthetic

    return make_synthetic(
        tmp_path_factory.mktemp("faces"), n_train_per_class=12, n_test_per_class=4
    )


@pytest.fixture
def data_overrides() -> list[str]:
    """Real FER2013 when FER2013_ROOT points at it, else data=synthetic."""
    return [] if real_data() else ["data=synthetic"]


def run_cli(
    args: list[str],
    cwd: Path,
    timeout: float = 900,
    module: str = "fer_sweep",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> args`` the way a user does, in ``cwd``; MLflow's variables only
    when the test passes them (a developer's own, or one an in-process test set, would send
    the runs elsewhere)."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLFLOW_TRACKING_") and k != "MLFLOW_EXPERIMENT_NAME"
    }
    full_env = {**inherited, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
