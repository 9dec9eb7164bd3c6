"""Adjusted DFT (fastfair.dft) on tiny-sd: coefficients, the gradient path, training moves the distribution,
resume, LoRA / soft-token outputs, errors, CLI.

The stand-in attribute classifier is deterministic and differentiable: p(class 0) = sigmoid(a (mean red - b)).
Tests build fresh pipelines (training changes a pipeline in place) at 32x32 or 64x64 with few steps.
"""
import json
import math

import numpy as np
import pytest
import torch

import fastfair
from fastfair import dft
from fastfair.alignment import TargetError
from fastfair.dft import ClassifierMismatch, DFTConfig, DFTTrainer, ResumeError

from dft_helpers import HAVE_PEFT, RedClassifier, distribution_shift, needs_peft, small, tiny_encoder

PROMPT = "a photo of the face of a doctor"


def fresh():
    return fastfair.load_pipeline("tiny-sd")


# --------------------------------------------------------------------------------------------
# adjusted-gradient coefficients
# --------------------------------------------------------------------------------------------

# c_t = sqrt(abar_t) sqrt(1 - abar_t) / (1 - alpha_t) for SD's scaled-linear betas (0.00085 .. 0.012, 1000 steps),
# computed by hand in float64 at the timesteps 5-step DDIM (steps_offset=1) and DPM-Solver++ (linspace) use.
DDIM5 = ([801, 601, 401, 201, 1], [21.4132, 60.9817, 130.941, 210.132, 48.2556],
         [0.304006, 0.865766, 1.85899, 2.98328, 0.685091])
DPM5 = ([999, 799, 599, 400, 200], [5.67547, 21.6695, 61.5345, 131.35, 210.437],
        [0.122998, 0.469617, 1.33357, 2.8466, 4.56055])


def _by_hand(ts):
    b = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    abar = np.cumprod(1 - b)
    return [math.sqrt(abar[t]) * math.sqrt(1 - abar[t]) / b[t] for t in ts]


@pytest.mark.parametrize("kind,expected", [("ddim", DDIM5), ("dpm++", DPM5)])
def test_grad_coefficients_match_hand_computed(kind, expected):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from fastfair.pipelines import SD_SCHEDULER

    base = DDIMScheduler(**SD_SCHEDULER)
    s = base if kind == "ddim" else DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++")
    s.set_timesteps(5)
    ts, raw, norm = expected
    assert s.timesteps.tolist() == ts
    assert _by_hand(ts) == pytest.approx(raw, rel=1e-5)
    assert dft.grad_coefficients(s, normalize=False) == pytest.approx(raw, rel=1e-4)   # float32 schedule
    c = dft.grad_coefficients(s)
    assert c == pytest.approx(norm, rel=1e-4)
    assert math.prod(c) == pytest.approx(1.0, rel=1e-9)                               # geometric mean 1


def test_scale_grad_is_identity_forward_scaled_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = dft.scale_grad(x, 2.5)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    assert torch.allclose(x.grad, 2.5 * torch.arange(4.0).expand(3, 4))


# --------------------------------------------------------------------------------------------
# the gradient path of the sampler
# --------------------------------------------------------------------------------------------

@needs_peft
def test_sampler_gradient_path(monkeypatch):
    """UNet inputs are detached; each step's eps gradient is scaled by its own coefficient (linearity);
    every step's eps reaches the image through the solver; fastfair's attention backward equals diffusers'."""
    pipe = fresh()
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="text+unet-lora", scheduler="ddim"),
                    quality_encoder=None)
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(a[0].requires_grad))
    noise = tr.noises(2, torch.Generator().manual_seed(0))

    def grads(coefs=None):
        if coefs is not None:
            monkeypatch.setattr(dft, "grad_coefficients", lambda s, *a, **k: np.asarray(coefs, dtype=float))
        with tr._attention():
            img = tr.sample(PROMPT, noise, 2, grad=True)
            g = torch.autograd.grad((img[:, 0] * torch.linspace(0, 1, 32)).sum(), tr.params)
        monkeypatch.undo()
        return torch.cat([x.flatten() for x in g])

    calls = []
    orig = fastfair.ops.cross_attention
    monkeypatch.setattr(fastfair.ops, "cross_attention", lambda *a, **k: calls.append(1) or orig(*a, **k))
    g = grads()
    h.remove()
    assert seen and not any(seen)                       # the UNet never sees a latent that carries gradient
    n_xattn = len(fastfair.processors.cross_attention_modules(pipe.unet))
    assert len(calls) == 2 * n_xattn                    # every cross-attention of both steps went through fastfair.ops
    tr._sched.set_timesteps(2)
    c = dft.grad_coefficients(tr._sched)
    g1, g2 = grads([1.0, 0.0]), grads([0.0, 1.0])
    assert g1.abs().max() > 0 and g2.abs().max() > 0    # both steps' eps reach the image
    err = float((g - (c[0] * g1 + c[1] * g2)).abs().max()) / float(g.abs().max())
    assert err < 1e-4, err                              # float32 round-off only
    tr.cfg.attention = "diffusers"                      # the same gradients through diffusers' attention
    g_ref = grads()
    tr.cfg.attention = "fastfair"
    err = float((g - g_ref).abs().max()) / float(g.abs().max())
    assert err < 1e-3, err
    tr.close()
    assert not fastfair.processors.is_patched(pipe)


# --------------------------------------------------------------------------------------------
# training moves the distribution
# --------------------------------------------------------------------------------------------

@needs_peft
@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_v_prediction_model_equals_its_epsilon_twin(scheduler):
    """A v-prediction model (SD 2.x 768-v) samples and trains as its epsilon twin: the sampler converts
    v to eps = sqrt(abar) v + sqrt(1 - abar) x_t before the adjusted gradient scaling and the solver."""
    import diffusers

    from tiny_models import PredictV

    out = []
    for pred in ("epsilon", "v_prediction"):
        pipe = fresh()
        if pred == "v_prediction":
            pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=pred)
            pipe.unet = PredictV(pipe.unet, pipe.scheduler.alphas_cumprod)
        torch.manual_seed(0)  # the same LoRA initialisation
        tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(scheduler=scheduler), quality_encoder=None)
        assert tr._v_pred == (pred == "v_prediction")
        noise = tr.noises(2, torch.Generator().manual_seed(0))
        with tr._attention():
            img = tr.sample(PROMPT, noise, 2, grad=True)
            g = torch.autograd.grad((img[:, 0] * torch.linspace(0, 1, 32)).sum(), tr.params)
        out.append((img.detach(), torch.cat([x.flatten() for x in g])))
        tr.close()
    (img_e, g_e), (img_v, g_v) = out
    assert g_e.abs().max() > 0
    torch.testing.assert_close(img_v, img_e, rtol=1e-4, atol=1e-5)
    assert float((g_v - g_e).abs().max() / g_e.abs().max()) < 1e-3


