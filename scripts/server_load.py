"""How much does a lab's tracking server take? Eight processes at once (a SLURM array's shape),
each logging 100 epochs of the six per-epoch metrics as fer_sweep's jobs do (one batched
request per epoch), against three servers started one after another in this run:

- PostgreSQL behind MLflow's basic-auth app, logins cached 60 s (docs/reliability.md's setup);
- the same with the login cache off (MLflow's default: every request re-hashes the password);
- an open server on a sqlite file (what a single user starts).

Each server is checked afterwards: every run has every metric at every epoch.

    python scripts/server_load.py [--procs 8] [--json runs/server_load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' server helpers

from tests.mlflow_server import free_port  # noqa: E402
from tests.team_server import ADMIN, ALICE, TeamServer, _env, load, postgres  # noqa: E402

EPOCHS, METRICS = 100, 6


def measure(server: TeamServer, procs: int) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    server.start()
    try:
        env = server.env(ALICE)
        with _env(server.env(ADMIN)):
            if server.auth:
                server.admin().create_user(ALICE, server.passwords[ALICE])
        with _env(env):
            client = MlflowClient(server.url)
            exp_id = client.create_experiment(f"load-{time.time_ns()}")
            t0 = time.perf_counter()
            results = load(server.url, {**os.environ, **env}, exp_id, procs)
            wall = time.perf_counter() - t0
            lost = sum(
                EPOCHS - len({m.step for m in client.get_metric_history(run_id, key)})
                for run_id, _ in results
                for key in ("train_loss", "val_acc", "epoch_seconds")
            )
    finally:
        server.stop()
    requests = procs * EPOCHS
    return {
        "wall_s": round(wall, 1),
        "requests_per_s": round(requests / wall, 1),
        "metrics_per_s": round(requests * METRICS / wall, 1),
        "slowest_process_s": round(max(s for _, s in results), 1),
        "metrics_lost": lost,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    out: dict[str, object] = {"host": platform.processor(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp_name, postgres(Path(tmp_name)) as pg:
        tmp = Path(tmp_name)
        for name, db, auth, cache in (
            ("postgresql_basic_auth_cache60", "mlflow", True, 60),
            ("postgresql_basic_auth_nocache", "mlflow2", True, 0),
            ("sqlite_open", None, False, 0),
        ):
            root = tmp / name
            root.mkdir()
            if db == "mlflow2":
                pg.sql("CREATE DATABASE mlflow2")
                pg.sql("CREATE DATABASE auth2")
            backend = f"sqlite:///{root / 'mlflow.db'}" if db is None else pg.url(db)
            server = TeamServer(
                f"http://127.0.0.1:{free_port()}",
                pg,
                {ADMIN: "admin-" + os.urandom(8).hex(), ALICE: "alice-" + os.urandom(8).hex()},
                root,
                backend=backend,
                auth=auth,
                auth_cache_s=cache,
                auth_db="auth2" if db == "mlflow2" else "auth",
            )
            out[name] = measure(server, args.procs)
            print(name, out[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
