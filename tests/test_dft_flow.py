"""Adjusted DFT on SD3 and Flux (flow matching): fastfair's own sampling loop against diffusers' pipelines, the
per-step velocity gradient against a hand derivation of the Euler chain, LoRA outputs that load with
``load_lora_weights``, the CLI, and the refusals.

An Euler step is z_(i+1) = z_i + (sigma_(i+1) - sigma_i) v_i. With detached transformer inputs the final latent's
gradient reaches v_i with the factor sigma_(i+1) - sigma_i (the chain z_i -> z_(i+1) is the identity), so step i
alone contributes (sigma_(i+1) - sigma_i) * d<G, v_i>/d(theta), G the loss gradient at the final latent. Adjusted
DFT multiplies it by c_i = 1 / (sigma_i - sigma_(i+1)) (normalised), so every step contributes -d<G, v_i>/d(theta).
"""
import json
import math

import numpy as np
import pytest
import torch

import fastfair
from fastfair import dft
from fastfair.dft import DFTError, DFTTrainer

from dft_helpers import RedClassifier, distribution_shift, needs_peft, small

PROMPT = "a photo of the face of a doctor"
MODELS = ("tiny-sd3", "tiny-flux")


def _packed(pipe, noise):
    if not hasattr(pipe, "_pack_latents"):
        return noise
    return pipe._pack_latents(noise, *noise.shape)


def _flow(name, **kw):
    pipe = fastfair.load_pipeline(name)
    torch.manual_seed(0)
    cfg = dict(trainable="transformer-lora", height=64, width=64)
    cfg.update(kw)
    return pipe, DFTTrainer(pipe, [PROMPT], RedClassifier(), small(**cfg), quality_encoder=None)


# --------------------------------------------------------------------------------------------
# coefficients
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_flow_coefficients_are_the_inverse_euler_steps(name):
    """c_i is 1 / |dt_i| of the scheduler's own Euler step (measured by stepping a zero latent with a unit velocity,
    with the shift the pipeline uses: SD3's static 3.0, Flux's resolution-dependent mu), geometric mean 1."""
    pipe, tr = _flow(name)
    sched = tr._sched
    n = 5
    with torch.no_grad():
        tr.sample(PROMPT, tr.noises(1, torch.Generator().manual_seed(0)), n, grad=False)   # sets the timesteps
    ts = sched.timesteps.clone()
    dts = []
    for t in ts:   # a fresh scheduler with the same timesteps, stepped on z = 0, v = 1: the step's dt
        probe = type(sched).from_config(sched.config)
        probe.timesteps, probe.sigmas = ts, sched.sigmas.clone()
        probe._step_index = int((ts == t).nonzero()[0])
        probe._begin_index = 0
        dts.append(float(probe.step(torch.ones(1), t, torch.zeros(1), return_dict=False)[0]))
    dts = np.array(dts)
    assert (dts < 0).all() and len(dts) == n
    raw = dft.flow_grad_coefficients(sched, normalize=False)
    np.testing.assert_allclose(raw, 1.0 / -dts, rtol=1e-6)
    c = dft.flow_grad_coefficients(sched)
    assert math.prod(c) == pytest.approx(1.0, rel=1e-9)
    np.testing.assert_allclose(c / c[0], raw / raw[0], rtol=1e-9)
    if name == "tiny-sd3":   # SD3's shift 3 (not dynamic): sigmas = 3 s / (1 + 2 s) of the linear spacing
        assert not sched.config.get("use_dynamic_shifting", False) and sched.config.shift == 3.0
        s_min = 3 * 1e-3 / (1 + 2 * 1e-3)                    # the training schedule's last sigma, shifted
        lin = np.linspace(1.0, s_min, n)
        sig = np.append(3 * lin / (1 + 2 * lin), 0.0)
        np.testing.assert_allclose(raw, 1.0 / (sig[:-1] - sig[1:]), rtol=1e-5)
    tr.close()


# --------------------------------------------------------------------------------------------
# the sampler is the pipeline's
# --------------------------------------------------------------------------------------------

