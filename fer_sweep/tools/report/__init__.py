"""The report: the study's Table 2 / Table 1 and comparison figures, rebuilt from what a sweep
logged in MLflow, and logged back onto the sweep's parent run (``python -m fer_sweep.report``).

Everything comes from the store (params, metrics, the config.yaml / data.json artifacts), never
from the sweep folder, so a report can be regenerated later, elsewhere, from the store alone.
It works for any sweep: rows are the parent's child runs, and the settings that differ between
them become columns. Rows whose model is one of the study's get its reported accuracy beside
ours; every other row simply has no reference.

One job a module: ``study`` (the study's numbers and words), ``runs`` (rows and seed groups from
MLflow), ``tables`` (markdown and CSV records), ``cli`` (the command: write, log, print).
"""
