"""Hydra launchers and sweepers, for real: every multirun is ONE MLflow parent run over its jobs.

- joblib: the two jobs of the sweep shared with test_server.py (logged to a real tracking
  server) ran in parallel worker processes, neither of them the launching process;
- hparams_search=cnn2_optuna through hydra/launcher=submitit_local (the SLURM launcher's code
  path: pickled jobs under .submitit/, run here): Optuna maximises the best validation accuracy;
- hydra/launcher=slurm: the cluster preset composes with its knobs (no SLURM here to submit to).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tests.conftest import migrated_store, run_cli, tiny_run
from tests.mlflow_server import (
    EXPERIMENT,
    PID_LOGS,
    SWEEP_MODELS,
    Server,
    job_pids,
    launcher_pid,
    shared_server,
    sweep_on,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mlflow_server")]  # one shared server

TINY = tiny_run(limit_per_class=5)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with shared_server(tmp_path_factory) as srv:
        yield srv


def _parent_and_children(client: MlflowClient, experiment: str, n: int) -> tuple[Run, list[Run]]:
    """Exactly one FINISHED parent and n FINISHED children tagged with their overrides."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fer_sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("fer_sweep.role") == "job"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    assert len(children) == n, [r.info.run_name for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["jobs"] == n and parent.data.metrics["jobs_failed"] == 0
    for run in children:
        assert run.info.status == "FINISHED", run.data.tags.get("fer_sweep.error")
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "trainer.epochs=1" in run.data.tags["overrides"]
        assert parent.info.start_time <= run.info.start_time  # parent first, then the jobs
    return parent, children