def test_sample_prediction_refused():
    import diffusers

    pipe = fresh()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    with pytest.raises(dft.DFTError, match="epsilon and v-prediction"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(scheduler="ddim"), quality_encoder=None)


def test_text_lora_steps_move_distribution_to_target():
    """From ~90/10 to within 15 points of 50/50 in a few LoRA (text encoder) steps.

    The stand-in classifier's threshold b is the 10% quantile of the mean red of the frozen model's images for 32
    evaluation seeds, and a = 1 / their std, so the frozen model is 87.5/12.5 there. AdamW without momentum
    (beta1 = 0) keeps the few large steps from overshooting.
    """
    cfg = DFTConfig(images_per_prompt=8, sampling_steps=(2, 2), steps=5, quality_weight=0.0, ema_decay=None, lr=3e-3,
                    adam_betas=(0.0, 0.999), rank=4, checkpoint_every=0, height=64, width=64,
                    gradient_checkpointing=False, target={"gender": [0.5, 0.5]})
    before, after, history = distribution_shift(fresh(), PROMPT, cfg)
    assert before >= 0.85
    assert abs(after[0] - 0.5) <= 0.15, (before, after, [r["distribution"] for r in history])
    assert before - after[0] >= 0.25


# --------------------------------------------------------------------------------------------
# checkpoints and resume
# --------------------------------------------------------------------------------------------

@needs_peft
def test_resume_reproduces_next_step_loss(tmp_path):
    cfg = small(checkpoint_every=1, sampling_steps=(1, 3), ot_samples=50, quality_weight=2.0, ema_decay=0.9,
                gradient_checkpointing=True, keep_checkpoints=5)
    a = DFTTrainer(fresh(), [PROMPT, "a photo of a nurse"], RedClassifier(), cfg, quality_encoder=tiny_encoder(),
                   out_dir=tmp_path / "a")
    r1, r2 = a.step(), a.step()
    a.close()
    # the first step starts at the frozen model (LoRA B = 0): no quality penalty yet
    assert r1["loss_quality"] == pytest.approx(0.0, abs=1e-6) and r2["loss_quality"] > 0
    ck = tmp_path / "a" / "checkpoints" / "checkpoint-000001"
    assert (ck / "state.pt").exists() and (tmp_path / "a" / "checkpoints" / "checkpoint-000002").exists()
    b = DFTTrainer(fresh(), [PROMPT, "a photo of a nurse"], RedClassifier(), cfg, quality_encoder=tiny_encoder(),
                   out_dir=tmp_path / "b", resume=ck)
    assert b.step_idx == 1 and len(b.history) == 1
    r2b = b.step()
    b.close()
    assert (r2b["prompt"], r2b["sampling_steps"]) == (r2["prompt"], r2["sampling_steps"])
    assert r2b["loss"] == pytest.approx(r2["loss"], rel=1e-5, abs=1e-7)
    for x, y in zip(a.params, b.params):
        assert torch.allclose(x, y, atol=1e-6)

    with pytest.raises(ResumeError, match="rank") as err:
        DFTTrainer(fresh(), [PROMPT], RedClassifier(), small(rank=8), quality_encoder=None, resume=ck)
    assert "trainable tensors in the checkpoint" in str(err.value) and len(str(err.value)) < 1500  # summarised
    with pytest.raises(ResumeError, match="not a DFT checkpoint"):
        DFTTrainer(fresh(), [PROMPT], RedClassifier(), small(), quality_encoder=None, resume=tmp_path / "nothing")
    # training settings: another learning rate, gradient clipping, prompt list or classifier would mix two trainings
    # in one run (they were accepted, and dft.json then recorded values the first steps never used)
    for prompts, kw, clf, what in (([PROMPT, "a photo of a nurse"], dict(lr=0.1), RedClassifier(), "training.lr"),
                                   ([PROMPT, "a photo of a nurse"], dict(max_grad_norm=1e-3), RedClassifier(),
                                    "training.max_grad_norm"),
                                   ([PROMPT], {}, RedClassifier(), "training.prompts")):
        with pytest.raises(ResumeError, match=what.replace(".", r"\.")) as err:
            DFTTrainer(fresh(), prompts, clf, cfg.__class__(**{**cfg.__dict__, **kw}), quality_encoder=tiny_encoder(),
                       resume=ck)
        assert "steps" not in str(err.value)
    longer = DFTTrainer(fresh(), [PROMPT, "a photo of a nurse"], RedClassifier(), cfg.__class__(**{**cfg.__dict__,
                        "steps": cfg.steps + 5}), quality_encoder=tiny_encoder(), resume=ck)  # more steps: a resume
    assert longer.step_idx == 1
    longer.close()
    # the frozen models' weights (a review: a same-shaped other base model, or another quality encoder, resumed and
    # continued one training on another model): refused, naming what differs
    other = fresh()
    with torch.no_grad():
        next(other.unet.parameters()).add_(0.05)
    with pytest.raises(ResumeError, match=r"identity\.base"):
        DFTTrainer(other, [PROMPT, "a photo of a nurse"], RedClassifier(), cfg, quality_encoder=tiny_encoder(),
                   resume=ck)
    enc = tiny_encoder()
    with torch.no_grad():
        next(enc.parameters()).mul_(2.0)
    with pytest.raises(ResumeError, match=r"identity\.quality"):
        DFTTrainer(fresh(), [PROMPT, "a photo of a nurse"], RedClassifier(), cfg, quality_encoder=enc, resume=ck)
    # a checkpoint written before the identity was recorded resumes as before
    sd = torch.load(ck / "state.pt", weights_only=True)
    del sd["fingerprint"]["identity"]
    torch.save(sd, ck / "state.pt")
    other = fresh()
    with torch.no_grad():
        next(other.unet.parameters()).add_(0.05)
    old = DFTTrainer(other, [PROMPT, "a photo of a nurse"], RedClassifier(), cfg, quality_encoder=enc, resume=ck)
    assert old.step_idx == 1
    old.close()


