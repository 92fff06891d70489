"""What the side commands (report, ensemble, predict, ui, bench) share: the store flags with
MLflow's environment conventions, and one way to turn a user's mistake into one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fer_sweep.errors import FerSweepError
from fer_sweep.sweep import store


def add_store_args(
    parser: argparse.ArgumentParser,
    what: str = "the runs were logged to",
    experiment_help: str = "MLflow experiment name",
) -> None:
    """--tracking-uri and --experiment, defaulting to $MLFLOW_TRACKING_URI /
    $MLFLOW_EXPERIMENT_NAME, else sqlite:///mlflow.db / fer_sweep."""
    parser.add_argument(
        "--tracking-uri",
        default=store.default_uri(),
        help=f"the MLflow store {what} (default: $MLFLOW_TRACKING_URI, else "
        f"{store.DEFAULT_URI}; now %(default)s)",
    )
    parser.add_argument(
        "--experiment",
        default=store.default_experiment(),
        help=f"{experiment_help} (default: $MLFLOW_EXPERIMENT_NAME, else "
        f"{store.DEFAULT_EXPERIMENT}; now %(default)s)",
    )


def run_command(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse (argparse exits 2 on bad arguments), then run with user_errors."""
    args = parser.parse_args(argv)
    return user_errors(lambda: run(args))


def user_errors(run: Callable[[], int]) -> int:
    """run(); a FerSweepError (something the user can fix) becomes one line on stderr and
    exit status 2, without a traceback."""
    try:
        return run()
    except FerSweepError as err:
        print(f"fer_sweep: error: {err}", file=sys.stderr)
        return 2
