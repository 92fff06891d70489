"""MLflow tracking: one store, one experiment, one run per job, one parent run per sweep.

Everything goes through ``MlflowClient`` with explicit run ids, so nothing depends on MLflow's
process-global "active run" (jobs may share a process, a thread pool or nothing at all).

The parent run of a multirun is created ONCE, in the launching process, before any job starts
(``MultirunParentCallback.on_multirun_start``): parallel jobs that first touch a new sqlite file
race in its schema migration and lose runs. The parent's id reaches the jobs through a small file
in the sweep folder, which every launcher (basic, joblib, submitit) shares.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fer_sweep.core.interrupt import in_submitit_job
from fer_sweep.errors import FerSweepError
from fer_sweep.sweep import store
from fer_sweep.sweep.signals import WORKER_STOPPED, SweepGuard, alive
from fer_sweep.sweep.store import newest_runs

if TYPE_CHECKING:  # MLflow loads in ~1.5 s: Hydra imports this module for every command (the
    # callback below), so a setting's error is named before MLflow or torch loads
    from mlflow.tracking import MlflowClient


def _client(uri: str) -> MlflowClient:
    from mlflow import tracking as mlflow_tracking

    return mlflow_tracking.MlflowClient(tracking_uri=uri)


log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"
FAILURES_DIR = "failures"
TAG_PREFIX = "fer_sweep."
ERROR_TAG = f"{TAG_PREFIX}error"  # why a run or sweep stopped
OPTUNA_RESULTS = "optimization_results.yaml"

# Parent runs opened by this process and not yet closed by on_multirun_end: run id -> store.
_open_parents: dict[str, str] = {}

T = TypeVar("T")


def flatten(cfg: Mapping[str, Any] | DictConfig, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params: ``{"optimizer.lr": "0.01", ...}``."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def git_commit() -> str | None:
    """The source tree's commit, so a run can be traced back to the code that produced it."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def retry(fn: Callable[..., T], *args: Any, attempts: int = 8, **kwargs: Any) -> T:
    """Call ``fn``, retrying while a shared sqlite store is locked by another writer.

    Eight jobs writing to one sqlite file at once do hit "database is locked" now and then;
    waiting a moment is all it takes, and a lost metric is worse than a short pause.
    """
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def create_run(
    client: MlflowClient,
    exp_id: str,
    name: str,
    tags: Mapping[str, str],
    *,
    parent_id: str | None = None,
    synthetic: bool = False,
    what: str = "Trained",
) -> str:
    """A run carrying what every fer_sweep run carries: its parent, the git commit, and a clear
    SYNTHETIC label when it was computed on the synthetic faces (never a FER2013 result)."""
    tags = {**tags, "synthetic": str(synthetic).lower()}
    if synthetic:
        name = f"SYNTHETIC-{name}"
        tags["mlflow.note.content"] = (
            f"{what} on fer_sweep's synthetic faces (data=synthetic): "
            "a pipeline check, never a FER2013 result."
        )
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = tags["git_commit"] = commit
    return writable(client, retry, client.create_run, exp_id, run_name=name, tags=tags).info.run_id


