"""The training loop: read it top to bottom.

Data sits on the training device as uint8 tensors; every step gathers a batch by index, augments
it with a few batched tensor ops, and takes one optimizer step. Nothing in the step waits for the
host: losses and accuracies accumulate on the device and are read once per epoch (plus a cheap
finiteness check every few steps, so a diverging run stops within its epoch).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from fer_sweep.core.augment import BatchTransform, make_transform
from fer_sweep.core.checkpoint import State, load_checkpoint, save_checkpoint
from fer_sweep.core.config import Config, OptimizerConfig, SchedulerConfig, TrainerConfig
from fer_sweep.core.dataset import Dataset
from fer_sweep.core.device import autocast, pick_device, resolve_precision, use_cuda_kernels
from fer_sweep.core.evaluate import evaluate
from fer_sweep.core.interrupt import Interrupted, deferred
from fer_sweep.core.models import build_model
from fer_sweep.errors import FerSweepError

log = logging.getLogger(__name__)

CHECK_EVERY = 25  # steps between finiteness checks of the running loss (one host sync each)


class Diverged(FerSweepError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- building blocks


def make_optimizer(
    params: Any, oc: OptimizerConfig, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """The configured optimizer; on CUDA its fused implementation (one kernel for all
    parameters instead of several per tensor: small models' steps are launch-bound there)."""
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if oc.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=oc.lr,
            momentum=oc.momentum,
            weight_decay=oc.weight_decay,
            nesterov=oc.nesterov,
            **fused,
        )
    cls = torch.optim.Adam if oc.name == "adam" else torch.optim.AdamW
    return cls(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay, **fused)


def make_scheduler(
    opt: torch.optim.Optimizer, sc: SchedulerConfig, epochs: int, steps_per_epoch: int = 1
) -> Any:
    """The configured schedule: plateau and cosine step once per epoch, onecycle once per
    optimizer step (``steps_per_epoch`` of them per epoch; ``per_step`` tells which)."""
    if sc.name == "onecycle":
        return one_cycle(opt, sc, epochs * steps_per_epoch, [g["lr"] for g in opt.param_groups])
    if sc.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=sc.factor, patience=sc.patience, min_lr=sc.min_lr
        )
    if sc.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=sc.min_lr)
    return None


def one_cycle(
    opt: torch.optim.Optimizer,
    sc: SchedulerConfig,
    total_steps: int,
    max_lr: list[float],
    last_epoch: int = -1,
) -> torch.optim.lr_scheduler.OneCycleLR:
    """scheduler=onecycle over ``total_steps`` optimizer steps (momentum left alone)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=sc.warmup,
        div_factor=sc.div_factor,
        final_div_factor=sc.final_div_factor,
        cycle_momentum=False,
        last_epoch=last_epoch,
    )


def retarget(
    sched: Any, opt: torch.optim.Optimizer, sc: SchedulerConfig, epochs: int, steps_per_epoch: int
) -> Any:
    """The schedule stretched or shrunk, from where it stands, to end after ``epochs`` epochs:
    a time-budgeted run re-plans its length as it learns the machine's pace (budget.py), and
    a schedule that ends early or late wastes the budget's last epochs."""
    if isinstance(sched, torch.optim.lr_scheduler.OneCycleLR):
        # last_epoch: the rebuilt schedule stands at the optimizer steps already taken
        max_lr = [g["max_lr"] for g in opt.param_groups]
        return one_cycle(opt, sc, epochs * steps_per_epoch, max_lr, sched.last_epoch - 1)
    if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
        sched.T_max = epochs  # its chained form continues from the current rate
    return sched


