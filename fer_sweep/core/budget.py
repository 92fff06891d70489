"""trainer.time_budget_min: as many epochs as fit a wall-clock budget on the machine at hand.

A 30-minute recipe written for one CPU overruns on a slower or busier one (the same training
step ran 426-870 images/s within one night on this project's shared 2-core host) and wastes a
fast one. Before training, a few steps of the run's own model, batch size and precision are
timed on a throwaway copy; the first plan is the number of epochs whose training, validation and
final evaluation (with its test-time views) fit the rest of the budget with a margin (at most
as many steps as an epoch has: a small subset's probe stays cheap). Ten steps sample the host at
one moment, though, so after every epoch the ``Pacer`` plans again from the
epochs the run has timed and the schedule is retargeted to the new count (``train.retarget``):
the run uses the budget the machine actually gives, and its schedule still ends on time. The
first plan is logged as ``trainer.epochs_planned``, every later one as the ``budget_epochs``
metric; a run whose plan never changed is the same as ``trainer.epochs=N`` without a budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from fer_sweep.core import train
from fer_sweep.core.augment import make_transform
from fer_sweep.core.checkpoint import State
from fer_sweep.core.config import Config
from fer_sweep.core.dataset import Dataset
from fer_sweep.core.device import resolve_precision, synchronize
from fer_sweep.core.evaluate import evaluate, tta_views
from fer_sweep.errors import FerSweepError

SAFETY = 1.15  # epochs are planned this much slower than calibrated (host noise, validation)
RESERVE_S = 30.0  # after the final evaluation: figures, the model's upload, process exit
WARMUP_STEPS, TIMED_STEPS = 3, 10
PACE_EPOCHS = 3  # the re-plans' pace: the last epochs' mean (the host's speed drifts in minutes)
PACE_MARGIN = 1.03  # ... with this margin: epochs of a steady host differ by a few per cent


@dataclass(frozen=True)
class Speed:
    train_ips: float  # training images per second (forward + backward + optimizer step)
    eval_ips: float  # evaluation images per second (forward only)
    seconds: float  # what measuring them cost


@dataclass(frozen=True)
class Plan:
    epochs: int
    epoch_s: float  # planned seconds per epoch (training + validation, with SAFETY)
    final_s: float  # planned seconds for the final evaluation and RESERVE_S
    speed: Speed

    def describe(self, budget_min: float) -> str:
        return (
            f"time budget {budget_min:g} min: {self.epochs} epochs planned "
            f"({self.speed.train_ips:.0f} training and {self.speed.eval_ips:.0f} evaluation "
            f"images/s measured in {self.speed.seconds:.0f} s; {self.epoch_s:.1f} s per epoch "
            f"and {self.final_s:.0f} s for the final evaluation planned)"
        )


def tta_view_count(mode: str) -> int:
    """Forward passes per image of eval.tta: counted from tta_views itself."""
    return sum(1 for _ in tta_views(torch.zeros(1, 1, 8, 8), mode))


def measure(conf: Config, data: Dataset, device: torch.device) -> Speed:
    """Images per second of this run's training step and evaluation, on a copy of its model
    built with its settings; the global RNG is left as it was, so the run itself is unchanged."""
    tc = conf.trainer
    t0 = time.perf_counter()
    accel = device.type != "cpu"  # its generator is saved and restored too (dropout draws on it)
    with torch.random.fork_rng(
        devices=[device] if accel else [], device_type=device.type if accel else None
    ):
        model, step_model, opt, channels_last = train.build(conf, device)
        precision = resolve_precision(tc.amp, device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        bs = tc.batch_size
        crop = conf.transforms.crop  # the step sees the training crops, not the whole images
        size = (crop, crop) if crop else tuple(data.train.x.shape[-2:])
        x = torch.randn(bs, 1, *size, device=device)
        x = x.contiguous(memory_format=fmt)
        y = torch.randint(0, 7, (bs,), device=device)

        def steps(n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                train.train_step(step_model, opt, x, y, precision, tc.label_smoothing)
            synchronize(device)
            return time.perf_counter() - start

        # never more steps than an epoch has: on a small subset (data.limit_per_class) the
        # probe would otherwise cost many times the training it plans
        per_epoch = max(1, math.ceil(len(data.train) / bs))
        steps(min(WARMUP_STEPS, per_epoch))
        timed = min(TIMED_STEPS, per_epoch)
        train_ips = timed * bs / steps(timed)
        n_eval = min(len(data.val), 2 * tc.eval_batch_size)
        val = (data.val.x[:n_eval].to(device), data.val.y[:n_eval].to(device))
        tfm = make_transform(None, data.mean, data.std)
        evaluate(model, val, tfm, tc.eval_batch_size, device, precision, channels_last)
        start = time.perf_counter()
        evaluate(model, val, tfm, tc.eval_batch_size, device, precision, channels_last)
        eval_ips = n_eval / max(time.perf_counter() - start, 1e-9)
    return Speed(train_ips, eval_ips, time.perf_counter() - t0)


def plan(conf: Config, data: Dataset, speed: Speed, elapsed_s: float) -> Plan:
    """The most epochs (up to trainer.epochs) that fit the budget's remaining seconds; a
    budget that fits not even one is an error, raised before the run exists."""
    tc = conf.trainer
    assert tc.time_budget_min is not None
    n_train, n_val, n_test = len(data.train), len(data.val), len(data.test)
    epoch_s = SAFETY * (n_train / speed.train_ips + n_val / speed.eval_ips)
    # the best and the last weights on the test split, then the TTA views of val and test
    views = tta_view_count(conf.eval.tta) if conf.eval.tta != "none" else 0
    # (and the un-averaged weights on val, with trainer.ema_decay)
    raw = n_val if tc.ema_decay else 0
    final_s = (2 * n_test + views * (n_val + n_test) + raw) / speed.eval_ips + RESERVE_S
    left = tc.time_budget_min * 60.0 - elapsed_s - final_s
    epochs = min(tc.epochs, math.floor(left / epoch_s)) if left > 0 else 0
    if epochs < 1:
        need = (elapsed_s + final_s + epoch_s) / 60.0
        raise FerSweepError(
            f"trainer.time_budget_min={tc.time_budget_min:g} fits no epoch on this machine: one "
            f"epoch and the final evaluation need ~{need:.1f} min here "
            f"({speed.train_ips:.0f} training images/s). Raise the budget, or set "
            "trainer.time_budget_min=null and choose trainer.epochs."
        )
    return Plan(epochs, epoch_s, final_s, speed)


@dataclass(frozen=True)
class Pacer:
    """After every epoch, how many epochs the run should have in all: those done, and as many
    more as fit before the deadline at the pace of its last few epochs (up to trainer.epochs).
    A count no higher than the epochs done means no further epoch fits."""

    deadline: float  # time.perf_counter() by which training ends (the final evaluation's
    cap: int  # time is kept after it); cap: trainer.epochs, the most a plan may give

    def __call__(self, state: State) -> int:
        recent = state.history["epoch_seconds"][-PACE_EPOCHS:]
        pace = PACE_MARGIN * sum(recent) / len(recent)
        more = math.floor(max(0.0, self.deadline - time.perf_counter()) / pace)
        return min(self.cap, state.epoch + 1 + more)
