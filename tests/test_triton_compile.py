"""Every Triton kernel compiles for sm_90 (H100) -- no GPU needed.

The compiles run in a subprocess with TRITON_INTERPRET unset (the interpreter is chosen when the
kernels are decorated, and the other test modules may have chosen it), for representative
constexpr configurations: fp16 / bf16 / fp32, head dims 40 / 64 / 80 / 160, every code path
(single-pass / online softmax, map keys, per-head maps, fused / separate backward, SoftIoU).

Launcher configs: the cross-attention launchers are dry-run on meta tensors (``triton_ops._RECORD``)
for SD shapes -- Nk in {1, 7, 77, 128, 154, 256, 333, 4096}, D in {40, 64, 80, 160}, fp16 / bf16 / fp32,
forward + full backward and forward + maps->dq backward, diffusers layout -- and every config they
would launch (the heuristic one and each autotune config left after pruning) is compiled with the
specialisation the JIT gives those arguments (16-divisible integers and pointers, unit strides).
Their shared memory must fit sm_80's 163 KiB (sm_90 allows 227 KiB): a forward tile that did not
(272 KiB at Nk=154, D=80) failed to launch on an H200.

Run directly (``python tests/test_triton_compile.py``) to print the register / spill / shared
memory usage of each configuration (from cuobjdump on the cubin, when available).
"""
from __future__ import annotations

import inspect
import itertools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TY = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_FLOATS = {"scale_log2", "scale", "eps", "n_f"}
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
SHARED_LIMIT_SM80 = 166912  # ... on sm_80 (163 KiB); launcher configs must fit both
LAUNCH_NK = (1, 7, 77, 128, 154, 256, 333, 4096)
LAUNCH_D = (40, 64, 80, 160)
LAUNCH_DTYPES = ("fp16", "bf16", "fp32")
_UNIT_STRIDES = {"sqd", "skd", "svd", "smd", "sod", "sdod", "sdqd", "stt"}


_CORE = {  # default set (~1.5 min on 2 cores); FASTFAIR_COMPILE_FULL=1 compiles every case below
    "bwd_fused_fp16_D64", "bwd_fused_fp16_D80", "bwd_fused_bf16_D64", "bwd_fused_fp32_D64",
    "bwd_dq_fp16_D160", "bwd_dq_fp32_D80", "dkdv_fp16_D64",
    "siou_fwd_fp16_topk1", "siou_bwd_fp16_topk1", "siou_bwd_fp32_topk0",
}


def _cases(full: bool | None = None):
    """(name, kernel "module:attribute", dtype, constexprs, options); every forward config, the
    _CORE backward/SoftIoU configs and the extra paths unless ``full`` (FASTFAIR_COMPILE_FULL=1)."""
    if full is None:
        full = os.environ.get("FASTFAIR_COMPILE_FULL", "0") == "1"
    cases = _all_cases()
    # the per-dtype / head-dim forward and backward configs are the launcher's own (compiled below
    # for every SD shape); the default set keeps the SoftIoU ones and the other code paths
    cases = [c for c in cases if full or c[0] in _CORE and c[0].startswith(("siou", "dkdv"))
             or not c[0][-1].isdigit() or c[0].startswith(("bwd_fp16", "dkdv_fp16_mapkeys", "fwd_fp16_maps_only"))]
    return cases + _launcher_cases(full)


def _record_launches(Nq, Nk, D, dtype, mode, B=2, H=8, T=4, budget=None, Nm=0, per_head=False, extra=None):
    """The launches (kernel name, args, constexprs, options) triton_ops would make on a GPU for
    these shapes (diffusers layout), recorded by a dry run on meta tensors. ``Nm``: an attribution prompt's
    keys (map_keys); ``per_head``: head_reduce="none" (the daam preset)."""
    import torch

    from fastfair.kernels import triton_ops as T_

    def view(n):  # (B, n, H*D) viewed as (B, H, n, D), as diffusers' attention processors pass it
        return torch.empty(B, n, H * D, dtype=dtype, device="meta").view(B, n, H, D).transpose(1, 2)

    q, k, v = view(Nq), view(Nk), view(Nk)
    mk = view(Nm) if Nm else None
    tok = torch.zeros(B, T, dtype=torch.int64, device="meta")
    saved = dict(T_._OVERRIDE)
    T_._OVERRIDE.clear()
    T_._OVERRIDE["TARGET_PROGRAMS"] = 2 * 132  # two waves of an H100 / H200
    T_._OVERRIDE["GPU_CONFIG"] = True  # GPU tiles even when this process runs the interpreter
    if budget is not None:
        T_._OVERRIDE["SMEM_BUDGET"] = budget  # a GPU with this much shared memory per block
    T_._OVERRIDE.update(extra or {})
    T_._RECORD = rec = []
    try:
        out, lse, mlse, maps = T_.cross_attention_fwd(q, k, v, mk, tok, 0.125, per_head)
        dout = torch.empty(out.shape, dtype=dtype, device="meta") if mode == "full" else None
        needs = (True, True, True, mk is not None) if mode == "full" else (True, False, False, False)
        T_.cross_attention_bwd(q, k, v, mk, tok, 0.125, per_head, out, lse, mlse if mk is not None else None, dout,
                               torch.empty(maps.shape, device="meta"), needs)
    finally:
        T_._RECORD = None
        T_._OVERRIDE.clear()
        T_._OVERRIDE.update(saved)
    return rec


