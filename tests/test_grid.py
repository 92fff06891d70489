"""The grid a sweep is checked, counted and resumed by is the grid Hydra's basic sweeper runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from fer_sweep.sweep.validation import grid_key, sweep_jobs

SWEEPER = "hydra_plugins.fer_sweep_plugin.FerSweepSweeper"
TABLE2_ROWS = "row1,row2,row3,row4,row5,row6,row7"  # conf/experiment/table2.yaml's params


def _config(task: list[str], params: dict[str, str] | None = None) -> DictConfig:
    sweeper = {"_target_": SWEEPER, "max_batch_size": None, "params": params or {}}
    return OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": task}}})


def test_the_command_line_replaces_the_experiments_param_of_the_same_key() -> None:
    """experiment=table2 table2=row5,row6 is two jobs, as Hydra runs it, not 7 x 2 (before:
    every one of 14 combinations checked, and progress said 'job 1/14')."""
    cfg = _config(
        ["experiment=table2", "table2=row5,row6", "trainer.seed=0,1", "sweep.resume=latest"],
        {"table2": TABLE2_ROWS},
    )
    assert sweep_jobs(cfg) == [
        ["table2=row5", "experiment=table2", "trainer.seed=0"],
        ["table2=row5", "experiment=table2", "trainer.seed=1"],
        ["table2=row6", "experiment=table2", "trainer.seed=0"],
        ["table2=row6", "experiment=table2", "trainer.seed=1"],
    ]
    assert len(sweep_jobs(_config(["experiment=table2"], {"table2": TABLE2_ROWS}))) == 7


def test_a_sweeps_fingerprint_is_the_one_it_began_with() -> None:
    """sweep.resume compares this with the parent run's fer_sweep.grid tag: the fingerprint of
    Table 2's ResNet multirun, begun 6 December 2026, must not change under it."""
    task = [
        "experiment=table2",
        "table2=row5,row6,row7",
        "mlflow.tracking_uri=sqlite:////work/main/runs/table2/mlflow.db",
        "mlflow.experiment=table2",
        "trainer.checkpoint_dir=/work/main/runs/table2/checkpoints",
        "trainer.progress=false",
        "trainer.threads=2",
    ]
    cfg = _config(task, {"table2": TABLE2_ROWS})
    assert grid_key(cfg) == "3b5ae58c222f750f"
    assert grid_key(_config([*task, "sweep.resume=latest"], {"table2": TABLE2_ROWS})) == (
        "3b5ae58c222f750f"
    )
    assert grid_key(_config([*task[:1], "table2=row5,row6"], {"table2": TABLE2_ROWS})) != (
        "3b5ae58c222f750f"
    )
    assert grid_key(OmegaConf.create({"hydra": {"sweeper": {"_target_": "x.Optuna"}}})) is None


def test_another_hydra_apps_grid_is_still_checked_before_its_first_job(tmp_path: Path) -> None:
    """fer_sweep's plugin points Hydra's `hydra/sweeper=basic` at its sweeper for every Hydra app
    in the environment; an app without fer_sweep's up-front validation keeps Hydra's own check:
    an option that does not exist stops the sweep before any job runs, not after some ran."""
    (tmp_path / "conf" / "db").mkdir(parents=True)
    (tmp_path / "conf" / "config.yaml").write_text("defaults:\n  - db: mysql\n  - _self_\n")
    (tmp_path / "conf" / "db" / "mysql.yaml").write_text("name: mysql\n")
    (tmp_path / "app.py").write_text(
        "import hydra\n\n\n"
        "@hydra.main(version_base=None, config_path='conf', config_name='config')\n"
        "def main(cfg):\n    print('ran', cfg.db.name, flush=True)\n\n\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "app.py", "-m", "db=mysql,nosuch", "hydra.sweep.dir=out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "nosuch" in proc.stderr, proc.stderr[-2000:]
    assert "ran" not in proc.stdout, proc.stdout  # before: job 0 ran, then job 1 failed
    assert "FerSweepSweeper" in _sweeper_of(tmp_path)  # it was fer_sweep's sweeper all along


def _sweeper_of(app_dir: Path) -> str:
    """The sweeper class that `hydra/sweeper=basic` names in ``app_dir``'s app."""
    out = subprocess.run(
        [sys.executable, "app.py", "--cfg", "hydra", "--package", "hydra.sweeper"],
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out.stdout


def test_fer_sweeps_own_grid_is_composed_once_not_twice() -> None:
    """fer_sweep's jobs were all composed and checked before the parent run opened: its sweeper
    skips Hydra's second composition of every batch (~0.15 s a job) for them alone."""
    from hydra_plugins.fer_sweep_plugin import PARENT_CALLBACK, FerSweepSweeper

    sweeper = FerSweepSweeper(max_batch_size=None, params=None)
    sweeper.hydra_context = None  # no config loader: any composition would fail
    own = {"callbacks": {"mlflow_parent": {"_target_": PARENT_CALLBACK}}}
    sweeper.config = OmegaConf.create({"hydra": own})
    sweeper.validate_batch_is_legal([["model=cnn2"]])
    sweeper.config = OmegaConf.create({"hydra": {"callbacks": {}}})
    with pytest.raises((AttributeError, AssertionError)):  # Hydra's check, which composes
        sweeper.validate_batch_is_legal([["model=cnn2"]])
