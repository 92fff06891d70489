"""``python -m fer_sweep.bench``: the command line, and the markdown table of a record."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fer_sweep.core import runtime
from fer_sweep.errors import FerSweepError
from fer_sweep.tools.bench.measure import MODELS, TRANSFORMS, per_model, run_benchmark


def _with_range(ratio: dict[str, Any], key: str) -> str:
    """'0.96 (0.91-1.02)': the median and the lowest and highest repeat."""
    lo, hi = ratio[f"{key}_range"]
    return f"{ratio[key]:.2f} ({lo:.2f}-{hi:.2f})"


def markdown(result: dict[str, Any]) -> str:
    """The table: img/s per pipeline and the two ratios (medians of per-repeat ratios).

    Long by the table's rows, not by its logic."""
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
    steps = per_model(result["steps"])
    repeats = per_model(result["repeats"])
    chunks = per_model(result["chunks"])
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
    """The benchmark's command line; long by its list of flags (argparse), not by logic."""
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
