"""onnxruntime vs eager PyTorch for fer_sweep's exported models (docs/performance.md):
latency at batch 1 and throughput at batch 256, cnn2 and the Table 2 ResNet, measured side by
side in one process, interleaved (repeat after repeat, each engine in turn).

The models are built from their configs (untrained weights: speed does not depend on them) and
exported by fer_sweep.tools.export, the same function as ``python -m fer_sweep.export``.
PyTorch runs the way ``fer_sweep.predict`` does: inference mode, fp32, and bf16 autocast where
the CPU has AVX-512-BF16 (predict's choice for a run trained in bf16).

    python scripts/onnx_bench.py [--models cnn2,resnet] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_sweep.core.device import resolve_precision  # noqa: E402
from fer_sweep.core.models import build_model  # noqa: E402
from fer_sweep.sweep.compose import compose_config  # noqa: E402
from fer_sweep.tools.export import export_onnx  # noqa: E402
from fer_sweep.tools.onnx_model import onnx_probs, open_onnx  # noqa: E402
from fer_sweep.tools.predict import predict_probs  # noqa: E402

MEAN, STD = 0.5134, 0.3066


def timed(fn: Callable[[], object], seconds: float) -> float:
    """Mean seconds per call over at least ``seconds`` (after one untimed call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn2,resnet")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per engine, batch and repeat")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    cpu = torch.device("cpu")
    bf16 = resolve_precision("auto", cpu)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = build_model(compose_config([f"model={name}"]).model).eval()
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, MEAN, STD, path, {"model": name})
            session, _ = open_onnx(path)
            engines = {
                "onnxruntime": lambda x, s=session: onnx_probs(s, x, 256),
                "torch_fp32": lambda x, m=model: predict_probs(m, x, MEAN, STD, cpu, 256),
                f"torch_{bf16}": lambda x, m=model: predict_probs(m, x, MEAN, STD, cpu, 256, bf16),
            }
            one = np.random.default_rng(0).integers(0, 256, (1, 48, 48), dtype=np.uint8)
            many = np.random.default_rng(1).integers(0, 256, (256, 48, 48), dtype=np.uint8)
            samples: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for engine, run in engines.items():
                    lat = timed(lambda r=run, x=one: r(x), args.seconds)
                    thr = 256 / timed(lambda r=run, x=many: r(x), args.seconds)
                    samples.setdefault(f"{engine}_batch1_ms", []).append(lat * 1e3)
                    samples.setdefault(f"{engine}_batch256_img_s", []).append(thr)
            rows[name] = {k: round(statistics.median(v), 2) for k, v in samples.items()}
            print(name, rows[name], flush=True)
    info = {"host": platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__}
    if args.json:
        args.json.write_text(json.dumps({**info, "models": rows}, indent=1))


if __name__ == "__main__":
    main()
