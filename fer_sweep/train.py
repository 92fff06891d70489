"""The training loop: read it top to bottom.

Data sits on the training device as uint8 tensors; every step gathers a batch by index, augments
it with a few batched tensor ops, and takes one optimizer step. Nothing in the step waits for the
host: losses and accuracies accumulate on the device and are read once per epoch (plus a cheap
finiteness check every few steps, so a diverging run stops within its epoch).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fer_sweep.augment import BatchTransform, make_transform
from fer_sweep.config import Config, OptimizerConfig, SchedulerConfig
from fer_sweep.data import Dataset, Split
from fer_sweep.errors import ConfigError, FerSweepError
from fer_sweep.models import build_model

CHECK_EVERY = 25  # steps between finiteness checks of the running loss (one host sync each)


class Diverged(FerSweepError):
    """The training loss became NaN or infinite."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived; raised at the next step boundary so state stays consistent."""


# --------------------------------------------------------------------------- building blocks


def pick_device(name: str) -> torch.device:
    """auto = cuda > mps > cpu; an explicit device that is not there is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"trainer.device={name} but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s); use trainer.device=auto.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device=mps but MPS is not available; use trainer.device=auto.")
    return dev


def use_channels_last(setting: str) -> bool:
    """auto = on: channels_last made every model's CPU step faster here (measured with
    ``python -m fer_sweep.bench``: the small CNNs 1.7x, the reference ResNet 2.4x), and it is
    the layout cuDNN's bf16 kernels want on GPUs. ``false`` keeps plain contiguous tensors."""
    return setting == "auto" or setting.lower() == "true"


def make_optimizer(params: Any, oc: OptimizerConfig) -> torch.optim.Optimizer:
    if oc.name == "sgd":
        return torch.optim.SGD(params, lr=oc.lr, momentum=oc.momentum,
                               weight_decay=oc.weight_decay, nesterov=oc.nesterov)
    cls = torch.optim.Adam if oc.name == "adam" else torch.optim.AdamW
    return cls(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, sc: SchedulerConfig, epochs: int) -> Any:
    if sc.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=sc.factor, patience=sc.patience, min_lr=sc.min_lr)
    if sc.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=sc.min_lr)
    return None


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only: CPU runs stay fp32 and bit-for-bit deterministic."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- evaluation