_SHAPE_ONLY = {"Nk", "Nm"}  # key counts only bound masks along key rows (not the vectorised axis)


def _launcher_cases(full: bool | None = None, budget: int | None = None, arch: int = 90):
    """One case per distinct compiled kernel the launchers choose for LAUNCH_NK x LAUNCH_D x dtypes
    (sizes that only bound masks along non-contiguous axes are not part of the identity). bf16 gets
    the same tiles as fp16 (test_launcher_records_the_fixed_tiles checks it), so its compiles, which
    give the same shared memory, only run with FASTFAIR_COMPILE_FULL=1."""
    import torch

    from fastfair.kernels import xattn

    if full is None:
        full = os.environ.get("FASTFAIR_COMPILE_FULL", "0") == "1"
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    seen = {}
    for dt in LAUNCH_DTYPES:
        if dt == "bf16" and not full:
            continue
        for Nk in LAUNCH_NK:
            for D in LAUNCH_D:
                variants = [(0, False, 4)]
                if dt in ("fp16", "fp32") and Nk == 77:  # attribution prompts (map keys), the daam preset's per-head maps,
                    # and more map tokens than one tile (maps-only passes after the first)
                    variants += [(12, False, 4), (0, True, 4), (12, True, 4), (0, False, 72)]
                if dt in ("fp16", "fp32") and Nk in (1, 4096) and D == 64:  # SD3 / Flux attribution prompts: map
                    # keys = [image; the attribution text stream], many key tiles (Nk = 1: ops.attention_maps)
                    variants += [(4096 + 333, False, 4)]
                for (Nm, per_head, T), mode in itertools.product(variants, ("full", "maps_dq")):
                    for kname, args, consts, opts in _record_launches(1024, Nk, D, tdt[dt], mode, budget=budget,
                                                                      Nm=Nm, per_head=per_head, T=T):
                        sig = inspect.signature(getattr(xattn, kname).fn).parameters.values()
                        names = [p.name for p in sig if "constexpr" not in str(p.annotation)]
                        spec = {}
                        for nm, a in zip(names, args):
                            if isinstance(a, bool) or not isinstance(a, int):
                                continue
                            if nm in _SHAPE_ONLY:
                                spec[nm] = ("i32", 2)  # not 1, not 16-divisible: no specialisation
                            else:
                                spec[nm] = ("i32", 1 if a == 1 else (16 if a % 16 == 0 else 2))
                        key = json.dumps([kname, dt, consts, opts, spec], sort_keys=True)
                        if key not in seen:
                            tag = ("_mk" if Nm else "") + ("_perhead" if per_head else "") + (f"_T{T}" if T > 4 else "")
                            seen[key] = (f"launch_{kname.strip('_')}_{dt}_Nk{Nk}_D{D}_{mode}{tag}_w{opts['num_warps']}"
                                         f"s{opts['num_stages']}" + (f"_sm{arch}" if arch != 90 else ""),
                                         f"xattn:{kname}", dt, consts, dict(opts, _spec=spec, _arch=arch))
    return list(seen.values())


