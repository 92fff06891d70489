"""Faults: a crashing or diverging job, an interruption, many writers, a broken artifact store.
Nothing a user already computed may be lost."""

from __future__ import annotations

import re
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from fer_sweep.core.checkpoint import in_training
from fer_sweep.core.device import resolve_precision
from tests.conftest import migrated_store, one_error_line, run_cli, start_cli, tiny_run

pytestmark = pytest.mark.slow  # every test here starts the CLI or trains

TINY = tiny_run(limit_per_class=8, epochs=None)


def _runs(uri: str, experiment: str, role: str = "job") -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [
        r
        for r in client.search_runs([exp.experiment_id], max_results=1000)
        if r.data.tags.get("fer_sweep.role") == role
    ]


def _history(uri: str, run_id: str, key: str) -> list[float]:
    hist = MlflowClient(uri).get_metric_history(run_id, key)
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


def test_diverging_job_fails_alone_and_the_sweep_exits_non_zero(
    tmp_path: Path, data_overrides: list[str]
) -> None:
    uri = migrated_store(tmp_path / "m.db")
    proc = run_cli(
        [
            "-m",
            "optimizer.lr=0.01,1e12,0.02",
            "trainer.epochs=2",
            *TINY,
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=div",
            *data_overrides,
        ],
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "1 job(s) failed" in proc.stderr and "optimizer.lr=1000000000000.0" in proc.stderr
    progress = re.findall(r"^fer_sweep: job (\d+/\d+) · ", proc.stderr, re.M)
    assert progress == ["1/3", "2/3", "3/3"], proc.stderr[-3000:]  # the failed job counted too
    runs = {r.data.params["optimizer.lr"]: r for r in _runs(uri, "div")}
    assert runs["1000000000000.0"].info.status == "FAILED"
    assert (
        "diverg" in runs["1000000000000.0"].data.tags["fer_sweep.error"].lower()
        or "nan" in runs["1000000000000.0"].data.tags["fer_sweep.error"].lower()
    )
    assert runs["0.01"].info.status == "FINISHED" and runs["0.02"].info.status == "FINISHED"
    assert "test_acc" in runs["0.02"].data.metrics  # the job after the failure still ran
    (parent,) = _runs(uri, "div", role="parent")
    assert parent.info.status == "FAILED"


def _interrupted_in_third_epoch(args: list[str], uri: str, cwd: Path) -> tuple[str, Any]:
    """Start the CLI with ``args``, SIGTERM it once two epochs are logged (so in the third);
    returns its KILLED run (id and run), whose checkpoint is left in ``cwd``/checkpoints."""
    # Create the store first: this polls it while the job runs, and two processes that
    # first touch a new sqlite file race in MLflow's schema migration.
    MlflowClient(uri).search_experiments()
    proc = start_cli([*args, f"mlflow.tracking_uri={uri}"], cwd)
    deadline = time.time() + 300
    run_id = None
    while time.time() < deadline and proc.poll() is None:
        exp = MlflowClient(uri).get_experiment_by_name("fer_sweep")
        runs = _runs(uri, "fer_sweep") if exp else []
        if runs and len(_history(uri, runs[0].info.run_id, "val_acc")) >= 2:
            run_id = runs[0].info.run_id
            break
        time.sleep(0.05)
    assert run_id is not None, "the run never reached its second epoch"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)  # stdout and stderr together
    assert proc.returncode != 0
    assert "KILLED" in out and "trainer.resume" in out
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert (cwd / "checkpoints" / f"{run_id}.pt").exists()
    return run_id, run


