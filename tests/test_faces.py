"""Faces in ordinary photos (python -m fer_sweep.predict --faces): real portraits, found,
framed and classified, one record each; EXIF orientation, huge and broken photos, photos
without a face. The portrait is Grace Hopper's official US Navy photo (public domain), which
matplotlib ships as sample data."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image

from fer_sweep.tools import faces
from tests.conftest import run_cli, runs_with_models

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("faces")]  # one trained run, shared

PORTRAIT = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
LEFT_AT, RIGHT_AT = (0, 0), (572, 60)  # where the two portraits sit on the composite


def two_portraits(path: Path) -> Path:
    """Two real portraits side by side: the photo, and a smaller mirrored copy."""
    a = Image.open(PORTRAIT).convert("RGB")
    b = a.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((400, 469))
    canvas = Image.new("RGB", (RIGHT_AT[0] + b.width, a.height), (90, 110, 90))
    canvas.paste(a, LEFT_AT)
    canvas.paste(b, RIGHT_AT)
    canvas.save(path, quality=92)
    return path


def broken_png(path: Path) -> Path:
    """A PNG whose second image-data chunk has a broken header: Pillow opens it, then raises
    SyntaxError (not OSError) as it decodes."""
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "PNG")  # incompressible: several IDAT chunks
    data = bytearray(buf.getvalue())
    second = data.find(b"IDAT", data.find(b"IDAT") + 4)
    data[second : second + 4] = b"\x00\x01\x02\x03"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    cwd = tmp_path_factory.mktemp("faces")
    uri = runs_with_models(cwd, seeds=2)
    return cwd, ["--run-id", "best", "--tracking-uri", uri, "--faces"]


def test_an_ensemble_classifies_with_its_members_mean(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    cwd, common = trained
    uri = common[common.index("--tracking-uri") + 1]
    made = run_cli(
        ["--tracking-uri", uri, "--latest", "--top-k", "2"], cwd=cwd, module="fer_sweep.ensemble"
    )
    assert made.returncode == 0, made.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    (ens,) = [
        r
        for r in MlflowClient(uri).search_runs(["1"])
        if r.data.tags.get("fer_sweep.role") == "ensemble"
    ]
    members = ens.data.tags["fer_sweep.members"].split(",")
    photo = str(PORTRAIT)
    out = {}
    for run_id in [ens.info.run_id, *members]:
        proc = run_cli(
            ["--run-id", run_id, "--tracking-uri", uri, "--faces", photo, "--format", "jsonl"],
            cwd=cwd,
            module="fer_sweep.predict",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        (record,) = [json.loads(line) for line in proc.stdout.splitlines()]
        out[run_id] = np.array([record[c] for c in faces_classes()])
    mean = np.mean([out[m] for m in members], axis=0)
    assert np.allclose(out[ens.info.run_id], mean, atol=1e-6)


def _predict(trained: tuple[Path, list[str]], *args: str):  # noqa: ANN202
    cwd, common = trained
    return run_cli([*common, *args], cwd=cwd, module="fer_sweep.predict")


def test_two_portraits_give_two_records_and_boxes_where_the_faces_are(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    photo = two_portraits(tmp_path / "two.jpg")
    proc = _predict(trained, str(photo), "--format", "jsonl", "--annotate", str(tmp_path / "ann"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["face"] for r in records] == [0, 1] and {r["file"] for r in records} == {str(photo)}
    for r in records:
        assert r["emotion"] in faces_classes() and sum(r[c] for c in faces_classes()) == (
            pytest.approx(1, abs=1e-4)
        )
    # each box holds one portrait's face: its centre in the upper middle of that portrait
    left, right = records
    assert 180 < left["x"] + left["width"] / 2 < 330 and 130 < left["y"] + left["height"] / 2 < 300
    cx = right["x"] + right["width"] / 2 - RIGHT_AT[0]
    assert 130 < cx < 270 and 110 < right["y"] + right["height"] / 2 - RIGHT_AT[1] < 270
    # the annotated photo: the same picture with the boxes drawn along those edges
    drawn = np.asarray(Image.open(tmp_path / "ann" / "two.jpg").convert("RGB")).astype(int)
    assert drawn.shape[:2] == Image.open(photo).size[::-1]
    for r in records:
        edge = drawn[r["y"] + r["height"] // 2, r["x"] - 1 : r["x"] + 3]  # the left side
        assert ((edge[:, 0] > 200) & (edge[:, 1] > 170) & (edge[:, 2] < 90)).any(), edge


def faces_classes() -> tuple[str, ...]:
    from fer_sweep.core.dataset import CLASSES

    return CLASSES


def test_finding_faces_changes_nothing_global() -> None:
    """OpenCV's import sets LD_LIBRARY_PATH for the whole process (and every child it starts);
    the cascade's loader puts the environment back."""
    before = dict(os.environ)
    faces.cascade()
    assert dict(os.environ) == before


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    """A phone photo stored on its side, with EXIF saying so, is searched upright: the box is
    the one of the upright photo, in the upright photo's pixels."""
    upright = Image.open(PORTRAIT)
    exif = upright.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "side.jpg", exif=exif.tobytes())
    detector = faces.cascade()
    boxes = {}
    for name, path in (("upright", PORTRAIT), ("side", tmp_path / "side.jpg")):
        photo, scale = faces.open_photo(path)
        assert photo.size == upright.size
        (face,) = faces.find_faces(photo, scale, faces.MARGIN, detector)
        boxes[name] = np.array(face.box)
    assert np.abs(boxes["upright"] - boxes["side"]).max() <= 6, boxes


