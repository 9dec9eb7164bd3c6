"""Entanglement guidance: gradients against finite differences, descent, batching, end-to-end effect, errors."""
import copy

import pytest
import torch

import fastfair
from fastfair import metrics
from fastfair.generation import _token_layout
from fastfair.guidance import EntanglementGuidance, Guider
from fastfair.maps import Aggregation, MapRecorder

from tiny_models import PredictV, check_gradient_fd

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
    check_gradient_fd(gd, latents(1), t)


def test_uncond_branch_reads_the_unconditional_half(sd64):
    """branch="uncond" (BiasMap's released code: OVAM hooks the unconditional half): the energy and gradient
    are the conditional-branch ones of a call whose halves are swapped, and match finite differences."""
    g_u = EntanglementGuidance("doctor", "face", gamma=0.1, branch="uncond")
    gd_u, t = make_guider(sd64, 1, g_u)
    E_u, grad_u = check_gradient_fd(gd_u, latents(1), t)
    gd_c, _ = make_guider(sd64, 1)
    ehs = gd_c.unet_call[1]["encoder_hidden_states"]
    gd_c.unet_call = ((), dict(encoder_hidden_states=torch.cat([ehs[1:], ehs[:1]])))  # [cond, uncond]
    E_c, grad_c = gd_c.energy_and_grad(latents(1), t)
    torch.testing.assert_close(E_u, E_c, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_u, grad_c, rtol=1e-10, atol=1e-14)
    E_cond, _ = make_guider(sd64, 1)[0].energy_and_grad(latents(1), t)
    assert (E_cond - E_u).abs().max() > 1e-4  # the halves differ: the test can tell them apart
    with pytest.raises(ValueError, match="branch"):
        EntanglementGuidance("doctor", "face", branch="both")


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
    # float32: the guided step's noise estimate comes from the folded pass (N-row halves, fused op), not the
    # plain 2N-row call, so it differs by rounding (~1e-6), which CFG and DDIM amplify over 3 steps;
    # test_skip_rule_float64 checks exact agreement
    torch.testing.assert_close(gen.latents, plain.latents, rtol=0, atol=1e-4)
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


# -- the fold: one UNet pass per guided step, same gradient as the former two-pass computation -----------

def _cond_rows(obj, n):
    """The conditional half of a CFG call's batch-sized arguments."""
    if torch.is_tensor(obj):
        return obj[n:] if obj.dim() and obj.shape[0] == 2 * n else obj
    if isinstance(obj, dict):
        return {k: _cond_rows(v, n) for k, v in obj.items()}
    return obj


def two_pass_energy_and_grad(pipe, sched, tok, weights, x, t, cond_kwargs, g):
    """The pre-fold computation, written out: a second UNet forward of the conditional rows only, with
    grad to the UNet's input scale_model_input(latents) (the variance-preserving x_t of BiasMap's rule),
    recording the guidance maps (down and up blocks)."""
    state = pipe._fastfair
    rec = MapRecorder(tok, x.shape[0], tuple(x.shape[-2:]), Aggregation("old", frozenset({"down", "up"}), True, "cond"))
    saved, state.recorder = state.recorder, rec
    try:
        x = sched.scale_model_input(x.detach(), t).requires_grad_(True)
        with torch.enable_grad():
            pipe.unet(x, t, **cond_kwargs)
            maps = rec.finalize()
            wm = torch.einsum("bkt,btyx->bkyx", weights.to(maps.dtype), maps)
            E = metrics.soft_iou(wm[:, 0], wm[:, 1], top_k=g.top_k, gamma=g.gamma, iters=g.iters,
                                 backend=state.backend)
            return E.detach(), torch.autograd.grad(E.sum(), x)[0]
    finally:
        state.recorder = saved


@pytest.fixture(scope="module")
def sdxl64(tiny_sdxl):
    pipe = copy.deepcopy(tiny_sdxl).to(torch.float64)
    fastfair.patch(pipe, backend="reference")
    return pipe


