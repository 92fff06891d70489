"""The real config outside a Hydra run: ``conf/`` composed by Hydra with overrides, then
validated by the typed schema. For programs and tests that need a run's exact config without
launching one (the benchmark, the budget's and the recipe's tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fer_sweep.core.config import Config, validate
from fer_sweep.errors import ConfigError, FerSweepError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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
