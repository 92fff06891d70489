"""Faces in ordinary photos, framed the way FER2013 frames them.

A photo (JPEG/PNG/... of any size, colour or grey) is opened with its EXIF orientation applied,
decoded at a reduced scale when it is large (a JPEG is decoded straight to at most
``DETECT_SIDE`` pixels a side, so a 50-megapixel photo never sits in memory whole), searched
for frontal faces with OpenCV's Haar cascade (its XML ships inside the opencv wheel: nothing is
downloaded), and each face is cut out with ``margin`` of its width added on every side and
turned into the model's 48x48 grey input by ``fer_sweep.core.sources.to_model_input``, the last
step of training's own decoder. Boxes are given in the photo's own pixels (after EXIF
rotation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fer_sweep.core.sources import to_model_input
from fer_sweep.errors import FerSweepError

DETECT_SIDE = 1600  # photos are searched at most this many pixels a side
MARGIN = 0.0  # added on each side, as a fraction of the box width: measured best (docs/faces.md)
CASCADE = "haarcascade_frontalface_default.xml"


@dataclass
class Face:
    index: int
    box: tuple[int, int, int, int]  # x, y, width, height in the photo's pixels
    pixels: np.ndarray  # uint8 (48, 48): what the model sees


def cascade() -> Any:
    """OpenCV's frontal-face Haar cascade, from the installed wheel."""
    before = os.environ.get("LD_LIBRARY_PATH")
    try:
        import cv2
    except ImportError:
        raise FerSweepError(
            "finding faces needs OpenCV: pip install -e '.[serve]' (opencv-python-headless 4.x)."
        ) from None
    finally:  # cv2's import sets it for the process (and its children): put it back
        if before is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = before
    path = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / CASCADE
    if not path.is_file():  # opencv-python-headless 5.x ships no cascades
        raise FerSweepError(
            f"this OpenCV ({cv2.__version__}) has no {CASCADE}: install opencv-python-headless "
            "4.x (pip install -e '.[serve]'), whose wheel ships the Haar cascades."
        )
    return cv2.CascadeClassifier(str(path))


def open_photo(path: Path | IO[bytes]) -> tuple[Image.Image, float]:
    """(the photo upright, at most DETECT_SIDE a side, as RGB; photo pixels per image pixel).
    Raises OSError/ValueError for what is not a readable image (the caller names the file)."""
    try:
        with Image.open(path) as im:
            turn = _UPRIGHT.get(im.getexif().get(_ORIENTATION, 1))  # read from the header only
            stored_width, stored_height = im.size  # the full size, before a reduced decode
            im.draft("RGB", (DETECT_SIDE, DETECT_SIDE))  # JPEG: decode reduced (powers of two)
            im = im.convert("RGB")  # decodes: a truncated file fails here
    except (SyntaxError, Image.DecompressionBombError) as err:  # a broken chunk, a bomb
        raise OSError(str(err)) from None
    upright_width = stored_height if turn in _SWAPS else stored_width
    if turn is not None:
        im = im.transpose(turn)
    im.thumbnail((DETECT_SIDE, DETECT_SIDE), Image.Resampling.BILINEAR)
    return im, upright_width / im.size[0]


_ORIENTATION = 0x0112  # EXIF: how the camera held the picture
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS = {  # the turns that swap width and height
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
    Image.Transpose.ROTATE_90,
}


def detect(gray: np.ndarray, detector: Any) -> list[tuple[int, int, int, int]]:
    """Frontal faces (x, y, w, h), left to right; faces under 24 px or 1/40 of the short side
    are left out (noise at that size)."""
    side = max(24, min(gray.shape) // 40)
    found = detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    return sorted((tuple(int(v) for v in b) for b in found), key=lambda b: (b[0], b[1]))


def frame(gray: Image.Image, box: tuple[int, int, int, int], margin: float) -> np.ndarray:
    """The 48x48 model input of one face: the box grown by ``margin`` of its width on every
    side (squared on its centre; beyond the photo's edge filled black), as training decodes."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    crop = gray.crop(
        (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
    )
    return to_model_input(crop)


def find_faces(photo: Image.Image, scale: float, margin: float, detector: Any) -> list[Face]:
    gray = photo.convert("L")
    boxes = detect(np.asarray(gray), detector)
    return [
        Face(i, tuple(round(v * scale) for v in b), frame(gray, b, margin))  # type: ignore[arg-type]
        for i, b in enumerate(boxes)
    ]


def annotate(photo: Image.Image, scale: float, faces: list[Face], labels: list[str]) -> Image.Image:
    """The photo with each face's box and label drawn on it (at the searched size)."""
    out = photo.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 200))
    font = ImageFont.load_default(size=max(12, min(out.size) // 30))
    for face, label in zip(faces, labels, strict=True):
        x, y, w, h = (round(v / scale) for v in face.box)
        draw.rectangle((x, y, x + w, y + h), outline=(255, 215, 0), width=width)
        text = f"{face.index}: {label}"
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        ty = max(0, y - (bottom - top) - 2 * width)  # above the box, or inside at the top
        draw.rectangle((left, ty, right + 2 * width, ty + bottom - top + 2 * width), fill=(0, 0, 0))
        draw.text((x + width, ty), text, fill=(255, 215, 0), font=font)
    return out
