"""fer_sweep: Hydra-configured FER2013 experiment sweeps, tracked in MLflow.

Importing it changes nothing in the process: the command-line programs apply their runtime
tuning explicitly (fer_sweep.core.runtime.tune).
"""

__version__ = "0.1.0"
