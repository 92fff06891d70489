"""Is the face path framed the way FER2013 frames faces? (docs/faces.md)

FER2013 faces (48x48) are upscaled (96-288 px), pasted at random places into real photos
without faces (scikit-learn's sample photos, a public-domain pair that ships in its wheel),
and sent through the whole face path of ``python -m fer_sweep.predict --faces``: OpenCV's
detector, the crop with a margin, ``to_model_input``, the model. A pasted face counts as
detected when a box overlaps it by IoU >= 0.3. Its prediction through the face path is compared
with the same model's prediction on the original 48x48 image (the direct path).

The margin is chosen on the validation split (the margin with the best face-path accuracy),
then both paths are scored on the test split with that margin.

    python scripts/framing.py --run-id RUN --tracking-uri sqlite:///mlflow.db [--n 1500]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fer_sweep.sweep import store  # noqa: E402
from fer_sweep.tools import faces  # noqa: E402
from fer_sweep.tools.export import run_dataset  # noqa: E402
from fer_sweep.tools.predict import load_model, normalization, predict_probs, resolve_run  # noqa: E402

MARGINS = (0.0, 0.1, 0.2, 0.3, 0.4)
W, H = 560, 400  # the scenes: crops of the 640x427 sample photos


def backgrounds() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = w * h
    return inter / (aw * ah + bw * bh - inter)


def scene(face: np.ndarray, rng: np.random.Generator, bgs: list[Image.Image]):  # noqa: ANN201
    """A background crop (W x H) with the face pasted; (photo, pasted box)."""
    bg = bgs[rng.integers(len(bgs))]
    x0, y0 = rng.integers(0, bg.width - W + 1), rng.integers(0, bg.height - H + 1)
    photo = bg.crop((x0, y0, x0 + W, y0 + H)).convert("RGB")
    side = int(rng.integers(96, 289))
    px, py = int(rng.integers(0, W - side)), int(rng.integers(0, H - side))
    photo.paste(Image.fromarray(face).resize((side, side), Image.Resampling.BICUBIC), (px, py))
    return photo, (px, py, side, side)


def through_faces(x: np.ndarray, seed: int) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """(detected mask, {margin: 48x48 crops of the detected faces}) for images ``x``."""
    rng, bgs, detector = np.random.default_rng(seed), backgrounds(), faces.cascade()
    found = np.zeros(len(x), dtype=bool)
    crops: dict[float, list[np.ndarray]] = {m: [] for m in MARGINS}
    for i, face in enumerate(x):
        photo, box = scene(face, rng, bgs)
        gray = photo.convert("L")
        boxes = faces.detect(np.asarray(gray), detector)
        best = max(boxes, key=lambda b: iou(b, box), default=None)
        if best is None or iou(best, box) < 0.3:
            continue
        found[i] = True
        for m in MARGINS:
            crops[m].append(faces.frame(gray, best, m))
    return found, {
        m: np.stack(c) if c else np.empty((0, 48, 48), np.uint8) for m, c in crops.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-id", required=True)
    p.add_argument("--tracking-uri", default=store.default_uri())
    p.add_argument("--experiment", default=store.default_experiment())
    p.add_argument("--n", type=int, default=1500, help="faces per split")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    client = store.open_existing(args.tracking_uri)
    run = resolve_run(client, args.run_id, args.experiment, args.tracking_uri)
    mean, std = normalization(run)
    model = load_model(run, args.tracking_uri, torch.device("cpu"))
    cpu = torch.device("cpu")

    def classes(x: np.ndarray) -> np.ndarray:
        return predict_probs(model, x, mean, std, cpu, 256).argmax(1)

    data = run_dataset(client, run)
    out: dict[str, object] = {"run_id": run.info.run_id, "n": args.n}
    rng = np.random.default_rng(0)
    val_idx = rng.choice(len(data.val), min(args.n, len(data.val)), replace=False)
    xv, yv = data.val.x.numpy()[val_idx], data.val.y.numpy()[val_idx]
    found, crops = through_faces(xv, seed=1)
    by_margin = {m: float((classes(c) == yv[found]).mean()) for m, c in crops.items()}
    margin = max(by_margin, key=by_margin.get)
    out["validation"] = {
        "detected": float(found.mean()),
        "direct_acc_detected": float((classes(xv[found]) == yv[found]).mean()),
        "face_path_acc_by_margin": by_margin,
        "chosen_margin": margin,
    }
    print(json.dumps(out["validation"]), flush=True)
    test_idx = rng.choice(len(data.test), min(args.n, len(data.test)), replace=False)
    xt, yt = data.test.x.numpy()[test_idx], data.test.y.numpy()[test_idx]
    found, crops = through_faces(xt, seed=2)
    out["test"] = {
        "detected": float(found.mean()),
        "direct_acc_all": float((classes(xt) == yt).mean()),
        "direct_acc_detected": float((classes(xt[found]) == yt[found]).mean()),
        "face_path_acc": float((classes(crops[margin]) == yt[found]).mean()),
        "margin": margin,
    }
    print(json.dumps(out["test"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
