"""hydra/sweeper=optuna as a user runs it (the real CLI, real launchers, a real MLflow store, the
synthetic faces): trials pruned and run side by side without batch barriers, a killed search
resumed under the same parent, four workers on one sqlite store, the report of a search, and
bad input refused before any parent run exists."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fer_sweep.sweep.search import parse_space
from tests.conftest import REPO, migrated_store, run_cli, start_cli, tiny_run

pytestmark = pytest.mark.slow

SEARCH = ["-m", "hparams_search=cnn2_optuna", *tiny_run(limit_per_class=6, synthetic=True)]


def _workers(n: int) -> list[str]:
    """n joblib workers, each trial on one thread (as the docs run searches on 2 cores)."""
    return [
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={n}",
        f"hydra.sweeper.n_jobs={n}",
        "trainer.threads=1",
    ]


def _trials(uri: str, experiment: str = "fer_sweep") -> tuple[list[Run], list[Run]]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("fer_sweep.role") == "parent"]
    trials = [r for r in runs if "fer_sweep.trial_number" in r.data.tags]
    return parents, trials


def _search(
    args: list[str], cwd: Path, uri: str, folder: str, timeout: float = 600
) -> tuple[subprocess.CompletedProcess[str], Run, list[Run]]:
    """A search through the CLI to its end (sweep folder ``cwd/folder``): exit 0 and one
    FINISHED parent; (the process, the parent, the trial runs)."""
    proc = run_cli([*args, f"hydra.sweep.dir={cwd / folder}"], cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    parents, trials = _trials(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    return proc, parents[0], trials


def _training(proc: Any, uri: str, match: Callable[[Run], bool]) -> Run:
    """While the search ``proc`` runs: the first RUNNING trial run that ``match``es and has
    logged an epoch (the moment to kill it)."""
    client = MlflowClient(uri)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("fer_sweep")
        for r in client.search_runs([exp.experiment_id]) if exp else []:
            if r.info.status == "RUNNING" and "fer_sweep.trial_number" in r.data.tags and match(r):
                if client.get_metric_history(r.info.run_id, "val_acc"):
                    return r
        time.sleep(0.3)
    raise AssertionError(proc.communicate()[0][-3000:] if proc.poll() is not None else "timeout")


def _prune_after(epochs: int) -> list[str]:
    """A pruner that stops every trial after ``epochs`` (a threshold no accuracy reaches)."""
    return [
        "hydra/sweeper/pruner=none",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "+hydra.sweeper.pruner.lower=1.01",
        f"+hydra.sweeper.pruner.n_warmup_steps={epochs}",
    ]


def _report(uri: str, out: Path) -> str:
    """python -m fer_sweep.report on the store's search: its trials.md."""
    report = run_cli(
        ["--tracking-uri", uri, "--out", str(out)], cwd=out.parent, module="fer_sweep.report"
    )
    assert report.returncode == 0, report.stderr[-3000:]
    return (out / "trials.md").read_text()


def _state(run: Run) -> str:
    return run.data.tags["fer_sweep.trial_state"]


def _runs_by_trial(trials: list[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = {}
    for r in trials:
        out.setdefault(int(r.data.tags["fer_sweep.trial_number"]), []).append(r)
    return {
        n: sorted(rs, key=lambda r: int(r.data.params["trainer.seed"])) for n, rs in out.items()
    }


def _study(parent: Run) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from fer_sweep.sweep.search import STORAGE_TAG, STUDY_TAG

    tags = parent.data.tags
    storage = JournalStorage(JournalFileBackend(tags[STORAGE_TAG]))
    return optuna.load_study(study_name=tags[STUDY_TAG], storage=storage)


def test_space_grammar_is_hydra_optuna_sweepers() -> None:
    space = parse_space(
        {
            "optimizer.lr": "tag(log, interval(0.001, 0.1))",
            "trainer.batch_size": "choice(32, 64)",
            "model.dropout": "interval(0.0, 0.5)",
            "trainer.epochs": "range(2, 11, 4)",
            "data.limit_per_class": "tag(int, interval(5, 9))",
        },
        ["model.dropout=0.25", "transforms=choice(norm, aug)"],
    )
    p = space.params
    assert p["optimizer.lr"].log and (p["optimizer.lr"].low, p["optimizer.lr"].high) == (
        0.001,
        0.1,
    )
    assert p["trainer.batch_size"].choices == (32, 64)
    assert (p["trainer.epochs"].low, p["trainer.epochs"].high, p["trainer.epochs"].step) == (
        2,
        10,
        4,
    )
    assert (p["data.limit_per_class"].low, p["data.limit_per_class"].high) == (5, 9)
    assert p["transforms"].choices == ("norm", "aug")
    assert "model.dropout" not in p and space.fixed == ["model.dropout=0.25"]  # fixed wins


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (REPO / "conf/hparams_search").glob("*.yaml"))
)
def test_every_shipped_search_passes_its_own_checks(tmp_path: Path, name: str) -> None:
    """conf/hparams_search/*: each composes, and its space, sampler, pruner and prune_on pass
    the checks a search runs before its first trial."""
    from hydra import compose, initialize_config_dir

    from fer_sweep.sweep.search import check

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        config = compose("config", [f"hparams_search={name}"], return_hydra_config=True)
    plan = check(config, parse_space(config.hydra.sweeper.params, []), tmp_path, None)
    assert plan.n_trials == config.hydra.sweeper.n_trials
    if name == "fast43_search":
        assert plan.prune_on == "val_acc_raw" and config.trainer.val_raw
        assert config.trainer.epochs == 43 and config.trainer.time_budget_min is None


