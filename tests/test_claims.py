"""The study's claims as intervals: which groups count as a study row, the pooled seed sd they
are judged with (the report's replicates, earlier runs from a CSV, --seed-sd), each verdict
and the verdict of a claim over several rows. Groups are built by hand here (the report's own
Row and Group objects, no store); tests/test_report.py runs the same through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats

from fer_sweep.errors import FerSweepError
from fer_sweep.tools.replicates import PooledSd, summarize
from fer_sweep.tools.report.claims import (
    check_claims,
    claim_records,
    claims_section,
    prior_sides,
    report_sides,
)
from fer_sweep.tools.report.runs import Group, Row
from fer_sweep.tools.report.study import STUDY_BY_MODEL

RESULTS = Path(__file__).resolve().parents[1] / "results"
AUG = STUDY_BY_MODEL["resnet"].transforms


def group(model: str, accs: list[float], transforms: str | None = None, epochs: int = 100,
          synthetic: bool = False, label: str = "") -> Group:  # fmt: skip
    """A group of len(accs) runs of ``model`` (no test accuracy at all: a run still training)."""
    study = STUDY_BY_MODEL[model]
    rows = [
        Row(
            run=None,  # type: ignore[arg-type]  # claims read no MLflow run
            model=model,
            transforms_name="",
            network="",
            transforms=study.transforms if transforms is None else transforms,
            epochs=epochs,
            synthetic=synthetic,
            metrics={"test_acc": a},
            study=study,
        )
        for a in accs or [math.nan]
    ]
    stats_ = {"test_acc": s} if (s := summarize(accs)) else {}
    return Group(rows, {}, {}, stats_, label=label or model)


def t(df: int) -> float:
    return float(stats.t.ppf(0.975, df))


def test_dropout_claim_single_run_against_three_seeds() -> None:
    six, seven = [0.660, 0.665, 0.670], [0.620]
    claims = check_claims(
        [group("resnet", six), group("resnet_dropout", seven)], PooledSd(0.006, 8)
    )
    (c,) = claims.checks
    # one sd: row 6's spread (0.005 on 2 df) pooled with the outside 0.6 pp (8 df)
    sd = math.sqrt((2 * 0.005**2 + 8 * 0.006**2) / 10)
    assert claims.sd is not None and claims.sd.df == 10 and claims.sd.sd == pytest.approx(sd)
    assert (c.a.acc.n, c.b.acc.n) == (3, 1)
    assert c.diff.delta == pytest.approx(0.620 - 0.665)
    assert c.diff.high - c.diff.delta == pytest.approx(t(10) * sd * math.sqrt(1 / 3 + 1))
    assert c.study_delta == pytest.approx(-2.6) and c.verdict == "yes"
    # |−4.5 − (−2.6)| = 1.9 points against t · sd · √(1/3 + 1 + 2) ≈ 2.4: consistent
    assert c.study_consistent is True
    far = check_claims([group("resnet", six), group("resnet_dropout", [0.58])], PooledSd(0.006, 8))
    assert far.checks[0].verdict == "yes" and far.checks[0].study_consistent is False
    back = check_claims([group("resnet", six), group("resnet_dropout", [0.70])], PooledSd(0.006, 8))
    assert back.checks[0].verdict == "the opposite"
    md = "\n".join(claims_section(back))
    assert "| dropout hurts | 7 − 6 | 3, 1 | -2.6 | +3.5 |" in md
    assert "- **dropout hurts**: the opposite is shown (7 − 6)" in md
    assert (
        f"pooled sd {100 * sd:.2f} pp, 10 df (from row 6 (this report, n=3); --seed-sd 0.6@8)" in md
    )
    close = check_claims(
        [group("resnet", six), group("resnet_dropout", [0.66])], PooledSd(0.006, 8)
    )
    assert close.checks[0].verdict == "not shown"


def test_single_runs_alone_give_bare_differences() -> None:
    claims = check_claims([group("resnet", [0.66]), group("resnet_dropout", [0.62])])
    (c,) = claims.checks
    assert claims.sd is None and c.diff.low is None and c.verdict == "no interval"
    assert c.study_consistent is None
    md = "\n".join(claims_section(claims))
    assert "no interval (single runs only: give --seed-sd or --prior-runs)" in md
    assert "Rows of the study measured nowhere here: 1, 2, 3, 4, 5." in md


def test_which_groups_are_a_study_row() -> None:
    recipe = group("resnet", [0.66], label="recipe")
    short = group("resnet", [0.50], epochs=1, label="short")
    sides, notes = report_sides([short, recipe])
    assert sides[6].acc.mean == 0.66 and notes == []  # the study's epochs win
    sides, notes = report_sides([short])
    assert sides[6].acc.mean == 0.50 and notes == ["row 6 trained 1 epochs (the study 100)"]
    twice = group("resnet", [0.67], label="twice")
    sides, notes = report_sides([recipe, twice])
    assert 6 not in sides and "row 6 left out: 2 groups" in notes[0] and "recipe, twice" in notes[0]
    running = group("resnet", [])  # no test accuracy yet
    other = group("resnet", [0.6], transforms="Normalize")  # not the study's row 6
    assert report_sides([running, other]) == ({}, [])
    synthetic = group("resnet", [0.3], synthetic=True)
    both = check_claims([synthetic, group("resnet_dropout", [0.2])])
    assert "## The study's claims (on SYNTHETIC data" in "\n".join(claims_section(both))


def test_earlier_runs_from_the_committed_csv() -> None:
    prior = prior_sides(RESULTS / "rows1-4-seeds.csv")
    assert sorted(prior) == [1, 2, 3, 4] and all(s.acc.n == 3 for s in prior.values())
    assert prior[1].acc.mean == pytest.approx(0.5067) and prior[1].source == "rows1-4-seeds.csv"
    six = group("resnet", [0.655, 0.660, 0.650])
    claims = check_claims([six], None, prior)
    assert [(c.claim.a, c.claim.b) for c in claims.checks] == [(1, 6), (2, 6), (3, 6), (4, 6)]
    # rows 1-4 alone: docs/results.md's 0.597 pp on 8 df; with row 6's seeds, 10 df
    alone = check_claims([group("resnet", [0.66])], None, prior).sd
    assert alone is not None and alone.df == 8 and 100 * alone.sd == pytest.approx(0.5973, abs=1e-4)
    assert claims.sd is not None and claims.sd.df == 10
    for c in claims.checks:
        half = t(10) * claims.sd.sd * math.sqrt(2 / 3)
        assert c.diff.high - c.diff.delta == pytest.approx(half) and c.verdict == "yes"
    md = "\n".join(claims_section(claims))
    assert "- **the ResNet beats the CNNs**: shown, against all 4 rows" in md
    assert "- **augmentation helps**: incomplete: row 5 not measured" in md
    assert "Rows from rows1-4-seeds.csv: earlier runs, not in this store." in md
    records = claim_records(claims)
    assert {r["source_a"] for r in records} == {"rows1-4-seeds.csv"}
    assert {r["source_b"] for r in records} == {"this report"}
    without_3 = {r: s for r, s in prior.items() if r != 3}
    md = "\n".join(claims_section(check_claims([six], None, without_3)))
    assert "- **the ResNet beats the CNNs**: incomplete: row 3 not measured" in md
    with pytest.raises(FerSweepError, match="row 1 is also in this report"):
        check_claims([group("cnn2", [0.5])], None, prior)


def test_the_seven_rows_wherever_each_was_measured() -> None:
    """With earlier runs, the study's seven rows in one table: each row's source, n, mean ± sd,
    interval and Δ; a row measured nowhere says so. Without, no such table (Table 2 has all)."""
    prior = prior_sides(RESULTS / "rows1-4-seeds.csv")
    md = "\n".join(claims_section(check_claims([group("resnet_small", [0.5903])], None, prior)))
    assert "## The study's seven rows, with the earlier runs" in md
    assert "## The study's claims" not in md  # no claim has both its rows yet
    lines = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in lines] == [f"| {r}" for r in range(1, 8)]
    # docs/results.md's rows 1-4, from the CSV's twelve runs
    assert lines[0].startswith("| 1 | cnn2 | Normalize | rows1-4-seeds.csv | 3 | 50.7 ± 0.3% |")
    assert lines[0].endswith("| [49.9, 51.5] | 52.6% | -1.9 |")
    assert lines[4].endswith("| this report | 1 | 59.0% |  | 60.4% | -1.4 |")
    assert "| measured nowhere here |  |  |  | 65.9% |  |" in lines[5]
    twice = [group("resnet", [0.66], label="a"), group("resnet", [0.67], label="b")]
    md = "\n".join(claims_section(check_claims(twice, None, prior)))
    assert "| 6 | resnet | " in md and "| left out (see the note below) |" in md
    assert "row 6 left out: 2 groups" in md
    ours = [group("resnet_small", [0.59]), group("resnet", [0.66])]
    assert "seven rows" not in "\n".join(claims_section(check_claims(ours, PooledSd(0.006, 8))))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("row,seed\n1,0\n", "needs the columns row, seed, test_acc_pct"),
        ("row,seed,test_acc_pct\n9,0,50\n", "is not a new run of a study row"),
        ("row,seed,test_acc_pct\n1,0,50.1\n1,0,50.2\n", "is not a new run of a study row"),
        ("row,seed,test_acc_pct\n1,0,0.501\n1,1,150\n", "line 3: row 1 seed 1 at 150.0 %"),
        ("row,seed,test_acc_pct\n", "no runs in it"),
    ],
)
def test_a_prior_runs_file_it_cannot_use_is_one_clear_error(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "prior.csv"
    path.write_text(text)
    with pytest.raises(FerSweepError, match=says):
        prior_sides(path)
    with pytest.raises(FerSweepError, match="cannot read it"):
        prior_sides(tmp_path / "missing.csv")
