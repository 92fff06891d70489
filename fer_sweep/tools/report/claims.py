"""The study's claims, checked on a report's runs.

The study states no test of its own; what its Table 2 implies is three claims, each a
difference between two of its rows: the ResNet beats the small CNNs (row 6 vs rows 1–4),
augmentation helps (row 6 − row 5, +5.5 points), dropout hurts (row 7 − row 6, −2.6). A
reproduction has to say, for each, whether our runs show the same difference beyond what a
different seed alone could give — so each is stated with its 95 % interval, never as a bare
difference of two numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fer_sweep.tools.replicates import Difference, PooledSd, difference
from fer_sweep.tools.report.runs import Group
from fer_sweep.tools.report.study import STUDY_TABLE2
from fer_sweep.tools.report.tables import difference_ci, difference_fields


@dataclass(frozen=True)
class Claim:
    text: str
    a: int  # the study row it is measured against
    b: int  # the study row that should be better (or worse: the study's sign says)


STUDY_CLAIMS: tuple[Claim, ...] = (
    *(Claim(f"the ResNet beats the CNNs (row {r})", r, 6) for r in (1, 2, 3, 4)),
    Claim("augmentation helps (also: resnet_small → resnet)", 5, 6),
    Claim("dropout hurts", 6, 7),
)
_STUDY_ACC = {r.row: r.acc for r in STUDY_TABLE2}


@dataclass(frozen=True)
class ClaimCheck:
    claim: Claim
    a: Group
    b: Group
    diff: Difference  # of test accuracy, fractions

    @property
    def study_delta(self) -> float:
        """The study's b − a, in points."""
        return _STUDY_ACC[self.claim.b] - _STUDY_ACC[self.claim.a]

    @property
    def verdict(self) -> str:
        """Whether our interval shows the study's sign, the opposite, or neither."""
        if self.diff.excludes_zero is None:
            return "no interval"
        if not self.diff.excludes_zero:
            return "not shown"
        same = (self.diff.delta > 0) == (self.study_delta > 0)
        return "yes" if same else "the opposite"

    @property
    def study_in_interval(self) -> bool | None:
        if self.diff.low is None or self.diff.high is None:
            return None
        return 100 * self.diff.low <= self.study_delta <= 100 * self.diff.high


def study_rows(groups: Sequence[Group]) -> dict[int, Group]:
    """The groups that are a row of the study's Table 2: its network and its transforms, the
    two things its claims are about (the table above shows each row's epochs). A row that
    several groups match (e.g. a learning rate swept over it) is left out: which of them the
    claim means is not ours to pick."""
    matches: dict[int, list[Group]] = {}
    for g in groups:
        r = g.first
        if r.study and r.transforms == r.study.transforms:
            if "test_acc" in g.stats:
                matches.setdefault(r.study.row, []).append(g)
    return {row: gs[0] for row, gs in matches.items() if len(gs) == 1}


def check_claims(groups: Sequence[Group], sd: PooledSd | None) -> list[ClaimCheck]:
    """Every claim whose two rows are in the report."""
    rows = study_rows(groups)
    return [
        ClaimCheck(
            c,
            rows[c.a],
            rows[c.b],
            difference(rows[c.a].stats["test_acc"], rows[c.b].stats["test_acc"], sd),
        )
        for c in STUDY_CLAIMS
        if c.a in rows and c.b in rows
    ]


def claims_section(checks: Sequence[ClaimCheck], groups: Sequence[Group]) -> list[str]:
    """The markdown section; empty when no claim's two rows are both in the report."""
    if not checks:
        return []
    synthetic = any(r.synthetic for c in checks for r in (*c.a.rows, *c.b.rows))
    lines = [
        "",
        "## The study's claims"
        + (" (on SYNTHETIC data: a pipeline check, no evidence)" * synthetic),
        "",
        "| Claim | Rows (b − a) | n (a, b) | Study b − a (pp) | Ours b − a (pp) | 95 % CI (pp) "
        "| Interval from | Shown, as the study? | Study's Δ in CI |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for c in checks:
        inside = {True: "yes", False: "no", None: ""}[c.study_in_interval]
        lines.append(
            f"| {c.claim.text} | {c.claim.b} − {c.claim.a} | {c.a.n}, {c.b.n} "
            f"| {c.study_delta:+.1f} | {100 * c.diff.delta:+.1f} | {difference_ci(c.diff)} "
            f"| {c.diff.method or '—'} "
            f"| {c.verdict} | {inside} |"
        )
    present = sorted(study_rows(groups))
    missing = [r.row for r in STUDY_TABLE2 if r.row not in present]
    lines += [
        "",
        "The claims that the study's Table 2 implies (it states no test of its own), each a "
        "difference of mean test accuracy between two of its rows, with a 95 % interval: "
        "Welch's where both rows have several seeds, else a two-sample t interval from the "
        "seed-to-seed sd pooled over every replicated row here (and `--seed-sd`, an outside "
        "estimate), which assumes the rows' spreads are alike. Shown: the interval excludes 0 "
        "on the study's side (the opposite: on the other side; not shown: it contains 0)."
        + (
            f" Rows of the study not in this report: {', '.join(map(str, missing))}."
            if missing
            else ""
        ),
    ]
    return lines


def claim_records(checks: Sequence[ClaimCheck]) -> list[dict[str, Any]]:
    """claims.csv: one line per claim checked, in percentage points."""
    return [
        {
            "claim": c.claim.text,
            "row_a": c.claim.a,
            "row_b": c.claim.b,
            "n_a": c.a.n,
            "n_b": c.b.n,
            "study_diff_pp": round(c.study_delta, 2),
            **difference_fields(c.diff),
            "shown_as_study": c.verdict,
            "study_diff_in_ci": c.study_in_interval,
        }
        for c in checks
    ]
