"""fer_sweep: Hydra-configured FER2013 experiment sweeps, tracked in MLflow."""

__version__ = "0.1.0"
