"""Entanglement guidance: gradients against finite differences, descent, batching, end-to-end effect, errors."""
import copy

import pytest
import torch

import fastfair
from fastfair.generation import _token_layout
from fastfair.guidance import EntanglementGuidance, Guider

PROMPT = "a photo of the face of a doctor"


@pytest.fixture(scope="module")
def sd64(tiny_sd):
    pipe = copy.deepcopy(tiny_sd).to(torch.float64)
    fastfair.patch(pipe, backend="reference")
    return pipe


def make_guider(pipe, n, guidance=None):
    g = guidance or EntanglementGuidance("doctor", "face", gamma=0.1)
    tok, w = _token_layout(pipe, [PROMPT], g.words)
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[3]
    emb, neg = pipe.encode_prompt([PROMPT] * n, "cpu", 1, True)
    gd = Guider(pipe, g, tok.expand(n, -1), [(0, 1)], (16, 16), None, n)
    gd.word_weights = w.expand(n, -1, -1)
    gd.unet_call = ((), dict(encoder_hidden_states=torch.cat([neg, emb])))
    return gd, t


def latents(n, seed=0):
    return torch.randn(n, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_gradient_matches_central_finite_differences(sd64):
    gd, t = make_guider(sd64, 1)
    x = latents(1)
    E, g = gd.energy_and_grad(x, t)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        d /= d.norm()
        h = 1e-4
        Ep, _ = gd.energy_and_grad(x + h * d, t, want_grad=False)
        Em, _ = gd.energy_and_grad(x - h * d, t, want_grad=False)
        fd = (Ep - Em).item() / (2 * h)
        assert fd == pytest.approx((g * d).sum().item(), rel=1e-4, abs=1e-9)


def test_descent(sd64):
    gd, t = make_guider(sd64, 1)
    x = latents(1, seed=2)
    E0, g = gd.energy_and_grad(x, t)
    E1, _ = gd.energy_and_grad(x - 1e-2 * g / g.norm(), t, want_grad=False)
    assert E1.item() < E0.item()


def test_batched_gradients_equal_per_image(sd64):
    gd3, t = make_guider(sd64, 3)
    x = latents(3, seed=4)
    E, g = gd3.energy_and_grad(x, t)
    gd1, _ = make_guider(sd64, 1)
    for i in range(3):
        Ei, gi = gd1.energy_and_grad(x[i:i + 1], t)
        torch.testing.assert_close(E[i:i + 1], Ei, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g[i:i + 1], gi, rtol=1e-8, atol=1e-12)


def test_guided_runs_end_less_entangled(tiny_sd):
    seeds = list(range(6))
    base = fastfair.generate(tiny_sd, PROMPT, seeds=seeds, steps=8, maps=["doctor", "face"], progress=False)
    guided = fastfair.generate(tiny_sd, PROMPT, seeds=seeds, steps=8, maps=["doctor", "face"], progress=False,
                               guidance=EntanglementGuidance("doctor", "face", scale=100.0))
    b, g = base.soft_iou("doctor", "face").mean().item(), guided.soft_iou("doctor", "face").mean().item()
    print(f"mean SoftIoU(doctor, face) over {len(seeds)} seeds: unguided {b:.4f}, guided {g:.4f}")
    assert g < b
    d = guided.diagnostics
    assert d["energy"].shape == (8, 6) and d["applied"].dtype == torch.bool
    # the per-step energy recorded during guidance falls over the run
    assert d["energy"][-1].mean() < d["energy"][0].mean()


def test_skip_rule_and_clip(tiny_sd):
    tiny = EntanglementGuidance("doctor", "face", max_grad_norm=1e-9)
    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=3, progress=False, guidance=tiny)
    plain = fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=3, progress=False)
    assert not gen.diagnostics["applied"].any()  # every gradient exceeds the bound: all skipped
    torch.testing.assert_close(gen.latents, plain.latents, rtol=0, atol=1e-6)
    clip = EntanglementGuidance("doctor", "face", max_grad_norm=1e-3, on_large_grad="clip")
    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=3, progress=False, guidance=clip)
    assert gen.diagnostics["clipped"].all()
    assert (gen.latents - plain.latents).abs().max() > 1e-6


def test_open_vocabulary_and_window(tiny_sd):
    g = EntanglementGuidance("doctor", "gender", attribution_prompt="a photo of the face of a doctor and gender",
                             steps=[0, 1])
    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[0, 1], steps=4, progress=False, guidance=g)
    assert gen.diagnostics["step"].tolist() == [0, 1]


@pytest.mark.parametrize("sched", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_other_schedulers(tiny_sd, sched):
    import diffusers

    pipe = copy.copy(tiny_sd)
    pipe.scheduler = getattr(diffusers, sched).from_config(tiny_sd.scheduler.config)
    gen = fastfair.generate(pipe, PROMPT, seeds=[0], steps=3, progress=False,
                            guidance=EntanglementGuidance("doctor", "face"))
    assert gen.diagnostics["energy"].shape == (3, 1) and torch.isfinite(gen.latents).all()


def test_sdxl(tiny_sdxl):
    gen = fastfair.generate(tiny_sdxl, "a photo of a janitor", seeds=[0, 1], steps=2, progress=False,
                            guidance=EntanglementGuidance("janitor", "photo"))
    assert gen.diagnostics["energy"].shape == (2, 2)


def test_bad_input(tiny_sd):
    with pytest.raises(ValueError, match="scale"):
        EntanglementGuidance("doctor", "face", scale=0)
    with pytest.raises(ValueError, match="not in the prompt"):
        fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=2, progress=False,
                          guidance=EntanglementGuidance("doctor", "gender"))
    with pytest.raises(ValueError, match="pairs"):
        EntanglementGuidance.parse("doctor")
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = copy.copy(tiny_sd)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="alphas_cumprod"):
        fastfair.generate(pipe, PROMPT, seeds=[0], steps=2, progress=False,
                          guidance=EntanglementGuidance("doctor", "face"))
