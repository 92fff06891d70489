"""The Optuna sweeper (``hydra/sweeper=optuna``) and its worker jobs; the space, the checks
and the study are ``fer_sweep.sweep.search``'s."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from fer_sweep.core.interrupt import Interrupted
from fer_sweep.errors import FerSweepError
from fer_sweep.sweep import job, store, tracking
from fer_sweep.sweep.job import TRIAL_STATE, Pruned, RunHooks
from fer_sweep.sweep.progress import progress_line, say_progress
from fer_sweep.sweep.search import (
    INTERRUPTED,
    LOCK,
    SEED_RUNS,
    TRIAL_NUMBER,
    Plan,
    Space,
    counted,
    load_study,
    override_key,
    recover,
    suggest,
)

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


def _sweep_overrides(arguments: Sequence[str]) -> set[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(arguments))
    return {o.input_line for o in parsed if o.is_sweep_override()}


def sweep(config: DictConfig, launcher: Any, arguments: list[str]) -> list[Any]:
    """The Optuna sweeper's part (hydra_plugins/fer_sweep_plugin/optuna_sweeper.py): open the
    study the parent-run callback planned (on sweep.resume: recover what a kill left RUNNING),
    launch ``n_jobs`` worker jobs, once, and write the best trial's results."""
    sweep_dir = Path(config.hydra.sweep.dir)
    info = tracking.parent_info(sweep_dir)
    if info is None or "search" not in info:  # the parent-run callback checks and plans
        raise FerSweepError(
            "the Optuna sweeper needs fer_sweep's parent-run callback "
            "(hydra.callbacks.mlflow_parent in conf/config.yaml): restore it."
        )
    plan = Plan.from_dict(info["search"])
    study = load_study(plan, config.hydra.sweeper, 0)
    if info.get("resumed"):
        # a trial whose process is gone: its run KILLED, its trial failed and tried again
        tracking.kill_orphaned_jobs(
            info["tracking_uri"], info["parent_run_id"], {TRIAL_STATE: "FAIL"}
        )
        again = recover(study)
        log.info(
            "sweep.resume: study %r has %d counted trials; running again: %s",
            plan.study_name,
            counted(study) - len(again),
            again or "none",
        )
    elif not study.trials:  # a new study: the trials to run first, in order
        for params in plan.enqueue:
            study.enqueue_trial(params)
    swept = _sweep_overrides(arguments)
    fixed = [a for a in arguments if a not in swept and not a.startswith("sweep.worker=")]
    jobs = [[*fixed, f"sweep.worker={i}"] for i in range(plan.n_jobs)]
    returns = launcher.launch(jobs, initial_job_idx=0)
    write_results(study, sweep_dir)
    return [returns]