def per_step(sched: Any) -> bool:
    """Schedules that move the rate every optimizer step (one-cycle's warm-up and decay)."""
    return isinstance(sched, torch.optim.lr_scheduler.OneCycleLR)


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """trainer.ema_decay: an exponential moving average of ``model``'s weights and batch-norm
    statistics (use_buffers), to update after every optimizer step; None when the decay is 0.
    Its copy (``.module``) is what the run validates, keeps and logs: averaging the last
    ~1/(1 - decay) steps smooths the noise SGD leaves in the final weights."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


# --------------------------------------------------------------------------- the loop


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    xb: torch.Tensor,
    yb: torch.Tensor,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, cross-entropy, backward, optimizer step; (loss, logits), detached, on the
    device. The benchmark's ceiling times exactly this on a fixed batch."""
    with autocast(xb.device, precision):
        logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    tfm: BatchTransform,
    batch_size: int,
    precision: str = "fp32",
    channels_last: bool = False,
    desc: str = "",
    progress: bool = False,
    interrupted: Callable[[], int] = lambda: 0,
    max_steps: int | None = None,
    sched: Any = None,
    label_smoothing: float = 0.0,
    ema: AveragedModel | None = None,
    eager: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over (x, y) on their device in a random order: gather, augment, step.

    Returns the summed loss and the number of correct predictions as device tensors (read them
    once, after the epoch). ``max_steps`` cuts the epoch short (the benchmark uses it); a
    ``per_step`` scheduler steps after every optimizer step, and the weight average ``ema``
    takes in every new weight. ``eager``, the uncompiled module of a compiled ``model`` (or the
    model itself), takes an epoch's shorter last batch: compiled, it would cost a second,
    dynamic-shape graph.

    The hot loop, kept whole on purpose: every step's work is visible in one place.
    """
    device = x.device
    model.train()
    n = len(y)
    perm = torch.randperm(n, device=device)
    starts = range(0, n, batch_size)[:max_steps]
    # Every image's random warp for the epoch in one draw: a step only slices its batch's.
    used = min(n, len(starts) * batch_size)
    warps = tfm.draw(used, x.shape[-2:], device) if tfm.warps_images else None
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    step_sched = sched if per_step(sched) else None  # decided once, not in every step
    bar = tqdm(
        starts, desc=desc, leave=False, disable=not progress, mininterval=1.0, dynamic_ncols=True
    )
    for step, i in enumerate(bar):
        if signum := interrupted():
            raise Interrupted(signum, desc)
        idx = perm[i : i + batch_size]
        # index_select, not x[idx]: advanced indexing took 120 us per batch on the CPU, this 5.
        xb = tfm(
            x.index_select(0, idx),
            train=True,
            warps=None if warps is None else warps[i : i + batch_size],
        )
        yb = y.index_select(0, idx)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        net = eager if eager is not None and len(idx) < batch_size else model
        loss, logits = train_step(net, opt, xb, yb, precision, label_smoothing)
        if step_sched is not None:
            step_sched.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss * len(idx)
        correct += (logits.argmax(1) == yb).sum()
        if step % CHECK_EVERY == CHECK_EVERY - 1 and not torch.isfinite(loss_sum):
            lr = opt.param_groups[0]["lr"]
            raise Diverged(
                f"the training loss became {loss_sum.item()} at step {step + 1} of "
                f"{desc or 'an epoch'}: lower optimizer.lr (now {lr}) or check the "
                "data."
            )
    return loss_sum, correct


STOP_REASONS = {
    "epochs": "the epoch budget is spent",
    "early_stopping": "trainer.early_stopping.patience epochs without a better validation loss",
    "min_lr": "the plateau scheduler is at its lowest learning rate and has had its patience",
    "time_budget": "another epoch would end after trainer.time_budget_min's deadline (the "
    "machine slowed down faster than the schedule could be shortened)",
}


def at_lr_floor(sched: Any) -> bool:
    """The plateau scheduler can lower no group's rate any further: a reduction would hit
    min_lr, or change the rate by less than its eps (ReduceLROnPlateau then ignores it: 0.01
    stalls at 1e-8 with factor 0.1 and min_lr 0)."""
    if not isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return False
    return all(
        g["lr"] - max(g["lr"] * sched.factor, floor) <= sched.eps
        for g, floor in zip(sched.optimizer.param_groups, sched.min_lrs, strict=True)
    )


def should_stop(state: State, val_loss: float, sched: Any, tc: TrainerConfig) -> str:
    """Update the early-stopping counters with this epoch's validation loss; the reason to stop
    now, or "epochs" to go on (the budget then ends the run)."""
    if val_loss < state.best_val_loss:
        state.best_val_loss, state.bad_epochs = val_loss, 0
    else:
        state.bad_epochs += 1
    patience = tc.early_stopping.patience
    if patience is not None and state.bad_epochs >= patience:
        return "early_stopping"
    if tc.stop_at_min_lr and at_lr_floor(sched):
        state.floor_epochs += 1
        if state.floor_epochs > sched.patience:
            return "min_lr"
    return "epochs"


def step_scheduler(sched: Any, val_loss: float) -> None:
    """ReduceLROnPlateau watches the validation loss; cosine steps once per epoch (one-cycle
    has stepped inside the epoch)."""
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(val_loss)
    elif sched is not None and not per_step(sched):
        sched.step()


def record_epoch(state: State, epoch: int, metrics: dict[str, float], model: nn.Module) -> None:
    """Append the epoch to the history; keep a CPU copy of the weights when validation
    accuracy is the best so far."""
    for k, value in metrics.items():
        state.history.setdefault(k, []).append(value)  # trainer.val_raw adds keys
    state.epoch = epoch
    if metrics["val_acc"] > state.best_val_acc:
        state.best_val_acc, state.best_epoch = metrics["val_acc"], epoch
        state.best_weights = {
            k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()
        }
        state.best_changed = True


@dataclass
class Result:
    model: nn.Module  # the weights validated and kept: the weight average's, where there is one
    state: State
    device: torch.device
    channels_last: bool
    precision: str  # "bf16" or "fp32": what trainer.amp resolved to
    tfm: BatchTransform
    n_params: int
    train_seconds: float
    raw_model: nn.Module | None = None  # with trainer.ema_decay: the un-averaged last weights


def build(
    conf: Config, device: torch.device
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, bool]:
    """(model, the module the step calls, optimizer, channels_last): seeded, in the memory
    format that pays for this model, optionally compiled. fit and the benchmark share it."""
    tc = conf.trainer
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    channels_last = tc.channels_last
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(conf.model)
    model = model.to(device, memory_format=fmt)
    step_model = torch.compile(model) if tc.compile else model
    opt = make_optimizer(model.parameters(), conf.optimizer, device)
    return model, step_model, opt, channels_last


def follow_plan(
    planned: int, state: State, sched: Any, opt: Any, conf: Config, steps_per_epoch: int
) -> Any:
    """A time budget's new plan after an epoch: stop when no further epoch fits, or retarget
    the schedule to the new count; returns the schedule to go on with."""
    done = state.epoch + 1
    if planned <= done < state.epochs:  # no further epoch fits
        state.stop_reason = "time_budget"
    elif planned > done and planned != state.epochs:
        sched = retarget(sched, opt, conf.scheduler, planned, steps_per_epoch)
        state.epochs = planned
        log.info("time budget: %d epochs planned now (%d done)", planned, done)
    return sched


def say_epoch(state: State, epoch: int, metrics: dict[str, float], progress: bool) -> None:
    """The epoch's line, under the progress bar or (without one: a long run in the background)
    in the job's log, so that a run of hours shows where it is; and why the run stops."""
    line = (
        f"epoch {epoch + 1}/{state.epochs}  train_loss {metrics['train_loss']:.4f}  "
        f"train_acc {metrics['train_acc']:.4f}  val_loss {metrics['val_loss']:.4f}  "
        f"val_acc {metrics['val_acc']:.4f}  lr {metrics['lr']:.3g}  "
        f"({metrics['epoch_seconds']:.1f}s)"
    )
    if progress:
        tqdm.write(line)
    else:
        log.info(line)
    if state.stop_reason != "epochs":
        log.info(
            "stopping after epoch %d of %d: %s",
            epoch + 1,
            state.epochs,
            STOP_REASONS[state.stop_reason],
        )


