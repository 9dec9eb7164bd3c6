"""Issue 3's engine check: ``generate`` on tiny-sd with backend="triton" equals the reference backend --
maps, latents, and entanglement-guided latents (the gradient path through the Triton backward).

CPU: the Triton interpreter (tests/triton_mode.py); GPU: CUDA tensors. The reference backend is plain PyTorch,
itself checked against float64 explicit softmax in tests/test_ops_reference.py.
"""
from __future__ import annotations

import pytest
import torch

from triton_mode import GPU, import_backend

T_OPS = import_backend()
import fastfair  # noqa: E402
from fastfair import pipelines  # noqa: E402

PROMPT = "a photo of the face of a doctor"
DEV = "cuda" if GPU else "cpu"


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 convolutions and matmuls in full fp32, as on the CPU. On a GPU cuDNN runs fp32 convolutions in TF32 by
    default (torch.backends.cudnn.allow_tf32): each rounds its inputs to 10 mantissa bits, so two runs whose
    attention outputs differ by 1e-7 (kernel vs reference) round some conv inputs differently and drift apart.
    On the H200 (2026-11-27) that put tiny-sd's maps 1.4e-4 apart and its guided latents 1.8%, and SD3's guided
    latents 2% over their tolerance; SD3 / Flux maps (no convolutions after their first attention) matched to
    1e-5. Reproduced on the CPU by emulating TF32 convolutions in the interpreter (bench/tf32_emulation.py: maps
    2.3e-4, guided latents 1.4%, SD3 guided 5.75e-4 over 5.11e-4), and gone with them off."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _pair(monkeypatch, model="tiny-sd", **kw):
    pipe = pipelines.load_pipeline(model, device=DEV)
    ref = fastfair.generate(pipe, PROMPT, backend="reference", progress=False, **kw)
    calls = {"fwd": 0, "bwd": 0}
    for name in calls:  # count the Triton backend's calls: it really ran
        f = getattr(T_OPS, f"cross_attention_{name}")

        def counted(*a, _f=f, _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(T_OPS, f"cross_attention_{name}", counted)
    tri = fastfair.generate(pipe, PROMPT, backend="triton", progress=False, **kw)
    return ref, tri, calls


@pytest.mark.parametrize("model,size", [
    ("tiny-sd", {}),
    ("tiny-sd3", {}),  # image queries over [image; text] keys: 64 + 333 = 397 (the online-softmax loop)
    ("tiny-flux", dict(height=128, width=128)),  # text first, RoPE'd q/k, single-stream blocks: 512 + 64 keys
])
def test_generate_triton_equals_reference(monkeypatch, model, size):
    ref, tri, calls = _pair(monkeypatch, model=model, seeds=[0, 1], steps=2, maps=["doctor", "face"], **size)
    assert calls["fwd"] > 0
    for w in ("doctor", "face"):
        err = float((tri.maps[w] - ref.maps[w]).abs().max() / ref.maps[w].abs().max())
        assert err <= 1e-5, (w, err)
    # latents: the maps' tiny differences do not enter them; fp32 rounding through CFG (measured 1.3e-5)
    torch.testing.assert_close(tri.latents, ref.latents, rtol=0, atol=2e-4)


@pytest.mark.parametrize("model,size", [("tiny-sd3", {}), ("tiny-flux", dict(height=128, width=128))])
def test_mmdit_attribution_triton_equals_reference(monkeypatch, model, size):
    """Open-vocabulary maps on an MMDiT: the fused op's maps read the attribution prompt's text-stream keys
    (map_keys of 64 + 333 / 512 + 64 rows: the map-key loop past one tile)."""
    ref, tri, calls = _pair(monkeypatch, model=model, seeds=[0], steps=2, maps=["woman", "doctor"],
                            attribution_prompt=PROMPT + " and a woman", **size)
    assert calls["fwd"] > 0
    for w in ("woman", "doctor"):
        err = float((tri.maps[w] - ref.maps[w]).abs().max() / ref.maps[w].abs().max())
        assert err <= 1e-5, (w, err)
    torch.testing.assert_close(tri.latents, ref.latents, rtol=0, atol=2e-4)


def test_guided_generate_triton_equals_reference(monkeypatch):
    ref, tri, calls = _pair(monkeypatch, seeds=[0], steps=2, guidance=fastfair.EntanglementGuidance("doctor", "face"))
    assert calls["fwd"] > 0 and calls["bwd"] > 0
    scale = float(ref.latents.abs().max())
    assert float((tri.latents - ref.latents).abs().max()) <= 1e-4 * scale  # measured 1.7e-5 x scale


def test_sd3_guided_triton_equals_reference(monkeypatch):
    """SD3 guidance: the image keys and values depend on the latents, so the gradient needs the full backward
    (dq, dk, dv) over the long key set."""
    ref, tri, calls = _pair(monkeypatch, model="tiny-sd3", seeds=[0], steps=3,
                            guidance=fastfair.EntanglementGuidance("doctor", "face"))
    assert calls["fwd"] > 0 and calls["bwd"] > 0
    assert ref.diagnostics["applied"].any()
    scale = float(ref.latents.abs().max())
    assert float((tri.latents - ref.latents).abs().max()) <= 1e-4 * scale



def test_dft_gradients_through_the_triton_backward(monkeypatch):
    """Issue 3's kernels inside DFT: the LoRA gradients of an adjusted-DFT sample through fastfair's patched
    cross-attention equal the reference backend's (the full backward: dq, dk, dv into the text LoRA and the UNet's
    adapters), and Triton's backward really ran."""
    pytest.importorskip("peft")
    from dft_helpers import RedClassifier, small
    from fastfair.dft import DFTTrainer

    grads, calls = {}, {"bwd": 0}
    f = T_OPS.cross_attention_bwd

    def counted(*a, **k):
        calls["bwd"] += 1
        return f(*a, **k)

    monkeypatch.setattr(T_OPS, "cross_attention_bwd", counted)
    for backend in ("reference", "triton"):
        pipe = pipelines.load_pipeline("tiny-sd", device=DEV)
        torch.manual_seed(0)
        tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="text+unet-lora", backend=backend,
                                                               attention="fastfair"), quality_encoder=None)
        with torch.no_grad():   # a non-zero LoRA, so that every adapter carries gradient
            for p in tr.params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.device))
        noise = tr.noises(2, torch.Generator().manual_seed(0))
        with tr._attention():
            img = tr.sample(PROMPT, noise, 2, grad=True)
            g = torch.autograd.grad((img[:, 0] * torch.linspace(0, 1, 32, device=img.device)).sum(), tr.params)
        grads[backend] = torch.cat([x.flatten() for x in g]).double()
        tr.close()
    ref = grads["reference"]
    assert calls["bwd"] > 0 and ref.abs().max() > 0
    err = float((grads["triton"] - ref).abs().max() / ref.abs().max())
    assert err < (1e-2 if GPU else 1e-4), err   # on a GPU Triton's fp32 dots may run in TF32