def test_joblib_runs_jobs_in_parallel_processes(
    server: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sweep = sweep_on(server, tmp_path_factory)
    assert sweep.proc.returncode == 0, sweep.proc.stderr[-4000:]
    parent, children = _parent_and_children(MlflowClient(server.url), EXPERIMENT, 2)
    assert {r.data.tags["model"] for r in children} == set(SWEEP_MODELS)
    assert parent.data.tags["fer_sweep.launcher"].endswith("JoblibLauncher")
    assert parent.data.tags["fer_sweep.sweeper"].endswith("FerSweepSweeper")
    # each worker composes its job again, with none of the command's warning filters
    assert "validated against ConfigStore schema" not in sweep.proc.stderr
    pids = job_pids(sweep.cwd / "sweep", 2)
    assert len(pids) == 2 and launcher_pid(sweep.proc.stdout) not in pids


def _cnn2_search(
    tmp_path: Path, args: list[str]
) -> tuple[subprocess.CompletedProcess[str], str, Path]:
    """hparams_search=cnn2_optuna, 3 tiny trials, into a new sqlite store:
    (the process, the store's URI, the sweep folder)."""
    uri = migrated_store(tmp_path / "m.db")
    sweep_dir = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            "hparams_search=cnn2_optuna",
            "hydra.sweeper.n_trials=3",
            *TINY,
            *args,
            f"mlflow.tracking_uri={uri}",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    return proc, uri, sweep_dir


def test_optuna_trials_through_submitit_local(tmp_path: Path, data_overrides: list[str]) -> None:
    proc, uri, sweep_dir = _cnn2_search(
        tmp_path,
        ["hydra.sweeper.n_jobs=3", "hydra/launcher=submitit_local", *PID_LOGS, *data_overrides],
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    parent, children = _parent_and_children(MlflowClient(uri), "fer_sweep", 3)
    assert parent.data.tags["fer_sweep.sweeper"].endswith("OptunaSweeper")
    assert parent.data.tags["fer_sweep.launcher"].endswith("LocalLauncher")
    assert parent.info.run_name.endswith("-cnn2_optuna")

    # submitit: each of the 3 workers pickled, run and answered in its own process, which
    # runs trials until the study has its 3
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 3
    pids = job_pids(sweep_dir, 3)
    assert len(pids) == 3 and launcher_pid(proc.stdout) not in pids

    for run in children:  # every trial inside the search space, and told apart
        p = run.data.params
        assert 0.0005 <= float(p["optimizer.lr"]) <= 0.1
        assert float(p["optimizer.weight_decay"]) in (0.0, 1e-5, 1e-4, 5e-4, 1e-3)
        assert int(p["trainer.batch_size"]) in (32, 64, 100, 128)
        assert 0.0 <= float(p["model.dropout"]) <= 0.5
        assert "optimizer.lr=" in run.data.tags["overrides"]
    assert len({r.data.params["optimizer.lr"] for r in children}) == 3

    # the sweeper's verdict is the best child's best validation accuracy (maximised)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {
        "optimizer.lr",
        "optimizer.weight_decay",
        "trainer.batch_size",
        "model.dropout",
    }
    assert results["best_value"] == pytest.approx(
        max(r.data.metrics["best_val_acc"] for r in children)
    )
    winners = [
        r
        for r in children
        if all(
            float(r.data.params[k]) == pytest.approx(float(v))
            for k, v in results["best_params"].items()
        )
    ]
    assert len(winners) == 1
    assert winners[0].data.metrics["best_val_acc"] == pytest.approx(results["best_value"])
    # ... and is on the parent run, where the UI shows it
    assert parent.data.metrics["best_value"] == pytest.approx(results["best_value"])
    assert {k: float(v) for k, v in parent.data.params.items() if k.startswith("best.")} == {
        f"best.{k}": pytest.approx(float(v)) for k, v in results["best_params"].items()
    }
    assert {int(r.data.tags["fer_sweep.pid"]) for r in children} <= pids


def test_optuna_records_a_failed_trial_and_searches_on(
    tmp_path: Path, data_overrides: list[str]
) -> None:
    """A trial that fails (here: a learning rate of 1e12 diverges, which only training can
    tell) is a FAILED Optuna trial, not a crash: its run is FAILED and tagged so, the other
    trials run, the parent is FAILED with the failures listed, the exit is non-zero. (Random
    sampler, seed 4: the rates drawn are 0.01, 1e12, 0.01.)"""
    proc, uri, sweep_dir = _cnn2_search(
        tmp_path,
        [
            "hydra/sweeper/sampler=random",
            "hydra.sweeper.sampler.seed=4",
            "optimizer.lr=choice(0.01, 1e12)",
            *data_overrides,
        ],
    )
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "job(s) failed" in proc.stderr and "the training loss became" in proc.stderr
    failed = len(list((sweep_dir / "failures").glob("*.json")))
    assert 1 <= failed < 3
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_params"]["optimizer.lr"] == 0.01
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fer_sweep").experiment_id])
    parent = next(r for r in runs if r.data.tags["fer_sweep.role"] == "parent")
    children = [r for r in runs if r.data.tags["fer_sweep.role"] == "job"]
    assert parent.info.status == "FAILED" and parent.data.metrics["jobs_failed"] == failed
    assert failed == 1 and len(children) == 3
    (bad,) = [r for r in children if r.info.status == "FAILED"]
    assert bad.data.tags["fer_sweep.trial_state"] == "FAIL"
    assert float(bad.data.params["optimizer.lr"]) == 1e12


def test_slurm_preset_holds_the_cluster_knobs(tmp_path: Path) -> None:
    proc = run_cli(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=30",
            "--cfg",
            "hydra",
            "-p",
            "hydra.launcher",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    launcher = yaml.safe_load(proc.stdout)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 30
    for knob in (
        "gpus_per_node",
        "cpus_per_task",
        "mem_gb",
        "array_parallelism",
        "account",
        "qos",
        "setup",
        "additional_parameters",
    ):
        assert knob in launcher, knob
    assert launcher["nodes"] == 1 and launcher["tasks_per_node"] == 1
