"""The sweep machinery: what turns a Hydra job into a tracked, resumable, signal-safe MLflow run,
and a multirun into one parent run with its jobs as children.

One job (job), the MLflow store and its queries (store), the parent run and the sweep's
callbacks (tracking), a grid checked before it starts (validation), signals in the process
that launched the sweep (signals) and SLURM's preemption and requeue (slurm).

Rule (checked by tests/test_architecture.py): the sweep wing imports the core and never the
tools; it is where MLflow, Hydra and the launchers meet the core.
"""
