"""Which run a job continues: "the same run" for trainer.resume and sweep.resume.

A run is identified by its settings (the composed config, less what does not change what it
computes) through a hash, tagged on the run as ``fer_sweep.config_hash``. A run that lasts
longer than the code it started with (Table 2's ResNet rows train across many sessions) would
lose that identity as soon as fer_sweep gains a setting: the hash changes although nothing the
run computes does. So a run whose hash differs still matches when every setting it logged as a
param at its start is unchanged; settings that did not exist then are named in the log (a new
setting comes with a default that keeps the old behaviour).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fer_sweep.core.checkpoint import claim, in_training
from fer_sweep.core.config import Config
from fer_sweep.errors import FerSweepError
from fer_sweep.sweep import store, tracking

log = logging.getLogger(__name__)

HASH_TAG = "fer_sweep.config_hash"

# Settings that do not change what a run computes: left out of its identity (and never a
# column of the report).
VOLATILE = {
    "trainer.resume",
    "trainer.checkpoint_every_s",
    "sweep.resume",
    "trainer.progress",
    "trainer.threads",
    "trainer.checkpoint_dir",
    "data.cache_dir",
    "data.root",
}


def job_config(cfg: DictConfig) -> DictConfig:
    """The job's own config (without Hydra's node)."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg


def settings(cfg: DictConfig) -> dict[str, str]:
    """What makes a run what it is: its flattened settings, less the volatile ones."""
    return {
        k: v
        for k, v in tracking.flatten(job_config(cfg)).items()
        if k not in VOLATILE and not k.startswith("mlflow.")
    }


def config_hash(cfg: DictConfig) -> str:
    """Identifies "the same run" for trainer.resume=auto and sweep.resume."""
    return _hash(settings(cfg))


def _hash(flat: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def same_run(run: Any, flat: dict[str, str]) -> bool:
    """Whether ``run`` was started with these settings: the same hash or, its hash being older
    code's, every one of these settings that it logged as a param unchanged."""
    if run.data.tags.get(HASH_TAG) == _hash(flat):
        return True
    params = run.data.params
    if any(k not in params for k in _ALWAYS):  # not a job's run, or its params never logged
        return False
    if any(params[k] != v for k, v in flat.items() if k in params):
        return False
    added = sorted(k for k in flat if k not in params)
    log.info(
        "run %s started before these settings existed: %s",
        run.info.run_id,
        ", ".join(f"{k}={flat[k]}" for k in added) or "none (its hash is older code's)",
    )
    return True


_ALWAYS = ("model.name", "trainer.seed", "optimizer.lr")  # every job's run has logged these


def _candidates(client: MlflowClient, exp_id: str, where: str, flat: dict[str, str]) -> list[Any]:
    """Runs matching ``where``, newest first, that are this job's by their settings."""
    runs = store.newest_runs(client, exp_id, where, limit=None)
    return [r for r in runs if same_run(r, flat)]


def resumable_run(
    client: MlflowClient, exp_id: str, conf: Config, flat: dict[str, str]
) -> Any | None:
    """The interrupted run (MLflow's) that trainer.resume names (auto: this config's newest one
    that left a checkpoint and no live process trains), checked against its checkpoint and
    settings; None: a new run. Changes nothing, so a job knows before it measures or creates
    anything whether it continues a run (the job then claims it: ``claimed``)."""
    ckpt_dir = Path(conf.trainer.checkpoint_dir)
    resume = conf.trainer.resume
    if resume == "auto":
        runs = _candidates(client, exp_id, "attributes.status != 'FINISHED'", flat)
        resume = next(
            (
                r.info.run_id
                for r in runs
                if (ckpt_dir / f"{r.info.run_id}.pt").exists()
                and not in_training(ckpt_dir / f"{r.info.run_id}.pt")  # not another's, live
            ),
            None,
        )
        if resume is None:
            log.info("trainer.resume=auto: no interrupted run of this config; starting a new one")
    if resume:
        try:
            run = client.get_run(resume)
        except Exception:
            raise FerSweepError(
                f"trainer.resume={resume}: no such run in {conf.mlflow.tracking_uri}."
            ) from None
        if not (ckpt_dir / f"{resume}.pt").exists():
            raise FerSweepError(
                f"trainer.resume={resume}: no checkpoint {ckpt_dir / resume}.pt "
                "(it is deleted when a run finishes; set trainer.checkpoint_dir "
                "to where the run wrote it)."
            )
        if not same_run(run, flat):
            raise FerSweepError(
                f"trainer.resume={resume}: that run was trained with different "
                "settings; resume it with the same overrides."
            )
        return run
    return None


def earlier_runs(
    client: MlflowClient, exp_id: str, parent_id: str, flat: dict[str, str], ckpt_dir: Path
) -> tuple[str | None, str | None]:
    """In a resumed sweep, this job's earlier runs under the parent: (its FINISHED run, its
    newest interrupted run that left a checkpoint), each None when there is none."""
    where = f"tags.mlflow.parentRunId = '{parent_id}'"
    runs = _candidates(client, exp_id, where, flat)
    finished = next((r.info.run_id for r in runs if r.info.status == "FINISHED"), None)
    resumable = next(
        (r.info.run_id for r in runs if (ckpt_dir / f"{r.info.run_id}.pt").exists()), None
    )
    return finished, resumable


@contextlib.contextmanager
def claimed(ckpt: Path, run_id: str, tags: dict[str, str] | None = None) -> Iterator[None]:
    """This process trains ``run_id`` until the block ends (checkpoint.claim), so
    trainer.resume and sweep.resume in another process leave it alone; a run that a live
    process trains already is refused in one line."""
    lock = claim(ckpt)
    if lock is None:
        tags = tags or {}
        where = f"pid {tags.get('fer_sweep.pid', '?')} on {tags.get('fer_sweep.host', '?')}"
        raise FerSweepError(
            f"run {run_id} is being trained right now by another process ({where}); "
            "wait for it to end or stop it first (SIGTERM), then continue it."
        )
    with lock:
        yield
