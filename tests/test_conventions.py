"""MLflow's environment conventions and the once-per-sweep data check, as a user meets them."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_cli, tiny_run

pytestmark = pytest.mark.slow  # every test here starts the CLI

TINY = tiny_run(limit_per_class=3, synthetic=True)


def test_missing_data_stops_a_sweep_once_before_its_parent_run(tmp_path: Path) -> None:
    proc = run_cli(
        [
            "-m",
            "model=cnn2,cnn3",
            "transforms=norm,aug",
            "data.limit_per_class=3",
            "trainer.epochs=1",
            f"data.root={tmp_path / 'nowhere'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("FER2013 not found") == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # no store, no parent run, no job


def test_mlflow_environment_variables_are_honoured_and_overrides_win(tmp_path: Path) -> None:
    env_uri = f"sqlite:///{tmp_path / 'env.db'}"
    env = {"MLFLOW_TRACKING_URI": env_uri, "MLFLOW_EXPERIMENT_NAME": "from_env"}
    proc = run_cli(["-m", "trainer.seed=0,1", *TINY], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()
    exp = MlflowClient(env_uri).get_experiment_by_name("from_env")
    assert exp is not None
    assert len(MlflowClient(env_uri).search_runs([exp.experiment_id])) == 3  # parent + 2 jobs
    # The side commands read the same variables ...
    report = run_cli(
        ["--out", str(tmp_path / "rep"), "--no-log"],
        cwd=tmp_path,
        module="fer_sweep.report",
        env=env,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "from_env" in (tmp_path / "rep" / "table2.md").read_text()
    # ... and an explicit setting wins over them.
    own_uri = f"sqlite:///{tmp_path / 'own.db'}"
    proc = run_cli(
        [*TINY, f"mlflow.tracking_uri={own_uri}", "mlflow.experiment=own"], cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert MlflowClient(own_uri).get_experiment_by_name("own") is not None
    flag = run_cli(
        ["--tracking-uri", own_uri, "--experiment", "nope"],
        cwd=tmp_path,
        module="fer_sweep.report",
        env=env,
    )
    assert flag.returncode == 2 and "no experiment 'nope'" in flag.stderr
