"""fer_sweep's synthetic faces: a small, deterministic, learnable 7-class stand-in for FER2013
in Kaggle's folder layout, so that every command runs end to end on a machine without the data
(``data=synthetic``). Runs on it are named SYNTHETIC-… and tagged synthetic=true: never report
their numbers."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fer_sweep.core.dataset import CLASSES, IMAGE_SIZE
from fer_sweep.errors import DataError

SYNTHETIC_DIRNAME = "synthetic-v1"  # bump when make_synthetic's output changes


def ensure_synthetic(cache_dir: Path) -> Path:
    """Generate the synthetic set once; built in a temp dir and renamed, so parallel sweep
    jobs never see a half-written one."""
    root = cache_dir / SYNTHETIC_DIRNAME
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{SYNTHETIC_DIRNAME}."))
    make_synthetic(tmp)
    try:
        os.rename(tmp, root)
    except OSError:  # another process won the race (or a stale folder): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "train").is_dir():
            raise DataError(f"{root} exists but is not a synthetic dataset; delete it.") from None
    return root


# Per class: brow tilt (+ = inner ends lowered, a frown), brow lift, eye height and width,
# mouth curve (+ = corners up), mouth opening height and width (0 = closed line).
_FACE_PARAMS: dict[str, dict[str, float]] = {
    "angry": {
        "tilt": 5.0,
        "lift": 0.0,
        "eye_h": 2.0,
        "eye_w": 4.0,
        "curve": -2.0,
        "open_h": 0.0,
        "open_w": 0.0,
    },
    "disgust": {
        "tilt": 3.0,
        "lift": 0.0,
        "eye_h": 2.0,
        "eye_w": 3.5,
        "curve": 0.0,
        "open_h": 0.0,
        "open_w": 0.0,
    },
    "fear": {
        "tilt": -4.0,
        "lift": 4.0,
        "eye_h": 5.0,
        "eye_w": 5.0,
        "curve": -1.0,
        "open_h": 4.0,
        "open_w": 14.0,
    },
    "happy": {
        "tilt": 0.0,
        "lift": 1.0,
        "eye_h": 3.0,
        "eye_w": 4.0,
        "curve": 7.0,
        "open_h": 0.0,
        "open_w": 0.0,
    },
    "sad": {
        "tilt": -4.0,
        "lift": 1.0,
        "eye_h": 3.0,
        "eye_w": 4.0,
        "curve": -6.0,
        "open_h": 0.0,
        "open_w": 0.0,
    },
    "surprise": {
        "tilt": 0.0,
        "lift": 6.0,
        "eye_h": 6.0,
        "eye_w": 5.5,
        "curve": 0.0,
        "open_h": 11.0,
        "open_w": 9.0,
    },
    "neutral": {
        "tilt": 0.0,
        "lift": 0.0,
        "eye_h": 3.0,
        "eye_w": 4.0,
        "curve": 0.0,
        "open_h": 0.0,
        "open_w": 0.0,
    },
}


def _draw_face(cls: str, rng: np.random.Generator) -> np.ndarray:
    """One 48x48 'face', drawn at 2x and downsampled (anti-aliased) with random jitter."""
    p = _FACE_PARAMS[cls]
    u = rng.uniform
    s = 2.0 * u(0.85, 1.1)  # 2x canvas times face scale
    big = 2 * IMAGE_SIZE
    bg, skin, ink = u(10, 90), u(120, 210), u(0, 60)
    img = Image.new("L", (big, big), int(bg))
    d = ImageDraw.Draw(img)
    cx, cy = big / 2 + u(-4, 4), big / 2 + u(-4, 4)
    d.ellipse([cx - 17 * s, cy - 21 * s, cx + 17 * s, cy + 21 * s], fill=int(skin))

    def j(strength: float) -> float:  # per-feature strength jitter
        return strength * u(0.8, 1.2)

    w = max(1, round(1.6 * s))
    for side in (-1, 1):
        ex, ey = cx + side * 7.5 * s, cy - 5 * s
        eh, ew = j(p["eye_h"]) * s / 2, j(p["eye_w"]) * s / 2
        d.ellipse([ex - ew, ey - eh, ex + ew, ey + eh], fill=int(ink))
        tilt = j(p["tilt"]) * s / 2
        if cls == "disgust" and side == 1:  # asymmetric: one brow down, one flat
            tilt = 0.0
        by = cy - 11 * s - j(p["lift"]) * s / 2
        inner, outer = (cx + side * 3 * s, by + tilt), (cx + side * 12 * s, by - tilt)
        d.line([inner, outer], fill=int(ink), width=w)
    my, mw = cy + 10 * s, 7 * s
    if p["open_h"] > 0:
        oh, ow = j(p["open_h"]) * s / 2, j(p["open_w"]) * s / 2
        d.ellipse([cx - ow, my - oh, cx + ow, my + oh], fill=int(ink))
    else:
        curve = j(p["curve"]) * s / 2
        xs = np.linspace(-1.0, 1.0, 15)
        if cls == "disgust":  # one-sided sneer
            ys = my - 3 * s * np.clip(xs, 0, None) ** 2
        else:
            ys = my - curve * (xs**2 - 0.5)
        d.line(list(zip((cx + mw * xs).tolist(), ys.tolist(), strict=True)), fill=int(ink), width=w)
    if cls == "disgust":  # wrinkled nose
        d.line([(cx - 3 * s, cy + 4 * s), (cx + 3 * s, cy + 4 * s)], fill=int(ink), width=w)
    img = img.rotate(u(-8, 8), resample=Image.Resampling.BILINEAR, fillcolor=int(bg))
    small = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    noisy = small.astype(np.float64) + rng.normal(0.0, u(2, 10), small.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def make_synthetic(
    root: str | os.PathLike,
    n_train_per_class: int = 60,
    n_test_per_class: int = 20,
    seed: int = 0,
) -> Path:
    """Write a small, deterministic, learnable 7-class stand-in for FER2013 in the same folder
    layout (PNG, lossless so the bytes are reproducible), so machines without FER2013 can run
    everything. Test images alternate PublicTest_/PrivateTest_ names like the real split."""
    root = Path(root)
    for c, cls in enumerate(CLASSES):
        for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, c, 0 if split == "train" else 1, i])
                prefix = "Training" if split == "train" else ("PublicTest", "PrivateTest")[i % 2]
                Image.fromarray(_draw_face(cls, rng)).save(
                    folder / f"{prefix}_{i:05d}.png", format="PNG"
                )
    return root
