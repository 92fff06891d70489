"""A trained run as an MLflow model that reads photos, for ``mlflow models serve``.

    python -m fer_sweep.serve --run-id RUN --name fer-faces      # registers models:/fer-faces/N
    MLFLOW_TRACKING_URI=... mlflow models serve -m models:/fer-faces/1 --env-manager local -p 5001
    curl -X POST localhost:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 of a JPEG>"]]}}'

The model is a pyfunc (``FacesModel``) whose artifact is the run's ONNX export (an ensemble
run of ``fer_sweep.ensemble``: each member's, their probabilities averaged)
(``fer_sweep.tools.export``): its input is a column ``image`` of base64-encoded photos, its
output one record per face (the row, the face's index and box, the emotion, the seven
probabilities) through the same face path as ``python -m fer_sweep.predict --faces``. A
request that is not a photo, or lacks the column, is answered 400 with the reason.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from fer_sweep.core.dataset import CLASSES
from fer_sweep.tools import faces

COLUMN = "image"


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)  # HTTP 400


class FacesModel(mlflow.pyfunc.PythonModel):
    """Photos (base64) in, face records out; onnxruntime and OpenCV only."""

    def load_context(self, context: Any) -> None:
        from fer_sweep.tools.onnx_model import open_onnx

        names = sorted(k for k in context.artifacts if k.startswith("onnx"))
        self.sessions = [open_onnx(context.artifacts[k])[0] for k in names]  # 2+: an ensemble
        self.meta = open_onnx(context.artifacts[names[0]])[1]
        self.detector = faces.cascade()
        self.margin = float(self.meta.get("margin", faces.MARGIN))

    def predict(self, context: Any, model_input: Any, params: dict | None = None) -> Any:
        import pandas as pd

        from fer_sweep.tools.onnx_model import onnx_probs

        if isinstance(model_input, dict):  # {"inputs": {"image": [...]}}: columns by name
            model_input = pd.DataFrame({k: list(np.atleast_1d(v)) for k, v in model_input.items()})
        elif isinstance(model_input, (list, np.ndarray)) and all(  # {"inputs": [{"image": ...}]}
            isinstance(r, dict) for r in model_input
        ):
            model_input = pd.DataFrame(list(model_input))
        if not isinstance(model_input, pd.DataFrame) or COLUMN not in model_input.columns:
            got = list(getattr(model_input, "columns", []))
            raise _bad_request(f"the input needs a column {COLUMN!r} of base64 photos; got {got}")
        records = []
        for row, value in enumerate(model_input[COLUMN]):
            photo, scale = self._photo(row, value)
            found = faces.find_faces(photo, scale, self.margin, self.detector)
            if not found:
                continue
            x = np.stack([f.pixels for f in found])
            probs = np.mean([onnx_probs(session, x) for session in self.sessions], axis=0)
            for face, p in zip(found, probs, strict=True):
                x, y, w, h = face.box
                records.append(
                    {"row": row, "face": face.index, "x": x, "y": y, "width": w, "height": h}
                    | {"emotion": CLASSES[int(p.argmax())]}
                    | {c: float(v) for c, v in zip(CLASSES, p, strict=True)}
                )
        columns = ["row", "face", "x", "y", "width", "height", "emotion", *CLASSES]
        return pd.DataFrame(records, columns=columns)

    @staticmethod
    def _photo(row: int, value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.ndim == 0:  # a record's value via "inputs"
            value = value.item()
        try:
            data = value if isinstance(value, bytes) else base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError, ValueError) as err:
            raise _bad_request(f"row {row}: {COLUMN!r} is not base64 ({err})") from None
        try:
            return faces.open_photo(io.BytesIO(data))
        except (OSError, ValueError) as err:  # not an image, truncated, broken, a bomb
            raise _bad_request(f"row {row}: not a photo Pillow can read ({err})") from None


def register(run: Any, uri: str, name: str, onnx_paths: Sequence[Path]) -> Any:
    """Log the pyfunc under ``run`` and register it as a new version of ``name``; several ONNX
    files (an ensemble's members) are averaged."""
    from mlflow.tracking import MlflowClient

    from fer_sweep.sweep import store

    store.use_store(uri)
    try:
        with mlflow.start_run(run_id=run.info.run_id, log_system_metrics=False):
            return mlflow.pyfunc.log_model(
                name="faces_model",
                python_model=FacesModel(),
                artifacts={f"onnx{i}": str(p) for i, p in enumerate(onnx_paths)},
                registered_model_name=name,
                # served with --env-manager local, in an environment with fer_sweep[serve]
                pip_requirements=["onnxruntime", "opencv-python-headless<5", "pillow", "pandas"],
            )
    finally:  # reopening the run ended it anew (FAILED on an error): as it was, for reports
        MlflowClient(uri).set_terminated(
            run.info.run_id, status=run.info.status, end_time=run.info.end_time
        )


def build_parser() -> argparse.ArgumentParser:
    from fer_sweep.tools.cli import add_store_args

    p = argparse.ArgumentParser(
        prog="python -m fer_sweep.serve",
        description="Register a training run in the MLflow model registry as a model that "
        "finds and classifies the faces in base64 photos (serve it with `mlflow models "
        "serve -m models:/NAME/VERSION --env-manager local`).",
    )
    p.add_argument("--run-id", required=True, help="a run id, or 'best' (as in predict)")
    p.add_argument("--name", required=True, help="the registered model's name")
    add_store_args(p, "the run is in", "experiment searched by --run-id best")
    return p


def _serve(args: argparse.Namespace) -> int:
    from fer_sweep.sweep import store
    from fer_sweep.tools.export import export_onnx, run_model
    from fer_sweep.tools.onnx_model import serving_extra
    from fer_sweep.tools.predict import members_of, resolve_run

    serving_extra("onnx", "onnxscript", "onnxruntime")  # before any run is read
    client = store.open_existing(args.tracking_uri)
    run = resolve_run(client, args.run_id, args.experiment, args.tracking_uri)
    members = members_of(client, run, args.experiment, args.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, member in enumerate(members):
            model, mean, std, meta = run_model(member, args.tracking_uri)
            paths.append(Path(tmp) / f"member{i}.onnx")
            export_onnx(model, mean, std, paths[-1], meta | {"margin": faces.MARGIN})
        info = register(run, args.tracking_uri, args.name, paths)
    version = info.registered_model_version
    what = f"an ensemble of {len(members)}" if len(members) > 1 else "run"
    print(f"registered models:/{args.name}/{version} ({what} {run.info.run_id})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from fer_sweep.tools.cli import run_command

    return run_command(build_parser(), _serve, argv)


if __name__ == "__main__":
    sys.exit(main())