def writable(client: MlflowClient, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, the first write to a store: a login refused or a read-only
    permission (a team server's 401/403) becomes one line naming the user, before any run."""
    try:
        return call(*args, **kwargs)
    except Exception as err:
        raise store.access_error(err, client.tracking_uri, "create runs here") or err from None


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        retry(client.log_batch, run_id, params=items[i : i + 100])


def log_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0
) -> None:
    """One batched call per step; non-finite values are skipped (some stores reject NaN)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
    if items:
        retry(client.log_batch, run_id, metrics=items)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    retry(client.log_batch, run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def record_failure(
    client: MlflowClient | None, run_id: str | None, err: BaseException, status: str = "FAILED"
) -> None:
    """Mark a run FAILED (or KILLED) with the error saved on it; never raises."""
    if client is None or run_id is None:
        return
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        set_tags(client, run_id, {ERROR_TAG: f"{type(err).__name__}: {err}"[:5000]})
        client.log_text(run_id, text, "error.txt")
    except Exception as log_err:  # the store itself may be what failed
        log.warning("could not save the error on run %s: %s", run_id, log_err)
    try:
        retry(client.set_terminated, run_id, status=status)
    except Exception as term_err:
        log.warning("could not mark run %s %s: %s", run_id, status, term_err)


# ---------------------------------------------------------------------------------------------
# Multiruns: one parent run, created before the jobs; failures summarised at the end.


def parent_info(sweep_dir: str | os.PathLike[str]) -> dict[str, str] | None:
    """What on_multirun_start wrote for the jobs of this sweep, if anything."""
    path = Path(sweep_dir) / PARENT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_job_failure(
    sweep_dir: str | os.PathLike[str],
    job_num: int,
    overrides: Iterable[str],
    err: BaseException,
    run_id: str | None,
) -> None:
    """Leave a note for on_multirun_end: the launcher reports failures differently or not at all."""
    folder = Path(sweep_dir) / FAILURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    note = {
        "job": job_num,
        "overrides": list(overrides),
        "run_id": run_id,
        "error": f"{type(err).__name__}: {err}",
    }
    (folder / f"{job_num}.json").write_text(json.dumps(note))


def close_parent(uri: str, run_id: str, status: str, error: str | None = None) -> None:
    """Terminate a sweep's parent run (with an error tag when given) and forget it as open.
    The one way a parent ends: at the sweep's end, on an interruption, or at exit."""
    client = _client(uri)
    if error:
        set_tags(client, run_id, {ERROR_TAG: error})
    retry(client.set_terminated, run_id, status=status)
    _open_parents.pop(run_id, None)


def interrupted_sweep(sweep_dir: str | os.PathLike[str], signum: int = 0) -> None:
    """Mark the sweep's parent KILLED and say how to finish the sweep. Called in a worker
    process (joblib, submitit) that got the signal, it passes the signal on to the process that
    launched the sweep instead, which stops the other workers first (signals.SweepGuard)."""
    info = parent_info(sweep_dir)
    if info is None:
        return
    if in_submitit_job():
        return  # the scheduler stopped one job: fer_sweep.sweep.slurm decides if it comes back
    launcher = int(info.get("launcher_pid", os.getpid()))
    if info.get("launcher_host", socket.gethostname()) != socket.gethostname():
        return  # that pid is another machine's: the launcher learns it from the job's end
    if signum and launcher != os.getpid():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(launcher, WORKER_STOPPED)
        return
    close_parent(info["tracking_uri"], info["parent_run_id"], "KILLED")
    kill_orphaned_jobs(info["tracking_uri"], info["parent_run_id"])
    print(
        f"fer_sweep: sweep interrupted; its parent run {info['parent_run_id']} is marked KILLED. "
        "Finish it with the same command plus sweep.resume=latest (or "
        f"sweep.resume={info['parent_run_id']}): finished jobs are skipped, interrupted ones "
        "continue from their checkpoints.",
        file=sys.stderr,
    )


def stop_interrupted_sweep(sweep_dir: str | os.PathLike[str]) -> None:
    """SweepGuard's action in the process that launched the sweep: ``interrupted_sweep``, and
    if the parent is still open after it (the store failed while marking it KILLED, or the
    signal came before the parent file was written), the at-exit FAILED marking at once: the
    guard ends the process with ``os._exit``, which runs no at-exit handler."""
    try:
        interrupted_sweep(sweep_dir)
    finally:
        _fail_unclosed_parents()


def kill_orphaned_jobs(uri: str, parent_id: str, tags: Mapping[str, str] | None = None) -> None:
    """Mark KILLED (and tag with ``tags``) the sweep's job runs still RUNNING whose process, on
    this machine, is gone (a worker ended before it could mark its run). Jobs on other machines
    (a cluster's) are left to themselves: they may well be running."""
    client = _client(uri)
    host = socket.gethostname()
    running = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'",
        max_results=10_000,
    )
    for run in running:
        own = run.data.tags
        pid = own.get(f"{TAG_PREFIX}pid")
        if own.get(f"{TAG_PREFIX}host") == host and pid and not alive(int(pid)):
            if tags:
                set_tags(client, run.info.run_id, tags)
            retry(client.set_terminated, run.info.run_id, status="KILLED")


def _fail_unclosed_parents() -> None:
    """At exit: a sweep that died between on_multirun_start and on_multirun_end (a launcher or
    sweeper crash) must not leave its parent run RUNNING forever."""
    for run_id, uri in list(_open_parents.items()):
        try:
            if _client(uri).get_run(run_id).info.status != "RUNNING":
                continue  # a job process already ended it (KILLED by a signal)
            close_parent(
                uri,
                run_id,
                "FAILED",
                error="the sweep stopped before its end (see "
                "the launcher's or sweeper's error in its output)",
            )
        except Exception as err:  # the store itself may be what failed
            log.warning("could not mark the sweep's parent run %s FAILED: %s", run_id, err)


