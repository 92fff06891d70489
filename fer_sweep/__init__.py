"""fer_sweep: Hydra-configured FER2013 experiment sweeps, tracked in MLflow."""

import os

# Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning. On a
# shared or oversubscribed CPU (other users, parallel joblib jobs) spinning threads made the
# small CNN's training step 3-5x slower here (240 vs 980 img/s for cnn2 at load 5 on 2 cores).
# Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# glibc's malloc hands blocks above its mmap threshold back to the kernel when they are freed
# and trims the heap's free top, so every CPU training step page-faults its activations (MBs
# each) in again. Keeping freed memory in the heap made cnn2's step 1.2-1.5x faster here and
# steadier (README, Performance). Costs up to TRIM_THRESHOLD of idle memory per process.
# FER_SWEEP_MALLOPT=0 keeps glibc's defaults.
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap (glibc's default: 128 KiB-32 MiB)
TRIM_THRESHOLD = 256 << 20  # free heap top kept before it is returned (default: 128 KiB, dynamic)


def _keep_freed_memory() -> bool:
    """mallopt(M_MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD); False where not glibc or opted out."""
    if os.environ.get("FER_SWEEP_MALLOPT", "1") == "0":
        return False
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)
                and mallopt(m_trim_threshold, TRIM_THRESHOLD))


MALLOC_TUNED = _keep_freed_memory()
