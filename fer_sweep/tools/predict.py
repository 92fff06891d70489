"""``python -m fer_sweep.predict --run-id RUN PATH...``: classify face images with a logged model.

The model is the run's MLflow PyTorch model (``runs:/RUN/model``, the best-validation weights
that ``fer_sweep.sweep.job`` logs); images go through exactly the training pipeline so that a
prediction here equals what the model computed on the same file during training:

1. decode with the calls of ``fer_sweep.core.sources``' decoder (Pillow): JPEGs are decoded in
   draft mode straight to grayscale at reduced scale, any other mode is converted to ``'L'``, and
   any size other than 48x48 is resized with ``Image.Resampling.BILINEAR`` (no cropping, no
   aspect-ratio padding, no EXIF rotation: the same as training, so pass face crops);
2. normalise the uint8 batch with ``fer_sweep.core.augment.make_transform(...)(x, train=False)``,
   i.e. ``((x / 255) - mean) / std`` with the mean/std the run used (its ``data.mean_used`` /
   ``data.std_used`` params), not values recomputed here;
3. the forward pass in the precision the run trained in (its ``trainer.precision`` param: bf16
   autocast where this device can run it, else fp32), softmax in float32, columns in
   ``fer_sweep.core.dataset.CLASSES`` order.

Exit status: 0 when at least one image was predicted (unreadable files are named on stderr and
skipped), 1 when none was, 2 for bad arguments (unknown run, store or path; a run without a
model).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from PIL import UnidentifiedImageError

from fer_sweep.core.augment import make_transform
from fer_sweep.core.dataset import CLASSES, IMAGE_EXTENSIONS, IMAGE_SIZE
from fer_sweep.core.device import autocast, pick_device, resolve_precision
from fer_sweep.core.sources import decode_image
from fer_sweep.errors import ConfigError, FerSweepError
from fer_sweep.sweep import store
from fer_sweep.tools import faces
from fer_sweep.tools.cli import add_store_args, user_errors

PROG = "python -m fer_sweep.predict"
BEST = "best"
ROLE_TAG = "fer_sweep.role"
MEMBERS_TAG = "fer_sweep.members"  # an ensemble run's member runs
MODEL_PATH = "model"


@dataclass
class Prediction:
    path: str
    probs: list[float]  # in CLASSES order

    @property
    def label(self) -> str:
        return CLASSES[int(np.argmax(self.probs))]


# ----------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Predict the facial expression of face-crop images with the model logged by "
        "a fer_sweep training run. Images of any size and colour mode are converted "
        "to 48x48 grayscale exactly as in training.",
        epilog="Example: %(prog)s --run-id best faces/ photo.jpg --format csv",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files, or folders searched recursively for image files "
        f"({', '.join(sorted(IMAGE_EXTENSIONS))})",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--run-id",
        help="MLflow run id of a training run, or 'best': the FINISHED job run of "
        "--experiment with the highest best_val_acc (FER2013 runs before synthetic ones)",
    )
    which.add_argument(
        "--onnx",
        metavar="FILE",
        help="a model written by python -m fer_sweep.export, run with onnxruntime alone",
    )
    add_store_args(p, "the run is in", "experiment searched by --run-id best")
    p.add_argument(
        "--format",
        choices=("table", "csv", "json", "jsonl"),
        default="table",
        help="output format (default: %(default)s; jsonl: one JSON object per line)",
    )
    p.add_argument(
        "--faces",
        action="store_true",
        help="the images are ordinary photos: find every face (OpenCV's Haar cascade), frame "
        "it as FER2013 does and classify each; one record per face",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=faces.MARGIN,
        help="with --faces: added around each face box, as a fraction of its width "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--annotate",
        metavar="DIR",
        type=Path,
        help="with --faces: write each photo with its boxes and labels drawn into DIR",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="images per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: %(default)s)",
    )
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


# ----------------------------------------------------------------------------- inputs


def find_images(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """(files to predict, notes). Files named explicitly are always tried (a non-image is then
    reported as unreadable); folders contribute image files by extension, hidden files aside.
    A path that does not exist is a bad argument: silently predicting fewer files hides typos."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FerSweepError(f"no such file or folder: {', '.join(missing)}. Check the path(s).")
    files: list[Path] = []
    notes: list[str] = []
    for arg in paths:
        root = Path(arg)
        if not root.is_dir():
            files.append(root)
            continue
        found, skipped = [], 0
        for dirpath, dirnames, names in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(names):
                if name.startswith("."):
                    continue
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(Path(dirpath) / name)
                else:
                    skipped += 1
        if skipped:
            notes.append(f"skipped {skipped} non-image file(s) in {arg}")
        if not found:
            notes.append(f"no image files in {arg}")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:  # a file named twice (directly and via its folder) is predicted once
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, notes


