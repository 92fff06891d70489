"""Shared fixtures: real data when FER2013_ROOT is set, else the synthetic dataset; every cache
and MLflow store in a temporary folder (../shared is read-only in CI)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.forkserver import Client, Forked

REPO = Path(__file__).resolve().parent.parent

# What every finished job logs beside its metrics (job.log_results).
JOB_ARTIFACTS = {
    "config.yaml",
    "model_summary.txt",
    "curves.png",
    "confusion_matrix.png",
    "predictions.npz",
}

# One decoded-data cache for the whole session (subprocesses inherit it), removed at its end
# by the process that made it (xdist's workers inherit the variable and leave it alone).
if "FER_SWEEP_CACHE" not in os.environ:
    os.environ["FER_SWEEP_CACHE"] = tempfile.mkdtemp(prefix="fer_sweep_cache_")
    atexit.register(shutil.rmtree, os.environ["FER_SWEEP_CACHE"], True)
os.environ.setdefault("MPLBACKEND", "Agg")


_TEMPLATE: dict[str, Path] = {}


def migrated_store(db: Path) -> str:
    """The URI of a sqlite MLflow store at ``db`` whose schema is already in place: a copy of
    one store migrated once per test process. MLflow's ~2.5 s of migrations for a new store are
    paid once, not by every test whose subject is not the store's creation; those that are
    (test_conventions, the parallel writers in test_reliability) still start from nothing."""
    if "db" not in _TEMPLATE:
        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="mlflow_template_")) / "template.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()
        _TEMPLATE["db"] = template
    shutil.copyfile(_TEMPLATE["db"], db)
    return f"sqlite:///{db}"


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker trains in-process with its share of the cores: with torch's default
    (a thread per core) in every worker, OpenMP threads outnumber the cores and a small
    training step waits for descheduled siblings (test_fast_recipe's in-process fits ran 3-6x
    slower beside each other). CLI runs, in processes of their own, keep the default."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# CI's switch (set by .ci/run): a skipped test fails, unless it is marked may_skip (hardware
# that no CI machine has, such as a GPU). A developer's plain run still skips, with its reason.
STRICT_SKIPS = os.environ.get("FER_SWEEP_STRICT_SKIPS", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if STRICT_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        if item.get_closest_marker("may_skip") is None:
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else ""
            report.outcome = "failed"
            report.longrepr = (
                f"skipped where FER_SWEEP_STRICT_SKIPS is set (CI must run it): {reason}"
            )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A whole module skipped at import (importorskip) counts as a skip too."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if STRICT_SKIPS and report.skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"a module skipped where FER_SWEEP_STRICT_SKIPS is set: {reason}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end (slow) tests first, each file's in its own order: parallel workers then
    start the long ones early and fill the end with the short ones."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


def tiny_run(
    limit_per_class: int,
    epochs: int | None = 1,
    figures: bool = False,
    synthetic: bool = False,
) -> list[str]:
    """The overrides of a quiet tiny run: a few images per class, no progress bar, no logged
    model, no figures unless asked (``epochs=None`` keeps the config's own)."""
    out = ["data=synthetic"] if synthetic else []
    out.append(f"data.limit_per_class={limit_per_class}")
    if epochs is not None:
        out.append(f"trainer.epochs={epochs}")
    out += ["trainer.progress=false", "mlflow.log_model=false"]
    if not figures:
        out.append("mlflow.figures=false")
    return out


def runs_with_models(cwd: Path, seeds: int = 1) -> str:
    """A new store in ``cwd`` with ``seeds`` tiny finished runs (one epoch, 20 images a class)
    that logged their model, for the tools that use one; the store's URI."""
    uri = migrated_store(cwd / "m.db")
    args = [a for a in tiny_run(20, epochs=1, synthetic=not real_data()) if "log_model" not in a]
    sweep = ["-m", f"trainer.seed={','.join(map(str, range(seeds)))}"] if seeds > 1 else []
    proc = run_cli([*sweep, *args, "mlflow.log_model=true", f"mlflow.tracking_uri={uri}"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return uri


def one_error_line(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert a CLI stopped as fer_sweep stops on bad input: exit 2, no traceback, exactly one
    `fer_sweep: error:` line, which holds every needle; returns that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fer_sweep: error:")]
    assert len(lines) == 1, out[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _cli_env(env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a CLI subprocess: MLflow's variables only when the test passes them (a
    developer's own, or one an in-process test set, would send the runs elsewhere)."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLFLOW_TRACKING_") and k != "MLFLOW_EXPERIMENT_NAME"
    }
    return {**inherited, "HYDRA_FULL_ERROR": "0", **(env or {})}


# One warm interpreter per test process, started on the first CLI run.
_FORK = Client(str(REPO), _cli_env(None))


def run_cli(
    args: list[str],
    cwd: Path,
    timeout: float = 900,
    module: str = "fer_sweep",
    env: dict[str, str] | None = None,
    client: Client | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> args`` the way a user does, in ``cwd`` (forked from a warm
    interpreter where that is the same thing: tests/forkserver.py; ``client``: another server
    than this process's shared one)."""
    full_env = _cli_env(env)
    proc = (client or _FORK).spawn(
        module, args, str(cwd), full_env, merge_stderr=False, new_session=False
    )
    if proc is None:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_cli(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    new_session: bool = False,
    client: Client | None = None,
) -> subprocess.Popen[str] | Forked:
    """``python -m fer_sweep args`` in the background, as run_cli runs it (stdout and stderr
    together); ``new_session``: in a process group of its own, for os.killpg."""
    full_env = _cli_env(env)
    proc = (client or _FORK).spawn("fer_sweep", args, str(cwd), full_env, True, new_session)
    if proc is not None:
        return proc
    return subprocess.Popen(
        [sys.executable, "-m", "fer_sweep", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        start_new_session=new_session,
    )
