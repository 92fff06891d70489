"""Process-wide tuning for fer_sweep's own command-line programs, applied explicitly.

Importing fer_sweep changes nothing in the importing process; ``python -m fer_sweep`` and
``python -m fer_sweep.bench`` call :func:`tune` first thing (before torch starts its OpenMP
threads) and log what it did.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's malloc hands blocks above its mmap threshold back to the kernel when they are freed
# and trims the heap's free top, so every CPU training step page-faults its activations (MBs
# each) in again. Keeping freed memory in the heap made cnn2's step 1.2-1.5x faster here and
# steadier (docs/performance.md). Costs up to TRIM_THRESHOLD of idle memory per process.
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap (glibc's default: 128 KiB-32 MiB)
TRIM_THRESHOLD = 256 << 20  # free heap top kept before it is returned (default: 128 KiB, dynamic)

_applied: dict[str, str] | None = None


def keep_freed_memory() -> bool:
    """mallopt(M_MMAP_THRESHOLD), mallopt(M_TRIM_THRESHOLD); False where not glibc or opted out
    (FER_SWEEP_MALLOPT=0)."""
    if os.environ.get("FER_SWEEP_MALLOPT", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(
        mallopt(m_mmap_threshold, MMAP_THRESHOLD) and mallopt(m_trim_threshold, TRIM_THRESHOLD)
    )


# What tune() sets unless the user did (tests/forkserver.py starts its warm interpreter with it).
OMP_WAIT_POLICY_DEFAULT = "PASSIVE"


def tune() -> dict[str, str]:
    """Apply the tuning once per process; returns what is in force (for logs and records).

    - OMP_WAIT_POLICY=PASSIVE unless set: idle OpenMP threads sleep instead of spinning. On a
      shared or oversubscribed CPU (parallel joblib jobs) spinning threads made the small CNN's
      step 3-5x slower here. Only effective before torch starts its thread pool; child
      processes (joblib, submitit) inherit it.
    - glibc malloc keeps freed memory (see keep_freed_memory; FER_SWEEP_MALLOPT=0 opts out).
    """
    global _applied
    if _applied is None:
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY_DEFAULT)
        _applied = {
            "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
            "malloc": "tuned" if keep_freed_memory() else "default",
        }
    return dict(_applied)


def describe() -> str:
    """One line for the job log: what tune() put in force ('not applied' when it was not)."""
    if _applied is None:
        return "runtime tuning not applied"
    return ", ".join(f"{k}={v}" for k, v in _applied.items())
