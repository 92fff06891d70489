"""trainer.time_budget_min: the epochs planned from a measurement on this machine, the plan's
arithmetic, its clear refusal, its record in MLflow, re-planning after every epoch (the
schedule retargeted, the deadline kept), and resuming a planned run."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from fer_sweep.core import budget
from fer_sweep.core.checkpoint import State
from fer_sweep.core.config import Config
from fer_sweep.core.data import load_dataset
from fer_sweep.core.interrupt import Interrupted
from fer_sweep.core.train import fit, make_scheduler, retarget
from fer_sweep.errors import ConfigError, FerSweepError
from fer_sweep.sweep import job
from fer_sweep.sweep.compose import CONF_DIR, compose_config
from tests.conftest import migrated_store, run_cli

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


@pytest.mark.parametrize(("batch", "steps"), [(32, 3 + 10), (64, 3 + 6), (512, 1 + 1)])
def test_the_probe_takes_no_more_steps_than_an_epoch(
    synthetic_root: Path, monkeypatch: pytest.MonkeyPatch, batch: int, steps: int
) -> None:
    """3 warm-up and 10 timed steps, but never more of either than an epoch has (here 336
    training images: 11 steps of 32, 6 of 64, 1 of 512)."""
    conf = _conf(synthetic_root, "trainer.time_budget_min=5", f"trainer.batch_size={batch}")
    data = load_dataset(conf.data)
    assert len(data.train) == 336
    calls: list[int] = []
    real_step = budget.train.train_step

    def counted(*args: Any, **kwargs: Any) -> float:
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(budget.train, "train_step", counted)
    budget.measure(conf, data, torch.device("cpu"))
    assert len(calls) == steps


def test_the_pacer_plans_the_epochs_that_fit_at_the_last_epochs_pace() -> None:
    state = State(epoch=2, epochs=10)
    state.history["epoch_seconds"] = [99.0, 10.0, 10.0, 10.0]  # the pace: the last three
    now = time.perf_counter()
    pace = budget.PACE_MARGIN * 10.0
    assert budget.Pacer(now + 100.0, cap=60)(state) == 3 + math.floor(100.0 / pace)
    assert budget.Pacer(now + 100.0, cap=8)(state) == 8  # never more than trainer.epochs
    state.history["epoch_seconds"][-1] = 40.0  # the host slowed down: fewer epochs fit
    assert budget.Pacer(now + 100.0, cap=60)(state) == 3 + math.floor(100.0 / (pace * 2))
    assert budget.Pacer(now - 1.0, cap=60)(state) == 3  # past the deadline: nothing more


def _lrs(sched: Any, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["onecycle", "cosine"])
def test_a_retargeted_schedule_ends_where_the_new_length_ends(name: str) -> None:
    """Stretched from 10 to 13 epochs after 3: the one-cycle rates from then on are a fresh
    13-epoch schedule's, and both schedules end at their lowest rate after the new length."""
    conf = compose_config([f"scheduler={name}"])
    per_epoch = 1 if name == "cosine" else 4

    def fresh(epochs: int) -> tuple[Any, torch.optim.Optimizer]:
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        return make_scheduler(opt, conf.scheduler, epochs, per_epoch), opt

    sched, opt = fresh(10)
    _lrs(sched, opt, 3 * per_epoch)
    sched = retarget(sched, opt, conf.scheduler, 13, per_epoch)
    rest = _lrs(sched, opt, 10 * per_epoch)
    ref, ref_opt = fresh(13)
    whole = _lrs(ref, ref_opt, 13 * per_epoch)
    if name == "onecycle":
        assert rest == pytest.approx(whole[3 * per_epoch :], rel=1e-9)
    else:  # cosine's chained form bends the rest of its curve, falling all the way
        assert all(a > b for a, b in zip(rest, rest[1:], strict=False))
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-9)
    assert opt.param_groups[0]["lr"] < whole[0] / 10  # the lowest rate, reached on time


