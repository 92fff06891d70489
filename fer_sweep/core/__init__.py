"""The training core: what trains and evaluates ONE model from a typed config.

The typed schema (config), the data (dataset, sources, synthetic, data), batched augmentation
(augment), the two model builders (models), the training loop (train), the time budget
(budget), signals at safe points (interrupt), process tuning (runtime) and a run's figures
(figures).

Rule (checked by tests/test_architecture.py): the core imports nothing from
``fer_sweep.sweep`` or ``fer_sweep.tools`` and none of MLflow, Hydra or Optuna; OmegaConf only
where the schema turns a composed config into typed dataclasses. Anything that can train a
model from a ``Config`` (a notebook, the benchmark, a search's trial) can use it alone.
"""
