"""Tests for the core's data modules (sources, dataset, data) on real files in tmp_path (no mocks).

FER2013 itself is only read when FER2013_ROOT is set; everything else uses tiny datasets
written here, in both on-disk formats, so the loaders are checked against each other.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fer_sweep.core import sources
from fer_sweep.core.config import DataConfig, validate
from fer_sweep.core.data import limit_per_class, load_dataset, stratified_split
from fer_sweep.core.dataset import CLASSES, IMAGE_SIZE, Split
from fer_sweep.core.sources import default_cache_dir, load_source
from fer_sweep.core.synthetic import make_synthetic
from fer_sweep.errors import ConfigError, DataError

# Folder names as they appear on disk; "Happy" checks the case-insensitive match.
FOLDER_NAMES = {"happy": "Happy"}


def _image(rng: np.random.Generator) -> np.ndarray:
    """A smooth random 48x48 image (JPEG-friendly, unlike pure noise)."""
    small = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    return np.asarray(
        Image.fromarray(small).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    )


def _encode(arr: np.ndarray, fmt: str, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def write_tiny(root: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> Path:
    """FER-style folders with both JPEG and PNG files (n_train/n_test per class)."""
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        for split, n in (("train", n_train), ("test", n_test)):
            folder = root / split / FOLDER_NAMES.get(cls, cls)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                if split == "train":
                    name = f"Training_{i:04d}"
                else:
                    name = f"{('PublicTest', 'PrivateTest')[i % 2]}_{i:04d}"
                ext, fmt = (".jpg", "JPEG") if i % 3 else (".png", "PNG")
                (folder / (name + ext)).write_bytes(_encode(_image(rng), fmt))
    return root


def expected_from_folders(root: Path) -> dict[str, list[tuple[int, np.ndarray, int]]]:
    """(label, pixels, usage) per split in the documented order, decoded independently."""
    out = {}
    for split in ("train", "test"):
        files = sorted(
            (CLASSES.index(p.parent.name.lower()), p.name, p) for p in (root / split).glob("*/*")
        )
        out[split] = [
            (
                label,
                np.asarray(Image.open(p).convert("L")),
                -1 if split == "train" else int(name.startswith("PrivateTest_")),
            )
            for label, name, p in files
        ]
    return out


def write_csvs(expected, csv_dir: Path, icml_dir: Path) -> None:
    """The same images as both Kaggle CSV variants; rows interleave train and test."""
    rows = []
    for split in ("train", "test"):
        for k, (label, pixels, usage) in enumerate(expected[split]):
            name = "Training" if split == "train" else ("PublicTest", "PrivateTest")[usage]
            rows.append((k, label, name, " ".join(map(str, pixels.reshape(-1).tolist()))))
    rows.sort(key=lambda r: r[0])  # interleave: file order within each split is kept
    csv_dir.mkdir(parents=True)
    icml_dir.mkdir(parents=True)
    with open(csv_dir / "fer2013.csv", "w") as f:
        f.write("emotion,pixels,Usage\n")
        f.writelines(f"{lab},{pix},{use}\n" for _, lab, use, pix in rows)
    with open(icml_dir / "icml_face_data.csv", "w") as f:
        f.write("emotion, Usage, pixels\n")
        f.writelines(f"{lab},{use},{pix}\n" for _, lab, use, pix in rows)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny(tmp_path / "fer")


def _cfg(root: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(**{"root": str(root), "cache_dir": str(cache), **kw})


# ----------------------------------------------------------------------------- formats


def test_classes_follow_the_kaggle_csv_labels():
    assert CLASSES == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert IMAGE_SIZE == 48


def test_folder_and_both_csv_variants_load_identically(tiny: Path, tmp_path: Path):
    expected = expected_from_folders(tiny)
    write_csvs(expected, tmp_path / "csv", tmp_path / "icml")
    loads = {
        "folder": load_source(tiny, cache_dir=tmp_path / "c"),
        "csv": load_source(tmp_path / "csv", cache_dir=tmp_path / "c"),
        "icml": load_source(tmp_path / "icml", "csv", cache_dir=tmp_path / "c"),
    }
    for name, (train, test, info) in loads.items():
        assert info["source"] == ("folder" if name == "folder" else "csv")
        for split, got in (("train", train), ("test", test)):
            want = expected[split]
            assert got.x.dtype == torch.uint8 and got.x.shape == (len(want), 48, 48), name
            assert got.x.is_contiguous()
            assert got.y.dtype == torch.int64
            assert got.y.tolist() == [lab for lab, _, _ in want], (name, split)
            assert np.array_equal(got.x.numpy(), np.stack([p for _, p, _ in want])), name
        assert train.usage is None
        assert test.usage.dtype == torch.int8
        assert test.usage.tolist() == [u for _, _, u in expected["test"]]
        assert train.class_counts() == [6] * 7 and test.class_counts() == [4] * 7
    # The "Happy" folder is the CSV's emotion 3.
    assert loads["folder"][0].y[3 * 6].item() == CLASSES.index("happy") == 3
    # Each test image names its file (relative to the root) or its CSV line, in load order.
    _, test, _ = loads["folder"]
    for rel, x, y in zip(test.ids, test.x, test.y, strict=True):
        folder, name = rel.split("/")[1:]
        assert rel.startswith("test/") and folder.lower() == CLASSES[int(y)]
        assert np.array_equal(x.numpy(), np.asarray(Image.open(tiny / rel).convert("L")))
    csv_ids = loads["csv"][1].ids
    assert len(csv_ids) == len(test) and csv_ids[0].startswith("fer2013.csv:")
    lines = (tmp_path / "csv" / "fer2013.csv").read_text().splitlines()
    for ident, y in zip(csv_ids, loads["csv"][1].y, strict=True):
        assert lines[int(ident.split(":")[1]) - 1].split(",")[0] == str(int(y))
    # ... and keeps naming them through a subset (limit_per_class)
    sub = test.subset(torch.tensor([5, 2]))
    assert sub.ids == (test.ids[5], test.ids[2])


def test_test_usage_comes_from_file_names(tmp_path: Path):
    root = write_tiny(tmp_path / "fer", n_test=2)
    public = next((root / "test" / "angry").glob("PublicTest_*"))
    public.rename(root / "test" / "angry" / "other_1.png")
    _, test, _ = load_source(root, cache_dir=tmp_path / "c")
    assert test.usage[:2].tolist() == [1, -1]  # sorted: PrivateTest_0001, other_1
    assert (test.usage == 0).sum() == 6 and (test.usage == 1).sum() == 7


# ----------------------------------------------------------------------------- splits


def test_stratified_split_keeps_class_shares_and_is_deterministic():
    counts = [50, 7, 33, 101, 3, 12, 64]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    tr, va = stratified_split(y, 0.2, seed=0)
    assert tr.dtype == va.dtype == torch.int64
    for c, n in enumerate(counts):
        assert int((y[va] == c).sum()) == round(n * 0.2)
        assert int((y[tr] == c).sum()) == n - round(n * 0.2)
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(y)))
    tr2, va2 = stratified_split(y, 0.2, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    _, va3 = stratified_split(y, 0.2, seed=1)
    assert not torch.equal(va, va3)


def test_limit_per_class_caps_and_is_deterministic():
    y = torch.tensor([0] * 10 + [1] * 2 + [6] * 5)
    idx = limit_per_class(y, 3, seed=0)
    assert torch.bincount(y[idx], minlength=7).tolist() == [3, 2, 0, 0, 0, 0, 3]
    assert torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, limit_per_class(y, 3, seed=0))
    assert not torch.equal(idx, limit_per_class(y, 3, seed=5))


def test_load_dataset_splits_limits_every_split(tiny: Path, tmp_path: Path):
    ds = load_dataset(_cfg(tiny, tmp_path / "c", val_fraction=0.5, split_seed=3))
    assert ds.train.class_counts() == [3] * 7 and ds.val.class_counts() == [3] * 7
    assert ds.test.class_counts() == [4] * 7
    assert ds.test.usage is not None and len(ds.test.usage) == len(ds.test)
    limited = load_dataset(_cfg(tiny, tmp_path / "c", val_fraction=0.5, limit_per_class=2))
    for split in (limited.train, limited.val, limited.test):
        assert split.class_counts() == [2] * 7
    assert len(limited.test.usage) == 14
    # Train and val together still come from the source's train split only.
    train_src, _, _ = load_source(tiny, cache_dir=tmp_path / "c")
    src = {t.numpy().tobytes() for t in train_src.x}
    assert all(t.numpy().tobytes() in src for t in torch.cat([ds.train.x, ds.val.x]))
    assert limited.info["synthetic"] is False and limited.info["load_seconds"] >= 0


def test_mean_std_from_train_split_or_pinned(tiny: Path, tmp_path: Path):
    ds = load_dataset(_cfg(tiny, tmp_path / "c"))
    pixels = ds.train.x.double() / 255
    assert ds.mean == pytest.approx(pixels.mean().item(), abs=1e-9)
    assert ds.std == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-9)
    everything = torch.cat([ds.train.x, ds.val.x]).double() / 255
    assert ds.mean != pytest.approx(everything.mean().item(), abs=1e-9)  # val excluded
    pinned = load_dataset(_cfg(tiny, tmp_path / "c", mean=0.50779873, std=0.25495943))
    assert (pinned.mean, pinned.std) == (0.50779873, 0.25495943)


def test_bad_settings_are_reported(tiny: Path, tmp_path: Path):
    # The schema refuses bad values before anything is read; the data only what needs the data.
    with pytest.raises(ConfigError, match="limit_per_class"):
        load_dataset(_cfg(tiny, tmp_path / "c", limit_per_class=0))
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset(_cfg(tiny, tmp_path / "c", val_fraction=1.0))
    with pytest.raises(DataError, match="val_fraction"):  # 6 * 0.05 rounds to 0 per class
        load_dataset(_cfg(tiny, tmp_path / "c", val_fraction=0.05))
    with pytest.raises(ConfigError, match="format"):
        load_dataset(_cfg(tiny, tmp_path / "c", format="parquet"))


def test_root_from_environment_through_the_config(tiny: Path, tmp_path: Path, monkeypatch):
    from fer_sweep.sweep.compose import compose_config

    monkeypatch.setenv("FER2013_ROOT", str(tiny))
    conf = compose_config([f"data.cache_dir='{tmp_path / 'c'}'"])
    assert conf.data.root == str(tiny)
    ds = load_dataset(conf.data)
    assert ds.info["root"] == str(tiny) and len(ds.test) == 28
    with pytest.raises(DataError, match="data.root is empty"):
        load_dataset(DataConfig(root="", cache_dir=str(tmp_path / "c")))


def test_omegaconf_config_through_the_schema(tiny: Path, tmp_path: Path):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create(
        {
            "data": {
                "root": str(tiny),
                "format": "folder",
                "val_fraction": 0.5,
                "split_seed": 0,
                "limit_per_class": 1,
                "cache_dir": str(tmp_path / "c"),
                "mean": None,
                "std": None,
                "skip_bad_images": False,
                "synthetic": False,
            }
        }
    )
    ds = load_dataset(validate(cfg).data)
    assert [len(ds.train), len(ds.val), len(ds.test)] == [7, 7, 7]
    assert 0 < ds.mean < 1 and 0 < ds.std < 1


def test_default_cache_dir(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("FER_SWEEP_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("FER_SWEEP_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "fer_sweep"


def test_split_subset_and_len():
    s = Split(
        torch.arange(4 * 48 * 48, dtype=torch.int64).to(torch.uint8).reshape(4, 48, 48),
        torch.tensor([0, 6, 6, 2]),
        torch.tensor([0, 1, -1, 0], dtype=torch.int8),
    )
    sub = s.subset(torch.tensor([3, 1]))
    assert len(sub) == 2 and sub.y.tolist() == [2, 6] and sub.usage.tolist() == [0, 1]
    assert torch.equal(sub.x[0], s.x[3]) and sub.x.is_contiguous()
    assert s.class_counts() == [1, 0, 1, 0, 0, 0, 2]


# ----------------------------------------------------------------------------- cache


def test_second_load_is_a_verified_cache_hit(tiny: Path, tmp_path: Path):
    train, test, info = load_source(tiny, cache_dir=tmp_path / "c")
    assert not info["cache_hit"] and Path(info["cache_path"]).is_file()
    assert Path(info["cache_path"]).parent == tmp_path / "c"
    train2, test2, info2 = load_source(tiny, cache_dir=tmp_path / "c")
    assert info2["cache_hit"] and info2["cache_path"] == info["cache_path"]
    assert torch.equal(train.x, train2.x) and torch.equal(test.usage, test2.usage)
    assert not list(tiny.rglob("*.pt")), "cache must live outside the data root"


def test_changed_dataset_gets_a_new_cache(tiny: Path, tmp_path: Path):
    _, _, first = load_source(tiny, cache_dir=tmp_path / "c")
    victim = next((tiny / "train" / "fear").iterdir())
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, _, touched = load_source(tiny, cache_dir=tmp_path / "c")
    assert not touched["cache_hit"] and touched["cache_path"] != first["cache_path"]
    extra = tiny / "train" / "fear" / "Training_9999.png"
    extra.write_bytes(_encode(np.full((48, 48), 7, np.uint8), "PNG"))
    train, _, added = load_source(tiny, cache_dir=tmp_path / "c")
    assert not added["cache_hit"] and added["cache_path"] != touched["cache_path"]
    assert train.class_counts()[CLASSES.index("fear")] == 7


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate"])
def test_corrupt_cache_is_detected_and_rebuilt(tiny: Path, tmp_path: Path, damage: str):
    train, test, info = load_source(tiny, cache_dir=tmp_path / "c")
    path = Path(info["cache_path"])
    blob = bytearray(path.read_bytes())
    if damage == "flip_bytes":  # inside the pixel data: only the checksum can notice
        mid = len(blob) // 2
        blob[mid : mid + 16] = bytes(255 - b for b in blob[mid : mid + 16])
    else:
        blob = blob[: len(blob) // 3]
    path.write_bytes(bytes(blob))
    reason = "checksum mismatch" if damage == "flip_bytes" else ""
    with pytest.warns(UserWarning, match=f"{reason}.*rebuilding"):
        train2, test2, info2 = load_source(tiny, cache_dir=tmp_path / "c")
    assert not info2["cache_hit"]
    assert torch.equal(train.x, train2.x) and torch.equal(test.x, test2.x)
    _, _, info3 = load_source(tiny, cache_dir=tmp_path / "c")
    assert info3["cache_hit"]


# ----------------------------------------------------------------------------- errors


def test_missing_root_says_where_and_how(tmp_path: Path):
    with pytest.raises(DataError) as e:
        load_source(tmp_path / "nowhere", cache_dir=tmp_path / "c")
    msg = str(e.value)
    for part in (
        str(tmp_path / "nowhere"),
        "msambare/fer2013",
        "fer2013.csv",
        "data.root",
        "FER2013_ROOT",
        "data=synthetic",
    ):
        assert part in msg


def test_root_without_either_layout(tmp_path: Path):
    (tmp_path / "fer" / "train").mkdir(parents=True)
    (tmp_path / "fer" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="neither layout") as e:
        load_source(tmp_path / "fer", cache_dir=tmp_path / "c")
    assert str(tmp_path / "fer") in str(e.value) and "FER2013_ROOT" in str(e.value)


def test_unknown_class_folder(tiny: Path, tmp_path: Path):
    (tiny / "train" / "contempt").mkdir()
    with pytest.raises(DataError, match="contempt") as e:
        load_source(tiny, cache_dir=tmp_path / "c")
    assert "surprise" in str(e.value)  # lists the expected names


def test_empty_and_missing_class_folders(tiny: Path, tmp_path: Path):
    for f in (tiny / "test" / "sad").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"test/sad contains no images"):
        load_source(tiny, cache_dir=tmp_path / "c")
    (tiny / "test" / "sad").rmdir()
    with pytest.raises(DataError, match="no class folder for sad"):
        load_source(tiny, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_image_named_then_skipped_on_request(tiny: Path, tmp_path: Path, damage: str):
    bad = tiny / "train" / "surprise" / "Training_0001.jpg"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"not an image")
    with pytest.raises(DataError) as e:
        load_source(tiny, cache_dir=tmp_path / "c")
    assert str(bad) in str(e.value) and "data.skip_bad_images=true" in str(e.value)
    with pytest.warns(UserWarning, match="Skipped 1"):
        train, _, info = load_source(tiny, cache_dir=tmp_path / "c", skip_bad_images=True)
    assert info["skipped"] == 1
    assert train.class_counts()[CLASSES.index("surprise")] == 5
    _, _, again = load_source(tiny, cache_dir=tmp_path / "c", skip_bad_images=True)
    assert again["cache_hit"] and again["skipped"] == 1


def test_non_image_files_are_ignored_with_a_warning(tiny: Path, tmp_path: Path):
    (tiny / "train" / "angry" / "notes.txt").write_text("x")
    (tiny / "train" / ".DS_Store").write_bytes(b"\0\0")
    (tiny / "test" / "fear" / "._PublicTest_0000.jpg").write_bytes(b"AppleDouble")
    with pytest.warns(UserWarning, match="Ignored 3"):
        train, test, info = load_source(tiny, cache_dir=tmp_path / "c")
    assert info["ignored"] == 3
    assert len(train) == 42 and len(test) == 28


def test_colour_and_wrong_size_images_are_converted(tiny: Path, tmp_path: Path, caplog):
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 200  # pure red -> luma 0.299 * 200 = 60
    (tiny / "train" / "neutral" / "Training_0000.png").write_bytes(_encode(rgb, "PNG", "RGB"))
    with caplog.at_level("WARNING", logger="fer_sweep.core.sources"):
        train, _, info = load_source(tiny, cache_dir=tmp_path / "c")
    assert info["converted"] == 1 and "Converted 1" in caplog.text
    first_neutral = int(torch.nonzero(train.y == CLASSES.index("neutral"))[0])
    img = train.x[first_neutral]
    assert img.shape == (48, 48) and abs(int(img.float().mean()) - 60) <= 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parallel decoding forks")
def test_parallel_decoding_equals_serial_and_reports_the_same(
    tiny: Path, tmp_path: Path, monkeypatch, caplog
):
    """Large folders are decoded by forked workers: same arrays, same converted count, the same
    error for an unreadable image (found in a worker's chunk), the same skipping."""
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 1] = 100
    (tiny / "train" / "neutral" / "Training_0000.png").write_bytes(_encode(rgb, "PNG", "RGB"))
    paths = sorted(str(p) for p in (tiny / "train").rglob("*.*"))
    serial = sources._decode_files(paths)
    parallel = sources._decode_all(paths, workers=3)  # 12 chunks of 3-4 images
    assert np.array_equal(parallel[0], serial[0]) and parallel[1:] == serial[1:]
    assert len(serial[1]) == 1 and serial[2] == []

    reference, _, _ = load_source(tiny, cache_dir=tmp_path / "serial")
    monkeypatch.setattr(sources, "PARALLEL_DECODE_MIN", 0)  # every folder counts as large
    with caplog.at_level("WARNING", logger="fer_sweep.core.sources"):
        train, _, info = load_source(tiny, cache_dir=tmp_path / "parallel")
    assert torch.equal(train.x, reference.x) and torch.equal(train.y, reference.y)
    assert info["converted"] == 1 and "Converted 1" in caplog.text
    bad = tiny / "train" / "surprise" / "Training_0004.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="Cannot decode image .*Training_0004.jpg"):
        load_source(tiny, cache_dir=tmp_path / "parallel")
    with pytest.warns(UserWarning, match="Skipped 1"):
        train, _, info = load_source(tiny, cache_dir=tmp_path / "parallel", skip_bad_images=True)
    assert info["skipped"] == 1 and len(train) == len(reference) - 1


