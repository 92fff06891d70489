"""Time from the command to the first job of a grid sweep, for 1 job and for N jobs.

    python scripts/sweep_startup.py [--jobs 300] [--repeats 3]

Every job of a grid is validated before the sweep's parent run opens (fer_sweep.sweep.validation);
this measures what that costs: the seconds until Hydra announces job #0, for a 1-job sweep and
for a sweep of N seeds, run alternately (the machine is shared: medians of --repeats pairs).
The sweeps run on the synthetic faces in a temporary folder and are killed once job #0 starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def time_to_first_job(jobs: int, folder: str) -> float:
    seeds = "trainer.seed=0" if jobs == 1 else f"trainer.seed=range(0,{jobs})"
    cmd = [
        sys.executable,
        "-m",
        "fer_sweep",
        "-m",
        "data=synthetic",
        seeds,
        "trainer.epochs=1",
        "data.limit_per_class=2",
        "trainer.progress=false",
        "mlflow.log_model=false",
        "mlflow.figures=false",
        f"mlflow.tracking_uri=sqlite:///{folder}/m{jobs}.db",
        f"hydra.sweep.dir={folder}/sweep{jobs}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if "#0 :" in line:
                return time.perf_counter() - t0
            if "error" in line.lower():
                raise SystemExit(f"sweep failed: {line.strip()}")
        raise SystemExit(f"job #0 never started (exit {proc.wait()})")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    one, many = [], []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            one.append(time_to_first_job(1, folder))
            many.append(time_to_first_job(args.jobs, folder))
    m1, mn = statistics.median(one), statistics.median(many)
    print(f"1 job: {m1:.2f} s ({', '.join(f'{v:.2f}' for v in one)})")
    print(f"{args.jobs} jobs: {mn:.2f} s ({', '.join(f'{v:.2f}' for v in many)})")
    print(f"ratio {mn / m1:.2f} (goal <= 2)")


if __name__ == "__main__":
    main()
