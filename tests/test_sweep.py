"""End to end: the README's main sweep on a tiny subset, into a real temporary MLflow store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fer_sweep.core.device import resolve_precision
from tests.conftest import JOB_ARTIFACTS, migrated_store, run_cli

pytestmark = pytest.mark.slow  # every test here starts the CLI or trains

RESNET_PARAMS = 2_982_247


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowClient, str, Path]:
    from tests.conftest import real_data

    cwd = tmp_path_factory.mktemp("sweep")
    uri = migrated_store(cwd / "m.db")
    data = [] if real_data() else ["data=synthetic"]
    proc = run_cli(
        [
            "-m",
            "model=cnn2,cnn3,resnet",
            "transforms=norm,aug",
            "data.limit_per_class=5",
            "trainer.epochs=1",
            "trainer.progress=false",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=smoke",
            *data,
        ],
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # one sweep-level progress line per finished job, with an ETA until the last
    progress = [line for line in proc.stderr.splitlines() if line.startswith("fer_sweep: job ")]
    assert [line.split(" · ")[0] for line in progress] == [
        f"fer_sweep: job {i}/6" for i in range(1, 7)
    ]
    assert all(" elapsed · ETA " in line for line in progress[:-1]) and "ETA" not in progress[-1]
    return MlflowClient(uri), uri, cwd


def test_six_finished_child_runs_under_one_parent(sweep: tuple[MlflowClient, str, Path]) -> None:
    client, _, _ = sweep
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fer_sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("fer_sweep.role") == "job"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 6
    assert {(r.data.tags["model"], r.data.tags["transforms"]) for r in children} == {
        (m, t) for m in ("cnn2", "cnn3", "resnet") for t in ("norm", "aug")
    }
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert "model=" in run.data.tags["overrides"]
        m = run.data.metrics
        assert 0.0 <= m["test_acc"] <= 1.0
        assert {
            "test_loss",
            "best_epoch",
            "best_val_acc",
            "macro_f1",
            "test_acc_angry",
            "train_loss",
            "val_acc",
            "lr",
        } <= set(m)
        assert run.data.params["trainer.epochs"] == "1"
        # Where and how it really ran, on every run: never a silent fall-back to the CPU.
        expected_device = "cuda" if torch.cuda.is_available() else "cpu"
        assert run.data.tags["device"].startswith(expected_device)
        assert run.data.tags["device_name"]
        assert run.data.tags["precision"] == run.data.params["trainer.precision"]
        assert run.data.tags["precision"] == resolve_precision(
            "auto", torch.device(run.data.tags["device"])
        )
        assert run.data.tags["fer_sweep.stop_reason"] == "epochs"
        assert m["stopped_epoch"] == 1
        if run.data.tags["model"] == "resnet":
            assert m["n_params"] == RESNET_PARAMS


def test_every_epoch_in_the_job_log(sweep: tuple[MlflowClient, str, Path]) -> None:
    # Without a progress bar (a long run in the background) each epoch still shows, in the
    # job's own log, with the learning rate the run logged for it.
    client, _, cwd = sweep
    exp = client.get_experiment_by_name("smoke")
    lrs = {
        r.data.metrics["lr"]
        for r in client.search_runs([exp.experiment_id], "tags.`fer_sweep.role` = 'job'")
    }
    logs = sorted(cwd.glob("multirun/*/*/*/*.log"))
    assert len(logs) == 6, logs
    for log in logs:
        (line,) = [ln for ln in log.read_text().splitlines() if " - epoch 1/1  train_loss " in ln]
        m = re.search(r"val_acc 0\.\d{4}  lr (\S+)  \(\d+\.\ds\)$", line)
        assert m and float(m[1]) in lrs, line


def test_artifacts_and_model_round_trip(sweep: tuple[MlflowClient, str, Path]) -> None:
    client, uri, _ = sweep
    exp = client.get_experiment_by_name("smoke")
    run = client.search_runs(
        [exp.experiment_id], "tags.model = 'cnn2' and tags.transforms = 'aug'"
    )[0]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert JOB_ARTIFACTS | {"misclassified"} <= names, names
    panels = client.list_artifacts(run.info.run_id, "misclassified")
    assert panels and all(a.path.endswith(".png") for a in panels)
    import mlflow

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert model(torch.zeros(2, 1, 48, 48)).shape == (2, 7)
