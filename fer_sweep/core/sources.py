"""FER2013's two on-disk forms (image folders, the challenge CSV) -> uint8 arrays, with a checked
cache.

Decoding 35,887 JPEGs takes seconds, so decoded arrays are cached in ``cache_dir`` (never in
the data root, which may be read-only). The cache file name holds a key derived from the
file listing (paths, sizes, mtimes), so an edited dataset gets a new cache instead of stale
arrays; the content is checksummed because a half-written or damaged cache must never be
trusted.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from fer_sweep.core.config import DataConfig
from fer_sweep.core.dataset import CLASSES, IMAGE_EXTENSIONS, IMAGE_SIZE, Split
from fer_sweep.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: the test split keeps its images' names (meta test_ids)
CSV_NAMES = ("fer2013.csv", "icml_face_data.csv")
_USAGE_CODES = {"Training": None, "PublicTest": 0, "PrivateTest": 1}
_NPIX = IMAGE_SIZE * IMAGE_SIZE
_CSV_CHUNK_ROWS = 1024  # ~10 MB of text per numpy parse: bounded memory, still fast


def default_cache_dir() -> Path:
    """$FER_SWEEP_CACHE if set, else ~/.cache/fer_sweep (outside any read-only data root)."""
    env = os.environ.get("FER_SWEEP_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fer_sweep"


# ----------------------------------------------------------------------------- source lookup


def not_found(problem: str) -> DataError:
    """One message that says where we looked, what we expected and how to get the data."""
    return DataError(
        f"FER2013 not found: {problem}. Expected either the image folders "
        f"train/<class>/ and test/<class>/ with class folders {', '.join(CLASSES)} "
        '(Kaggle dataset "msambare/fer2013"), or the challenge CSV fer2013.csv '
        "(or icml_face_data.csv). Download one of them, then set data.root=<that folder> or "
        "the FER2013_ROOT environment variable; or run with data=synthetic to try the tool "
        "without FER2013."
    )


def _resolve_format(root: Path, fmt: str) -> tuple[str, Path]:
    """Pick the layout actually present; the returned path is the root or the CSV file."""
    if fmt not in ("auto", "folder", "csv"):
        raise ConfigError(f"data.format={fmt!r} is not one of 'auto', 'folder', 'csv'.")
    if not root.exists():
        raise not_found(f"{root} does not exist")
    if not root.is_dir():
        raise not_found(f"{root} is not a folder")
    has_folders = (root / "train").is_dir() and (root / "test").is_dir()
    csv = next((root / n for n in CSV_NAMES if (root / n).is_file()), None)
    if fmt in ("auto", "folder") and has_folders:
        return "folder", root
    if fmt in ("auto", "csv") and csv is not None:
        return "csv", csv
    present = sorted(p.name for p in root.iterdir())[:8]
    wanted = {
        "auto": "neither layout",
        "folder": "no train/ and test/ folders",
        "csv": f"no {' or '.join(CSV_NAMES)}",
    }[fmt]
    raise not_found(f"{wanted} in {root}, which contains {present or 'nothing'}")


def check_source(cfg: DataConfig) -> None:
    """The data root exists and holds one of the layouts: checked once per sweep, before its
    parent run opens, so a missing dataset is one message instead of one per job."""
    if cfg.synthetic:
        return
    if not cfg.root:
        raise not_found("data.root is empty (and FER2013_ROOT is unset)")
    _resolve_format(Path(cfg.root).expanduser(), cfg.format)


# ----------------------------------------------------------------------------- cache


def _cache_path(cache_dir: Path, fmt: str, key: str) -> Path:
    return cache_dir / f"fer2013-{fmt}-v{CACHE_VERSION}-{key[:24]}.pt"


def _checksum(arrays: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> int:
    crc = zlib.crc32(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        crc = zlib.crc32(arrays[name].contiguous().numpy(), crc)
    return crc


_ARRAY_SPECS = {  # name -> (dtype, ndim)
    "train_x": (torch.uint8, 3),
    "train_y": (torch.int64, 1),
    "test_x": (torch.uint8, 3),
    "test_y": (torch.int64, 1),
    "test_usage": (torch.int8, 1),
}


def _read_cache(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Arrays and meta from a verified cache file; None (after a warning) if it is unusable."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("version") != CACHE_VERSION:
            raise ValueError("written by another cache version")
        if obj.get("key") != key:
            raise ValueError("it belongs to a different dataset listing")
        arrays, meta = obj["arrays"], obj["meta"]
        for name, (dtype, ndim) in _ARRAY_SPECS.items():
            a = arrays[name]
            if not isinstance(a, torch.Tensor) or a.dtype != dtype or a.dim() != ndim:
                raise ValueError(f"array {name} has the wrong type")
        for s in ("train", "test"):
            n = arrays[f"{s}_y"].shape[0]
            if arrays[f"{s}_x"].shape != (n, IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"{s} arrays have inconsistent shapes")
        if arrays["test_usage"].shape[0] != arrays["test_y"].shape[0]:
            raise ValueError("test usage has the wrong length")
        ids = meta.get("test_ids")
        if not isinstance(ids, list) or len(ids) != arrays["test_y"].shape[0]:
            raise ValueError("test image names are missing or have the wrong length")
        if _checksum(arrays, meta) != obj["crc"]:
            raise ValueError("checksum mismatch")
    except Exception as e:  # any damage at all means: do not trust it, rebuild
        warnings.warn(f"Ignoring cache file {path} ({e}); rebuilding it.", stacklevel=3)
        return None
    return arrays, meta


def _write_cache(path: Path, key: str, arrays: dict[str, torch.Tensor], meta: dict) -> bool:
    """Atomic write (temp file + os.replace), so readers never see a half-written cache."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        payload = {
            "version": CACHE_VERSION,
            "key": key,
            "meta": meta,
            "arrays": arrays,
            "crc": _checksum(arrays, meta),
        }
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
        return True
    except OSError as e:
        warnings.warn(
            f"Could not write the data cache {path} ({e}); continuing without it. "
            "Set data.cache_dir to a writable folder to speed up later runs.",
            stacklevel=3,
        )
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return False


