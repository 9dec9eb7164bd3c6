"""Host-side cost of the Triton backend's launchers, measured on a CPU-only machine.

What it measures: microseconds per call of ``triton_ops.cross_attention_fwd`` / ``cross_attention_bwd``
in steady state (kernels already compiled), through Triton's real *non-interpreter* launch path --
``Autotuner.run`` / ``JITFunction.run`` (binder, specialisation, cache key, in-memory kernel cache) --
plus fastfair's own wrapper and the torch ops it issues. GPU work is not measured: a fake "active
driver" whose target is ``GPUTarget("cuda", 90, 32)`` makes Triton compile every kernel for sm_90
for real (as tests/test_triton_compile.py does), but binary loading and the launcher are no-op
stand-ins, and the tensors are CPU tensors (``data_ptr`` is all the launch path reads).

Per case it reports the median us per call (of ``--calls`` calls after a warm-up), and per call:
compiles (``JITFunction._do_compile``), binder calls (``JITFunction.run``), autotuner runs and key
misses, launcher calls and ATen ops issued (counted with a ``TorchDispatchMode``; on CUDA each is a
host-side dispatch of several us, on CPU here they cost little). ``--wrapper-only`` replaces
every kernel launch by a no-op (what fastfair's Python alone costs); ``--no-direct`` keeps every launch
on Triton's ``JITFunction.run`` (what launching the checked compiled kernel directly saves, see
``triton_ops._Site``). ``--profile`` prints the cProfile top of each case. The last row is
bench/bench_call_overhead.py's "maps -> dq, forward + backward": ``ops.cross_attention`` and autograd.

Not measured: the C launcher (``cuLaunchKernel`` and its argument packing), CUDA allocator and
kernel-launch costs of the torch ops (counted, not timed), GPU time.

    FASTFAIR_CACHE=/tmp/ffcache python bench/triton_host_overhead.py [--shape tiny|sd] \
        [--dtype fp32|fp16] [--autotune 0|1] [--calls 300] [--profile] [--wrapper-only | --no-direct] \
        [--device cuda]

``--device cuda`` (on a GPU machine) uses the real driver, CUDA tensors and a sync after each call: the
same columns, with compiles / JIT runs per call telling whether the in-memory kernel cache hits there.

The first run compiles the kernels for sm_90 (a minute or two on 2 cores; Triton's disk cache keeps
them). ``--shape sd`` timings include the CPU arithmetic of the torch ops (partial-sum reductions),
which a GPU does not pay on the host: read its op counts, not its times. Written against Triton 3.9 and
run with 3.9 and 3.6 (the GPU machines' version, installed in a separate venv); the Triton internals it
touches (driver config, ``DriverBase``, ``JITFunction._do_compile`` / ``run``, ``Autotuner.run`` /
``prune_configs``) are looked up defensively: one that is missing is named in the header line and its
column reads 0.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real launch path, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as tests/test_triton_compile.py (silences 3.9)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench_call_overhead import time_call  # noqa: E402  (bench/ is on sys.path as this script's folder)

COUNTS: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------------------------
# the fake driver
# --------------------------------------------------------------------------------------------

def _gpu_target():
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # older layouts
        from triton.compiler.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


class _FakeUtils:
    """Stands in for the CUDA driver's utils module: loading a binary returns dummy handles."""

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "max_num_regs": 65536, "multiprocessor_count": 132,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144}

    def load_binary(self, name, kernel, shared, device):
        COUNTS["load_binary"] += 1
        return 1, 1, 64, 0, 1024  # module, function, n_regs, n_spills, n_max_threads

    def unload_module(self, module):
        pass

    def __getattr__(self, name):  # anything else a Triton version asks for: a no-op
        return lambda *a, **k: None


class _FakeLauncher:
    """The per-kernel launcher: only counts (the real one is C: argument parsing and cuLaunchKernel)."""

    def __init__(self, src, metadata):
        COUNTS["launcher_init"] += 1

    def __call__(self, *args):
        COUNTS["launch"] += 1


def _fake_do_bench(fn, *args, quantiles=None, **kwargs):
    """The autotuner's benchmark: run the config once, report a fixed time (the first config wins)."""
    fn()
    return [1.0, 1.0, 1.0] if quantiles is not None else 1.0


def _make_driver():
    from triton.backends.driver import DriverBase

    class FakeCudaDriver(DriverBase):
        def __init__(self):
            self.utils = _FakeUtils()
            self.launcher_cls = _FakeLauncher
            self.target = _gpu_target()

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return self.target

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            return _fake_do_bench

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return (9, 0)

        def get_device_interface(self):
            return torch.cuda

        def get_empty_cache_for_benchmark(self):
            return torch.empty(16, dtype=torch.int)

        def clear_cache(self, cache):
            pass

    return FakeCudaDriver()


def install_fake_driver():
    import importlib

    cfg = importlib.import_module("triton.runtime.driver").driver  # the DriverConfig object
    fake = _make_driver()
    if hasattr(cfg, "set_active"):
        cfg.set_active(fake)
    else:  # pragma: no cover - older Triton: attribute assignment
        cfg._active = fake
    return fake


def install_counters():
    """Wrap the Triton internals worth counting; returns what could not be hooked."""
    from triton.runtime import autotuner as at
    from triton.runtime import jit

    missing = []

    def wrap(owner, name, counter):
        f = getattr(owner, name, None)
        if f is None:
            missing.append(f"{owner.__name__}.{name}")
            return

        def w(*a, **k):
            COUNTS[counter] += 1
            return f(*a, **k)
        setattr(owner, name, w)

    wrap(jit.JITFunction, "_do_compile", "compile")
    wrap(jit.JITFunction, "run", "jit_run")
    wrap(at.Autotuner, "run", "autotune_run")
    wrap(at.Autotuner, "prune_configs", "autotune_key_miss")
    return missing


