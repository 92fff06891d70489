"""The MLflow tracking store: which one, reaching it, finding or creating the experiment.

MLflow's own conventions decide which store and experiment a command uses when none is given:
``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME``, else ``sqlite:///mlflow.db`` in the
current folder and the experiment ``fer_sweep``; an explicit setting or flag wins. This module is
also the one place that touches MLflow's process-wide state (``use_store``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
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


# Database schemes MLflow's SQLAlchemy store takes, with the driver module SQLAlchemy 2 loads
# for each and the package that provides it.
_DRIVERS = {
    "postgresql": ("psycopg", "psycopg[binary]"),
    "postgresql+psycopg": ("psycopg", "psycopg[binary]"),
    "postgresql+psycopg2": ("psycopg2", "psycopg2-binary"),
    "mysql": ("MySQLdb", "mysqlclient"),
    "mysql+pymysql": ("pymysql", "pymysql"),
    "mssql": ("pyodbc", "pyodbc"),
    "mssql+pyodbc": ("pyodbc", "pyodbc"),
}
_OTHER_SCHEMES = ("sqlite", "file", "http", "https", "databricks")
_SQLITE_MAGIC = b"SQLite format 3\x00"


def redact(uri: str) -> str:
    """``uri`` with any password replaced by ***, for messages and logs."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", uri)


def refuse_password(url: str, what: str) -> None:
    """A password inside a URL would be saved with the sweep (params, tags, Hydra's config in
    the sweep folder, logs): refuse it, pointing at the variables that keep it out."""
    if redact(url) != url:
        raise FerSweepError(
            f"{what} {redact(url)} carries a password: it would be saved with every run and in "
            "the sweep folder. Remove it from the URL and set it in the environment instead: "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for a tracking server, "
            "PGPASSWORD (or ~/.pgpass) for PostgreSQL."
        )


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def check_uri(uri: str, create: bool) -> None:
    """Every mistake in a store URI that can be seen without MLflow, named in one line: an
    unknown scheme, a database driver that is not installed, a sqlite file that is not a
    database or cannot be created (``create``: a new store may be made here), a database or
    server that does not answer. MLflow itself would print a traceback, or retry for minutes."""
    scheme = _scheme(uri)
    refuse_password(uri, "the store URI")
    if scheme and scheme not in _DRIVERS and not scheme.startswith(_OTHER_SCHEMES):
        raise FerSweepError(
            f"{redact(uri)} is not an MLflow store URI this fer_sweep knows (scheme "
            f"{scheme!r}). Use sqlite:///path/to/mlflow.db, http(s)://host:port of a tracking "
            "server, postgresql://user@host/db, or a folder."
        )
    if scheme in _DRIVERS:
        check_database(uri)
        return
    if uri.startswith("sqlite:///"):
        _check_sqlite(uri, create)
    check_reachable(uri)


def _check_sqlite(uri: str, create: bool) -> None:
    path = local_path(uri)
    assert path is not None
    if path.is_file():
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            raise FerSweepError(
                f"{path} is not an SQLite database ({uri}). Point the store at the mlflow.db "
                "your runs were logged to, or at a new file name."
            )
        return
    if path.exists():
        raise FerSweepError(f"{path} is not a file ({uri}); name an mlflow.db file.")
    if create:  # tried, not predicted: permissions say little to root or on a read-only mount
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path.parent):
                pass
        except OSError as err:
            raise FerSweepError(
                f"cannot create the store {path} ({uri}): {err.strerror or err} in "
                f"{path.parent}. Choose a folder you can write to."
            ) from None


def database_driver(url: str) -> tuple[str, str] | None:
    """(driver module, package) of a database URL SQLAlchemy would open; None otherwise."""
    return _DRIVERS.get(_scheme(url))


def check_database(uri: str, what: str = "the store") -> None:
    """The driver is installed and the database answers within seconds."""
    driver = database_driver(uri)
    assert driver is not None, uri
    module, package = driver
    if importlib.util.find_spec(module) is None:
        raise FerSweepError(
            f"{what} {redact(uri)} needs the {package!r} package, which is not installed: "
            f"pip install '{package}' (or the project's extra: pip install -e '.[team]')."
        )
    import sqlalchemy

    connect_args = {"connect_timeout": 5} if uri.startswith("postgresql") else {}
    engine = sqlalchemy.create_engine(uri, connect_args=connect_args, poolclass=_null_pool())
    try:
        with engine.connect():
            pass
    except Exception as err:  # the driver's own errors: refused, auth, unknown database
        first = str(getattr(err, "orig", err)).strip().splitlines()
        raise FerSweepError(
            f"cannot open {what} {redact(uri)}: {first[0] if first else err}. Check that the "
            "database runs, the URL's host, port, user and database, and the password "
            "(PGPASSWORD or ~/.pgpass for PostgreSQL)."
        ) from None
    finally:
        engine.dispose()


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool


def access_error(err: BaseException, uri: str, doing: str = "open") -> FerSweepError | None:
    """A tracking server's "who are you" (401) or "not you" (403) as one line naming the user
    and the fix; None for any other error. MLflow raises both with the HTTP code in the text."""
    text = str(err)
    code = getattr(err, "error_code", "")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none: MLFLOW_TRACKING_USERNAME unset)"
    if "error code 401" in text or code == "UNAUTHENTICATED":
        return FerSweepError(
            f"the tracking server {redact(uri)} refused the login of user {user} (401). Set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to "
            "an account of that server."
        )
    if "error code 403" in text or code == "PERMISSION_DENIED":
        return FerSweepError(
            f"user {user} may not {doing} on the tracking server {redact(uri)} (403): ask the "
            "experiment's owner or an admin for EDIT permission, or log to another experiment "
            "(mlflow.experiment=...)."
        )
    return None


def _opened(uri: str) -> MlflowClient:
    """A client whose store has answered one query: any error MLflow raises while opening it
    (a store it cannot open, a schema it cannot read) becomes one line naming the URI."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except FerSweepError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()
        raise access_error(err, uri) or FerSweepError(
            f"cannot open the MLflow store {redact(uri)}: {first[0] if first else type(err)}"
        ) from None
    return client


def connect(uri: str) -> MlflowClient:
    """A client for ``uri`` to log to, after the URI's checks (check_uri); a sqlite file's
    folder is created (the store itself is created by MLflow on first use)."""
    check_uri(uri, create=True)
    path = local_path(uri)
    if path is not None and uri.startswith("sqlite:///"):
        path.parent.mkdir(parents=True, exist_ok=True)
    return _opened(uri)


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
    check_uri(uri, create=False)
    return _opened(uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (or restored) when missing, tolerating a
    concurrent creator."""
    try:
        exp = client.get_experiment_by_name(name)
    except Exception as err:  # a team server's user without READ on it
        raise access_error(err, client.tracking_uri, f"read experiment {name!r}") or err from None
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


def newest_runs(
    client: MlflowClient, exp_id: str, where: str, limit: int | None = 50, page_size: int = 1000
) -> list[Any]:
    """Runs of the experiment matching an MLflow filter, newest first; ``limit=None``: all of
    them, page by page (a grid of hundreds of jobs must not lose its oldest)."""
    runs: list[Any] = []
    token = None
    while limit is None or len(runs) < limit:
        page = client.search_runs(
            [exp_id],
            where,
            order_by=["attributes.start_time DESC"],
            max_results=page_size if limit is None else min(page_size, limit - len(runs)),
            page_token=token,
        )
        runs += page
        token = page.token
        if not token:
            break
    return runs