@needs_peft
@pytest.mark.parametrize("name", MODELS)
def test_flow_sampler_equals_the_diffusers_pipeline(name):
    """DFT's loop (encodings, timesteps and shift, CFG on SD3, Flux's packing and guidance embedding, VAE scaling
    and shift) gives the pipeline's images for the same initial latents; the LoRA starts at zero (B = 0), so the
    trainable model's images are the frozen ones."""
    pipe, tr = _flow(name)
    noise = tr.noises(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        frozen = tr.sample(PROMPT, noise, 3, grad=False, frozen=True)
        live = tr.sample(PROMPT, noise, 3, grad=False)
    tr.close()
    ref_pipe = fastfair.load_pipeline(name)
    ref = ref_pipe([PROMPT] * 2, latents=_packed(ref_pipe, noise), num_inference_steps=3,
                   guidance_scale=tr.cfg.guidance_scale, height=64, width=64, output_type="pt").images.float()
    assert tr.cfg.guidance_scale == (7.0 if name == "tiny-sd3" else 3.5)   # the pipelines' defaults
    assert ref.std() > 0.05
    torch.testing.assert_close(frozen, ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(live, ref, rtol=1e-4, atol=2e-5)


# --------------------------------------------------------------------------------------------
# the gradient path
# --------------------------------------------------------------------------------------------

def _hand_step_grads(tr, noise, n, loss_fn):
    """Per step i: (sigma_(i+1) - sigma_i) * d<G, v_i>/d(theta), from a separate no-grad run of the Euler chain
    (G = d loss / d z_final through the VAE decode), written out here, not with DFT's sampler."""
    pipe, net, sched, cfgs = tr.pipe, tr.net, tr._sched, tr.cfg
    flux = tr.kind == "flux"
    B, C, h, w = noise.shape
    with torch.no_grad():
        tr.sample(PROMPT, noise, n, grad=False)   # the scheduler's timesteps for n steps
    sig = sched.sigmas.double()
    ts = sched.timesteps.clone()

    def conditioning():   # encoded per call: the text LoRA's graph is used once per gradient
        if flux:
            emb, pooled, txt_ids = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, device=tr.device)
            return dict(encoder_hidden_states=emb.expand(B, -1, -1), pooled_projections=pooled.expand(B, -1),
                        txt_ids=txt_ids, guidance=torch.full([B], cfgs.guidance_scale),
                        img_ids=pipe._prepare_latent_image_ids(B, h // 2, w // 2, tr.device, emb.dtype))
        c, u, p, up = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, prompt_3=None, device=tr.device)
        return dict(encoder_hidden_states=torch.cat([u.expand(B, -1, -1), c.expand(B, -1, -1)]),
                    pooled_projections=torch.cat([up.expand(B, -1), p.expand(B, -1)]))

    def velocity(z, t):
        kw = conditioning()
        zin = z if flux else torch.cat([z, z])
        tt = t.expand(len(zin))
        v = net(hidden_states=zin, timestep=tt / 1000 if flux else tt, return_dict=False, **kw)[0]
        if not flux:
            vu, vc = v.chunk(2)
            v = vu + cfgs.guidance_scale * (vc - vu)
        return v

    z = _packed(pipe, noise).float()
    zs = []
    with torch.no_grad():
        for i, t in enumerate(ts):
            zs.append(z.clone())
            z = z + float(sig[i + 1] - sig[i]) * velocity(z, t)
    zf = z.detach().requires_grad_(True)
    lat = pipe._unpack_latents(zf, 64, 64, pipe.vae_scale_factor) if flux else zf
    vae = pipe.vae
    img = ((vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0] + 1) / 2)
    G = torch.autograd.grad(loss_fn(img.clamp(0, 1)), zf)[0]
    out = []
    for i, t in enumerate(ts):
        g = torch.autograd.grad((G * velocity(zs[i], t)).sum(), tr.params, allow_unused=True)
        flat = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, tr.params)])
        out.append(float(sig[i + 1] - sig[i]) * flat)
    return out


