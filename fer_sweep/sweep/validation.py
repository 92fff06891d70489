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


def _is_grid(config: DictConfig) -> bool:
    return str(config.hydra.sweeper.get("_target_", "")).endswith(GRID_SWEEPERS)


def _arguments(config: DictConfig) -> list[str]:
    """A grid sweep's arguments as Hydra's basic sweeper reads them: its params, then the
    command line's overrides, without sweep.resume (which is not part of any job's identity)."""
    params = config.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    return [a for a in args if not a.startswith("sweep.resume=")]


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides exactly as Hydra's basic sweeper expands them (its own
    split_arguments: the cartesian product, where a command-line override replaces the sweep's
    param of the same key, e.g. ``experiment=table2 table2=row5,row6`` is 2 jobs, not 7 x 2);
    None for other sweepers (Optuna draws its values while it runs, so they cannot be listed up
    front)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not _is_grid(config):
        return None
    overrides = OverridesParser.create().parse_overrides(_arguments(config))
    (jobs,) = BasicSweeper.split_arguments(overrides, None)
    return [[o for o in job if not o.startswith("sweep.resume=")] for job in jobs]


def grid_jobs(config: DictConfig) -> list[list[str]] | None:
    """sweep_jobs, or None where the grid cannot be listed up front (another sweeper, or a
    syntax the basic sweeper rejects: it then says so itself)."""
    from hydra.errors import HydraException

    try:
        return sweep_jobs(config)
    except HydraException:
        return None


def grid_key(config: DictConfig) -> str | None:
    """A fingerprint of a grid sweep's arguments, to tell whether a resumed sweep is the same
    grid; None for other sweepers. It hashes every argument's values expanded one argument at
    a time (a param that the command line replaces counted too), the form the first sweeps were
    fingerprinted in, so that every sweep begun since still resumes."""
    import hashlib
    import json

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if not _is_grid(config):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(_arguments(config))
    except HydraException:
        return None
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [f"{o.get_key_element()}={o.get_value_element_as_str()}"]
        for o in parsed
    ]
    jobs = [list(job) for job in itertools.product(*choices)]
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
