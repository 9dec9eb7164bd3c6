"""Small random models built in code for tests (no hub)."""
from __future__ import annotations

import torch


def tiny_clip(seed: int = 0):
    """A randomly initialised CLIPModel (32-wide, 2 layers, 32x32 images) and the real CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from fastfair.pipelines import clip_tokenizer

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(cfg).eval(), clip_tokenizer()


class PredictV(torch.nn.Module):
    """An epsilon UNet turned into a v-prediction one: v = (eps - sqrt(1 - abar) x_t) / sqrt(abar)."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.inner = unet
        self.config = unet.config
        self.abar = alphas_cumprod.double()

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    def forward(self, sample, timestep, *args, return_dict=True, **kwargs):
        eps = self.inner(sample, timestep, *args, return_dict=False, **kwargs)[0]
        abar = self.abar[int(torch.as_tensor(timestep).flatten()[0])]
        v = (eps - (1 - abar).sqrt().to(eps.dtype) * sample) / abar.sqrt().to(eps.dtype)
        if not return_dict:
            return (v,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=v)


def check_gradient_fd(guider, x, t, n_dirs: int = 3, h: float = 1e-4, rel: float = 1e-4):
    """Directional derivatives of a Guider's energy along random unit directions: its gradient against central
    finite differences (float64)."""
    import pytest

    E, g = guider.energy_and_grad(x, t)
    assert g.abs().max() > 0
    gen = torch.Generator().manual_seed(1)
    for _ in range(n_dirs):
        d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        d /= d.norm()
        Ep, _ = guider.energy_and_grad(x + h * d, t, want_grad=False)
        Em, _ = guider.energy_and_grad(x - h * d, t, want_grad=False)
        assert (Ep - Em).item() / (2 * h) == pytest.approx((g * d).sum().item(), rel=rel, abs=1e-9)
    return E, g


def interrupt_generate(monkeypatch, at_call: int):
    """Make ``fastfair.generation.generate`` raise KeyboardInterrupt at its ``at_call``-th call (a killed
    ``generate_to_dir`` run); returns a function that restores the real one."""
    from fastfair import generation

    real, calls = generation.generate, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(generation, "generate", dying)
    return lambda: monkeypatch.setattr(generation, "generate", real)
