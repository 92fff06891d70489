"""``python -m fer_sweep.bench``: fer_sweep's training speed against the model's own ceiling and
against the pipeline a user would write by hand.

Three pipelines per (model, transforms), measured in ONE process and interleaved, so that load
from other processes hits them alike; medians over the repeats are reported. A repeat of a model
runs, per transforms, its ceiling and fer_sweep (on the same model) in short alternating chunks,
then the naive segments. So each fer_sweep figure is paired with a ceiling measured at the same
moments, and a slow spell of the shared machine cancels out of their ratio.

- ``ceiling``: forward + backward + optimizer step on one batch already on the device, in the
  memory format and autocast policy fer_sweep uses for that model. No data path at all: the most
  any training loop can reach with this model, this batch size and this optimizer.
- ceiling variants: the same step in every precision (fp32, bf16 autocast) and compile mode the
  device offers, each on its own model, in whole segments after the pairs. fer_sweep is compared
  with the fastest (and with fp32 eager) through its own variant, like with like: fer_sweep /
  paired ceiling x own variant / that variant, per repeat.
- ``fer_sweep``: ``fer_sweep.core.train.train_epoch`` (the loop ``python -m fer_sweep`` runs) on the
  data from ``fer_sweep.core.data.load_dataset``, model and optimizer from the real Hydra config.
- ``naive``: torchvision ``ImageFolder`` + ``DataLoader(num_workers=os.cpu_count())`` + PIL
  transforms, fp32, contiguous memory: what a tutorial-following user writes.

Plus the data loading times: cold (decode every image into an empty cache) and warm (from the
cache). ``naive_loader`` / ``naive_transform`` / ``naive_step`` are reused by the equivalence test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fer_sweep.core import runtime

if __name__ == "__main__":  # the program, not a library import: tune before torch loads
    runtime.tune()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fer_sweep.core.config import Config, validate
from fer_sweep.core.data import load_dataset
from fer_sweep.core.dataset import CLASSES, Dataset
from fer_sweep.core.sources import load_source
from fer_sweep.core.synthetic import make_synthetic
from fer_sweep.core.train import (
    build,
    device_name,
    resolve_precision,
    synchronize,
    train_step,
    use_cuda_kernels,
)
from fer_sweep.errors import ConfigError, FerSweepError

PIPELINES = ("ceiling", "fer_sweep", "naive")
MODELS = ("cnn2", "cnn3", "resnet")
TRANSFORMS = ("norm", "aug")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
HEAVY = ("resnet",)  # model configs whose CPU step is ~100x the small CNNs': fewer steps
RUNTIME_ENV = (  # thread and allocator settings, recorded with the results
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
    "FER_SWEEP_MALLOPT",
    "GLIBC_TUNABLES",
)


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


# --------------------------------------------------------------------------- config & models


def compose_config(overrides: Sequence[str]) -> Config:
    """The real config: conf/ composed by Hydra with overrides, then fer_sweep's validate."""
    from hydra import compose, initialize_config_dir

    if not (CONF_DIR / "config.yaml").is_file():
        raise FerSweepError(
            f"fer_sweep's config folder {CONF_DIR} is missing; run the benchmark "
            "from a source checkout installed with `pip install -e .`."
        )
    with initialize_config_dir(
        config_dir=str(CONF_DIR), version_base="1.3", job_name="fer_sweep_bench"
    ):
        try:
            cfg = compose(config_name="config", overrides=list(overrides))
        except Exception as err:  # Hydra's own errors: a bad --override, usually
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"cannot compose the config with {list(overrides)}: {first}"
            ) from None
    return validate(cfg)


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


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Plan:
    models: list[str]
    transforms: list[str]
    steps: dict[str, int]  # model -> timed steps per pipeline and repeat
    warmup: dict[str, int]
    repeats: dict[str, int]
    settle: dict[str, int]  # untimed batches right before each timed segment
    chunks: dict[str, int]  # alternating chunks a ceiling / fer_sweep pair's steps are cut into
    compile_modes: tuple[bool, ...] = (False, True)  # ceiling variants: eager, torch.compile