@needs_peft
@pytest.mark.parametrize("name", MODELS)
def test_flow_gradient_path(name, monkeypatch):
    """Transformer inputs never carry gradient; each step's velocity gradient is its Euler factor times
    d<G, v_i>/d(theta) (hand-derived chain above), and the adjusted gradient is sum_i c_i of those."""
    n = 2
    pipe, tr = _flow(name, trainable="text+transformer-lora")
    with torch.no_grad():   # a non-zero LoRA (B = 0 at init would hide the text LoRA's gradient path)
        for p in tr.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    seen = []
    hook = tr.net.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].requires_grad),
                                            with_kwargs=True)
    noise = tr.noises(2, torch.Generator().manual_seed(1))

    def loss_fn(img):
        return (img[:, 0] * torch.linspace(0, 1, 64)).sum()

    def grads(coefs=None):
        if coefs is not None:
            monkeypatch.setattr(dft, "flow_grad_coefficients", lambda s, *a, **k: np.asarray(coefs, dtype=float))
        img = tr.sample(PROMPT, noise, n, grad=True)
        g = torch.autograd.grad(loss_fn(img), tr.params, allow_unused=True)
        monkeypatch.undo()
        return torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, tr.params)])

    g = grads()
    hook.remove()
    assert seen and not any(seen)
    hand = _hand_step_grads(tr, noise, n, loss_fn)
    g1, g2 = grads([1.0, 0.0]), grads([0.0, 1.0])
    for gi, hi in zip((g1, g2), hand):
        assert hi.abs().max() > 0
        err = float((gi - hi).abs().max() / hi.abs().max())
        assert err < 2e-3, err
    c = dft.flow_grad_coefficients(tr._sched)
    err = float((g - (c[0] * hand[0] + c[1] * hand[1])).abs().max() / g.abs().max())
    assert err < 2e-3, err
    # both the text encoders' and the transformer's LoRA get gradient
    names = [nm for nm, _ in tr.named_params]
    sizes = [p.numel() for p in tr.params]
    parts = torch.split(g, sizes)
    got = {nm.split(".")[0] for nm, x in zip(names, parts) if x.abs().max() > 0}
    assert got == ({"text_encoder", "text_encoder_2", "transformer"} if name == "tiny-sd3"
                   else {"text_encoder", "transformer"})
    tr.close()


# --------------------------------------------------------------------------------------------
# training and outputs
# --------------------------------------------------------------------------------------------

def _images(pipe, seeds=(0, 1)):
    gen = fastfair.generate(pipe, PROMPT, seeds=list(seeds), steps=3, height=64, width=64, progress=False)
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in gen.images])


@needs_peft
@pytest.mark.parametrize("name", MODELS)
def test_flow_lora_trains_and_loads_with_load_lora_weights(name, tmp_path):
    pipe = fastfair.load_pipeline(name)
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="text+transformer-lora", steps=1, lr=5e-2,
                                                           ema_decay=0.5, height=64, width=64),
                    quality_encoder=None, out_dir=tmp_path)
    res = tr.train(progress=False)
    tr.close()
    assert math.isfinite(res.history[-1]["loss"]) and res.history[-1]["grad_norm"] > 0
    trained = _images(pipe)
    base = _images(fastfair.load_pipeline(name))
    loaded_pipe = fastfair.load_pipeline(name)
    loaded_pipe.load_lora_weights(str(res.lora_dir))
    loaded = _images(loaded_pipe)
    assert (loaded - base).abs().mean() > 1.0            # the LoRA changes the images (0..255 scale)
    assert (loaded - trained).abs().max() <= 2.0         # and gives the trained model's images
    meta = json.loads((tmp_path / "dft.json").read_text())
    assert meta["config"]["scheduler"] == "pipeline" and meta["config"]["attention"] == "diffusers"
    import os
    import stat

    from fastfair._io import _MODE

    for f in [*res.lora_dir.iterdir(), *res.lora_ema_dir.iterdir()]:   # the umask's mode (safetensors writes 0600)
        assert stat.S_IMODE(os.stat(f).st_mode) == _MODE, f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary folder left behind
    assert (tmp_path / "report.html").exists()


@needs_peft
def test_sd3_transformer_lora_moves_the_distribution():
    """Five transformer-LoRA steps on tiny-sd3 move the stand-in classifier's distribution from 87.5/12.5 to within
    15 points of 50/50 (as the UNet test in test_dft.py): the adjusted flow gradient trains. The transformer LoRA
    starts with B = 0, so its first gradients are small (norm ~0.02): a larger learning rate than the text LoRA's."""
    torch.manual_seed(0)
    cfg = dft.DFTConfig(images_per_prompt=8, sampling_steps=(2, 2), steps=5, quality_weight=0.0, ema_decay=None,
                        lr=0.1, adam_betas=(0.0, 0.999), rank=4, checkpoint_every=0, height=64, width=64,
                        gradient_checkpointing=False, trainable="transformer-lora", target={"gender": [0.5, 0.5]})
    before, after, history = distribution_shift(fastfair.load_pipeline("tiny-sd3"), PROMPT, cfg)
    assert before >= 0.85
    assert abs(after[0] - 0.5) <= 0.15, (before, after, [r["distribution"] for r in history])
    assert before - after[0] >= 0.25


