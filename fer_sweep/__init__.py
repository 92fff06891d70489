"""fer_sweep: Hydra-configured FER2013 experiment sweeps, tracked in MLflow."""

import os

# Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning. On a
# shared or oversubscribed CPU (other users, parallel joblib jobs) spinning threads made the
# small CNN's training step 3-5x slower here (240 vs 980 img/s for cnn2 at load 5 on 2 cores).
# Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
