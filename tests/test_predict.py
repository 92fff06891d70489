"""``python -m fer_sweep.predict`` against real runs: two tiny models trained by the real CLI
into a sqlite store in a tmp dir, real image files (PNG, JPEG, corrupt, not an image), and the
training data path (``load_source``) as the reference for pixels and probabilities."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fer_sweep.core.augment import make_transform
from fer_sweep.core.dataset import CLASSES
from fer_sweep.core.device import autocast
from fer_sweep.core.sources import load_source
from fer_sweep.errors import FerSweepError
from fer_sweep.tools.predict import annotated_names, decode_image, main
from tests.conftest import migrated_store, real_data, run_cli

# every test here starts the CLI or trains; one worker, so the module's store is trained once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("predict")]

LRS = ("0.00001", "0.003")  # adam, 1 epoch: near chance vs. clearly learning


def _smooth(rng: np.random.Generator, h: int, w: int, channels: int = 0) -> np.ndarray:
    """A smooth random image (JPEG-friendly, unlike pure noise)."""
    shape = (6, 6, channels) if channels else (6, 6)
    small = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two FINISHED job runs (and their sweep's parent run) plus the images to predict."""
    tmp = tmp_path_factory.mktemp("predict")
    uri = migrated_store(tmp / "m.db")
    data = [] if real_data() else ["data=synthetic"]
    proc = run_cli(
        [
            "-m",
            "model=cnn2",
            "trainer.epochs=1",
            "data.limit_per_class=5",
            "trainer.progress=false",
            "mlflow.figures=false",
            f"mlflow.tracking_uri={uri}",
            "optimizer=adam",
            f"optimizer.lr={','.join(LRS)}",
            *data,
        ],
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("fer_sweep").experiment_id
    runs = client.search_runs([exp_id])
    jobs = [r for r in runs if r.data.tags.get("fer_sweep.role") == "job"]
    parents = [r for r in runs if r.data.tags.get("fer_sweep.role") == "parent"]
    assert len(jobs) == 2 and len(parents) == 1

    rng = np.random.default_rng(0)
    faces = tmp / "faces"
    (faces / "sub").mkdir(parents=True)
    Image.fromarray(_smooth(rng, 200, 150, 3)).save(tmp / "single.jpg", quality=90)
    Image.fromarray(_smooth(rng, 48, 48)).save(faces / "gray.png")
    Image.fromarray(_smooth(rng, 80, 100, 3)).save(faces / "sub" / "rgb.jpg", quality=90)
    (faces / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))  # JPEG header, no data
    (faces / "notes.txt").write_text("not an image\n")
    return {
        "tmp": tmp,
        "uri": uri,
        "client": client,
        "exp_id": exp_id,
        "jobs": jobs,
        "parent": parents[0],
    }


IMAGES = ("single.jpg", "faces/gray.png", "faces/sub/rgb.jpg")