class MultirunParentCallback(Callback):
    """Create the sweep's parent run up front; close it with a summary when the sweep ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the whole sweep, then open (or reopen) its parent run, as a sweep starts.

        Kept whole on purpose: every check must come before the first write to the store."""
        from fer_sweep.core.config import validate  # local: keep Hydra's plugin discovery light
        from fer_sweep.sweep import search  # local: keep Hydra's plugin discovery light
        from fer_sweep.sweep.validation import grid_jobs, grid_key, validate_jobs

        sweep_dir = Path(config.hydra.sweep.dir)
        plan = None
        try:
            conf = validate(config)  # catches what is wrong for every job before any starts
            jobs = grid_jobs(config)  # the grid, expanded once
            validate_jobs(config, jobs)  # ... and what is wrong for one job of the grid
            from fer_sweep.core.sources import check_source  # torch: after the settings' checks

            check_source(conf.data)  # the same data for every job: checked once, here
            _check_launcher(config)
            grid = grid_key(config)
            searching = search.is_search(config)
            if searching:  # "the same sweep" for sweep.resume: the same search
                space = search.parse_space(
                    config.hydra.sweeper.get("params"), list(config.hydra.overrides.task)
                )
                grid = search.search_key(space)
            client = store.connect(conf.mlflow.tracking_uri)
            exp_id = store.ensure_experiment(client, conf.mlflow.experiment)
            resumed = (
                find_resumable(client, exp_id, conf.sweep.resume, grid)
                if conf.sweep.resume
                else None
            )
            if searching:  # sampler, pruner, every value, the storage: before any trial
                plan = search.check(config, space, sweep_dir, resumed)
        except FerSweepError as err:
            print(f"fer_sweep: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # From here on a signal between jobs (or while workers run them) ends the sweep cleanly.
        self.guard = SweepGuard(lambda signum: stop_interrupted_sweep(sweep_dir))
        self.guard.install()
        overrides = list(config.hydra.overrides.task)
        name = str(config.hydra.get("job", {}).get("name", "sweep"))
        tags = {
            f"{TAG_PREFIX}sweep_dir": str(sweep_dir.resolve()),
            f"{TAG_PREFIX}overrides": " ".join(overrides),
            f"{TAG_PREFIX}role": "parent",
            f"{TAG_PREFIX}sweeper": str(config.hydra.sweeper.get("_target_", "")),
            f"{TAG_PREFIX}launcher": str(config.hydra.launcher.get("_target_", "")),
        }
        if grid:
            tags[f"{TAG_PREFIX}grid"] = grid
        if plan is not None:
            tags.update(search.parent_tags(plan))
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if resumed is not None:  # the same parent run, RUNNING again
            run = resumed
            retry(client.update_run, run.info.run_id, status="RUNNING")
            set_tags(client, run.info.run_id, {f"{TAG_PREFIX}resumed_in": str(sweep_dir)})
            log.info("sweep.resume: continuing the sweep of parent run %s", run.info.run_id)
        else:
            try:
                run = writable(
                    client,
                    client.create_run,
                    exp_id,
                    run_name=f"sweep-{sweep_dir.name}-{name}",
                    tags=tags,
                )
            except FerSweepError as err:
                print(f"fer_sweep: error: {err}", file=sys.stderr)
                raise SystemExit(2) from None
        if not _open_parents:
            atexit.register(_fail_unclosed_parents)
        _open_parents[run.info.run_id] = conf.mlflow.tracking_uri
        (sweep_dir / PARENT_FILE).write_text(
            json.dumps(
                {
                    "tracking_uri": conf.mlflow.tracking_uri,
                    "experiment": conf.mlflow.experiment,
                    "experiment_id": exp_id,
                    "parent_run_id": run.info.run_id,
                    "launcher_pid": os.getpid(),
                    "launcher_host": socket.gethostname(),
                    "resumed": resumed is not None,
                    "grid_size": None if jobs is None else len(jobs),
                    "started": time.time(),
                    **({"search": dataclasses.asdict(plan)} if plan is not None else {}),
                }
            )
        )
        log.info(
            "MLflow parent run %s in experiment %r (%s)",
            run.info.run_id,
            conf.mlflow.experiment,
            conf.mlflow.tracking_uri,
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if getattr(self, "guard", None) is not None:
            self.guard.uninstall()
        sweep_dir = Path(config.hydra.sweep.dir)
        info = parent_info(sweep_dir)
        failures = sorted(
            (json.loads(p.read_text()) for p in (sweep_dir / FAILURES_DIR).glob("*.json")),
            key=lambda f: f["job"],
        )
        if info is not None:
            client = _client(info["tracking_uri"])
            parent = info["parent_run_id"]
            children = client.search_runs(
                [info["experiment_id"]], f"tags.mlflow.parentRunId = '{parent}'", max_results=10000
            )
            jobs = info.get("grid_size") or len(children)  # a resumed sweep has old runs too
            log_metrics(client, parent, {"jobs": jobs, "jobs_failed": len(failures)})
            if failures:
                client.log_text(parent, json.dumps(failures, indent=2), "failures.json")
            if (sweep_dir / OPTUNA_RESULTS).exists():
                log_optimization_results(client, parent, sweep_dir / OPTUNA_RESULTS)
            close_parent(info["tracking_uri"], parent, "FAILED" if failures else "FINISHED")
        if failures:
            lines = [f"fer_sweep: {len(failures)} job(s) failed:"]
            lines += [f"  #{f['job']} {' '.join(f['overrides'])}: {f['error']}" for f in failures]
            print("\n".join(lines), file=sys.stderr)
            raise SystemExit(1)


def find_resumable(client: MlflowClient, exp_id: str, which: str, grid: str | None) -> Any:
    """The parent run that sweep.resume names ('latest': the experiment's newest), checked to
    be a sweep of the same grid."""
    if grid is None:
        raise FerSweepError(
            "sweep.resume works for grid sweeps and for searches (hydra/sweeper=optuna); "
            "this sweeper's jobs cannot be listed, so it cannot be resumed: run it again."
        )
    if which == "latest":
        runs = newest_runs(client, exp_id, f"tags.`{TAG_PREFIX}role` = 'parent'", limit=1)
        if not runs:
            raise FerSweepError("sweep.resume=latest: this experiment has no sweep to resume.")
        parent = runs[0]
    else:
        try:
            parent = client.get_run(which)
        except Exception:
            raise FerSweepError(f"sweep.resume={which}: no such run in this store.") from None
        if parent.data.tags.get(f"{TAG_PREFIX}role") != "parent":
            raise FerSweepError(f"sweep.resume={which}: that run is not a sweep's parent run.")
    if parent.data.tags.get(f"{TAG_PREFIX}grid") != grid:
        raise FerSweepError(
            f"sweep.resume: parent run {parent.info.run_id} swept another grid (it ran with "
            f"`{parent.data.tags.get(f'{TAG_PREFIX}overrides', '?')}`); resume it with the "
            "same overrides plus sweep.resume."
        )
    return parent


def _check_launcher(config: DictConfig) -> None:
    """hydra/launcher=slurm off a cluster, or with jobs this cluster could never start (no such
    partition, GPUs it does not have, ...): say so before a parent run is opened."""
    target = str(config.hydra.launcher.get("_target_", ""))
    if not target.endswith("SlurmLauncher"):
        return
    if shutil.which("srun") is None:
        raise FerSweepError(
            "hydra/launcher=slurm needs SLURM (no `srun` on PATH): run the sweep "
            "from a cluster's login node, or on this machine with "
            "hydra/launcher=submitit_local (same code path) or "
            "hydra/launcher=joblib."
        )
    from fer_sweep.sweep.slurm import check_cluster  # local: keep Hydra's plugin discovery light

    check_cluster(OmegaConf.to_container(config.hydra.launcher, resolve=False))


def log_optimization_results(client: MlflowClient, run_id: str, path: Path) -> None:
    """The Optuna sweeper's verdict on the parent run, where the UI shows it: best_value as a
    metric, each best parameter as a ``best.<key>`` param, the YAML itself as an artifact."""
    results = OmegaConf.to_container(OmegaConf.load(path))
    client.log_artifact(run_id, str(path))
    if isinstance(results, dict) and "best_value" in results:
        log_metrics(client, run_id, {"best_value": float(results["best_value"])})
        best = results.get("best_params") or {}
        log_params(client, run_id, {f"best.{k}": str(v) for k, v in best.items()})


def process_tags() -> dict[str, str]:
    """Where a job ran: tells parallel launchers' jobs apart (and finds a stuck node); under
    SLURM, its job id (``squeue``/``sacct`` and the job's log files go by it)."""
    from fer_sweep.sweep.slurm import job_id  # local: keep Hydra's plugin discovery light

    tags = {f"{TAG_PREFIX}host": socket.gethostname(), f"{TAG_PREFIX}pid": str(os.getpid())}
    slurm_job = job_id()
    if slurm_job:
        tags[f"{TAG_PREFIX}slurm_job_id"] = slurm_job
    return tags