# --------------------------------------------------------------------------------------------
# outputs load into plain diffusers
# --------------------------------------------------------------------------------------------

def _images(pipe, prompt, seeds=(0, 1)):
    gen = fastfair.generate(pipe, prompt, seeds=list(seeds), steps=3, height=64, width=64, progress=False)
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in gen.images])


@needs_peft
def test_saved_lora_loads_with_load_lora_weights(tmp_path):
    pipe = fresh()
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="text+unet-lora", steps=1, lr=5e-2, ema_decay=0.5),
                    quality_encoder=None, out_dir=tmp_path)
    res = tr.train(progress=False)
    tr.close()
    assert (res.lora_dir / "pytorch_lora_weights.safetensors").exists() and res.lora_ema_dir.exists()
    trained = _images(pipe, PROMPT)
    base = _images(fresh(), PROMPT)
    loaded_pipe = fresh()
    loaded_pipe.load_lora_weights(str(res.lora_dir))
    loaded = _images(loaded_pipe, PROMPT)
    assert (loaded - base).abs().mean() > 1.0            # the LoRA changes the images (0..255 scale)
    assert (loaded - trained).abs().max() <= 2.0         # and gives the trained model's images
    meta = json.loads((tmp_path / "dft.json").read_text())
    assert meta["steps"] == 1 and meta["attributes"] == {"gender": ["male", "female"]}
    # evaluation through the audit: fastfair audit --lora
    from fastfair.cli import main

    rc = main(["audit", "--model", "tiny-sd", "--prompts", "list:doctor", "--seeds", "1", "--steps", "2",
               "--classifier", "none", "--entanglement", "none", "--no-report", "--no-progress",
               "--lora", str(res.lora_dir), "--out", str(tmp_path / "run")])
    assert rc == 0 and "tiny-sd+lora:" in (tmp_path / "run" / "audit.json").read_text()
    # and fastfair generate --lora
    from PIL import Image

    assert main(["generate", "--model", "tiny-sd", "--lora", str(res.lora_dir), "--prompt", PROMPT, "--seeds", "0-1",
                 "--steps", "3", "--height", "64", "--width", "64", "--out", str(tmp_path / "gen"),
                 "--no-progress"]) == 0
    pngs = sorted((tmp_path / "gen" / "images").glob("*.png"))
    assert torch.equal(torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32)) for f in pngs]),
                       loaded)
    assert "tiny-sd+lora:" in json.loads((tmp_path / "gen" / "generation.json").read_text())["model"]


def test_soft_tokens_through_cli(tmp_path, capsys):
    clf_file = tmp_path / "clf.py"
    clf_file.write_text(
        "import torch\n"
        "class Red(torch.nn.Module):\n"
        "    labels = {'gender': ('male', 'female')}\n"
        "    def forward(self, x):\n"
        "        p0 = torch.sigmoid(300 * (x[:, 0].mean((1, 2)) - 0.43))\n"
        "        return {'gender': torch.stack([p0, 1 - p0], 1)}\n"
        "def make(attribute_sets=(), device=None):\n"
        "    return Red()\n")
    from fastfair.cli import main

    out = tmp_path / "run"
    rc = main(["finetune", "dft", "--model", "tiny-sd", "--prompt", PROMPT, "--attributes", "gender",
               "--target", "gender=0.75,0.25", "--classifier", f"python:{clf_file}:make", "--trainable", "soft-tokens",
               "--soft-tokens", "2", "--steps", "2", "--images-per-prompt", "2", "--sampling-steps", "1-2",
               "--height", "32", "--width", "32", "--lr", "0.5", "--quality-encoder", "none", "--no-checkpointing",
               "--uncertainty-threshold", "1",
               "--checkpoint-every", "1", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "soft_tokens.safetensors" in printed
    assert (out / "soft_tokens.safetensors").exists() and (out / "checkpoints").is_dir()
    pipe = fresh()
    base = _images(pipe, PROMPT)
    pipe.load_textual_inversion(str(out / "soft_tokens.safetensors"), token="<fastfair>")
    tuned = _images(pipe, "<fastfair> " + PROMPT)
    assert (tuned - base).abs().mean() > 1.0
    # fastfair generate / audit --soft-tokens: loaded as textual inversion, every prompt starts with the token
    rc = main(["generate", "--model", "tiny-sd", "--soft-tokens", str(out / "soft_tokens.safetensors"), "--prompt",
               PROMPT, "--maps", "doctor", "--seeds", "0-1", "--steps", "3", "--height", "64", "--width", "64",
               "--out", str(tmp_path / "gen"), "--no-progress"])
    assert rc == 0 and "prompts start with <fastfair>" in capsys.readouterr().out
    meta = json.loads((tmp_path / "gen" / "generation.json").read_text())
    assert meta["prompts"][0] == "<fastfair> " + PROMPT and "+soft:" in meta["model"]
    from PIL import Image

    pngs = sorted((tmp_path / "gen" / "images").glob("*.png"))
    got = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32)) for f in pngs])
    assert (got - tuned).abs().max() <= 2.0   # maps run the attention through fastfair.ops: rounding only
    rc = main(["audit", "--model", "tiny-sd", "--soft-tokens", str(out / "soft_tokens.safetensors"), "--prompts",
               "list:doctor", "--seeds", "1", "--steps", "2", "--classifier", "none", "--entanglement", "open,inprompt",
               "--no-report", "--no-progress", "--out", str(tmp_path / "audit")])
    assert rc == 0
    st = json.loads((tmp_path / "audit" / "audit.json").read_text())["settings"]
    assert st["model"].startswith("tiny-sd+soft:") and st["prompt_prefix"] == "<fastfair>"
    assert st["template"] == "a photo of the face of a {}"   # the measurement's; the prefix is the model's
    import pandas as pd

    rows = pd.read_parquet(tmp_path / "audit" / "results.parquet")
    assert len(rows) == 3 and all(p.startswith("<fastfair> a photo of the face of a") for p in rows["prompt"])
    # a baseline audit of the plain model compares with it (pairs by profession and seed)
    assert main(["audit", "--model", "tiny-sd", "--prompts", "list:doctor", "--seeds", "1", "--steps", "2",
                 "--classifier", "none", "--entanglement", "open,inprompt", "--no-report", "--no-progress",
                 "--out", str(tmp_path / "base")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "audit")]) == 0
    assert "prompt_prefix" in capsys.readouterr().out   # listed among the settings that differ
    assert main(["generate", "--model", "tiny-sdxl", "--soft-tokens", str(out / "soft_tokens.safetensors"),
                 "--prompt", PROMPT, "--out", str(tmp_path / "x"), "--no-progress"]) == 1
    assert "SD 1.x/2.x soft tokens" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-sd", "--token", "<x>", "--prompt", PROMPT, "--out",
                 str(tmp_path / "y"), "--no-progress"]) == 1
    assert "--token names the placeholder of --soft-tokens" in capsys.readouterr().err
    # resuming a finished run from its latest checkpoint with more steps continues it
    rc = main(["finetune", "dft", "--model", "tiny-sd", "--prompt", PROMPT, "--attributes", "gender",
               "--target", "gender=0.75,0.25", "--classifier", f"python:{clf_file}:make", "--trainable", "soft-tokens",
               "--soft-tokens", "3", "--steps", "3", "--images-per-prompt", "2", "--sampling-steps", "1-2",
               "--height", "32", "--width", "32", "--quality-encoder", "none", "--out", str(out), "--resume", "latest",
               "--no-progress"])
    assert rc == 1 and "does not match" in capsys.readouterr().err   # k changed: incompatible