def test_fit_follows_the_plan_and_stops_when_no_epoch_fits(synthetic_root: Path) -> None:
    conf = _conf(synthetic_root, "trainer.epochs=5", "scheduler=onecycle")
    data = load_dataset(conf.data).sealed()
    seen: list[int] = []

    def plans(*counts: int) -> Callable[[State], int]:
        it = iter(counts)
        return lambda state: seen.append(state.epoch) or next(it)

    result = fit(conf, data, replan=plans(1))  # already due after the first epoch
    assert result.state.stop_reason == "time_budget" and result.state.epoch == 0
    longer = fit(conf, data, replan=plans(7, 7, 7, 7, 7, 7, 7))  # a quicker host: more epochs
    assert longer.state.epoch == 6 and longer.state.stop_reason == "epochs"
    shorter = fit(conf, data, replan=plans(3, 3, 3)).state  # a slower one: fewer, annealed
    assert shorter.epoch == 2 and shorter.stop_reason == "epochs"
    assert shorter.history["lr"][-1] < shorter.history["lr"][0] / 10
    assert seen == [0, *range(7), *range(3)]  # asked after every epoch


@pytest.mark.slow  # the CLI end to end
def test_a_budgeted_run_logs_its_plan_and_is_the_same_as_its_epochs(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """`python -m fer_sweep trainer.time_budget_min=...`: the plan is shown and logged; a run of
    the planned epochs without a budget computes exactly the same (measuring changed nothing)."""
    uri = migrated_store(tmp_path / "mlflow.db")
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
    replans = client.get_metric_history(a.info.run_id, "budget_epochs")
    assert [m.value for m in replans] == [3.0] * 3  # re-planned after every epoch, capped
    for key in ("stopped_epoch", "best_val_acc", "test_acc", "final_train_loss"):
        assert a.data.metrics[key] == b.data.metrics[key], key


@pytest.mark.slow  # the CLI end to end
def test_too_small_a_budget_stops_before_the_run_exists(
    synthetic_root: Path, tmp_path: Path
) -> None:
    uri = migrated_store(tmp_path / "mlflow.db")
    args = ["data=synthetic", f"data.root='{synthetic_root}'", *SMALL, f"mlflow.tracking_uri={uri}"]
    proc = run_cli([*args, "trainer.time_budget_min=0.2"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "trainer.time_budget_min=0.2 fits no epoch" in proc.stderr
    assert "Traceback" not in proc.stderr
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fer_sweep")
    assert exp is None or not client.search_runs([exp.experiment_id])


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_a_resumed_run_keeps_its_plan(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_checkpoint: bool
) -> None:
    """An interrupted budgeted run continues the epochs it last planned (the first process
    measured 4 and re-planned 6 after its first epoch), whatever a new measurement would plan
    now, and does not spend time measuring the machine again. A checkpoint written before
    plans were kept in it (its run never re-planned) continues its first plan."""
    uri = migrated_store(tmp_path / "mlflow.db")
    overrides = [
        "data=synthetic",
        f"data.root='{synthetic_root}'",
        *SMALL,
        "trainer.epochs=50",
        "scheduler=onecycle",
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
    final = 4 if old_checkpoint else 6
    monkeypatch.setattr(budget, "Pacer", lambda deadline, cap: lambda state: final)
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

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        first = compose(config_name="config", overrides=overrides)
        again = compose(config_name="config", overrides=[*overrides, "trainer.resume=auto"])
    monkeypatch.setattr(job, "fit", interrupted_fit)
    with pytest.raises(Interrupted):
        job.run_job(first)
    monkeypatch.setattr(job, "fit", real_fit)
    if old_checkpoint:
        (ckpt,) = [p for p in (tmp_path / "ckpt").glob("*.pt") if ".best" not in p.name]
        blob = torch.load(ckpt, weights_only=True)
        del blob["epochs"]
        torch.save(blob, ckpt)
    job.run_job(again)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fer_sweep").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["trainer.epochs_planned"] == "4"
    assert run.data.metrics["stopped_epoch"] == final
    replans = client.get_metric_history(run.info.run_id, "budget_epochs")
    assert sorted((m.step, m.value) for m in replans) == [(0, final), (1, final)]
    lrs = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)
    ]
    assert len(lrs) == final and lrs[-1] < min(lrs[:-1])  # its schedule, annealed on time
    assert len(measured) == 1  # the resumed process knew it resumes before measuring anything
    assert math.isfinite(run.data.metrics["test_acc"])
