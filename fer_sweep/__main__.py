"""``python -m fer_sweep [-m] [overrides]``: the Hydra entry point for training runs and sweeps."""

from __future__ import annotations

import logging
import math
import sys
import traceback

from fer_sweep.core import runtime

runtime.tune()  # before torch starts its OpenMP threads (this is the program, not a library)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from fer_sweep.errors import FerSweepError  # noqa: E402
from fer_sweep.sweep import tracking  # noqa: E402

log = logging.getLogger("fer_sweep")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Train one configuration; returns the best validation accuracy for Hydra's sweepers. A
    search's worker job (sweep.worker set by the Optuna sweeper) runs trials until the study
    has its trials instead.

    In a multirun a failed job is recorded (MLflow run FAILED, a note for the sweep's summary)
    and NaN is returned so that its siblings still run; the sweep then exits non-zero.
    """
    from fer_sweep.core.config import validate
    from fer_sweep.core.interrupt import Interrupted, exit_status
    from fer_sweep.sweep.compose import hydra_job

    multirun, sweep_dir, job_num, overrides = hydra_job()
    try:
        if multirun and cfg.get("sweep", {}).get("worker") is not None:
            from fer_sweep.sweep import searcher

            return searcher.work(cfg)
        validate(cfg)  # a setting's error in ~1 s, before torch and MLflow load (~3 s more)
        from fer_sweep.sweep.job import run_job

        return run_job(cfg)
    except (Interrupted, KeyboardInterrupt) as err:
        if multirun:  # the whole sweep stops: its parent run is marked KILLED too
            tracking.interrupted_sweep(sweep_dir, getattr(err, "signum", 2))
        sys.exit(exit_status(err))
    except Exception as err:
        if not multirun:
            if isinstance(err, FerSweepError):
                print(f"fer_sweep: error: {err}", file=sys.stderr)
                sys.exit(2)
            raise
        if not isinstance(err, FerSweepError):
            traceback.print_exc()
        print(f"fer_sweep: job #{job_num} failed: {err}", file=sys.stderr)
        tracking.write_job_failure(sweep_dir, job_num, overrides, err, None)
        if sweep_dir is not None:  # over too: "job k/N" reaches N, its time left out of the pace
            from fer_sweep.sweep import progress

            progress.job_finished(sweep_dir, job_num, trained=False)
        return math.nan


if __name__ == "__main__":
    main()
