"""``python -m fer_sweep.export --run-id RUN``: a run's model as one ONNX file, checked.

The graph takes what training's data path holds, uint8 grey images (N, 48, 48) as
``fer_sweep.core.sources.decode_image`` makes them, normalises them with the training transform
(``make_transform(None, mean, std)``, the run's own mean and std) and returns the seven softmax
probabilities in ``CLASSES`` order; the batch size is free (torch's dynamo exporter with
``dynamic_shapes``), and the weights are inside the file (``external_data=False``). The file's
metadata names the run, its model, classes and normalisation, so ``fer_sweep.predict --onnx``
needs nothing else, and refuses a file that is not such an export.

After writing, the export is checked against PyTorch (fp32) on the run's whole test split:
the share of identical predicted classes (>= 99.9 % or exit 1) and the largest probability
difference are printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fer_sweep.core.augment import make_transform
from fer_sweep.core.dataset import CLASSES, IMAGE_SIZE
from fer_sweep.errors import FerSweepError
from fer_sweep.sweep import store
from fer_sweep.tools.cli import add_store_args, run_command
from fer_sweep.tools.onnx_model import META, onnx_probs, open_onnx, serving_extra
from fer_sweep.tools.predict import (
    BEST,
    MEMBERS_TAG,
    ROLE_TAG,
    load_model,
    normalization,
    predict_probs,
    resolve_run,
)

PARITY_GOAL = 0.999


class Exported(nn.Module):
    """uint8 images (N, 48, 48) -> probabilities (N, 7): the training transform, the model and
    a softmax, as one graph."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model, self.tfm = model, make_transform(None, mean, std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.tfm(pixels, train=False)).softmax(1)


def export_onnx(model: nn.Module, mean: float, std: float, path: Path, meta: dict) -> None:
    """Write ``model`` (fp32, CPU) as one ONNX file with a free batch dimension."""
    import onnx

    wrapped = Exported(model.float().cpu().eval(), mean, std).eval()
    example = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    program = torch.onnx.export(
        wrapped,
        (example,),
        dynamo=True,
        dynamic_shapes={"pixels": {0: batch}},
        input_names=["pixels"],
        output_names=["probs"],
        verbose=False,
    )
    assert program is not None
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = META, json.dumps(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)


def run_dataset(client: Any, run: Any, data_root: str | None = None) -> Any:
    """The dataset the run trained on (its logged config; ``data_root`` where the data moved):
    its validation and test splits as the run saw them."""
    from omegaconf import OmegaConf

    from fer_sweep.core.config import validate
    from fer_sweep.core.data import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.load(client.download_artifacts(run.info.run_id, "config.yaml", tmp))
    if data_root:
        cfg.data.root = data_root
    return load_dataset(validate(cfg).data)


def parity(model: nn.Module, session: Any, x: np.ndarray, mean: float, std: float) -> dict:
    ours = predict_probs(model.float().cpu(), x, mean, std, torch.device("cpu"), 256)
    theirs = onnx_probs(session, x)
    return {
        "images": len(x),
        "same_class": float((ours.argmax(1) == theirs.argmax(1)).mean()) if len(x) else 1.0,
        "max_prob_diff": float(np.abs(ours - theirs).max()) if len(x) else 0.0,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fer_sweep.export",
        description="Write a training run's model as one ONNX file (uint8 48x48 grey images "
        "in, 7 probabilities out, any batch size), then check it against PyTorch on the run's "
        "whole test split.",
        epilog="Example: python -m fer_sweep.export --run-id best --out model.onnx && "
        "python -m fer_sweep.predict --onnx model.onnx faces/",
    )
    p.add_argument("--run-id", required=True, help=f"a run id, or '{BEST}' (as in predict)")
    add_store_args(p, "the run is in", "experiment searched by --run-id best")
    p.add_argument("--out", type=Path, default=None, help="the file (default: <run id>.onnx)")
    p.add_argument(
        "--data-root", default=None, help="the FER2013 folder, where it moved since training"
    )
    p.add_argument("--no-check", action="store_true", help="skip the test-split parity check")
    return p


def run_model(run: Any, uri: str) -> tuple[nn.Module, float, float, dict]:
    """A run's model on the CPU, its mean and std, and the metadata its export carries."""
    mean, std = normalization(run)
    meta = {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "model": run.data.params.get("model.name", "?"),
        "classes": list(CLASSES),
        "mean": mean,
        "std": std,
        "input": f"uint8 [batch, {IMAGE_SIZE}, {IMAGE_SIZE}] grey pixels (decode_image)",
    }
    return load_model(run, uri, torch.device("cpu")), mean, std, meta


def _export(args: argparse.Namespace) -> int:
    serving_extra("onnx", "onnxscript", "onnxruntime")  # before the model and the test split
    client = store.open_existing(args.tracking_uri)
    run = resolve_run(client, args.run_id, args.experiment, args.tracking_uri)
    if run.data.tags.get(ROLE_TAG) == "ensemble":
        raise FerSweepError(
            f"run {run.info.run_id} is an ensemble: export takes one training run (each of its "
            f"members: {run.data.tags.get(MEMBERS_TAG, '?')}); python -m fer_sweep.serve "
            f"--run-id {run.info.run_id} registers the ensemble as one model."
        )
    model, mean, std, meta = run_model(run, args.tracking_uri)
    out = args.out or Path(f"{run.info.run_id}.onnx")
    x = None if args.no_check else run_dataset(client, run, args.data_root).test.x.numpy()
    t0 = time.perf_counter()
    export_onnx(model, mean, std, out, meta)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.0f} s)")
    if x is None:
        return 0
    session, _ = open_onnx(out)
    result = parity(model, session, x, mean, std)
    print(
        f"parity on the test split ({result['images']} images): "
        f"{100 * result['same_class']:.3f} % identical classes, largest probability "
        f"difference {result['max_prob_diff']:.2e}"
    )
    if result["same_class"] < PARITY_GOAL:
        print(f"fer_sweep: error: below {100 * PARITY_GOAL:.1f} % identical.", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _export, argv)


if __name__ == "__main__":
    sys.exit(main())