@needs_peft
@pytest.mark.parametrize("name", MODELS)
def test_flow_fastfair_attention_gives_diffusers_gradients(name):
    """attention='fastfair' routes the image queries through fastfair.ops: the same images and gradients."""
    out = []
    for att in ("diffusers", "fastfair"):
        pipe, tr = _flow(name, attention=att)
        with torch.no_grad():
            for p in tr.params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        noise = tr.noises(2, torch.Generator().manual_seed(0))
        with tr._attention():
            img = tr.sample(PROMPT, noise, 2, grad=True)
            g = torch.autograd.grad(img[:, 1].sum(), tr.params, allow_unused=True)  # SD3's last block: no text out
        out.append((img.detach(), torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                             for x, p in zip(g, tr.params)])))
        assert fastfair.processors.is_patched(pipe) == (att == "fastfair")
        tr.close()
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-5)
    assert float((out[1][1] - out[0][1]).abs().max() / out[0][1].abs().max()) < 1e-3


# --------------------------------------------------------------------------------------------
# CLI and refusals
# --------------------------------------------------------------------------------------------

@needs_peft
def test_cli_on_sd3(tmp_path, capsys):
    from fastfair.cli import main

    rc = main(["finetune", "dft", "--model", "tiny-sd3", "--prompt", PROMPT, "--attributes", "gender",
               "--classifier", "python:" + str(_write_classifier(tmp_path)) + ":make", "--trainable",
               "transformer-lora", "--rank", "2", "--steps", "1", "--images-per-prompt", "2", "--sampling-steps", "2",
               "--height", "32", "--width", "32", "--quality-encoder", "none", "--ema-decay", "0",
               "--checkpoint-every", "0", "--uncertainty-threshold", "1", "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "load_lora_weights" in out
    meta = json.loads((tmp_path / "run" / "dft.json").read_text())
    assert meta["config"]["guidance_scale"] == 7.0 and meta["config"]["trainable"] == "transformer-lora"


def _write_classifier(tmp_path):
    f = tmp_path / "clf.py"
    f.write_text("import sys\nsys.path.insert(0, %r)\nfrom dft_helpers import RedClassifier\n\n"
                 "def make(**kw):\n    return RedClassifier()\n" % str(__import__("pathlib").Path(__file__).parent))
    return f


@pytest.mark.parametrize("kw,match", [
    (dict(trainable="unet-lora"), "transformer-lora"),
    (dict(trainable="text+unet-lora"), "text\\+transformer-lora"),
    (dict(prompt_padding="longest"), "max_length"),
    (dict(scheduler="dpm++"), "flow matching"),
    (dict(height=40), "divisible by 16"),
])
def test_flow_refusals(kw, match):
    pipe = fastfair.load_pipeline("tiny-sd3")
    with pytest.raises(DFTError, match=match):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(**{"trainable": "transformer-lora", **kw}),
                   quality_encoder=None)


def test_flow_scheduler_and_unet_refusals():
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    pipe = fastfair.load_pipeline("tiny-sd3")
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(DFTError, match="FlowMatchHeunDiscreteScheduler"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="transformer-lora"), quality_encoder=None)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
    with pytest.raises(DFTError, match="stochastic"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="transformer-lora"), quality_encoder=None)
    with pytest.raises(DFTError, match="'unet-lora'"):
        DFTTrainer(fastfair.load_pipeline("tiny-sd"), [PROMPT], RedClassifier(), small(trainable="transformer-lora"),
                   quality_encoder=None)


# --------------------------------------------------------------------------------------------
# refusals come before anything changes
# --------------------------------------------------------------------------------------------