def tta_views(x: torch.Tensor, mode: str) -> Iterator[torch.Tensor]:
    """Test-time views of a normalized batch: identity, mirror, and/or 2-pixel shifts (0 fill)."""
    yield x
    if "flip" in mode:
        yield x.flip(-1)
    if "shift" in mode:
        padded = F.pad(x, (2, 2, 2, 2))
        h, w = x.shape[-2:]
        for dy, dx in ((0, 2), (4, 2), (2, 0), (2, 4)):
            yield padded[..., dy:dy + h, dx:dx + w]


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split | tuple[torch.Tensor, torch.Tensor],
             tfm: BatchTransform, batch_size: int, device: torch.device, amp: bool = True,
             channels_last: bool = False, tta: str = "none") -> dict[str, Any]:
    """Loss, accuracy and softmax probabilities over a whole split, in large batches."""
    x, y = (split.x, split.y) if isinstance(split, Split) else split
    model.eval()
    probs, loss_sum = [], torch.zeros((), device=device)
    for i in range(0, len(y), batch_size):
        xb = tfm(x[i:i + batch_size].to(device, non_blocking=True), train=False)
        yb = y[i:i + batch_size].to(device, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        views = list(tta_views(xb, tta)) if tta != "none" else [xb]
        with autocast(device, amp):
            logits = [model(v).float() for v in views]
        loss_sum += F.cross_entropy(logits[0], yb, reduction="sum")
        p = torch.stack([lg.softmax(1) for lg in logits]).mean(0)
        probs.append(p)
    prob = torch.cat(probs).cpu() if probs else torch.zeros((0, 7))
    pred = prob.argmax(1)
    n = max(len(y), 1)
    return {"loss": loss_sum.item() / n, "acc": (pred == y.cpu()).float().sum().item() / n,
            "probs": prob, "pred": pred}


# --------------------------------------------------------------------------- checkpoints


@dataclass
class State:
    """Everything needed to continue a run exactly where its last completed epoch left it."""

    epoch: int = -1  # last completed epoch
    history: dict[str, list[float]] = field(default_factory=lambda: {
        k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds")})
    best_val_acc: float = -1.0
    best_epoch: int = -1
    best_weights: dict[str, torch.Tensor] | None = None


def save_checkpoint(path: Path, state: State, model: nn.Module, opt: torch.optim.Optimizer,
                    sched: Any) -> None:
    """Atomic: write a temporary file beside the target, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "epoch": state.epoch, "history": state.history, "best_val_acc": state.best_val_acc,
        "best_epoch": state.best_epoch, "best_weights": state.best_weights,
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    sched: Any) -> State:
    """Restore model, optimizer, scheduler and RNG states; weights_only (no arbitrary pickles)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FerSweepError(f"checkpoint {path} cannot be read ({err}); delete it and start the "
                            "run afresh (trainer.resume=null).") from None
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    if sched is not None and blob["scheduler"] is not None:
        sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng_cpu"])
    if blob["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng_cuda"])
    return State(epoch=blob["epoch"], history=blob["history"],
                 best_val_acc=blob["best_val_acc"], best_epoch=blob["best_epoch"],
                 best_weights=blob["best_weights"])


@contextlib.contextmanager
def interruptible() -> Iterator[Callable[[], bool]]:
    """Turn SIGINT/SIGTERM into a flag the loop polls at step boundaries (a second one is
    immediate), so an interruption never leaves a half-written epoch behind."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["set"]:
            raise Interrupted(signal.Signals(signum).name)
        flag["set"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: flag["set"]
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- the loop


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor,
               yb: torch.Tensor, amp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, cross-entropy, backward, optimizer step; (loss, logits), detached, on the
    device. The benchmark's ceiling times exactly this on a fixed batch."""
    with autocast(xb.device, amp):
        logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                tfm: BatchTransform, batch_size: int, amp: bool = True,
                channels_last: bool = False, desc: str = "", progress: bool = False,
                interrupted: Callable[[], bool] = lambda: False, lr: float | None = None,
                max_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over (x, y) on their device in a random order: gather, augment, step.

    Returns the summed loss and the number of correct predictions as device tensors (read them
    once, after the epoch). ``max_steps`` cuts the epoch short (the benchmark uses it).
    """
    device = x.device
    model.train()
    n = len(y)
    perm = torch.randperm(n, device=device)
    starts = range(0, n, batch_size)[:max_steps]
    # Every image's random warp for the epoch in one draw: a step only slices its batch's.
    used = min(n, len(starts) * batch_size)
    warps = tfm.draw(used, x.shape[-2:], device) if tfm.is_random else None
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    bar = tqdm(starts, desc=desc, leave=False, disable=not progress, mininterval=1.0,
               dynamic_ncols=True)
    for step, i in enumerate(bar):
        if interrupted():
            raise Interrupted(desc)
        idx = perm[i:i + batch_size]
        # index_select, not x[idx]: advanced indexing took 120 us per batch on the CPU, this 5.
        xb = tfm(x.index_select(0, idx), train=True,
                 warps=None if warps is None else warps[i:i + batch_size])
        yb = y.index_select(0, idx)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss, logits = train_step(model, opt, xb, yb, amp)
        loss_sum += loss * len(idx)
        correct += (logits.argmax(1) == yb).sum()
        if step % CHECK_EVERY == CHECK_EVERY - 1 and not torch.isfinite(loss_sum):
            raise Diverged(f"the training loss became {loss_sum.item()} at step {step + 1} of "
                           f"{desc or 'an epoch'}: lower optimizer.lr (now {lr}) or check the "
                           "data.")
    return loss_sum, correct



@dataclass
class Result:
    model: nn.Module
    state: State
    device: torch.device
    channels_last: bool
    tfm: BatchTransform
    n_params: int
    train_seconds: float


def build(conf: Config, device: torch.device) -> tuple[nn.Module, nn.Module,
                                                        torch.optim.Optimizer, bool]:
    """(model, the module the step calls, optimizer, channels_last): seeded, in the memory
    format that pays for this model, optionally compiled. fit and the benchmark share it."""
    tc = conf.trainer
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    channels_last = use_channels_last(tc.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model({"builder": conf.model.builder, **conf.model.builder_kwargs()})
    model = model.to(device, memory_format=fmt)
    step_model = torch.compile(model) if tc.compile else model
    return model, step_model, make_optimizer(model.parameters(), conf.optimizer), channels_last


def fit(conf: Config, data: Dataset, checkpoint: Path | None = None, resume: bool = False,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
        on_resume: Callable[[State], None] | None = None) -> Result:
    """Train conf.model on data.train, validating on data.val after every epoch.

    The best-validation weights are kept in the returned state; ``on_epoch(epoch, metrics)`` is
    called after each epoch and ``on_resume(state)`` once with the state restored from the
    checkpoint (MLflow logging lives with the caller, not in the loop).
    """
    tc = conf.trainer
    device = pick_device(tc.device)
    model, step_model, opt, channels_last = build(conf, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sched = make_scheduler(opt, conf.scheduler, tc.epochs)
    tfm = make_transform(asdict(conf.transforms), data.mean, data.std)
    amp = tc.amp

    # The whole training and validation sets live on the device.
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)
    val = (data.val.x.to(device), data.val.y.to(device))
    n, bs = len(y_train), tc.batch_size

    state = State()
    if resume and checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint, model, opt, sched)
        if on_resume is not None:
            on_resume(state)

    started = time.perf_counter()
    with interruptible() as interrupted:
        for epoch in range(state.epoch + 1, tc.epochs):
            t0 = time.perf_counter()
            loss_sum, correct = train_epoch(step_model, opt, x_train, y_train, tfm, bs, amp,
                                            channels_last, desc=f"epoch {epoch + 1}/{tc.epochs}",
                                            progress=tc.progress, interrupted=interrupted,
                                            lr=conf.optimizer.lr)
            train_loss = loss_sum.item() / n
            if not math.isfinite(train_loss):
                raise Diverged(f"the training loss became {train_loss} at epoch {epoch + 1}: "
                               f"lower optimizer.lr (now {conf.optimizer.lr}) or check the data.")
            v = evaluate(model, val, tfm, tc.eval_batch_size, device, amp, channels_last)
            lr = opt.param_groups[0]["lr"]
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(v["loss"])
            elif sched is not None:
                sched.step()
            metrics = {"train_loss": train_loss, "train_acc": correct.item() / n,
                       "val_loss": v["loss"], "val_acc": v["acc"], "lr": lr,
                       "epoch_seconds": time.perf_counter() - t0}
            for k, value in metrics.items():
                state.history[k].append(value)
            state.epoch = epoch
            if v["acc"] > state.best_val_acc:
                state.best_val_acc, state.best_epoch = v["acc"], epoch
                state.best_weights = {k: t.detach().to("cpu", copy=True)
                                      for k, t in model.state_dict().items()}
            if checkpoint is not None:
                save_checkpoint(checkpoint, state, model, opt, sched)
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if tc.progress:
                tqdm.write(f"epoch {epoch + 1}/{tc.epochs}  train_loss {train_loss:.4f}  "
                           f"train_acc {metrics['train_acc']:.4f}  val_loss {v['loss']:.4f}  "
                           f"val_acc {v['acc']:.4f}  ({metrics['epoch_seconds']:.1f}s)")
    return Result(model=model, state=state, device=device, channels_last=channels_last, tfm=tfm,
                  n_params=n_params, train_seconds=time.perf_counter() - started)
