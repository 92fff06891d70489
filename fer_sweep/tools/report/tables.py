"""Tables from rows and groups: Table 2 and Table 1 as markdown, the records behind the CSV
files, the runs and differences sections."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fer_sweep.tools.replicates import SEED_KEYS, Difference, Summary
from fer_sweep.tools.report.runs import Comparison, Group, Row, as_int, download
from fer_sweep.tools.report.study import (
    STUDY_CLASS_NAMES,
    STUDY_ENSEMBLE_ACC,
    STUDY_TABLE1,
    StudyRow,
)

# Optional test metrics: a column appears when at least one row has the metric.
OPTIONAL_ACC = (
    ("test_acc_tta", "TTA"),
    ("test_acc_public", "PublicTest"),
    ("test_acc_private", "PrivateTest"),
)


# Formatting


def _pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    if minutes < 60:
        return f"{int(minutes)} min {int(seconds % 60):02d} s"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    header: Sequence[str], body: Sequence[Sequence[Any]], right: Sequence[bool] | None = None
) -> str:
    right = right or [False] * len(header)
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join("---:" if r else "---" for r in right) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _optional_metrics(rows: Sequence[Row]) -> list[tuple[str, str]]:
    return [(m, title) for m, title in OPTIONAL_ACC if any(m in r.metrics for r in rows)]


def run_records(rows: Sequence[Row], keys: Sequence[str]) -> list[dict[str, Any]]:
    """runs.csv: one record per run (accuracies in percent, differences in percentage points)."""
    extra = _optional_metrics(rows)
    records = []
    for i, r in enumerate(rows, 1):
        acc = r.test_acc
        rec: dict[str, Any] = {
            "run": i,
            "run_id": r.run_id,
            "run_name": r.run.info.run_name,
            "status": r.run.info.status,
            "synthetic": str(r.synthetic).lower(),
            "model": r.model,
            "transforms_name": r.transforms_name,
        }
        rec.update({k: r.swept[k] for k in keys if k not in ("model", "transforms")})
        rec.update(
            {
                "epochs": r.epochs,
                "final_train_loss": r.metrics.get("final_train_loss"),
                "test_acc_pct": _pct_value(acc),
                "macro_f1": r.metrics.get("macro_f1"),
            }
        )
        for metric, _ in extra:
            rec[f"{metric}_pct"] = _pct_value(r.metrics.get(metric))
        rec.update(
            {
                "n_params": as_int(r.metrics.get("n_params")),
                "best_epoch": as_int(r.metrics.get("best_epoch")),
                "stopped_epoch": as_int(r.metrics.get("stopped_epoch")),
                "best_val_acc_pct": _pct_value(r.metrics.get("best_val_acc")),
                "precision": r.run.data.params.get("trainer.precision"),
                "wall_seconds": r.wall_seconds,
                "images_per_s": r.images_per_s,
                "resumes": r.resumes,
            }
        )
        records.append(rec)
    return records


def _pct_value(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _summary_fields(prefix: str, s: Summary | None, scale: float = 100.0) -> dict[str, Any]:
    """{prefix}_mean, _std, _ci95_low, _ci95_high (empty where undefined: n = 1)."""

    def val(x: float | None) -> float | None:
        return None if x is None else scale * x

    return {
        f"{prefix}_mean": val(s.mean) if s else None,
        f"{prefix}_std": val(s.std) if s else None,
        f"{prefix}_ci95_low": val(s.low) if s else None,
        f"{prefix}_ci95_high": val(s.high) if s else None,
    }


def table2_records(groups: Sequence[Group], keys: Sequence[str]) -> list[dict[str, Any]]:
    """table2.csv: one record per group of replicates. Accuracies in percent (means over the
    group's runs), differences in percentage points, macro-F1 as a fraction; *_std and the
    interval are empty for a group of one run."""
    rows = [r for g in groups for r in g.rows]
    extra = _optional_metrics(rows)
    records = []
    for i, g in enumerate(groups, 1):
        r, study, acc = g.first, g.first.study, g.stats.get("test_acc")
        statuses = sorted({m.run.info.status for m in g.rows})
        rec: dict[str, Any] = {
            "row": i,
            "n": g.n,
            "run_id": " ".join(m.run_id for m in g.rows),
            "run_name": r.run.info.run_name,
            "status": "/".join(statuses),
            "synthetic": str(any(m.synthetic for m in g.rows)).lower(),
            "model": r.model,
            "transforms_name": r.transforms_name,
        }
        rec.update({k: g.settings[k] for k in keys if k not in ("model", "transforms")})
        rec.update(
            {
                "replicates": g.seeds_text(),
                "network": r.network,
                "transformations": r.transforms,
                "epochs": r.epochs,
                "final_train_loss": _mean([m.metrics.get("final_train_loss") for m in g.rows]),
                "test_acc_pct": _pct_value(acc.mean) if acc else None,
                **_summary_fields("test_acc", acc),
                "study_row": study.row if study else None,
                "study_network": study.network if study else None,
                "study_transformations": study.transforms if study else None,
                "study_epochs": study.epochs if study else None,
                "study_train_loss": study.train_loss if study else None,
                "study_acc_pct": study.acc if study else None,
                "study_in_ci95": _yes_no(acc.contains(study.acc / 100)) if study and acc else None,
                "diff_pp": (100 * acc.mean - study.acc) if study and acc else None,
            }
        )
        rec.update(_summary_fields("macro_f1", g.stats.get("macro_f1"), scale=1.0))
        for metric, _ in extra:
            summary = g.stats.get(metric)
            rec[f"{metric}_pct"] = _pct_value(summary.mean) if summary else None
            rec.update(_summary_fields(metric, summary))
        best_epochs = [as_int(m.metrics.get("best_epoch")) for m in g.rows]
        rec.update(
            {
                "n_params": as_int(r.metrics.get("n_params")),
                "best_epoch": as_int(_median([b for b in best_epochs if b is not None])),
                "best_val_acc_pct": _pct_value(
                    _mean([m.metrics.get("best_val_acc") for m in g.rows])
                ),
                "wall_seconds": _mean([m.wall_seconds for m in g.rows]),
            }
        )
        records.append(rec)
    return records


def difference_fields(d: Difference) -> dict[str, Any]:
    """A difference's CSV fields, in percentage points, and where its interval came from."""
    return {
        "diff_pp": 100 * d.delta,
        "diff_ci95_low": None if d.low is None else 100 * d.low,
        "diff_ci95_high": None if d.high is None else 100 * d.high,
        "df": d.df,
        "interval_from": d.method,
    }


def difference_ci(d: Difference) -> str:
    """ "[+0.9, +4.8]" in points; '' without an interval."""
    if d.low is None or d.high is None:
        return ""
    return f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}]"