# ----------------------------------------------------------------------------- folder format


@dataclass
class _Listing:
    # split -> [(class index, folder path, sorted image file names)], in class-index order
    files: dict[str, list[tuple[int, str, list[str]]]]
    ignored: list[str]
    key: str


_IMAGE_SUFFIXES = tuple(IMAGE_EXTENSIONS)


def _scan_folder(root: Path) -> _Listing:
    """List and stat every file once: the listing drives decoding and the cache key.

    This runs on every load, cache hit or not, so the per-file loop is kept minimal, and whole
    (one loop over the files, over ~60 lines on purpose)."""
    stamp: list[tuple[str, list]] = []  # per folder: sorted (name, size, mtime_ns, mode)
    ignored: list[str] = []
    files: dict[str, list[tuple[int, str, list[str]]]] = {}
    for split in ("train", "test"):
        seen: dict[int, str] = {}
        folders: list[tuple[int, str, list[str]]] = []
        with os.scandir(root / split) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = f"{split}/{entry.name}"
            if entry.name.startswith(".") or not entry.is_dir():
                ignored.append(rel)
                st = entry.stat()
                stamp.append((rel, [(entry.name, st.st_size, st.st_mtime_ns, st.st_mode)]))
                continue
            cls = entry.name.lower()
            if cls not in CLASSES:
                raise DataError(
                    f"Unknown class folder {root / split / entry.name}: FER2013 class folders "
                    f"must be named {', '.join(CLASSES)}. Rename or remove it."
                )
            c = CLASSES.index(cls)
            if c in seen:
                raise DataError(
                    f"Both {split}/{seen[c]} and {rel} map to class {cls!r}; "
                    "merge them into one folder."
                )
            seen[c] = entry.name
            rows = []
            with os.scandir(entry.path) as it2:
                for f in it2:
                    st = f.stat()
                    rows.append((f.name, st.st_size, st.st_mtime_ns, st.st_mode))
            rows.sort()
            stamp.append((rel, rows))
            # Hidden files such as macOS "._x.jpg" are not images, whatever their suffix.
            names = [
                n
                for n, _, _, mode in rows
                if n[0] != "." and n.lower().endswith(_IMAGE_SUFFIXES) and S_ISREG(mode)
            ]
            if len(names) < len(rows):
                keep = set(names)
                ignored.extend(f"{rel}/{n}" for n, _, _, _ in rows if n not in keep)
            if not names:
                raise DataError(
                    f"Class folder {root / split / entry.name} contains no images; "
                    "add its images or restore the original download."
                )
            folders.append((c, entry.path, names))
        missing = [CLASSES[c] for c in range(len(CLASSES)) if c not in seen]
        if missing:
            raise DataError(
                f"{root / split} has no class folder for {', '.join(missing)}; "
                f"all of {', '.join(CLASSES)} are needed."
            )
        files[split] = sorted(folders, key=itemgetter(0))
    key = hashlib.blake2b(repr(stamp).encode(), digest_size=16).hexdigest()
    return _Listing(files, sorted(ignored), key)


