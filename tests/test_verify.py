"""report --verify: an exported bundle checked from its files alone, and every kind of
tampering (or a scheduler restarted at a resume) caught and named."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fer_sweep.tools.report import verify
from tests.conftest import migrated_store, run_cli


def test_replay_follows_reduce_on_plateau_by_hand() -> None:
    # patience 1: a cut after the second epoch in a row without a better loss, then the count
    # starts again (worked out by hand from the rule, not by running torch)
    losses = [1.0, 1.1, 1.2, 0.5, 0.6, 0.7, 0.8]
    rates = verify.replay_plateau(losses, lr=0.01, factor=0.1, patience=1, min_lr=0.0)
    assert rates == pytest.approx([0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 1e-4], rel=1e-12)
    # the floor holds
    floor = verify.replay_plateau([1.0] * 8, lr=0.01, factor=0.1, patience=0, min_lr=5e-4)
    assert floor == pytest.approx([0.01, 0.01, 0.001, 5e-4, 5e-4, 5e-4, 5e-4, 5e-4], rel=1e-12)


def test_a_scheduler_restarted_at_a_resume_is_caught() -> None:
    # what the rates would be had a resume after epoch 2 rebuilt the scheduler: its count of
    # bad epochs forgotten, the cut at epoch 4 comes two epochs late
    losses = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    honest = verify.replay_plateau(losses, lr=0.01, factor=0.1, patience=1, min_lr=0.0)
    restarted = honest[:2] + verify.replay_plateau(
        losses[2:], lr=honest[2], factor=0.1, patience=1, min_lr=0.0
    )
    assert honest != restarted
    v = verify.Verdict("r")
    rows = [
        {"epoch": str(i + 1), "val_loss": repr(loss), "lr": repr(lr)}
        for i, (loss, lr) in enumerate(zip(losses, restarted, strict=True))
    ]
    config = {"scheduler": {"name": "plateau", "factor": 0.1, "patience": 1, "min_lr": 0.0}}
    verify._check_rates(v, config | {"optimizer": {"lr": 0.01}}, rows)
    assert v.failed and "epoch 4 trained with lr 0.01" in v.failed[0], v.failed


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished run on the whole (synthetic) test split, exported: (its bundle, data root)."""
    tmp = tmp_path_factory.mktemp("verify")
    uri = migrated_store(tmp / "m.db")
    # a high rate and no patience: the plateau scheduler cuts the rate within a few epochs
    args = ["data=synthetic", "trainer.epochs=6", "optimizer.lr=0.3", "scheduler.patience=0"]
    quiet = ["trainer.progress=false", "mlflow.log_model=false", "mlflow.figures=false"]
    proc = run_cli(["-m", *args, *quiet, f"mlflow.tracking_uri={uri}"], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        ["--tracking-uri", uri, "--export", str(tmp / "results")],
        cwd=tmp,
        module="fer_sweep.report",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (tmp / "results").iterdir()
    run_id = json.loads((folder / "metrics.json").read_text())["run_id"]
    data = Path(MlflowClient(uri).download_artifacts(run_id, "data.json", str(tmp)))
    return folder, Path(json.loads(data.read_text())["root"])


def _verify(folder: Path, *more: str) -> tuple[int, str, str]:
    proc = run_cli(["--verify", str(folder), *more], cwd=folder.parent, module="fer_sweep.report")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
def test_an_honest_bundle_passes_every_check(bundle: tuple[Path, Path]) -> None:
    folder, root = bundle
    code, out, err = _verify(folder.parent, "--data-root", str(root))
    assert code == 0, out + err
    (line, summary) = out.splitlines()
    assert line.startswith(f"ok    {folder.name}: epochs 1..6 once each")
    for said in ("ReduceLROnPlateau replayed", "= data.n_test", "once", f"under {root}"):
        assert said in line, line
    assert "all 140 test images of the data root" in line, line
    cuts = re.search(r"0\.3 -> [0-9.e-]+, (\d+) cuts", line)
    assert cuts and int(cuts[1]) >= 1, line  # the replay went through at least one cut
    assert summary == "1 of 1 bundles pass every check"


def _tampered(folder: Path, tmp: Path, name: str, edit) -> Path:  # noqa: ANN001
    copy = tmp / "t" / folder.name
    shutil.copytree(folder, copy)
    path = copy / name
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    edit(rows)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return copy.parent


def _flip_a_right_prediction(rows: list[dict[str, str]]) -> None:
    right = next(r for r in rows if r["true"] == r["predicted"])
    right["predicted"] = "angry" if right["true"] != "angry" else "happy"


def _move_to_another_class(rows: list[dict[str, str]]) -> None:
    r = rows[0]
    other = "happy" if r["true"] != "happy" else "sad"
    r["path"] = r["path"].replace(f"test/{r['true']}/", f"test/{other}/")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "edit", "said"),
    [
        ("predictions.csv", _flip_a_right_prediction, "the predictions give"),
        ("predictions.csv", lambda rows: rows.pop(), "prediction lines, but the run's test"),
        ("predictions.csv", _move_to_another_class, "outside their true class's folder"),
        ("history.csv", lambda rows: rows.pop(2), "history has epochs 1..6 (5 lines)"),
        ("history.csv", lambda rows: rows[3].update(lr="0.02"), "epoch 4 trained with lr 0.02"),
        ("history.csv", lambda rows: rows[1].update(val_acc="0.99"), "best epoch is 2"),
        ("history.csv", lambda rows: rows[-1].update(resumes="3"), "resume marks"),
    ],
)
def test_tampering_is_named(
    bundle: tuple[Path, Path],
    tmp_path: Path,
    name: str,
    edit,
    said: str,  # noqa: ANN001
) -> None:
    folder, _ = bundle
    code, out, err = _verify(_tampered(folder, tmp_path, name, edit))
    assert code == 1, out + err
    assert out.startswith(f"FAIL  {folder.name}: ") and said in out, out
    assert out.splitlines()[-1] == "0 of 1 bundles pass every check"


