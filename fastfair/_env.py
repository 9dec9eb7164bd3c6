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


def tf32_enabled(kind: str) -> bool | None:
    """Whether fp32 ``matmul`` / ``cudnn`` convolutions run in TF32, read through PyTorch's ``fp32_precision`` API
    where it exists (torch >= 2.9: "tf32" / "ieee", "none" = the global setting) and the legacy ``allow_tf32``
    flags otherwise -- reading a legacy flag raises once the new API was used (transformers' enable_tf32 does);
    None when neither can be read."""
    try:
        if kind == "matmul":
            p = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
        else:
            p = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
        if p == "none":
            p = getattr(torch.backends, "fp32_precision", None)
        if p in ("tf32", "ieee"):
            return p == "tf32"
        return bool(torch.backends.cuda.matmul.allow_tf32 if kind == "matmul" else torch.backends.cudnn.allow_tf32)
    except Exception:  # noqa: BLE001 -- a record field must never fail the run
        return None


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
                   tf32_matmul=tf32_enabled("matmul"), tf32_cudnn=tf32_enabled("cudnn"))
    from . import native, ops

    try:  # what backend="auto" runs here (FASTFAIR_BACKEND naming an unusable backend: recorded, not raised)
        env["auto_backend"] = ops.resolve_backend("auto", device)
    except (RuntimeError, ValueError) as e:
        env["auto_backend"] = f"error: {str(e).splitlines()[0][:200]}"
    env["native_cpu"] = native.cpu_variant()  # which CPU module build runs: portable, v3, v4, native (or None)
    with contextlib.suppress(OSError):
        env["loadavg"] = os.getloadavg()
    return env


def same_environment(a: dict, b: dict) -> bool:
    """Two recorded environments agree on every field both record. A field only one of them has (added to the
    record by a later fastfair, e.g. the TF32 settings) is unknown for the other, not a difference: a run resumed
    after an upgrade is not reported as made in two environments for it."""
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def add_environment(envs: list, env: dict) -> None:
    """Append ``env`` to the run's list unless one already recorded is the same (``same_environment``)."""
    if env and not any(same_environment(e, env) for e in envs):
        envs.append(env)


def provenance(device) -> dict:
    """``environment`` without the fields that change from call to call (date, load)."""
    device = torch.device(device)
    env = environment(device)
    for k in ("date", "loadavg"):
        env.pop(k, None)
    env["device_name"] = device_name(device, threads=False)  # the same machine, whatever the thread count
    return env