def _all_cases():
    from fastfair.kernels import triton_ops as T

    import torch

    cases = []
    bt = dict(BLOCK_T=16)
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    for dt in ("fp16", "bf16", "fp32"):
        prec, prec_map = T._prec(tdt[dt])
        esz = 4 if dt == "fp32" else 2
        for D in (40, 64, 80, 160):
            bd = T._p2(D)
            T._OVERRIDE["GPU_CONFIG"] = True
            cfg = T._fwd_heuristic(bd, 128, esz=esz)
            bn = T._key_tile(77, bd, esz)
            c = dict(HAS_MK=False, HAS_MAPS=True, PER_HEAD=False, COMPUTE_OUT=True, SINGLE=bn == 128,
                     BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, BLOCK_NM=16, BLOCK_D=bd, BLOCK_DV=bd, PREC=prec, ALIGN=8,
                     **bt)
            cases.append((f"fwd_{dt}_D{D}", "xattn:_xattn_fwd_kernel", dt, c,
                          {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}))
            c = dict(HAS_DOUT=True, HAS_MAPS=True, HAS_MK=False, NEED_DQ=True, NEED_DELTA=False, NEED_W=True,
                     FUSE_DK=True, FUSE_DV=True, FUSE_DMK=False, SINGLE=True,
                     BLOCK_M=T._bwd_block_m(bd, 128, True, esz),
                     BLOCK_N=128, BLOCK_NM=16, BLOCK_D=bd, BLOCK_DV=bd, PREC=prec, PREC_MAP=prec_map, ALIGN=8, **bt)
            cases.append((f"bwd_fused_{dt}_D{D}", "xattn:_xattn_bwd_kernel", dt, c,
                          T._bwd_heuristic(bd, 128, True, esz)))
            c = dict(c, HAS_DOUT=True, NEED_W=False, FUSE_DK=False, FUSE_DV=False,
                     BLOCK_M=T._bwd_block_m(bd, 128, False, esz))
            cases.append((f"bwd_dq_{dt}_D{D}", "xattn:_xattn_bwd_kernel", dt, c,
                          T._bwd_heuristic(bd, 128, False, esz)))
        c = dict(HAS_DOUT=True, NEED_DK=True, NEED_DV=True, BLOCK_M=T._bwd_block_m(64, 128, False, esz), BLOCK_N=128,
                 BLOCK_D=64, BLOCK_DV=64, PREC=prec, ALIGN=8)
        cases.append((f"dkdv_{dt}_D64", "xattn:_xattn_bwd_dkdv_kernel", dt, c,
                      T._bwd_heuristic(64, 128, False, esz)))
        for topk in (True, False):
            cases.append((f"siou_fwd_{dt}_topk{int(topk)}", "softiou:_softiou_fwd_kernel", dt,
                          dict(HAS_TOPK=topk, BLOCK=1024), {"num_warps": 4}))
            cases.append((f"siou_bwd_{dt}_topk{int(topk)}", "softiou:_softiou_bwd_kernel", dt,
                          dict(HAS_TOPK=topk, BLOCK=1024, ITERS_P=32), {"num_warps": 4}))
    T._OVERRIDE.pop("GPU_CONFIG", None)
    # other paths (fp16)
    base = dict(HAS_MK=True, HAS_MAPS=True, PER_HEAD=True, COMPUTE_OUT=True, SINGLE=False, BLOCK_M=128, BLOCK_N=128,
                BLOCK_NM=32, BLOCK_D=64, BLOCK_DV=64, PREC="tf32", BLOCK_T=16, ALIGN=1)
    cases.append(("fwd_fp16_mk_perhead", "xattn:_xattn_fwd_kernel", "fp16", base, {"num_warps": 8}))
    cases.append(("fwd_fp16_maps_only_T64", "xattn:_xattn_fwd_kernel", "fp16",
                  dict(base, HAS_MK=False, PER_HEAD=False, COMPUTE_OUT=False, BLOCK_T=64), {"num_warps": 8}))
    cases.append(("fwd_fp16_N256_nomaps", "xattn:_xattn_fwd_kernel", "fp16",
                  dict(base, HAS_MK=False, HAS_MAPS=False, PER_HEAD=False, SINGLE=True, BLOCK_M=64, BLOCK_N=256),
                  {"num_warps": 8}))
    bb = dict(HAS_DOUT=False, HAS_MAPS=True, HAS_MK=False, NEED_DQ=True, NEED_DELTA=False, NEED_W=False,
              FUSE_DK=False, FUSE_DV=False, FUSE_DMK=False, SINGLE=True, BLOCK_M=64, BLOCK_N=128, BLOCK_NM=16,
              BLOCK_D=64, BLOCK_DV=64, PREC="tf32", PREC_MAP="tf32x3", BLOCK_T=16, ALIGN=8)
    cases.append(("bwd_fp16_guidance_dq_maps_only", "xattn:_xattn_bwd_kernel", "fp16", bb, {"num_warps": 4}))
    cases.append(("bwd_fp16_mk_fused", "xattn:_xattn_bwd_kernel", "fp16",
                  dict(bb, HAS_DOUT=True, HAS_MK=True, NEED_W=True, FUSE_DK=True, FUSE_DV=True, FUSE_DMK=True,
                       BLOCK_NM=32, BLOCK_M=32), {"num_warps": 8}))
    cases.append(("bwd_fp16_online", "xattn:_xattn_bwd_kernel", "fp16",
                  dict(bb, HAS_DOUT=True, HAS_MK=True, NEED_DELTA=True, NEED_W=True, SINGLE=False, BLOCK_NM=128),
                  {"num_warps": 4}))
    cases.append(("dkdv_fp16_mapkeys", "xattn:_xattn_bwd_dkdv_kernel", "fp16",
                  dict(HAS_DOUT=False, NEED_DK=True, NEED_DV=False, BLOCK_M=64, BLOCK_N=128, BLOCK_D=64,
                       BLOCK_DV=64, PREC="tf32", ALIGN=1), {"num_warps": 4}))
    return cases


