"""The study's claims, checked on a report's runs.

The study states no test of its own; what its Table 2 implies is three claims, each a
difference between two of its rows: the ResNet beats the small CNNs (row 6 vs each of rows
1–4), augmentation helps (row 6 − row 5, +5.5 points; the networks differ too), dropout hurts
(row 7 − row 6, −2.6). A reproduction has to say, for each, whether our runs show the same
difference beyond what a different seed alone could give — so each is stated with a 95 %
interval, never as a bare difference of two numbers.

One rule for every claim, fixed before rows 6–7 had results (docs/results.md): the rows share
one seed-to-seed sd, pooled over every row measured with several seeds (here, in a file of
earlier runs, and ``--seed-sd``), and each difference gets the two-sample t interval of that sd.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats

from fer_sweep.errors import FerSweepError
from fer_sweep.tools.replicates import (
    LEVEL,
    Difference,
    PooledSd,
    Summary,
    pool,
    pooled,
    summarize,
    welch,
)
from fer_sweep.tools.report.runs import Group
from fer_sweep.tools.report.study import STUDY_TABLE2
from fer_sweep.tools.report.tables import difference_ci, difference_fields, interval, mean_sd


@dataclass(frozen=True)
class Claim:
    name: str
    a: int  # the study row it is measured against
    b: int  # the row the study found better (or worse: the study's sign says)
    caveat: str = ""


STUDY_CLAIMS: tuple[Claim, ...] = (
    *(Claim("the ResNet beats the CNNs", r, 6) for r in (1, 2, 3, 4)),
    Claim("augmentation helps", 5, 6, "resnet_small → resnet too"),
    Claim("dropout hurts", 6, 7),
)
_STUDY = {r.row: r for r in STUDY_TABLE2}


@dataclass(frozen=True)
class Side:
    """One study row as measured: its test accuracies and where they come from."""

    row: int
    acc: Summary  # fractions; n counts the runs with a test accuracy
    source: str  # "this report", or the file of earlier runs
    synthetic: bool = False


@dataclass(frozen=True)
class ClaimCheck:
    claim: Claim
    a: Side
    b: Side
    diff: Difference  # of test accuracy, fractions
    sd: PooledSd | None

    @property
    def study_delta(self) -> float:
        """The study's b − a, in points."""
        return _STUDY[self.claim.b].acc - _STUDY[self.claim.a].acc

    @property
    def verdict(self) -> str:
        """Whether our interval shows the study's sign, the opposite, or neither."""
        if self.diff.excludes_zero is None:
            return "no interval"
        if not self.diff.excludes_zero:
            return "not shown"
        return "yes" if (self.diff.delta > 0) == (self.study_delta > 0) else "the opposite"

    @property
    def study_consistent(self) -> bool | None:
        """Could the study's difference come from our rows' distribution? Its rows are single
        runs with (we assume) the same spread, so the margin adds their variance, 2 sd²:
        |ours − study| ≤ t · sd · sqrt(1/n_a + 1/n_b + 2)."""
        if self.sd is None:
            return None
        t = float(stats.t.ppf(0.5 + LEVEL / 2, self.sd.df))
        margin = t * 100 * self.sd.sd * math.sqrt(1 / self.a.acc.n + 1 / self.b.acc.n + 2)
        return abs(100 * self.diff.delta - self.study_delta) <= margin


@dataclass
class Claims:
    checks: list[ClaimCheck]
    sd: PooledSd | None
    pooled_rows: list[str]  # where the pooled sd comes from, e.g. "row 6 (this report)"
    notes: list[str] = field(default_factory=list)  # rows left out, and why
    missing: list[int] = field(default_factory=list)  # study rows measured nowhere
    sides: dict[int, Side] = field(default_factory=dict)  # every study row measured, by row


def report_sides(groups: Sequence[Group]) -> tuple[dict[int, Side], list[str]]:
    """The groups that are a row of the study's Table 2: its network with its transforms (the
    two things its claims are about), preferring the one trained for the study's epochs. A row
    that several groups match equally is left out, with a note: which of them the claim means
    is not ours to pick."""
    sides: dict[int, Side] = {}
    notes: list[str] = []
    for row in STUDY_TABLE2:
        found = [
            g
            for g in groups
            if g.first.study == row and g.first.transforms == row.transforms
            and "test_acc" in g.stats
        ]  # fmt: skip
        recipe = [g for g in found if g.first.epochs == row.epochs]
        pick = recipe if recipe else found
        if len(pick) > 1:
            notes.append(
                f"row {row.row} left out: {len(pick)} groups are its network and transforms "
                f"({', '.join(g.label for g in pick)}); report them apart (--parent)"
            )
        elif pick:
            g = pick[0]
            if g.first.epochs != row.epochs:
                notes.append(
                    f"row {row.row} trained {g.first.epochs} epochs (the study {row.epochs})"
                )
            sides[row.row] = Side(
                row.row, g.stats["test_acc"], "this report", any(r.synthetic for r in g.rows)
            )
    return sides, notes


