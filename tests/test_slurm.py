"""``hydra/launcher=slurm`` against a real one-node SLURM cluster on this machine (munged,
slurmctld, slurmd: tests/slurm_cluster.py; skipped where the binaries are absent, and `.ci/run`
installs them). Sweeps are submitted as a user does, with ``python -m fer_sweep -m``:

- a 2-job sweep lands FINISHED child runs under one FINISHED parent, each tagged with its SLURM
  job id, the jobs' logs under the sweep folder, and no "Bypassing sacct error" noise on this
  cluster without accounting;
- preemption: one job requeued by the scheduler (``scontrol requeue``), one sent SIGTERM
  (``scancel --signal=TERM``) mid-training; both come back and continue the SAME MLflow run from
  their checkpoints, ending with exactly the per-epoch and test metrics of uninterrupted runs;
- jobs that could never start (the preset's GPU on a partition without GPUs, an unknown
  partition) and jobs sbatch refuses are one clear error within seconds, nothing left queued.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fer_sweep.errors import FerSweepError
from fer_sweep.sweep.slurm import check_cluster
from tests.conftest import REPO, migrated_store, run_cli, start_cli
from tests.slurm_cluster import PARTITION, Cluster, one_node_cluster, unavailable

slow = pytest.mark.slow  # tests that start the CLI and submit real SLURM jobs
pytestmark = pytest.mark.xdist_group("slurm")  # one cluster, in one worker

CPU_JOBS = [
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
]
TINY = [
    "data=synthetic",
    "data.limit_per_class=5",
    "trainer.progress=false",
    "mlflow.log_model=false",
    "mlflow.figures=false",
]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with one_node_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def _env(cluster: Cluster) -> dict[str, str]:
    """The cluster for sbatch & co.; this checkout for the jobs, whatever is installed."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "SLURM_CONF": cluster.env["SLURM_CONF"],
        "PATH": cluster.env["PATH"],
        "PYTHONPATH": path,
    }


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fer_sweep")
    return client.search_runs([exp.experiment_id], max_results=100) if exp else []


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _family(uri: str, n: int) -> tuple:
    """One FINISHED parent with exactly n FINISHED children (no extra runs: a requeued job
    continued its own)."""
    runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("fer_sweep.role") == "parent"]
    jobs = [r for r in runs if r.data.tags.get("fer_sweep.role") == "job"]
    assert len(parents) == 1 and len(jobs) == n, [(r.info.run_name, r.info.status) for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED", parent.data.tags.get("fer_sweep.error")
    assert parent.data.metrics["jobs"] == n and parent.data.metrics["jobs_failed"] == 0
    for run in jobs:
        assert run.info.status == "FINISHED", run.data.tags.get("fer_sweep.error")
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    return parent, jobs


@slow
def test_sweep_lands_finished_runs_tagged_with_their_slurm_jobs(
    cluster: Cluster, tmp_path: Path
) -> None:
    uri = migrated_store(tmp_path / "m.db")
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            *CPU_JOBS,
            "model=cnn2,cnn3",
            "trainer.epochs=1",
            *TINY,
            f"mlflow.tracking_uri={uri}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        timeout=300,
        env=_env(cluster),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:] + cluster.logs()
    parent, jobs = _family(uri, 2)
    assert parent.data.tags["fer_sweep.launcher"].endswith(
        "fer_sweep_plugin.submitit_launcher.SlurmLauncher"
    )
    assert {r.data.tags["model"] for r in jobs} == {"cnn2", "cnn3"}

    # one array job, one task per run; each run names its task
    ids = sorted(r.data.tags["fer_sweep.slurm_job_id"] for r in jobs)
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1"]
    for run in jobs:
        jid = run.data.tags["fer_sweep.slurm_job_id"]
        state = _ended(cluster, jid)
        assert "JobState=COMPLETED" in state, state
        log = sweep / ".submitit" / jid / f"{jid}_0_log.out"  # the job's own log, in the sweep
        assert log.exists() and "Job completed successfully" in log.read_text(errors="replace")
    assert sorted(p.name for p in sweep.glob("[0-9]/fer_sweep.log")) == ["fer_sweep.log"] * 2

    # no accounting on this cluster: followed with squeue, said once, no sacct noise
    assert out.count("SLURM accounting is off") == 1, out[-3000:]
    assert "Bypassing sacct" not in out and "accounting storage is disabled" not in out