# (light, heavy) timed steps per repeat: each timed segment lasts 0.5-2 s on its device.
DEFAULT_STEPS = {
    ("cpu", False): (50, 3),
    ("cpu", True): (16, 1),
    ("gpu", False): (300, 100),
    ("gpu", True): (100, 30),
}
DEFAULT_WARMUP = {"cpu": (3, 1), "gpu": (20, 10)}
# (light, heavy) untimed batches before every timed segment, so that it starts from its own
# steady state rather than in whatever the previous segment left behind (caches, sleeping
# threads, DataLoader workers finishing their prefetch): on the CPU, a segment right after a
# naive one ran up to ~5 % slower. The heavy models' seconds-long steps need none.
DEFAULT_SETTLE = {"cpu": (2, 0), "gpu": (5, 0)}
# (light, heavy) chunks per pair: on this shared VM single 0.3 s segments scatter by +-10-20 %,
# steps alternated one by one by ~2 %; chunks of a few steps get close to the latter.
DEFAULT_CHUNKS = {"cpu": (4, 1), "gpu": (4, 1)}
# (light, heavy) repeats: more, shorter pairs make the small CNNs' ratios steadier. --quick gives
# the ResNet (0.7-2.5 s per CPU step) 5: its single-step segments scatter by +-15 % on a shared
# VM, and 3 repeats could not tell 1.9x from 2.1x; the whole run stays under ~4 minutes here.
DEFAULT_REPEATS = {False: (7, 5), True: (7, 5)}


def make_plan(args: argparse.Namespace, device: torch.device) -> Plan:
    def pick(value: str, folder: str, what: str) -> list[str]:
        items = [v.strip() for v in value.split(",") if v.strip()]
        available = sorted(p.stem for p in (CONF_DIR / folder).glob("*.yaml"))
        bad = [v for v in items if v not in available]
        if not items or bad:
            raise ConfigError(
                f"--{what} {value!r}: give a comma-separated list of {', '.join(available)}."
            )
        return list(dict.fromkeys(items))

    models = pick(args.models, "model", "models")
    transforms = pick(args.transforms, "transforms", "transforms")
    kind = "cpu" if device.type == "cpu" else "gpu"
    light, heavy = DEFAULT_STEPS[(kind, bool(args.quick))]
    warm_light, warm_heavy = DEFAULT_WARMUP[kind]
    settle_light, settle_heavy = DEFAULT_SETTLE[kind]
    chunks_light, chunks_heavy = DEFAULT_CHUNKS[kind]

    def is_heavy(m: str) -> bool:
        return m.startswith(HEAVY)

    steps = {m: args.steps or (heavy if is_heavy(m) else light) for m in models}
    warmup = {
        m: args.warmup if args.warmup is not None else warm_heavy if is_heavy(m) else warm_light
        for m in models
    }
    rep_light, rep_heavy = DEFAULT_REPEATS[bool(args.quick)]
    repeats = {m: args.repeats or (rep_heavy if is_heavy(m) else rep_light) for m in models}
    settle = {m: settle_heavy if is_heavy(m) else settle_light for m in models}
    chunks = {m: chunks_heavy if is_heavy(m) else chunks_light for m in models}
    compile_modes = (False,) if args.no_compile else (False, True)
    return Plan(models, transforms, steps, warmup, repeats, settle, chunks, compile_modes)


def available_precisions(device: torch.device) -> list[str]:
    """fp32, plus bf16 where autocast can run it on this device (natively or not: the
    benchmark shows which is faster)."""
    try:
        return ["fp32", resolve_precision("bf16", device)]
    except ConfigError:
        return ["fp32"]


