"""report --export: a finished run as a folder anyone can check without the MLflow store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from fer_sweep.sweep.job import TRIAL_STATE
from fer_sweep.tools.report import export
from tests.conftest import migrated_store, real_data, run_cli, tiny_run


def test_epoch_check_finds_gaps_and_repeats() -> None:
    assert export.epoch_check([0, 1, 2])["exactly_once"] is True
    gap = export.epoch_check([0, 2])
    assert gap["exactly_once"] is False and gap["missing"] == [1] and gap["epochs"] == 3
    twice = export.epoch_check([0, 1, 1, 2])
    assert twice["exactly_once"] is False and twice["repeated"] == [1]


@pytest.mark.slow
def test_bundles_recompute_the_logged_test_accuracy(tmp_path: Path) -> None:
    uri = migrated_store(tmp_path / "m.db")
    proc = run_cli(
        [
            "-m",
            "model=cnn2",
            "transforms=norm,aug",
            *tiny_run(limit_per_class=20, epochs=3, synthetic=not real_data()),
            f"mlflow.tracking_uri={uri}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "results"
    proc = run_cli(
        ["--tracking-uri", uri, "--export", str(out)], cwd=tmp_path, module="fer_sweep.report"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 2 and sorted(proc.stdout.split()) == [str(f) for f in folders]
    client = MlflowClient(uri)
    for folder in folders:
        info = json.loads((folder / "metrics.json").read_text())
        run = client.get_run(info["run_id"])
        # the predictions give back exactly the accuracy the run logged
        with (folder / "predictions.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == info["test_images"] == int(run.data.params["data.n_test"])
        acc = sum(r["true"] == r["predicted"] for r in rows) / len(rows)
        assert acc == pytest.approx(run.data.metrics["test_acc"], abs=1e-12)
        assert info["test_acc_recomputed"] == pytest.approx(acc, abs=1e-12)
        # each path is a real test image of its class under the data root
        config = yaml.safe_load((folder / "config.yaml").read_text())
        root = Path(json.loads(_artifact(client, info["run_id"], "data.json", tmp_path))["root"])
        assert config["data"]["limit_per_class"] == 20
        for r in rows:
            assert r["path"].lower().startswith(f"test/{r['true']}/")
            assert (root / r["path"]).is_file(), r["path"]
        # one line per epoch, each exactly once, with the rate it trained with
        with (folder / "history.csv").open() as f:
            history = list(csv.DictReader(f))
        assert [int(h["epoch"]) for h in history] == [1, 2, 3]
        assert all(float(h["lr"]) == 0.01 and h["val_acc"] and h["resumes"] == "0" for h in history)
        assert info["epochs_logged"] == {
            "epochs": 3,
            "exactly_once": True,
            "repeated": [],
            "missing": [],
        }
        assert info["resumes"] == 0 and info["status"] == "FINISHED"


def _artifact(client: MlflowClient, run_id: str, path: str, tmp: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp))).read_text()


def test_export_of_nothing_finished_is_one_line(tmp_path: Path) -> None:
    uri = migrated_store(tmp_path / "m.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("fer_sweep")
    parent = client.create_run(exp, tags={"fer_sweep.role": "parent"}).info.run_id
    client.create_run(exp, tags={"mlflow.parentRunId": parent, "fer_sweep.role": "job"})
    # a pruned trial ends FINISHED but was never tested: no bundle, and no error from it
    pruned = {"mlflow.parentRunId": parent, "fer_sweep.role": "job", TRIAL_STATE: "PRUNED"}
    client.set_terminated(client.create_run(exp, tags=pruned).info.run_id, status="FINISHED")
    proc = run_cli(
        ["--tracking-uri", uri, "--export", str(tmp_path / "r"), "--parent", parent],
        cwd=tmp_path,
        module="fer_sweep.report",
    )
    assert proc.returncode == 2 and "nothing to export" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
