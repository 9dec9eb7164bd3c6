"""DFT on a GPU: the paths the CPU machine cannot run (CUDA autocast in fp16 / bf16 with the GradScaler, SD3 in
bf16 on CUDA; the Triton backward inside DFT's sampler is tests/test_triton_engine.py's, CPU and GPU). Skipped
without CUDA; the GPU session runs them (bench/gpu_session.sh 1)."""
import math

import pytest
import torch

import fastfair
from fastfair.dft import DFTTrainer

from dft_helpers import RedClassifier, needs_peft, small

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PROMPT = "a photo of the face of a doctor"


def _step(name, dtype="fp32", **kw):
    pipe = fastfair.load_pipeline(name, device="cuda", dtype=dtype)
    torch.manual_seed(0)
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(**kw), quality_encoder=None)
    rec = tr.step()
    tr.close()
    return rec, tr


@needs_peft
@pytest.mark.parametrize("attention", ["fastfair", "diffusers"])  # diffusers: SDPA, the default on CUDA
@pytest.mark.parametrize("mp", ["fp16", "bf16"])
def test_autocast_step_is_finite_and_close_to_fp32(mp, attention):
    """The first step's loss matches fp32's. bf16 updates at once; fp16's GradScaler starts at a scale of 2**16, and
    gradients that overflow fp16 at it skip the update and halve the scale (the H200 run of 2026-11-27 saw the
    first fp16 step skipped), so fp16 must update within a few steps, with a lower scale, and stay finite."""
    ref, _ = _step("tiny-sd", trainable="text+unet-lora", attention=attention)
    pipe = fastfair.load_pipeline("tiny-sd", device="cuda")
    torch.manual_seed(0)  # as _step
    cfg = small(trainable="text+unet-lora", mixed_precision=mp, attention=attention)
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), cfg, quality_encoder=None)
    recs = [tr.step()]
    assert math.isfinite(recs[0]["loss"])
    assert abs(recs[0]["loss"] - ref["loss"]) <= 0.05 * abs(ref["loss"]) + 1e-3, (recs[0]["loss"], ref["loss"])
    if mp == "bf16":
        assert tr.scaler is None and not recs[0]["skipped"]
    while recs[-1]["skipped"] and len(recs) < 12:
        recs.append(tr.step())
    tr.close()
    assert not recs[-1]["skipped"] and recs[-1]["grad_norm"] > 0, [r["skipped"] for r in recs]
    assert all(math.isfinite(r["loss"]) for r in recs)
    if len(recs) > 1:  # skipped steps lowered the scale
        assert tr.scaler.get_scale() < 2.0 ** 16
    assert all(bool(torch.isfinite(p).all()) for p in tr.params)


@needs_peft
def test_sd3_bf16_step_on_cuda():
    rec, tr = _step("tiny-sd3", dtype="bf16", trainable="text+transformer-lora", height=64, width=64)
    assert not rec["skipped"] and rec["grad_norm"] > 0 and math.isfinite(rec["loss"])
    assert all(bool(torch.isfinite(p).all()) for p in tr.params)
