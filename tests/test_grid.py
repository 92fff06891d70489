"""The grid a sweep is checked, counted and resumed by is the grid Hydra's basic sweeper runs."""

from __future__ import annotations

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
