"""What the benchmark times: fer_sweep's own training step, the model's compute ceiling (and
its precision x compile variants) and the naive pipeline a tutorial-following user writes;
each a ``Pipeline`` that runs N steps."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fer_sweep.core.config import Config
from fer_sweep.core.dataset import CLASSES, Dataset
from fer_sweep.core.device import resolve_precision, use_cuda_kernels
from fer_sweep.core.train import build, train_step
from fer_sweep.errors import FerSweepError

# --------------------------------------------------------------------------- naive pipeline


def naive_transform(mean: float, std: float, augment: bool) -> Any:
    """The study's per-image torchvision pipeline: Grayscale, ToTensor, Normalize and, with
    augmentation, RandomRotation(10) then RandomAffine(translate 0.1) (fill 0 = mean grey)."""
    from torchvision import transforms as T

    ops: list[Any] = [T.Grayscale(), T.ToTensor(), T.Normalize((mean,), (std,))]
    if augment:
        ops += [T.RandomRotation(10), T.RandomAffine(degrees=0, translate=(0.1, 0.1))]
    return T.Compose(ops)


def naive_dataset(folder: str | os.PathLike[str], mean: float, std: float, augment: bool) -> Any:
    """``ImageFolder`` over ``folder`` (e.g. FER2013_ROOT/train) with fer_sweep's label order.

    ImageFolder numbers classes alphabetically (neutral = 4); mapping them onto ``CLASSES``
    costs nothing and lets both pipelines be scored against the same labels.
    """
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder), transform=naive_transform(mean, std, augment))
    unknown = [c for c in ds.classes if c.lower() not in CLASSES]
    if unknown:
        raise FerSweepError(
            f"{folder} has class folders {unknown} that are not FER2013 classes "
            f"({', '.join(CLASSES)})."
        )
    canon = {i: CLASSES.index(c.lower()) for i, c in enumerate(ds.classes)}
    ds.target_transform = canon.__getitem__
    return ds


def naive_loader(
    dataset: Any,
    batch_size: int = 100,
    num_workers: int | None = None,
    shuffle: bool = True,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """DataLoader(num_workers=os.cpu_count(), shuffle); workers persist across epochs (and
    across the benchmark's repeats) so their start-up is paid once, as in a real run."""
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        generator=generator,
    )


def naive_step(
    model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor
) -> torch.Tensor:
    """The textbook step: fp32, no autocast, contiguous memory."""
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


# --------------------------------------------------------------------------- pipelines


def variant_name(precision: str, compiled: bool) -> str:
    """'bf16_eager', 'fp32_compile', ...: a ceiling variant's name, and fer_sweep's own."""
    return f"{precision}_{'compile' if compiled else 'eager'}"


class Pipeline:
    """One timed thing: ``run(steps)`` trains ``steps`` batches and returns the image count."""

    name = ""
    transforms: str = ""

    def run(self, steps: int) -> int:
        raise NotImplementedError

    def before(self) -> None:
        """Untimed, right before a timed segment."""

    def after(self) -> None:
        """Untimed, right after a timed segment."""