def measure_load(root: Path, cache: Path, fmt: str = "auto") -> dict[str, Any]:
    """Cold: decode every image into an empty cache dir; warm: the same call, from the cache
    (median of three). Run before torchvision is imported, as in ``python -m fer_sweep``."""
    t0 = time.perf_counter()
    train, test, info = load_source(root, fmt, cache)
    cold = time.perf_counter() - t0
    if info["cache_hit"]:
        raise FerSweepError(f"the cold load found a cache in {cache}; it must start empty.")
    warm = []
    for _ in range(3):
        t0 = time.perf_counter()
        _, _, info = load_source(root, fmt, cache)
        warm.append(time.perf_counter() - t0)
    return {
        "cold_seconds": round(cold, 3),
        "warm_seconds": round(statistics.median(warm), 3),
        "images": len(train) + len(test),
        "source": info["source"],
    }


def resolve_root(args: argparse.Namespace, tmp: Path) -> tuple[Path, list[str]]:
    """(data root, data overrides): real FER2013 from FER2013_ROOT, or --synthetic."""
    if args.synthetic:
        root = tmp / "synthetic-v1"  # where data=synthetic looks for it under cache_dir
        make_synthetic(root)
        return root, ["data=synthetic"]
    env = os.environ.get("FER2013_ROOT", "")
    if not env:
        raise FerSweepError(
            "FER2013_ROOT is not set: point it at FER2013's image folders "
            "(FER2013_ROOT=/path/to/fer2013 python -m fer_sweep.bench), or run "
            "with --synthetic to try the benchmark on generated data."
        )
    root = Path(env).expanduser().absolute()
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        raise FerSweepError(
            f"FER2013_ROOT={env} has no train/ and test/ image folders (the "
            'Kaggle "msambare/fer2013" layout, which the naive ImageFolder '
            "pipeline needs); fix FER2013_ROOT or run with --synthetic."
        )
    return root, [f"data.root='{root}'"]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of per-repeat ratios: both sides of a pair ran seconds apart, so a slow spell
    of the machine cancels out of the ratio (it would not in a ratio of medians)."""
    return round(_median([x / y for x, y in zip(a, b, strict=True)]), 3)


def _range(values: Sequence[float]) -> list[float]:
    """[lowest, highest] per-repeat ratio: how far one repeat can be from the median."""
    return [round(min(values), 3), round(max(values), 3)]


def _chained_ratios(
    ours: Sequence[float],
    ceiling: Sequence[float],
    own: Sequence[float] | None,
    target: Sequence[float],
) -> list[float]:
    """fer_sweep over a ceiling variant, each factor measured like with like: per repeat,
    (fer_sweep / its paired ceiling) x (the variant in fer_sweep's own precision and compile
    mode / the target variant), then the median.

    fer_sweep runs in chunks alternating with its paired ceiling, the variants in whole
    segments of their own; an identical step timed both ways differed by -7 to +16 % (medians
    of 7 repeats, docs/performance.md), so fer_sweep is never divided by a variant directly.
    Where fer_sweep's own variant was not measured (``--no-compile`` with a compiled
    fer_sweep), the direct pairing is all there is. Returns the per-repeat ratios."""
    if own is None:
        return [o / t for o, t in zip(ours, target, strict=True)]
    return [o / c * v / t for o, c, v, t in zip(ours, ceiling, own, target, strict=True)]


@dataclass
class Pipelines:
    """Everything timed, per model: (ceiling, fer_sweep) per transforms, the ceiling variants,
    the naive pipelines; and the naive DataLoaders they share."""

    pairs: dict[str, list[tuple[Ceiling, FerSweepLoop]]]
    variants: dict[str, list[VariantCeiling]]
    naives: dict[str, list[Naive]]
    loaders: dict[bool, SharedLoader]


def build_pipelines(
    plan: Plan,
    confs: dict[tuple[str, str], Config],
    data: Dataset,
    root: Path,
    device: torch.device,
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> Pipelines:
    x_train, y_train = data.train.x.to(device), data.train.y.to(device)
    pipes = Pipelines({}, {}, {}, {})
    precisions = available_precisions(device)
    modes = ", ".join("compile" if c else "eager" for c in plan.compile_modes)
    slow = " (torch.compile: ~40 s per model and precision)" if True in plan.compile_modes else ""
    log(f"ceiling variants: {', '.join(precisions)} x {modes}{slow}")
    for m in plan.models:
        pipes.pairs[m], pipes.naives[m] = [], []
        for t in plan.transforms:
            conf = confs[(m, t)]
            augment = _augments(conf, data)
            if augment not in pipes.loaders:
                sl = make_shared_loader(
                    root / "train", data, augment, args.batch_size, device, args.workers
                )
                pipes.loaders[augment] = sl
                log(
                    f"naive DataLoader ({'aug' if augment else 'norm'}): "
                    f"{sl.loader.num_workers} workers, first batch after "
                    f"{sl.startup_seconds:.2f} s, then {sl.batch_seconds * 1e3:.0f} ms/batch"
                )
            ours = FerSweepLoop(conf, data, device, x_train, y_train)
            pipes.pairs[m].append((Ceiling(ours, conf, data), ours))
            pipes.naives[m].append(Naive(conf, pipes.loaders[augment], device))
        ceiling, ours = pipes.pairs[m][0]
        conf = confs[(m, plan.transforms[0])]
        pipes.variants[m] = [
            VariantCeiling(conf, ours, ceiling.xb, ceiling.yb, precision, compiled)
            for compiled in plan.compile_modes
            for precision in precisions
        ]
    return pipes


def time_repeats(
    plan: Plan, pipes: Pipelines, device: torch.device, log: Callable[[str], None]
) -> dict[tuple[str, str, str], list[float]]:
    """img/s per (model, transforms, pipeline) and repeat, after a warm-up of every pipeline.

    Per transforms, the ceiling and fer_sweep segments are cut into short chunks that
    alternate (ABBA...), so the pair sees the same moments of the machine; then the variants
    and the naive segments. Odd repeats take everything in reverse order."""
    started = time.perf_counter()
    for m in plan.models:  # warm-up: allocations, kernels, compilation, workers
        for p in [
            *(p for pair in pipes.pairs[m] for p in pair),
            *pipes.variants[m],
            *pipes.naives[m],
        ]:
            p.before()
            p.run(plan.warmup[m])
            p.after()
    synchronize(device)
    samples: dict[tuple[str, str, str], list[float]] = {}
    for rep in range(max(plan.repeats.values())):
        order = (lambda xs: xs[::-1]) if rep % 2 else (lambda xs: xs)
        for m in plan.models:
            if rep >= plan.repeats[m]:
                continue
            for ceiling, ours in order(pipes.pairs[m]):
                totals = {ceiling: [0.0, 0.0], ours: [0.0, 0.0]}
                for j, steps in enumerate(_chunks(plan.steps[m], plan.chunks[m])):
                    for p in (ceiling, ours) if (j + rep) % 2 == 0 else (ours, ceiling):
                        settle = plan.settle[m] if j == 0 else 0
                        images, seconds = _time_segment(p, steps, settle, device)
                        totals[p][0] += images
                        totals[p][1] += seconds
                for p, (images, seconds) in totals.items():
                    samples.setdefault((m, p.transforms, p.name), []).append(images / seconds)
            for p in [*order(pipes.variants[m]), *order(pipes.naives[m])]:
                images, seconds = _time_segment(p, plan.steps[m], plan.settle[m], device)
                samples.setdefault((m, p.transforms, p.name), []).append(images / seconds)
        log(
            f"repeat {rep + 1}/{max(plan.repeats.values())} done "
            f"({time.perf_counter() - started:.0f} s)"
        )
    return samples


def summarize(
    plan: Plan,
    pipes: Pipelines,
    samples: dict[tuple[str, str, str], list[float]],
    batch_size: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(records per pipeline, ratios per model and transforms, ceiling variants): medians, and
    ratios as medians of the per-repeat ratios."""
    records, ratios, ceilings = [], [], []
    for m in plan.models:
        best: list[float] = []
        best_name = ""
        for v in pipes.variants[m]:
            values = samples[(m, v.transforms, v.name)]
            ceilings.append(
                {
                    "model": m,
                    "variant": v.name.removeprefix("ceiling_"),
                    "precision": v.name.split("_")[1],
                    "compile": v.name.endswith("compile"),
                    "images_per_second": round(_median(values), 1),
                    "samples": [round(x, 1) for x in values],
                }
            )
            if not best or _median(values) > _median(best):
                best, best_name = values, ceilings[-1]["variant"]
        fp32_eager = samples[(m, "norm", "ceiling_fp32_eager")]
        loop = pipes.pairs[m][0][1]  # fer_sweep's pipeline: its precision and variant
        own = samples.get((m, "norm", f"ceiling_{loop.variant}"))
        for t in plan.transforms:
            series = {name: samples[(m, t, name)] for name in PIPELINES}
            records += [
                {
                    "model": m,
                    "transforms": t,
                    "pipeline": name,
                    "images_per_second": round(_median(values), 1),
                    "samples": [round(v, 1) for v in values],
                    "steps": plan.steps[m],
                    "batch_size": batch_size,
                }
                for name, values in series.items()
            ]
            ours = series["fer_sweep"]
            over_best = _chained_ratios(ours, series["ceiling"], own, best)
            over_fp32 = _chained_ratios(ours, series["ceiling"], own, fp32_eager)
            ratios.append(
                {
                    "model": m,
                    "transforms": t,
                    "fer_sweep_over_ceiling": _paired_ratio(ours, series["ceiling"]),
                    "fer_sweep_over_naive": _paired_ratio(ours, series["naive"]),
                    "fer_sweep_precision": loop.amp,
                    "best_ceiling": best_name,
                    "fer_sweep_variant": loop.variant,
                    "fer_sweep_over_best_ceiling": round(_median(over_best), 3),
                    "fer_sweep_over_best_ceiling_range": _range(over_best),
                    "fer_sweep_over_fp32_eager": round(_median(over_fp32), 3),
                    "fer_sweep_over_fp32_eager_range": _range(over_fp32),
                }
            )
    return records, ratios, ceilings


