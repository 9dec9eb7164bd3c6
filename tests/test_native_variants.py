"""The CPU module's instruction-set variants (CMakeLists.txt builds _native, _native_v3, _native_v4) and the
loader in fastfair/native.py that picks one from the CPU's flags.

A variant compiled for an instruction set the CPU lacks dies with SIGILL, so only the variants this CPU
supports are imported here; the portable one must contain no AVX-512 instruction at all.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import shutil
import subprocess

import pytest
import torch

from fastfair import native
from fastfair.kernels import naive

V2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3", "sse", "sse2", "fpu"}
V3 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@pytest.mark.parametrize("flags,machine,expected", [
    (V4, "x86_64", ["v4", "v3", "portable"]),
    (V4 | {"avx512_vnni", "avx512ifma"}, "x86_64", ["v4", "v3", "portable"]),
    (V3, "x86_64", ["v3", "portable"]),
    (V4 - {"avx512vl"}, "x86_64", ["v3", "portable"]),  # Knights Landing: AVX-512F without VL/BW/DQ
    (V4 - {"movbe"}, "x86_64", ["portable"]),  # v4 includes v3
    (V3 - {"abm"}, "x86_64", ["portable"]),  # no LZCNT
    (V3 - {"pni"}, "x86_64", ["portable"]),  # v3 includes v2
    (V2, "x86_64", ["portable"]),
    (set(), "x86_64", ["portable"]),
    (None, "x86_64", ["portable"]),  # flags unknown (no /proc/cpuinfo)
    (V4, "AMD64", ["v4", "v3", "portable"]),
    (V4, "aarch64", ["portable"]),
])
def test_supported_variants(flags, machine, expected):
    assert native.supported_variants(flags, machine) == expected


def _cpu_supported() -> list[str]:
    import platform

    return native.supported_variants(native._cpu_flags(), platform.machine())


def _built(variant: str):
    name = native.VARIANT_MODULES[variant]
    return importlib.util.find_spec(name) is not None


def test_loader_picks_the_best_supported_built_variant(monkeypatch):
    monkeypatch.delenv("FASTFAIR_NATIVE_VARIANT", raising=False)
    mod, err = native._load_cpu_module()
    if mod is None:
        pytest.skip(f"fastfair._native not built: {err}")
    best = next(v for v in _cpu_supported() if _built(v))
    assert mod.__name__ == native.VARIANT_MODULES[best]
    assert mod.variant in (best, "native")  # "native": the portable slot built with FASTFAIR_NATIVE_ARCH=ON
    assert native.cpu_variant() == getattr(native._C, "variant", "portable")


@pytest.mark.parametrize("variant", ["portable", "v3", "v4"])
def test_forced_variant(variant, monkeypatch):
    monkeypatch.setenv("FASTFAIR_NATIVE_VARIANT", variant)
    if variant not in _cpu_supported():  # refused (it would SIGILL): a warning and the automatic choice
        with pytest.warns(RuntimeWarning, match="lacks its instruction set"):
            native._load_cpu_module()
        return
    mod, err = native._load_cpu_module()
    if not _built(variant):
        assert mod is None and isinstance(err, ImportError)  # forced: no other variant runs instead
        return
    assert mod.__name__ == native.VARIANT_MODULES[variant]


def test_unknown_forced_variant_warns(monkeypatch):
    monkeypatch.setenv("FASTFAIR_NATIVE_VARIANT", "avx9000")
    with pytest.warns(RuntimeWarning, match="none of"):
        native._load_cpu_module()


def _variant_modules():
    out = []
    for v in ("portable", "v3", "v4"):
        if v in _cpu_supported() and _built(v):
            out.append(pytest.param(v, id=v))
    return out or [pytest.param(None, marks=pytest.mark.skip(reason="fastfair._native not built"))]


@pytest.mark.parametrize("variant", _variant_modules())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_variant_matches_the_reference(variant, dtype, monkeypatch):
    """cross_attention fwd/bwd (with maps and map keys) and soft_iou fwd/bwd through each built variant."""
    mod = importlib.import_module(native.VARIANT_MODULES[variant])
    monkeypatch.setattr(native, "_C", mod)
    g = torch.Generator().manual_seed(0)
    B, H, Nq, Nk, Nm, D, T = 2, 3, 37, 77, 5, 40, 4
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=dtype) for n in (Nq, Nk, Nk))
    mk = torch.randn(B, H, Nm, D, generator=g, dtype=dtype)
    tok = torch.randint(0, Nm, (B, T), generator=g)
    scale = 1.0 / math.sqrt(D)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    for per_head in (False, True):
        got = native.cross_attention_fwd(q, k, v, mk, tok, scale, per_head)
        ref = naive.cross_attention_fwd(q, k, v, mk, tok, scale, per_head)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **tol)
        out, lse, mlse, maps = got
        dout = torch.randn(out.shape, generator=g, dtype=dtype)
        dmaps = torch.randn(maps.shape, generator=g, dtype=dtype)
        gb = native.cross_attention_bwd(q, k, v, mk, tok, scale, per_head, out, lse, mlse, dout, dmaps)
        rb = naive.cross_attention_bwd(q, k, v, mk, tok, scale, per_head, *ref[:3], dout, dmaps)
        for a, b in zip(gb, rb):
            torch.testing.assert_close(a, b, **tol)
    a = torch.rand(4, 256, generator=g, dtype=dtype)
    b = torch.rand(4, 256, generator=g, dtype=dtype)
    siou_tol = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for top_k in (None, 0.3):
        torch.testing.assert_close(native.soft_iou_fwd(a, b, top_k, 0.01, 20, 1e-8),
                                   naive.soft_iou(a, b, top_k, 0.01, 20, 1e-8), **siou_tol)
        d = torch.randn(4, generator=g, dtype=dtype)
        da, db = native.soft_iou_bwd(a, b, top_k, 0.01, 20, 1e-8, d)
        la, lb = a.clone().requires_grad_(), b.clone().requires_grad_()
        ea, eb = torch.autograd.grad((naive.soft_iou(la, lb, top_k, 0.01, 20, 1e-8) * d).sum(), (la, lb))
        torch.testing.assert_close(da, ea, **siou_tol)
        torch.testing.assert_close(db, eb, **siou_tol)


def _zmm_count(path: str) -> int:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True)
    return out.stdout.count("%zmm")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not on PATH")
def test_portable_module_has_no_avx512():
    """The module every x86-64 CPU may load holds no AVX-512 (zmm) instruction (a -march=native build
    of it did: SIGILL at import on a CPU without AVX-512)."""
    spec = importlib.util.find_spec("fastfair._native")
    if spec is None or not spec.origin:
        pytest.skip("fastfair._native not built")
    if native._C is not None and native._C.__name__ == "fastfair._native" and native._C.variant == "native":
        pytest.skip("built with FASTFAIR_NATIVE_ARCH=ON (for this machine only)")
    assert _zmm_count(spec.origin) == 0
    spec3 = importlib.util.find_spec("fastfair._native_v3")
    if spec3 is not None and spec3.origin:
        assert _zmm_count(spec3.origin) == 0
