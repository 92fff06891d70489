"""``python -m fer_sweep.report``: write the tables and figures for a sweep's parent run to a
folder and log them back on the parent."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fer_sweep.errors import FerSweepError
from fer_sweep.sweep import store
from fer_sweep.sweep.job import TRIAL_STATE
from fer_sweep.tools.cli import add_store_args, run_command
from fer_sweep.tools.replicates import PooledSd, pool
from fer_sweep.tools.report import bundles, export, search, verify
from fer_sweep.tools.report.claims import (
    Side,
    check_claims,
    claim_records,
    claims_section,
    prior_sides,
)
from fer_sweep.tools.report.runs import (
    Group,
    build_groups,
    build_rows,
    children,
    compare_groups,
    find_parent,
    superseded,
)
from fer_sweep.tools.report.search import is_search
from fer_sweep.tools.report.tables import (
    class_counts,
    comparison_records,
    logged_counts,
    run_records,
    table1_markdown,
    table2_markdown,
    table2_records,
    write_csv,
)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_report(
    client: MlflowClient | None,
    parent: Run | None,
    out: Path,
    *,
    uri: str = "",
    experiment: str = "",
    log: bool = True,
    compare: str | None = None,
    more_parents: Sequence[Run] = (),
    seed_sd: PooledSd | None = None,
    prior: dict[int, Side] | None = None,
    exported: Sequence[bundles.Bundle] = (),
) -> tuple[list[Group], bool]:
    """Write table2.md/.csv, runs.csv, compare.csv (when groups can be compared), claims.csv
    (when the study's claims can be checked), table1.md, accuracy.png, curves.png (and, for a
    search, trials.md/.csv and its figures) to ``out``; log them and the groups' aggregates on
    the parent run (files under report/), unless runs from bundles joined; returns the groups
    and whether it logged. ``more_parents``: further sweeps whose jobs join the report (e.g.
    the same rows trained in another precision), which is then logged on the first parent only.
    ``seed_sd``: an outside estimate of the seed-to-seed sd, pooled with the groups' own;
    ``prior``: study rows measured earlier (--prior-runs), for the study's claims.
    ``exported``: bundles (--bundles) whose runs join as rows, unless the store's runs hold the
    same run; with no ``parent`` (and no ``client``) the report is theirs alone.

    Long by the number of files it writes, in order."""
    from fer_sweep.core import figures

    runs: list[Run] = []
    searched = []
    if parent is not None and client is not None:
        runs = children(client, parent.info.experiment_id, parent.info.run_id)
        if is_search(parent):  # its trials, best trial and Optuna's figures, pruned ones included
            searched = search.write_search(client, parent, runs, _mkdir(out))
        for other in more_parents:
            runs += children(client, other.info.experiment_id, other.info.run_id)
    stored = {r.info.run_id for r in runs}
    from_files = {b.run.info.run_id: b for b in exported if b.run.info.run_id not in stored}
    runs += [b.run for b in from_files.values()]
    pruned = {r.info.run_id for r in runs if r.data.tags.get(TRIAL_STATE) == "PRUNED"}
    runs = [r for r in runs if r.info.run_id not in pruned]  # no test metrics
    from_files = {i: b for i, b in from_files.items() if i not in pruned}
    retrained = superseded(runs)  # no replicates of the runs that replaced them
    runs = [r for r in runs if r not in {dead for dead, _ in retrained}]
    if not runs:
        raise FerSweepError(
            f"parent run {parent.info.run_id if parent else '?'} has no child job runs (yet); "
            "pick another with --parent RUN_ID."
        )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        configs = {i: b.config for i, b in from_files.items()}
        rows, keys = build_rows(client, runs, tmp, configs)
        in_store = [r.run for r in rows if r.run_id not in from_files]
        named = logged_counts(client, in_store, tmp) if client is not None else []
    for r in rows:
        bundle = from_files.get(r.run_id)
        if bundle is not None and bundle.counts:
            named.append((r.run.info.run_name or r.run_id, bundle.counts))
    counts = class_counts(named)
    groups, group_keys = build_groups(rows, keys)
    sd = pool([g.stats["test_acc"] for g in groups if "test_acc" in g.stats], seed_sd)
    comparisons = compare_groups(groups, group_keys, compare, sd)  # a bad --compare fails first
    claims = check_claims(groups, seed_sd, prior)
    out.mkdir(parents=True, exist_ok=True)
    ensembles = []
    if parent is not None and client is not None:
        ensembles = children(client, parent.info.experiment_id, parent.info.run_id, "ensemble")
    (out / "table2.md").write_text(
        table2_markdown(
            groups,
            group_keys,
            _source(parent, uri, experiment, list(from_files.values()), retrained),
            ensembles,
            comparisons,
            claims_section(claims),
        )
    )
    write_csv(out / "table2.csv", table2_records(groups, group_keys))
    write_csv(out / "runs.csv", run_records(rows, keys))
    if comparisons:
        write_csv(out / "compare.csv", comparison_records(comparisons))
    if claims.checks:
        write_csv(out / "claims.csv", claim_records(claims))
    (out / "table1.md").write_text(table1_markdown(counts, any(r.synthetic for r in rows)))
    if searched:
        print((out / "trials.md").read_text())

    syn = " (SYNTHETIC data)" if any(r.synthetic for r in rows) else ""
    accs = [g.stats.get("test_acc") for g in groups]
    figures.accuracy_bars(
        [g.label for g in groups],
        [math.nan if a is None else a.mean for a in accs],
        [g.first.study.acc / 100 if g.first.study else None for g in groups],
        out / "accuracy.png",
        title=f"Test accuracy: ours vs the study{syn}",
        intervals=[(a.low, a.high) if a and a.low is not None else None for a in accs],
    )
    curves = {}
    for r in rows:
        if r.run_id in from_files:
            values = from_files[r.run_id].history.get("val_acc", [])
        else:
            hist = sorted(client.get_metric_history(r.run_id, "val_acc"), key=lambda m: m.step)
            values = [m.value for m in hist]
        label = r.label if len(groups) == len(rows) else f"{r.label} ({r.run_id[:6]})"
        curves[label] = [100 * v for v in values]
    figures.overlay_curves(
        curves,
        out / "curves.png",
        ylabel="validation accuracy (%)",
        title=f"Validation accuracy per epoch{syn}",
    )
    # a report that holds runs from bundles is not the sweep's own: nothing logged on it
    logged = log and parent is not None and client is not None and not from_files
    if logged:
        client.log_artifacts(parent.info.run_id, str(out), artifact_path="report")
        _log_aggregates(client, parent.info.run_id, groups)
    return groups, logged


def _source(
    parent: Run | None,
    uri: str,
    experiment: str,
    exported: Sequence[bundles.Bundle],
    retrained: Sequence[tuple[Run, Run]] = (),
) -> str:
    """table2.md's line on where its runs come from (a sweep of a store, bundles, or both) and
    the runs left out because they were trained again."""
    parts = []
    if parent is not None:
        overrides = parent.data.tags.get("fer_sweep.overrides", "")
        launched = f", launched with `{overrides}`" if overrides else ""
        parts.append(
            f"Sweep: parent run `{parent.info.run_id}` ({parent.info.run_name}) of experiment "
            f"`{experiment}` in `{uri}`{launched}."
        )
    if exported:
        places = sorted({str(b.folder.parent) for b in exported})
        n = len(exported)
        parts.append(
            f"{'Also' if parent else 'Runs:'} {n} exported run{'' if n == 1 else 's'} "
            f"(bundles of `python -m fer_sweep.report --export`, no MLflow store) from "
            + ", ".join(f"`{p}`" for p in places)
            + "."
        )
    if retrained:
        again = ", ".join(
            f"`{dead.info.run_id[:8]}` ({dead.info.status}, trained again as "
            f"`{done.info.run_id[:8]}`)"
            for dead, done in retrained
        )
        parts.append(f"Left out, as runs that did not finish and were trained again: {again}.")
    return " ".join(parts)


def _log_aggregates(client: MlflowClient, parent_id: str, groups: Sequence[Group]) -> None:
    """group<i>.<metric>_mean/_std/_ci95_low/_ci95_high and group<i>.n on the parent run, with
    the group's label as the tag fer_sweep.group<i>: the report's numbers, searchable."""
    from fer_sweep.sweep import tracking

    metrics: dict[str, float] = {}
    tags = {}
    for i, g in enumerate(groups, 1):
        tags[f"fer_sweep.group{i}"] = g.label[:5000]
        metrics[f"group{i}.n"] = g.n
        for metric, summary in g.stats.items():
            for field_name, value in (
                ("mean", summary.mean),
                ("std", summary.std),
                ("ci95_low", summary.low),
                ("ci95_high", summary.high),
            ):
                if value is not None:
                    metrics[f"group{i}.{metric}_{field_name}"] = value
    tracking.log_metrics(client, parent_id, metrics)
    tracking.set_tags(client, parent_id, tags)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fer_sweep.report",
        description="Rebuild the study's Table 2 (one row per child run of a sweep), Table 1 "
        "(class counts of the splits used) and comparison figures from MLflow; "
        "write them to --out and log them on the sweep's parent run (report/).",
        epilog="Example: python -m fer_sweep experiment=table2 && python -m fer_sweep.report",
    )
    add_store_args(p, "the sweep logged to")
    p.add_argument(
        "--parent",
        metavar="RUN_ID",
        action="append",
        help="the sweep's parent run (default: the latest parent in the experiment); "
        "repeat it to report several sweeps' jobs together (logged on the first)",
    )
    p.add_argument(
        "--out", metavar="DIR", type=Path, help="output folder (default: reports/<parent run id>)"
    )
    p.add_argument(
        "--compare",
        metavar="SETTING",
        help="state the difference of mean test accuracy (Welch 95 %% CI) between "
        "every two groups that differ in this setting, e.g. transforms or "
        "model (default: pairs that differ in exactly one setting)",
    )
    p.add_argument(
        "--seed-sd",
        metavar="PP@DF",
        type=_seed_sd,
        help="a seed-to-seed sd of test accuracy measured elsewhere, in percentage points, "
        "with its degrees of freedom (e.g. 0.60@8: Table 2 rows 1-4, 3 seeds each; "
        "docs/results.md); pooled with this report's replicates, it gives a difference an "
        "interval where a side has one run",
    )
    p.add_argument(
        "--prior-runs",
        metavar="CSV",
        type=Path,
        help="study rows measured earlier whose runs are not in this store (columns row, "
        "seed, test_acc_pct; e.g. results/rows1-4-seeds.csv): they join the section on the "
        "study's claims and the seed-to-seed sd its intervals use",
    )
    p.add_argument(
        "--bundles",
        metavar="DIR",
        type=Path,
        action="append",
        help="runs exported with --export (e.g. results/) join the report as rows, beside "
        "the store's (a run in both is taken from the store; a report holding runs from "
        "bundles is not logged on the parent); repeatable. Without --parent the report is "
        "theirs alone: no store is opened, --tracking-uri and --experiment are not read "
        "(--out, default reports/bundles)",
    )
    p.add_argument(
        "--export",
        metavar="DIR",
        type=Path,
        help="instead of the tables: write each finished run of the sweep(s) as a folder "
        "under DIR that can be checked without the store (config.yaml, history.csv, "
        "metrics.json, predictions.csv: every test image's path, true and predicted class)",
    )
    p.add_argument(
        "--verify",
        metavar="DIR",
        type=Path,
        help="instead of the tables, and without any store: check the bundles under DIR "
        "(--export's) from their files: the test accuracy from the predictions, epochs 1..N "
        "once each, the learning rate of every epoch replayed; exit 1 if a check fails",
    )
    p.add_argument(
        "--data-root",
        metavar="ROOT",
        type=Path,
        help="with --verify: also check that the predictions are the test images of this "
        "FER2013 copy (each path a file, every image once)",
    )
    p.add_argument(
        "--no-log",
        action="store_true",
        help="only write the files; do not log them on the parent run",
    )
    return p


def _seed_sd(text: str) -> PooledSd:
    """argparse type of --seed-sd: "0.60@8" -> PooledSd(0.006, 8); its message on bad input."""
    sd, _, df = text.partition("@")
    try:
        value, dof = float(sd), int(df)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not PP@DF: give the sd in points and its degrees of freedom, e.g. 0.60@8"
        ) from None
    if not (math.isfinite(value) and value > 0 and dof > 0):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the sd must be > 0 points and the degrees of freedom ≥ 1, e.g. 0.60@8"
        )
    return PooledSd(value / 100, dof)


def _report(args: argparse.Namespace) -> int:
    if args.verify is not None:
        return verify.verify(args.verify, args.data_root)
    if args.data_root is not None:
        raise FerSweepError("--data-root goes with --verify DIR (the bundles to check).")
    if args.bundles and args.export is not None:
        raise FerSweepError("--bundles goes with the tables, not --export (bundles are exported).")
    prior = prior_sides(args.prior_runs) if args.prior_runs else None  # bad file: before work
    exported = bundles.load_all(args.bundles or [])
    client, parents, exp_id = None, [], ""
    if not exported or args.parent:  # bundles alone need no store
        client = store.open_existing(args.tracking_uri)
        store.use_store(args.tracking_uri)
        exp_id = store.require_experiment(client, args.experiment)
        parents = [find_parent(client, exp_id, p) for p in args.parent or [None]]
    if args.export is not None:
        runs = [r for p in parents for r in children(client, exp_id, p.info.run_id)]
        for folder in export.export(client, runs, args.export):
            print(folder)
        return 0
    parent = parents[0] if parents else None
    out = args.out or Path("reports") / (parent.info.run_id if parent else "bundles")
    groups, logged = write_report(
        client,
        parent,
        out,
        uri=args.tracking_uri,
        experiment=args.experiment,
        log=not args.no_log,
        compare=args.compare,
        more_parents=parents[1:],
        seed_sd=args.seed_sd,
        prior=prior,
        exported=exported,
    )
    print((out / "table2.md").read_text())
    where = f"; logged on run {parent.info.run_id} under report/" if logged else ""
    runs = sum(g.n for g in groups)
    print(
        f"{len(groups)} rows ({runs} runs) -> {out}/ (table2.md, table2.csv, runs.csv, "
        f"table1.md, accuracy.png, curves.png){where}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), _report, argv)


if __name__ == "__main__":
    sys.exit(main())