# --------------------------------------------------------------------------------------------
# SDXL
# --------------------------------------------------------------------------------------------

def test_sdxl_sampler_equals_the_diffusers_pipeline():
    """DFT's own sampler on SDXL (pooled embeddings, size / crop time ids, CFG) gives diffusers' images."""
    import diffusers

    pipe = fastfair.load_pipeline("tiny-sdxl")
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(scheduler="ddim", trainable="unet-lora", height=64,
                                                           width=64), quality_encoder=None)
    noise = tr.noises(2, torch.Generator().manual_seed(0))
    with tr._attention():
        img = tr.sample(PROMPT, noise, 3, grad=False, frozen=True)
    tr.close()
    ref_pipe = fastfair.load_pipeline("tiny-sdxl")
    ref_pipe.scheduler = diffusers.DDIMScheduler.from_config(ref_pipe.scheduler.config)
    ref = ref_pipe([PROMPT] * 2, latents=noise, num_inference_steps=3, guidance_scale=tr.cfg.guidance_scale,
                   height=64, width=64, output_type="pt").images
    torch.testing.assert_close(img, ref.float(), rtol=1e-4, atol=2e-5)


@needs_peft
def test_sdxl_lora_of_both_text_encoders_loads_with_load_lora_weights(tmp_path):
    pipe = fastfair.load_pipeline("tiny-sdxl")
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="text+unet-lora", steps=1, lr=5e-2),
                    quality_encoder=None, out_dir=tmp_path)
    assert {n.split(".")[0] for n, _ in tr.named_params} == {"text_encoder", "text_encoder_2", "unet"}
    r = tr.step()
    assert math.isfinite(r["loss"])
    res = tr.save_outputs()
    tr.close()

    def images(p):
        gen = fastfair.generate(p, PROMPT, seeds=[0, 1], steps=3, height=64, width=64, progress=False)
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in gen.images])

    trained, base = images(pipe), images(fastfair.load_pipeline("tiny-sdxl"))
    loaded_pipe = fastfair.load_pipeline("tiny-sdxl")
    loaded_pipe.load_lora_weights(str(res.lora_dir))
    loaded = images(loaded_pipe)
    assert (loaded - base).abs().mean() > 1.0
    assert (loaded - trained).abs().max() <= 2.0


def test_sdxl_soft_tokens_train_and_load_as_textual_inversion(tmp_path):
    """SDXL soft tokens: one embedding per text encoder, saved as clip_l / clip_g that diffusers'
    load_textual_inversion takes (once per encoder) and that reproduce the trained images."""
    from safetensors.torch import load_file

    pipe = fastfair.load_pipeline("tiny-sdxl")
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(trainable="soft-tokens", soft_tokens=2, lr=0.5, steps=2),
                    quality_encoder=None, out_dir=tmp_path)
    assert tr.soft.shape == (2, 64)  # 32 + 32 wide encoders
    before = tr.soft.detach().clone()
    res = tr.train(progress=False)
    tr.close()
    assert (tr.soft.detach() - before)[:, :32].abs().max() > 0 and (tr.soft.detach() - before)[:, 32:].abs().max() > 0
    sd = load_file(str(res.soft_tokens))
    assert set(sd) == {"clip_l", "clip_g"} and sd["clip_l"].shape == sd["clip_g"].shape == (2, 32)

    def images(p, prompt):
        gen = fastfair.generate(p, prompt, seeds=[0, 1], steps=3, height=64, width=64, progress=False)
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in gen.images])

    tok = tr.cfg.token
    trained = images(pipe, f"{tok} {PROMPT}")
    fresh_xl = fastfair.load_pipeline("tiny-sdxl")
    base = images(fresh_xl, PROMPT)
    fresh_xl.load_textual_inversion(sd["clip_l"], token=tok, text_encoder=fresh_xl.text_encoder,
                                    tokenizer=fresh_xl.tokenizer)
    fresh_xl.load_textual_inversion(sd["clip_g"], token=tok, text_encoder=fresh_xl.text_encoder_2,
                                    tokenizer=fresh_xl.tokenizer_2)
    loaded = images(fresh_xl, f"{tok} {PROMPT}")
    assert (loaded - base).abs().mean() > 1.0
    assert (loaded - trained).abs().max() <= 2.0
    # fastfair.dft.load_soft_tokens: both encoders, the token from the run's dft.json
    other = fastfair.load_pipeline("tiny-sdxl")
    assert dft.load_soft_tokens(other, res.soft_tokens) == tok
    assert torch.equal(images(other, f"{tok} {PROMPT}"), loaded)
    with pytest.raises(dft.DFTError, match="already has the token"):
        dft.load_soft_tokens(other, res.soft_tokens)
    with pytest.raises(dft.DFTError, match="SDXL soft tokens"):
        dft.load_soft_tokens(fresh(), res.soft_tokens)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