@needs_peft
def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(tmp_path):
    """--overwrite removes the old run only once every check of the new one has passed."""
    out = tmp_path / "run"
    tr = DFTTrainer(fastfair.load_pipeline("tiny-sd3"), [PROMPT], RedClassifier(),
                    small(trainable="transformer-lora", steps=1, height=32, width=32), quality_encoder=None, out_dir=out)
    tr.train(progress=False)
    before = sorted(p.name for p in out.iterdir())
    assert "dft.json" in before
    for bad in (dict(mixed_precision="bf16"), dict(target={"gender": [0.3, 0.3]}), dict(images_per_prompt=1),
                dict(attributes=["age"])):
        # (before the overwrite fix these all failed at the folder check, which refused overwrite=True itself)
        with pytest.raises((DFTError, dft.TargetError, dft.ClassifierMismatch)):
            DFTTrainer(fastfair.load_pipeline("tiny-sd3"), [PROMPT], RedClassifier(),
                       small(**{"trainable": "transformer-lora", **bad}), quality_encoder=None, out_dir=out,
                       overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == before
    tr = DFTTrainer(fastfair.load_pipeline("tiny-sd3"), [PROMPT], RedClassifier(),  # a valid one: starts over
                    small(trainable="transformer-lora", steps=1, height=32, width=32), quality_encoder=None, out_dir=out,
                    overwrite=True)
    assert not (out / "dft.json").exists()
    tr.close()
    with pytest.raises(dft.ResumeError, match="not a DFT checkpoint"):
        DFTTrainer(fastfair.load_pipeline("tiny-sd3"), [PROMPT], RedClassifier(), small(trainable="transformer-lora"),
                   quality_encoder=None, out_dir=tmp_path / "other", resume=tmp_path / "nothing")


@needs_peft
def test_a_refused_trainer_leaves_the_pipeline_alone_and_a_used_one_is_named():
    pipe = fastfair.load_pipeline("tiny-sd3")
    with pytest.raises(dft.ResumeError):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="transformer-lora"), quality_encoder=None,
                   resume="/nonexistent/checkpoint")
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="transformer-lora"), quality_encoder=None)
    tr.close()   # the trained adapters stay in the pipeline: a second trainer on it is refused with the way out
    with pytest.raises(DFTError, match="already hold LoRA adapters.*load it afresh"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="text-lora"), quality_encoder=None)
    sd = fastfair.load_pipeline("tiny-sd")
    tr = DFTTrainer(sd, [PROMPT], RedClassifier(), small(trainable="soft-tokens"), quality_encoder=None)
    tr.close()
    with pytest.raises(DFTError, match="already has the token"):
        DFTTrainer(sd, [PROMPT], RedClassifier(), small(trainable="soft-tokens"), quality_encoder=None)


@pytest.mark.parametrize("config,steps,match", [
    (dict(invert_sigmas=True), (2, 2), "invert_sigmas"),
    (dict(shift_terminal=0.1), (1, 2), "shift_terminal"),
])
def test_untrainable_schedules_are_refused_up_front(config, steps, match):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = fastfair.load_pipeline("tiny-sd3")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **config)
    with pytest.raises(DFTError, match=match):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="transformer-lora", sampling_steps=steps),
                   quality_encoder=None)


def test_flux_without_guidance_embedding(tmp_path):
    """FLUX.1-schnell has no guidance input: no scale is used or recorded (DFT and generate), whatever is given."""
    from diffusers import FluxTransformer2DModel

    pipe = fastfair.load_pipeline("tiny-flux")
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": False})
    for gs in (0.0, 5.0):   # no guidance input: any value is unused and recorded as none
        tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="transformer-lora", guidance_scale=gs),
                        quality_encoder=None)
        assert tr.cfg.guidance_scale is None
        tr.close()
        pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": False})
    gen = fastfair.generate(pipe, PROMPT, seeds=[0], steps=2, height=64, width=64, guidance_scale=0.0, progress=False)
    assert gen.config["guidance_scale"] is None
    from fastfair.audit import audit

    res = audit("schnell-like", "list:doctor", pipeline=pipe, seeds=1, steps=2, height=64, width=64, classifier=None,
                entanglement="open", out=tmp_path / "audit", n_boot=0, progress=False)
    assert json.loads((res.run_dir / "audit.json").read_text())["settings"]["generation"]["guidance_scale"] is None
    assert "no guidance input" in (res.run_dir / "report.html").read_text()
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="transformer-lora", height=64, width=64),
                    quality_encoder=None)
    assert tr.cfg.guidance_scale is None
    noise = tr.noises(1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = tr.sample(PROMPT, noise, 2, grad=False)
    ref = pipe(PROMPT, latents=_packed(pipe, noise), num_inference_steps=2, height=64, width=64,
               output_type="pt").images.float()
    torch.testing.assert_close(img, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("hw", [0, -16])
def test_sizes_must_be_positive(hw):
    with pytest.raises(DFTError, match="positive number of pixels"):
        small(height=hw)


@needs_peft
def test_half_precision_timesteps_as_the_pipelines(monkeypatch):
    """In bf16 the transformer gets the pipelines' own timesteps: SD3's in float32 (a bf16 cast turned 751.12 into
    752), Flux's in the model's dtype, as diffusers passes them."""
    for name in MODELS:
        pipe = fastfair.load_pipeline(name, dtype="bf16")
        seen = []
        pipe.transformer.register_forward_pre_hook(
            lambda m, a, k: seen.append((k["timestep"].dtype, k["timestep"].float().tolist())), with_kwargs=True)
        tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="transformer-lora", height=64, width=64),
                        quality_encoder=None)
        noise = tr.noises(1, torch.Generator().manual_seed(0))
        with torch.no_grad():
            tr.sample(PROMPT, noise, 3, grad=False, frozen=True)
        ours, seen[:] = list(seen), []
        pipe(PROMPT, latents=_packed(pipe, noise), num_inference_steps=3, height=64, width=64, output_type="latent")
        tr.close()
        assert ours == seen and ours[0][0] == (torch.float32 if name == "tiny-sd3" else torch.bfloat16)


