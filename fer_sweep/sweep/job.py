"""One job of a sweep: validate -> connect -> load data -> open the MLflow run -> fit -> report.

Every check that can fail on user input happens before the first training step; once the run
exists, any failure marks it FAILED (or KILLED) with the error saved on it, so nothing already
logged is lost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fer_sweep.core import budget, figures, interrupt, runtime
from fer_sweep.core.augment import check_crop
from fer_sweep.core.checkpoint import State, remove_checkpoint
from fer_sweep.core.config import Config, validate
from fer_sweep.core.data import load_dataset
from fer_sweep.core.dataset import CLASSES, Dataset, Split
from fer_sweep.core.device import (
    cpu_has_fast_bf16,
    device_name,
    pick_device,
    resolve_precision,
)
from fer_sweep.core.evaluate import evaluate
from fer_sweep.core.models import describe, summary_text
from fer_sweep.core.train import Result, fit
from fer_sweep.errors import ConfigError
from fer_sweep.sweep import progress, store, tracking
from fer_sweep.sweep.compose import hydra_job
from fer_sweep.sweep.identity import (
    claimed,
    config_hash,
    earlier_runs,
    job_config,
    resumable_run,
    settings,
)

TRIAL_STATE = "fer_sweep.trial_state"  # a search's trial: RUNNING, COMPLETE, PRUNED or FAIL
RESUMES = "fer_sweep.resumes"  # how many times a run was continued from its checkpoint
RESUMED_AFTER = "fer_sweep.resumed_after"  # the error a resumed run had stopped with
GIT_COMMITS = "fer_sweep.git_commits"  # every commit that trained a resumed run, in order

log = logging.getLogger(__name__)


class Pruned(Exception):  # noqa: N818 (a decision, like optuna.TrialPruned)
    """A search's pruner stopped this run after ``epoch`` (0-based); not a failure."""

    def __init__(self, epoch: int, best_val_acc: float) -> None:
        self.epoch, self.best_val_acc = epoch, best_val_acc
        super().__init__(f"pruned after epoch {epoch + 1}")


@dataclass
class RunHooks:
    """What a search's trial adds to an ordinary job: its own overrides (for the run's tags),
    extra tags, and a callback after every epoch, which may raise Pruned."""

    overrides: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    on_epoch: Callable[[int, dict[str, float]], None] | None = None
    run_id: str | None = None  # set by the job: the MLflow run it opened


def open_run(
    client: MlflowClient,
    exp_id: str,
    conf: Config,
    cfg: DictConfig,
    key: str,
    parent_id: str | None,
    overrides: list[str],
    resume: str | None,
) -> str:
    """The run this job logs to: ``resume`` (from ``resumable_run``) marked RUNNING again, or a
    new one with the job's tags and parameters."""
    if resume:
        tracking.retry(client.update_run, resume, status="RUNNING")
        _where_it_trains_now(client, resume)
        ckpt = Path(conf.trainer.checkpoint_dir) / f"{resume}.pt"
        log.info("resuming MLflow run %s from %s", resume, ckpt)
        return resume

    synthetic = conf.data.synthetic
    name = conf.mlflow.run_name or f"{conf.model.name}-{conf.transforms.name}"
    tags = {
        "model": conf.model.name,
        "transforms": conf.transforms.name,
        "data": conf.data.name,
        "precision": conf.trainer.amp,
        "device": conf.trainer.device,
        "device_name": device_name(torch.device(conf.trainer.device)),
        "overrides": " ".join(overrides),
        "fer_sweep.config_hash": key,
        "fer_sweep.role": "job",
        **tracking.process_tags(),
    }
    # the config-group options this job was composed from (a trial: its own composition's)
    choices = (
        cfg.hydra.runtime.choices
        if "hydra" in cfg
        else HydraConfig.get().runtime.choices
        if HydraConfig.initialized()
        else {}
    )
    tags.update(
        {
            f"fer_sweep.choice.{k}": str(v)
            for k, v in choices.items()
            if v is not None and not k.startswith("hydra/")
        }
    )
    run_id = tracking.create_run(
        client, exp_id, name, tags, parent_id=parent_id, synthetic=synthetic
    )
    tracking.log_params(
        client,
        run_id,
        {
            **tracking.flatten(job_config(cfg)),
            "trainer.precision": conf.trainer.amp,
            "trainer.device_used": conf.trainer.device,
        },
    )
    return run_id


