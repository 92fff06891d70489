"""Hydra's side of a config: which Hydra job this process is (``hydra_job``), and the real
config outside a Hydra run: ``conf/`` composed by Hydra with overrides, then validated by the
typed schema, for programs and tests that need a run's exact config without launching one (the
benchmark, the budget's and the recipe's tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from fer_sweep.core.config import Config, validate
from fer_sweep.errors import ConfigError, FerSweepError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def hydra_job() -> tuple[bool, Path | None, int, list[str]]:
    """(multirun?, sweep dir, job number, overrides) of the current Hydra job, if any."""
    if not HydraConfig.initialized():
        return False, None, 0, []
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return (
        multirun,
        Path(hc.sweep.dir) if multirun else None,
        int(hc.job.get("num", 0) or 0),
        list(hc.overrides.task),
    )


def compose_config(overrides: Sequence[str]) -> Config:
    """The real config: conf/ composed by Hydra with overrides, then fer_sweep's validate."""
    from hydra import compose, initialize_config_dir

    if not (CONF_DIR / "config.yaml").is_file():
        raise FerSweepError(
            f"fer_sweep's config folder {CONF_DIR} is missing; use "
            "a source checkout installed with `pip install -e .`."
        )
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="fer_sweep"):
        try:
            cfg = compose(config_name="config", overrides=list(overrides))
        except Exception as err:  # Hydra's own errors: a bad --override, usually
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"cannot compose the config with {list(overrides)}: {first}"
            ) from None
    return validate(cfg)