def comparison_records(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    """compare.csv: b − a in percentage points with its 95 % interval (Welch's, or from the
    pooled sd: interval_from)."""
    return [
        {
            "setting": c.key,
            "a": c.a.label,
            "b": c.b.label,
            "a_value": c.a.settings[c.key],
            "b_value": c.b.settings[c.key],
            "n_a": c.a.n,
            "n_b": c.b.n,
            "a_test_acc_mean": 100 * c.a.stats["test_acc"].mean,
            "b_test_acc_mean": 100 * c.b.stats["test_acc"].mean,
            **difference_fields(c.diff),
            "excludes_zero": _yes_no(c.diff.excludes_zero),
            "also_differs": " ".join(c.others),
        }
        for c in comparisons
    ]


def _yes_no(flag: bool | None) -> str | None:
    return None if flag is None else ("yes" if flag else "no")


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None


def _median(values: Sequence[float]) -> float | None:
    xs = sorted(values)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def mean_sd(s: Summary | None, digits: int = 1) -> str:
    if s is None:
        return ""
    if s.std is None:
        return _pct(s.mean, digits)
    return f"{100 * s.mean:.{digits}f} ± {100 * s.std:.{digits}f}%"


def interval(low: float | None, high: float | None, digits: int = 1) -> str:
    if low is None or high is None:
        return ""
    return f"[{100 * low:.{digits}f}, {100 * high:.{digits}f}]"


Column = tuple[str, bool, Callable[[int, "Group"], Any]]  # title, right-aligned, cell


def _group_columns(
    keys: Sequence[str], extra: Sequence[tuple[str, str]], tta: set[str]
) -> list[Column]:
    """The main table's columns: one row per group of replicates.

    Long by its list of columns (a declaration, one entry each), not by logic."""

    def study(g: Group) -> StudyRow | None:
        return g.first.study

    def acc(g: Group) -> Summary | None:
        return g.stats.get("test_acc")

    def diff(g: Group) -> str:
        s, a = study(g), acc(g)
        return f"{100 * a.mean - s.acc:+.1f}" if s and a else ""

    def inside(g: Group) -> str:
        s, a = study(g), acc(g)
        return (_yes_no(a.contains(s.acc / 100)) or "") if s and a else ""

    def status(g: Group) -> str:
        other = {m.run.info.status for m in g.rows} - {"FINISHED"}
        return f" ({'/'.join(sorted(other))})" if other else ""

    def run(g: Group) -> str:
        r = g.first
        if g.n == 1:
            return f"`{r.run_id[:8]}` {r.run.info.run_name or ''}"
        return f"{g.n} runs: {g.seeds_text() or 'same seeds'}"

    def loss(g: Group) -> str:
        value = _mean([m.metrics.get("final_train_loss") for m in g.rows])
        return "" if value is None else f"{value:.6f}"

    def params(g: Group) -> str:
        n = as_int(g.first.metrics.get("n_params"))
        return "" if n is None else f"{n:,}"

    def metric_column(m: str, title: str) -> Column:
        if m == "test_acc_tta" and tta:
            title = f"{title} ({'/'.join(sorted(tta))})"
        return (title, True, lambda i, g: mean_sd(g.stats.get(m)))

    def key_column(k: str) -> Column:
        return (k, False, lambda i, g: g.settings[k])

    return [
        ("#", True, lambda i, g: i),
        *[key_column(k) for k in keys],
        ("Network configuration", False, lambda i, g: g.first.network),
        ("Transformations", False, lambda i, g: g.first.transforms),
        ("Epochs", True, lambda i, g: g.first.epochs or ""),
        ("Training loss", True, lambda i, g: loss(g)),
        ("n", True, lambda i, g: g.n),
        ("Test acc.", True, lambda i, g: mean_sd(acc(g)) + status(g)),
        ("95 % CI", True, lambda i, g: interval(acc(g).low, acc(g).high) if acc(g) else ""),
        (
            "Study",
            True,
            lambda i, g: f"{study(g).acc:.1f}% (row {study(g).row})" if study(g) else "—",
        ),
        ("Study in CI", False, lambda i, g: inside(g)),
        ("Δ (pp)", True, lambda i, g: diff(g)),
        *[metric_column(m, t) for m, t in extra],
        ("Params", True, lambda i, g: params(g)),
        (
            "Best epoch",
            True,
            lambda i, g: ", ".join(str(as_int(m.metrics.get("best_epoch")) or "") for m in g.rows),
        ),
        ("Wall time", True, lambda i, g: _duration(_mean([m.wall_seconds for m in g.rows]))),
        (
            "Data",
            False,
            lambda i, g: "**SYNTHETIC**" if any(m.synthetic for m in g.rows) else "fer2013",
        ),
        ("Run", False, lambda i, g: run(g)),
    ]


def _table(columns: Sequence[Column], items: Sequence[Any]) -> str:
    return markdown_table(
        [c[0] for c in columns],
        [[c[2](i, item) for c in columns] for i, item in enumerate(items, 1)],
        [c[1] for c in columns],
    )


GROUPS_NOTE = (
    "Test acc.: the best-validation-epoch weights on the test split; a row with n > 1 holds "
    "runs that differ only in their seeds (mean ± sample sd, 95 % CI from Student's t with "
    "n − 1 degrees of freedom; none for n = 1). Study: the reference study's Table 2 accuracy "
    "for the same model (matched by model name; other runs have none); Study in CI: whether it "
    "lies inside our interval; Δ = ours − study, in percentage points. Training loss: the last "
    "epoch's mean training loss. Wall time: training time per run."
)


def _differences_section(comparisons: Sequence[Comparison]) -> list[str]:
    def real(c: Comparison) -> str:
        return {True: "yes", False: "not shown"}.get(
            c.diff.excludes_zero, "needs replicates (or --seed-sd)"
        )

    columns: list[Column] = [
        ("Setting", False, lambda i, c: c.key),
        ("a", False, lambda i, c: c.a.settings[c.key]),
        ("b", False, lambda i, c: c.b.settings[c.key]),
        ("n (a, b)", True, lambda i, c: f"{c.a.n}, {c.b.n}"),
        ("Test acc. a", True, lambda i, c: _pct(c.a.stats["test_acc"].mean)),
        ("Test acc. b", True, lambda i, c: _pct(c.b.stats["test_acc"].mean)),
        ("b − a (pp)", True, lambda i, c: f"{100 * c.diff.delta:+.1f}"),
        ("95 % CI (pp)", True, lambda i, c: difference_ci(c.diff)),
        ("Interval from", False, lambda i, c: c.diff.method or "—"),
        ("Real?", False, lambda i, c: real(c)),
        ("Also differs", False, lambda i, c: " ".join(c.others) or "—"),
    ]
    return [
        "",
        "## Differences (b − a, mean test accuracy, 95 % CI)",
        "",
        _table(columns, comparisons),
        "",
        "Real?: yes when the interval excludes 0 (the difference is larger than the "
        "seed-to-seed spread can explain at the 95 % level). Interval from: Welch's where "
        "both sides have several seeds; else the seed-to-seed sd pooled over every "
        "replicated group here (and --seed-sd), which assumes the groups' spreads are alike.",
    ]


def _runs_section(groups: Sequence[Group]) -> list[str]:
    runs = [(i, r) for i, g in enumerate(groups, 1) for r in g.rows]
    columns: list[Column] = [
        ("Row", True, lambda _, ir: ir[0]),
        ("Run", False, lambda _, ir: f"`{ir[1].run_id[:8]}` {ir[1].run.info.run_name or ''}"),
        *[(k, True, lambda _, ir, k=k: ir[1].run.data.params.get(k, "")) for k in SEED_KEYS],
        ("Test acc.", True, lambda _, ir: _pct(ir[1].test_acc)),
        ("Best epoch", True, lambda _, ir: as_int(ir[1].metrics.get("best_epoch")) or ""),
        ("Stopped", True, lambda _, ir: as_int(ir[1].metrics.get("stopped_epoch")) or ""),
        ("Status", False, lambda _, ir: ir[1].run.info.status),
        ("Wall time", True, lambda _, ir: _duration(ir[1].wall_seconds)),
        ("Images/s", True, lambda _, ir: _rate(ir[1].images_per_s)),
        ("Resumes", True, lambda _, ir: ir[1].resumes),
    ]
    note = (
        "Wall time: the run's training across all its resumes; Images/s: training images x "
        "epochs / that time (validation, checkpoints and logging included)."
    )
    return ["", "## Runs", "", _table(columns, runs), "", note]


def _rate(per_s: float | None) -> str:
    return "" if per_s is None else f"{per_s:,.0f}"


def _ensembles_section(ensembles: Sequence[Run]) -> list[str]:
    def metric(e: Run, key: str) -> float | None:
        return e.data.metrics.get(key)

    columns: list[Column] = [
        ("Run", False, lambda i, e: f"`{e.info.run_id[:8]}` {e.info.run_name}"),
        ("Chosen by", False, lambda i, e: e.data.params.get("ensemble.by", "")),
        ("Members", True, lambda i, e: as_int(metric(e, "n_members")) or ""),
        ("Test acc.", True, lambda i, e: _pct(metric(e, "test_acc"))),
        (
            "Test NLL",
            True,
            lambda i, e: "" if metric(e, "test_loss") is None else f"{metric(e, 'test_loss'):.4f}",
        ),
        ("Study's ensemble", True, lambda i, e: f"{STUDY_ENSEMBLE_ACC:.1f}%"),
        (
            "Δ (pp)",
            True,
            lambda i, e: (
                ""
                if metric(e, "test_acc") is None
                else f"{100 * metric(e, 'test_acc') - STUDY_ENSEMBLE_ACC:+.1f}"
            ),
        ),
    ]
    return [
        "",
        "## Ensembles of this sweep (python -m fer_sweep.ensemble)",
        "",
        _table(columns, ensembles),
        "",
        "The study quotes an ensemble of other authors' networks (its Table 3, [2]) at "
        "75.8%, not an ensemble of its Table 2.",
    ]


def table2_markdown(
    groups: Sequence[Group],
    keys: Sequence[str],
    source: str,
    ensembles: Sequence[Run] = (),
    comparisons: Sequence[Comparison] = (),
    claims: Sequence[str] = (),
) -> str:
    """table2.md: where its runs come from (``source``), the groups' table, then the
    differences, the study's claims (``claims``: that section's lines), the runs of replicated
    groups and the sweep's ensembles, where there are any."""
    rows = [r for g in groups for r in g.rows]
    tta = {r.run.data.params.get("eval.tta") for r in rows} - {None, "none"}
    replicated = any(g.n > 1 for g in groups)
    runs = f"{len(rows)} run{'' if len(rows) == 1 else 's'}"
    runs += f" in {len(groups)} groups" if replicated else ""
    out = [f"# Table 2: network configurations and their performance ({runs})", ""]
    n_syn = sum(r.synthetic for r in rows)
    if n_syn:
        out += [
            f"> **Warning: {n_syn} of {len(rows)} runs were trained on fer_sweep's "
            "SYNTHETIC faces (data=synthetic)**: a pipeline check, never a FER2013 result; "
            "their accuracies are not comparable with the study's.",
            "",
        ]
    out += [
        source,
        "",
        _table(_group_columns(keys, _optional_metrics(rows), tta), groups),
        "",
        GROUPS_NOTE,
    ]
    if comparisons:
        out += _differences_section(comparisons)
    out += claims
    if replicated or any(r.resumes for r in rows):  # per run: seeds, training speed, resumes
        out += _runs_section(groups)
    if ensembles:
        out += _ensembles_section(ensembles)
    return "\n".join(out) + "\n"


def logged_counts(client: MlflowClient, runs: Sequence[Run], tmp: Path) -> list[tuple[str, dict]]:
    """(run name, class counts per split) of each run that logged a data.json artifact."""
    out = []
    for run in runs:
        path = download(client, run.info.run_id, "data.json", tmp / run.info.run_id)
        if path is not None:
            counts = json.loads(path.read_text()).get("counts", {})
            out.append((run.info.run_name or run.info.run_id, counts))
    return out


def class_counts(
    named: Sequence[tuple[str, dict[str, dict[str, int]]]],
) -> list[tuple[dict[str, dict[str, int]], list[str]]]:
    """Distinct (counts per split, run names) among (run name, counts) pairs."""
    groups: list[tuple[dict[str, dict[str, int]], list[str]]] = []
    for name, counts in named:
        for known, names in groups:
            if known == counts:
                names.append(name)
                break
        else:
            groups.append((counts, [name]))
    return groups


def table1_markdown(
    groups: Sequence[tuple[dict[str, dict[str, int]], list[str]]], synthetic: bool
) -> str:
    out = ["# Table 1: class counts of the splits used, beside the study's", ""]
    if synthetic:
        out += [
            "> **Warning: these runs used fer_sweep's SYNTHETIC faces (data=synthetic)**, "
            "not FER2013.",
            "",
        ]
    if not groups:
        out += ["No run here logged its class counts (data.json).", ""]
    header = [
        "Emotion",
        "Train",
        "Val",
        "Test",
        "Total",
        "Study train",
        "Study val",
        "Study test",
        "Study total",
    ]
    right = [False] + [True] * 8
    for counts, names in groups:
        classes = list(dict.fromkeys(c for split in counts.values() for c in split))
        classes.sort(key=lambda c: list(STUDY_TABLE1).index(c) if c in STUDY_TABLE1 else 99)
        body, tot, stot = [], [0, 0, 0], [0, 0, 0]
        for c in classes:
            ours = [int(counts.get(s, {}).get(c, 0)) for s in ("train", "val", "test")]
            study = STUDY_TABLE1.get(c)
            tot = [a + b for a, b in zip(tot, ours, strict=True)]
            if study:
                stot = [a + b for a, b in zip(stot, study, strict=True)]
            body.append(
                [
                    STUDY_CLASS_NAMES.get(c, c),
                    *ours,
                    sum(ours),
                    *(study or ("", "", "")),
                    sum(study) if study else "",
                ]
            )
        body.append(["**Total**", *tot, sum(tot), *stot, sum(stot)])
        if len(groups) > 1:
            out += [f"Runs: {', '.join(names)}", ""]
        out += [markdown_table(header, body, right), ""]
    out += [
        "Ours: the train / validation / test images each run actually used (after "
        "data.limit_per_class and the stratified validation hold-out). Study: its Table 1."
    ]
    return "\n".join(out) + "\n"


def write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in rec.items()} for rec in records)
    path.write_text(buf.getvalue())