@pytest.mark.slow
def test_a_data_root_missing_an_image_or_holding_another_is_named(
    bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, root = bundle
    other = tmp_path / "root"
    shutil.copytree(root / "test", other / "test")
    shutil.copytree(root / "train", other / "train")
    first = sorted((other / "test" / "happy").iterdir())[0]
    # what the loader does not read is not expected either: hidden folders and files
    (other / "test" / ".ipynb_checkpoints").mkdir()
    shutil.copy(first, other / "test" / ".ipynb_checkpoints" / first.name)
    shutil.copy(first, other / "test" / "happy" / "._mac.png")
    code, out, _ = _verify(folder.parent, "--data-root", str(other))
    assert code == 0 and "all 140 test images of the data root" in out, out
    first.unlink()
    code, out, _ = _verify(folder.parent, "--data-root", str(other))
    assert code == 1 and "1 paths are not files under" in out, out
    shutil.copy(root / "test" / "happy" / first.name, other / "test" / "happy" / "extra.png")
    code, out, _ = _verify(folder.parent, "--data-root", str(other))
    assert code == 1 and "1 test images of" in out and "have no prediction" in out, out
    (other / "test" / "joyful").mkdir()  # a root the loader refuses: its one line, exit 2
    code, out, err = _verify(folder.parent, "--data-root", str(other))
    assert code == 2 and "Unknown class folder" in err and "Traceback" not in err, err


def test_bad_verify_arguments_are_one_line(tmp_path: Path) -> None:
    for args, said in (
        (["--verify", str(tmp_path / "none")], "no such folder"),
        (["--verify", str(tmp_path)], "no bundle"),
        (
            ["--verify", str(tmp_path), "--data-root", str(tmp_path)],
            "has no train/ and test/ class folders",
        ),
        (["--data-root", str(tmp_path)], "--data-root goes with --verify"),
    ):
        proc = run_cli(args, cwd=tmp_path, module="fer_sweep.report")
        assert proc.returncode == 2 and said in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_an_incomplete_bundle_fails_alone(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    folder, _ = bundle
    shutil.copytree(folder, tmp_path / "b" / "a-whole")
    shutil.copytree(folder, tmp_path / "b" / "b-cut")
    (tmp_path / "b" / "b-cut" / "predictions.csv").unlink()
    code, out, _ = _verify(tmp_path / "b")
    assert code == 1, out
    whole, cut, summary = out.splitlines()
    assert whole.startswith("ok    a-whole: ") and cut.startswith("FAIL  b-cut: ")
    assert "predictions.csv missing" in cut and summary == "1 of 2 bundles pass every check"


def _history_rows(losses: list[float], rates: list[float]) -> list[dict[str, str]]:
    return [
        {"epoch": str(i + 1), "val_loss": repr(x), "val_acc": "0.5", "lr": repr(r), "resumes": "0"}
        for i, (x, r) in enumerate(zip(losses, rates, strict=True))
    ]


PLATEAU = {"name": "plateau", "factor": 0.1, "patience": 0, "min_lr": 0.0}


def test_a_time_budget_plans_its_own_epoch_count() -> None:
    rows = _history_rows([1.0, 0.9, 0.8], [0.01] * 3)
    config = {"trainer": {"epochs": 100, "time_budget_min": 5}, "scheduler": PLATEAU}
    config["optimizer"] = {"lr": 0.01}
    info = {
        "metrics": {"stopped_epoch": 3, "best_epoch": 1, "best_val_acc": 0.5},
        "epochs_logged": {"exactly_once": True},
    }
    v = verify.Verdict("budget")
    verify._check_history(v, config, info, rows)
    assert not v.failed and v.passed[0].startswith("epochs 1..3 once each"), v.line()
    # ... but not more than trainer.epochs, and never other than the run's stopped_epoch
    for stopped, epochs in ((4, 100), (3, 2)):
        v = verify.Verdict("budget")
        info["metrics"]["stopped_epoch"] = stopped
        verify._check_history(
            v, config | {"trainer": {"epochs": epochs, "time_budget_min": 5}}, info, rows
        )
        assert v.failed and "history has epochs 1..3" in v.failed[0], v.line()


def test_a_gpu_resume_without_determinism_is_not_replayed_but_said() -> None:
    rows = _history_rows([1.0, 1.1, 1.2], [0.01, 0.01, 0.01])  # patience 0: a cut was due
    config = {"trainer": {"epochs": 3}, "scheduler": PLATEAU, "optimizer": {"lr": 0.01}}
    info = {
        "metrics": {"stopped_epoch": 3, "best_epoch": 1, "best_val_acc": 0.5},
        "epochs_logged": {"exactly_once": True},
        "resumes": 1,
        "tags": {"device": "cuda"},
    }
    v = verify.Verdict("gpu")
    verify._check_history(v, config, info, rows)
    assert not v.failed and "lr not replayed: resumed on cuda" in v.line(), v.line()
    v = verify.Verdict("cpu")  # the same history from a CPU run is a wrong schedule
    verify._check_history(v, config, info | {"tags": {"device": "cpu"}}, rows)
    assert v.failed and "epoch 3 trained with lr 0.01" in v.line(), v.line()