def test_pruned_trials_finish_as_pruned_and_workers_never_wait_for_each_other(
    tmp_path: Path,
) -> None:
    """Two joblib workers; trials of 1 or 120 epochs, the long ones pruned after epoch 81 (a
    threshold nobody reaches): pruned runs end FINISHED with their state and epochs, no test
    metrics; while a long trial trains, the other worker finishes one trial and starts the
    next; the report lists every trial and draws Optuna's figures. (Random sampler, seed 4:
    worker 0 draws a long trial first, worker 1, seeded 5, two short ones.)"""
    uri = migrated_store(tmp_path / "m.db")
    proc, parent, trials = _search(
        [
            *SEARCH,
            *_workers(2),
            "hydra.sweeper.n_trials=6",
            "hydra/sweeper/sampler=random",
            "hydra.sweeper.sampler.seed=4",
            "trainer.epochs=choice(1, 120)",
            *_prune_after(80),  # long enough to span two short trials
            f"mlflow.tracking_uri={uri}",
        ],
        tmp_path,
        uri,
        "sweep",
    )
    assert sorted(int(r.data.tags["fer_sweep.trial_number"]) for r in trials) == list(range(6))
    assert all(r.info.status == "FINISHED" for r in trials)
    for r in trials:
        epochs = int(r.data.params["trainer.epochs"])
        if epochs == 120:
            assert _state(r) == "PRUNED", r.data.tags
            assert r.data.metrics["stopped_epoch"] == 80 and "test_acc" not in r.data.metrics
        else:
            assert _state(r) == "COMPLETE" and "test_acc" in r.data.metrics
    assert {_state(r) for r in trials} == {"PRUNED", "COMPLETE"}, "the sampler drew one kind"
    # No barrier: a trial began after another ended, while a third (a long one) still trained.
    spans = [(r.info.start_time, r.info.end_time) for r in trials]
    assert any(
        s_long < e_x <= s_y < e_long
        for s_long, e_long in spans
        for _, e_x in spans
        for s_y, _ in spans
        if s_long < s_y
    ), sorted(spans)
    assert "trial 6/6" in proc.stderr  # the sweep-level progress line
    table = _report(uri, tmp_path / "rep")
    assert table.count("| PRUNED |") == sum(_state(r) == "PRUNED" for r in trials)
    assert "| trainer.epochs | best val acc | epochs |" in table
    assert "Best trial: #" in table
    assert (tmp_path / "rep" / "optimization_history.png").stat().st_size > 0
    logged = MlflowClient(uri).list_artifacts(parent.info.run_id, "report")
    assert {"report/trials.md", "report/trials.csv"} <= {a.path for a in logged}


