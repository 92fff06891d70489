"""Table 2 as one sweep, the report rebuilt from MLflow, and ensembles: one tiny real sweep of all
seven rows (one epoch, 5 images per class) into a temporary store, then the report and ensemble
commands run on it the way a user runs them."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from scipy import stats

from fer_sweep.core.config import validate
from fer_sweep.core.models import build_model, describe
from fer_sweep.tools.report.runs import superseded, swept_keys
from fer_sweep.tools.report.study import STUDY_TABLE2, describe_transforms
from tests.conftest import REPO, migrated_store, real_data, run_cli

ROWS = [  # the study's Table 2: (model, transforms, epochs)
    ("cnn2", "norm", 50),
    ("cnn2_fc1000", "norm", 500),
    ("cnn2_fc3", "norm", 500),
    ("cnn3", "norm", 100),
    ("resnet_small", "norm", 100),
    ("resnet", "aug", 100),
    ("resnet_dropout", "aug", 100),
]
MODELS = [m for m, _, _ in ROWS]
EXP = "table2"


def _compose(*overrides: str, hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "config", overrides=["experiment=table2", *overrides], return_hydra_config=hydra
        )


# --------------------------------------------------------------------------------------------
# Composition only (no training)


@pytest.mark.parametrize("row", range(1, 8))
def test_each_row_composes_to_the_study_recipe(row: int) -> None:
    model, transforms, epochs = ROWS[row - 1]
    cfg = _compose(f"table2=row{row}")
    assert cfg.model.name == model and cfg.transforms.name == transforms
    assert cfg.trainer.epochs == epochs
    # The study's recipe comes from the defaults, not from the experiment files.
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.trainer.batch_size) == ("sgd", 0.01, 100)
    assert cfg.scheduler.name == "plateau"
    assert cfg.mlflow.run_name == f"row{row}-{model}-{transforms}"


def test_command_line_overrides_take_precedence_over_the_rows() -> None:
    assert _compose("table2=row1").trainer.epochs == 50
    cfg = _compose(
        "table2=row1",
        "trainer.epochs=1",
        "data.limit_per_class=5",
        "model=cnn3",
        "mlflow.run_name=mine",
    )
    assert cfg.trainer.epochs == 1 and cfg.data.limit_per_class == 5
    assert cfg.model.name == "cnn3" and cfg.mlflow.run_name == "mine"
    assert cfg.transforms.name == "norm"


def test_experiment_is_a_multirun_over_the_seven_rows() -> None:
    cfg = _compose(hydra=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.table2.split(",") == [f"row{i}" for i in range(1, 8)]


def test_swept_keys_collapse_groups_and_skip_bookkeeping() -> None:
    params = [
        {
            "model.name": "cnn2",
            "model.hidden": "[300, 150]",
            "model.dropout": "0.0",
            "optimizer.lr": "0.01",
            "mlflow.run_name": "a",
            "data.n_train": "35",
        },
        {
            "model.name": "cnn2",
            "model.hidden": "[300, 150]",
            "model.dropout": "0.5",
            "optimizer.lr": "0.01",
            "mlflow.run_name": "b",
            "data.n_train": "36",
        },
        {
            "model.name": "cnn3",
            "model.hidden": "[300, 150]",
            "model.dropout": "0.0",
            "optimizer.lr": "0.1",
            "mlflow.run_name": "c",
            "data.n_train": "35",
        },
    ]
    assert swept_keys(params) == ["model", "model.dropout", "optimizer.lr"]
    assert swept_keys(params[:1]) == []
    # what a run measured at its start is no setting: a time budget's plan and speeds
    budgeted = [{**p, "trainer.epochs_planned": str(40 + i), "budget.train_ips": str(90.5 + i)}
                for i, p in enumerate(params)]  # fmt: skip
    assert swept_keys(budgeted) == ["model", "model.dropout", "optimizer.lr"]
    # a setting fer_sweep gained after a run began (one value where logged) tells no runs apart
    newer = [{**p, "trainer.new_option": "off"} for p in params[1:]]
    assert swept_keys([params[0], *newer]) == ["model", "model.dropout", "optimizer.lr"]
    assert swept_keys([params[0], *newer[:1], {**newer[1], "trainer.new_option": "on"}]) == [
        "model", "model.dropout", "optimizer.lr", "trainer.new_option"
    ]  # fmt: skip


def _stub(run_id: str, status: str, **params: str) -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, status=status), data=SimpleNamespace(params=params)
    )


def test_a_run_trained_again_is_no_replicate_of_its_replacement() -> None:
    base = {"model.name": "resnet", "trainer.seed": "0", "mlflow.run_name": "x"}
    dead = _stub("dead", "KILLED", **base, **{"data.n_train": "7"})
    done = _stub("done", "FINISHED", **base, **{"trainer.new_option": "off"})
    other_seed = _stub("seed1", "KILLED", **{**base, "trainer.seed": "1"})
    other_model = _stub("small", "FAILED", **{**base, "model.name": "resnet_small"})
    running = _stub("live", "RUNNING", **base)
    runs = [dead, done, other_seed, other_model, running]
    assert superseded(runs) == [(dead, done), (running, done)]
    assert superseded([dead, other_seed]) == []  # nothing finished: both stay, with their status


def test_transforms_are_described_in_torchvision_words() -> None:
    assert describe_transforms({"rotation": 0.0, "translate": 0.0}) == "Normalize"
    assert describe_transforms({"rotation": 10.0, "translate": 0.1, "hflip": True}) == (
        "Normalize, RandomRotation(10), RandomAffine(degrees=0, translate=(0.1, 0.1)), "
        "RandomHorizontalFlip(0.5)"
    )


@pytest.mark.slow
def test_report_names_a_missing_store(tmp_path: Path) -> None:
    proc = run_cli(
        ["--tracking-uri", f"sqlite:///{tmp_path / 'nope.db'}"],
        cwd=tmp_path,
        module="fer_sweep.report",
    )
    assert proc.returncode == 2
    assert "fer_sweep: error: no MLflow store at" in proc.stderr
    assert not (tmp_path / "nope.db").exists()


# --------------------------------------------------------------------------------------------
# One real sweep of the seven rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowClient, str, Path]:
    cwd = tmp_path_factory.mktemp("table2")
    uri = migrated_store(cwd / "t.db")
    data = [] if real_data() else ["data=synthetic"]
    # No model logging / figures: nothing below reads them, and they are most of a job's time.
    proc = run_cli(
        [
            "-m",
            "experiment=table2",
            "trainer.epochs=1",
            "data.limit_per_class=5",
            "trainer.progress=false",
            "mlflow.log_model=false",
            "mlflow.figures=false",
            f"mlflow.tracking_uri={uri}",
            f"mlflow.experiment={EXP}",
            *data,
        ],
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return MlflowClient(uri), uri, cwd


def _runs(client: MlflowClient, role: str) -> list:
    exp = client.get_experiment_by_name(EXP)
    return [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("fer_sweep.role") == role
    ]


@pytest.mark.slow
def test_seven_finished_rows_under_one_parent(sweep: tuple[MlflowClient, str, Path]) -> None:
    client, _, _ = sweep
    parents, jobs = _runs(client, "parent"), _runs(client, "job")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(jobs) == 7
    by_model = {r.data.tags["model"]: r for r in jobs}
    assert sorted(by_model) == sorted(MODELS)
    for row, (model, transforms, _) in enumerate(ROWS, 1):
        run = by_model[model]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["transforms"] == transforms
        assert run.info.run_name.endswith(f"row{row}-{model}-{transforms}")
        assert f"table2=row{row}" in run.data.tags["overrides"].split()
        assert run.data.params["trainer.epochs"] == "1"  # the command line beat the row's value
        assert run.data.params["optimizer.lr"] == "0.01"


@pytest.fixture(scope="module")
def ensemble(sweep: tuple[MlflowClient, str, Path]) -> tuple[str, str]:
    client, uri, cwd = sweep
    parent = _runs(client, "parent")[0].info.run_id
    proc = run_cli(
        ["--tracking-uri", uri, "--experiment", EXP, "--parent", parent, "--top-k", "3"],
        cwd=cwd,
        module="fer_sweep.ensemble",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return parent, proc.stdout


@pytest.mark.slow
def test_ensemble_logs_the_accuracy_of_the_averaged_probabilities(
    sweep: tuple[MlflowClient, str, Path], ensemble: tuple[str, str], tmp_path: Path
) -> None:
    client, _, _ = sweep
    parent, stdout = ensemble
    (run,) = _runs(client, "ensemble")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    members = run.data.tags["fer_sweep.members"].split(",")
    listing = json.loads(
        Path(client.download_artifacts(run.info.run_id, "members.json", str(tmp_path))).read_text()
    )
    assert (
        [m["run_id"] for m in listing] == members == run.data.params["ensemble.members"].split(",")
    )
    # The members are the top 3 jobs by validation accuracy, never by a test metric.
    jobs = sorted(
        _runs(client, "job"), key=lambda r: (-r.data.metrics["best_val_acc"], r.info.start_time)
    )
    assert members == [r.info.run_id for r in jobs[:3]]
    probs, ys = [], []
    for i, run_id in enumerate(members):
        path = client.download_artifacts(run_id, "predictions.npz", str(tmp_path / str(i)))
        with np.load(path) as npz:
            probs.append(npz["test_probs"].astype(np.float64))
            ys.append(npz["test_y"])
    assert all(np.array_equal(ys[0], y) for y in ys)
    mean = np.mean(probs, axis=0)
    acc = float((mean.argmax(1) == ys[0]).mean())
    nll = float(-np.log(mean[np.arange(ys[0].size), ys[0]]).mean())
    m = run.data.metrics
    assert m["test_acc"] == pytest.approx(acc, abs=1e-9)
    assert m["test_loss"] == pytest.approx(nll, rel=1e-5)
    assert 0.0 <= m["macro_f1"] <= 1.0 and m["n_members"] == 3
    assert "ensemble" in stdout and f"{100 * acc:.1f}%" in stdout


@pytest.mark.slow
def test_ensemble_refuses_runs_scored_on_different_test_sets(
    sweep: tuple[MlflowClient, str, Path], tmp_path: Path
) -> None:
    client, uri, cwd = sweep
    exp_id = client.create_experiment("mismatch")
    source = _runs(client, "job")[0].info.run_id
    with np.load(client.download_artifacts(source, "predictions.npz", str(tmp_path))) as npz:
        probs, y = npz["test_probs"], npz["test_y"]
    for i, (p, labels) in enumerate([(probs, y), (probs[:-1], y[:-1])]):
        run_id = client.create_run(exp_id, tags={"fer_sweep.role": "job"}).info.run_id
        client.log_metric(run_id, "best_val_acc", 0.5 + i / 10)
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        np.savez(folder / "predictions.npz", test_probs=p, test_y=labels)
        client.log_artifacts(run_id, str(folder))
        client.set_terminated(run_id)
    proc = run_cli(
        ["--tracking-uri", uri, "--experiment", "mismatch", "--top-k", "2"],
        cwd=cwd,
        module="fer_sweep.ensemble",
    )
    assert proc.returncode == 2
    assert "not evaluated on the same test set" in proc.stderr
    assert not [
        r for r in client.search_runs([exp_id]) if r.data.tags.get("fer_sweep.role") == "ensemble"
    ]
    proc = run_cli(
        ["--tracking-uri", uri, "--experiment", "mismatch", "--by", "test_acc"],
        cwd=cwd,
        module="fer_sweep.ensemble",
    )
    assert proc.returncode == 2 and "computed on the test set" in proc.stderr


@pytest.mark.slow
def test_ensemble_ranks_only_by_validation_metrics(
    sweep: tuple[MlflowClient, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every metric a job logs that is not measured on the validation split (test_acc,
    macro_f1, test_acc_<class>, n_params, ...) is refused by --by, before anything is read."""
    from fer_sweep.tools.ensemble import RANKABLE, main

    client, uri, _ = sweep
    logged = set().union(*(r.data.metrics for r in _runs(client, "job")))
    assert {"test_acc", "macro_f1", "best_val_acc"} <= logged
    assert all(k.startswith(("val_", "best_val_")) for k in RANKABLE)
    for key in sorted(logged - set(RANKABLE)):
        code = main(["--tracking-uri", uri, "--experiment", EXP, "--by", key, "--latest"])
        err = capsys.readouterr().err
        assert code == 2 and f"--by {key}:" in err and "best_val_acc" in err, (key, err)
    assert not _runs(client, "ensemble") or all(
        r.data.params["ensemble.by"] in RANKABLE for r in _runs(client, "ensemble")
    )