GOOD_ROW = "0," + " ".join(["7"] * 2304) + ",Training\n"


@pytest.mark.parametrize(
    ("row", "what"),
    [
        ("0," + " ".join(["7"] * 2303) + ",Training\n", "found 2303"),
        ("0," + " ".join(["7"] * 2303 + ["x7"]) + ",Training\n", "not an integer"),
        ("0," + " ".join(["7"] * 2303 + ["256"]) + ",Training\n", "outside 0..255"),
        ("0," + " ".join(["7"] * 2304) + ",Validation\n", "Usage is 'Validation'"),
        ("7," + " ".join(["7"] * 2304) + ",Training\n", "emotion is '7'"),
        ("0," + " ".join(["7"] * 2304) + "\n", "fields"),
    ],
)
def test_malformed_csv_rows_name_the_line(tmp_path: Path, row: str, what: str):
    lines = ["emotion,pixels,Usage\n"] + [GOOD_ROW] * 5 + [row] + [GOOD_ROW] * 2
    (tmp_path / "fer2013.csv").write_text("".join(lines))
    with pytest.raises(DataError) as e:
        load_source(tmp_path, cache_dir=tmp_path / "c")
    assert "fer2013.csv line 7" in str(e.value) and what in str(e.value)


def test_malformed_icml_csv_row_names_the_line(tmp_path: Path):
    good = "3,PublicTest," + " ".join(["7"] * 2304) + "\n"
    bad = "3,PrivateTest," + " ".join(["7"] * 2305) + "\n"
    (tmp_path / "icml_face_data.csv").write_text("emotion, Usage, pixels\n" + good + bad)
    with pytest.raises(DataError, match=r"icml_face_data.csv line 3: .*found 2305"):
        load_source(tmp_path, cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- synthetic


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.*"))}


def test_make_synthetic_is_deterministic(tmp_path: Path):
    a = _tree_bytes(make_synthetic(tmp_path / "a", n_train_per_class=3, n_test_per_class=2))
    b = _tree_bytes(make_synthetic(tmp_path / "b", n_train_per_class=3, n_test_per_class=2))
    c = _tree_bytes(make_synthetic(tmp_path / "c", 3, 2, seed=1))
    assert a == b and len(a) == 7 * 5
    assert a.keys() == c.keys() and a != c
    assert {Path(k).parent.name for k in a} == set(CLASSES)
    assert any(Path(k).name.startswith("PrivateTest_") for k in a)


def test_synthetic_loads_through_load_dataset_and_is_learnable(tmp_path: Path):
    ds = load_dataset(DataConfig(synthetic=True, root="/ignored", cache_dir=str(tmp_path)))
    assert ds.info["synthetic"] is True and ds.info["source"] == "folder"
    assert (tmp_path / "synthetic-v1" / "train" / "angry").is_dir()
    assert ds.train.class_counts() == [48] * 7 and ds.val.class_counts() == [12] * 7
    assert ds.test.class_counts() == [20] * 7
    assert set(ds.test.usage.tolist()) == {0, 1}
    # A ridge classifier on 12x12 average-pooled pixels must beat chance (1/7) by far.

    def feats(s: Split) -> torch.Tensor:
        f = torch.nn.functional.avg_pool2d(s.x.double().unsqueeze(1) / 255, 4).flatten(1)
        return torch.cat([f, torch.ones(len(s), 1, dtype=f.dtype)], 1)

    a = feats(ds.train)
    targets = torch.nn.functional.one_hot(ds.train.y, 7).double()
    w = torch.linalg.solve(a.T @ a + 0.1 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ targets)
    accuracy = (feats(ds.test) @ w).argmax(1).eq(ds.test.y).double().mean().item()
    assert accuracy > 0.5, accuracy
    again = load_dataset(DataConfig(synthetic=True, cache_dir=str(tmp_path)))
    assert again.info["cache_hit"] and torch.equal(again.test.x, ds.test.x)


# ----------------------------------------------------------------------------- real FER2013

REAL_ROOT = os.environ.get("FER2013_ROOT")
README_COUNTS = {  # class: (train, test), from the dataset README
    "angry": (3995, 958),
    "disgust": (436, 111),
    "fear": (4097, 1024),
    "happy": (7215, 1774),
    "neutral": (4965, 1233),
    "sad": (4830, 1247),
    "surprise": (3171, 831),
}


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ROOT, reason="FER2013_ROOT is not set")
def test_real_fer2013_counts(tmp_path: Path):
    train, test, info = load_source(REAL_ROOT, cache_dir=tmp_path)
    assert (len(train), len(test)) == (28709, 7178)
    assert train.class_counts() == [README_COUNTS[c][0] for c in CLASSES]
    assert test.class_counts() == [README_COUNTS[c][1] for c in CLASSES]
    assert int((test.usage == 0).sum()) == 3589 and int((test.usage == 1).sum()) == 3589
    assert info["converted"] == info["skipped"] == 0
    train2, _, info2 = load_source(REAL_ROOT, cache_dir=tmp_path)
    assert info2["cache_hit"] and torch.equal(train.x, train2.x)