def test_a_search_killed_mid_trial_resumes_under_the_same_parent(tmp_path: Path) -> None:
    """SIGKILL (no handler runs) while a later trial trains; the same command plus
    sweep.resume=latest fails the trial left RUNNING, runs its parameters again and completes
    the search: as many finished trials as asked for, none run twice, one parent. The trial
    enqueued by hydra.sweeper.enqueue_trials runs first, and once (not again on resume)."""
    uri = migrated_store(tmp_path / "m.db")
    args = [
        *SEARCH,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.enqueue_trials=[{optimizer.lr:0.0123,model.dropout:0.1}]",
        "hydra/sweeper/pruner=none",
        "trainer.epochs=12",
        "trainer.threads=1",
        f"mlflow.tracking_uri={uri}",
    ]
    proc = start_cli([*args, f"hydra.sweep.dir={tmp_path / 'first'}"], tmp_path, new_session=True)
    later = _training(proc, uri, lambda r: r.data.tags["fer_sweep.trial_number"] != "0")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    _, _, trials = _search([*args, "sweep.resume=latest"], tmp_path, uri, "again")
    by_number = {}
    for r in trials:
        by_number.setdefault(r.data.tags["fer_sweep.trial_number"], []).append(r)
    assert all(len(runs) == 1 for runs in by_number.values()), "a trial ran twice"
    done = [r for r in trials if _state(r) in ("COMPLETE", "PRUNED")]
    assert len(done) == 3, [(_state(r), r.info.status) for r in trials]
    (killed,) = [r for r in trials if r.info.status != "FINISHED"]
    assert killed.info.status == "KILLED" and _state(killed) == "FAIL"
    assert killed.data.tags["fer_sweep.trial_number"] == later.data.tags["fer_sweep.trial_number"]
    rerun = [r for r in done if r.data.params["optimizer.lr"] == killed.data.params["optimizer.lr"]]
    assert rerun, "the killed trial's parameters were not tried again"
    enqueued = [r for r in trials if r.data.params["optimizer.lr"] == "0.0123"]
    assert [r.data.tags["fer_sweep.trial_number"] for r in enqueued] == ["0"]
    assert enqueued[0].data.params["model.dropout"] == "0.1"


def test_a_search_that_lost_one_joblib_worker_resumes_under_the_same_parent(
    tmp_path: Path,
) -> None:
    """One of two joblib workers SIGKILLed mid-trial (what the OOM killer does): the sweep
    stops; the same command plus sweep.resume=latest ends with all trials finished, none twice,
    one parent."""
    uri = migrated_store(tmp_path / "m.db")
    args = [
        *SEARCH,
        *_workers(2),
        "hydra.sweeper.n_trials=4",
        "hydra/sweeper/pruner=none",
        "trainer.epochs=12",
        f"mlflow.tracking_uri={uri}",
    ]
    proc = start_cli([*args, f"hydra.sweep.dir={tmp_path / 'first'}"], tmp_path, new_session=True)
    victim = _training(proc, uri, lambda r: True)
    os.kill(int(victim.data.tags["fer_sweep.pid"]), signal.SIGKILL)
    proc.communicate(timeout=120)  # the sweep ends (joblib loses a worker); nothing hangs
    assert proc.returncode != 0

    _, _, trials = _search([*args, "sweep.resume=latest"], tmp_path, uri, "again")
    numbers = [r.data.tags["fer_sweep.trial_number"] for r in trials]
    assert len(numbers) == len(set(numbers)), "a trial ran twice"
    assert sum(_state(r) == "COMPLETE" for r in trials) == 4
    assert all(r.info.status != "RUNNING" for r in trials)


def test_four_workers_forty_trials_on_one_sqlite_store(tmp_path: Path) -> None:
    """Four joblib workers beside one MLflow sqlite store (and the journal): every trial is in
    MLflow, FINISHED, and nothing reports a locked database."""
    uri = migrated_store(tmp_path / "m.db")
    proc, _, trials = _search(
        [
            "-m",
            "hparams_search=cnn2_optuna",
            *tiny_run(limit_per_class=2, synthetic=True),
            *_workers(4),
            "hydra.sweeper.n_trials=40",
            "hydra/sweeper/pruner=none",
            f"mlflow.tracking_uri={uri}",
        ],
        tmp_path,
        uri,
        "sweep",
        timeout=900,
    )
    assert "database is locked" not in proc.stdout + proc.stderr
    assert sorted(int(r.data.tags["fer_sweep.trial_number"]) for r in trials) == list(range(40))
    assert all(r.info.status == "FINISHED" and _state(r) == "COMPLETE" for r in trials)


