"""Hyperparameter search with Optuna: the search space, its checks, the shared study.

N worker jobs share one study, trials are pruned from the validation accuracy of each epoch,
and a killed search resumes under the same parent run (the sweeper and the workers:
``fer_sweep.sweep.searcher``).

Hydra's sweeper API launches batches of jobs and only sees a job's return value at its end
(hydra #1710, #1954), so it can neither prune nor start a trial while another trial of the
batch still runs. Here the sweeper (``OptunaSweeper``) launches ``hydra.sweeper.n_jobs`` WORKER
jobs through whatever launcher is configured (in-process, joblib, submitit, SLURM), once; each
worker asks the shared study for a trial, composes that trial's config, trains it as an
ordinary MLflow child run of the sweep's parent, reports every epoch's validation accuracy to
the study (where the pruner decides), tells the result and asks again, until ``n_trials``
trials are counted in the study or ``timeout_min`` has passed (hydra #3091's advice, Optuna's
own pattern for distributed optimization). A worker whose trial is pruned starts the next one
at once. The core never sees Optuna: a trial reports through fit's ``on_epoch`` callback.

The study lives in a journal file (``<sweep dir>/optuna.journal``, made for shared file
systems) or any storage URL given as ``hydra.sweeper.storage``; the parent run records where,
so ``sweep.resume`` finds it again. On resume, trials a killed process left RUNNING are failed
and their parameters enqueued again; finished and pruned ones are not run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from fer_sweep.errors import FerSweepError

if TYPE_CHECKING:  # optuna loads in ~0.5 s: only a search imports it
    import optuna

log = logging.getLogger(__name__)

TARGET = "hydra_plugins.fer_sweep_plugin.optuna_sweeper.OptunaSweeper"
JOURNAL = "optuna.journal"
LOCK = "search.lock"
# What a trial's MLflow run carries (the names hydra-optuna-sweeper users know, plus state).
TRIAL_NUMBER = "fer_sweep.trial_number"
INTERRUPTED = "fer_sweep.interrupted"  # a trial's user attr: stopped by a signal, run it again
RETRY_OF = "fer_sweep.retry_of"  # an enqueued trial's user attr: the trial it runs again
# a trial's user attr with hydra.sweeper.seeds_per_trial > 1: its finished seeds,
# {seed: {"value": best val_acc, "run_id": MLflow run}}; a retried trial reuses them
SEED_RUNS = "fer_sweep.seed_runs"


def is_search(config: DictConfig) -> bool:
    """Whether this multirun is a search (our Optuna sweeper) rather than a grid."""
    return str(config.hydra.sweeper.get("_target_", "")) == TARGET


# --------------------------------------------------------------------------------------------
# The search space: hydra-optuna-sweeper's grammar, read with Hydra's own override parser


# hydra.sweeper.prune_on: fit's per-epoch metrics a trial may report to the pruner
PRUNE_ON = ("val_acc", "val_acc_raw")


@dataclass(frozen=True)
class Space:
    """The searched keys with their Optuna distributions, and the overrides that stay fixed."""

    params: dict[str, Any]  # key -> optuna distribution
    fixed: list[str]

    def to_json(self) -> str:
        from optuna.distributions import distribution_to_json

        return json.dumps({k: distribution_to_json(d) for k, d in self.params.items()})

    @staticmethod
    def from_json(text: str) -> dict[str, Any]:
        from optuna.distributions import json_to_distribution

        return {k: json_to_distribution(v) for k, v in json.loads(text).items()}


def _distribution(key: str, override: Any) -> Any:
    """One sweep override -> an Optuna distribution: choice(...) -> categorical, range(a, b[,
    s]) -> int (or float) steps from a up to b exclusive, interval(a, b) -> float, with
    tag(log, ...) for a log scale and tag(int, interval(...)) for integers."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    value = override.value()
    tags = set(getattr(value, "tags", set()) or set())
    if isinstance(value, ChoiceSweep):
        choices = list(value.list)
        if any(isinstance(c, (list, dict)) for c in choices):
            raise FerSweepError(f"search space {key}: choice() takes plain values, not lists.")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(v, int) for v in (start, stop, step)):
            last = start + step * ((stop - start - 1) // step)
            return IntDistribution(int(start), int(last), step=int(step), log="log" in tags)
        n = math.floor((stop - start) / step - 1e-9)
        return FloatDistribution(float(start), float(start + n * step), step=float(step))
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if "int" in tags:
            return IntDistribution(int(low), int(high), log="log" in tags)
        return FloatDistribution(float(low), float(high), log="log" in tags)
    raise FerSweepError(
        f"search space {key}={override.get_value_element_as_str()}: use choice(...), "
        "range(a, b[, step]), interval(a, b), tag(log, interval(a, b)) or tag(int, ...)."
    )


def override_key(line: str) -> str:
    """The key an override line sets (``+a.b=1``, ``~a.b``, ``a.b=choice(1, 2)`` -> ``a.b``)."""
    return line.split("=", 1)[0].lstrip("+~")


def parse_space(params: Mapping[str, Any] | None, overrides: Sequence[str]) -> Space:
    """``hydra.sweeper.params`` plus the command line's sweep overrides (which win) -> Space.
    Overrides that sweep nothing stay fixed for every trial."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except HydraException as err:
        raise FerSweepError(f"search space: {str(err).splitlines()[0]}") from None
    space: dict[str, Any] = {}
    fixed: list[str] = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            try:
                space[key] = _distribution(key, override)
            except ValueError as err:  # Optuna's own checks: low > 0 for a log scale, ...
                raise FerSweepError(f"search space {override.input_line}: {err}") from None
            fixed = [f for f in fixed if override_key(f) != key]  # it wins
        else:
            space.pop(key, None)  # a fixed value on the command line takes the key out
            fixed.append(override.input_line)
    if not space:
        raise FerSweepError(
            "the search has no search space: give hydra.sweeper.params (an hparams_search "
            "config) or a sweep override such as 'optimizer.lr=tag(log, interval(1e-3, 0.1))'."
        )
    return Space(space, fixed)


def _format(value: Any) -> str:
    """A value as a Hydra override's right-hand side."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def suggest(trial: optuna.trial.BaseTrial, space: Mapping[str, Any]) -> list[str]:
    """The trial's values (drawn by the sampler, or enqueued) as override strings."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    out = []
    for key, d in space.items():
        if isinstance(d, CategoricalDistribution):
            value = trial.suggest_categorical(key, d.choices)
        elif isinstance(d, FloatDistribution):
            value = trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)
        else:
            value = trial.suggest_int(key, d.low, d.high, log=d.log, step=d.step)
        out.append(f"{key}={_format(value)}")
    return out


def _probes(d: Any) -> list[Any]:
    """The values of a distribution that the schema must accept: every choice, both ends."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    return [d.low, d.high]


# --------------------------------------------------------------------------------------------
# Settings, checked before the parent run exists


@dataclass(frozen=True)
class Plan:
    """What every worker needs to open the same study (written into the sweep folder)."""

    storage: str
    study_name: str
    direction: str
    n_trials: int
    n_jobs: int
    timeout_min: float | None
    space: str  # Space.to_json()
    key: str  # fingerprint of the space and the fixed overrides: sweep.resume's "same search"
    enqueue: tuple[dict[str, Any], ...] = ()  # trials run first (hydra.sweeper.enqueue_trials)
    prune_on: str = PRUNE_ON[0]  # the per-epoch metric reported to the pruner
    seeds_per_trial: int = 1  # trainer.seed, +1, ...: the trial's value is their mean

    @classmethod
    def from_dict(cls, plan: Mapping[str, Any]) -> Plan:
        """A plan as the sweep folder holds it; fields a plan written by an older fer_sweep
        lacks take their defaults here."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in plan.items() if k in names})


def search_key(space: Space) -> str:
    fixed = sorted(o for o in space.fixed if not o.startswith("sweep.resume="))
    return hashlib.sha1((space.to_json() + json.dumps(fixed)).encode()).hexdigest()[:16]


def _instantiate(node: Any, what: str, **extra: Any) -> Any:
    from hydra.utils import instantiate

    try:
        return instantiate(node, **extra)
    except Exception as err:  # Hydra wraps the class's own error: show the first line of it
        cause = err.__cause__ or err
        raise FerSweepError(
            f"hydra.sweeper.{what} ({node.get('_target_')}): {str(cause).splitlines()[0]}; "
            f"pick one of hydra/sweeper/{what}=... and set only the options it has."
        ) from None


def sampler(sweeper: DictConfig, worker: int) -> Any:
    """The configured sampler; worker N's seed is the configured seed + N (two workers with one
    seed would propose the same trials). TPE's constant_liar is set explicitly in its config
    (its default changed between optuna 4.9 and 5)."""
    node = sweeper.sampler
    seed = node.get("seed")
    return _instantiate(node, "sampler", **({"seed": seed + worker} if seed is not None else {}))


def pruner(sweeper: DictConfig) -> Any:
    return _instantiate(sweeper.pruner, "pruner")


def open_storage(url: str) -> Any:
    """A journal file (a path, or journal:///path) or an RDB URL (sqlite:///, postgresql://,
    mysql://); one clear error when it cannot be opened."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    from fer_sweep.sweep import store

    store.refuse_password(url, "hydra.sweeper.storage=")
    if store.database_driver(url) is not None:  # the driver, and the server answering
        store.check_database(url, what="the study storage hydra.sweeper.storage=")
    try:
        if "://" not in url or url.startswith("journal://"):
            path = Path(url.removeprefix("journal://")).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
            return optuna.storages.JournalStorage(backend)
        return optuna.storages.RDBStorage(url)
    except Exception as err:
        raise FerSweepError(
            f"hydra.sweeper.storage={store.redact(url)!r} cannot be opened "
            f"({str(err).splitlines()[0]}): "
            "give a writable journal file path (the default is <sweep dir>/optuna.journal) "
            "or a database URL Optuna can reach."
        ) from None


def check(config: DictConfig, space: Space, sweep_dir: Path, resumed: Any | None) -> Plan:
    """Everything that can be wrong with a search, before any trial trains and before its
    parent run is created: the settings, the sampler and pruner, every searched key and value
    against the typed schema, and the storage (``resumed``: the parent run sweep.resume
    continues, whose storage and study are used again)."""
    import importlib.util

    from fer_sweep.core.config import validate, with_values
    from fer_sweep.sweep.validation import validate_jobs

    if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
        raise FerSweepError(
            "hydra-optuna-sweeper is installed beside fer_sweep's own Optuna sweeper and "
            "registers hydra/sweeper=optuna too: pip uninstall hydra-optuna-sweeper."
        )
    sw = config.hydra.sweeper
    if int(sw.n_trials) < 1 or int(sw.n_jobs) < 1:
        raise FerSweepError(
            f"hydra.sweeper.n_trials={sw.n_trials}, n_jobs={sw.n_jobs}: both must be >= 1."
        )
    if sw.timeout_min is not None and float(sw.timeout_min) <= 0:
        raise FerSweepError(f"hydra.sweeper.timeout_min={sw.timeout_min} must be > 0 (or null).")
    if sw.direction not in ("maximize", "minimize"):
        raise FerSweepError(f"hydra.sweeper.direction={sw.direction!r}: maximize or minimize.")
    sampler(sw, 0)
    pruner(sw)
    base = validate(config)
    prune_on = str(sw.prune_on)  # defaulted by the sweeper's schema (OptunaSweeperConf)
    if prune_on not in PRUNE_ON:
        raise FerSweepError(
            f"hydra.sweeper.prune_on={prune_on}: one of {', '.join(PRUNE_ON)} (the per-epoch "
            "validation accuracy of the weights fit keeps, or of the un-averaged weights)."
        )
    if prune_on == "val_acc_raw" and not base.trainer.val_raw:
        raise FerSweepError(
            "hydra.sweeper.prune_on=val_acc_raw reports the un-averaged weights' accuracy, "
            "which fit measures only with trainer.val_raw=true: add it (or prune_on=val_acc)."
        )
    groups = {}
    for key, d in space.params.items():
        if "." not in key:  # a config group (model=choice(cnn2, cnn3)): each option composed
            groups[key] = _probes(d)
            continue
        for value in _probes(d):
            try:
                with_values(base, {key: value})
            except FerSweepError as err:
                raise FerSweepError(
                    f"search space {key}={_format(value)} (hydra.sweeper.params or the "
                    f"command line): {err}"
                ) from None
    for key, values in groups.items():  # compose each option: an unknown one is named
        validate_jobs(config, [[*space.fixed, f"{key}={_format(v)}"] for v in values])
    seeds = int(sw.seeds_per_trial)
    if seeds < 1:
        raise FerSweepError(
            f"hydra.sweeper.seeds_per_trial={seeds}: give 1 (one run a trial) or more (the "
            "trial's value is the mean over trainer.seed, trainer.seed + 1, ...)."
        )
    if seeds > 1:
        if "trainer.seed" in space.params:
            raise FerSweepError(
                f"hydra.sweeper.seeds_per_trial={seeds} sets each trial's seeds itself: take "
                "trainer.seed out of the search space (or search it with seeds_per_trial=1)."
            )
        try:  # the last seed a trial trains must be a seed too
            with_values(base, {"trainer.seed": base.trainer.seed + seeds - 1})
        except FerSweepError as err:
            raise FerSweepError(
                f"hydra.sweeper.seeds_per_trial={seeds} from trainer.seed={base.trainer.seed}: "
                f"{err}"
            ) from None
    enqueue = _enqueued(sw.get("enqueue_trials") or [], space)
    if resumed is not None:
        tags = resumed.data.tags
        storage, study_name = tags.get(STORAGE_TAG), tags.get(STUDY_TAG)
        if not storage or not study_name:
            raise FerSweepError(
                f"sweep.resume: parent run {resumed.info.run_id} is not a search of this "
                "sweeper (no study recorded on it)."
            )
        was = int(tags.get(SEEDS_TAG, "1"))
        if was != seeds:
            raise FerSweepError(
                f"sweep.resume: the search of parent run {resumed.info.run_id} scores each "
                f"trial on {was} seed(s), this command on {seeds}: resume it with "
                f"hydra.sweeper.seeds_per_trial={was}."
            )
    else:
        storage = sw.storage or str((sweep_dir / JOURNAL).resolve())
        study_name = sw.study_name or f"search-{sweep_dir.name}"
    open_storage(storage)
    plan = Plan(
        storage=storage,
        study_name=study_name,
        direction=str(sw.direction),
        n_trials=int(sw.n_trials),
        n_jobs=int(sw.n_jobs),
        timeout_min=None if sw.timeout_min is None else float(sw.timeout_min),
        space=space.to_json(),
        key=search_key(space),
        enqueue=enqueue,
        prune_on=prune_on,
        seeds_per_trial=seeds,
    )
    return plan


def _enqueued(entries: Any, space: Space) -> tuple[dict[str, Any], ...]:
    """hydra.sweeper.enqueue_trials, checked: each entry maps searched keys to values inside
    their distributions (a trial outside the space would fail only when it is asked for)."""
    from omegaconf import OmegaConf

    out = []
    for i, entry in enumerate(OmegaConf.to_container(OmegaConf.create(list(entries)))):
        where = f"hydra.sweeper.enqueue_trials[{i}]"
        if not isinstance(entry, dict) or not entry:
            raise FerSweepError(f"{where}={entry!r}: give a mapping of searched keys to values.")
        for key, value in entry.items():
            d = space.params.get(key)
            if d is None:
                raise FerSweepError(
                    f"{where}: {key} is not searched (the space has "
                    f"{', '.join(space.params)}); enqueue only searched keys."
                )
            try:
                inside = d._contains(d.to_internal_repr(value))
            except (ValueError, TypeError):
                inside = False
            if not inside:
                raise FerSweepError(
                    f"{where}: {key}={_format(value)} is outside its search space {d}; "
                    "widen the space or change the value."
                )
        out.append(entry)
    return tuple(out)


STORAGE_TAG = "fer_sweep.study_storage"
STUDY_TAG = "fer_sweep.study_name"
SPACE_TAG = "fer_sweep.search_space"
DIRECTION_TAG = "fer_sweep.study_direction"
SEEDS_TAG = "fer_sweep.seeds_per_trial"


def parent_tags(plan: Plan) -> dict[str, str]:
    """Where the study is, and its space: what sweep.resume and the report read back."""
    return {
        STORAGE_TAG: plan.storage,
        STUDY_TAG: plan.study_name,
        SPACE_TAG: plan.space,
        DIRECTION_TAG: plan.direction,
        SEEDS_TAG: str(plan.seeds_per_trial),
    }


# --------------------------------------------------------------------------------------------
# The study


def load_study(plan: Plan, sweeper: DictConfig, worker: int) -> optuna.Study:
    """The shared study, with this process's sampler and pruner (neither is stored with a
    study: every process passes them), built from ``hydra.sweeper``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=plan.study_name,
        storage=open_storage(plan.storage),
        sampler=sampler(sweeper, worker),
        pruner=pruner(sweeper),
        direction=plan.direction,
        load_if_exists=True,
    )


def counted(study: optuna.Study) -> int:
    """Trials that count towards n_trials: finished, pruned, running, and failed for a reason
    of their own (a trial stopped by a signal or a kill is run again, so it does not count)."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            n += 1
        elif t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED):
            n += 1
    return n


def recover(study: optuna.Study) -> list[int]:
    """After a kill: trials left RUNNING are failed (no process runs them any more) and, with
    the trials a signal stopped, enqueued again with the same parameters (once each), carrying
    the seeds they had finished (seeds_per_trial > 1), which are not trained again."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    again = []
    for t in trials:
        if t.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(t._trial_id, INTERRUPTED, True)
            study.tell(t.number, state=TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED)):
            continue
        if t.number not in retried:
            attrs = {RETRY_OF: t.number}
            if t.user_attrs.get(SEED_RUNS):  # seeds it finished: not trained again
                attrs[SEED_RUNS] = t.user_attrs[SEED_RUNS]
            study.enqueue_trial(t.params, user_attrs=attrs)
            again.append(t.number)
    return again