def test_relax_factors_follow_the_papers_intersectional_rule():
    """The reference's gender x race weights (exp-3's gen_dynamic_weights, written out as its if / elif chain):
    1 when neither target changes the frozen class, the changed attribute's factor when one does, the smaller one
    when both do; a dropped target counts as changed. One number: that number wherever anything changes."""
    fg, fr = 0.2, 0.6
    rng = np.random.default_rng(0)
    g, r = rng.random(64) < 0.5, rng.random(64) < 0.5

    def reference(cg, cr):
        if not cg and not cr:
            return 1.0
        if not cg and cr:
            return fr
        if cg and not cr:
            return fg
        return min(fg, fr)

    got = dft.relax_factors({"gender": torch.tensor(g), "race": torch.tensor(r)}, {"gender": fg, "race": fr})
    np.testing.assert_allclose(got.numpy(), [reference(a, b) for a, b in zip(g, r)], rtol=1e-7)
    one = dft.relax_factors({"gender": torch.tensor(g), "race": torch.tensor(r)}, 0.2)
    np.testing.assert_allclose(one.numpy(), np.where(g | r, 0.2, 1.0), rtol=1e-7)


def test_relax_options_parse_and_check():
    assert dft.parse_relax("0.3") == 0.3 and dft.parse_relax(0.3) == 0.3
    assert dft.parse_relax("gender=0.2, race=0.6") == {"gender": 0.2, "race": 0.6}
    assert small(quality_relax="gender=0.2,race=0.6").quality_relax == {"gender": 0.2, "race": 0.6}
    for bad in ("x", "gender=a", "gender=-1", -0.5, float("nan"), {}):
        with pytest.raises(dft.DFTError, match="relax"):
            small(quality_relax=bad)
    with pytest.raises(dft.DFTError, match=r"face_relax gives factors for \['race'\] but the aligned attributes are"):
        DFTTrainer(fresh(), [PROMPT], RedClassifier(), small(face_relax={"race": 0.3}), quality_encoder=None)


@needs_peft
def test_per_attribute_relax_with_equal_factors_is_the_single_number():
    """{"gender": 0.5} for the one aligned attribute is exactly quality_relax=0.5 (loss and update)."""
    out = []
    for relax in (0.5, {"gender": 0.5}):
        tr = DFTTrainer(fresh(), [PROMPT], RedClassifier(), small(quality_weight=1.0, quality_relax=relax,
                                                                  images_per_prompt=4),
                        quality_encoder=tiny_encoder())
        tr.step()
        rec = tr.step()  # the first step's images are the frozen model's (LoRA starts at zero): no quality loss
        tr.close()
        out.append((rec, [p.detach().clone() for p in tr.params]))
    (r1, p1), (r2, p2) = out
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5) and r1["loss_quality"] > 0
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _TwoHeads(torch.nn.Module):
    labels = {"gender": ("male", "female"), "race": ("a", "b", "c")}

    def forward(self, x):
        g = RedClassifier()(x)["gender"]
        return {"gender": g, "race": torch.cat([g, torch.zeros_like(g[:, :1])], 1) * 0.9 + 0.1 / 3}


@needs_peft
def test_fewer_images_than_joint_classes_warn(tiny_sd):
    """As the paper's code, N < K aligns (each step's targets fill at most N classes): a warning, not a refusal."""
    with pytest.warns(UserWarning, match="images_per_prompt=4 is smaller than the 6 joint classes of gender x race"):
        tr = DFTTrainer(fresh(), [PROMPT], _TwoHeads(), small(images_per_prompt=4), quality_encoder=None)
    rec = tr.step()
    tr.close()
    assert rec["kept"]["gender"] > 0


def test_clear_errors(tiny_sd):
    pipe = tiny_sd  # every error below is raised before the pipeline is touched
    clf = RedClassifier()
    with pytest.raises(TargetError, match="sums to 0.9"):
        DFTTrainer(pipe, [PROMPT], clf, small(target={"gender": [0.6, 0.3]}), quality_encoder=None)
    with pytest.raises(TargetError, match="3 entries"):
        DFTTrainer(pipe, [PROMPT], clf, small(target="gender=0.5,0.25,0.25"), quality_encoder=None)
    with pytest.raises(ClassifierMismatch, match=r"\['race'\] are not heads of the classifier"):
        DFTTrainer(pipe, [PROMPT], clf, small(attributes=["gender", "race"]), quality_encoder=None)
    with pytest.raises(ClassifierMismatch, match="target is given for \\['age'\\]"):
        DFTTrainer(pipe, [PROMPT], clf, small(target={"age": [0.75, 0.25]}), quality_encoder=None)
    with pytest.raises(TargetError, match="images_per_prompt=1: .* use images_per_prompt >= 2"):
        DFTTrainer(pipe, [PROMPT], clf, small(images_per_prompt=1), quality_encoder=None)
    with pytest.raises(ClassifierMismatch, match="no labels"):
        DFTTrainer(pipe, [PROMPT], lambda x: x, small(), quality_encoder=None)
    with pytest.raises(dft.DFTError, match="trainable must be one of"):
        small(trainable="everything")
    assert not fastfair.processors.is_patched(pipe)


# --------------------------------------------------------------------------------------------
# the classifier protocol
# --------------------------------------------------------------------------------------------