def test_a_search_over_the_weight_average_prunes_on_the_raw_weights(tmp_path: Path) -> None:
    """hydra.sweeper.prune_on=val_acc_raw: every epoch the trial reports the un-averaged
    weights' validation accuracy (what its run logs as val_acc_raw), while the trial's value
    stays the best accuracy of the averaged weights. A decay of 0.999 keeps the average near
    the initial weights, so the two accuracies differ."""
    uri = migrated_store(tmp_path / "m.db")
    _, parent, trials = _search(
        [
            "-m",
            "hparams_search=cnn2_optuna",
            *tiny_run(limit_per_class=60, epochs=4, synthetic=True),
            "hydra.sweeper.n_trials=2",
            "hydra/sweeper/pruner=none",
            "hydra.sweeper.prune_on=val_acc_raw",
            "trainer.val_raw=true",
            "trainer.ema_decay=0.999",
            f"mlflow.tracking_uri={uri}",
        ],
        tmp_path,
        uri,
        "sweep",
    )
    study = _study(parent)
    client = MlflowClient(uri)
    differs = False
    for run in trials:
        trial = study.trials[int(run.data.tags["fer_sweep.trial_number"])]

        def history(key: str, run_id: str = run.info.run_id) -> dict[int, float]:
            return {m.step + 1: m.value for m in client.get_metric_history(run_id, key)}

        assert trial.intermediate_values == history("val_acc_raw")
        assert trial.value == run.data.metrics["best_val_acc"] == max(history("val_acc").values())
        differs |= history("val_acc_raw") != history("val_acc")
    assert len(trials) == 2 and differs


def test_a_search_scores_each_trial_on_several_seeds(tmp_path: Path) -> None:
    """hydra.sweeper.seeds_per_trial=2 from trainer.seed=5: a trial trains seeds 5 and 6 (two
    child runs with its number) and its value is their mean best validation accuracy; the
    pruner watches the first seed, so a pruned trial trains no second seed. The report's table
    gives each trial's mean and per-seed values."""
    uri = migrated_store(tmp_path / "m.db")
    _, parent, trials = _search(
        [
            *SEARCH,
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.seeds_per_trial=2",
            "trainer.seed=5",
            "trainer.epochs=choice(2, 40)",
            "hydra.sweeper.enqueue_trials=[{trainer.epochs:40},{trainer.epochs:2}]",
            *_prune_after(3),
            f"mlflow.tracking_uri={uri}",
        ],
        tmp_path,
        uri,
        "sweep",
    )
    study = _study(parent)
    runs = _runs_by_trial(trials)
    (pruned,) = runs[0]  # 40 epochs: stopped after 3 on seed 5; seed 6 never trained
    assert pruned.data.params["trainer.seed"] == "5" and _state(pruned) == "PRUNED"
    assert pruned.data.metrics["stopped_epoch"] == 3
    assert study.trials[0].state.name == "PRUNED"
    assert [r.data.params["trainer.seed"] for r in runs[1]] == ["5", "6"]
    assert all(_state(r) == "COMPLETE" and "test_acc" in r.data.metrics for r in runs[1])
    assert "trainer.seed=6" in runs[1][1].data.tags["overrides"]
    values = [r.data.metrics["best_val_acc"] for r in runs[1]]
    assert study.trials[1].value == pytest.approx(sum(values) / 2)
    history = MlflowClient(uri).get_metric_history(runs[1][0].info.run_id, "val_acc")
    assert study.trials[1].intermediate_values == {m.step + 1: m.value for m in history}

    table = _report(uri, tmp_path / "rep")
    assert "mean best validation accuracy over 2 seeds" in table
    row = next(line for line in table.splitlines() if line.startswith("| 1 | COMPLETE |"))
    assert f"{100 * sum(values) / 2:.2f} %" in row
    assert f"5: {100 * values[0]:.2f}, 6: {100 * values[1]:.2f}" in row