@pytest.mark.parametrize("model,sched,ckpt", [("sd", "DDIMScheduler", False), ("sd", "EulerDiscreteScheduler", False),
                                              ("sd", "DDIMScheduler", True), ("sdxl", "DDIMScheduler", False)])
def test_folded_step_equals_two_pass_gradient(sd64, sdxl64, model, sched, ckpt):
    import diffusers

    base = sd64 if model == "sd" else sdxl64
    prompt, words = (PROMPT, ("doctor", "face")) if model == "sd" else ("a photo of a janitor", ("janitor", "photo"))
    pipe = copy.copy(base)
    pipe.scheduler = getattr(diffusers, sched).from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    n = 2
    g = EntanglementGuidance(*words, gamma=0.1, max_grad_norm=1e9, steps=[0], checkpointing=ckpt)
    tok, w = _token_layout(pipe, [prompt], g.words)
    tok, w = tok.expand(n, -1), w.expand(n, -1, -1)
    gd = Guider(pipe, g, tok, [(0, 1)], (16, 16), None, n)
    gd.word_weights = w
    seen = {}

    def pre(_m, args, kwargs):
        seen.setdefault("unet", (args, dict(kwargs)))

    def capture(model_output, t, sample, *a, **k):
        if "out" not in seen:
            seen.update(out=model_output.clone(), sample=sample.clone(), t=t, sched=copy.deepcopy(pipe.scheduler))
        return type(pipe.scheduler).step(pipe.scheduler, model_output, t, sample, *a, **k)

    lat = torch.randn(n, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    pipe.scheduler.step = capture
    handle = pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad(), gd:
            pipe(prompt=[prompt] * n, latents=lat, num_inference_steps=2,
                 guidance_scale=7.5, output_type="latent")
    finally:
        handle.remove()
        del pipe.scheduler.step
    assert not pipe.unet.__dict__.get("forward") and gd._pending is None
    (x_in, t), kw = seen["unet"]
    assert x_in.shape[0] == 2 * n
    kw = dict(kw, return_dict=False)
    with torch.no_grad():
        eps = pipe.unet(x_in, t, **kw)[0]  # the plain CFG call
    eps = eps[:n] + 7.5 * (eps[n:] - eps[:n])
    E, grad = two_pass_energy_and_grad(pipe, seen["sched"], tok, w, seen["sample"], seen["t"], _cond_rows(kw, n), g)
    abar = float(seen["sched"].alphas_cumprod[int(round(float(seen["t"])))])
    assert grad.abs().max() > 0
    torch.testing.assert_close(gd.diagnostics()["energy"][0], E.float(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(seen["out"], eps + g.scale * (1 - abar) ** 0.5 * grad, rtol=1e-8, atol=1e-10)


def test_one_unet_pass_per_guided_step(tiny_sd):
    calls, rows = [], []
    h1 = tiny_sd.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    h2 = tiny_sd.unet.conv_in.register_forward_hook(lambda m, i, o: rows.append((o.shape[0], torch.is_grad_enabled())))
    try:
        for maps in ((), ("doctor", "face")):
            calls.clear()
            rows.clear()
            fastfair.generate(tiny_sd, PROMPT, seeds=[0, 1], steps=3, maps=maps, progress=False,
                              guidance=EntanglementGuidance("doctor", "face", steps=[0, 1]))
            assert len(calls) == 3  # one UNet call per step: no second forward for the guidance
            # guided steps: uncond rows without grad, cond rows with grad; the un-guided step: plain, no grad
            assert rows == [(2, False), (2, True), (2, False), (2, True), (4, False)]
    finally:
        h1.remove()
        h2.remove()


def test_skip_rule_float64(sd64):
    kw = dict(seeds=[0, 1], steps=3, progress=False, backend="reference")
    gen = fastfair.generate(sd64, PROMPT, **kw, guidance=EntanglementGuidance("doctor", "face", max_grad_norm=1e-9))
    plain = fastfair.generate(sd64, PROMPT, **kw)
    assert not gen.diagnostics["applied"].any()
    torch.testing.assert_close(gen.latents, plain.latents, rtol=0, atol=1e-10)


@pytest.mark.parametrize("agg,attr", [("fastfair", None), ("biasmap", None), ("daam", None),
                                      ("fastfair", "a photo of the face of a doctor and gender")])
def test_user_maps_unchanged_by_guidance(sd64, agg, attr):
    """With every update skipped, a guided run's latents and user maps are the plain run's: the maps
    generate() records ride on the folded pass (or, reading other keys, their own pass) unchanged."""
    kw = dict(seeds=[0, 1], steps=3, maps=["doctor", "face"], progress=False, attribution_prompt=attr,
              backend="reference", aggregation=Aggregation.get("daam").with_factors([6, 12]) if agg == "daam" else agg)
    plain = fastfair.generate(sd64, PROMPT, **kw)
    guided = fastfair.generate(sd64, PROMPT, **kw, guidance=EntanglementGuidance("doctor", "face", max_grad_norm=1e-9))
    assert not guided.diagnostics["applied"].any()
    torch.testing.assert_close(guided.latents, plain.latents, rtol=0, atol=1e-10)
    for word in ("doctor", "face"):
        torch.testing.assert_close(guided.maps[word], plain.maps[word], rtol=1e-8, atol=1e-12)


def test_no_cfg_guidance(tiny_sd):
    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[0, 1], steps=2, guidance_scale=1.0, progress=False,
                            guidance=EntanglementGuidance("doctor", "face"))
    assert gen.diagnostics["energy"].shape == (2, 2) and torch.isfinite(gen.latents).all()


@pytest.mark.parametrize("sched", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_v_prediction_equals_epsilon(sd64, sched):
    """A v-prediction model gets the same guided trajectory as its epsilon twin: the nudge is translated
    to v (v += scale sqrt(1 - abar) / sqrt(abar) g), not added to v as if it were a noise estimate."""
    import diffusers

    eps_pipe = copy.copy(sd64)
    eps_pipe.scheduler = getattr(diffusers, sched).from_config(sd64.scheduler.config)
    v_pipe = copy.copy(sd64)
    v_pipe.scheduler = getattr(diffusers, sched).from_config(sd64.scheduler.config, prediction_type="v_prediction")
    v_pipe.unet = PredictV(sd64.unet, v_pipe.scheduler.alphas_cumprod)
    kw = dict(seeds=[0, 1], steps=4, progress=False, backend="reference", maps=["doctor"])
    plain_e = fastfair.generate(eps_pipe, PROMPT, **kw)
    plain_v = fastfair.generate(v_pipe, PROMPT, **kw)
    # the wrapper is exact up to the schedulers' float32 scalars (abar, sqrt(abar) in float32): ~1e-6
    tol = dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(plain_v.latents, plain_e.latents, **tol)
    g = EntanglementGuidance("doctor", "face", scale=50.0)
    guided_e = fastfair.generate(eps_pipe, PROMPT, **kw, guidance=g)
    guided_v = fastfair.generate(v_pipe, PROMPT, **kw, guidance=g)
    assert guided_e.diagnostics["applied"].any()
    assert (guided_e.latents - plain_e.latents).abs().max() > 1e-2  # guidance moved the latents
    torch.testing.assert_close(guided_v.diagnostics["energy"], guided_e.diagnostics["energy"], **tol)
    torch.testing.assert_close(guided_v.latents, guided_e.latents, **tol)
    torch.testing.assert_close(guided_v.maps["doctor"], guided_e.maps["doctor"], **tol)


def test_sample_prediction_refused(tiny_sd):
    from diffusers import DDIMScheduler

    pipe = copy.copy(tiny_sd)
    pipe.scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match="epsilon- or v-prediction"):
        fastfair.generate(pipe, PROMPT, seeds=[0], steps=2, progress=False,
                          guidance=EntanglementGuidance("doctor", "face"))


def test_uncond_branch_end_to_end(tiny_sd, tmp_path, capsys):
    from fastfair.cli import main

    kw = dict(seeds=[0, 1], steps=4, maps=["doctor", "face"], progress=False)
    cond = fastfair.generate(tiny_sd, PROMPT, **kw, guidance=EntanglementGuidance("doctor", "face"))
    unc = fastfair.generate(tiny_sd, PROMPT, **kw, guidance=EntanglementGuidance("doctor", "face", branch="uncond"))
    assert unc.diagnostics["applied"].any() and torch.isfinite(unc.diagnostics["energy"]).all()
    assert not torch.equal(unc.diagnostics["energy"], cond.diagnostics["energy"])
    assert unc.maps["doctor"].shape == cond.maps["doctor"].shape and unc.config["guidance"]["branch"] == "uncond"
    assert main(["generate", "--model", "tiny-sd", "--prompt", PROMPT, "--maps", "doctor,face", "--steps", "2",
                 "--guide", "doctor:face", "--guide-branch", "uncond", "--out", str(tmp_path / "g"),
                 "--no-progress"]) == 0


def test_uncond_branch_reads_the_prompts_own_keys(tiny_sd):
    """branch='uncond' without an attribution prompt: the unconditional half's own keys are the negative prompt's,
    which hold no prompt word, so (doctor, woman) in one prompt and (nurse, man) in another gave the same energy
    (a review). The words are read from the prompt's own keys, as with attribution_prompt=the prompt."""
    kw = dict(seeds=[0], steps=2, progress=False)
    p1, p2 = "a photo of a doctor and a woman", "a photo of a nurse and a man"
    e = {}
    for p, pair in ((p1, ("doctor", "woman")), (p2, ("nurse", "man"))):
        own = fastfair.generate(tiny_sd, p, **kw, guidance=EntanglementGuidance(*pair, branch="uncond", steps=[0]))
        attr = fastfair.generate(tiny_sd, p, **kw, guidance=EntanglementGuidance(*pair, branch="uncond", steps=[0],
                                                                                 attribution_prompt=p))
        torch.testing.assert_close(own.diagnostics["energy"], attr.diagnostics["energy"], rtol=0, atol=0)
        assert torch.equal(own.latents, attr.latents)
        e[p] = own.diagnostics["energy"][0, 0].item()
    assert abs(e[p1] - e[p2]) > 1e-4  # the words matter (the pad keys gave both the same energy, 0.57596)


def test_guidance_options_that_would_do_nothing_are_refused(tiny_sd):
    """steps past the loop (or -1 for "the last") guided nothing, silently; an int crashed mid-sampling; top_k=None
    and branch='uncond' without CFG were a raw TypeError / silently the conditional maps (a helper's review)."""
    for kw, msg in ((dict(steps=5), "collection of step indices"), (dict(steps=[-1]), "non-negative"),
                    (dict(top_k=None), "top_k")):
        with pytest.raises(ValueError, match=msg):
            EntanglementGuidance("doctor", "face", **kw)
    kw = dict(seeds=[0], steps=4, progress=False)
    with pytest.raises(ValueError, match="all past the 4 denoising steps"):
        fastfair.generate(tiny_sd, PROMPT, guidance=EntanglementGuidance("doctor", "face", steps=[7]), **kw)
    with pytest.raises(ValueError, match="branch='uncond'"):
        fastfair.generate(tiny_sd, PROMPT, guidance=EntanglementGuidance("doctor", "face", branch="uncond"),
                          guidance_scale=1.0, **kw)
    g = EntanglementGuidance("doctor", "face", steps=range(3, 0, -1))
    assert g.steps == {1, 2, 3}