class _OpCounter(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        COUNTS["aten"] += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------

def make_cases(T_, shape: str, dtype: torch.dtype, device: str = "cpu"):
    """(name, callable) pairs, as bench/bench_call_overhead.py calls the backend (tiny: 1x1x4x8
    queries, 3 keys, one map token) or an SD 1.5 cross-attention layer (2x8x4096x40, 77 keys, 4 tokens,
    diffusers' transposed layout)."""
    g = torch.Generator().manual_seed(0)
    if shape == "tiny":
        B, H, Nq, Nk, D, T = 1, 1, 4, 3, 8, 1

        def mk(n):
            return torch.randn(B, H, n, D, generator=g).to(dtype=dtype, device=device)
    else:
        B, H, Nq, Nk, D, T = 2, 8, 4096, 77, 40, 4

        def mk(n):
            return torch.randn(B, n, H * D, generator=g).to(dtype=dtype, device=device).view(B, n, H, D).transpose(1, 2)
    q, k, v = mk(Nq), mk(Nk), mk(Nk)
    tok = torch.arange(1, T + 1, device=device).repeat(B, 1)
    scale = D ** -0.5
    out, lse, mlse, maps = T_.cross_attention_fwd(q, k, v, None, tok, scale, False)
    dout = torch.ones_like(out)
    dmaps = torch.ones_like(maps)
    rows = [
        ("fwd, no maps", lambda: T_.cross_attention_fwd(q, k, v, None, None, scale, False)),
        ("fwd, maps", lambda: T_.cross_attention_fwd(q, k, v, None, tok, scale, False)),
        ("bwd, maps -> dq", lambda: T_.cross_attention_bwd(q, k, v, None, tok, scale, False, out, lse, mlse,
                                                            None, dmaps, (True, False, False, False))),
        ("bwd, full (dout + maps -> dq, dk, dv)",
         lambda: T_.cross_attention_bwd(q, k, v, None, tok, scale, False, out, lse, mlse, dout, dmaps,
                                        (True, True, True, False))),
    ]
    try:  # what bench/bench_call_overhead.py's last row times: the public op, forward + autograd backward
        from fastfair import ops

        be = ops._BACKENDS["triton"]
        if device == "cpu":
            be.usable = lambda dev: True  # the fake driver stands in for CUDA
        qg = q.detach().clone().requires_grad_(True)

        def fwd_bwd():
            _, m = ops.cross_attention(qg, k, v, map_tokens=tok, backend="triton")
            m.sum().backward()

        fwd_bwd()
        rows.append(("ops.cross_attention maps -> dq, fwd + autograd bwd", fwd_bwd))
    except Exception as e:  # an ops API this version of the script does not know
        print(f"(ops.cross_attention row left out: {type(e).__name__}: {e})")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=("tiny", "sd"), default="tiny")
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    ap.add_argument("--autotune", choices=("0", "1"), default="1")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--profile", action="store_true", help="print the cProfile top of each case")
    ap.add_argument("--wrapper-only", action="store_true", help="no kernel launch at all (fastfair's Python alone)")
    ap.add_argument("--no-direct", action="store_true",
                    help="launch every kernel through Triton's JITFunction.run (no direct compiled-kernel launch)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: no fake driver, real CUDA tensors and launches, sync after each call (the same "
                         "counts on a GPU machine; the launch counter then reads n/a)")
    a = ap.parse_args()
    os.environ["FASTFAIR_TRITON_AUTOTUNE"] = a.autotune
    torch.set_num_threads(1)

    if a.device == "cpu":
        install_fake_driver()
    missing = install_counters()
    from fastfair.kernels import triton_ops as T_

    T_._OVERRIDE["TARGET_PROGRAMS"] = 2 * 132  # as on an H100 / H200 (CPU tensors would give 1)
    if a.wrapper_only:
        T_._launch = lambda *args, **kw: None
        if hasattr(T_, "_Site"):
            T_._Site.__call__ = lambda self, args: None
    if a.no_direct and hasattr(T_, "_Site"):
        def _no_direct(self, kernel, args):
            self.state = -1
        T_._Site._adopt = _no_direct
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    t0 = time.perf_counter()
    cases = make_cases(T_, a.shape, dtype, a.device)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    for _, f in cases:  # compile everything first (disk cache after the first run)
        f()
    print(f"triton {triton.__version__}, torch {torch.__version__}, shape {a.shape}, {a.dtype}, "
          f"autotune {a.autotune}, {a.device}{', wrapper only' if a.wrapper_only else ''}"
          f"{', no direct launch' if a.no_direct else ''}; warm-up/compile "
          f"{time.perf_counter() - t0:.1f} s" + (f"; not hooked: {', '.join(missing)}" if missing else ""))
    print("| case | us/call | compiles | jit runs | autotune runs | autotune key misses | launches | aten ops |")
    print("|---|---|---|---|---|---|---|---|")
    for name, f in cases:
        us = time_call(f, a.calls, sync)
        COUNTS.clear()
        n = 50
        with _OpCounter():
            for _ in range(n):
                f()
        per = {key: COUNTS[key] / n for key in ("compile", "jit_run", "autotune_run", "autotune_key_miss",
                                                "launch", "aten")}
        if a.device == "cuda":
            per["launch"] = "n/a"
        print(f"| {name} | {us:.1f} | " + " | ".join(f"{per[key]:g}" if per[key] != "n/a" else "n/a" for key in per)
              + " |")
        if a.profile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(200):
                f()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
            print("\n".join(s.getvalue().splitlines()[:40]))


if __name__ == "__main__":
    main()
