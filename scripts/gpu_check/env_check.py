"""The environment, checked before anything runs: fer_sweep's declared dependencies installed
(at the declared versions) and importable, CUDA working (not in smoke mode), the data there."""

import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import import_module, metadata
from pathlib import Path

import tomllib

repo, out = Path(os.environ["GPU_CHECK_REPO"]), Path(os.environ["GPU_CHECK_OUT"])
smoke = os.environ["GPU_CHECK_SMOKE"] == "1"
info = {
    "python": sys.version.split()[0],
    "executable": sys.executable,
    "platform": platform.platform(),
    "smoke": smoke,
}
problems, warnings = [], []
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

# fer_sweep itself: PYTHONPATH points at this checkout; register it with pip too (offline,
# no dependencies) so that `python -m fer_sweep` works after the check as well.
try:
    info["fer_sweep_installed"] = metadata.version("fer_sweep")
except metadata.PackageNotFoundError:
    if smoke:
        info["fer_sweep_installed"] = None
    else:
        t0 = time.time()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "-e",
                str(repo),
            ],
            capture_output=True,
            text=True,
        )
        info["pip_install_e"] = {
            "rc": r.returncode,
            "seconds": round(time.time() - t0, 1),
            "stderr": r.stderr[-1500:],
        }
        if r.returncode:
            warnings.append(
                "pip install --no-deps --no-build-isolation -e . failed (setuptools "
                ">= 64 missing?); fer_sweep runs from the checkout via PYTHONPATH"
            )

declared = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
ENV = {"extra": ""}


def top_modules(dist):
    """The importable top-level modules of an installed distribution (hydra_plugins.X for
    Hydra's namespace plugins)."""
    mods = set()
    top = (dist.read_text("top_level.txt") or "").split()
    for f in dist.files or []:
        parts = f.parts
        if (
            not parts
            or parts[0].endswith((".dist-info", ".egg-info", ".data"))
            or parts[0] in ("..", "__pycache__")
        ):
            continue
        if parts[0] == "hydra_plugins" and len(parts) > 2:
            mods.add(f"hydra_plugins.{parts[1]}")
        elif parts[0] != "hydra_plugins" and (len(parts) > 1 or parts[0].endswith(".py")):
            name = parts[0][:-3] if parts[0].endswith(".py") else parts[0]
            if name.isidentifier() and not name.startswith("_"):
                mods.add(name)
    if not mods:
        mods = {t for t in top if t.isidentifier()}
    return sorted(mods) or [dist.metadata["Name"].replace("-", "_").lower()]


checked, missing, bad_version, not_importable = {}, [], [], []
for line in declared:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate(ENV):
        continue
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        missing.append(str(req))
        continue
    ver = dist.version
    entry = {"version": ver}
    if req.specifier and not req.specifier.contains(ver, prereleases=True):
        bad_version.append(f"{req} (installed: {ver})")
    mods = top_modules(dist)
    if req.name == "pyyaml":
        mods = ["yaml"]
    entry["modules"] = mods
    for mod in mods:
        try:
            import_module(mod)
        except Exception as err:  # noqa: BLE001 - any import failure is the finding
            not_importable.append(f"{req.name} (import {mod}: {type(err).__name__}: {err})")
    # One level down: what the dependency itself needs (pip would have installed it).
    for sub in dist.requires or []:
        sreq = Requirement(sub)
        if sreq.marker is not None and not sreq.marker.evaluate(ENV):
            continue
        try:
            metadata.distribution(sreq.name)
        except metadata.PackageNotFoundError:
            warnings.append(f"{sreq} (needed by {req.name}) is not installed")
    checked[req.name] = entry
info["dependencies"] = checked
# fer_sweep's own modules: whatever else they import at module level.
for mod in (
    "fer_sweep.sweep.job",
    "fer_sweep.core.train",
    "fer_sweep.tools.bench.cli",
    "fer_sweep.tools.report.cli",
    "fer_sweep.sweep.tracking",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
):
    try:
        import_module(mod)
    except Exception as err:  # noqa: BLE001
        not_importable.append(f"{mod} ({type(err).__name__}: {err})")
if missing:
    problems.append("missing (not installed): " + ", ".join(missing))
if bad_version:
    problems.append("installed at a version fer_sweep does not declare: " + ", ".join(bad_version))
if not_importable:
    problems.append("installed but not importable: " + "; ".join(not_importable))

# torch, CUDA, the GPU.
try:
    import torch

    cuda = torch.cuda.is_available()
    info.update(
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cuda_available=cuda,
        gpu_count=torch.cuda.device_count() if cuda else 0,
        cudnn_benchmark_default=torch.backends.cudnn.benchmark,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        cpu_count=os.cpu_count(),
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            gpu_capability=f"{p.major}.{p.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        try:
            a = torch.randn(256, 256, device="cuda")
            info["cuda_matmul_ok"] = bool(torch.isfinite((a @ a).sum()).item())
        except Exception as err:  # noqa: BLE001
            info["cuda_matmul_ok"] = False
            problems.append(f"a matmul on the GPU failed: {type(err).__name__}: {err}")
    elif not smoke:
        problems.append(
            f"PyTorch sees no CUDA GPU (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
except Exception as err:  # noqa: BLE001
    problems.append(f"import torch failed: {type(err).__name__}: {err}")
try:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()[:300]
    m = re.search(
        r"CUDA Version: ([\d.]+)",
        subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout,
    )
    info["driver_cuda"] = m.group(1) if m else None
except (OSError, subprocess.SubprocessError):
    info["nvidia_smi"] = None

# The data.
if os.environ.get("GPU_CHECK_SYNTHETIC") == "1":
    info["data"] = "synthetic (data=synthetic)"
else:
    root = os.environ.get("FER2013_ROOT", "")
    info["data"] = root
    if not root or not (Path(root, "train").is_dir() and Path(root, "test").is_dir()):
        problems.append(
            f"FER2013_ROOT={root!r} must point at FER2013's image folders (train/ "
            "and test/), e.g. FER2013_ROOT=/data/fer2013 bash scripts/gpu_check.sh "
            "(or GPU_CHECK_OVERRIDES=data=synthetic to try the script)"
        )

info["problems"], info["warnings"] = problems, warnings
(out / "env.json").write_text(json.dumps(info, indent=2))
for key in (
    "python",
    "torch",
    "torch_cuda",
    "cudnn",
    "driver_cuda",
    "gpu_name",
    "gpu_memory_gib",
    "gpu_capability",
    "bf16_supported",
    "nvidia_smi",
    "data",
):
    print(f"{key:16s} {info.get(key)}")
for w in warnings:
    print(f"warning: {w}")
if problems:
    print(
        "\ngpu_check: the environment is not ready; nothing was installed. Fix this first:",
        file=sys.stderr,
    )
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    if missing or bad_version:
        print(
            "  (offline: pip install --no-index --find-links /path/to/wheels <package>)",
            file=sys.stderr,
        )
    sys.exit(1)
print("environment ok")
