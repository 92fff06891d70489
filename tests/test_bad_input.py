"""Bad input is named before a GPU-hour is spent: every row runs the real CLI.

A sweep runs for hours on shared machines, so each mistake in the data or the settings must
stop ``python -m fer_sweep`` with a non-zero status and ONE readable message on stderr (no
traceback wall), before any MLflow run exists; recoverable oddities (non-image files, other
sizes/modes, unreadable images with data.skip_bad_images=true, a damaged cache) must be
reported and the run must succeed.

The CLI runs are independent processes, so a module-scoped pool runs them two at a time as
soon as the module starts; each test then waits only for its own run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from PIL import Image

from fer_sweep.core.sources import load_source
from tests.conftest import migrated_store, run_cli

pytestmark = pytest.mark.slow  # every test here starts the CLI or trains

CLASS_DIRS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
NPIX = 48 * 48
OURS = "fer_sweep: error:"  # the headline of every error fer_sweep itself reports
SMALL_RUN = {
    "trainer.epochs": "1",
    "trainer.progress": "false",
    "mlflow.log_model": "false",
    "mlflow.figures": "false",
}

# ----------------------------------------------------------------------------- datasets
# Each builder writes under ``cwd`` (data/ and, where it primes one, cache/) and returns the
# path to pass as data.root.


def write_folder(root: Path, n_train: int = 3, n_test: int = 3) -> Path:
    """The Kaggle folder layout: n images per class folder, 48x48 'L' PNGs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in CLASS_DIRS:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (48, 48), dtype=np.uint8)
                Image.fromarray(pixels, "L").save(folder / f"{i}.png")
    return root


def good(cwd: Path) -> Path:
    return write_folder(cwd / "data")


def missing_root(cwd: Path) -> Path:
    return cwd / "data" / "not_downloaded"


def neither_layout(cwd: Path) -> Path:
    root = cwd / "data"
    (root / "images").mkdir(parents=True)
    (root / "notes.txt").write_text("the zip was never extracted\n")
    return root


def unknown_class(cwd: Path) -> Path:
    root = good(cwd)
    (root / "train" / "happyy").mkdir()
    Image.new("L", (48, 48)).save(root / "train" / "happyy" / "0.png")
    return root


def empty_class(cwd: Path) -> Path:
    root = good(cwd)
    shutil.rmtree(root / "test" / "fear")
    (root / "test" / "fear").mkdir()
    return root


def missing_class(cwd: Path) -> Path:
    root = good(cwd)
    shutil.rmtree(root / "test" / "fear")
    return root


def too_few_for_val(cwd: Path) -> Path:
    """2 training images per class: a 0.2 hold-out rounds to 0, leaving val empty."""
    return write_folder(cwd / "data", n_train=2)


def truncated_png(cwd: Path) -> Path:
    root = write_folder(cwd / "data", n_train=4)
    bad = root / "train" / "sad" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    return root


def text_named_jpg(cwd: Path) -> Path:
    root = write_folder(cwd / "data", n_train=4)
    (root / "test" / "happy" / "2.jpg").write_text("<html>403 Forbidden</html>\n")
    return root


def both_unreadable(cwd: Path) -> Path:
    root = truncated_png(cwd)
    (root / "test" / "happy" / "9.jpg").write_text("<html>403 Forbidden</html>\n")
    return root


def odd_files(cwd: Path) -> Path:
    """Valid, but untidy: two non-image files and three images of another size or mode."""
    root = good(cwd)
    (root / "train" / "happy" / "README.txt").write_text("downloaded from kaggle\n")
    (root / "test" / "fear" / "Thumbs.db").write_bytes(b"\0" * 64)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "train" / "angry" / "big_rgb.png")
    Image.new("RGB", (48, 48), (1, 2, 3)).save(root / "test" / "sad" / "rgb.jpg")
    Image.new("LA", (30, 30), (90, 255)).save(root / "train" / "neutral" / "small_la.png")
    return root


def csv_rows(bad_line: int | None = None, bad_row: str | None = None) -> list[str]:
    """fer2013.csv lines (header first); ``bad_row`` becomes line ``bad_line`` (1-based)."""
    rows = ["emotion,pixels,Usage"]
    for usage in ("Training", "Training", "Training", "PublicTest", "PrivateTest"):
        for label in range(7):
            rows.append(f"{label},{' '.join([str(30 * label)] * NPIX)},{usage}")
    if bad_row is not None and bad_line is not None:
        rows.insert(bad_line - 1, bad_row)
    return rows