def _where_it_trains_now(client: MlflowClient, run_id: str) -> None:
    """A resumed run's host, pid (and SLURM job) are this process's; fer_sweep.git_commits
    lists every commit that trained it, in order: a run of days outlives its code."""
    tags = client.get_run(run_id).data.tags
    commits = tags.get(GIT_COMMITS) or tags.get("git_commit", "")
    now = tracking.git_commit()
    if now and commits.rsplit(",", 1)[-1] != now:
        commits = f"{commits},{now}" if commits else now
    tracking.set_tags(
        client, run_id, {**tracking.process_tags(), **({GIT_COMMITS: commits} if commits else {})}
    )


def run_job(cfg: DictConfig) -> float:
    """Train one configuration and log it; returns the best validation accuracy (for sweepers).

    SIGINT/SIGTERM at any moment of it raises Interrupted (the training loop defers it to the
    next step): a run that exists by then ends KILLED."""
    with interrupt.raising("job"):
        value, trained = _run_job(cfg)
    multirun, sweep_dir, job_num, _ = hydra_job()
    if multirun and sweep_dir is not None:
        progress.job_finished(sweep_dir, job_num, trained)
    return value


def run_trial(cfg: DictConfig, hooks: RunHooks) -> float:
    """One trial of a search, as an ordinary job of the sweep with the trial's hooks; raises
    Pruned when the pruner stops it (its run then ends FINISHED, tagged PRUNED)."""
    with interrupt.raising("trial"):
        return _run_job(cfg, hooks)[0]


def _run_job(cfg: DictConfig, hooks: RunHooks | None = None) -> tuple[float, bool]:
    """The job's steps in order; each names what it decides before the next one starts.
    Returns the best validation accuracy and whether it trained (not skipped by sweep.resume)."""
    started = time.perf_counter()  # trainer.time_budget_min counts from here
    conf = validate(cfg)
    flat = settings(cfg)  # "the same run" for trainer.resume and sweep.resume
    runtime.tune()  # a joblib/submitit worker process is a fresh process: tune it too
    log.info("runtime: %s", runtime.describe())
    multirun, sweep_dir, job_num, overrides = hydra_job()
    if hooks is not None:
        overrides = hooks.overrides
    _place(conf, multirun, job_num)
    client = store.connect(conf.mlflow.tracking_uri)
    exp_id, parent_id, resumed = _experiment(client, conf, sweep_dir)
    if parent_id and resumed and hooks is None:  # a search resumes through its study
        done = _resume_in_sweep(client, conf, exp_id, parent_id, flat, job_num)
        if done is not None:
            return done, False

    data = load_dataset(conf.data)
    log.info(
        "data: %s  train %d  val %d  test %d  mean %.4f std %.4f  (%s)",
        conf.data.name,
        len(data.train),
        len(data.val),
        len(data.test),
        data.mean,
        data.std,
        "cache hit" if data.info.get("cache_hit") else "decoded",
    )
    check_crop(conf.transforms.crop, tuple(data.train.x.shape[-2:]))  # before the run exists

    earlier = resumable_run(client, exp_id, conf, flat)  # the interrupted run it continues
    resume_id = earlier.info.run_id if earlier is not None else None
    ckpt_dir = Path(conf.trainer.checkpoint_dir)
    with contextlib.ExitStack() as held:
        if earlier is not None:
            held.enter_context(claimed(ckpt_dir / f"{resume_id}.pt", resume_id, earlier.data.tags))
            _keep_precision(earlier.data.params, conf, resume_id)
        cap = conf.trainer.epochs  # a time budget's plans never exceed trainer.epochs
        plan = _plan_epochs(client, conf, data, resume_id, started)
        run_id = open_run(
            client, exp_id, conf, cfg, config_hash(cfg), parent_id, overrides, resume_id
        )
        if resume_id is None:  # a new run's id is unknown to any other process yet
            held.enter_context(claimed(ckpt_dir / f"{run_id}.pt", run_id))
        if hooks is not None:
            hooks.run_id = run_id
            tracking.set_tags(client, run_id, hooks.tags)
        pacer = None
        if plan is not None:
            pacer = budget.Pacer(started + conf.trainer.time_budget_min * 60 - plan.final_s, cap)
        best = _train_and_log(
            client, run_id, conf, cfg, data, plan, pacer, resume_id is not None, hooks
        )
    return best, True


