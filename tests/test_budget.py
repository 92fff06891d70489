"""trainer.time_budget_min: the epochs planned from a measurement on this machine, the plan's
arithmetic, its clear refusal, its record in MLflow, the deadline, and resuming a planned run."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from fer_sweep import budget, job
from fer_sweep.bench import CONF_DIR, compose_config
from fer_sweep.config import Config, quiet_schema_warning
from fer_sweep.data import load_dataset
from fer_sweep.errors import ConfigError, FerSweepError
from fer_sweep.signals import Interrupted
from fer_sweep.train import fit
from tests.conftest import run_cli

SMALL = ["model=cnn2", "transforms=norm", "trainer.batch_size=32", "trainer.progress=false"]


def _conf(root: Path, *overrides: str) -> Config:
    return compose_config(
        ["data=synthetic", f"data.root='{root}'", "trainer.device=cpu", *SMALL, *overrides]
    )


def _sizes(n_train: int, n_val: int, n_test: int) -> SimpleNamespace:
    return SimpleNamespace(train=[0] * n_train, val=[0] * n_val, test=[0] * n_test)


@pytest.mark.parametrize(
    ("mode", "views"), [("flip", 2), ("shift", 5), ("flip_shift", 6), ("flip_x_shift", 10)]
)
def test_tta_view_count_is_what_evaluate_runs(mode: str, views: int) -> None:
    assert budget.tta_view_count(mode) == views


def test_the_plan_is_the_most_epochs_that_fit(tmp_path: Path) -> None:
    conf = _conf(tmp_path, "trainer.epochs=1000", "trainer.time_budget_min=10", "eval.tta=flip")
    data = _sizes(20_000, 2_000, 5_000)
    speed = budget.Speed(train_ips=500.0, eval_ips=2_000.0, seconds=5.0)
    plan = budget.plan(conf, data, speed, elapsed_s=20.0)
    epoch_s = budget.SAFETY * (20_000 / 500 + 2_000 / 2_000)
    final_s = (2 * 5_000 + 2 * (2_000 + 5_000)) / 2_000 + budget.RESERVE_S
    assert plan.epoch_s == pytest.approx(epoch_s) and plan.final_s == pytest.approx(final_s)
    total = 20.0 + plan.epochs * epoch_s + final_s
    assert total <= 600.0 < total + epoch_s  # fits, and one more epoch would not
    assert plan.epochs == 11
    # a faster machine trains more, up to trainer.epochs
    assert budget.plan(conf, data, budget.Speed(1_000.0, 4_000.0, 5.0), 20.0).epochs > 11
    capped = _conf(tmp_path, "trainer.epochs=7", "trainer.time_budget_min=10")
    assert budget.plan(capped, data, speed, 20.0).epochs == 7


def test_a_budget_that_fits_no_epoch_is_one_clear_error(tmp_path: Path) -> None:
    conf = _conf(tmp_path, "trainer.time_budget_min=1")
    with pytest.raises(FerSweepError, match=r"time_budget_min=1 fits no epoch.*Raise the budget"):
        budget.plan(conf, _sizes(100_000, 1_000, 1_000), budget.Speed(100.0, 1_000.0, 1.0), 5.0)
    with pytest.raises(ConfigError, match=r"time_budget_min=0(\.0)? must be a positive"):
        _conf(tmp_path, "trainer.time_budget_min=0")


def test_measuring_leaves_the_random_state_alone(synthetic_root: Path) -> None:
    conf = _conf(synthetic_root, "trainer.time_budget_min=5")
    data = load_dataset(conf.data)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    speed = budget.measure(conf, data, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)
    assert speed.train_ips > 0 and speed.eval_ips > 0 and speed.seconds > 0


def test_fit_starts_no_epoch_that_would_end_after_the_deadline(synthetic_root: Path) -> None:
    conf = _conf(synthetic_root, "trainer.epochs=5")
    data = load_dataset(conf.data).sealed()
    result = fit(conf, data, deadline=time.perf_counter())  # already due: one epoch, then stop
    assert result.state.stop_reason == "time_budget" and result.state.epoch == 0
    assert fit(conf, data, deadline=time.perf_counter() + 3600).state.epoch == 4


def test_a_budgeted_run_logs_its_plan_and_is_the_same_as_its_epochs(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """`python -m fer_sweep trainer.time_budget_min=...`: the plan is shown and logged; a run of
    the planned epochs without a budget computes exactly the same (measuring changed nothing)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        "data=synthetic",
        f"data.root='{synthetic_root}'",
        *SMALL,
        f"mlflow.tracking_uri={uri}",
        "mlflow.log_model=false",
        "mlflow.figures=false",
    ]
    planned = run_cli([*common, "trainer.time_budget_min=5", "trainer.epochs=3"], cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert re.search(
        r"time budget 5 min: 3 epochs planned \(\d+ train", planned.stdout + planned.stderr
    )
    fixed = run_cli([*common, "trainer.epochs=3"], cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fer_sweep").experiment_id])
    a, b = sorted(runs, key=lambda r: r.info.start_time)  # the budgeted run came first
    assert a.data.params["trainer.epochs_planned"] == "3"
    assert float(a.data.params["budget.train_ips"]) > 0
    assert "trainer.epochs_planned" not in b.data.params
    for key in ("stopped_epoch", "best_val_acc", "test_acc", "final_train_loss"):
        assert a.data.metrics[key] == b.data.metrics[key], key


def test_too_small_a_budget_stops_before_the_run_exists(
    synthetic_root: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["data=synthetic", f"data.root='{synthetic_root}'", *SMALL, f"mlflow.tracking_uri={uri}"]
    proc = run_cli([*args, "trainer.time_budget_min=0.2"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "trainer.time_budget_min=0.2 fits no epoch" in proc.stderr
    assert "Traceback" not in proc.stderr
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fer_sweep")
    assert exp is None or not client.search_runs([exp.experiment_id])


def test_a_resumed_run_keeps_its_plan(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted budgeted run continues the epochs it planned, whatever a new measurement
    would plan now, and does not spend time measuring the machine again."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        "data=synthetic",
        f"data.root='{synthetic_root}'",
        *SMALL,
        "trainer.epochs=50",
        "trainer.time_budget_min=30",
        "trainer.checkpoint_every_s=0",
        f"trainer.checkpoint_dir='{tmp_path / 'ckpt'}'",
        f"mlflow.tracking_uri={uri}",
        "mlflow.log_model=false",
        "mlflow.figures=false",
    ]
    plans = iter([4, 9])  # the first process plans 4 epochs, the resumed one would plan 9
    real_plan = budget.plan

    def fake_plan(conf, data, speed, elapsed_s):  # type: ignore[no-untyped-def]
        p = real_plan(conf, data, speed, elapsed_s)
        return budget.Plan(next(plans), p.epoch_s, p.final_s, p.speed)

    monkeypatch.setattr(budget, "plan", fake_plan)
    measured: list[int] = []
    real_measure = budget.measure

    def counted_measure(*args, **kwargs):  # type: ignore[no-untyped-def]
        measured.append(1)
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(budget, "measure", counted_measure)
    real_fit = job.fit

    def interrupted_fit(conf, data, **kw):  # type: ignore[no-untyped-def]
        def on_epoch(epoch, metrics):  # type: ignore[no-untyped-def]
            kw_on_epoch(epoch, metrics)
            if epoch == 1:
                raise Interrupted(15, "the test")

        kw_on_epoch = kw["on_epoch"]
        return real_fit(conf, data, **{**kw, "on_epoch": on_epoch})

    quiet_schema_warning()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        first = compose(config_name="config", overrides=overrides)
        again = compose(config_name="config", overrides=[*overrides, "trainer.resume=auto"])
    monkeypatch.setattr(job, "fit", interrupted_fit)
    with pytest.raises(Interrupted):
        job.run_job(first)
    monkeypatch.setattr(job, "fit", real_fit)
    job.run_job(again)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fer_sweep").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["trainer.epochs_planned"] == "4"
    assert run.data.metrics["stopped_epoch"] == 4
    assert len(measured) == 1  # the resumed process knew it resumes before measuring anything
    assert math.isfinite(run.data.metrics["test_acc"])
