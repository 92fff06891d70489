"""One progress line for every multirun, grids and searches alike:
``job 3/6 · 1 h 12 elapsed · ETA 2 h 40``, in the job's log and on the console.

The ETA is this command's own pace: the time since the sweep started here, divided by the jobs
(or trials) finished here, times what is left; a resumed sweep's earlier jobs count as done.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("fer_sweep")

DONE_DIR = ".done"  # one empty file per finished job of a grid, in the sweep folder
TRAINED_DIR = ".trained"  # ... and per job that trained in it (not skipped by sweep.resume)


def _duration(seconds: float) -> str:
    """1 h 12 / 14 min / 40 s."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d}"
    if seconds >= 60:
        return f"{int(seconds // 60)} min"
    return f"{int(seconds)} s"


def progress_line(what: str, done: int, total: int, elapsed: float, done_here: int) -> str:
    """``job 3/6 · 1 h 12 elapsed · ETA 2 h 40``: the ETA from this command's own pace."""
    line = f"{what} {done}/{total} · {_duration(elapsed)} elapsed"
    if 0 < done_here and done < total:
        line += f" · ETA {_duration(elapsed / done_here * (total - done))}"
    return line


def say_progress(line: str) -> None:
    """On the console (stderr, also from a worker process) and in the job's log."""

    log.info(line)
    print(f"fer_sweep: {line}", file=sys.stderr, flush=True)


def job_finished(sweep_dir: Path, job_num: int, trained: bool = True) -> None:
    """A grid's job is over (finished, failed or skipped): say where the sweep stands; the ETA
    comes from the jobs that trained here (one that sweep.resume skipped took no time)."""
    from fer_sweep.sweep.tracking import parent_info

    info = parent_info(sweep_dir)
    total = None if info is None else info.get("grid_size")
    if not total:
        return
    for folder in (DONE_DIR, TRAINED_DIR) if trained else (DONE_DIR,):
        (sweep_dir / folder).mkdir(exist_ok=True)
        (sweep_dir / folder / str(job_num)).touch()
    done, here = (len(list((sweep_dir / f).glob("*"))) for f in (DONE_DIR, TRAINED_DIR))
    elapsed = time.time() - float(info.get("started", time.time()))
    say_progress(progress_line("job", done, int(total), elapsed, here))