@slow
def test_a_search_runs_its_workers_as_slurm_tasks_sharing_one_journal(
    cluster: Cluster, tmp_path: Path
) -> None:
    """hydra/sweeper=optuna on the cluster: two worker tasks of one array job take trials from
    one study (a journal in the sweep folder, on the file system the nodes share) until the
    study has its trials; each trial is a FINISHED child run that names its SLURM task."""
    uri = migrated_store(tmp_path / "m.db")
    sweep = tmp_path / "sweep"
    proc = run_cli(
        [
            "-m",
            "hparams_search=cnn2_optuna",
            *CPU_JOBS,
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.n_trials=4",
            "hydra/sweeper/pruner=none",
            "trainer.epochs=1",
            "trainer.threads=1",
            *TINY,
            f"mlflow.tracking_uri={uri}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        timeout=300,
        env=_env(cluster),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + cluster.logs()
    runs = _runs(uri)
    (parent,) = [r for r in runs if r.data.tags.get("fer_sweep.role") == "parent"]
    trials = [r for r in runs if "fer_sweep.trial_number" in r.data.tags]
    assert parent.info.status == "FINISHED", parent.data.tags.get("fer_sweep.error")
    assert parent.data.tags["fer_sweep.study_storage"] == str(sweep / "optuna.journal")
    assert sorted(int(r.data.tags["fer_sweep.trial_number"]) for r in trials) == [0, 1, 2, 3]
    for r in trials:
        assert r.info.status == "FINISHED" and r.data.tags["fer_sweep.trial_state"] == "COMPLETE"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    tasks = {r.data.tags["fer_sweep.slurm_job_id"] for r in trials}
    array = next(iter(tasks)).split("_")[0]
    assert tasks <= {f"{array}_0", f"{array}_1"}, tasks  # the workers: one array job's tasks
    for jid in (f"{array}_0", f"{array}_1"):
        assert "JobState=COMPLETED" in _ended(cluster, jid)


@slow
def test_preempted_jobs_continue_their_run_with_exactly_the_uninterrupted_metrics(
    cluster: Cluster, tmp_path: Path
) -> None:
    epochs = 40
    args = [
        "model=cnn2",
        "trainer.seed=1,2",
        f"trainer.epochs={epochs}",
        "trainer.device=cpu",  # exact resume is a CPU guarantee
        "trainer.threads=1",
        "trainer.checkpoint_every_s=0",  # a checkpoint every epoch
        *(o for o in TINY if not o.startswith("data.limit_per_class=")),
        # 20 faces a class: epochs long enough (~0.1 s) that both jobs are still training when
        # the signals go out (at 5, a job on a quiet machine could finish its 40 first)
        "data.limit_per_class=20",
    ]
    env = _env(cluster)
    ref_uri = migrated_store(tmp_path / "ref.db")
    uri = migrated_store(tmp_path / "m.db")
    MlflowClient(uri).search_experiments()  # create the store before polling it
    # the uninterrupted runs (basic launcher) alongside the SLURM sweep
    ref = _popen(
        ["-m", *args, f"mlflow.tracking_uri={ref_uri}", f"hydra.sweep.dir={tmp_path / 'ref'}"],
        tmp_path,
        env,
    )
    sweep = tmp_path / "sweep"
    proc = _popen(
        [
            "-m",
            *CPU_JOBS,
            "hydra.launcher.max_num_timeout=1",
            *args,
            f"mlflow.tracking_uri={uri}",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        env,
    )
    try:
        # Both jobs training, two epochs logged each: one is requeued by the scheduler, the
        # other gets SIGTERM (a preemption notice) in the middle of its training.
        jobs = _wait_for_epochs(uri, 2, proc, limit=240)
        by_seed = {r.data.params["trainer.seed"]: r for r in jobs}
        requeued = by_seed["1"].data.tags["fer_sweep.slurm_job_id"]
        signalled = by_seed["2"].data.tags["fer_sweep.slurm_job_id"]
        cluster.run("scontrol", "requeue", requeued)
        cluster.run("scancel", "--signal=TERM", signalled)
        for run in jobs:  # still mid-training when the signals went out
            assert len(_history(uri, run.info.run_id, "val_acc")) < epochs - 2
        out, _ = proc.communicate(timeout=300)
        ref_out, _ = ref.communicate(timeout=300)
    finally:
        for p in (proc, ref):
            if p.poll() is None:
                p.kill()
    assert ref.returncode == 0, ref_out[-3000:]
    assert proc.returncode == 0, out[-4000:] + cluster.logs()

    _, runs = _family(uri, 2)  # the same two runs, continued: no third run
    assert {r.info.run_id for r in runs} == {r.info.run_id for r in jobs}
    _, ref_runs = _family(ref_uri, 2)
    ref_by_seed = {r.data.params["trainer.seed"]: r for r in ref_runs}
    for run in runs:
        seed = run.data.params["trainer.seed"]
        reference = ref_by_seed[seed]
        for key in ("train_loss", "val_loss", "val_acc"):
            got = _history(uri, run.info.run_id, key)
            assert len(got) == epochs and got == _history(ref_uri, reference.info.run_id, key), (
                seed,
                key,
            )
        for key in ("test_acc", "test_loss", "best_val_acc", "best_epoch"):
            assert run.data.metrics[key] == reference.data.metrics[key], (seed, key)
        assert not (tmp_path / "checkpoints" / f"{run.info.run_id}.pt").exists()

    # each came back once, said why, and continued its own run
    for jid, why in ((requeued, "SLURM requeued job"), (signalled, "requeued (1 of")):
        state = _ended(cluster, jid)
        assert "Restarts=1" in state and "JobState=COMPLETED" in state, state
        log = (sweep / ".submitit" / jid / f"{jid}_0_log.out").read_text(errors="replace")
        run_id = next(r.info.run_id for r in runs if r.data.tags["fer_sweep.slurm_job_id"] == jid)
        assert why in log and f"continuing MLflow run {run_id}" in log, log[-3000:]


@slow
def test_the_presets_gpu_on_a_partition_without_gpus_is_refused_before_submitting(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The preset's defaults (one GPU per job) on this GPU-less cluster: jobs SLURM would keep
    PENDING forever. One error within seconds, naming the fix; no run, nothing queued."""
    uri = migrated_store(tmp_path / "m.db")
    name = f"refused-{tmp_path.name}"
    started = time.monotonic()
    error = _refused(cluster, tmp_path, uri, "hydra/launcher=slurm", f"hydra.launcher.name={name}")
    assert f"partition '{PARTITION}'" in error and "wait in the queue forever" in error
    assert "1 GPU(s)" in error and "no GPUs" in error, error
    assert "hydra.launcher.gpus_per_node=0" in error, error
    assert time.monotonic() - started < 60
    assert not _runs(uri)  # refused before the parent run opened
    assert not [j for j in cluster.jobs() if j["name"] == name]  # nothing submitted


@pytest.mark.parametrize(
    ("launcher", "says", "fix"),
    [
        (
            {"partition": "nosuch"},
            "hydra.launcher.partition=nosuch: no such partition on this cluster",
            f"(partitions: {PARTITION};",
        ),
        (
            {"gpus_per_node": 2},
            "each job asks 2 GPU(s), the partition has no GPUs",
            "gpus_per_node=0",
        ),
        ({"gres": "gpu:1"}, "each job asks 1 GPU(s)", "gpus_per_node=0"),
        ({"additional_parameters": {"gpus-per-task": 1}}, "asks 1 GPU(s)", "gpus_per_node=0"),
        ({"cpus_per_task": 4096}, "cpus_per_task=4096, its nodes have at most", "cpus_per_task="),
        ({"mem_gb": 100000}, "mem_gb=100000, its nodes have at most", "set hydra.launcher.mem_gb="),
    ],
    ids=["unknown-partition", "gpus", "gres", "sbatch-gpus", "cpus", "memory"],
)
def test_what_the_partition_lacks_is_named_with_its_fix(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, launcher: dict, says: str, fix: str
) -> None:
    """The check before submitting, against this cluster's own `sinfo` (its default partition
    when none is named)."""
    for var in ("SLURM_CONF", "PATH"):
        monkeypatch.setenv(var, cluster.env[var])
    fits = {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1}
    check_cluster(fits)  # what fits passes
    with pytest.raises(FerSweepError) as err:
        check_cluster({**fits, **launcher})
    assert says in str(err.value) and fix in str(err.value).split(says)[-1], str(err.value)


@slow
def test_sbatch_refusal_is_one_clear_error(cluster: Cluster, tmp_path: Path) -> None:
    """What only sbatch can judge (here a node that does not exist) is its own error, shown
    once, with the sweep's parent run marked FAILED with it."""
    uri = migrated_store(tmp_path / "m.db")
    error = _refused(
        cluster,
        tmp_path,
        uri,
        *CPU_JOBS,
        "+hydra.launcher.additional_parameters.nodelist=nosuchnode",
    )
    assert "sbatch refused" in error, error
    assert "nosuchnode" in error or "node" in error.lower(), error
    (parent,) = _runs(uri)
    assert parent.info.status == "FAILED"
    assert "sbatch refused" in parent.data.tags["fer_sweep.error"]


def _refused(cluster: Cluster, tmp_path: Path, uri: str, *launcher: str) -> str:
    """A 2-job sweep with these launcher settings, which must stop with exit status 2 and
    exactly one `fer_sweep: error:` line (returned), no traceback."""
    proc = run_cli(
        [
            "-m",
            *launcher,
            "model=cnn2,cnn3",
            "trainer.epochs=1",
            *TINY,
            f"mlflow.tracking_uri={uri}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        timeout=120,
        env=_env(cluster),
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fer_sweep: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


def _popen(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return start_cli(args, cwd, env)


def _wait_for_epochs(uri: str, n: int, proc: subprocess.Popen[str], limit: float) -> list:
    """The sweep's two job runs, once each has logged n epochs."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before its jobs trained: {proc.stdout.read()[-3000:]}")
        jobs = [r for r in _runs(uri) if r.data.tags.get("fer_sweep.role") == "job"]
        if len(jobs) == 2 and all(len(_history(uri, r.info.run_id, "val_acc")) >= n for r in jobs):
            return jobs
        time.sleep(0.1)
    pytest.fail(f"the jobs never logged {n} epochs")


def _ended(cluster: Cluster, jid: str, limit: float = 60) -> str:
    """The job as slurmctld shows it once it has ended (its result is written a moment before
    its process exits)."""
    deadline = time.monotonic() + limit
    while True:
        state = cluster.run("scontrol", "show", "job", "-o", jid).stdout
        if "JobState=RUNNING" not in state and "JobState=COMPLETING" not in state:
            return state
        if time.monotonic() > deadline:
            return state
        time.sleep(0.5)