def _pointer_type(kernel_name: str, arg: str, dt: str) -> str:
    if arg == "TOK":
        return "*i64"
    if arg == "PRM":
        return "*fp64"
    if kernel_name.startswith("_softiou"):
        return "*fp32" if arg == "DX" else _TY[dt]
    if arg in ("Q", "K", "V", "MK", "OUT", "DOUT", "DQ"):
        return _TY[dt]
    return "*fp32"  # LSE, MLSE, MAPS, DMAPS, DELTA*, WPART, partial key gradients


def _compile_one(case):
    import triton
    from triton.backends.compiler import GPUTarget

    from fastfair.kernels import softiou, xattn

    name, ref, dt, consts, opts = case
    opts = dict(opts)
    spec = opts.pop("_spec", None)  # launcher cases: the JIT's specialisation of the int arguments
    arch = opts.pop("_arch", 90)  # compile target (sm_90 unless a case says otherwise)
    mod, attr = ref.split(":")
    fn = getattr({"xattn": xattn, "softiou": softiou}[mod], attr)
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name[0].isupper() and p.name not in ("H", "D", "DV", "T", "NMB", "ITERS", "NQ_BUCKET", "Nq", "Nk",
                                                    "Nm", "HPP", "MB_PER_PROG"):
            sig[p.name] = _pointer_type(attr, p.name, dt)
        elif p.name in _FLOATS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    consts = dict(consts)
    if "DIV_D" in [p.name for p in fn.params]:  # hand-written cases: SD's head dims (multiples of 8)
        consts.setdefault("DIV_D", 8 if consts.get("ALIGN") == 8 else 1)
    if "BLOCK_N2" in [p.name for p in fn.params]:  # hand-written cases: one key tile
        consts.setdefault("BLOCK_N2", 0)
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in consts]
    assert not missing, (name, missing)
    consts = dict(consts)
    for p in fn.params:  # what the JIT specialises at a real launch: unit last-dim strides
        if p.name in _UNIT_STRIDES or (spec and spec.get(p.name, ("", 0))[1] == 1):
            sig[p.name] = "constexpr"
            consts[p.name] = 1
    # and 16-byte aligned pointers (launcher cases: 16-divisible integers too)
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
             if sig[p.name].startswith("*") or (spec and sig[p.name] == "i32" and spec.get(p.name, ("", 0))[1] == 16)}
    target = GPUTarget("cuda", arch, 32)
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=target, options=opts)
    except TypeError:  # attrs format differs between Triton versions: compile without hints
        k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                           options=opts)
    info = {"name": name, "shared": k.metadata.shared, "num_warps": k.metadata.num_warps,
            "launcher": spec is not None, "kernel": attr, "dtype": dt, "num_stages": opts.get("num_stages"),
            "block_d": consts.get("BLOCK_D"), "single": consts.get("SINGLE")}
    import re

    ptx = k.asm.get("ptx", "")
    info["ld_scalar16"] = len(re.findall(r"ld\.global\.(?:b16|u16|f16|b8|u8)\b", ptx))  # 1-2 byte loads
    info["cp_async"] = len(re.findall(r"cp\.async\.c[ag]\b", ptx))
    try:  # registers / spills, when cuobjdump is bundled
        import re
        import tempfile

        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
        if m:
            info["regs"], info["stack"] = int(m.group(1)), int(m.group(2))
    except Exception:  # pragma: no cover - informational only
        pass
    return info


