"""Running a fer_sweep ONNX export with onnxruntime alone (no torch, no MLflow): what
``fer_sweep.predict --onnx`` and the export's own check use."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from fer_sweep.core.dataset import CLASSES, IMAGE_SIZE
from fer_sweep.errors import FerSweepError

META = "fer_sweep"  # metadata key: a JSON object describing the export (run, model, classes)


def read_meta(session: Any, path: str) -> dict:
    """The export's description, checked: a file that is not a fer_sweep export (another
    model's inputs or outputs) is one clear error, not a shape error at the first image."""
    meta = session.get_modelmeta().custom_metadata_map
    ins, outs = session.get_inputs(), session.get_outputs()
    ours = (
        len(ins) == 1
        and len(outs) == 1
        and ins[0].type == "tensor(uint8)"
        and list(ins[0].shape[1:]) == [IMAGE_SIZE, IMAGE_SIZE]
        and outs[0].shape[-1] == len(CLASSES)
        and META in meta
    )
    if not ours:
        got = ", ".join(f"{i.name}: {i.type} {i.shape}" for i in ins)
        raise FerSweepError(
            f"{path} is not a fer_sweep export (its inputs: {got}; fer_sweep's takes one "
            f"uint8 [batch, {IMAGE_SIZE}, {IMAGE_SIZE}] and gives {len(CLASSES)} "
            "probabilities). Write one with python -m fer_sweep.export --run-id RUN."
        )
    return json.loads(meta[META])


def serving_extra(*names: str) -> list[Any]:
    """Packages of fer_sweep's optional ``serve`` extra, imported; a missing one is one line."""
    found, missing = [], []
    for name in names:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise FerSweepError(
            f"{', '.join(missing)} not installed: pip install -e '.[serve]' (ONNX and photos)."
        )
    return found


def open_onnx(path: str | Path) -> tuple[Any, dict]:
    """An onnxruntime session on the CPU and the export's metadata."""
    (ort,) = serving_extra("onnxruntime")

    if not Path(path).is_file():
        raise FerSweepError(f"no ONNX file {path}; write one with python -m fer_sweep.export.")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        raise FerSweepError(f"{path} is not an ONNX model onnxruntime can load ({err}).") from None
    return session, read_meta(session, str(path))


def onnx_probs(session: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    out = [
        session.run(None, {"pixels": np.ascontiguousarray(x[i : i + batch_size])})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.empty((0, len(CLASSES)), dtype=np.float32)