def _relative_paths(listing: _Listing, split: str) -> list[str]:
    return [
        f"{split}/{os.path.basename(d)}/{n}" for _, d, names in listing.files[split] for n in names
    ]


def image_paths(root: Path, split: str = "test") -> list[str]:
    """``split/class/name`` of every image the loader reads from an image-folder root, in its
    order: the names a run's test predictions carry, so tools can check them (report --verify)."""
    return _relative_paths(_scan_folder(root), split)


def _decode(data: bytes) -> tuple[np.ndarray, bool]:
    """Decode anything Pillow reads; returns (48x48 uint8, whether it had to be converted).

    Pillow, not torchvision: torchvision 0.29 deprecates its decoders (a warning per call)
    and importing it costs ~2 s. FER2013 JPEGs skip Image.open's format probing. Large folders
    are decoded by several processes (``decode_workers``)."""
    fp = io.BytesIO(data)
    with JpegImageFile(fp) if data[:3] == b"\xff\xd8\xff" else Image.open(fp) as im:
        if im.mode == "L" and im.size == (IMAGE_SIZE, IMAGE_SIZE):  # the common case
            return np.frombuffer(im.tobytes(), dtype=np.uint8).reshape(im.size), False
        im.draft("L", (IMAGE_SIZE, IMAGE_SIZE))  # JPEG: decode straight to gray, reduced
        return to_model_input(im), True