def test_a_50_megapixel_photo_is_searched_downscaled_and_boxed_in_full_pixels(
    tmp_path: Path,
) -> None:
    big = Image.new("RGB", (8000, 6250), (120, 120, 120))
    face = Image.open(PORTRAIT).convert("RGB").resize((2048, 2400))
    big.paste(face, (3000, 2000))
    big.save(tmp_path / "big.jpg", quality=85)
    del big
    photo, scale = faces.open_photo(tmp_path / "big.jpg")
    assert max(photo.size) <= faces.DETECT_SIDE and scale == pytest.approx(8000 / photo.size[0])
    (found,) = faces.find_faces(photo, scale, faces.MARGIN, faces.cascade())
    x, y, w, h = found.box  # in the 50-megapixel photo's pixels: inside the pasted portrait
    assert 3000 < x < x + w < 5048 and 2000 < y < y + h < 4400 and w > 500
    assert found.pixels.shape == (48, 48) and found.pixels.dtype == np.uint8


def test_no_face_and_unreadable_photos_are_named_and_the_rest_goes_on(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    Image.new("RGB", (640, 480), (30, 140, 60)).save(tmp_path / "lawn.png")
    (tmp_path / "notes.jpg").write_text("not a photo")
    data = two_portraits(tmp_path / "two.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])  # a truncated JPEG
    broken_png(tmp_path / "broken.png")
    proc = _predict(trained, str(tmp_path), "--format", "csv")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"no face found in {tmp_path / 'lawn.png'}" in proc.stderr
    assert f"cannot read {tmp_path / 'notes.jpg'}" in proc.stderr
    assert f"cannot read {tmp_path / 'cut.jpg'}" in proc.stderr
    assert f"cannot read {tmp_path / 'broken.png'}: broken PNG file" in proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [(Path(r["file"]).name, r["face"]) for r in rows] == [("two.jpg", "0"), ("two.jpg", "1")]
    # only photos without a face: nothing to write, exit 1 (documented), still one clear line
    proc = _predict(trained, str(tmp_path / "lawn.png"))
    assert proc.returncode == 1 and "no face found" in proc.stderr and proc.stdout == ""