def test_classifier_protocol_and_fastfair_classify():
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel

    from fastfair import classify
    from fastfair.pipelines import clip_tokenizer

    imgs = torch.rand(3, 3, 32, 32)
    # a callable returning one (N, K) tensor, with labels given
    c = dft.as_differentiable(lambda x: torch.softmax(x.mean((2, 3)), -1), labels=["r", "g", "b"])
    assert list(c.labels.values()) == [("r", "g", "b")] and c(imgs)[next(iter(c.labels))].shape == (3, 3)
    # fastfair.classify.ModuleClassifier: its module, labels and image size
    mc = classify.ModuleClassifier(RedClassifier(), image_size=16)
    d = dft.as_differentiable(mc)
    assert d.labels == {"gender": ("male", "female")} and d.image_size == 16
    # fastfair.classify.ClipZeroShot: differentiable, and the same probabilities as its own predict()
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    zs = classify.ClipZeroShot(CLIPModel(cfg), clip_tokenizer(), {"gender": {"male": ["a man"], "female": ["a woman"]}})
    z = dft.as_differentiable(zs)
    x = (torch.rand(2, 3, 32, 32) * 255).round() / 255
    x.requires_grad_(True)
    p = z(x)["gender"]
    ref = zs.predict([Image.fromarray((xi.detach().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                      for xi in x])["gender"]
    assert p.detach().double().numpy() == pytest.approx(ref, abs=1e-4)
    p[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ClassifierMismatch, match="expected \\(3, 2\\)"):
        dft.DifferentiableClassifier(lambda x: {"gender": torch.ones(3, 3) / 3}, {"gender": ["a", "b"]})(imgs)


@needs_peft
def test_micro_batches_give_the_same_step():
    """batch_size < N: targets from a no-grad pass over all N images, then gradient passes per micro-batch --
    the same loss and the same update as one pass over the N images."""
    out = []
    for bs in (None, 2):
        cfg = small(images_per_prompt=4, batch_size=bs, quality_weight=1.0)
        tr = DFTTrainer(fresh(), [PROMPT], RedClassifier(), cfg, quality_encoder=tiny_encoder())
        rec = tr.step()
        tr.close()
        out.append((rec, [p.detach().clone() for p in tr.params]))
    (r1, p1), (r2, p2) = out
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5) and r1["distribution"] == r2["distribution"]
    for a, b in zip(p1, p2):
        assert torch.allclose(a, b, atol=1e-6)


def test_ema_follows_diffusers_ema_model():
    """The EMA of the LoRA / soft tokens: diffusers' EMAModel (what the reference training script uses), decay
    min(0.996, (1 + j) / (10 + j)) from update j = k - 1, against EMAModel itself."""
    from diffusers.training_utils import EMAModel

    from fastfair.dft import _EMA

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g))
    ours = _EMA([p], 0.996)
    ref = EMAModel([p], decay=0.996)
    for _ in range(30):
        with torch.no_grad():
            p.add_(torch.randn(5, 3, generator=g))
        ours.update([p])
        ref.step([p])
        torch.testing.assert_close(ours.shadow[0], ref.shadow_params[0], rtol=1e-6, atol=1e-6)
    assert ours.decay_at(1) == 0.0 and ours.decay_at(2) == pytest.approx(2 / 11) and ours.decay_at(10 ** 6) == 0.996


def test_unpadded_prompts_as_the_papers_code():
    """prompt_padding="longest": the prompt's own tokens (BOS..EOS) and the empty prompt padded to that length with
    an attention mask. The CLIP text encoder is causal, so the unpadded rows equal the first rows of the padded
    encoding; the sampler's images equal diffusers' pipeline given those embeddings."""
    import diffusers

    pipe = fastfair.load_pipeline("tiny-sd")
    tr = DFTTrainer(pipe, [PROMPT], RedClassifier(), small(scheduler="ddim", prompt_padding="longest"),
                    quality_encoder=None)
    tok, enc = pipe.tokenizer, pipe.text_encoder
    n = len(tok(PROMPT).input_ids)
    with torch.no_grad():
        cond, uncond = tr._encode_unpadded(PROMPT, True)
        padded, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
        e = tok("", padding="max_length", max_length=n, return_tensors="pt")
        ref_uncond = enc(e.input_ids, attention_mask=e.attention_mask)[0]
    assert cond.shape == (1, n, enc.config.hidden_size) and n < 77
    torch.testing.assert_close(cond, padded[:, :n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uncond, ref_uncond)
    assert e.input_ids[0].tolist()[:2] == [tok.bos_token_id, tok.eos_token_id] and e.attention_mask[0].sum() == 2
    keys = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, k: keys.append(k["encoder_hidden_states"].shape[1]),
                                               with_kwargs=True)
    noise = tr.noises(2, torch.Generator().manual_seed(0))
    with tr._attention():
        img = tr.sample(PROMPT, noise, 3, grad=False, frozen=True)
    hook.remove()
    tr.close()
    assert set(keys) == {n}
    ref_pipe = fastfair.load_pipeline("tiny-sd")
    ref_pipe.scheduler = diffusers.DDIMScheduler.from_config(ref_pipe.scheduler.config)
    ref = ref_pipe(prompt_embeds=cond.expand(2, -1, -1), negative_prompt_embeds=uncond.expand(2, -1, -1),
                   latents=noise, num_inference_steps=3, guidance_scale=tr.cfg.guidance_scale, height=32, width=32,
                   output_type="pt").images
    torch.testing.assert_close(img, ref.float(), rtol=1e-4, atol=2e-5)
    with pytest.raises(dft.DFTError, match="SDXL"):
        DFTTrainer(fastfair.load_pipeline("tiny-sdxl"), [PROMPT], RedClassifier(), small(prompt_padding="longest"),
                   quality_encoder=None)


@needs_peft
def test_evaluation_during_training(tmp_path):
    """eval_every: before the first step and every k steps, class frequencies on the evaluation prompts at fixed
    seeds -- at step 0 those of diffusers' pipeline images (LoRA B = 0) classified independently; EMA weights
    evaluated once the EMA has moved; evaluations survive a resume and land in dft.json."""
    import diffusers

    cfg = small(scheduler="ddim", eval_every=1, eval_seeds=3, eval_steps=2, ema_decay=0.9, checkpoint_every=1,
                eval_prompts=["a photo of the face of a nurse"], steps=2)
    tr = DFTTrainer(fresh(), [PROMPT], RedClassifier(), cfg, quality_encoder=None, out_dir=tmp_path / "a")
    res = tr.train(progress=False)
    tr.close()
    ev = res.evaluations
    assert [e["step"] for e in ev] == [0, 1, 2] and "ema" not in ev[0] and "ema" in ev[2]
    ref_pipe = fresh()
    ref_pipe.scheduler = diffusers.DDIMScheduler.from_config(ref_pipe.scheduler.config)
    noise = torch.cat([tr.noises(1, torch.Generator().manual_seed(s)) for s in range(3)])
    imgs = ref_pipe(["a photo of the face of a nurse"] * 3, latents=noise, num_inference_steps=2, guidance_scale=7.5,
                    height=32, width=32, output_type="pt").images
    f = np.bincount(RedClassifier()(imgs.float())["gender"].argmax(1).numpy(), minlength=2) / 3
    got = ev[0]["model"]["per_prompt"]["a photo of the face of a nurse"]["gender"]
    np.testing.assert_allclose(got, f)
    s0 = ev[0]["model"]["summary"]["gender"]
    assert s0["target_gap"] == pytest.approx(abs(f[0] - 0.5)) and s0["max_share"] == pytest.approx(f.max())
    assert s0["bias"] == pytest.approx(abs(f[0] - f[1]))  # the paper's gender bias |f_male - f_female|
    assert ev[0]["model"]["counted"] == ev[0]["model"]["images"] == 3
    meta = json.loads((tmp_path / "a" / "dft.json").read_text())
    assert meta["evaluations"] == json.loads(json.dumps(ev))
    # resumed from step 1: the same evaluations as the uninterrupted run
    b = DFTTrainer(fresh(), [PROMPT], RedClassifier(), cfg, quality_encoder=None, out_dir=tmp_path / "b",
                   resume=tmp_path / "a" / "checkpoints" / "checkpoint-000001")
    assert [e["step"] for e in b.evaluations] == [0, 1]
    res_b = b.train(progress=False)
    b.close()
    assert [e["step"] for e in res_b.evaluations] == [0, 1, 2]
    assert res_b.evaluations[2]["model"]["per_prompt"] == ev[2]["model"]["per_prompt"]
    with pytest.raises(dft.DFTError, match="eval_every"):
        small(eval_every=-1)