@needs_peft
def test_resume_with_other_sampling_is_refused(tmp_path):
    tr = DFTTrainer(fastfair.load_pipeline("tiny-sd3"), [PROMPT], RedClassifier(),
                    small(trainable="transformer-lora", steps=1, checkpoint_every=1, height=32, width=32),
                    quality_encoder=None, out_dir=tmp_path)
    tr.train(progress=False)
    with pytest.raises(dft.ResumeError, match="sampling"):
        DFTTrainer(fastfair.load_pipeline("tiny-sd3"), [PROMPT], RedClassifier(),
                   small(trainable="transformer-lora", steps=2, height=64, width=64), quality_encoder=None,
                   out_dir=tmp_path, resume="latest")


def test_cli_refuses_by_model_kind_before_loading(tmp_path, capsys, monkeypatch):
    from fastfair import pipelines
    from fastfair.cli import main

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(pipelines, "load_pipeline", no_loading)
    for extra, match in ((["--trainable", "unet-lora"], "transformer-lora"), (["--scheduler", "ddim"], "flow matching"),
                         (["--mixed-precision", "bf16", "--device", "cpu"], "autocast on CUDA")):
        rc = main(["finetune", "dft", "--model", "tiny-sd3", "--prompt", PROMPT, "--attributes", "gender",
                   "--out", str(tmp_path / "run"), "--no-progress", *extra])
        assert rc == 1 and match in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# soft tokens on SD3 / Flux
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_flow_soft_tokens_train_save_and_load(name, tmp_path):
    """k added tokens ("<fastfair_0> ...") in every encoder that reads the prompt (SD3: both CLIPs and T5; Flux: CLIP
    and T5), trained through the prompt's embeddings; fastfair.dft.load_soft_tokens on a fresh pipeline gives the
    trained model's images, and the maps of the prompt's words still read their own tokens."""
    from safetensors import safe_open

    pipe = fastfair.load_pipeline(name)
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="soft-tokens", soft_tokens=2, lr=0.5, steps=2,
                                                           height=64, width=64), quality_encoder=None, out_dir=tmp_path)
    before = tr.soft.detach().clone()
    res = tr.train(progress=False)
    tr.close()
    keys = ["clip_g", "clip_l", "t5"] if name == "tiny-sd3" else ["clip_l", "t5"]
    with safe_open(str(res.soft_tokens), "pt") as f:
        assert sorted(f.keys()) == keys and f.metadata()["fastfair_tokens"] == "<fastfair_0> <fastfair_1>"
    moved = (tr.soft.detach() - before).abs()
    for cols in tr._soft_cols:   # every encoder's embeddings were trained
        assert moved[:, cols].max() > 0
    assert res.token == "<fastfair_0> <fastfair_1>"
    import os
    import stat

    from fastfair._io import _MODE

    assert stat.S_IMODE(os.stat(res.soft_tokens).st_mode) == _MODE

    def images(p, prompt, maps=()):
        gen = fastfair.generate(p, prompt, seeds=[0, 1], steps=3, height=64, width=64, maps=list(maps), progress=False)
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in gen.images]), gen

    # close() wrote the trained rows into the embedding tables and removed the training hooks (save_pretrained
    # keeps them)
    for (enc, ids), cols in zip(tr._soft_tables, tr._soft_cols):
        emb = enc.get_input_embeddings()
        assert not emb._forward_hooks
        torch.testing.assert_close(emb.weight[ids].float(), tr.soft[:, cols].detach().float())
    with pytest.raises(DFTError, match="closed"):
        tr.step()
    trained, _ = images(pipe, f"{res.token} {PROMPT}")
    fresh_pipe = fastfair.load_pipeline(name)
    base, _ = images(fresh_pipe, PROMPT)
    assert dft.load_soft_tokens(fresh_pipe, res.soft_tokens) == res.token
    loaded, gen = images(fresh_pipe, f"{res.token} {PROMPT}", maps=["doctor"])
    assert (loaded - base).abs().mean() > 1.0
    assert (loaded - trained).abs().max() <= 2.0
    # the word's tokens sit two positions on, in CLIP's and T5's sequences (SD3 CLIP: BOS + 2 + 7 -> 10; T5 77 + 9)
    from fastfair import concepts

    pos = concepts.resolve(fresh_pipe, f"{res.token} {PROMPT}", "doctor").positions
    plain = concepts.resolve(fastfair.load_pipeline(name), PROMPT, "doctor").positions
    assert pos == tuple(p + 2 for p in plain) and pos == ((10, 86) if name == "tiny-sd3" else (9,))
    with pytest.raises(DFTError, match="already has the token"):
        dft.load_soft_tokens(fresh_pipe, res.soft_tokens)
    spelled = fastfair.load_pipeline(name)   # the returned prefix is accepted as token= too
    assert dft.load_soft_tokens(spelled, res.soft_tokens, token=res.token) == res.token
    other = "tiny-flux" if name == "tiny-sd3" else "tiny-sd3"
    with pytest.raises(DFTError, match="soft tokens but the pipeline is"):
        dft.load_soft_tokens(fastfair.load_pipeline(other), res.soft_tokens)