def to_model_input(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> the 48x48 uint8 grey array a model sees: 'L' mode, then a bilinear
    resize. Training's decoder ends here, and so does a face cropped from a photo
    (fer_sweep.tools.faces), so both reach the model through the same steps."""
    if im.mode != "L":
        im = im.convert("L")
    if im.size != (IMAGE_SIZE, IMAGE_SIZE):
        im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def decode_image(data: bytes) -> np.ndarray:
    """One image file's bytes -> the 48x48 uint8 array training sees (predict.py uses it too,
    so a face crop is prepared by the very function the training data went through)."""
    return _decode(data)[0]


PARALLEL_DECODE_MIN = 4096  # images: below this, decoding in-process beats starting workers
MAX_DECODE_WORKERS = 8  # more do not pay for 36k tiny JPEGs


def _decode_files(paths: Sequence[str]) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """(n, 48, 48) uint8 of ``paths``, indices of converted images, (index, error) of unreadable
    ones (left all zero). Raises nothing, so that it can run in a worker process."""
    x = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    converted: list[int] = []
    bad: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        try:
            with open(path, "rb") as f:
                x[i], was_converted = _decode(f.read())
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
            bad.append((i, f"{type(e).__name__}: {e}"))
            continue
        if was_converted:
            converted.append(i)
    return x, converted, bad


def decode_workers(n_images: int) -> int:
    """Processes for decoding n images: this machine's cores (its affinity mask, as SLURM sets
    it), up to MAX_DECODE_WORKERS, for large folders on Linux; else 1 (in-process).

    Processes, not threads: on 2 cores, threads decoding FER2013 were 1.6x SLOWER than one
    thread (GIL hand-offs on 2 KB images), two forked processes 1.7x faster. Linux only because
    fork is what makes workers free to start (no imports); elsewhere, decoding stays serial."""
    import multiprocessing

    if (
        n_images < PARALLEL_DECODE_MIN
        or not sys.platform.startswith("linux")
        or multiprocessing.current_process().daemon
    ):  # daemons may not have children
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_DECODE_WORKERS))


def _decode_all(
    paths: list[str], workers: int
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """``_decode_files`` over ``workers`` forked processes, in 4 chunks per worker (balance)."""
    if workers <= 1:
        return _decode_files(paths)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    n_chunks = workers * 4
    bounds = [len(paths) * k // n_chunks for k in range(n_chunks + 1)]
    chunks = [paths[a:b] for a, b in itertools.pairwise(bounds)]
    try:
        # fork: the children only run Pillow and numpy on their own chunk, nothing of torch.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
            parts = list(ex.map(_decode_files, chunks))
    except (BrokenProcessPool, OSError) as err:  # a worker killed (OOM), no processes left
        log.warning("Parallel decoding failed (%s); decoding in this process instead.", err)
        return _decode_files(paths)
    x = np.concatenate([part[0] for part in parts])
    starts = bounds[:-1]  # each chunk's offset in paths
    converted = [a + i for a, (_, conv, _) in zip(starts, parts, strict=True) for i in conv]
    bad = [(a + i, err) for a, (_, _, errs) in zip(starts, parts, strict=True) for i, err in errs]
    return x, converted, bad


def _decode_folder(listing: _Listing, skip_bad: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Decode every listed image, in worker processes where ``decode_workers`` says so."""
    arrays: dict[str, torch.Tensor] = {}
    converted: list[str] = []
    skipped: list[str] = []
    test_ids: list[str] = []
    for split, folders in listing.files.items():
        paths = [os.path.join(folder, n) for _, folder, names in folders for n in names]
        x, conv, bad = _decode_all(paths, decode_workers(len(paths)))
        if bad and not skip_bad:
            i, err = bad[0]
            raise DataError(
                f"Cannot decode image {paths[i]} ({err}). Replace or delete the file, or set "
                "data.skip_bad_images=true to skip unreadable images."
            )
        converted.extend(paths[i] for i in conv)
        skipped.extend(paths[i] for i, _ in bad)
        y = np.concatenate([np.full(len(names), c, dtype=np.int64) for c, _, names in folders])
        arrays[f"{split}_x"], arrays[f"{split}_y"] = torch.from_numpy(x), torch.from_numpy(y)
        keep = np.ones(len(paths), dtype=bool)
        keep[[i for i, _ in bad]] = False
        if split == "test":
            arrays["test_usage"] = torch.from_numpy(
                np.array(
                    [_usage_from_name(n) for _, _, names in folders for n in names], dtype=np.int8
                )
            )
            rel = _relative_paths(listing, split)
            test_ids = [r for r, k in zip(rel, keep, strict=True) if k]
        if bad:  # drop skipped images (copying only when there are any)
            for name in [k for k in arrays if k.startswith(f"{split}_")]:
                arrays[name] = arrays[name][torch.from_numpy(keep)]
    if converted:
        log.warning(
            "Converted %d images that were not 48x48 grayscale to 48x48 gray (e.g. %s).",
            len(converted),
            converted[0],
        )
    if skipped:
        warnings.warn(
            f"Skipped {len(skipped)} unreadable images (data.skip_bad_images=true), "
            f"e.g. {skipped[0]}.",
            stacklevel=3,
        )
    return arrays, {"converted": len(converted), "skipped": len(skipped), "test_ids": test_ids}