def test_report_of_a_training_run(tmp_path, capsys):
    """The training report: written at the end of a run and by fastfair report; its target marginals are the
    trainer's (row-major joint classes), its plots carry every step."""
    from fastfair.cli import main
    from fastfair.dft_report import _marginals

    labels = {"gender": ["male", "female"], "race": ["a", "b", "c"]}
    joint = [0.1, 0.2, 0.05, 0.3, 0.15, 0.2]
    m = _marginals(labels, joint)
    cls = np.array([[g, r] for g in range(2) for r in range(3)])      # row-major: the last attribute fastest
    np.testing.assert_allclose(m["gender"], [sum(t for t, c in zip(joint, cls) if c[0] == g) for g in range(2)])
    np.testing.assert_allclose(m["race"], [sum(t for t, c in zip(joint, cls) if c[1] == r) for r in range(3)])
    if not HAVE_PEFT:
        return
    cfg = small(steps=3, eval_every=2, eval_seeds=2, eval_steps=1, ema_decay=0.9)
    tr = DFTTrainer(fresh(), [PROMPT], RedClassifier(), cfg, quality_encoder=None, out_dir=tmp_path / "run")
    res = tr.train(progress=False)
    tr.close()
    page = res.report.read_text()
    assert res.report == tmp_path / "run" / "report.html"
    assert page.count("<polyline") >= 3 + 3 and "gender: batch class frequencies" in page
    assert "per prompt (EMA weights)" in page and PROMPT in page and "target gap" in page
    assert "gender bias (model, step 3)" in page  # the paper's metric for a uniform target
    (tmp_path / "run" / "report.html").unlink()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report.html").read_text() == page
    assert "wrote" in capsys.readouterr().out


@needs_peft
def test_evaluations_at_multiples_and_the_end_also_when_resumed(tmp_path):
    cfg = small(eval_every=2, eval_seeds=1, eval_steps=1, checkpoint_every=1, keep_checkpoints=5, steps=3)
    a = DFTTrainer(fresh(), [PROMPT], RedClassifier(), cfg, quality_encoder=None, out_dir=tmp_path / "a")
    ev = a.train(progress=False).evaluations
    a.close()
    assert [e["step"] for e in ev] == [0, 2, 3]                     # every 2 steps, and the final weights
    b = DFTTrainer(fresh(), [PROMPT], RedClassifier(), cfg, quality_encoder=None, out_dir=tmp_path / "b",
                   resume=tmp_path / "a" / "checkpoints" / "checkpoint-000001")
    evb = b.train(progress=False).evaluations
    b.close()
    assert [e["step"] for e in evb] == [0, 2, 3]                    # no extra evaluation at the resume step


