"""``hydra/launcher=slurm``: Hydra's submitit SLURM launcher, fitted to fer_sweep.

It lives here because Hydra instantiates launchers only from the ``hydra_plugins`` package; what
it adds (checks before submitting, squeue where the cluster has no accounting, requeued jobs
continuing their MLflow run, a job stopped for good recorded as failed) is in
``fer_sweep.sweep.slurm``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as HydraSlurmLauncher,
)


class SlurmLauncher(HydraSlurmLauncher):
    """Hydra's SlurmLauncher: the same array job per sweep, plus fer_sweep.sweep.slurm's care."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        """Submit and wait, quietly where sacct cannot answer; sbatch's refusal is one error."""
        from submitit.core.utils import FailedJobError

        from fer_sweep.sweep import slurm, tracking

        try:
            with slurm.quiet_polling():
                return super().launch(job_overrides, initial_job_idx)
        except FailedJobError as err:
            message = slurm.sbatch_refusal(err)
            if message is None:
                raise
        assert self.config is not None
        info = tracking.parent_info(str(self.config.hydra.sweep.dir))
        if info is not None:
            tracking.close_parent(info["tracking_uri"], info["parent_run_id"], "FAILED", message)
        print(f"fer_sweep: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[Any, Any],
    ) -> JobReturn:
        """One job, on a node. After a requeue it continues the MLflow run it had started; a job
        the scheduler stops for good is recorded as a failed job of the sweep (its siblings go
        on) instead of leaving the launcher waiting for a result that never comes."""
        from fer_sweep.core import interrupt
        from fer_sweep.errors import FerSweepError
        from fer_sweep.sweep import slurm, tracking

        if not interrupt.in_submitit_job():
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        assert self.config is not None
        sweep_dir = str(self.config.hydra.sweep.dir)
        overrides = list(sweep_overrides)
        run = slurm.requeued_run(tracking.parent_info(sweep_dir))
        if run is not None:
            print(f"fer_sweep: requeued SLURM job: continuing MLflow run {run}", flush=True)
            overrides.append(f"trainer.resume={run}")
        try:
            return super().__call__(overrides, job_dir_key, job_num, job_id, singleton_state)
        except SystemExit as stop:
            why = slurm.stopped_for_good(stop.code, int(self.params.get("max_num_timeout") or 0))
            if why is None:
                raise  # it comes back (or this was no scheduler's signal): end the process
        err = FerSweepError(
            f"{why}; finish the sweep with the same command plus sweep.resume=latest"
        )
        print(f"fer_sweep: job #{job_num} stopped: {err}", file=sys.stderr, flush=True)
        tracking.write_job_failure(sweep_dir, job_num, sweep_overrides, err, None)
        return JobReturn(
            overrides=sweep_overrides, status=JobStatus.COMPLETED, _return_value=math.nan
        )