def _place(conf: Config, multirun: bool, job_num: int) -> None:
    """Decide the device and precision once, up front (a GPU that is not there, or bf16 where
    it cannot run, is named before any data is read), and write them into ``conf``."""
    device = pick_device(conf.trainer.device)
    conf.trainer.amp = resolve_precision(conf.trainer.amp, device)
    if multirun and conf.trainer.device == "auto" and torch.cuda.device_count() > 1:
        # Parallel jobs on a multi-GPU machine: job N takes GPU N mod count.
        conf.trainer.device = f"cuda:{job_num % torch.cuda.device_count()}"
    if conf.trainer.device == "auto":
        conf.trainer.device = str(device)
    log.info(
        "device %s (%s), precision %s",
        conf.trainer.device,
        device_name(torch.device(conf.trainer.device)),
        conf.trainer.amp,
    )


def _keep_precision(params: dict[str, str], conf: Config, run_id: str) -> None:
    """A resumed run keeps the precision it began in: trainer.amp=auto picks by the machine
    (bf16 only on CPUs with native bf16), and a run continued on another machine must not
    change its arithmetic halfway while its params name the first one."""
    began = params.get("trainer.precision")
    if began not in ("bf16", "fp32") or began == conf.trainer.amp:
        return
    device = torch.device(conf.trainer.device)
    try:
        conf.trainer.amp = resolve_precision(began, device)
    except ConfigError:
        raise ConfigError(
            f"run {run_id} began in {began}, which {device} cannot run; continue it on a "
            "device that can, or leave trainer.resume out to start a new run."
        ) from None
    slower = began == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16()
    log.warning(
        "run %s began in %s: it continues in %s here too%s",
        run_id,
        began,
        began,
        " (emulated on this CPU, slower than fp32)" if slower else "",
    )


def _experiment(
    client: MlflowClient, conf: Config, sweep_dir: Path | None
) -> tuple[str, str | None, bool]:
    """(experiment id, the sweep's parent run id or None, whether sweep.resume reopened that
    parent): a job of a multirun logs under the parent that the sweep's callback opened, in
    the same store and experiment."""
    parent = tracking.parent_info(sweep_dir) if sweep_dir else None
    if (
        parent
        and parent["tracking_uri"] == conf.mlflow.tracking_uri
        and parent["experiment"] == conf.mlflow.experiment
    ):
        return parent["experiment_id"], parent["parent_run_id"], bool(parent.get("resumed"))
    return store.ensure_experiment(client, conf.mlflow.experiment), None, False


def _resume_in_sweep(
    client: MlflowClient,
    conf: Config,
    exp_id: str,
    parent_id: str,
    flat: dict[str, str],
    job_num: int,
) -> float | None:
    """sweep.resume: a job FINISHED already is skipped (its best validation accuracy is
    returned); an interrupted one continues in its own run (trainer.resume semantics)."""
    done, interrupted = earlier_runs(
        client, exp_id, parent_id, flat, Path(conf.trainer.checkpoint_dir)
    )
    if done is not None:
        log.info("sweep.resume: job #%d already FINISHED as run %s; skipped", job_num, done)
        return float(client.get_run(done).data.metrics.get("best_val_acc", math.nan))
    if interrupted is not None:
        conf.trainer.resume = interrupted
    return None


def _plan_epochs(
    client: MlflowClient, conf: Config, data: Dataset, resume_id: str | None, started: float
) -> budget.Plan | None:
    """trainer.time_budget_min: the epochs that fit, written into conf.trainer.epochs before the
    run exists ("no epoch fits" is bad input). A resumed run takes the interrupted process's
    latest plan (its clock is gone, so the plan no longer changes) and gets no plan here."""
    if conf.trainer.time_budget_min is None:
        return None
    if resume_id is not None:
        # its first plan for a checkpoint written before plans were kept there
        params = client.get_run(resume_id).data.params
        conf.trainer.epochs = int(params.get("trainer.epochs_planned", conf.trainer.epochs))
        log.info("resuming the epochs its time budget last planned (no deadline)")
        return None
    speed = budget.measure(conf, data, torch.device(conf.trainer.device))
    plan = budget.plan(conf, data, speed, time.perf_counter() - started)
    log.info(plan.describe(conf.trainer.time_budget_min))
    conf.trainer.epochs = plan.epochs
    return plan