def test_up_front_refusals(tmp_path, monkeypatch, capsys):
    from fastfair.cli import main

    pipe = fresh()
    clf = dft.DifferentiableClassifier(lambda x: {a: torch.full((len(x), 2), 0.5) for a in ("g", "a", "r")},
                                       {"g": ["m", "f"], "a": ["y", "o"], "r": ["1", "2"]})
    with pytest.raises(TargetError, match="sample them instead"):
        DFTTrainer(pipe, [PROMPT], clf, small(images_per_prompt=200, ot_samples=0), quality_encoder=None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(dft.DFTError, match="without a process group"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(), quality_encoder=None)
    monkeypatch.delenv("WORLD_SIZE")
    base = ["finetune", "dft", "--model", "tiny-sd", "--prompt", PROMPT, "--out", str(tmp_path / "x")]
    assert main(base + ["--overwrite", "--resume", "latest"]) == 1
    assert "give one of them" in capsys.readouterr().err
    assert main(base + ["--eval-seeds", "4"]) == 1
    assert "--eval-seeds only apply with --eval-every" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@needs_peft
def test_cli_eval_prompts_from_a_profession_list(tmp_path, capsys):
    from fastfair.cli import main

    clf = tmp_path / "clf.py"
    clf.write_text("from dft_helpers import RedClassifier\n\ndef make(attribute_sets=None, device=None):\n"
                   "    return RedClassifier()\n")
    base = ["finetune", "dft", "--model", "tiny-sd", "--prompt", PROMPT, "--steps", "1", "--images-per-prompt", "2",
            "--sampling-steps", "1", "--height", "32", "--width", "32", "--rank", "4", "--classifier",
            f"python:{clf}:make", "--quality-encoder", "none", "--uncertainty-threshold", "1", "--no-progress",
            "--eval-every", "1", "--eval-seeds", "1", "--eval-steps", "1"]
    assert main(base + ["--eval-prompts", "list:nurse,pilot", "--out", str(tmp_path / "r")]) == 0
    ev = json.loads((tmp_path / "r" / "dft.json").read_text())["evaluations"]
    assert [sorted(e["model"]["per_prompt"]) for e in ev] == [["a photo of the face of a nurse",
                                                                 "a photo of the face of a pilot"]] * 2
    capsys.readouterr()
    assert main(base + ["--eval-prompts", "builtin:nope", "--out", str(tmp_path / "r2")]) == 1
    assert "--eval-prompts" in capsys.readouterr().err


@needs_peft
def test_cli_overwrite_and_conflicting_flags(tmp_path, capsys):
    """--overwrite on a folder holding a run started over (it was refused, telling the user to pass --overwrite);
    flags that would be ignored are refused; a resume may not go back in steps; gender*race is gender,race."""
    from fastfair.cli import main

    clf = tmp_path / "clf.py"
    clf.write_text("from dft_helpers import RedClassifier\n\ndef make(attribute_sets=None, device=None):\n"
                   "    return RedClassifier()\n")
    out = tmp_path / "r"
    base = ["finetune", "dft", "--model", "tiny-sd", "--prompt", PROMPT, "--images-per-prompt", "2",
            "--sampling-steps", "1", "--height", "32", "--width", "32", "--rank", "4", "--classifier",
            f"python:{clf}:make", "--quality-encoder", "none", "--uncertainty-threshold", "1", "--no-progress",
            "--checkpoint-every", "1", "--out", str(out)]
    assert main(base + ["--steps", "2"]) == 0
    first = json.loads((out / "dft.json").read_text())
    assert main(base + ["--steps", "1", "--overwrite"]) == 0
    again = json.loads((out / "dft.json").read_text())
    assert (first["steps"], again["steps"]) == (2, 1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001"]  # the old ones went
    capsys.readouterr()
    assert main(base[:-2] + ["--out", str(tmp_path / "x"), "--target", "gender=0.75,0.25",
                             "--joint-target", "0.5,0.5"]) == 1
    assert "not both" in capsys.readouterr().err
    for flags in (["--soft-tokens", "3"], ["--soft-tokens", "4", "--token", "<fastfair>"]):  # explicit defaults too
        assert main(base[:-2] + ["--out", str(tmp_path / "x")] + flags) == 1
        assert "--trainable is text-lora" in capsys.readouterr().err
    assert main(base + ["--steps", "2", "--resume", "latest"]) == 0  # on from the step-1 checkpoint: fine
    capsys.readouterr()
    assert main(base + ["--steps", "1", "--resume", "latest"]) == 1  # back from step 2: refused
    assert "beyond steps=1" in capsys.readouterr().err
    two = tmp_path / "two.py"
    two.write_text("import torch\n\nclass Two(torch.nn.Module):\n    labels = {'gender': ('m', 'f'), 'race': ('a', 'b')}\n"
                   "    def forward(self, x):\n        p = torch.sigmoid(50 * (x[:, :2].mean((2, 3)) - 0.45))\n"
                   "        return {'gender': torch.stack([p[:, 0], 1 - p[:, 0]], 1),"
                   " 'race': torch.stack([p[:, 1], 1 - p[:, 1]], 1)}\n\n"
                   "def make(attribute_sets=None, device=None):\n    return Two()\n")
    cmd = [a if a != f"python:{clf}:make" else f"python:{two}:make" for a in base[:-2]]
    assert main(cmd + ["--out", str(tmp_path / "y"), "--steps", "1", "--attributes", "gender*race",
                       "--images-per-prompt", "4"]) == 0
    meta = json.loads((tmp_path / "y" / "dft.json").read_text())
    assert meta["config"]["attributes"] == ["gender", "race"]  # aligned jointly, as gender,race


def test_missing_scipy_or_peft_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    """Every DFT run needs scipy: without it the CLI stops up front with one line (it loaded the model, sampled,
    then died with a traceback from the alignment targets), and DFTTrainer refuses at once. Simulated by hiding
    the module (sys.modules[name] = None makes importing it fail)."""
    import sys

    from fastfair import pipelines
    from fastfair.cli import main

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the missing package was named")

    monkeypatch.setattr(pipelines, "load_pipeline", no_loading)
    common = ["finetune", "dft", "--model", "tiny-sd", "--prompt", PROMPT, "--attributes", "gender", "--target",
              "gender=0.75,0.25", "--classifier", "python:clf.py:make", "--steps", "2", "--images-per-prompt", "2",
              "--sampling-steps", "1-2", "--height", "32", "--width", "32", "--quality-encoder", "none",
              "--no-checkpointing", "--uncertainty-threshold", "1", "--no-progress"]
    monkeypatch.setitem(sys.modules, "scipy", None)
    rc = main([*common, "--trainable", "soft-tokens", "--soft-tokens", "2", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("fastfair finetune: error") and "DFT needs scipy" in err, err
    assert "pip install" in err and "\n" not in err and "Traceback" not in err
    with pytest.raises(ImportError, match="DFT needs scipy"):
        DFTTrainer(None, PROMPT, None)
    monkeypatch.delitem(sys.modules, "scipy")
    monkeypatch.setitem(sys.modules, "peft", None)
    rc = main([*common, "--out", str(tmp_path / "b")])  # LoRA (the default) without peft
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "LoRA finetuning needs peft" in err and "\n" not in err, err
    assert "soft tokens (trainable='soft-tokens') need no peft, only scipy" in err


def test_default_attention_follows_the_device():
    """UNets: fastfair's attention on the CPU, diffusers' SDPA on CUDA (faster there and no probabilities kept; the
    H200 run of 2026-11-27 saw fastfair's attention crash a DFT step at SD1.5 size); SD3 / Flux: SDPA. An explicit
    choice is kept."""
    from types import SimpleNamespace

    from fastfair.dft import DFTConfig, _resolve_defaults

    unet = torch.nn.Linear(1, 1)
    for dev, want in (("cpu", "fastfair"), ("cuda", "diffusers")):
        cfg = DFTConfig()
        _resolve_defaults(cfg, "sd", SimpleNamespace(unet=unet, device=torch.device(dev)))
        assert cfg.attention == want, (dev, cfg.attention)
    cfg = DFTConfig(attention="fastfair")
    _resolve_defaults(cfg, "sdxl", SimpleNamespace(unet=unet, device=torch.device("cuda")))
    assert cfg.attention == "fastfair"
    for backend in ("triton", "native", "reference"):  # a named backend runs: fastfair's attention, on CUDA too
        cfg = DFTConfig(backend=backend)
        _resolve_defaults(cfg, "sd", SimpleNamespace(unet=unet, device=torch.device("cuda")))
        assert cfg.attention == "fastfair", backend
    pipe = fastfair.load_pipeline("tiny-sd3")
    cfg = DFTConfig()
    _resolve_defaults(cfg, "sd3", pipe)
    assert cfg.attention == "diffusers"
    cfg = DFTConfig(backend="reference")
    _resolve_defaults(cfg, "sd3", pipe)
    assert cfg.attention == "fastfair"
    if HAVE_PEFT:  # a real CPU pipeline through the trainer
        tr = DFTTrainer(fastfair.load_pipeline("tiny-sd"), [PROMPT], RedClassifier(), small(), quality_encoder=None)
        assert tr.cfg.attention == "fastfair"
