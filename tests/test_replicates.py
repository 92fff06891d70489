"""Replicate groups, intervals and differences: the statistics in-process against scipy's own
tests, then the report over a real sweep of seeds (Table 2 rows 1 and 4, and norm vs aug)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from fer_sweep.tools.replicates import PooledSd, difference, group, pool, pooled, summarize, welch
from tests.conftest import migrated_store, run_cli, tiny_run

TINY = tiny_run(limit_per_class=20, epochs=2)


def test_summary_mean_sd_and_student_t_interval() -> None:
    s = summarize([0.50, 0.52, 0.54])
    assert s.n == 3 and s.mean == pytest.approx(0.52) and s.std == pytest.approx(0.02)
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)  # 4.303 * sd / sqrt(n)
    assert (s.low, s.high) == pytest.approx((0.52 - half, 0.52 + half))
    assert s.contains(0.526) and not s.contains(0.60)


def test_one_run_has_no_spread_and_no_interval() -> None:
    s = summarize([0.5])
    assert (s.n, s.mean, s.std, s.low, s.high) == (1, 0.5, None, None, None)
    assert s.contains(0.5) is None
    assert summarize([]) is None and summarize([math.nan]) is None


def test_welch_difference_matches_scipy() -> None:
    a, b = [0.50, 0.52, 0.51, 0.49], [0.55, 0.58, 0.54]
    d = welch(summarize(a), summarize(b))
    ref = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert d.delta == pytest.approx(sum(b) / 3 - sum(a) / 4)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))
    assert d.excludes_zero is True
    same = welch(summarize([0.5, 0.52]), summarize([0.51, 0.5]))
    assert same.excludes_zero is False
    assert welch(summarize([0.5]), summarize([0.5, 0.6])).low is None


def test_pooled_sd_interval_matches_scipy_equal_variance_t() -> None:
    a, b = [0.50, 0.52, 0.51, 0.49], [0.55, 0.58, 0.54]
    sd = pool([summarize(a), summarize(b)])
    assert sd is not None and sd.df == 5
    d = pooled(summarize(a), summarize(b), sd)
    ref = stats.ttest_ind(b, a, equal_var=True).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))
    assert d.method == f"pooled sd {100 * sd.sd:.2f} pp, 5 df"


def test_single_runs_get_an_interval_only_from_a_pooled_sd() -> None:
    one, other = summarize([0.59]), summarize([0.62])
    assert pool([one, other]) is None  # nobody's spread is known: no pooled sd
    assert difference(one, other).low is None
    # docs/results.md's rule: rows 1-4's sd 0.60 points on 8 df -> two single runs must
    # differ by more than 2.306 * 0.60 * sqrt(2) = 1.96 points
    outside = PooledSd(0.0060, 8)
    d = difference(one, other, outside)
    assert d.high - d.delta == pytest.approx(stats.t.ppf(0.975, 8) * 0.0060 * math.sqrt(2))
    assert d.delta == pytest.approx(0.03) and d.excludes_zero is True
    assert difference(one, summarize([0.60]), outside).excludes_zero is False
    # the outside estimate pools with the replicates present, weighted by degrees of freedom
    three = summarize([0.60, 0.62, 0.64])  # sd 0.02 on 2 df
    both = pool([three, one], outside)
    assert both.df == 10
    assert both.sd == pytest.approx(math.sqrt((8 * 0.006**2 + 2 * 0.02**2) / 10))
    # where both sides have replicates, Welch's interval, with no assumption of equal spreads
    assert difference(three, summarize([0.5, 0.52]), both) == welch(three, summarize([0.5, 0.52]))


def test_groups_keep_first_appearance_order() -> None:
    assert group([3, 1, 4, 1, 5, 9, 2, 6], lambda x: x % 3) == [[3, 9, 6], [1, 4, 1], [5, 2]]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _sweep_and_report(tmp_path: Path, sweep: list[str], log: bool) -> tuple[str, Path]:
    """A tiny multirun of ``sweep`` x trainer.seed=0,1,2, then its report in tmp_path/rep."""
    uri = migrated_store(tmp_path / "r.db")
    proc = run_cli(
        ["-m", *sweep, "trainer.seed=0,1,2", *TINY, f"mlflow.tracking_uri={uri}"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "rep"
    report = ["--tracking-uri", uri, "--out", str(out)] + ([] if log else ["--no-log"])
    proc = run_cli(report, cwd=tmp_path, module="fer_sweep.report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return uri, out


@pytest.mark.slow
def test_table2_rows_with_three_seeds_each(tmp_path: Path, data_overrides: list[str]) -> None:
    uri, out = _sweep_and_report(
        tmp_path, ["experiment=table2", "table2=row1,row4", *data_overrides], log=True
    )
    rows = _read_csv(out / "table2.csv")
    assert [r["model"] for r in rows] == ["cnn2", "cnn3"]
    runs = _read_csv(out / "runs.csv")
    assert len(runs) == 6
    for r in rows:
        assert r["n"] == "3" and r["replicates"] == "trainer.seed 0, 1, 2"
        low, mean, high = (
            float(r[k]) for k in ("test_acc_ci95_low", "test_acc_mean", "test_acc_ci95_high")
        )
        assert low <= mean <= high
        mine = [float(x["test_acc_pct"]) for x in runs if x["model"] == r["model"]]
        assert mean == pytest.approx(sum(mine) / 3)
        assert float(r["test_acc_std"]) == pytest.approx(stats.tstd(mine))
        assert r["study_in_ci95"] == ("yes" if low <= float(r["study_acc_pct"]) <= high else "no")
    md = (out / "table2.md").read_text()
    assert "## Runs" in md and "± " in md
    # The aggregates are on the parent run too.
    client = MlflowClient(uri)
    parent = next(
        r for r in client.search_runs(["1"]) if r.data.tags.get("fer_sweep.role") == "parent"
    )
    assert parent.data.metrics["group1.n"] == 3
    assert parent.data.metrics["jobs"] == 6  # table2=row1,row4 replaces the experiment's 7 rows
    assert parent.data.metrics["group1.test_acc_mean"] == pytest.approx(
        float(rows[0]["test_acc_mean"]) / 100
    )


@pytest.mark.slow
def test_compare_section_for_one_varied_setting(tmp_path: Path, data_overrides: list[str]) -> None:
    uri, out = _sweep_and_report(tmp_path, ["transforms=norm,aug", *data_overrides], log=False)
    (cmp,) = _read_csv(out / "compare.csv")
    assert (cmp["setting"], cmp["a_value"], cmp["b_value"]) == ("transforms", "norm", "aug")
    assert (cmp["n_a"], cmp["n_b"]) == ("3", "3")
    runs = _read_csv(out / "runs.csv")
    acc = {
        t: [float(r["test_acc_pct"]) for r in runs if r["transforms_name"] == t]
        for t in ("norm", "aug")
    }
    ref = stats.ttest_ind(acc["aug"], acc["norm"], equal_var=False)
    assert float(cmp["diff_pp"]) == pytest.approx(sum(acc["aug"]) / 3 - sum(acc["norm"]) / 3)
    if ref.df == ref.df:  # not NaN (identical accuracies on both sides)
        ci = ref.confidence_interval(0.95)
        assert float(cmp["diff_ci95_low"]) == pytest.approx(ci.low)
        assert float(cmp["diff_ci95_high"]) == pytest.approx(ci.high)
    assert "## Differences" in (out / "table2.md").read_text()
    bad = run_cli(
        ["--tracking-uri", uri, "--out", str(out), "--no-log", "--compare", "optimizer.lr"],
        cwd=tmp_path,
        module="fer_sweep.report",
    )
    assert bad.returncode == 2 and "does not vary optimizer.lr" in bad.stderr


@pytest.mark.parametrize(
    ("value", "says"),
    [("0.6", "is not PP@DF"), ("x@8", "is not PP@DF"), ("0@8", "must be > 0"), ("0.6@0", "≥ 1")],
)
def test_report_refuses_a_seed_sd_it_cannot_use(
    value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fer_sweep.tools.report.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--seed-sd", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--seed-sd" in err and says in err and "e.g. 0.60@8" in err
    assert build_parser().parse_args(["--seed-sd", "0.60@8"]).seed_sd == PooledSd(0.006, 8)
