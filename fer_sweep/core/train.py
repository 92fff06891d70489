"""The training loop: read it top to bottom.

Data sits on the training device as uint8 tensors; every step gathers a batch by index, augments
it with a few batched tensor ops, and takes one optimizer step. Nothing in the step waits for the
host: losses and accuracies accumulate on the device and are read once per epoch (plus a cheap
finiteness check every few steps, so a diverging run stops within its epoch).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from fer_sweep.core.augment import BatchTransform, make_transform
from fer_sweep.core.config import Config, OptimizerConfig, SchedulerConfig, TrainerConfig
from fer_sweep.core.dataset import Dataset, Split
from fer_sweep.core.interrupt import Interrupted, deferred
from fer_sweep.core.models import build_model
from fer_sweep.errors import ConfigError, FerSweepError

log = logging.getLogger(__name__)

CHECK_EVERY = 25  # steps between finiteness checks of the running loss (one host sync each)


class Diverged(FerSweepError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- building blocks


def pick_device(name: str) -> torch.device:
    """auto = cuda > mps > cpu; an explicit device that is not there is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise ConfigError(f"device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps.")
    dev = torch.device(name)
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(
            f"trainer.device={name} but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); use trainer.device=auto."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device=mps but MPS is not available; use trainer.device=auto.")
    return dev


def device_name(device: torch.device) -> str:
    """What the device is, for run tags and benchmark records: the GPU's or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (x86 AVX-512-BF16 or AMX): oneDNN then runs
    convolutions and matmuls in bf16 at 1.1-2.5x the fp32 speed (measured here, docs/
    performance.md). Elsewhere bf16 is emulated and slower than fp32."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:  # not Linux: no way to tell cheaply, stay in fp32
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def resolve_precision(setting: str, device: torch.device) -> str:
    """trainer.amp -> the precision a run really uses, "bf16" (autocast) or "fp32".

    auto: bf16 on CUDA devices that support it and on CPUs with native bf16 (every model of
    Table 2 trains faster there, and its accuracy matches fp32: docs/results.md); fp32 on MPS
    and on other CPUs. An explicit bf16 on a device without it is refused.
    """
    if setting == "fp32":
        return "fp32"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        ok = cpu_has_fast_bf16() or (setting == "bf16" and torch.backends.mkldnn.is_available())
    else:
        ok = False
    if setting == "bf16" and not ok:
        raise ConfigError(
            f"trainer.amp=bf16 but {device} cannot run bf16 autocast; use trainer.amp=auto or fp32."
        )
    return "bf16" if ok else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where ``precision`` says so (CUDA or CPU); fp32 is a no-op. On one CPU a
    bf16 run is as deterministic as an fp32 one (same kernels, same order)."""
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- evaluation


def tta_views(x: torch.Tensor, mode: str, shift: int = 2) -> Iterator[torch.Tensor]:
    """Test-time views of a normalized batch: identity, mirror, and/or ``shift``-pixel shifts
    (0 fill) up, down, left and right; ``flip_x_shift`` mirrors every shifted view too (10)."""
    shifted = [x]
    if "shift" in mode:
        padded = F.pad(x, (shift, shift, shift, shift))
        h, w = x.shape[-2:]
        for dy, dx in ((0, shift), (2 * shift, shift), (shift, 0), (shift, 2 * shift)):
            shifted.append(padded[..., dy : dy + h, dx : dx + w])
    if mode == "flip_x_shift":
        for v in shifted:
            yield v
            yield v.flip(-1)
        return
    yield x
    if "flip" in mode:
        yield x.flip(-1)
    yield from shifted[1:]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    split: Split | tuple[torch.Tensor, torch.Tensor],
    tfm: BatchTransform,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    tta: str = "none",
    tta_shift: int = 2,
) -> dict[str, Any]:
    """Loss, accuracy and softmax probabilities over a whole split, in large batches."""
    x, y = (split.x, split.y) if isinstance(split, Split) else split
    model.eval()
    probs, loss_sum = [], torch.zeros((), device=device)
    for i in range(0, len(y), batch_size):
        xb = tfm(x[i : i + batch_size].to(device, non_blocking=True), train=False)
        yb = y[i : i + batch_size].to(device, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        views = list(tta_views(xb, tta, tta_shift)) if tta != "none" else [xb]
        with autocast(device, precision):
            logits = [model(v).float() for v in views]
        loss_sum += F.cross_entropy(logits[0], yb, reduction="sum")
        p = torch.stack([lg.softmax(1) for lg in logits]).mean(0)
        probs.append(p)
    prob = torch.cat(probs).cpu() if probs else torch.zeros((0, 7))
    pred = prob.argmax(1)
    n = max(len(y), 1)
    return {
        "loss": loss_sum.item() / n,
        "acc": (pred == y.cpu()).float().sum().item() / n,
        "probs": prob,
        "pred": pred,
    }


# --------------------------------------------------------------------------- checkpoints


@dataclass
class State:
    """Everything needed to continue a run exactly where its last completed epoch left it."""

    epoch: int = -1  # last completed epoch
    epochs: int = 0  # the run's length: trainer.epochs, or its time budget's latest plan
    history: dict[str, list[float]] = field(
        default_factory=lambda: {
            k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds")
        }
    )
    best_val_acc: float = -1.0
    best_epoch: int = -1
    best_weights: dict[str, torch.Tensor] | None = None
    best_changed: bool = False  # best_weights not yet in a checkpoint
    best_val_loss: float = math.inf  # early stopping watches the validation loss ...
    bad_epochs: int = 0  # ... and counts the epochs since it last improved
    floor_epochs: int = 0  # epochs spent with the plateau scheduler at its lowest rate
    stop_reason: str = "epochs"  # epochs | early_stopping | min_lr | time_budget


def save_checkpoint(
    path: Path,
    state: State,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    device: torch.device,
    ema: AveragedModel | None = None,
) -> None:
    """Atomic: write a temporary file beside the target, then rename over it. The best weights
    go to their own file (``best_path``), rewritten only when they changed since the last
    checkpoint: most epochs of a long run do not beat the best."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if state.best_changed and state.best_weights is not None:
        _atomic_save(state.best_weights, best_path(path))
        state.best_changed = False
    blob = {
        "epoch": state.epoch,
        "epochs": state.epochs,
        "history": state.history,
        "best_val_acc": state.best_val_acc,
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "bad_epochs": state.bad_epochs,
        "floor_epochs": state.floor_epochs,
        "stop_reason": state.stop_reason,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "rng_cpu": torch.get_rng_state(),
        # The training device's generator only: a list of every visible GPU's would not fit a
        # resume that sees another number of GPUs, and a CPU job must not initialise CUDA.
        "rng_device": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    _atomic_save(blob, path)


def best_path(path: Path) -> Path:
    """<run id>.best.pt beside <run id>.pt."""
    return path.with_name(f"{path.stem}.best{path.suffix}")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    device: torch.device,
    ema: AveragedModel | None = None,
) -> State:
    """Restore model, optimizer, scheduler, weight-average and RNG states; weights_only (no
    arbitrary pickles)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        best = best_path(path)
        best_weights = (
            torch.load(best, map_location="cpu", weights_only=True) if best.exists() else None
        )
    except Exception as err:
        raise FerSweepError(
            f"checkpoint {path} cannot be read ({err}); delete it and start the "
            "run afresh (trainer.resume=null)."
        ) from None
    if ema is not None and blob.get("ema") is None:
        raise FerSweepError(
            f"checkpoint {path} holds no weight average but trainer.ema_decay asks for one; "
            "resume with the run's own settings, or start it afresh (trainer.resume=null)."
        )
    model.load_state_dict(blob["model"])
    if ema is not None:
        ema.load_state_dict(blob["ema"])
    opt.load_state_dict(blob["optimizer"])
    if sched is not None and blob["scheduler"] is not None:
        sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng_cpu"])
    if blob.get("rng_device") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(blob["rng_device"], device)
    return State(
        epoch=blob["epoch"],
        epochs=blob.get("epochs", 0),
        history=blob["history"],
        best_val_acc=blob["best_val_acc"],
        best_epoch=blob["best_epoch"],
        best_weights=best_weights,
        best_val_loss=blob.get("best_val_loss", math.inf),
        bad_epochs=blob.get("bad_epochs", 0),
        floor_epochs=blob.get("floor_epochs", 0),
        stop_reason=blob.get("stop_reason", "epochs"),
    )


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
        state.history[k].append(value)
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


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer measures work done, not work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def use_cuda_kernels(deterministic: bool) -> None:
    """cuDNN autotuning (cudnn.benchmark: the fastest convolution for each fixed shape; every
    batch but an epoch's last has the same shape) unless deterministic kernels are asked for,
    which cost speed (docs/gpu.md). A CUDA run's process setting; CPU runs are deterministic."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement
    torch.use_deterministic_algorithms(deterministic, warn_only=False)


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
    started = saved_at = time.perf_counter()
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
                "epoch_seconds": time.perf_counter() - t0,
            }
            record_epoch(state, epoch, metrics, kept)
            state.stop_reason = should_stop(state, v["loss"], sched, tc)
            if replan is not None and state.stop_reason == "epochs":
                planned = replan(state)
                if planned <= epoch + 1 < state.epochs:  # no further epoch fits
                    state.stop_reason = "time_budget"
                elif planned > epoch + 1 and planned != state.epochs:
                    sched = retarget(sched, opt, conf.scheduler, planned, steps_per_epoch)
                    state.epochs = planned
                    log.info("time budget: %d epochs planned now (%d done)", planned, epoch + 1)
            last = state.stop_reason != "epochs" or epoch + 1 == state.epochs
            due = time.perf_counter() - saved_at >= tc.checkpoint_every_s
            if checkpoint is not None and (due or last):
                save_checkpoint(checkpoint, state, model, opt, sched, device, ema)
                saved_at = time.perf_counter()
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if tc.progress:
                tqdm.write(
                    f"epoch {epoch + 1}/{state.epochs}  train_loss {train_loss:.4f}  "
                    f"train_acc {metrics['train_acc']:.4f}  val_loss {v['loss']:.4f}  "
                    f"val_acc {v['acc']:.4f}  ({metrics['epoch_seconds']:.1f}s)"
                )
            if state.stop_reason != "epochs":
                log.info(
                    "stopping after epoch %d of %d: %s",
                    epoch + 1,
                    state.epochs,
                    STOP_REASONS[state.stop_reason],
                )
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