def run_benchmark(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    from fer_sweep.core.train import pick_device

    device = pick_device(args.device)
    plan = make_plan(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    loadavg_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fer_sweep_bench_") as tmp_name:
        tmp = Path(tmp_name)
        root, data_overrides = resolve_root(args, tmp)
        log(
            f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"data {root}"
        )
        base = [
            *data_overrides,
            f"data.cache_dir='{tmp}'",
            f"trainer.device={args.device}",
            f"trainer.batch_size={args.batch_size}",
            *args.override,
        ]
        confs = {
            (m, t): compose_config([*base, f"model={m}", f"transforms={t}"])
            for m in plan.models
            for t in plan.transforms
        }  # bad settings fail here, first
        load = measure_load(root, tmp)
        log(
            f"load: cold {load['cold_seconds']:.2f} s, warm {load['warm_seconds']:.2f} s "
            f"({load['images']} images)"
        )
        t0 = time.perf_counter()
        data = load_dataset(next(iter(confs.values())).data)
        load["dataset_seconds"] = round(time.perf_counter() - t0, 3)
        pipes = build_pipelines(plan, confs, data, root, device, args, log)
        log(
            f"timing {_per_model(plan.repeats)} repeats of {_per_model(plan.steps)} batches "
            f"per pipeline, after {_per_model(plan.warmup)} warm-up batches"
        )
        samples = time_repeats(plan, pipes, device, log)
        for sl in pipes.loaders.values():
            sl.it = None  # the iterator owns the workers: they shut down
        threads = torch.get_num_threads()
    records, ratios, ceilings = summarize(plan, pipes, samples, args.batch_size)
    import torchvision

    loaders = pipes.loaders
    return {
        "records": records,
        "ratios": ratios,
        "ceilings": ceilings,
        "load": load,
        "naive_startup_seconds": {
            ("aug" if k else "norm"): round(v.startup_seconds, 3) for k, v in loaders.items()
        },
        "naive_workers": next(iter(loaders.values())).loader.num_workers,
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "malloc_tuned": runtime.tune()["malloc"] == "tuned",
        "env": {k: os.environ[k] for k in RUNTIME_ENV if k in os.environ},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "quick": bool(args.quick),
        "synthetic": bool(args.synthetic),
        "overrides": args.override,
        "repeats": plan.repeats,
        "steps": plan.steps,
        "warmup": plan.warmup,
        "settle": plan.settle,
        "chunks": plan.chunks,
        "loadavg_start": [round(v, 2) for v in loadavg_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _chunks(steps: int, n: int) -> list[int]:
    """``steps`` cut into ``n`` near-equal chunks (fewer when there are fewer steps)."""
    n = max(1, min(n, steps))
    return [steps // n + (1 if i < steps % n else 0) for i in range(n)]


def _time_segment(p: Pipeline, steps: int, settle: int, device: torch.device) -> tuple[int, float]:
    """(images, seconds) of one timed segment, from queued device work done to done, after
    ``settle`` untimed batches of the same pipeline."""
    p.before()
    if settle:
        p.run(settle)
    synchronize(device)
    t0 = time.perf_counter()
    images = p.run(steps)
    synchronize(device)
    seconds = time.perf_counter() - t0
    p.after()
    return images, seconds


def _augments(conf: Config, data: Dataset) -> bool:
    """Whether the transforms config augments (then naive uses the PIL augmentation)."""
    from fer_sweep.core.augment import make_transform

    tfm = make_transform(conf.transforms, data.mean, data.std)
    if tfm.hflip or tfm.erase:
        raise ConfigError(
            f"transforms={conf.transforms.name}: the naive pipeline mirrors only "
            "the study's rotation + translation; benchmark norm or aug."
        )
    return tfm.is_random


def _per_model(values: dict[str, int]) -> str:
    """{'cnn2': 5, 'cnn3': 5, 'resnet': 3} -> '5 (resnet 3)': the common value, then the rest."""
    common = statistics.mode(values.values())
    rest = ", ".join(f"{m} {v}" for m, v in values.items() if v != common)
    return f"{common} ({rest})" if rest else str(common)


def _with_range(ratio: dict[str, Any], key: str) -> str:
    """'0.96 (0.91-1.02)': the median and the lowest and highest repeat."""
    lo, hi = ratio[f"{key}_range"]
    return f"{ratio[key]:.2f} ({lo:.2f}-{hi:.2f})"


def markdown(result: dict[str, Any]) -> str:
    """The table: img/s per pipeline and the two ratios (medians of per-repeat ratios)."""
    ips = {
        (r["model"], r["transforms"], r["pipeline"]): r["images_per_second"]
        for r in result["records"]
    }
    best = {(c["model"], c["variant"]): c["images_per_second"] for c in result["ceilings"]}
    lines = [
        "| model | transforms | precision | ceiling img/s | best ceiling img/s | "
        "fer_sweep img/s | naive img/s | fer_sweep/ceiling | fer_sweep/best ceiling "
        "| fer_sweep/fp32 eager | fer_sweep/naive |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["ratios"]:
        m, t = r["model"], r["transforms"]
        lines.append(
            f"| {m} | {t} | {r['fer_sweep_precision']} | "
            f"{ips[(m, t, 'ceiling')]:,.0f} | "
            f"{best[(m, r['best_ceiling'])]:,.0f} ({r['best_ceiling']}) | "
            f"{ips[(m, t, 'fer_sweep')]:,.0f} | {ips[(m, t, 'naive')]:,.0f} | "
            f"{r['fer_sweep_over_ceiling']:.2f} | "
            f"{_with_range(r, 'fer_sweep_over_best_ceiling')} | "
            f"{_with_range(r, 'fer_sweep_over_fp32_eager')} | {r['fer_sweep_over_naive']:.2f} |"
        )
    variants = list(dict.fromkeys(c["variant"] for c in result["ceilings"]))
    models = list(dict.fromkeys(c["model"] for c in result["ceilings"]))
    lines += [
        "",
        "Ceiling variants (the model's step alone, img/s):",
        "",
        "| model | " + " | ".join(variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for m in models:
        lines.append(
            f"| {m} | "
            + " | ".join(f"{best[(m, v)]:,.0f}" if (m, v) in best else "" for v in variants)
            + " |"
        )
    load = result["load"]
    steps = _per_model(result["steps"])
    repeats = _per_model(result["repeats"])
    chunks = _per_model(result["chunks"])
    startup = ", ".join(f"{k} {v:.1f} s" for k, v in result["naive_startup_seconds"].items())
    lines += [
        "",
        f"Data loading ({load['images']:,} images): cold {load['cold_seconds']:.2f} s "
        f"(decode into an empty cache), warm {load['warm_seconds']:.2f} s (from the "
        f"cache); load_dataset from the cache {load['dataset_seconds']:.2f} s. "
        f"Naive DataLoader start-up (not in its img/s): {startup}.",
        "",
        f"{result['device']} ({result['device_name']}), torch {result['torch']}, "
        f"{result['threads']} threads, "
        f"{'tuned' if result.get('malloc_tuned') else 'default'} glibc malloc, "
        f"batch {result['records'][0]['batch_size']}, "
        f"timed batches per segment {steps}, median of {repeats} interleaved repeats "
        f"(each: ceiling and fer_sweep of one transforms in {chunks} alternating chunks "
        f"on the same model, then the ceiling variants, then naive); ratios are medians "
        f"of the per-repeat ratios (in parentheses the lowest and highest repeat); fer_sweep "
        f"over a variant = fer_sweep/its paired ceiling x the variant in fer_sweep's "
        f"precision/that variant; load average {result['loadavg_start'][0]:.1f} -> "
        f"{result['loadavg_end'][0]:.1f}; {result.get('bench_seconds', 0):.0f} s in all.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fer_sweep.bench",
        description="Training throughput of fer_sweep vs the model's compute ceiling vs a naive "
        "ImageFolder/DataLoader pipeline, plus data loading times.",
    )
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model configs")
    p.add_argument(
        "--transforms",
        default=",".join(TRANSFORMS),
        help="comma-separated transforms configs (norm, aug)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed batches per pipeline and repeat (CPU: 50, resnet 3; --quick 16, "
        "resnet 1. GPU: 300, resnet 100; --quick 100, resnet 30)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved repeats (7, resnet 5; also with --quick)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed batches per pipeline first (CPU 3, resnet 1; GPU 20, resnet 10)",
    )
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for every pipeline (default: torch's own)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="naive DataLoader workers (default os.cpu_count())",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer batches (about 6 min on 2 CPU cores, 4 of them compiling)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="leave out the torch.compile ceiling variants (saves ~40 s per model and precision)",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="generated data instead of FER2013 (for trying it; not a real number)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override for every configuration, e.g. trainer.threads=1 or "
        "trainer.channels_last=false (repeatable)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size={args.batch_size} must be positive")
    for name in ("steps", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name}={value} must be a positive integer")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be 0 or more")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers={args.workers} must be 0 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"runtime: {', '.join(f'{k}={v}' for k, v in runtime.tune().items())}", file=sys.stderr)
    started = time.perf_counter()
    try:
        result = run_benchmark(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    except FerSweepError as err:
        print(f"fer_sweep: error: {err}", file=sys.stderr)
        return 2
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(markdown(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