def fit(
    conf: Config,
    data: Dataset,
    checkpoint: Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    on_resume: Callable[[State], None] | None = None,
    replan: Callable[[State], int] | None = None,
) -> Result:
    """Train conf.model on data.train, validating on data.val after every epoch.

    The best-validation weights are kept in the returned state; ``on_epoch(epoch, metrics)`` is
    called after each epoch and ``on_resume(state)`` once with the state restored from the
    checkpoint (MLflow logging lives with the caller, not in the loop). ``replan(state)``
    (a time budget's, budget.Pacer) returns after every epoch how many epochs the run should
    have in all: the schedule is retargeted to a new count, and a count already reached
    stops the run.

    Longer than most functions on purpose: one loop, read top to bottom (nanoGPT's train.py):
    set-up, then each epoch's train -> validate -> schedule -> stop? -> checkpoint -> report in
    the order they happen.
    """
    tc = conf.trainer
    device = pick_device(tc.device)
    model, step_model, opt, channels_last = build(conf, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tfm = make_transform(conf.transforms, data.mean, data.std)
    precision = resolve_precision(tc.amp, device)
    ema = weight_average(model, tc.ema_decay)
    kept = model if ema is None else ema.module  # the weights validated, kept and logged

    # The whole training and validation sets live on the device.
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)
    val = (data.val.x.to(device), data.val.y.to(device))
    n, bs = len(y_train), tc.batch_size
    steps_per_epoch = math.ceil(n / bs)
    sched = make_scheduler(opt, conf.scheduler, tc.epochs, steps_per_epoch)

    state = State(epochs=tc.epochs)
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, model, opt, sched, device, ema)  # its schedule, too
        state.epochs = state.epochs or tc.epochs
        if on_resume is not None:
            on_resume(state)

    if device.type == "cuda":
        use_cuda_kernels(tc.deterministic)
    saved_at = time.perf_counter()
    started = saved_at - state.seconds  # the clock goes on from the checkpoint's epochs
    with deferred() as interrupted:  # a signal stops the loop between two steps
        # (a run resumed after it had decided to stop does not start another epoch)
        while state.stop_reason == "epochs" and state.epoch + 1 < state.epochs:
            epoch = state.epoch + 1
            t0 = time.perf_counter()
            loss_sum, correct = train_epoch(
                step_model,
                opt,
                x_train,
                y_train,
                tfm,
                bs,
                precision,
                channels_last,
                desc=f"epoch {epoch + 1}/{state.epochs}",
                progress=tc.progress,
                interrupted=interrupted,
                sched=sched,
                label_smoothing=tc.label_smoothing,
                ema=ema,
                eager=model,
            )
            train_loss = loss_sum.item() / n
            if not math.isfinite(train_loss):
                raise Diverged(
                    f"the training loss became {train_loss} at epoch {epoch + 1}: "
                    f"lower optimizer.lr (now {conf.optimizer.lr}) or check the data."
                )
            v = evaluate(kept, val, tfm, tc.eval_batch_size, device, precision, channels_last)
            lr = opt.param_groups[0]["lr"]
            step_scheduler(sched, v["loss"])
            metrics = {
                "train_loss": train_loss,
                "train_acc": correct.item() / n,
                "val_loss": v["loss"],
                "val_acc": v["acc"],
                "lr": lr,
            }
            if tc.val_raw:  # the un-averaged weights too (without an average: those just scored)
                how = (tfm, tc.eval_batch_size, device, precision, channels_last)
                r = v if ema is None else evaluate(model, val, *how)
                metrics["val_loss_raw"], metrics["val_acc_raw"] = r["loss"], r["acc"]
            metrics["epoch_seconds"] = time.perf_counter() - t0  # what a time budget plans with
            record_epoch(state, epoch, metrics, kept)
            state.stop_reason = should_stop(state, v["loss"], sched, tc)
            if replan is not None and state.stop_reason == "epochs":
                sched = follow_plan(replan(state), state, sched, opt, conf, steps_per_epoch)
            last = state.stop_reason != "epochs" or epoch + 1 == state.epochs
            due = time.perf_counter() - saved_at >= tc.checkpoint_every_s
            if checkpoint is not None and (due or last):
                state.seconds = time.perf_counter() - started
                save_checkpoint(checkpoint, state, model, opt, sched, device, ema)
                saved_at = time.perf_counter()
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            say_epoch(state, epoch, metrics, tc.progress)
            if state.stop_reason != "epochs":
                break
    return Result(
        model=kept,
        state=state,
        device=device,
        channels_last=channels_last,
        precision=precision,
        tfm=tfm,
        n_params=n_params,
        train_seconds=time.perf_counter() - started,
        raw_model=None if ema is None else model,
    )