def _usage_from_name(name: str) -> int:
    low = name.lower()
    if low.startswith("publictest_"):
        return 0
    if low.startswith("privatetest_"):
        return 1
    return -1


# ----------------------------------------------------------------------------- CSV format


def _csv_key(path: Path) -> str:
    st = path.stat()
    text = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _row_error(path: Path, lineno: int, problem: str) -> DataError:
    return DataError(f"{path} line {lineno}: {problem}. Fix or delete that row.")


def _text(field: bytes) -> str:
    return repr(field.decode(errors="replace"))


def _parse_pixels_slow(path: Path, lineno: int, text: bytes) -> np.ndarray:
    """Exact per-row check, only run when the fast parse failed, to name the bad line."""
    tokens = text.split()
    if len(tokens) != _NPIX:
        raise _row_error(path, lineno, f"expected {_NPIX} pixel values, found {len(tokens)}")
    values = np.empty(_NPIX, dtype=np.uint8)
    for j, tok in enumerate(tokens):
        try:
            v = int(tok)
        except ValueError:
            raise _row_error(
                path, lineno, f"pixel {j + 1} is {_text(tok)}, not an integer 0..255"
            ) from None
        if not 0 <= v <= 255:
            raise _row_error(path, lineno, f"pixel {j + 1} is {v}, outside 0..255")
        values[j] = v
    return values


