"""How should one machine's cores train several long jobs: one job at a time on every core, or
one job per core side by side? And does torch.compile pay? (docs/performance.md, Table 2's
ResNet rows.)

Each arrangement trains fer_sweep's own step (train_epoch: cache -> device -> batched
augmentation -> step, the real training split) for the same wall time after a warm-up, with
all of its processes timed over the same window; the machine's images/s is the sum over its
processes. Arrangements run one after another, then again in reverse order, so that a drift
of the machine shows up as a difference between the two rounds.

    FER2013_ROOT=... python scripts/cores_choice.py --model resnet --transforms aug --seconds 60

--alt OVERRIDE (repeatable) adds one arrangement more: one job on every core, eager, with that
Hydra override (e.g. trainer.channels_last=false, trainer.amp=bf16), timed in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from typing import Any

Plan = tuple[int, int, bool, str | None]  # jobs, threads each, compiled, one more override


def _worker(
    args: argparse.Namespace, threads: int, compiled: bool, alt: str | None, barrier: Any, out: Any
) -> None:
    import torch

    from fer_sweep.core.data import load_dataset
    from fer_sweep.sweep.compose import compose_config
    from fer_sweep.tools.bench.pipelines import FerSweepLoop

    torch.set_num_threads(threads)
    conf = compose_config(
        [
            f"model={args.model}",
            f"transforms={args.transforms}",
            "trainer.device=cpu",
            f"trainer.compile={str(compiled).lower()}",
            *([alt] if alt else []),
        ]
    )
    data = load_dataset(conf.data)
    loop = FerSweepLoop(conf, data, torch.device("cpu"), data.train.x, data.train.y)
    loop.run(args.warmup)  # compiles here when compiled
    barrier.wait()  # every process of the arrangement starts its timed window together
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        images += loop.run(1)
    out.put(images / (time.perf_counter() - t0))


def arrangement(args: argparse.Namespace, plan: Plan) -> float:
    """The images/s of ``jobs`` processes of ``threads`` threads each, summed."""
    jobs, threads, compiled, alt = plan
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(jobs), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(args, threads, compiled, alt, barrier, out))
        for _ in range(jobs)
    ]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet")
    p.add_argument("--transforms", default="aug")
    p.add_argument("--seconds", type=float, default=60.0, help="timed window per arrangement")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--no-compile", action="store_true", help="eager arrangements only")
    p.add_argument(
        "--alt",
        action="append",
        default=[],
        help="one more arrangement: 1 job, "
        "every core, eager, with this Hydra override (repeatable)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    plans: list[Plan] = [(1, cores, False, None), (cores, 1, False, None)]
    if not args.no_compile:
        plans += [(1, cores, True, None), (cores, 1, True, None)]
    plans += [(1, cores, False, alt) for alt in args.alt]
    results: dict[str, list[float]] = {}
    for plan in [*plans, *reversed(plans)]:
        jobs, threads, compiled, alt = plan
        name = f"{jobs} job(s) x {threads} thread(s){' compiled' if compiled else ''}"
        name += f" {alt}" if alt else ""
        ips = arrangement(args, plan)
        results.setdefault(name, []).append(round(ips, 1))
        print(f"{name}: {ips:.1f} img/s", flush=True)
    print(f"\n{args.model} + {args.transforms}, {cores} cores ({platform.processor() or '?'}):")
    for name, ips in results.items():
        print(f"  {name}: {ips[0]:.1f} then {ips[1]:.1f} img/s (mean {sum(ips) / 2:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "transforms": args.transforms, **results}, f, indent=1)


if __name__ == "__main__":
    main()