def prior_sides(path: Path) -> dict[int, Side]:
    """Study rows measured earlier whose runs are not in the store: a CSV with a line per run
    and at least the columns row, seed, test_acc_pct (e.g. results/rows1-4-seeds.csv)."""
    try:
        with path.open(newline="") as f:
            lines = list(csv.DictReader(f))
    except OSError as err:
        raise FerSweepError(f"--prior-runs {path}: cannot read it ({err.strerror}).") from None
    accs: dict[int, dict[str, float]] = {}
    for i, line in enumerate(lines, 2):
        try:
            row, seed = int(line["row"]), line["seed"].strip()
            acc = float(line["test_acc_pct"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise FerSweepError(
                f"--prior-runs {path}, line {i}: needs the columns row, seed, test_acc_pct "
                "(a study row 1-7, a seed, an accuracy in percent)."
            ) from None
        if row not in _STUDY or not 0 < acc <= 100 or seed in accs.get(row, {}):
            raise FerSweepError(
                f"--prior-runs {path}, line {i}: row {row} seed {seed} at {acc} % is not a "
                "new run of a study row (rows 1-7, accuracy in (0, 100], one line per seed)."
            )
        accs.setdefault(row, {})[seed] = acc / 100
    if not accs:
        raise FerSweepError(f"--prior-runs {path}: no runs in it (a header and a line per run).")
    return {
        row: Side(row, summarize(list(seeds.values())), path.name) for row, seeds in accs.items()
    }


def check_claims(
    groups: Sequence[Group], seed_sd: PooledSd | None = None, prior: dict[int, Side] | None = None
) -> Claims:
    """Every claim whose two rows are measured, in the report or in ``prior``."""
    sides, notes = report_sides(groups)
    for row, side in (prior or {}).items():
        if row in sides:
            raise FerSweepError(
                f"--prior-runs: row {row} is also in this report; one place per row "
                "(drop its lines from the file, or leave its sweep out)."
            )
        sides[row] = side
    spread = sorted((r, s) for r, s in sides.items() if s.acc.std is not None)
    sd = pool([s.acc for _, s in spread], seed_sd)
    pooled_rows = [f"row {r} ({s.source}, n={s.acc.n})" for r, s in spread]
    if seed_sd is not None:
        pooled_rows.append(f"--seed-sd {100 * seed_sd.sd:g}@{seed_sd.df}")
    checks = []
    for c in STUDY_CLAIMS:
        if c.a in sides and c.b in sides:
            a, b = sides[c.a].acc, sides[c.b].acc
            checks.append(
                ClaimCheck(c, sides[c.a], sides[c.b], pooled(a, b, sd) if sd else welch(a, b), sd)
            )
    missing = [r.row for r in STUDY_TABLE2 if r.row not in sides]
    return Claims(checks, sd, pooled_rows, notes, missing, sides)


def _overall(name: str, checks: Sequence[ClaimCheck], missing: Sequence[int]) -> str:
    """A claim over several rows (the ResNet vs each CNN) holds when every one of its
    intervals shows it (an intersection-union test: no correction for the four)."""
    wanted = [c for c in STUDY_CLAIMS if c.name == name]
    mine = [c for c in checks if c.claim.name == name]
    absent = sorted({r for c in wanted for r in (c.a, c.b) if r in missing})
    verdicts = [c.verdict for c in mine]
    if "the opposite" in verdicts:
        rows = [f"{c.claim.b} − {c.claim.a}" for c in mine if c.verdict == "the opposite"]
        return f"the opposite is shown ({', '.join(rows)})"
    if absent:
        return f"incomplete: row {', '.join(map(str, absent))} not measured"
    if verdicts and all(v == "yes" for v in verdicts):
        return "shown" + (f", against all {len(mine)} rows" if len(mine) > 1 else "")
    if "no interval" in verdicts:
        return "no interval (single runs only: give --seed-sd or --prior-runs)"
    return "not shown"


def rows_section(claims: Claims) -> list[str]:
    """The study's seven rows as measured, wherever each was (this report, a file of earlier
    runs, nowhere): Table 2 whole in one place. Only when a row comes from elsewhere; without,
    the report's own table has them all."""
    sides = claims.sides
    if all(s.source == "this report" for s in sides.values()):
        return []
    lines = [
        "",
        "## The study's seven rows, with the earlier runs",
        "",
        "| Row | Model | Transformations | From | n | Test acc. | 95 % CI | Study | Δ (pp) |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in STUDY_TABLE2:
        side = sides.get(row.row)
        if side is None:
            left_out = any(n.startswith(f"row {row.row} left out: ") for n in claims.notes)
            where = "left out (see the note below)" if left_out else "measured nowhere here"
            cells = [where, "", "", "", f"{row.acc:.1f}%", ""]
        else:
            acc = side.acc
            cells = [
                side.source,
                str(acc.n),
                mean_sd(acc),
                interval(acc.low, acc.high),
                f"{row.acc:.1f}%",
                f"{100 * acc.mean - row.acc:+.1f}",
            ]
        lines.append(f"| {row.row} | {row.model} | {row.transforms} | {' | '.join(cells)} |")
    lines += [
        "",
        "Test accuracy: the mean ± sample sd of a row's runs (95 % CI from Student's t where it "
        "has several seeds); Δ = ours − study. A row from this report is its group above; "
        "the others are earlier runs (--prior-runs) whose store is not here."
        + "".join(f" Note: {n}." for n in claims.notes if " left out: " in n),
    ]
    return lines


def claims_section(claims: Claims) -> list[str]:
    """The markdown sections: the study's rows where some come from elsewhere, then the claims
    (none when no claim's two rows are both measured)."""
    checks = claims.checks
    if not checks:
        return rows_section(claims)
    synthetic = any(c.a.synthetic or c.b.synthetic for c in checks)
    lines = [
        *rows_section(claims),
        "",
        "## The study's claims"
        + (" (on SYNTHETIC data: a pipeline check, no evidence)" * synthetic),
        "",
        "| Claim | Rows (b − a) | n (a, b) | Study b − a (pp) | Ours b − a (pp) | 95 % CI (pp) "
        "| Shown, as the study? | Study's Δ consistent? |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for c in checks:
        consistent = {True: "yes", False: "no", None: ""}[c.study_consistent]
        name = c.claim.name + (f" ({c.claim.caveat})" if c.claim.caveat else "")
        lines.append(
            f"| {name} | {c.claim.b} − {c.claim.a} | {c.a.acc.n}, {c.b.acc.n} "
            f"| {c.study_delta:+.1f} | {100 * c.diff.delta:+.1f} | {difference_ci(c.diff)} "
            f"| {c.verdict} | {consistent} |"
        )
    lines.append("")
    for name in dict.fromkeys(c.name for c in STUDY_CLAIMS):
        lines.append(f"- **{name}**: {_overall(name, checks, claims.missing)}")
    if claims.sd is not None:
        how = (
            f"a two-sample t interval from one seed-to-seed sd for every row, {claims.sd} "
            f"(from {'; '.join(claims.pooled_rows)}), which assumes the rows' spreads are alike"
        )
    else:
        how = "none: no row has several seeds (give --seed-sd or --prior-runs)"
    prior = sorted({s.source for c in checks for s in (c.a, c.b)} - {"this report"})
    lines += [
        "",
        "The claims the study's Table 2 implies (it states no test of its own), each a "
        f"difference of mean test accuracy between two of its rows. 95 % interval: {how}. "
        "Shown: the interval excludes 0 on the study's side (the opposite: on the other side; "
        "not shown: it contains 0). Study's Δ consistent: the study's difference lies within "
        "t · sd · √(1/n_a + 1/n_b + 2) of ours (its rows being single runs of the same spread)."
        + (f" Rows from {', '.join(prior)}: earlier runs, not in this store." if prior else "")
        + "".join(f" Note: {n}." for n in claims.notes)
        + (
            f" Rows of the study measured nowhere here: {', '.join(map(str, claims.missing))}."
            if claims.missing
            else ""
        ),
    ]
    return lines


def claim_records(claims: Claims) -> list[dict[str, Any]]:
    """claims.csv: one line per claim checked, in percentage points."""
    return [
        {
            "claim": c.claim.name,
            "row_a": c.claim.a,
            "row_b": c.claim.b,
            "source_a": c.a.source,
            "source_b": c.b.source,
            "n_a": c.a.acc.n,
            "n_b": c.b.acc.n,
            "study_diff_pp": round(c.study_delta, 2),
            **difference_fields(c.diff),
            "shown_as_study": c.verdict,
            "study_diff_consistent": c.study_consistent,
        }
        for c in claims.checks
    ]