def _train_and_log(
    client: MlflowClient,
    run_id: str,
    conf: Config,
    cfg: DictConfig,
    data: Dataset,
    plan: budget.Plan | None,
    pacer: budget.Pacer | None,
    resuming: bool,
    hooks: RunHooks | None = None,
) -> float:
    """fit with MLflow as its epoch callback, then the test metrics; the run ends FINISHED,
    or KILLED / FAILED with the reason (see _mark_stopped), or, pruned by a search, FINISHED
    without test metrics (the test split stays unread).

    Long by its nested callbacks, which close over the run they log to."""
    ckpt = Path(conf.trainer.checkpoint_dir) / f"{run_id}.pt"
    replan = None
    try:
        if pacer is not None and plan is not None:

            def replan(state: State) -> int:
                planned = pacer(state)
                tracking.log_metrics(client, run_id, {"budget_epochs": planned}, step=state.epoch)
                return planned

            tracking.log_params(
                client,
                run_id,
                {
                    "trainer.epochs_planned": str(plan.epochs),
                    "budget.train_ips": f"{plan.speed.train_ips:.1f}",
                    "budget.eval_ips": f"{plan.speed.eval_ips:.1f}",
                },
            )
        if not resuming:
            _log_data_info(client, run_id, data)

        logged: set[int] = set()  # epochs an interrupted process logged after its checkpoint

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            if epoch not in logged:  # redone after a resume: on one CPU, the same values
                tracking.log_metrics(client, run_id, metrics, step=epoch)
            if hooks is not None and hooks.on_epoch is not None:
                hooks.on_epoch(epoch, metrics)  # a search's pruner may stop the run here

        def on_resume(state: State) -> None:
            logged.update(_relog_missing_epochs(client, run_id, state))
            _count_resume(client, run_id, state)

        # The test split is sealed while the model is trained and its epoch chosen.
        result = fit(
            conf,
            data.sealed(),
            checkpoint=ckpt,
            resume=resuming,
            on_epoch=on_epoch,
            on_resume=on_resume,
            replan=replan,
        )
        log_results(client, run_id, conf, cfg, data, result)
        if hooks is not None:
            tracking.set_tags(client, run_id, {TRIAL_STATE: "COMPLETE"})
        tracking.retry(client.set_terminated, run_id, status="FINISHED")
    except Pruned as stop:
        _mark_pruned(client, run_id, stop)
        remove_checkpoint(ckpt)
        raise
    except BaseException as err:
        if hooks is not None:  # the run's own mark follows: its trial failed with it
            with contextlib.suppress(Exception):
                tracking.set_tags(client, run_id, {TRIAL_STATE: "FAIL"})
        _mark_stopped(client, run_id, err, ckpt, conf.trainer.checkpoint_every_s)
        raise
    remove_checkpoint(ckpt)
    return result.state.best_val_acc


def _mark_pruned(client: MlflowClient, run_id: str, stop: Pruned) -> None:
    """A pruned trial's run: FINISHED (a decision, not a failure), its epochs and best
    validation accuracy logged, tagged fer_sweep.trial_state=PRUNED."""
    tracking.log_metrics(
        client,
        run_id,
        {"stopped_epoch": stop.epoch + 1, "best_val_acc": stop.best_val_acc},
        step=stop.epoch,
    )
    tracking.set_tags(client, run_id, {TRIAL_STATE: "PRUNED", "fer_sweep.stop_reason": "pruned"})
    tracking.retry(client.set_terminated, run_id, status="FINISHED")
    log.info("run %s pruned after epoch %d", run_id, stop.epoch + 1)


