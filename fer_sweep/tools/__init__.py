"""The tools: what reads finished runs back from MLflow, and the benchmark.

The report (Table 2 / Table 1, seed groups, statistics), ensembles, predict, the benchmark,
the MLflow UI, and the command-line helpers they share (cli).

Rule (checked by tests/test_architecture.py): tools may import the core and the sweep wing's
public names (never a ``_private`` one); nothing in the core or the sweep wing imports a tool.
Each tool's command stays ``python -m fer_sweep.<tool>`` (thin doors in fer_sweep/).
"""