def _parse_pixel_chunk(path: Path, rows: Sequence[tuple[int, bytes]]) -> np.ndarray:
    """Parse rows with numpy's C parser (it checks counts and 0..255 itself); only if that
    fails, re-check row by row to report the exact line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # empty input warns; the shape check catches it
            out = np.loadtxt(
                io.BytesIO(b"\n".join(t for _, t in rows)),
                dtype=np.uint8,
                delimiter=" ",
                comments=None,
                ndmin=2,
            )
        if out.shape == (len(rows), _NPIX):
            return out.reshape(len(rows), IMAGE_SIZE, IMAGE_SIZE)
    except ValueError:
        pass
    out = np.stack([_parse_pixels_slow(path, n, t) for n, t in rows])
    return out.reshape(len(rows), IMAGE_SIZE, IMAGE_SIZE)


def _load_csv(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Both Kaggle CSV variants; columns are found by (stripped) header name, not position.
    Works on bytes: decoding 290 MB of text would only cost time.

    Kept whole: header lookup, chunked parse and the error for a bad row share their state."""
    labels: dict[str, list[int]] = {"train": [], "test": []}
    usages: list[int] = []
    test_ids: list[str] = []  # "<file name>:<line>" of each test row
    chunks: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    pending: dict[str, list[tuple[int, bytes]]] = {"train": [], "test": []}
    usage_codes = {k.encode(): v for k, v in _USAGE_CODES.items()}
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8-sig", errors="replace")
        header = [h.strip().strip('"').lower() for h in first.split(",")]
        try:
            ci, ui, pi = (header.index(n) for n in ("emotion", "usage", "pixels"))
        except ValueError:
            raise DataError(
                f"{path} line 1: header is {header}, expected the columns "
                "emotion, pixels, Usage (the Kaggle FER2013 CSV)."
            ) from None
        for lineno, line in enumerate(f, start=2):
            fields = [v.strip().strip(b'"') for v in line.split(b",")]
            if len(fields) != len(header):
                if not line.strip():
                    continue
                raise _row_error(
                    path,
                    lineno,
                    f"expected {len(header)} comma-separated fields, found {len(fields)}",
                )
            label = fields[ci]
            if not (label.isdigit() and int(label) < len(CLASSES)):
                raise _row_error(
                    path,
                    lineno,
                    f"emotion is {_text(label)}, expected an integer 0..{len(CLASSES) - 1}",
                )
            usage = usage_codes.get(fields[ui], -2)
            if usage == -2:
                raise _row_error(
                    path,
                    lineno,
                    f"Usage is {_text(fields[ui])}, expected one of {', '.join(_USAGE_CODES)}",
                )
            split = "train" if usage is None else "test"
            labels[split].append(int(label))
            if usage is not None:
                usages.append(usage)
            if usage is not None:
                test_ids.append(f"{path.name}:{lineno}")
            pending[split].append((lineno, fields[pi]))
            if len(pending[split]) >= _CSV_CHUNK_ROWS:
                chunks[split].append(_parse_pixel_chunk(path, pending[split]))
                pending[split] = []
    arrays: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        if pending[split]:
            chunks[split].append(_parse_pixel_chunk(path, pending[split]))
        x = (
            np.concatenate(chunks[split])
            if chunks[split]
            else np.empty((0, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        )
        arrays[f"{split}_x"] = torch.from_numpy(x)
        arrays[f"{split}_y"] = torch.tensor(labels[split], dtype=torch.int64)
    arrays["test_usage"] = torch.tensor(usages, dtype=torch.int8)
    return arrays, {"converted": 0, "skipped": 0, "test_ids": test_ids}


# ----------------------------------------------------------------------------- public loaders


def load_source(
    root: str | os.PathLike,
    fmt: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
) -> tuple[Split, Split, dict]:
    """Full train and test splits as stored in the source (test with usage), decoded once and
    cached; ``info`` says where they came from and what was converted, skipped or ignored.

    Kept whole: the cache lookup, the decode and the cache write are one decision read in order."""
    start = time.perf_counter()
    root = Path(root).expanduser().absolute()
    fmt, source = _resolve_format(root, fmt)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if fmt == "folder":
        listing = _scan_folder(root)
        if listing.ignored:
            warnings.warn(
                f"Ignored {len(listing.ignored)} non-image files or folders under "
                f"{root} (e.g. {listing.ignored[0]}).",
                stacklevel=2,
            )
        key = hashlib.blake2b(
            f"{listing.key}\0skip={bool(skip_bad_images)}".encode(), digest_size=16
        ).hexdigest()
    else:
        listing = None
        key = _csv_key(source)
    path = _cache_path(cache_dir, fmt, key)
    cached = _read_cache(path, key)
    written = False
    if cached is not None:
        arrays, meta = cached
        if meta.get("skipped"):
            log.warning(
                "Cache %s excludes %d unreadable images (data.skip_bad_images=true).",
                path,
                meta["skipped"],
            )
    else:
        if listing is not None:
            arrays, meta = _decode_folder(listing, skip_bad_images)
        else:
            arrays, meta = _load_csv(source)
        written = _write_cache(path, key, arrays, meta)
    train = Split(arrays["train_x"], arrays["train_y"])
    test = Split(arrays["test_x"], arrays["test_y"], arrays["test_usage"], tuple(meta["test_ids"]))
    info = {
        "source": fmt,
        "root": str(root),
        "synthetic": False,
        "converted": int(meta["converted"]),
        "skipped": int(meta["skipped"]),
        "ignored": len(listing.ignored) if listing is not None else 0,
        "cache_path": str(path),
        "cache_hit": cached is not None,
        "load_seconds": round(time.perf_counter() - start, 4),
    }
    log.info(
        "Loaded FER2013 %s from %s: %d train, %d test images in %.2f s (cache %s).",
        fmt,
        source,
        len(train),
        len(test),
        info["load_seconds"],
        "hit" if cached is not None else f"written to {path}" if written else "not written",
    )
    return train, test, info