def read_images(files: Sequence[Path]) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(names, uint8 (N,48,48), [(name, why)] for unreadable files): one bad file never stops
    the batch."""
    names: list[str] = []
    arrays: list[np.ndarray] = []
    bad: list[tuple[str, str]] = []
    for f in files:
        try:
            x = decode_image(f.read_bytes())
        except UnidentifiedImageError:
            bad.append((str(f), "not an image format Pillow can read, or a corrupt file"))
            continue
        except Exception as err:  # truncated, damaged, unreadable, too large
            bad.append((str(f), f"{type(err).__name__}: {err}".strip()))
            continue
        names.append(str(f))
        arrays.append(x)
    x = np.stack(arrays) if arrays else np.empty((0, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    return names, x, bad


# ----------------------------------------------------------------------------- the run


def _has_model(client: Any, run: Any) -> bool:
    outputs = getattr(run, "outputs", None)
    if outputs is not None and getattr(outputs, "model_outputs", None):
        return True
    try:  # models logged the MLflow 2 way, as run artifacts
        return bool(client.list_artifacts(run.info.run_id, MODEL_PATH))
    except Exception:
        return False


def _search(client: Any, exp_id: str, filt: str) -> Iterator[Any]:
    """All matching runs, best first, page by page (stops as soon as the caller does)."""
    token = None
    while True:
        page = client.search_runs(
            [exp_id],
            filt,
            max_results=200,
            page_token=token,
            order_by=["metrics.best_val_acc DESC", "attributes.start_time DESC"],
        )
        yield from page
        token = page.token
        if not token:
            return


def resolve_run(client: Any, run_id: str, experiment: str, uri: str) -> Any:
    """The run to predict with; for 'best', the top FINISHED job run that has a model (ties:
    the newest), announced on stderr."""
    from mlflow.exceptions import MlflowException

    if run_id != BEST:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise FerSweepError(
                f"no MLflow run {run_id!r} in {uri}. Check the id (MLflow UI or "
                "`mlflow runs list`), pass the --tracking-uri the run was logged "
                "to, or use --run-id best."
            ) from None
        if run.data.tags.get(ROLE_TAG) != "ensemble" and not _has_model(client, run):
            raise FerSweepError(_no_model(run, uri))
        return run
    exp_id = store.require_experiment(client, experiment)
    filt = (
        f"tags.`{ROLE_TAG}` = 'job' and attributes.status = 'FINISHED' "
        "and metrics.best_val_acc >= 0"
    )
    skipped = []
    # FER2013 runs first: synthetic faces are easy, and their model is never the one wanted
    real = _search(client, exp_id, f"{filt} and tags.synthetic = 'false'")
    seen = set()
    for run in itertools.chain(real, _search(client, exp_id, filt)):
        if run.info.run_id in seen:  # a FER2013 run met again in the second search
            continue
        seen.add(run.info.run_id)
        if not _has_model(client, run):
            skipped.append(run.info.run_id)
            continue
        acc = run.data.metrics["best_val_acc"]
        name = run.info.run_name or "?"
        synthetic = run.data.tags.get("synthetic") == "true" and "SYNTHETIC" not in name
        extra = ", trained on SYNTHETIC data" if synthetic else ""
        if skipped:
            print(
                f"fer_sweep: skipped {len(skipped)} better run(s) without a logged model "
                f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''})",
                file=sys.stderr,
            )
        print(
            f"fer_sweep: --run-id best: using run {run.info.run_id} ({name}, best_val_acc "
            f"{acc:.4f}{extra}) from experiment {experiment!r} in {uri}",
            file=sys.stderr,
        )
        return run
    what = "with a logged model " if skipped else ""
    raise FerSweepError(
        f"experiment {experiment!r} in {uri} has no FINISHED training run "
        f"{what}with a best_val_acc metric. Train one first (python -m "
        "fer_sweep ...), or pass --run-id ID."
    )


def members_of(client: Any, run: Any, experiment: str, uri: str) -> list[Any]:
    """The runs whose models predict for ``run``: itself, or an ensemble's members (the run
    fer_sweep.ensemble logs, which has no model of its own)."""
    if run.data.tags.get(ROLE_TAG) != "ensemble":
        return [run]
    ids = run.data.tags.get(MEMBERS_TAG, "").split(",")
    return [resolve_run(client, m, experiment, uri) for m in ids]


def _no_model(run: Any, uri: str) -> str:
    role = run.data.tags.get(ROLE_TAG)
    why = (
        " (it is a sweep's parent run; pass one of its job runs)"
        if role == "parent"
        else f" (status {run.info.status}; train with mlflow.log_model=true)"
    )
    return (
        f"run {run.info.run_id} in {uri} has no logged model at runs:/{run.info.run_id}/"
        f"{MODEL_PATH}{why}."
    )


def normalization(run: Any) -> tuple[float, float]:
    """The mean/std the run normalised with: reused, never recomputed, or inputs shift."""
    params = run.data.params
    try:
        return float(params["data.mean_used"]), float(params["data.std_used"])
    except (KeyError, ValueError):
        raise FerSweepError(
            f"run {run.info.run_id} has no usable data.mean_used / "
            "data.std_used params, so its input normalisation is unknown; "
            "use a run logged by `python -m fer_sweep`."
        ) from None


def load_model(run: Any, uri: str, device: torch.device) -> torch.nn.Module:
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    store.use_store(uri)
    try:
        model = mlflow.pytorch.load_model(
            f"runs:/{run.info.run_id}/{MODEL_PATH}", map_location="cpu"
        )
    except MlflowException as err:
        raise FerSweepError(f"{_no_model(run, uri)} MLflow said: {err.message}") from None
    return model.to(device).float().eval()


def run_precision(run: Any, device: torch.device) -> str:
    """The precision the run trained in, where this device can run it; fp32 otherwise (and
    for runs logged before trainer.precision existed)."""
    try:
        return resolve_precision(run.data.params.get("trainer.precision", "fp32"), device)
    except ConfigError:
        return "fp32"


@torch.inference_mode()
def predict_probs(
    model: torch.nn.Module,
    x: np.ndarray,
    mean: float,
    std: float,
    device: torch.device,
    batch_size: int,
    precision: str = "fp32",
) -> np.ndarray:
    """Softmax probabilities (N, 7) for uint8 (N, 48, 48) images via the training transform."""
    tfm = make_transform(None, mean, std)
    xt = torch.from_numpy(x)
    out = []
    for i in range(0, len(xt), batch_size):
        xb = tfm(xt[i : i + batch_size].to(device), train=False)
        with autocast(device, precision):
            logits = model(xb)
        out.append(logits.float().softmax(1).cpu())
    return torch.cat(out).numpy() if out else np.empty((0, len(CLASSES)), dtype=np.float32)


# ----------------------------------------------------------------------------- output


def write_table(preds: Sequence[Prediction], out: TextIO) -> None:
    """Aligned columns for people; probabilities to 4 decimals."""
    header = ["image", "emotion", *CLASSES]
    rows = [[p.path, p.label, *(f"{v:.4f}" for v in p.probs)] for p in preds]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        left = [r[i].ljust(widths[i]) for i in range(2)]
        right = [r[i].rjust(widths[i]) for i in range(2, len(r))]
        out.write("  ".join(left + right).rstrip() + "\n")


def write_csv(preds: Sequence[Prediction], out: TextIO) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["image", "emotion", *CLASSES])
    for p in preds:
        w.writerow([p.path, p.label, *(f"{v:.8f}" for v in p.probs)])


def _probs(p: Prediction) -> dict[str, float]:
    return dict(zip(CLASSES, p.probs, strict=True))


def write_json(
    preds: Sequence[Prediction], out: TextIO, run_id: str, unreadable: Sequence[tuple[str, str]]
) -> None:
    doc = {
        "run_id": run_id,
        "classes": list(CLASSES),
        "predictions": [
            {
                "image": p.path,
                "emotion": p.label,
                "probabilities": _probs(p),
            }
            for p in preds
        ],
        "unreadable": [{"image": n, "error": why} for n, why in unreadable],
    }
    json.dump(doc, out, indent=2)
    out.write("\n")


# ----------------------------------------------------------------------------- entry point


def run(args: argparse.Namespace, out: TextIO) -> int:
    files, notes = find_images(args.paths)
    for note in notes:
        print(f"fer_sweep: note: {note}", file=sys.stderr)
    if not files:
        print("fer_sweep: error: no image files to predict.", file=sys.stderr)
        return 1
    if args.annotate is not None and not args.faces:
        raise FerSweepError("--annotate draws the faces that --faces finds: add --faces.")
    if not 0 <= args.margin <= 2:
        raise FerSweepError(f"--margin {args.margin}: a fraction of the face's width, 0..2.")
    # where --annotate draws: a mistake here is found before the model loads
    drawings = annotated_names(files, args.annotate) if args.annotate is not None else {}
    detector = faces.cascade() if args.faces else None  # a missing OpenCV: before the model
    predict, model_id = _predictor(args)
    if detector is not None:
        return photos(args, files, detector, predict, model_id, out, drawings)

    names, x, bad = read_images(files)
    for name, why in bad:
        print(f"fer_sweep: cannot read {name}: {why}", file=sys.stderr)
    probs = predict(x)
    preds = [Prediction(n, [float(v) for v in row]) for n, row in zip(names, probs, strict=True)]
    if args.format == "json":
        write_json(preds, out, model_id, bad)
    elif args.format == "jsonl":  # one object per image, the CSV's columns
        write_records(
            [{"image": p.path, "emotion": p.label} | _probs(p) for p in preds], out, "jsonl"
        )
    elif preds:
        (write_table if args.format == "table" else write_csv)(preds, out)
    if bad:
        print(
            f"fer_sweep: predicted {len(preds)} image(s); {len(bad)} unreadable file(s) skipped.",
            file=sys.stderr,
        )
    if not preds:
        print("fer_sweep: error: none of the files could be read as an image.", file=sys.stderr)
        return 1
    return 0


def _predictor(args: argparse.Namespace) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(uint8 (N,48,48) -> probabilities (N,7), the model's run id): the ONNX file with
    onnxruntime alone, or the run's logged PyTorch model; for an ensemble's run (made by
    fer_sweep.ensemble), the mean of its members' probabilities."""
    if args.onnx:
        from fer_sweep.tools.onnx_model import onnx_probs, open_onnx

        session, meta = open_onnx(args.onnx)
        model_id = meta.get("run_id", str(args.onnx))

        def predict(x: np.ndarray) -> np.ndarray:
            return onnx_probs(session, x, args.batch_size)

        return predict, model_id
    device = pick_device(args.device)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Updating database tables" etc.
    client = store.open_existing(args.tracking_uri)
    run_ = resolve_run(client, args.run_id, args.experiment, args.tracking_uri)
    members = members_of(client, run_, args.experiment, args.tracking_uri)
    models = [
        (load_model(m, args.tracking_uri, device), *normalization(m), run_precision(m, device))
        for m in members
    ]

    def predict(x: np.ndarray) -> np.ndarray:
        """The members' mean probability, as fer_sweep.ensemble scores an ensemble."""
        probs = [
            predict_probs(model, x, mean, std, device, args.batch_size, precision)
            for model, mean, std, precision in models
        ]
        return np.mean(probs, axis=0)

    return predict, run_.info.run_id


