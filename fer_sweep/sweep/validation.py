"""Every job of a grid sweep checked before its parent run opens, cheaply.

Hydra composes a job's config only when the job starts, so a bad value in one job of a grid
(``model=cnn2,nope``; ``trainer.epochs=1,0``) would open a parent run for a sweep that cannot
run, or let earlier jobs train first. Here the grid is expanded with Hydra's public override
parser, each distinct combination of config-group options is composed ONCE (about 0.3 s each),
and each job's value overrides are applied to that composition and checked by the schema
(microseconds): a 300-seed grid costs one composition, not 300.
"""

from __future__ import annotations

import itertools

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fer_sweep.errors import FerSweepError

GRID_SWEEPERS = (".BasicSweeper", ".FerSweepSweeper")  # sweepers that expand a grid up front


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides as Hydra's basic sweeper expands them (the cartesian product of the
    sweep's params and the command line, in order); None for other sweepers (Optuna draws its
    values while it runs, so they cannot be listed up front)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not str(config.hydra.sweeper.get("_target_", "")).endswith(GRID_SWEEPERS):
        return None
    params = config.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    choices = []
    for override in OverridesParser.create().parse_overrides(args):
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([f"{key}={override.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*choices)]


def grid_jobs(config: DictConfig) -> list[list[str]] | None:
    """sweep_jobs, or None where the grid cannot be listed up front (another sweeper, or a
    syntax the basic sweeper rejects: it then says so itself)."""
    from hydra.errors import HydraException

    try:
        return sweep_jobs(config)
    except HydraException:
        return None


def grid_key(jobs: list[list[str]] | None) -> str | None:
    """A fingerprint of a grid sweep's jobs (without sweep.resume itself), to tell whether a
    resumed sweep is the same grid; None for other sweepers."""
    import hashlib
    import json

    if jobs is None:
        return None
    jobs = [[o for o in job if not o.startswith("sweep.resume=")] for job in jobs]
    return hashlib.sha1(json.dumps(jobs).encode()).hexdigest()[:16]


def _groups(loader: object) -> set[str]:
    """Every config group of the search path (model, table2, hydra/launcher, ...)."""
    found: set[str] = set()
    todo = [""]
    while todo:
        parent = todo.pop()
        for name in loader.list_groups(parent):  # type: ignore[attr-defined]
            path = f"{parent}/{name}" if parent else name
            found.add(path)
            todo.append(path)
    return found


def _split(overrides: list, groups: set[str]) -> tuple[tuple[str, ...], list]:
    """(config-group choices and anything that needs a real composition, as override strings;
    the plain key=value overrides that the schema can check on an existing composition)."""
    compose, values = [], []
    for override in overrides:
        key = override.key_or_group
        if (
            override.is_add()
            or override.is_delete()
            or override.is_force_add()
            or key in groups
            or key.startswith("hydra")
            or "${" in override.input_line
        ):
            compose.append(override.input_line)
        else:
            values.append(override)
    return tuple(compose), values


def validate_jobs(config: DictConfig, jobs: list[list[str]] | None) -> None:
    """Compose and validate every job of a grid sweep (``jobs``: grid_jobs(config)); the first
    bad one is a FerSweepError naming the job and its own overrides."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from fer_sweep.core.config import Config, validate, with_values

    if not jobs or not GlobalHydra.instance().is_initialized():
        return
    loader = GlobalHydra.instance().config_loader()
    groups = _groups(loader)
    common = set.intersection(*(set(job) for job in jobs))
    parser = OverridesParser.create()  # one parser: building one costs milliseconds
    parsed: dict[str, object] = {}
    checked: dict[tuple[str, ...], Config] = {}
    for num, overrides in enumerate(jobs):
        # Hydra swallows a callback's exceptions (a warning, then the sweep goes on), so
        # composition errors (model=nope) become ours, which the caller turns into an exit.
        try:
            for text in overrides:
                if text not in parsed:
                    (parsed[text],) = parser.parse_overrides([text])
            group_part, values = _split([parsed[t] for t in overrides], groups)
            if group_part not in checked:
                checked[group_part] = validate(loader.load_sweep_config(config, list(group_part)))
            with_values(checked[group_part], {o.key_or_group: o.value() for o in values})
        except (FerSweepError, HydraException, OmegaConfBaseException, ValueError) as err:
            own = " ".join(o for o in overrides if o not in common)
            why = str(err).split("\nConfig search path:")[0].rstrip()  # Hydra's search path
            raise FerSweepError(f"job #{num} ({own}): {why}") from None