@pytest.fixture(scope="module")
def report_dir(sweep: tuple[MlflowClient, str, Path], ensemble: tuple[str, str]) -> Path:
    _, uri, cwd = sweep
    parent, _ = ensemble
    proc = run_cli(["--tracking-uri", uri, "--experiment", EXP], cwd=cwd, module="fer_sweep.report")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd / "reports" / parent  # the default --out, for the latest parent


@pytest.mark.slow
def test_report_table2_in_the_study_order(report_dir: Path) -> None:
    with (report_dir / "table2.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == MODELS
    assert [r["transforms_name"] for r in rows] == [t for _, t, _ in ROWS]
    study = {r.model: r.acc for r in STUDY_TABLE2}
    for row, (model, _, _) in zip(rows, ROWS, strict=True):
        assert row["status"] == "FINISHED" and row["epochs"] == "1"
        assert float(row["study_acc_pct"]) == study[model]
        assert math.isclose(
            float(row["diff_pp"]), float(row["test_acc_pct"]) - study[model], abs_tol=1e-9
        )
        assert int(row["n_params"]) > 0 and row["best_epoch"] == "1"
        assert float(row["wall_seconds"]) > 0 and float(row["final_train_loss"]) > 0
        assert row["synthetic"] == str(not real_data()).lower()
    # per run: training images a second (images x epochs / training time) and resumes
    with (report_dir / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    seen = {
        float(r["images_per_s"]) * float(r["wall_seconds"]) / int(r["stopped_epoch"]) for r in runs
    }
    assert len(runs) == len(ROWS) and all(r["resumes"] == "0" for r in runs)
    assert max(seen) - min(seen) < 1e-6 and min(seen) >= 7  # the same training split for all
    assert "## Runs" not in (report_dir / "table2.md").read_text()  # one run a row, none resumed
    # The network column is read off the model each run's config builds.
    cfg = _compose("table2=row1")
    assert rows[0]["network"] == describe(build_model(validate(cfg).model))
    assert rows[0]["network"].endswith("Linear-150-7")
    assert "Dropout" in rows[6]["network"] and "Dropout" not in rows[5]["network"]
    assert rows[0]["transformations"] == "Normalize"
    assert rows[5]["transformations"] == describe_transforms({"rotation": 10, "translate": 0.1})
    md = (report_dir / "table2.md").read_text()
    body = [line for line in md.splitlines() if line.startswith("| ")]
    # header, seven rows; the claims' header and six claims; the ensemble table's header, row
    assert len(body) == 1 + 7 + 1 + 6 + 2
    assert ("SYNTHETIC" in md) == (not real_data())
    assert "## Ensembles of this sweep" in md and "75.8%" in md


@pytest.mark.slow
def test_report_leaves_out_a_run_that_was_trained_again(
    sweep: tuple[MlflowClient, str, Path], tmp_path: Path
) -> None:
    """Row 6 stopped before its first checkpoint leaves a KILLED run beside the run that
    sweep.resume trained in its place: one run of row 6, not two "replicates" with one seed."""
    client, uri, cwd = sweep
    db = tmp_path / "t.db"
    shutil.copy(uri.removeprefix("sqlite:///"), db)
    copy = MlflowClient(f"sqlite:///{db}")
    row6 = next(r for r in _runs(copy, "job") if r.data.tags["model"] == "resnet")
    dead = copy.create_run(row6.info.experiment_id, tags=row6.data.tags).info.run_id
    for key, value in row6.data.params.items():
        copy.log_param(dead, key, value)
    copy.log_metric(dead, "train_loss", 1.9, step=0)  # a few steps logged, no epoch finished
    copy.set_terminated(dead, status="KILLED")
    out = tmp_path / "report"
    proc = run_cli(
        ["--tracking-uri", f"sqlite:///{db}", "--experiment", EXP, "--no-log", "--out", str(out)],
        cwd=cwd,
        module="fer_sweep.report",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with (out / "table2.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == MODELS and {r["n"] for r in rows} == {"1"}
    assert {r["status"] for r in rows} == {"FINISHED"}
    md = (out / "table2.md").read_text()
    assert f"`{dead[:8]}` (KILLED, trained again as `{row6.info.run_id[:8]}`)" in md


@pytest.mark.slow
def test_report_table1_and_figures_logged_on_the_parent(
    sweep: tuple[MlflowClient, str, Path], report_dir: Path
) -> None:
    client, _, _ = sweep
    table1 = (report_dir / "table1.md").read_text()
    assert "| Happiness | 5 | 5 | 5 | 15 | 5770 | 1445 | 1774 | 8989 |" in table1
    assert "| **Total** | 35 | 35 | 35 | 105 | 22967 | 5742 | 7178 | 35887 |" in table1
    for name in ("accuracy.png", "curves.png"):
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = {a.path for a in client.list_artifacts(report_dir.name, "report")}
    assert logged == {
        f"report/{n}"
        for n in (
            "table2.md",
            "table2.csv",
            "runs.csv",
            "claims.csv",
            "table1.md",
            "accuracy.png",
            "curves.png",
        )
    }


@pytest.mark.slow
def test_report_checks_the_studys_claims(
    sweep: tuple[MlflowClient, str, Path], report_dir: Path
) -> None:
    """Each claim the study's Table 2 implies is the difference of two of its rows: with single
    runs only a bare difference; with --seed-sd, an interval and a verdict."""
    _, uri, cwd = sweep
    with (report_dir / "table2.csv").open() as f:
        acc = {int(r["study_row"]): float(r["test_acc_pct"]) for r in csv.DictReader(f)}
    with (report_dir / "claims.csv").open() as f:
        bare = list(csv.DictReader(f))
    assert [(int(c["row_a"]), int(c["row_b"])) for c in bare] == [
        (1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 7)
    ]  # fmt: skip
    study = {r.row: r.acc for r in STUDY_TABLE2}
    for c in bare:
        a, b = int(c["row_a"]), int(c["row_b"])
        assert float(c["diff_pp"]) == pytest.approx(acc[b] - acc[a])
        assert float(c["study_diff_pp"]) == pytest.approx(study[b] - study[a])
        assert c["shown_as_study"] == "no interval" and c["diff_ci95_low"] == ""
    out = cwd / "claims-sd"
    proc = run_cli(
        ["--tracking-uri", uri, "--experiment", EXP, "--seed-sd", "0.60@8", "--no-log"]
        + ["--out", str(out)],
        cwd=cwd,
        module="fer_sweep.report",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    half = stats.t.ppf(0.975, 8) * 0.60 * math.sqrt(2)  # two single runs, sd 0.60 on 8 df
    with (out / "claims.csv").open() as f:
        checked = list(csv.DictReader(f))
    for c in checked:
        diff, low, high = (float(c[k]) for k in ("diff_pp", "diff_ci95_low", "diff_ci95_high"))
        assert (low, high) == pytest.approx((diff - half, diff + half))
        assert c["interval_from"] == "pooled sd 0.60 pp, 8 df"
        shown = low > 0 or high < 0
        same = (diff > 0) == (float(c["study_diff_pp"]) > 0)
        assert c["shown_as_study"] == (
            "not shown" if not shown else "yes" if same else "the opposite"
        )
    md = (out / "table2.md").read_text()
    assert "| dropout hurts | 7 − 6 | 1, 1 | -2.6 |" in md
    # earlier runs of rows this report already holds: refused, one line, before any file
    proc = run_cli(
        ["--tracking-uri", uri, "--experiment", EXP, "--no-log", "--out", str(cwd / "twice")]
        + ["--prior-runs", str(REPO / "results" / "rows1-4-seeds.csv")],
        cwd=cwd,
        module="fer_sweep.report",
    )
    assert proc.returncode == 2 and "row 1 is also in this report" in proc.stderr
    assert "Traceback" not in proc.stderr and not (cwd / "twice").exists()
    assert ("## The study's claims (on SYNTHETIC data" in md) == (not real_data())


@pytest.mark.slow
def test_report_from_exported_bundles_alone_is_the_stores(
    sweep: tuple[MlflowClient, str, Path], report_dir: Path
) -> None:
    """--bundles: the seven runs exported, then reported from their files with no store at all,
    give the store's report; beside the store's own sweep, a run in both counts once."""
    _, uri, cwd = sweep
    exported = cwd / "bundles"
    proc = run_cli(
        ["--tracking-uri", uri, "--experiment", EXP, "--export", str(exported)],
        cwd=cwd,
        module="fer_sweep.report",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    alone, both = cwd / "from-bundles", cwd / "store-and-bundles"
    proc = run_cli(
        ["--bundles", str(exported), "--out", str(alone), "--tracking-uri", "sqlite:///no.db"],
        cwd=cwd,
        module="fer_sweep.report",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (cwd / "no.db").exists()  # no store opened, let alone created
    parent = report_dir.name
    proc = run_cli(
        ["--tracking-uri", uri, "--experiment", EXP, "--parent", parent, "--no-log"]
        + ["--bundles", str(exported), "--out", str(both)],
        cwd=cwd,
        module="fer_sweep.report",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("table2.csv", "runs.csv", "claims.csv", "table1.md"):
        assert (alone / name).read_text() == (report_dir / name).read_text(), name
        assert (both / name).read_text() == (report_dir / name).read_text(), name
    md = (alone / "table2.md").read_text()
    assert "Runs: 7 exported runs (bundles of `python -m fer_sweep.report --export`" in md
    assert f"`{exported}`" in md and "Sweep: parent run" not in md
    assert "Sweep: parent run" in (both / "table2.md").read_text()
    assert "Also" not in (both / "table2.md").read_text()  # every bundle was in the store
    # the store's sweep and a run only a bundle holds (row 5 as trained here, results/): one
    # report, not logged on the parent, whose sweep it no longer is
    mixed = cwd / "mixed"
    proc = run_cli(
        ["--tracking-uri", uri, "--experiment", EXP, "--parent", parent]
        + ["--bundles", str(REPO / "results"), "--out", str(mixed)],
        cwd=cwd,
        module="fer_sweep.report",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "logged on run" not in proc.stdout
    with (mixed / "runs.csv").open() as f:
        runs = {r["run_id"][:8]: r for r in csv.DictReader(f)}
    committed = sorted((REPO / "results").glob("*/metrics.json"))
    assert len(runs) == 7 + len(committed)
    assert float(runs["f791b3f6"]["test_acc_pct"]) == pytest.approx(100 * 4237 / 7178)
    assert runs["f791b3f6"]["stopped_epoch"] == "100" and runs["f791b3f6"]["resumes"] == "7"
    assert f"Also {len(committed)} exported run" in (mixed / "table2.md").read_text()
    assert (mixed / "table1.md").read_text() == (report_dir / "table1.md").read_text()


@pytest.mark.slow
def test_some_rows_without_dash_m(sweep: tuple[MlflowClient, str, Path]) -> None:
    """experiment=table2 switches Hydra to MULTIRUN itself; table2=row2,row4 on the command line
    replaces the sweep's list. (Into the module's store, in an experiment of its own.)"""
    client, uri, cwd = sweep
    data = [] if real_data() else ["data=synthetic"]
    proc = run_cli(
        [
            "experiment=table2",
            "table2=row2,row4",
            "trainer.epochs=1",
            "data.limit_per_class=2",
            "trainer.progress=false",
            "mlflow.log_model=false",
            "mlflow.figures=false",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=some_rows",
            *data,
        ],
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = client.search_runs([client.get_experiment_by_name("some_rows").experiment_id])
    roles = sorted(r.data.tags.get("fer_sweep.role") for r in runs)
    assert roles == ["job", "job", "parent"]
    jobs = [r for r in runs if r.data.tags["fer_sweep.role"] == "job"]
    prefix = "" if real_data() else "SYNTHETIC-"
    assert sorted(r.info.run_name for r in jobs) == [
        f"{prefix}row2-cnn2_fc1000-norm",
        f"{prefix}row4-cnn3-norm",
    ]
    assert all(r.info.status == "FINISHED" for r in jobs)
    assert all(r.data.params["trainer.epochs"] == "1" for r in jobs)