def _mark_stopped(
    client: MlflowClient, run_id: str, err: BaseException, ckpt: Path, every_s: float
) -> None:
    """The run ends KILLED (a signal: how to continue it is printed) or FAILED (the error);
    a signal that a library wrapped in its own error is raised as itself (exit 128 + signum).
    In a multirun the sweep says how to continue (sweep.resume), for a search's trials too,
    which are run again by their study, not resumed by trainer.resume."""
    signal_err = interrupt.interruption(err)
    killed = signal_err is not None
    with interrupt.deferred():  # a second signal must not stop the run from being marked
        tracking.record_failure(client, run_id, err, status="KILLED" if killed else "FAILED")
    if killed and hydra_job()[0]:
        log.info("run %s marked KILLED (the sweep says how to continue)", run_id)
    elif killed and ckpt.exists():
        print(
            f"fer_sweep: interrupted; MLflow run {run_id} marked KILLED. Continue it with "
            f"trainer.resume={run_id} (or trainer.resume=auto) and the same overrides.",
            file=sys.stderr,
        )
    elif killed:
        print(
            f"fer_sweep: interrupted; MLflow run {run_id} marked KILLED before its first "
            f"checkpoint (one per trainer.checkpoint_every_s={every_s} s): run the command "
            "again.",
            file=sys.stderr,
        )
    if signal_err is not None and signal_err is not err:
        raise signal_err from err


def _data_json(data: Dataset) -> str:
    counts = {
        split: dict(zip(CLASSES, getattr(data, split).class_counts(), strict=True))
        for split in ("train", "val", "test")
    }
    return json.dumps({"classes": list(CLASSES), "counts": counts, **data.info}, indent=2)


def _log_data_info(client: MlflowClient, run_id: str, data: Dataset) -> None:
    """Params only: artifacts are written at the end, so a broken artifact store cannot stop
    the metrics from being logged."""
    tracking.log_params(
        client,
        run_id,
        {
            "data.mean_used": f"{data.mean:.8f}",
            "data.std_used": f"{data.std:.8f}",
            "data.n_train": str(len(data.train)),
            "data.n_val": str(len(data.val)),
            "data.n_test": str(len(data.test)),
            "data.converted": str(data.info.get("converted", 0)),
        },
    )


def _relog_missing_epochs(client: MlflowClient, run_id: str, state: State) -> set[int]:
    """An interruption between the checkpoint and the metric write leaves a gap: fill it from
    the checkpoint's history. Returns the epochs logged after the checkpoint (which the
    resumed run trains again and must not log twice)."""
    logged = {m.step for m in client.get_metric_history(run_id, "val_acc")}
    for epoch in range(state.epoch + 1):
        if epoch not in logged:
            tracking.log_metrics(
                client, run_id, {k: v[epoch] for k, v in state.history.items()}, step=epoch
            )
    return {e for e in logged if e > state.epoch}


def _count_resume(client: MlflowClient, run_id: str, state: State) -> None:
    """Evidence that a run survived its interruptions: tag fer_sweep.resumes counts them, and
    metric ``resumes`` (the count so far) is logged at the first epoch each resume trains."""
    tags = client.get_run(run_id).data.tags
    count = int(tags.get(RESUMES, "0")) + 1
    tracking.set_tags(client, run_id, {RESUMES: str(count)})
    error = tags.get(tracking.ERROR_TAG)
    if error is not None:  # over: a run that goes on to finish shows no error
        tracking.set_tags(client, run_id, {RESUMED_AFTER: error})
        tracking.retry(client.delete_tag, run_id, tracking.ERROR_TAG)
    tracking.log_metrics(client, run_id, {"resumes": count}, step=state.epoch + 1)
    log.info("run %s resumed (%d so far) after epoch %d", run_id, count, state.epoch + 1)