def bad_csv(line: int, row: str) -> Callable[[Path], Path]:
    def build(cwd: Path) -> Path:
        root = cwd / "data"
        root.mkdir(parents=True)
        (root / "fer2013.csv").write_text("\n".join(csv_rows(line, row)) + "\n")
        return root

    return build


GOOD_PIXELS = " ".join(["7"] * NPIX)


def cache_damaged(how: str) -> Callable[[Path], Path]:
    """A first load writes the decoded-data cache; then it is damaged the way ``how`` says."""

    def build(cwd: Path) -> Path:
        root = good(cwd)
        *_, info = load_source(root, cache_dir=cwd / "cache")
        path = Path(info["cache_path"])
        assert list((cwd / "cache").glob("fer2013-*.pt")) == [path]
        if how == "truncated":  # e.g. the disk filled up while another tool copied it
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:  # stale: another dataset's cache under this dataset's name
            other = write_folder(cwd / "other", n_train=4)
            *_, other_info = load_source(other, cache_dir=cwd / "cache")
            shutil.copyfile(other_info["cache_path"], path)
        return root

    return build


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One CLI invocation; ``expect`` strings may use {root} (the data root) and {cwd}."""

    build: Callable[[Path], Path] = good
    args: tuple[str, ...] = ()
    headline: str | None = OURS  # exactly once on stderr; None: the run must succeed
    expect: tuple[str, ...] = ()


ROOT_HINT = ("data.root=", "FER2013_ROOT", "data=synthetic")
CSV_FIX = ("{root}/fer2013.csv", "Fix or delete that row")

DATA_ERRORS: dict[str, Case] = {
    "root_missing": Case(
        missing_root, expect=("FER2013 not found", "{root} does not exist", *ROOT_HINT)
    ),
    "neither_layout": Case(
        neither_layout,
        expect=(
            "FER2013 not found",
            "neither layout in {root}",
            "notes.txt",
            "train/<class>/",
            "fer2013.csv",
            *ROOT_HINT,
        ),
    ),
    "unknown_class_folder": Case(
        unknown_class,
        expect=(
            "Unknown class folder {root}/train/happyy",
            "angry, disgust",
            "Rename or remove it",
        ),
    ),
    "empty_class_folder": Case(
        empty_class, expect=("Class folder {root}/test/fear contains no images",)
    ),
    "missing_class_folder": Case(
        missing_class, expect=("{root}/test has no class folder for fear",)
    ),
    "too_few_images_for_val": Case(
        too_few_for_val, expect=("val split has no images", "data.val_fraction")
    ),
    "truncated_image": Case(
        truncated_png,
        expect=("Cannot decode image {root}/train/sad/1.png", "data.skip_bad_images=true"),
    ),
    "text_file_named_jpg": Case(
        text_named_jpg,
        expect=("Cannot decode image {root}/test/happy/2.jpg", "data.skip_bad_images=true"),
    ),
    "csv_pixel_count": Case(
        bad_csv(9, "3,1 2 3,Training"),
        expect=(*CSV_FIX, "line 9:", "expected 2304 pixel values, found 3"),
    ),
    "csv_non_numeric": Case(
        bad_csv(30, f"2,{GOOD_PIXELS[:-1]}abc,Training"),
        expect=(*CSV_FIX, "line 30:", "pixel 2304 is 'abc'", "not an integer"),
    ),
    "csv_unknown_usage": Case(
        bad_csv(2, f"2,{GOOD_PIXELS},Validation"),
        expect=(*CSV_FIX, "line 2:", "Usage is 'Validation'", "PublicTest"),
    ),
    "csv_unknown_label": Case(
        bad_csv(17, f"7,{GOOD_PIXELS},Training"),
        expect=(*CSV_FIX, "line 17:", "emotion is '7'", "0..6"),
    ),
}

# (override, headline, expected strings): each also runs in a multirun (see below).
SETTINGS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "model_unknown": (
        "model=nope",
        "Could not find 'model/nope'",
        ("Available options in 'model'", "cnn2", "resnet"),
    ),
    "epochs_zero": ("trainer.epochs=0", OURS, ("trainer.epochs=0", "positive integer")),
    "batch_size_zero": ("trainer.batch_size=0", OURS, ("trainer.batch_size=0", "positive integer")),
    "val_fraction_zero": (
        "data.val_fraction=0",
        OURS,
        ("data.val_fraction=0", "strictly between 0 and 1"),
    ),
    "val_fraction_one": (
        "data.val_fraction=1",
        OURS,
        ("data.val_fraction=1", "strictly between 0 and 1"),
    ),
    "lr_zero": ("optimizer.lr=0", OURS, ("optimizer.lr=0", "must be > 0")),
    "device_unknown": (
        "trainer.device=tpu",
        OURS,
        ("trainer.device='tpu' is not a device", "cuda:N"),
    ),
    "limit_per_class_zero": (
        "data.limit_per_class=0",
        OURS,
        ("data.limit_per_class=0", "positive number", "null"),
    ),
    "key_misspelled": ("trainer.epoch=3", "Key 'epoch' is not in struct", ("trainer.epoch",)),
    "key_misspelled_appended": (
        "+trainer.epochz=3",
        OURS,
        ("invalid setting trainer.epochz", "'epochz' not in"),
    ),
}

SWEEP = ("-m", "model=cnn2,cnn3")
CASES: dict[str, Case] = {
    **DATA_ERRORS,
    **{
        name: Case(args=(arg,), headline=head, expect=exp)
        for name, (arg, head, exp) in SETTINGS.items()
    },
    # One job of the grid is wrong: model=nope is a sweep value here, not the base config.
    **{
        f"multirun_{name}": Case(
            args=(*SWEEP, arg) if name != "model_unknown" else ("-m", "model=cnn2,nope"),
            headline=head,
            expect=exp,
        )
        for name, (arg, head, exp) in SETTINGS.items()
    },
    "multirun_one_job_bad": Case(
        args=("-m", "trainer.epochs=1,0"), expect=("trainer.epochs=0", "positive integer")
    ),
    "device_absent": Case(
        args=("trainer.device=cuda:99",), expect=("trainer.device=cuda:99", "trainer.device=auto")
    ),
    # runs that must succeed
    "odd_files": Case(odd_files, headline=None),
    "skip_bad_images": Case(both_unreadable, ("data.skip_bad_images=true",), headline=None),
    "cache_truncated": Case(cache_damaged("truncated"), headline=None),
    "cache_stale": Case(cache_damaged("stale"), headline=None),
}

# ----------------------------------------------------------------------------- the runner


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess[str]
    cwd: Path
    root: Path
    uri: str

    def fill(self, text: str) -> str:
        return text.format(root=self.root, cwd=self.cwd)

    def runs(self) -> list[Run]:
        """Every run in this case's store (none when the store was never created)."""
        if not (self.cwd / "m.db").exists():
            return []
        client = MlflowClient(self.uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        return list(client.search_runs(ids)) if ids else []

    def only_run(self) -> Run:
        runs = self.runs()
        assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
        return runs[0]


class Runner:
    """Runs cases in a small thread pool (each thread drives one CLI subprocess)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures: dict[str, Future[Outcome]] = {}

    def submit(self, name: str) -> None:
        if name not in self.futures:
            self.futures[name] = self.pool.submit(self._run, name)

    def get(self, name: str) -> Outcome:
        self.submit(name)
        return self.futures[name].result()

    def _run(self, name: str) -> Outcome:
        case = CASES[name]
        cwd = self.base / name
        cwd.mkdir()
        root = case.build(cwd)
        uri = migrated_store(cwd / "m.db")
        common = {
            "data.root": str(root),
            "data.cache_dir": str(cwd / "cache"),
            "mlflow.tracking_uri": uri,
            **SMALL_RUN,
        }
        flags = [a for a in case.args if a.startswith("-")]
        overrides = [a for a in case.args if not a.startswith("-")]
        given = {a.split("=", 1)[0] for a in overrides}
        args = [*flags, *(f"{k}={v}" for k, v in common.items() if k not in given), *overrides]
        return Outcome(run_cli(args, cwd=cwd, timeout=600), cwd, root, uri)


@pytest.fixture(scope="module")
def runner(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runner]:
    """Starts every selected case of this module at once, so they overlap two at a time."""
    r = Runner(tmp_path_factory.mktemp("bad_input"))
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and params.get("case") in CASES:
            r.submit(params["case"])
    yield r
    r.pool.shutdown(wait=True, cancel_futures=True)


def tail(out: Outcome) -> str:
    return f"exit {out.proc.returncode}\n--- stderr\n{out.proc.stderr[-3000:]}"


def assert_named_before_any_run(out: Outcome, case: Case) -> None:
    err = out.proc.stderr
    assert out.proc.returncode != 0, tail(out)
    assert "Traceback" not in err, tail(out)
    assert case.headline is not None
    assert err.count(case.headline) == 1, tail(out)
    for text in case.expect:
        assert out.fill(text) in err, f"{out.fill(text)!r} not in\n{tail(out)}"
    runs = out.runs()
    assert runs == [], [(r.data.tags.get("fer_sweep.role"), r.info.status) for r in runs]
    assert not (out.cwd / "checkpoints").exists(), "training started"


def assert_succeeded(out: Outcome) -> Run:
    assert out.proc.returncode == 0, tail(out)
    assert "Traceback" not in out.proc.stderr, tail(out)
    assert OURS not in out.proc.stderr, tail(out)
    run = out.only_run()
    assert run.info.status == "FINISHED"
    return run


def data_json(out: Outcome, run: Run) -> dict:
    client = MlflowClient(out.uri)
    dst = out.cwd / "artifacts"
    dst.mkdir(exist_ok=True)
    return json.loads(
        Path(client.download_artifacts(run.info.run_id, "data.json", str(dst))).read_text()
    )


# ----------------------------------------------------------------------------- the rows


@pytest.mark.parametrize(
    "case",
    [
        *DATA_ERRORS,
        *SETTINGS,
        "device_absent",
    ],
)
def test_single_run_names_the_problem_before_any_run(runner: Runner, case: str) -> None:
    assert_named_before_any_run(runner.get(case), CASES[case])


def _no_job_started(out: Outcome) -> None:
    jobs = [p for p in out.cwd.glob("multirun/*/*/*") if p.is_dir() and p.name.isdigit()]
    assert jobs == [], f"jobs started: {jobs}"


@pytest.mark.parametrize(
    "case",
    [
        *(f"multirun_{name}" for name in SETTINGS if name != "model_unknown"),
        "multirun_model_unknown",
        "multirun_one_job_bad",
    ],
)
def test_multirun_names_the_problem_once_before_any_job(runner: Runner, case: str) -> None:
    out = runner.get(case)
    assert_named_before_any_run(out, CASES[case])
    _no_job_started(out)


@pytest.mark.parametrize("case", ["skip_bad_images"])
def test_skip_bad_images_skips_counts_and_succeeds(runner: Runner, case: str) -> None:
    out = runner.get(case)
    run = assert_succeeded(out)
    assert "Skipped 2 unreadable images (data.skip_bad_images=true)" in out.proc.stderr, tail(out)
    info = data_json(out, run)
    assert info["skipped"] == 2
    assert sum(info["counts"]["train"].values()) + sum(info["counts"]["val"].values()) == 7 * 4 - 1
    assert run.data.params["data.n_test"] == str(7 * 3)  # 21 good + 1 unreadable in test/


@pytest.mark.parametrize("case", ["odd_files"])
def test_non_image_files_are_ignored_with_a_warning(runner: Runner, case: str) -> None:
    out = runner.get(case)
    run = assert_succeeded(out)
    assert "Ignored 2 non-image files" in out.proc.stderr, tail(out)
    assert "Thumbs.db" in out.proc.stderr or "README.txt" in out.proc.stderr
    assert data_json(out, run)["ignored"] == 2


@pytest.mark.parametrize("case", ["odd_files"])
def test_other_sizes_and_modes_are_converted_and_counted(runner: Runner, case: str) -> None:
    out = runner.get(case)
    run = assert_succeeded(out)
    assert run.data.params["data.converted"] == "3"
    assert "Converted 3 images" in out.proc.stdout + out.proc.stderr
    # converted images are used, not dropped: 7*3 test images + test/sad/rgb.jpg
    assert run.data.params["data.n_test"] == str(7 * 3 + 1)


@pytest.mark.parametrize("case", ["cache_truncated", "cache_stale"])
def test_damaged_cache_is_detected_rebuilt_and_the_run_succeeds(runner: Runner, case: str) -> None:
    out = runner.get(case)
    run = assert_succeeded(out)
    info = data_json(out, run)
    path = Path(info["cache_path"])
    assert f"Ignoring cache file {path}" in out.proc.stderr, tail(out)
    assert "rebuilding it" in out.proc.stderr
    assert info["cache_hit"] is False
    *_, again = load_source(out.root, cache_dir=out.cwd / "cache")
    assert again["cache_hit"] and again["cache_path"] == str(path), "cache was not rebuilt"


@pytest.mark.parametrize("case", ["key_misspelled_appended"])
def test_misspelled_key_suggests_the_known_one(runner: Runner, case: str) -> None:
    out = runner.get(case)
    assert "did you mean trainer.epochs?" in out.proc.stderr, tail(out)
