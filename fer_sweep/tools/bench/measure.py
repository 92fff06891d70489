"""The benchmark's measurements: the plan (steps, warm-up, repeats), the data loading times,
the pipelines built for each (model, transforms), the interleaved repeats, and the record with
medians and paired ratios."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fer_sweep.core import runtime
from fer_sweep.core.config import Config
from fer_sweep.core.data import load_dataset
from fer_sweep.core.dataset import Dataset
from fer_sweep.core.device import device_name, resolve_precision, synchronize
from fer_sweep.core.sources import load_source
from fer_sweep.core.synthetic import make_synthetic
from fer_sweep.errors import ConfigError, FerSweepError
from fer_sweep.sweep.compose import CONF_DIR, compose_config
from fer_sweep.tools.bench.pipelines import (
    Ceiling,
    FerSweepLoop,
    Naive,
    Pipeline,
    SharedLoader,
    VariantCeiling,
    make_shared_loader,
)

PIPELINES = ("ceiling", "fer_sweep", "naive")
MODELS = ("cnn2", "cnn3", "resnet")
TRANSFORMS = ("norm", "aug")
HEAVY = ("resnet",)  # model configs whose CPU step is ~100x the small CNNs': fewer steps
RUNTIME_ENV = (  # thread and allocator settings, recorded with the results
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
    "FER_SWEEP_MALLOPT",
    "GLIBC_TUNABLES",
)


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
    ratios as medians of the per-repeat ratios.

    Long by the number of fields in the record, not by its logic."""
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
    """Kept whole on purpose: each phase's log line tells a user where a long run is."""
    from fer_sweep.core.device import pick_device

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
            f"timing {per_model(plan.repeats)} repeats of {per_model(plan.steps)} batches "
            f"per pipeline, after {per_model(plan.warmup)} warm-up batches"
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


def per_model(values: dict[str, int]) -> str:
    """{'cnn2': 5, 'cnn3': 5, 'resnet': 3} -> '5 (resnet 3)': the common value, then the rest."""
    common = statistics.mode(values.values())
    rest = ", ".join(f"{m} {v}" for m, v in values.items() if v != common)
    return f"{common} ({rest})" if rest else str(common)