def _legacy_eos(pipe):
    """Real SD / SDXL / SD3 / FLUX.1 CLIP configs keep eos_token_id = 2 (pooling at the highest token id)."""
    for name in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, name, None)
        tm = getattr(enc, "text_model", enc)   # transformers 5's CLIPTextModel pools itself
        if enc is not None and hasattr(tm, "eos_token_id"):
            tm.eos_token_id = enc.config.eos_token_id = 2


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-sdxl"])
def test_pooled_embedding_with_soft_tokens_on_legacy_clip_configs(name, tmp_path):
    """With the legacy eos_token_id = 2, CLIP pools at the highest token id: the added soft tokens', before any
    word, so the pooled embedding (SDXL's, SD3's, Flux's only CLIP output) stopped depending on the prompt. Loading
    soft tokens points the encoders at the real EOS: prompts differ again, and a prompt without them pools as
    before."""
    from safetensors.torch import save_file

    pipe = fastfair.load_pipeline(name)
    _legacy_eos(pipe)
    kind = {"tiny-sd3": "sd3", "tiny-flux": "flux", "tiny-sdxl": "sdxl"}[name]
    widths = {key: getattr(pipe, e).get_input_embeddings().weight.shape[1] for e, _, key in dft._soft_encoders(pipe, kind)}
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "soft_tokens.safetensors"
    save_file({k: torch.randn(2, w, generator=g) for k, w in widths.items()}, str(path),
              metadata=None if kind == "sdxl" else {"fastfair_model_kind": kind,
                                                    "fastfair_tokens": "<fastfair_0> <fastfair_1>"})

    def pooled(text):
        with torch.no_grad():
            if kind == "flux":
                return pipe.encode_prompt(prompt=text, prompt_2=None)[1]
            if kind == "sd3":
                return pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)[2]
            return pipe.encode_prompt(prompt=text, do_classifier_free_guidance=False)[2]

    plain = pooled(PROMPT)
    token = dft.load_soft_tokens(pipe, path)
    assert torch.equal(pooled(PROMPT), plain)   # no added token in the prompt: the same pooled position
    a, b = pooled(f"{token} {PROMPT}"), pooled(f"{token} a photo of the face of a nurse")
    assert (a - b).abs().max() > 1e-3
