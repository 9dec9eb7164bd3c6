"""What produced a result: library versions, device, git revision (recorded by generate, audits and bench)."""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import time
from pathlib import Path

import torch


def _version(dist: str):
    """An installed distribution's version, without importing it (daam would pull in spacy)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def git_revision() -> str | None:
    """HEAD of the checkout fastfair runs from, with "+dirty" when tracked files differ from it; None when
    the package is not the checkout's own ``fastfair/`` (an installed copy inside some other repository)."""
    top = _git("rev-parse", "--show-toplevel")
    here = Path(__file__).resolve().parent
    if not top or (Path(top) / "fastfair").resolve() != here:
        return None
    rev = _git("rev-parse", "HEAD")
    if rev and _git("status", "--porcelain", "--untracked-files=no"):
        rev += "+dirty"
    return rev or None


def device_name(device: torch.device, threads: bool = True) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} logical CPUs" + (f", torch threads {torch.get_num_threads()})" if threads else ")")


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
           "triton": _version("triton"), "diffusers": _version("diffusers"), "transformers": _version("transformers"),
           "xformers": _version("xformers"), "daam": _version("daam"), "fastfair": _version("fastfair"),
           "python": platform.python_version(), "platform": platform.platform(), "git_revision": git_revision(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gb=p.total_memory / 1e9, l2_bytes=getattr(p, "L2_cache_size", None),
                   smem_per_block=getattr(p, "shared_memory_per_block_optin", None),
                   # TF32 (10-bit mantissa) fp32 matmuls / convolutions: fp32 runs are only comparable with the same
                   # settings (cuDNN's default is on; tests/test_triton_engine.py explains what it changes)
                   tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
                   tf32_cudnn=bool(torch.backends.cudnn.allow_tf32))
    from . import native, ops

    env["auto_backend"] = ops.resolve_backend("auto", device)  # what backend="auto" runs here
    env["native_cpu"] = native.cpu_variant()  # which CPU module build runs: portable, v3, v4, native (or None)
    with contextlib.suppress(OSError):
        env["loadavg"] = os.getloadavg()
    return env


def provenance(device) -> dict:
    """``environment`` without the fields that change from call to call (date, load)."""
    device = torch.device(device)
    env = environment(device)
    for k in ("date", "loadavg"):
        env.pop(k, None)
    env["device_name"] = device_name(device, threads=False)  # the same machine, whatever the thread count
    return env