class FerSweepLoop(Pipeline):
    """fer_sweep.core.train.train_epoch (cache -> device -> batched augmentation -> step)."""

    name = "fer_sweep"

    def __init__(
        self, conf: Config, data: Dataset, device: torch.device, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        from fer_sweep.core.augment import make_transform

        self.transforms = conf.transforms.name
        self.model, self.step_model, self.opt, self.channels_last = build(conf, device)
        if device.type == "cuda":  # as fit: cuDNN autotuning unless deterministic kernels
            use_cuda_kernels(conf.trainer.deterministic)
        self.tfm = make_transform(conf.transforms, data.mean, data.std)
        self.x, self.y = x, y  # the training split, already on the device (as in fit)
        self.bs = conf.trainer.batch_size
        self.amp = resolve_precision(conf.trainer.amp, device)
        self.variant = variant_name(self.amp, conf.trainer.compile)

    def run(self, steps: int) -> int:
        from fer_sweep.core.train import train_epoch

        n = len(self.y)
        per_epoch = math.ceil(n / self.bs)
        images = 0
        while steps > 0:  # a tiny (synthetic) set needs several short epochs
            k = min(steps, per_epoch)
            train_epoch(
                self.step_model,
                self.opt,
                self.x,
                self.y,
                self.tfm,
                self.bs,
                self.amp,
                self.channels_last,
                max_steps=k,
                eager=self.model,  # as fit
            )
            images += min(n, k * self.bs)
            steps -= k
        return images


class Ceiling(Pipeline):
    """fer_sweep's step alone, on a batch already normalized and resident on the device.

    It trains the very model and optimizer of the fer_sweep pipeline it is paired with (same
    memory, same state), so the two differ only by the data path: separate model instances
    differed by up to 4 % here from where their tensors happened to lie in memory.
    """

    name = "ceiling"

    def __init__(self, ours: FerSweepLoop, conf: Config, data: Dataset) -> None:
        self.transforms = ours.transforms
        self.step_model, self.opt, self.amp = ours.step_model, ours.opt, ours.amp
        bs = conf.trainer.batch_size
        idx = torch.arange(bs) % len(data.train)  # a full batch even from a tiny split
        xb = ours.tfm(data.train.x[idx].to(ours.x.device), train=False)
        self.xb = xb.contiguous(memory_format=torch.channels_last) if ours.channels_last else xb
        self.yb = data.train.y[idx].to(ours.x.device)

    def run(self, steps: int) -> int:
        self.step_model.train()
        for _ in range(steps):
            train_step(self.step_model, self.opt, self.xb, self.yb, self.amp)
        return steps * len(self.yb)


class VariantCeiling(Pipeline):
    """The model's step alone in one precision and compile mode: the candidates for the best
    ceiling this machine offers (fer_sweep's defaults are compared with the fastest of them).

    Its own model and optimizer (a compiled model cannot share the eager one's step), the
    memory format fer_sweep uses, the same fixed batch as the paired ceiling.
    """

    def __init__(
        self,
        conf: Config,
        ours: FerSweepLoop,
        xb: torch.Tensor,
        yb: torch.Tensor,
        precision: str,
        compiled: bool,
    ) -> None:
        self.name = f"ceiling_{variant_name(precision, compiled)}"
        self.transforms = "norm"
        device = xb.device
        variant = replace(conf, trainer=replace(conf.trainer, compile=compiled))
        _, self.step_model, self.opt, _ = build(variant, device)
        self.precision = resolve_precision(precision, device)
        self.xb, self.yb = xb, yb

    def run(self, steps: int) -> int:
        self.step_model.train()
        for _ in range(steps):
            train_step(self.step_model, self.opt, self.xb, self.yb, self.precision)
        return steps * len(self.yb)


@dataclass
class SharedLoader:
    """One naive DataLoader per transforms, shared by the models; its workers persist."""

    loader: Any
    depth: int  # batches the workers prefetch: num_workers * prefetch_factor
    startup_seconds: float = 0.0
    batch_seconds: float = 0.0  # the workers' time per batch when nothing else runs
    it: Any = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.it)
        except StopIteration:  # end of an epoch: the persistent workers start the next one
            self.it = iter(self.loader)
            return next(self.it)


def make_shared_loader(
    folder: Path,
    data: Dataset,
    augment: bool,
    batch_size: int,
    device: torch.device,
    workers: int | None,
) -> SharedLoader:
    """Start the workers (the start-up a user waits for) and time their batch rate alone."""
    t0 = time.perf_counter()
    ds = naive_dataset(folder, data.mean, data.std, augment)
    loader = naive_loader(ds, batch_size, workers, pin_memory=device.type == "cuda")
    shared = SharedLoader(loader, depth=max(1, loader.num_workers * (loader.prefetch_factor or 1)))
    shared.it = iter(loader)
    shared.next()
    shared.startup_seconds = time.perf_counter() - t0
    for _ in range(shared.depth):  # empty the prefetch queue ...
        shared.next()
    t0 = time.perf_counter()
    for _ in range(shared.depth):  # ... then every batch is made while we wait for it
        shared.next()
    shared.batch_seconds = (time.perf_counter() - t0) / shared.depth
    return shared


class Naive(Pipeline):
    """ImageFolder + DataLoader + PIL transforms; fp32, contiguous, batch moved per step."""

    name = "naive"

    def __init__(self, conf: Config, loader: SharedLoader, device: torch.device) -> None:
        from fer_sweep.core.models import build_model

        self.transforms = conf.transforms.name
        torch.manual_seed(conf.trainer.seed)
        self.model = build_model(conf.model).to(device)
        self.model.train()
        self.opt = torch.optim.SGD(
            self.model.parameters(),
            lr=conf.optimizer.lr,
            momentum=conf.optimizer.momentum,
            weight_decay=conf.optimizer.weight_decay,
        )
        self.loader = loader
        self.device = device
        self.nb = device.type == "cuda"  # pinned memory: asynchronous copies

    def run(self, steps: int) -> int:
        images = 0
        for _ in range(steps):
            xb, yb = self.loader.next()
            naive_step(
                self.model,
                self.opt,
                xb.to(self.device, non_blocking=self.nb),
                yb.to(self.device, non_blocking=self.nb),
            )
            images += len(yb)
        return images

    def before(self) -> None:
        # The workers filled their prefetch queue while other pipelines were timed: drop those
        # batches, so the timed segment starts from the steady state and gets none for free.
        for _ in range(self.loader.depth):
            self.loader.next()

    def after(self) -> None:
        # ... and let them refill it now, untimed, rather than take the CPU from the next
        # pipeline's timed segment.
        time.sleep(min(2.0, 1.5 * self.loader.depth * self.loader.batch_seconds))