SMALL_SMEM = 101376  # shared memory per block on sm_86 / sm_89 (99 KiB): RTX 30xx / 40xx, A10, L4, L40


def _small_smem_cases():
    """The launchers' configs on a 99 KiB GPU (triton_ops sizes its tiles by the device's shared memory),
    compiled for sm_86."""
    return _launcher_cases(False, budget=SMALL_SMEM, arch=86)


def _ampere_cases():
    """The launches an sm_8x GPU gets (maxnreg=255, as triton_ops._maxnreg gives there) for the kernels that
    spilled most when compiled for sm_80 without it: the fp32 forward and the fp16 full backward."""
    import torch

    out = []
    for dt, tdt, D, mode in (("fp32", torch.float32, 40, "maps_dq"), ("fp16", torch.float16, 64, "full")):
        for kname, args, consts, opts in _record_launches(1024, 77, D, tdt, mode, extra={"MAXNREG": 255}):
            want = "_xattn_fwd_kernel" if dt == "fp32" else "_xattn_bwd_kernel"
            if kname == want and opts.get("num_warps") == 8:
                out.append((f"ampere_{kname.strip('_')}_{dt}_D{D}_{mode}", f"xattn:{kname}", dt, consts,
                            dict(opts, _arch=80)))
                break
    return out