def test_sigterm_then_resume_gives_exactly_the_uninterrupted_metrics(
    tmp_path: Path, data_overrides: list[str]
) -> None:
    args = [
        "model=cnn2",
        "trainer.epochs=20",
        "data.limit_per_class=60",
        "trainer.seed=3",
        "trainer.device=cpu",  # exact resume is a CPU guarantee (cuDNN picks kernels freely)
        "trainer.checkpoint_every_s=0",  # a checkpoint every epoch: the third interrupts
        "scheduler.patience=0",  # the learning rate falls at the first epoch without a better
        "optimizer.lr=0.2",  # loss, which a high rate reaches after the interruption (epoch 6)
        "trainer.progress=false",
        "mlflow.log_model=false",
        "mlflow.figures=false",
        *data_overrides,
    ]
    ref_uri = migrated_store(tmp_path / "ref.db")
    ref = run_cli([*args, f"mlflow.tracking_uri={ref_uri}"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    (ref_run,) = _runs(ref_uri, "fer_sweep")

    uri = migrated_store(tmp_path / "m.db")
    run_id, run = _interrupted_in_third_epoch(args, uri, tmp_path)

    resumed = run_cli([*args, f"mlflow.tracking_uri={uri}", "trainer.resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = _runs(uri, "fer_sweep")
    assert [r.info.run_id for r in runs] == [run_id]  # the same run continued
    assert runs[0].info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        assert _history(uri, run_id, key) == _history(ref_uri, ref_run.info.run_id, key), key
    # ReduceLROnPlateau's state came back with the checkpoint: its rate fell after the
    # interruption at the epoch it falls without one
    lrs = _history(ref_uri, ref_run.info.run_id, "lr")
    assert lrs[0] == 0.2 and min(lrs) < 0.2 and lrs.index(min(lrs)) >= 3, lrs
    assert runs[0].data.tags["fer_sweep.resumes"] == "1"
    assert runs[0].data.tags["fer_sweep.pid"] != run.data.tags["fer_sweep.pid"]  # the resuming
    # finished: no error shown any more; the one it was resumed after is kept under its own name
    assert "fer_sweep.error" not in runs[0].data.tags
    assert "SIGTERM" in runs[0].data.tags["fer_sweep.resumed_after"]
    # its training time is both processes' (each epoch's seconds at the least), not the last's
    assert runs[0].data.metrics["train_seconds"] >= sum(_history(uri, run_id, "epoch_seconds"))
    for key in ("test_acc", "test_loss", "best_val_acc", "best_epoch"):
        assert runs[0].data.metrics[key] == ref_run.data.metrics[key], key
    assert not (tmp_path / "checkpoints" / f"{run_id}.pt").exists()


def test_a_run_resumed_on_another_machine_keeps_its_precision(
    tmp_path: Path, data_overrides: list[str]
) -> None:
    """trainer.amp=auto picks bf16 only on CPUs with native bf16: a run that began on such a
    machine and is continued on another (or the other way round) keeps its first precision,
    instead of changing its arithmetic halfway while its params name the first."""
    here = resolve_precision("auto", torch.device("cpu"))
    began = "fp32" if here == "bf16" else "bf16"  # what "the other machine" picked
    args = [
        "model=cnn2",
        "trainer.epochs=6",
        "data.limit_per_class=30",
        "trainer.device=cpu",
        "trainer.checkpoint_every_s=0",
        "trainer.progress=false",
        "mlflow.log_model=false",
        "mlflow.figures=false",
        *data_overrides,
    ]
    ref_uri = migrated_store(tmp_path / "ref.db")  # uninterrupted, all in this machine's choice
    ref = run_cli([*args, f"mlflow.tracking_uri={ref_uri}"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    (ref_run,) = _runs(ref_uri, "fer_sweep")
    assert ref_run.data.params["trainer.precision"] == here

    db = tmp_path / "m.db"
    uri = migrated_store(db)
    run_id, _ = _interrupted_in_third_epoch(args, uri, tmp_path)
    first = len(_history(uri, run_id, "train_loss"))  # the epochs this machine trained
    assert 2 <= first < 6
    with sqlite3.connect(db) as con:  # as the machine it began on logged it
        con.execute(
            "UPDATE params SET value = ? WHERE run_uuid = ? AND key = 'trainer.precision'",
            (began, run_id),
        )
    resumed = run_cli([*args, f"mlflow.tracking_uri={uri}", "trainer.resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"began in {began}: it continues in {began} here too" in resumed.stdout
    (run,) = _runs(uri, "fer_sweep")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.params["trainer.precision"] == began
    # the epochs logged before the interruption are this machine's arithmetic (the same as the
    # reference's); every epoch after it ran in the other precision, so none matches
    mine = _history(uri, run_id, "train_loss")
    ref_losses = _history(ref_uri, ref_run.info.run_id, "train_loss")
    assert len(mine) == len(ref_losses) == 6
    assert mine[:first] == ref_losses[:first]
    assert all(a != b for a, b in zip(mine[first:], ref_losses[first:], strict=True)), mine


def test_a_run_that_another_process_trains_is_never_continued_twice(
    tmp_path: Path, data_overrides: list[str]
) -> None:
    """While a process trains a run (its checkpoint on disk, its status RUNNING), a second
    process does not continue it too: trainer.resume=<its id> is refused in one line, and
    trainer.resume=auto leaves it alone and starts a run of its own."""
    args = [
        "model=cnn2",
        "trainer.epochs=100000",  # trains until this test stops it
        "data.limit_per_class=30",
        "trainer.checkpoint_every_s=0",
        "trainer.progress=false",
        "mlflow.log_model=false",
        "mlflow.figures=false",
        *data_overrides,
    ]
    uri = migrated_store(tmp_path / "m.db")
    MlflowClient(uri).search_experiments()  # the store exists before two processes use it
    first = start_cli([*args, f"mlflow.tracking_uri={uri}"], tmp_path)
    second = None
    try:
        deadline, run_id = time.time() + 300, None
        while time.time() < deadline and first.poll() is None and run_id is None:
            runs = (
                _runs(uri, "fer_sweep")
                if MlflowClient(uri).get_experiment_by_name("fer_sweep")
                else []
            )
            if runs and (tmp_path / "checkpoints" / f"{runs[0].info.run_id}.pt").exists():
                run_id = runs[0].info.run_id
            time.sleep(0.05)
        assert run_id is not None, "the first process never wrote a checkpoint"

        # refused at once (before: it trained the same run beside the first, until killed)
        twice = run_cli(
            [*args, f"mlflow.tracking_uri={uri}", f"trainer.resume={run_id}"], tmp_path, timeout=240
        )
        one_error_line(twice, run_id, "being trained right now", "pid ")
        second = start_cli([*args, f"mlflow.tracking_uri={uri}", "trainer.resume=auto"], tmp_path)
        deadline = time.time() + 300
        while time.time() < deadline and second.poll() is None and len(_runs(uri, "fer_sweep")) < 2:
            time.sleep(0.05)
        assert len(_runs(uri, "fer_sweep")) == 2  # a run of its own, beside the first
        assert first.poll() is None  # the first trains on, alone on its run
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=60)
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags.get("fer_sweep.resumes") is None
    # once its process has ended, the run is free to continue: the lock went with the process
    assert not in_training(tmp_path / "checkpoints" / f"{run_id}.pt")


def test_eight_parallel_writers_on_a_new_default_store(
    tmp_path: Path, data_overrides: list[str]
) -> None:
    seeds = ",".join(str(s) for s in range(8))
    proc = run_cli(
        [
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=8",
            f"trainer.seed={seeds}",
            "trainer.epochs=3",
            "model=cnn2",
            *TINY,
            *data_overrides,
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = tmp_path / "mlflow.db"  # the default store, new to this sweep
    uri = f"sqlite:///{db}"
    runs = _runs(uri, "fer_sweep")
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.params["trainer.seed"] for r in runs) == [str(s) for s in range(8)]
    for r in runs:
        for key in ("train_loss", "val_acc", "lr"):
            assert len(_history(uri, r.info.run_id, key)) == 3, (r.info.run_id, key)
        assert "test_acc" in r.data.metrics
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_artifact_failure_keeps_metrics_and_marks_the_run_failed(
    tmp_path: Path, data_overrides: list[str]
) -> None:
    uri = migrated_store(tmp_path / "m.db")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("artifacts cannot be written below a file")
    client = MlflowClient(uri)
    client.create_experiment("broken", artifact_location=(blocker / "artifacts").as_uri())
    proc = run_cli(
        [
            "model=cnn2",
            "trainer.epochs=2",
            *TINY,
            "mlflow.figures=true",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=broken",
            *data_overrides,
        ],
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    (run,) = _runs(uri, "broken")
    assert run.info.status == "FAILED"
    assert run.data.tags.get("fer_sweep.error")
    assert len(_history(uri, run.info.run_id, "val_acc")) == 2
    assert "test_acc" in run.data.metrics