def _main(
    args: list[str],
    store: dict,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[int, str, str]:
    """main() in this process (same code as the CLI, without paying the imports again)."""
    monkeypatch.chdir(store["tmp"])
    code = main([*args, "--tracking-uri", store["uri"], "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_table_predicts_files_and_folders(store: dict) -> None:
    run_id = store["jobs"][0].info.run_id
    proc = run_cli(
        ["--run-id", run_id, "--tracking-uri", store["uri"], "single.jpg", "faces/"],
        cwd=store["tmp"],
        module="fer_sweep.predict",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["image", "emotion", *CLASSES]
    rows = {cols[0]: cols[1:] for cols in (line.split() for line in lines[1:])}
    assert sorted(rows) == sorted(IMAGES)  # corrupt.jpg and notes.txt are not predicted
    for emotion, *probs in rows.values():
        p = np.array([float(v) for v in probs])
        assert abs(p.sum() - 1) < 1e-3 and emotion == CLASSES[int(p.argmax())]
    # aligned columns: every line has the header's width for the probability columns
    assert len({len(line) for line in lines}) == 1
    assert "faces/corrupt.jpg" in proc.stderr and "notes.txt" not in proc.stdout
    assert "Traceback" not in proc.stderr


def _reference(store: dict, run_id: str) -> dict[str, np.ndarray]:
    """Probabilities via the training path: the images as a folder dataset read by
    load_source, normalised with make_transform, through the logged model in the run's
    precision."""
    import mlflow
    import mlflow.pytorch

    tmp = store["tmp"]
    root = tmp / "ref_dataset"
    shutil.rmtree(root, ignore_errors=True)
    for split in ("train", "test"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            shutil.copy(tmp / "faces/gray.png", root / split / c / "z.png")
    # class order, then file name: angry holds rows 0 (gray), 1 (rgb) and 2 (single)
    shutil.copy(tmp / "faces/gray.png", root / "train/angry/a.png")
    shutil.copy(tmp / "faces/sub/rgb.jpg", root / "train/angry/b.jpg")
    shutil.copy(tmp / "single.jpg", root / "train/angry/c.jpg")
    train, _, _ = load_source(root, "folder", cache_dir=tmp / "ref_cache")
    x = train.x[:3]
    for i, name in enumerate(("faces/gray.png", "faces/sub/rgb.jpg", "single.jpg")):
        assert np.array_equal(decode_image((tmp / name).read_bytes()), x[i].numpy()), name

    params = store["client"].get_run(run_id).data.params
    mean, std = float(params["data.mean_used"]), float(params["data.std_used"])
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model").eval()
    # In the precision the run trained (and was validated and tested) in.
    precision = params.get("trainer.precision", "fp32")
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        logits = model(make_transform(None, mean, std)(x, train=False))
    probs = logits.float().softmax(1).numpy()
    return dict(zip(("faces/gray.png", "faces/sub/rgb.jpg", "single.jpg"), probs, strict=True))


def test_csv_and_json_match_the_training_path(
    store: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = store["jobs"][1].info.run_id
    code, out, err = _main(
        ["--run-id", run_id, "--format", "json", "single.jpg", "faces"], store, capsys, monkeypatch
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["run_id"] == run_id and doc["classes"] == list(CLASSES)
    got = {p["image"]: p for p in doc["predictions"]}
    assert sorted(got) == sorted(IMAGES)
    assert [u["image"] for u in doc["unreadable"]] == ["faces/corrupt.jpg"]
    assert "faces/corrupt.jpg" in err

    ref = _reference(store, run_id)
    for name, p in got.items():
        probs = np.array([p["probabilities"][c] for c in CLASSES])
        assert abs(probs.sum() - 1) < 1e-5
        np.testing.assert_allclose(probs, ref[name], atol=1e-5, rtol=0)
        assert p["emotion"] == CLASSES[int(ref[name].argmax())]

    code, out, err = _main(
        ["--run-id", run_id, "--format", "csv", "--batch-size", "2", "single.jpg", "faces"],
        store,
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["image", "emotion", *CLASSES]
    assert len(rows) == 1 + len(IMAGES)
    for name, emotion, *probs in rows[1:]:
        p = np.array([float(v) for v in probs])
        assert abs(p.sum() - 1) < 1e-6 and emotion == got[name]["emotion"]
        np.testing.assert_allclose(p, ref[name], atol=1e-5, rtol=0)

    # jsonl: one object per image (the CSV's columns), each line JSON on its own
    code, out, err = _main(
        ["--run-id", run_id, "--format", "jsonl", "single.jpg", "faces"], store, capsys, monkeypatch
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["image"] for r in lines) == sorted(IMAGES)
    for r in lines:
        assert (
            list(r) == ["image", "emotion", *CLASSES] and r["emotion"] == got[r["image"]]["emotion"]
        )
        np.testing.assert_allclose([r[c] for c in CLASSES], ref[r["image"]], atol=1e-5, rtol=0)


def _ranked(jobs: list) -> list:
    """The trained runs, highest best_val_acc first (ties: the newest), as --run-id best ranks."""
    return sorted(
        jobs, key=lambda r: (r.data.metrics["best_val_acc"], r.info.start_time), reverse=True
    )


def test_best_picks_the_highest_best_val_acc(
    store: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, ranked = store["client"], _ranked(store["jobs"])
    # decoys that must never be picked: a FAILED job run with a perfect score, and a better
    # FINISHED one without a model (skipped, and said so)
    job = {"fer_sweep.role": "job", "synthetic": "false"}  # what a FER2013 job run carries
    failed = client.create_run(store["exp_id"], tags=job).info.run_id
    client.log_metric(failed, "best_val_acc", 1.0)
    client.set_terminated(failed, "FAILED")
    no_model = client.create_run(store["exp_id"], tags=job).info.run_id
    client.log_metric(no_model, "best_val_acc", 0.999)
    client.set_terminated(no_model, "FINISHED")
    try:
        code, out, err = _main(
            ["--run-id", "best", "--format", "json", "faces/gray.png"], store, capsys, monkeypatch
        )
    finally:
        client.delete_run(failed)
        client.delete_run(no_model)
    assert code == 0, err
    assert json.loads(out)["run_id"] == ranked[0].info.run_id
    assert f"using run {ranked[0].info.run_id}" in err
    assert no_model in err and failed not in err


def test_best_is_a_fer2013_run_before_any_synthetic_one(
    store: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, jobs = store["client"], store["jobs"]
    better, worse = _ranked(jobs)
    was = {r.info.run_id: r.data.tags["synthetic"] for r in jobs}
    client.set_tag(better.info.run_id, "synthetic", "true")  # easy faces score higher
    client.set_tag(worse.info.run_id, "synthetic", "false")
    try:
        args = ["--run-id", "best", "--format", "json", "faces/gray.png"]
        code, out, err = _main(args, store, capsys, monkeypatch)
        assert code == 0 and json.loads(out)["run_id"] == worse.info.run_id, err
        client.set_tag(worse.info.run_id, "synthetic", "true")  # none from FER2013: the best
        code, out, err = _main(args, store, capsys, monkeypatch)
        assert code == 0 and json.loads(out)["run_id"] == better.info.run_id, err
    finally:
        for run_id, tag in was.items():
            client.set_tag(run_id, "synthetic", tag)


def test_unknown_run_is_exit_2_naming_run_and_store(
    store: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = _main(
        ["--run-id", "0123456789abcdef", "single.jpg"], store, capsys, monkeypatch
    )
    assert code == 2 and out == ""
    assert "0123456789abcdef" in err and store["uri"] in err and "Traceback" not in err


def test_run_without_model_is_exit_2(
    store: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = store["parent"].info.run_id  # a sweep's parent run logs no model
    code, out, err = _main(["--run-id", parent, "single.jpg"], store, capsys, monkeypatch)
    assert code == 2 and out == ""
    assert parent in err and "no logged model" in err and "parent" in err


def test_best_in_unknown_experiment_is_exit_2(
    store: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = _main(
        ["--run-id", "best", "--experiment", "nope", "single.jpg"], store, capsys, monkeypatch
    )
    assert code == 2 and "'nope'" in err and "fer_sweep" in err  # lists what is there


def test_nothing_readable_is_exit_1(
    store: dict, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = store["jobs"][0].info.run_id
    code, out, err = _main(
        ["--run-id", run_id, "faces/corrupt.jpg", "faces/notes.txt"], store, capsys, monkeypatch
    )
    assert code == 1 and out == ""
    assert "faces/corrupt.jpg" in err and "faces/notes.txt" in err


def test_missing_path_and_missing_store_are_exit_2(
    store: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = store["jobs"][0].info.run_id
    code, _, err = _main(
        ["--run-id", run_id, "single.jpg", "no_such_folder"], store, capsys, monkeypatch
    )
    assert code == 2 and "no_such_folder" in err

    monkeypatch.chdir(store["tmp"])
    missing = tmp_path / "typo.db"
    code = main(["--run-id", run_id, "--tracking-uri", f"sqlite:///{missing}", "single.jpg"])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err
    assert not missing.exists()  # no empty store is created by a typo


def test_annotated_photos_never_overwrite_each_other_or_a_photo(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.png", tmp_path / "a" / "y.jpg"
    out = tmp_path / "drawn"
    assert annotated_names([a, b, c], out) == {
        a: out / "x.jpg", b: out / "x-2.jpg", c: out / "y.jpg"
    }  # fmt: skip
    for p in (a, b, c):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"photo")
    with pytest.raises(FerSweepError, match=r"--annotate .*a: its drawing of .*x.jpg would"):
        annotated_names([a, b, c], tmp_path / "a")  # drawn into the photos' own folder
    # a file that is not one of the photos given (an earlier drawing) is drawn over
    assert annotated_names([b], tmp_path / "a") == {b: tmp_path / "a" / "x.jpg"}
