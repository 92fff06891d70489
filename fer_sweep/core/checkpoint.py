"""A run's training state (history, best weights, why it stops) and its checkpoints: written
atomically, at most once per trainer.checkpoint_every_s, read back by trainer.resume."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from fer_sweep.errors import FerSweepError

try:
    import fcntl
except ImportError:  # Windows: no flock; a run there is not guarded against a second process
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


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
    # seconds spent training epochs 0..epoch, summed over every process that trained them (a
    # resumed run's train_seconds is its whole training, not its last stretch)
    seconds: float = 0.0


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
    go to their own file, written only when they changed since the last checkpoint (most epochs
    of a long run do not beat the best), and named by their epoch (``best_path``): the
    checkpoint names the one that belongs to it, so a process stopped between the two writes
    leaves a pair that still matches; older best files go once the checkpoint is in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wrote_best = state.best_changed and state.best_weights is not None
    if wrote_best:
        _atomic_save(state.best_weights, best_path(path, state.best_epoch))
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
        "seconds": state.seconds,
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
    if wrote_best:
        state.best_changed = False
        keep = best_path(path, state.best_epoch)
        for old in _best_files(path):
            if old != keep:
                old.unlink(missing_ok=True)


def best_path(path: Path, epoch: int) -> Path:
    """<run id>.best-<epoch>.pt beside <run id>.pt: the weights of that epoch (1-based)."""
    return path.with_name(f"{path.stem}.best-{epoch + 1}{path.suffix}")


def _best_files(path: Path) -> list[Path]:
    """Every best-weights file of the run at ``path`` (<run id>.best.pt: older code's)."""
    return [*path.parent.glob(f"{path.stem}.best-*{path.suffix}"), _legacy_best(path)]


def _legacy_best(path: Path) -> Path:
    return path.with_name(f"{path.stem}.best{path.suffix}")


def remove_checkpoint(path: Path) -> None:
    """A run's checkpoint and its best weights, once the run no longer needs them."""
    for f in (path, *_best_files(path), _lock_path(path)):
        f.unlink(missing_ok=True)


def _lock_path(path: Path) -> Path:
    return path.with_suffix(".lock")


def claim(path: Path) -> IO[str] | None:
    """Lock <run id>.lock beside the checkpoint for as long as the returned file stays open:
    the process that trains a run holds it, so no second process continues the same run at
    the same time. None: a live process holds it. The lock ends with its process however that
    ends (kill, reboot, node lost): no stale lock is ever left to clear by hand."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(_lock_path(path), "a")  # noqa: SIM115 (held open: the open file IS the lock)
    if fcntl is None:
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def in_training(path: Path) -> bool:
    """Whether a live process trains the run whose checkpoint is ``path`` right now."""
    if not _lock_path(path).exists():
        return False
    held = claim(path)
    if held is None:
        return True
    held.close()
    return False


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
        best = best_path(path, blob["best_epoch"])
        if not best.exists():  # a checkpoint of older code: one unnamed best file
            best = _legacy_best(path)
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
        # checkpoints written before "seconds" was kept: the epochs' own times
        seconds=blob.get("seconds", sum(blob["history"].get("epoch_seconds", []))),
    )