def test_metrics(
    conf: Config, data: Dataset, result: Result
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, the best weights' evaluation): test accuracy and loss of the best-validation
    weights (loaded into result.model) and of the last epoch's, per class and per usage, and
    with test-time augmentation, which, like the weight average, is also measured on
    validation, where whether it pays is decided."""
    model, state, dev = result.model, result.state, result.device
    tc = conf.trainer

    def test(
        tta: str = "none", split: Split | None = None, net: torch.nn.Module | None = None
    ) -> dict[str, Any]:
        return evaluate(
            model if net is None else net,
            data.test if split is None else split,
            result.tfm,
            tc.eval_batch_size,
            dev,
            result.precision,
            result.channels_last,
            tta,
            conf.eval.tta_shift,
        )

    last = test()
    if state.best_weights is not None:
        model.load_state_dict(state.best_weights)
    best = test()
    y = data.test.y
    pred = best["pred"]
    metrics: dict[str, float] = {
        "test_acc": best["acc"],
        "test_loss": best["loss"],
        "test_acc_last": last["acc"],
        "test_loss_last": last["loss"],
        "best_epoch": state.best_epoch + 1,
        "best_val_acc": state.best_val_acc,
        "stopped_epoch": state.epoch + 1,
        "final_train_loss": state.history["train_loss"][-1],
        "n_params": result.n_params,
        "train_seconds": result.train_seconds,
        "macro_f1": figures.macro_f1(y, pred, len(CLASSES)),
    }
    for name, acc in zip(CLASSES, figures.per_class_accuracy(y, pred, len(CLASSES)), strict=True):
        metrics[f"test_acc_{name}"] = acc
    usage = data.test.usage
    if usage is not None:
        for code, name in ((0, "public"), (1, "private")):
            mask = usage == code
            if mask.any():
                metrics[f"test_acc_{name}"] = (pred[mask] == y[mask]).float().mean().item()
    if result.raw_model is not None:  # the un-averaged last weights, beside the average
        metrics["val_acc_raw"] = test(split=data.val, net=result.raw_model)["acc"]
    if conf.eval.tta != "none":
        metrics["val_acc_tta"] = test(conf.eval.tta, data.val)["acc"]
        tta = test(conf.eval.tta)
        metrics["test_acc_tta"], metrics["test_loss_tta"] = tta["acc"], tta["loss"]
    return metrics, best


def log_results(
    client: MlflowClient, run_id: str, conf: Config, cfg: DictConfig, data: Dataset, result: Result
) -> None:
    """Test metrics for the best-validation weights (and the last epoch's), figures, model."""
    state = result.state
    metrics, best = test_metrics(conf, data, result)
    tracking.log_metrics(client, run_id, metrics, step=state.epoch)
    tracking.set_tags(client, run_id, {"fer_sweep.stop_reason": state.stop_reason})
    log.info(
        "test_acc %.4f (best epoch %d, val_acc %.4f), last-epoch test_acc %.4f",
        best["acc"],
        state.best_epoch + 1,
        state.best_val_acc,
        metrics["test_acc_last"],
    )

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "data.json").write_text(_data_json(data))
        (out / "config.yaml").write_text(OmegaConf.to_yaml(job_config(cfg), resolve=True))
        model_cpu = result.model.to("cpu", memory_format=torch.contiguous_format).float()
        (out / "model_summary.txt").write_text(
            f"{describe(model_cpu)}\n\n{summary_text(model_cpu)}\n"
        )
        np.savez_compressed(
            out / "predictions.npz",
            test_probs=best["probs"].numpy(),
            test_y=data.test.y.numpy(),
            classes=np.array(CLASSES),
            test_ids=np.array(data.test.ids or (), dtype=str),  # each image's file (bundles)
        )
        if conf.mlflow.figures:
            title = f"{conf.model.name} / {conf.transforms.name}"
            figures.learning_curves(
                state.history, out / "curves.png", title=title, best_epoch=state.best_epoch
            )
            figures.confusion_matrix(
                data.test.y,
                best["pred"],
                CLASSES,
                out / "confusion_matrix.png",
                title=f"{title}: test accuracy {best['acc']:.1%}",
            )
            figures.misclassification_panels(
                data.test.x, data.test.y, best["pred"], CLASSES, out / "misclassified"
            )
        client.log_artifacts(run_id, str(out))
    if conf.mlflow.log_model:
        _log_model(conf.mlflow.tracking_uri, run_id, model_cpu)


def _log_model(uri: str, run_id: str, model: torch.nn.Module) -> None:
    """The best weights as an MLflow PyTorch model (``mlflow.pytorch.load_model``)."""
    import mlflow
    import mlflow.pytorch

    store.use_store(uri)
    # Pickle is what lets any model class load back without an example input (MLflow warns
    # about it on every run); predict.py only loads runs of the user's own store.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        mlflow.pytorch.log_model(
            model.eval(),
            name="model",
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