def _worker(small: bool = False, ampere: bool = False) -> int:
    from concurrent.futures import ProcessPoolExecutor

    cases = _ampere_cases() if ampere else _small_smem_cases() if small else _cases()
    jobs = int(os.environ.get("FASTFAIR_COMPILE_JOBS", str(min(4, os.cpu_count() or 1))))
    failed = 0
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        futs = [(c[0], ex.submit(_compile_one, c)) for c in cases]
        for name, f in futs:
            try:
                print(json.dumps(f.result()), flush=True)
            except Exception as e:  # report every failure, not only the first
                failed += 1
                print(json.dumps({"name": name, "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
    return 1 if failed else 0


def _run_worker(*flags):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", *flags], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    errors = [x for x in lines if "error" in x]
    assert r.returncode == 0 and not errors and lines, (errors or r.stderr[-4000:])
    return lines


def test_launcher_configs_fit_99k_gpus():
    """On GPUs with 99 KiB of shared memory per block (sm_86 / sm_89) the launchers pick configs that fit it:
    every one compiles for sm_86 within 99 KiB (with sm_80's rules, 11 did not: up to 144 KiB)."""
    lines = _run_worker("--small-smem")
    assert len(lines) == len(_small_smem_cases())
    too_big = [(x["name"], x["shared"]) for x in lines if x["shared"] > SMALL_SMEM]
    assert not too_big, f"configs above {SMALL_SMEM} B of shared memory: {too_big}"


def test_ampere_launches_get_their_registers():
    """On sm_8x the launchers pass maxnreg=255: without it ptxas (12.9) gave these kernels 32 / 128 registers and
    a ~10 KB / 2.5 KB stack on sm_80 (bench/RESULTS.md); with it they use the register file."""
    lines = _run_worker("--ampere")
    assert len(lines) == 2, lines
    for x in lines:
        assert x["regs"] >= 200 and x["stack"] <= 3100, x


def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    errors = [x for x in lines if "error" in x]
    assert r.returncode == 0 and not errors and lines, (errors or r.stderr[-4000:])
    for x in lines:
        print(x)
    assert len(lines) == len(_cases())
    too_big = [x for x in lines if x.get("shared", 0) > SHARED_LIMIT]
    assert not too_big, f"shared memory above the sm_90 limit ({SHARED_LIMIT} B): {too_big}"
    launch = [x for x in lines if x.get("launcher")]
    assert launch, "no launcher configs were compiled"
    too_big = [x for x in launch if x["shared"] > SHARED_LIMIT_SM80]
    assert not too_big, f"launcher configs above sm_80's shared memory ({SHARED_LIMIT_SM80} B): {too_big}"
    # every head dim the launchers see is a multiple of 8 (40, 64, 80, 160): no scalar 1-2 byte loads of
    # q / k / v / dout (with a runtime D of 40 they all were: 100 ld.global.b16 in the forward, before DIV_D)
    xk = [x for x in launch if x["kernel"].startswith("_xattn")]
    scalar = [(x["name"], x["ld_scalar16"]) for x in xk if x["ld_scalar16"]]
    assert not scalar, f"scalar 16-bit global loads: {scalar}"
    # the pipelined single-tile forward copies the next head's tiles asynchronously
    piped = [x for x in xk if x["kernel"] == "_xattn_fwd_kernel" and x["single"] and x["num_stages"] == 2
             and x["dtype"] != "fp32"]
    assert piped and all(x["cp_async"] > 0 for x in piped), [(x["name"], x["cp_async"]) for x in piped]


def test_launcher_records_the_fixed_tiles():
    """The dry run sees the tiles that fit: no 256-key x 128-dim forward tile (272 KiB on sm_90)
    at Nk=154, D=80; no 64-row backward tile with 8 warps (the configs that faulted on an H200)."""
    import torch

    for Nk in LAUNCH_NK:  # bf16 launches exactly fp16's tiles (so the default compile set skips it)
        for D in LAUNCH_D:
            a = [(n, c, o) for n, _, c, o in _record_launches(1024, Nk, D, torch.float16, "full")]
            b = [(n, c, o) for n, _, c, o in _record_launches(1024, Nk, D, torch.bfloat16, "full")]
            assert a == b, (Nk, D)
    for dt in (torch.float16, torch.float32):
        for mode in ("full", "maps_dq"):
            for Nk, D in ((154, 80), (77, 80), (77, 160), (4096, 64)):
                rec = _record_launches(1024, Nk, D, dt, mode)
                assert rec
                for kname, _, c, o in rec:
                    esz = 4 if dt == torch.float32 else 2
                    bd = max(c["BLOCK_D"], c["BLOCK_DV"])
                    if kname == "_xattn_fwd_kernel":
                        assert c["BLOCK_N"] * bd * esz <= 32 * 1024, (Nk, D, dt, c)
                    else:
                        assert not (c["BLOCK_M"] >= 64 and o["num_warps"] > 4), (kname, Nk, D, dt, mode, c, o)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(_worker("--small-smem" in sys.argv, "--ampere" in sys.argv))
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(_worker())


def test_smem_budget_rules():
    """The device's shared memory sizes the tiles: sm_80's rules at >= 163 KiB (and off a GPU), smaller
    pipelining / key tiles / fp32 backward rows below it."""
    import torch

    from fastfair.kernels import triton_ops as T_

    assert T_._smem_budget(torch.device("cpu")) == T_.SM80_SMEM
    saved = dict(T_._OVERRIDE)
    try:
        T_._OVERRIDE.update(SMEM_BUDGET=SMALL_SMEM, GPU_CONFIG=True)
        assert T_._smem_budget(torch.device("cpu")) == SMALL_SMEM
        # the key loop at head dim 128 (online softmax), fp16: K/V double-buffered take 144 KiB ->
        # single-buffered on a 99 KiB GPU
        assert T_._fwd_heuristic(128, 128, esz=2, budget=T_.SM80_SMEM, single=False)["num_stages"] == 2
        assert T_._fwd_heuristic(128, 128, esz=2, budget=SMALL_SMEM, single=False)["num_stages"] == 1
        # single-tile forward (SD's 77 keys): the head loop stages q, K, V and the map keys -- 116 KiB at
        # head dims <= 64 (SD1.5's D=40, SDXL's 64; measured on sm_90), 184 KiB at D=80 (over STAGED_BYTES)
        assert T_._fwd_smem(128, 128, 64, 64, 2, 2, True) == 118784
        assert T_._fwd_smem(64, 128, 128, 128, 2, 2, True) == 188416
        assert T_._fwd_heuristic(64, 128, esz=2, budget=T_.SM80_SMEM)["num_stages"] == 2
        assert T_._fwd_heuristic(64, 128, esz=2, budget=SMALL_SMEM)["num_stages"] == 1
        assert T_._fwd_heuristic(128, 128, esz=2, budget=T_.SM80_SMEM)["num_stages"] == 1
        assert T_._div_d(40, 40) == 8 and T_._div_d(20, 20) == 4 and T_._div_d(40, 7) == 1
        assert T_._key_tile(77, 256, 4, T_.SM80_SMEM) == 32 and T_._key_tile(77, 256, 4, SMALL_SMEM) == 16
        assert T_._bwd_block_m(128, 128, True, 4, T_.SM80_SMEM) == 32
        assert T_._bwd_block_m(128, 128, True, 4, SMALL_SMEM) == 16
    finally:
        T_._OVERRIDE.clear()
        T_._OVERRIDE.update(saved)
