"""DFT on a GPU: the paths the CPU machine cannot run (CUDA autocast in fp16 / bf16 with the GradScaler, SD3 in
bf16 on CUDA; the Triton backward inside DFT's sampler is tests/test_triton_engine.py's, CPU and GPU). Skipped
without CUDA; the GPU session runs them (bench/gpu_next.sh A)."""
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
@pytest.mark.parametrize("mp", ["fp16", "bf16"])
def test_autocast_step_is_finite_and_close_to_fp32(mp):
    ref, _ = _step("tiny-sd", trainable="text+unet-lora")
    rec, tr = _step("tiny-sd", trainable="text+unet-lora", mixed_precision=mp)
    assert not rec["skipped"] and rec["grad_norm"] > 0 and math.isfinite(rec["loss"])
    assert all(bool(torch.isfinite(p).all()) for p in tr.params)
    assert abs(rec["loss"] - ref["loss"]) <= 0.05 * abs(ref["loss"]) + 1e-3, (rec["loss"], ref["loss"])


@needs_peft
def test_sd3_bf16_step_on_cuda():
    rec, tr = _step("tiny-sd3", dtype="bf16", trainable="text+transformer-lora", height=64, width=64)
    assert not rec["skipped"] and rec["grad_norm"] > 0 and math.isfinite(rec["loss"])
    assert all(bool(torch.isfinite(p).all()) for p in tr.params)