def annotated_names(files: Sequence[Path], folder: Path) -> dict[Path, Path]:
    """Where --annotate draws each photo: FOLDER/<name>.jpg, -2, -3, ... where two photos share
    a name (a/x.jpg, b/x.png); never onto a photo given."""
    given = {f.resolve() for f in files}
    taken: set[Path] = set()
    out = {}
    for f in files:
        target, n = folder / f"{f.stem}.jpg", 1
        while target in taken:
            n += 1
            target = folder / f"{f.stem}-{n}.jpg"
        if target.resolve() in given:
            raise FerSweepError(
                f"--annotate {folder}: its drawing of {f} would overwrite the photo "
                f"{target}; give a folder of its own."
            )
        taken.add(target)
        out[f] = target
    return out


def photos(
    args: argparse.Namespace,
    files: Sequence[Path],
    detector: Any,
    predict: Callable[[np.ndarray], np.ndarray],
    model_id: str,
    out: TextIO,
    drawings: dict[Path, Path],
) -> int:
    """--faces: every face of every photo, one record each; a photo that cannot be read or has
    no face is named on stderr and the others go on. Exit 0 when a face was classified, else 1."""
    records: list[dict[str, Any]] = []
    unreadable = no_face = 0
    for path in files:
        try:
            photo, scale = faces.open_photo(path)
        except (OSError, ValueError) as err:
            print(f"fer_sweep: cannot read {path}: {err}", file=sys.stderr)
            unreadable += 1
            continue
        found = faces.find_faces(photo, scale, args.margin, detector)
        if not found:
            print(f"fer_sweep: no face found in {path}", file=sys.stderr)
            no_face += 1
            continue
        probs = predict(np.stack([f.pixels for f in found]))
        labels = [CLASSES[int(np.argmax(p))] for p in probs]
        for face, p, label in zip(found, probs, labels, strict=True):
            x, y, w, h = face.box
            records.append(
                {"file": str(path), "face": face.index, "x": x, "y": y, "width": w, "height": h}
                | {"emotion": label}
                | {c: float(v) for c, v in zip(CLASSES, p, strict=True)}
            )
        if args.annotate is not None:
            args.annotate.mkdir(parents=True, exist_ok=True)
            drawn = faces.annotate(photo, scale, found, labels)
            drawn.save(drawings[path], quality=90)
    write_records(records, out, args.format)
    print(
        f"fer_sweep: {len(records)} face(s) in {len(files) - unreadable - no_face} photo(s) "
        f"(model {model_id}); {no_face} without a face, {unreadable} unreadable.",
        file=sys.stderr,
    )
    return 0 if records else 1


def write_records(records: Sequence[dict[str, Any]], out: TextIO, fmt: str) -> None:
    """Face records as JSON lines, one JSON list, CSV or a table (probabilities to 4 places)."""
    if fmt == "jsonl":
        out.writelines(json.dumps(r) + "\n" for r in records)
    elif fmt == "json":
        json.dump(list(records), out, indent=2)
        out.write("\n")
    elif records:
        w = csv.DictWriter(
            out, fieldnames=list(records[0]), delimiter="," if fmt == "csv" else "\t"
        )
        w.writeheader()
        for r in records:
            w.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()})


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, predict, print; errors a user can fix are one line on stderr and exit 2."""
    args = build_parser().parse_args(argv)  # exits 2 on bad arguments
    buf = io.StringIO()  # print nothing to stdout unless the whole batch succeeded
    code = user_errors(lambda: run(args, buf))
    if code == 2:
        return code
    try:
        sys.stdout.write(buf.getvalue())
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


if __name__ == "__main__":
    sys.exit(main())