def write_results(study: optuna.Study, sweep_dir: Path) -> None:
    """optimization_results.yaml in the sweep folder (hydra-optuna-sweeper's file): the best
    trial's parameters and value, logged on the parent run at the sweep's end."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    best = study.best_trial
    results = {
        "name": "optuna",
        "best_params": dict(best.params),
        "best_value": best.value,
        "best_trial": best.number,
    }
    (sweep_dir / tracking.OPTUNA_RESULTS).write_text(OmegaConf.to_yaml(OmegaConf.create(results)))


def trial_hooks(
    trial: optuna.Trial, overrides: list[str], prune_on: str, reports: bool = True
) -> RunHooks:
    """What a trial adds to an ordinary job: its overrides and tags, and (``reports``) an epoch
    callback that reports the validation accuracy (``prune_on``: fit's metric of that name) to
    the study and stops the run when the pruner says so. The trial's value stays the best
    val_acc whatever the pruner compares. The step reported is the number of epochs trained
    (fit's ``epoch`` is 0-based), so a pruner's ``min_resource`` or ``n_warmup_steps`` counts
    epochs: ASHA's rungs at 1, 4, 16 are after 1, 4 and 16 epochs, and Hyperband's auto
    ``max_resource`` is the trials' length."""
    best = {"val_acc": -math.inf}

    def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
        best["val_acc"] = max(best["val_acc"], float(metrics["val_acc"]))
        trial.report(float(metrics[prune_on]), epoch + 1)
        if trial.should_prune():
            raise Pruned(epoch, best["val_acc"])

    return RunHooks(
        overrides=overrides,
        tags={TRIAL_NUMBER: str(trial.number), TRIAL_STATE: "RUNNING"},
        on_epoch=on_epoch if reports else None,
    )


def run_seeds(trial: optuna.Trial, config_name: str, overrides: list[str], plan: Plan) -> float:
    """The trial's training: one run, or with ``seeds_per_trial`` > 1 one run per seed
    (trainer.seed, +1, ...; one after another, each an MLflow child run tagged with the trial's
    number) and the mean of their best validation accuracies. Only the first seed reports to
    the pruner: it is the same seed in every trial, so the pruner compares like with like, and
    a trial it stops trains no other seed. Each finished seed is recorded on the trial
    (SEED_RUNS), so a retried trial (sweep.resume) trains only the seeds it lacks and takes
    over the finished seeds' runs."""
    from hydra import compose

    cfg = compose(config_name, overrides, return_hydra_config=True)
    if plan.seeds_per_trial == 1:
        return job.run_trial(cfg, trial_hooks(trial, overrides, plan.prune_on))
    first = int(cfg.trainer.seed)
    others = [o for o in overrides if override_key(o) != "trainer.seed"]
    done = dict(trial.user_attrs.get(SEED_RUNS, {}))  # a retried trial's finished seeds
    if done:
        _take_over(trial, done, str(first), cfg.mlflow.tracking_uri, plan.prune_on)
    for seed in range(first, first + plan.seeds_per_trial):
        if str(seed) in done:
            continue
        n = seed - first + 1
        log.info("trial %d: seed %d (%d of %d)", trial.number, seed, n, plan.seeds_per_trial)
        seeded = [*others, f"trainer.seed={seed}"]
        hooks = trial_hooks(trial, seeded, plan.prune_on, reports=seed == first)
        try:
            value = job.run_trial(compose(config_name, seeded, return_hydra_config=True), hooks)
        except Pruned:
            raise
        except Exception:  # the trial fails with it; the runs of its earlier seeds stay
            log.error("trial %d: seed %d of %d failed", trial.number, n, plan.seeds_per_trial)
            raise
        done[str(seed)] = {"value": value, "run_id": hooks.run_id}
        trial.set_user_attr(SEED_RUNS, done)
    return statistics.fmean(float(d["value"]) for d in done.values())


def _take_over(
    trial: optuna.Trial, done: Mapping[str, Any], first: str, tracking_uri: str, prune_on: str
) -> None:
    """A retried trial's seeds that the killed trial finished: their runs now carry this
    trial's number (they are its runs, not run twice), and the first seed's epochs are reported
    again, so later trials' pruners compare with this trial's curve too."""
    client = store.connect(tracking_uri)
    for seed, d in done.items():
        tracking.set_tags(client, d["run_id"], {TRIAL_NUMBER: str(trial.number)})
        log.info("trial %d: seed %s already trained (run %s)", trial.number, seed, d["run_id"])
        if seed == first:
            for m in client.get_metric_history(d["run_id"], prune_on):
                trial.report(float(m.value), int(m.step) + 1)


def _next_trial(
    study: optuna.Study, plan: Plan, lock: Any, deadline: float | None
) -> optuna.Trial | None:
    """A new trial, or None when n_trials are counted or the time is up. Counting and asking
    happen under one lock, so two workers cannot both take the last trial."""
    if deadline is not None and time.time() >= deadline:
        return None
    lock.acquire()
    try:
        if counted(study) >= plan.n_trials:
            return None
        return study.ask()
    finally:
        lock.release()


def work(cfg: DictConfig) -> float:
    """One worker job: ask, train, tell, until the study has its trials (or the time is up).
    Returns the best value of the trials this worker ran (NaN if none completed)."""
    from hydra.core.hydra_config import HydraConfig
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.trial import TrialState

    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir)
    info = tracking.parent_info(sweep_dir)
    plan = Plan.from_dict(info["search"])
    worker = int(cfg.sweep.worker)
    study = load_study(plan, hc.sweeper, worker)
    space = Space.from_json(plan.space)
    base = [o for o in hc.overrides.task if not o.startswith("sweep.worker=")]
    lock = JournalFileOpenLock(str(sweep_dir / LOCK))
    started = float(info.get("started", time.time()))
    deadline = None if plan.timeout_min is None else started + plan.timeout_min * 60
    best = math.nan
    while (trial := _next_trial(study, plan, lock, deadline)) is not None:
        overrides = suggest(trial, space)
        try:
            value = run_seeds(trial, hc.job.config_name, [*base, *overrides], plan)
            study.tell(trial, value)
            best = value if math.isnan(best) else max(best, value)
        except Pruned:
            study.tell(trial, state=TrialState.PRUNED)
        except (Interrupted, KeyboardInterrupt):
            trial.set_user_attr(INTERRUPTED, True)
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as err:  # the trial failed; the search goes on (listed at the end)
            log.error("trial %d (%s) failed: %s", trial.number, " ".join(overrides), err)
            tracking.write_job_failure(sweep_dir, trial.number, overrides, err, None)
            study.tell(trial, state=TrialState.FAIL)
        _say_trials(study, plan, started)
    return best


def _say_trials(study: optuna.Study, plan: Plan, started: float) -> None:
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False, states=finished)
    done = sum(1 for t in trials if not t.user_attrs.get(INTERRUPTED))
    here = sum(
        1 for t in trials if t.datetime_complete and t.datetime_complete.timestamp() >= started
    )
    line = progress_line("trial", done, plan.n_trials, time.time() - started, here)
    say_progress(line)