def test_a_search_killed_in_a_later_seed_trains_only_the_missing_seeds_on_resume(
    tmp_path: Path,
) -> None:
    """SIGKILL while the first trial trains its second seed: on sweep.resume the trial is run
    again, but its finished first seed is not: that run now carries the new trial's number, and
    only the second seed trains again (the first seed's epochs are reported to the retried
    trial, for the pruner). A resume with another seeds_per_trial is refused."""
    uri = migrated_store(tmp_path / "m.db")
    args = [
        *SEARCH,
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.seeds_per_trial=2",
        "hydra/sweeper/pruner=none",
        "trainer.epochs=60",  # a window for the kill while seed 1 trains
        "trainer.threads=1",
        f"mlflow.tracking_uri={uri}",
    ]
    proc = start_cli([*args, f"hydra.sweep.dir={tmp_path / 'first'}"], tmp_path, new_session=True)
    second = _training(proc, uri, lambda r: r.data.params.get("trainer.seed") == "1")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _, first_done = _trials(uri)
    (seed0,) = [r for r in first_done if r.data.params["trainer.seed"] == "0"]
    other = run_cli([*args, "sweep.resume=latest", "hydra.sweeper.seeds_per_trial=3"], tmp_path)
    assert other.returncode == 2 and "resume it with hydra.sweeper.seeds_per_trial=2" in (
        other.stderr
    ), other.stderr[-3000:]

    _, parent, trials = _search([*args, "sweep.resume=latest"], tmp_path, uri, "again")
    runs = _runs_by_trial(trials)
    assert [_state(r) for r in runs[0]] == ["FAIL"]  # the killed seed-1 run
    assert runs[0][0].info.run_id == second.info.run_id
    assert [r.info.run_id for r in runs[1]][0] == seed0.info.run_id  # taken over, not re-run
    assert [(r.data.params["trainer.seed"], _state(r)) for r in runs[1]] == [
        ("0", "COMPLETE"),
        ("1", "COMPLETE"),
    ]
    assert len(trials) == 3
    study = _study(parent)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    values = [r.data.metrics["best_val_acc"] for r in runs[1]]
    assert study.trials[1].value == pytest.approx(sum(values) / 2)
    history = MlflowClient(uri).get_metric_history(seed0.info.run_id, "val_acc")
    assert study.trials[1].intermediate_values == {m.step + 1: m.value for m in history}


@pytest.mark.parametrize(
    ("args", "expected", "code"),
    [
        (["hydra/sweeper/pruner=nope"], "hydra/sweeper/pruner", 1),
        (["+hydra.sweeper.pruner.bogus=3"], "hydra.sweeper.pruner", 2),
        (["trainer.epochz=choice(1, 2)"], "search space trainer.epochz", 2),
        (["model.dropout=interval(0.0, 1.5)"], "search space model.dropout=1.5", 2),
        (["optimizer.lr=tag(log, interval(0, 0.1))"], "search space optimizer.lr=tag(log", 2),
        (["optimizer.lr=interval(0.1, 0.01)"], "search space optimizer.lr=interval(0.1", 2),
        (["hydra.sweeper.storage=/proc/fer_sweep/x.journal"], "hydra.sweeper.storage", 2),
        (
            ["hydra.sweeper.enqueue_trials=[{optimizer.lr:5.0}]"],
            "enqueue_trials[0]: optimizer.lr=5.0 is outside its search space",
            2,
        ),
        (["hydra.sweeper.prune_on=val_loss"], "hydra.sweeper.prune_on=val_loss: one of", 2),
        (["hydra.sweeper.prune_on=val_acc_raw"], "add it (or prune_on=val_acc)", 2),
        (["hydra.sweeper.seeds_per_trial=0"], "hydra.sweeper.seeds_per_trial=0: give 1", 2),
        (
            ["hydra.sweeper.seeds_per_trial=2", "trainer.seed=choice(0, 1)"],
            "take trainer.seed out of the search space",
            2,
        ),
        (
            ["hydra.sweeper.seeds_per_trial=2", f"trainer.seed={2**64 - 1}"],
            f"trainer.seed={2**64} is outside torch.manual_seed's range",
            2,
        ),
    ],
    ids=[
        "unknown_pruner",
        "pruner_option",
        "unknown_key",
        "refused_value",
        "log_scale_from_zero",
        "low_above_high",
        "storage",
        "enqueue",
        "prune_on",
        "prune_on_raw_unmeasured",
        "seeds_per_trial",
        "seeds_searched",
        "last_seed_out_of_range",
    ],
)
def test_bad_search_input_is_one_error_before_any_parent_run(
    tmp_path: Path, args: list[str], expected: str, code: int
) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = run_cli([*SEARCH, *args, f"mlflow.tracking_uri={uri}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert expected in proc.stderr
    if code == 2:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("fer_sweep: ")]
        assert len(errors) == 1 and errors[0].startswith("fer_sweep: error: "), proc.stderr
    if (tmp_path / "m.db").exists():
        exp = MlflowClient(uri).get_experiment_by_name("fer_sweep")
        assert exp is None or not MlflowClient(uri).search_runs([exp.experiment_id])
