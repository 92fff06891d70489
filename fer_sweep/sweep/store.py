"""The MLflow tracking store: which one, reaching it, finding or creating the experiment.

MLflow's own conventions decide which store and experiment a command uses when none is given:
``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME``, else ``sqlite:///mlflow.db`` in the
current folder and the experiment ``fer_sweep``; an explicit setting or flag wins. This module is
also the one place that touches MLflow's process-wide state (``use_store``).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fer_sweep.core.config import DEFAULT_EXPERIMENT, DEFAULT_URI
from fer_sweep.errors import FerSweepError

if TYPE_CHECKING:  # mlflow loads in ~1 s: only the functions that talk to a store import it
    from mlflow.tracking import MlflowClient


def default_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the sqlite file in the current folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def default_experiment() -> str:
    """$MLFLOW_EXPERIMENT_NAME, else fer_sweep."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def local_path(uri: str) -> Path | None:
    """The file behind a sqlite:/// or file: store (None for a server or a database)."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).expanduser()
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://")).expanduser()
    if "://" not in uri and not uri.startswith("databricks"):
        return Path(uri).expanduser()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail within seconds, naming the URI, when an HTTP tracking server does not answer.

    MLflow's own client retries for minutes before giving up, which would look like a hang.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user's own URI)
            if resp.status == 200:
                return
            problem = f"it answered HTTP {resp.status}"
    except (TimeoutError, urllib.error.URLError, OSError) as err:
        problem = f"{getattr(err, 'reason', err)}"
    raise FerSweepError(
        f"cannot reach the MLflow tracking server at {uri} ({problem}). Start it (e.g. "
        "`mlflow server --host 127.0.0.1 --port 5000 --serve-artifacts`) or log to a local "
        f"store with mlflow.tracking_uri={DEFAULT_URI}."
    )


def connect(uri: str) -> MlflowClient:
    """A client for ``uri`` to log to, after a fast reachability check; a sqlite file's folder
    is created (the store itself is created by MLflow on first use)."""
    check_reachable(uri)
    path = local_path(uri)
    if path is not None and uri.startswith("sqlite:///"):
        path.parent.mkdir(parents=True, exist_ok=True)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_existing(uri: str) -> MlflowClient:
    """A client for a store that must already exist (report, ensemble, predict): a missing
    sqlite file is the user's mistake, not a new empty store that MLflow would create."""
    path = local_path(uri)
    if path is not None and not path.exists():
        raise FerSweepError(
            f"no MLflow store at {path} (--tracking-uri {uri}). Pass the "
            "store the runs were logged to (mlflow.tracking_uri, or "
            "$MLFLOW_TRACKING_URI), e.g. --tracking-uri "
            "sqlite:///path/to/mlflow.db, or run from that folder."
        )
    check_reachable(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (or restored) when missing, tolerating a
    concurrent creator."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another process created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def require_experiment(client: MlflowClient, name: str) -> str:
    """The id of an experiment that must exist; the error lists the ones that do."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise FerSweepError(
            f"no experiment {name!r} in this store (it has: "
            f"{', '.join(names) or 'none'}); pass --experiment NAME (or set "
            "MLFLOW_EXPERIMENT_NAME)."
        )
    return exp.experiment_id


def use_store(uri: str) -> None:
    """Point MLflow's fluent API (mlflow.pytorch.log_model / load_model) at ``uri``, and keep
    its per-file download progress bars quiet: the one place MLflow's global state is set."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # set_tracking_uri also writes $MLFLOW_TRACKING_URI, which the next job of a sweep (and any
    # child process) would then take as the user's choice: keep the variable as it was.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def newest_runs(client: MlflowClient, exp_id: str, where: str, limit: int = 50) -> list[Any]:
    """Runs of the experiment matching an MLflow filter, newest first."""
    return list(
        client.search_runs(
            [exp_id], where, order_by=["attributes.start_time DESC"], max_results=limit
        )
    )
