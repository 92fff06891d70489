"""fer_sweep's Hydra plugin: the config schema's defaults, and the grid sweeper.

Schema: every config group (data, model, ..., mlflow) gets an option ``schema`` holding all its
settings with their defaults, made from fer_sweep.core.config's dataclasses, so the defaults are
written in one place; each option file in conf/ starts from it (``defaults: [schema, _self_]``)
and lists only what it changes. Hydra imports this package in every process that composes a
config (the command, joblib and submitit workers, tests), before composing: registering here is
Hydra's own convention for plugins.

Sweeper: Hydra's basic sweeper without its per-job re-composition.

Hydra's BasicSweeper composes every job of a batch once more before launching it
(``validate_batch_is_legal``, ~0.15 s a job: 45 s before the first job of a 300-job grid, the
whole grid being one batch). fer_sweep has already composed and checked every job before the
sweep's parent run opened (fer_sweep.sweep.validation: one composition per combination of
config-group options, the schema for the values), so this sweeper skips the second pass.
Everything else — the grid, the batches, the params, the launchers — is the basic sweeper's.
Hydra finds it as a plugin in this namespace package; it is the default grid sweeper
(this package points Hydra's own `hydra/sweeper=basic` entry at it). That entry, like the
``schema`` options, is registered for every Hydra app in the environment: an app without
fer_sweep's parent-run callback keeps the basic sweeper's check unchanged.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fer_sweep.core.config import SCHEMA_GROUPS, schema_defaults

PARENT_CALLBACK = "fer_sweep.sweep.tracking.MultirunParentCallback"


class FerSweepSweeper(BasicSweeper):
    """The basic sweeper, trusting fer_sweep's up-front validation of every job.

    Hydra's `hydra/sweeper=basic` is one entry for every Hydra app in the environment: another
    app (without fer_sweep's callback, which validates) keeps the basic sweeper's own check."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """fer_sweep's jobs: done once for the whole grid in
        MultirunParentCallback.on_multirun_start; any other app's: Hydra's check."""
        callbacks = (self.config.hydra.get("callbacks") or {}).values() if self.config else ()
        if not any(c.get("_target_") == PARENT_CALLBACK for c in callbacks):
            super().validate_batch_is_legal(batch)


# The default grid sweeper: Hydra's own `hydra/sweeper=basic` entry, pointed at this sweeper.
# Stored here rather than shadowed by a conf/hydra/sweeper/basic.yaml, which Hydra would match
# against its schema of that name with a deprecation warning at every composition (in joblib
# and submitit workers too, where no warning filter of the command's reaches).
ConfigStore.instance().store(
    group="hydra/sweeper",
    name="basic",
    node=BasicSweeperConf(_target_=f"{__name__}.FerSweepSweeper"),  # Hydra's schema, our class
    provider="fer_sweep",
)


@dataclass
class OptunaSweeperConf:
    """hydra/sweeper=optuna: fer_sweep's own Optuna search, with hydra-optuna-sweeper's setting
    names; the sampler and the pruner are option groups (conf/hydra/sweeper/sampler/,
    conf/hydra/sweeper/pruner/)."""

    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])
    _target_: str = "hydra_plugins.fer_sweep_plugin.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sampler and pruner are built in each worker, not here
    sampler: Any = MISSING
    pruner: Any = MISSING
    direction: str = "maximize"  # the trials' best validation accuracy
    study_name: str | None = None  # default: search-<sweep folder name>
    # a journal file path (default <sweep dir>/optuna.journal) or an Optuna RDB URL
    storage: str | None = None
    n_trials: int = 20  # trials counted in the study (finished, pruned, failed), resumes too
    n_jobs: int = 1  # worker jobs = trials at once (through hydra/launcher)
    timeout_min: float | None = None  # no new trial after this many minutes of the command
    # the per-epoch metric a trial reports to the pruner: val_acc (the weights fit validates
    # and keeps) or val_acc_raw (the un-averaged ones; needs trainer.val_raw=true)
    prune_on: str = "val_acc"
    # replicates: each trial trains trainer.seed, +1, ... (one after another in its worker);
    # its value is their mean best validation accuracy; the pruner watches the first seed
    seeds_per_trial: int = 1
    params: dict[str, str] | None = None  # the search space: key -> choice/range/interval
    # trials to run first, before the sampler proposes any (e.g. the current recipe): each a
    # mapping of searched keys to values (keys left out are sampled); Optuna's enqueue_trial
    enqueue_trials: list[Any] = field(default_factory=list)


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="fer_sweep"
)

for _group in SCHEMA_GROUPS:
    ConfigStore.instance().store(
        group=_group, name="schema", node=schema_defaults(_group), provider="fer_sweep"
    )
