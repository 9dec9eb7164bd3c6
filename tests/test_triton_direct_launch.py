"""The Triton backend's direct launch of checked compiled kernels (triton_ops._Site), on CPU.

No GPU: a subprocess (TRITON_INTERPRET unset) installs bench/triton_host_overhead.py's fake sm_90 driver --
real compiles for sm_90, a launcher that records its calls instead of launching -- and checks, for one
forward launch site: the first two calls go through Triton's JITFunction.run (the second with the
compiled kernel's launcher spied on), later calls skip it and hand the launcher exactly the call Triton
itself made for the same tensors (grid, stream, function, metadata, every argument); a tensor that is not
16-byte aligned takes Triton's own path again, and FASTFAIR_TRITON_DIRECT=0 turns direct launches off.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import importlib.util, json, os, sys
sys.path.insert(0, os.path.join(ROOT, "bench"))
import triton_host_overhead as H   # pops TRITON_INTERPRET before triton is imported
import torch
H.install_fake_driver()
H.install_counters()
LOG = []
H._FakeLauncher.__call__ = lambda self, *a: LOG.append(a)
from fastfair.kernels import triton_ops as T
os.environ["FASTFAIR_TRITON_AUTOTUNE"] = "0"
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, n, 16, generator=g).half() for n in (32, 7, 7))
tok = torch.tensor([[1, 3]])

def call(q):
    before = H.COUNTS["jit_run"]
    n = len(LOG)
    out = T.cross_attention_fwd(q, k, v, None, tok, 0.25, False)
    assert len(LOG) == n + 1, "one launch per call"
    return H.COUNTS["jit_run"] - before, LOG[-1], out

def desc(a, tensors):
    # a launcher call with each tensor replaced by its position among this call's tensors
    ids = {id(t): i for i, t in enumerate(tensors)}
    return [("T", ids.get(id(x), -1)) if isinstance(x, torch.Tensor) else
            ("meta", type(x).__name__) if i == 6 else repr(x) for i, x in enumerate(a)]

res = {}
res["jit"] = [call(q)[0] for _ in range(2)]
qs = [q.clone() for _ in range(3)]
direct = [call(x) for x in qs]
res["direct_jit"] = [d[0] for d in direct]
# the same tensors through Triton's own path: the launcher must have received the same call
T._Site.__call__, orig = (lambda self, args: T._launch(self.name, self.grid_fn, args, self.consts, self.cfg,
                                                        self.tune_req)), T._Site.__call__
_, plain, _ = call(qs[-1])
T._Site.__call__ = orig
res["same_call"] = desc(direct[-1][1], direct[-1][1][9:]) == desc(plain, plain[9:])
res["n_args"] = len(plain)
# map tokens at an 8-byte offset (same shape and strides, so the same plan and launch site, now direct):
# Triton specialises pointers on 16-byte alignment, so this call must take Triton's own path
tb = torch.empty(5, dtype=torch.int64)
tok_u = tb[1:3].view(1, 2).copy_(tok)
assert tok_u.stride() == tok.stride() and tok_u.data_ptr() % 16
tok_a, tok = tok, tok_u
res["unaligned_jit"] = call(q.clone())[0]
tok = tok_a
res["aligned_again_jit"] = call(q.clone())[0]
# FASTFAIR_TRITON_DIRECT=0: a new launch site (another query count) never leaves Triton's path
os.environ["FASTFAIR_TRITON_DIRECT"] = "0"
q2 = torch.randn(1, 2, 48, 16, generator=g).half()
res["disabled_jit"] = [call(q2.clone())[0] for _ in range(4)]
print("RESULT " + json.dumps(res))
"""


def test_direct_launch_is_the_call_triton_makes():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + WORKER], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    res = json.loads(lines[-1][7:])
    assert res["jit"] == [1, 1]  # first launch, then the checked one: both through JITFunction.run
    assert res["direct_jit"] == [0, 0, 0]  # then direct, whatever the (aligned) tensors
    assert res["same_call"], "the direct launcher call differs from Triton's for the same tensors"
    assert res["n_args"] > 9
    assert res["unaligned_jit"] == 1  # unaligned pointer: Triton's own path (another specialisation)
    assert res["aligned_again_jit"] == 0
    assert res["disabled_jit"] == [1, 1, 1, 1]
