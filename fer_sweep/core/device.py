"""Where and in what precision a run computes: the device (auto: cuda > mps > cpu), whether
bf16 autocast pays there, and the CUDA kernel settings."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re

import torch

from fer_sweep.errors import ConfigError

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """auto = cuda > mps > cpu; an explicit device that is not there is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise ConfigError(f"device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps.")
    dev = torch.device(name)
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(
            f"trainer.device={name} but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); use trainer.device=auto."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device=mps but MPS is not available; use trainer.device=auto.")
    return dev


def device_name(device: torch.device) -> str:
    """What the device is, for run tags and benchmark records: the GPU's or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (x86 AVX-512-BF16 or AMX): oneDNN then runs
    convolutions and matmuls in bf16 at 1.1-2.5x the fp32 speed (measured here, docs/
    performance.md). Elsewhere bf16 is emulated and slower than fp32."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:  # not Linux: no way to tell cheaply, stay in fp32
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def resolve_precision(setting: str, device: torch.device) -> str:
    """trainer.amp -> the precision a run really uses, "bf16" (autocast) or "fp32".

    auto: bf16 on CUDA devices that support it and on CPUs with native bf16 (every model of
    Table 2 trains faster there; row 1's accuracy matched fp32's: docs/results.md); fp32 on MPS
    and on other CPUs. An explicit bf16 on a device without it is refused.
    """
    if setting == "fp32":
        return "fp32"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        ok = cpu_has_fast_bf16() or (setting == "bf16" and torch.backends.mkldnn.is_available())
    else:
        ok = False
    if setting == "bf16" and not ok:
        raise ConfigError(
            f"trainer.amp=bf16 but {device} cannot run bf16 autocast; use trainer.amp=auto or fp32."
        )
    return "bf16" if ok else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where ``precision`` says so (CUDA or CPU); fp32 is a no-op. On one CPU a
    bf16 run is as deterministic as an fp32 one (same kernels, same order)."""
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer measures work done, not work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def use_cuda_kernels(deterministic: bool) -> None:
    """cuDNN autotuning (cudnn.benchmark: the fastest convolution for each fixed shape; every
    batch but an epoch's last has the same shape) unless deterministic kernels are asked for,
    which cost speed (docs/gpu.md). A CUDA run's process setting; CPU runs are deterministic."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
