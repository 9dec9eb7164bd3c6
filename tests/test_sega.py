"""Semantic guidance (SEGA) and Fair Diffusion against diffusers' SemanticStableDiffusionPipeline, per-image
plans, SDXL's edit rows, composition with entanglement guidance and maps, errors."""
import copy
import math

import numpy as np
import pytest
import torch

import fastfair
from fastfair import FairDiffusion, SemanticGuidance
from fastfair.generation import _initial_latents
from fastfair.guidance import EntanglementGuidance

PROMPT = "a photo of the face of a doctor"


@pytest.fixture(scope="module")
def sd64(tiny_sd):
    return copy.deepcopy(tiny_sd).to(torch.float64)


def semantic(pipe, scheduler=None):
    from diffusers import SemanticStableDiffusionPipeline

    p = SemanticStableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                        unet=pipe.unet, scheduler=scheduler or pipe.scheduler, safety_checker=None,
                                        feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def reference(pipe, seeds, steps, prompts, reverse, scheduler=None, step_hook=None, **kw):
    """diffusers' SemanticStableDiffusionPipeline from the seeds' latents: final latents (N, 4, h, w)."""
    sem = semantic(pipe, scheduler)
    lat = torch.cat([_initial_latents(pipe, s, (16, 16), "cpu") for s in seeds])
    args = dict(editing_prompt=prompts, reverse_editing_direction=reverse, edit_guidance_scale=kw.get("scale", 5),
                edit_warmup_steps=kw.get("warmup", 10), edit_cooldown_steps=kw.get("cooldown"),
                edit_threshold=kw.get("threshold", 0.9), edit_momentum_scale=kw.get("momentum_scale", 0.1),
                edit_mom_beta=kw.get("momentum_beta", 0.4), edit_weights=kw.get("weights"))
    if step_hook is not None:
        orig = sem.scheduler.step
        sem.scheduler.step = lambda out, t, x, *a, **k: orig(step_hook(out, t, x), t, x, *a, **k)
    try:
        return sem([PROMPT] * len(seeds), latents=lat, num_inference_steps=steps, guidance_scale=7.5,
                   output_type="latent", **args).images
    finally:
        if step_hook is not None:
            del sem.scheduler.step


def close(latents, ref):
    """Generation.latents are float32 copies of the float64 run's."""
    torch.testing.assert_close(latents, ref.float(), rtol=2e-7, atol=1e-6)


CASES = {
    # two concepts warming up at different steps (the partial, weight-normalised branch), a cool-down,
    # per-concept scales, thresholds and weights, momentum
    "mixed": dict(scale=[4.0, 6.0], warmup=[1, 3], cooldown=[None, 5], threshold=[0.9, 0.75], weights=[1.0, 0.5],
                  momentum_scale=0.3, momentum_beta=0.6),
    "defaults_one_concept": dict(warmup=2),
    # (threshold > 0: diffusers rounds the quantile to float32, which at 0 -- the minimum -- drops
    # elements equal to it in a float64 run)
    "no_warmup": dict(warmup=0, threshold=0.5, momentum_scale=0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_diffusers_semantic_pipeline(sd64, case):
    kw = CASES[case]
    prompts = ["a man", "a woman"] if case != "defaults_one_concept" else ["glasses"]
    reverse = [True, False][:len(prompts)]
    cd = kw.get("cooldown")
    ref_kw = dict(kw, cooldown=[100 if c is None else c for c in cd]) if cd else kw  # diffusers: no None in lists
    seeds, steps = [3, 4], 6
    g = fastfair.generate(sd64, PROMPT, seeds=seeds, steps=steps, progress=False,
                          edit_guidance=SemanticGuidance(prompts, reverse=reverse, **kw))
    ref = reference(sd64, seeds, steps, prompts, reverse, **ref_kw)
    plain = fastfair.generate(sd64, PROMPT, seeds=seeds, steps=steps, progress=False)
    assert (plain.latents - ref.float()).abs().max() > 1e-2  # the edit changes the images
    close(g.latents, ref)
    n = g.diagnostics["edit_norm"]
    assert n.shape == (steps, 2) and (n[:min(kw.get("warmup", 10) if isinstance(kw.get("warmup", 10), int)
                                           else min(kw["warmup"]), steps)] == 0).all()
    assert g.config["edit_guidance"]["method"] == "sega" and g.edit_targets == []


@pytest.mark.parametrize("sched", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_other_schedulers(sd64, sched):
    import diffusers

    kw = dict(warmup=1, scale=3.0)
    pipe = copy.copy(sd64)
    pipe.scheduler = getattr(diffusers, sched).from_config(sd64.scheduler.config)
    g = fastfair.generate(pipe, PROMPT, seeds=[5], steps=5, progress=False,
                          edit_guidance=SemanticGuidance(["a woman"], **kw))
    ref = reference(pipe, [5], 5, ["a woman"], [False],
                    scheduler=getattr(diffusers, sched).from_config(sd64.scheduler.config), **kw)
    close(g.latents, ref)


def test_fair_diffusion_per_image_plans(sd64):
    """One batch of seeds 0..3 steers even seeds to the first group and odd ones to the second (BiasMap's
    parity); each image equals diffusers' pipeline run alone with that seed's editing prompts."""
    fd = FairDiffusion.preset("gender", warmup=1)
    seeds, steps = [0, 1, 2, 3], 4
    g = fastfair.generate(sd64, PROMPT, seeds=seeds, steps=steps, progress=False, edit_guidance=fd)
    assert g.edit_targets == ["female", "male", "female", "male"]
    for i, s in enumerate(seeds):
        prompts = ["a male", "a female"] if s % 2 == 0 else ["a female", "a male"]  # run_gender.py's order
        ref = reference(sd64, [s], steps, prompts, [True, False], scale=4, warmup=1, threshold=0.95,
                        momentum_scale=0.3, momentum_beta=0.6)
        close(g.latents[i:i + 1], ref)


def test_fair_diffusion_assignment():
    fd = FairDiffusion.preset("race")
    assert [fd.plan(s) for s in (10, 7)] == [
        (["a white person", "an African-american person"], [True, False], "African-American"),
        (["an African-american person", "a white person"], [True, False], "White")]
    r = FairDiffusion({"young": "a young person", "old": "an old person"}, target={"young": 0.75, "old": 0.25},
                      assign="random")
    labels = [r.label_for(s) for s in range(4000)]
    assert abs(labels.count("young") / 4000 - 0.75) < 0.03  # binomial sd 0.007
    assert labels == [r.label_for(s) for s in range(4000)]  # a function of the seed alone
    three = FairDiffusion({"a": "x", "b": "y", "c": "z"})
    assert three.plan(4) == (["x", "z", "y"], [True, True, False], "b")  # 4 % 3 -> b; a, c reversed


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3"])
def test_pooled_edit_rows(model):
    """SDXL's and SD3's edit rows carry the editing prompt's embeddings and pooled embedding: with every guide
    kept (threshold 0), no warm-up or momentum, one step adds s * b * (out_x - out_uncond), and
    b * (out_x - out_uncond) is the difference of two plain one-step runs of prompt x at CFG scales 3 and 2
    (DDIM's and flow-matching Euler's steps are affine in the model output; SD3's edit acts on the velocity,
    where its pipeline applies CFG)."""
    pipe = copy.deepcopy(fastfair.load_pipeline(model)).to(torch.float64)
    kw = dict(seeds=[1, 2], steps=1, progress=False)
    s = 2.5
    edit = fastfair.generate(pipe, PROMPT, **kw, edit_guidance=SemanticGuidance(
        ["a woman with glasses"], scale=s, warmup=0, threshold=0.0, momentum_scale=0.0))
    plain = fastfair.generate(pipe, PROMPT, **kw)
    x3 = fastfair.generate(pipe, "a woman with glasses", **kw, guidance_scale=3.0)
    x2 = fastfair.generate(pipe, "a woman with glasses", **kw, guidance_scale=2.0)
    # float32 copies of float64 latents: rounding ~2e-7 each
    torch.testing.assert_close(edit.latents - plain.latents, s * (x3.latents - x2.latents), rtol=0, atol=3e-6)
    assert (edit.latents - plain.latents).abs().max() > 1e-3


def test_sd3_with_maps_and_guidance():
    """On SD3 Fair Diffusion runs beside word maps and entanglement guidance (both on the transformer's
    keyword call); an edit that has not applied yet leaves the maps of those steps the plain run's."""
    pipe = fastfair.load_pipeline("tiny-sd3")
    kw = dict(seeds=[0, 1], steps=3, maps=["doctor", "face"], progress=False, map_steps=[0, 1],
              attributions={"g": (PROMPT + " and gender", ["doctor", "gender"])})  # text streams (fastfair.shadow)
    fd = FairDiffusion.preset("gender", warmup=2)
    plain = fastfair.generate(pipe, PROMPT, **kw)
    g = fastfair.generate(pipe, PROMPT, **kw, edit_guidance=fd)
    for w in ("doctor", "face"):
        torch.testing.assert_close(g.maps[w], plain.maps[w], rtol=0, atol=1e-6)
    for w in ("doctor", "gender"):
        torch.testing.assert_close(g.attribution_maps["g"][w], plain.attribution_maps["g"][w], rtol=0, atol=1e-6)
    assert (g.latents - plain.latents).abs().max() > 1e-3
    gg = fastfair.generate(pipe, PROMPT, **kw, edit_guidance=fd, guidance=EntanglementGuidance("doctor", "face"))
    assert gg.diagnostics["applied"][1:].all() and gg.diagnostics["edit_norm"][2].gt(0).all()


def test_with_entanglement_guidance(sd64):
    """BiasMap's released pipeline: SEGA's edit, then the energy nudge of the prompt's maps. Reference:
    diffusers' semantic pipeline with the nudge added before each scheduler step from the energy gradient
    at that step's latents (fastfair's Guider, itself checked against finite differences)."""
    from fastfair.generation import _token_layout
    from fastfair.guidance import Guider

    pipe = copy.deepcopy(sd64)
    fastfair.patch(pipe, backend="reference")
    eg = EntanglementGuidance("doctor", "face", scale=200.0, max_grad_norm=1e9, gamma=0.1)
    kw = dict(warmup=1, scale=3.0)
    seeds, steps = [0, 1], 4
    g = fastfair.generate(pipe, PROMPT, seeds=seeds, steps=steps, progress=False, backend="reference", guidance=eg,
                          edit_guidance=SemanticGuidance(["a woman"], **kw))
    assert g.diagnostics["applied"].all() and g.diagnostics["edit_norm"].shape == (steps, 2)

    tok, w = _token_layout(pipe, [PROMPT], eg.words)
    gd = Guider(pipe, eg, tok.expand(2, -1), [(0, 1)], (16, 16), None, 2)
    gd.word_weights = w.expand(2, -1, -1)
    emb, neg = pipe.encode_prompt([PROMPT] * 2, "cpu", 1, True)
    gd.unet_call = ((), dict(encoder_hidden_states=torch.cat([neg, emb])))
    nudged = []

    def hook(out, t, x):
        _, grad = gd.energy_and_grad(x, t)
        nudged.append(t)
        return out + eg.scale * math.sqrt(1 - float(pipe.scheduler.alphas_cumprod[int(t)])) * grad

    ref = reference(pipe, seeds, steps, ["a woman"], [False], step_hook=hook, **kw)
    assert len(nudged) == steps
    sega_only = fastfair.generate(pipe, PROMPT, seeds=seeds, steps=steps, progress=False,
                                  edit_guidance=SemanticGuidance(["a woman"], **kw))
    assert (sega_only.latents - ref.float()).abs().max() > 1e-3  # the nudge matters
    close(g.latents, ref)


def test_maps_ignore_edit_rows(sd64):
    """Before the edit applies (warm-up 2), the maps of the prompt are exactly the plain run's: the editing
    prompts' rows are not recorded; afterwards the images differ."""
    kw = dict(seeds=[0, 1], steps=3, maps=["doctor", "face"], progress=False, backend="reference", map_steps=[0, 1])
    plain = fastfair.generate(sd64, PROMPT, **kw)
    g = fastfair.generate(sd64, PROMPT, **kw, edit_guidance=SemanticGuidance(["a woman", "a man"], warmup=2))
    for word in ("doctor", "face"):
        torch.testing.assert_close(g.maps[word], plain.maps[word], rtol=0, atol=1e-14)
    assert (g.latents - plain.latents).abs().max() > 1e-3


def test_bad_input(tiny_sd):
    with pytest.raises(ValueError, match="at least one editing prompt"):
        SemanticGuidance([])
    with pytest.raises(ValueError, match="2 values for 1 editing prompts"):
        SemanticGuidance(["a"], scale=[1, 2])
    with pytest.raises(ValueError, match="threshold"):
        SemanticGuidance(["a"], threshold=1.0)
    with pytest.raises(ValueError, match="reverse=True"):
        SemanticGuidance(["a"], weights=[-1])
    with pytest.raises(ValueError, match="scale must be > 0"):
        SemanticGuidance(["a"], scale=0)
    with pytest.raises(ValueError, match="two groups"):
        FairDiffusion({"a": "x"})
    with pytest.raises(ValueError, match="assign='random'"):
        FairDiffusion({"a": "x", "b": "y"}, target={"a": 0.7, "b": 0.3})
    with pytest.raises(ValueError, match="not among the choices"):
        FairDiffusion({"a": "x", "b": "y"}, target={"c": 1.0}, assign="random")
    with pytest.raises(ValueError, match="presets"):
        FairDiffusion.preset("age")
    for bad, msg in ((dict(reverse="False"), "True / False"), (dict(warmup=2.5), "whole number"),
                     (dict(warmup=3, cooldown=3), "after the warm-up"), (dict(scale="4"), "numbers")):
        with pytest.raises(ValueError, match=msg):
            SemanticGuidance(["a"], **bad)
    with pytest.raises(ValueError, match="one scale for all groups"):
        FairDiffusion({"a": "x", "b": "y"}, scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="labels must be non-empty strings"):
        FairDiffusion({0: "x", 1: "y"})
    with pytest.raises(ValueError, match="share the editing prompts"):
        FairDiffusion({"a": "x", "b": "x"})
    assert SemanticGuidance(["a", "b"], scale=__import__("numpy").array([4, 6])).scales == [4.0, 6.0]
    with pytest.raises(ValueError, match="guidance_scale > 1|value > 1"):
        fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=1, guidance_scale=1.0, progress=False,
                          edit_guidance=SemanticGuidance(["a"]))
    with pytest.raises(ValueError, match="guidance-distilled"):
        fastfair.generate(fastfair.load_pipeline("tiny-flux"), PROMPT, seeds=[0], steps=2, progress=False,
                          edit_guidance=SemanticGuidance(["a"], warmup=0))
    with pytest.raises(ValueError, match="77"):
        fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=1, progress=False,
                          edit_guidance=SemanticGuidance(["word " * 100], warmup=0))


def test_audit_with_fair_diffusion(tiny_sd, tmp_path):
    """An audit of SD + Fair Diffusion: each neutral image is generate()'s with the same Fair Diffusion (checked
    against diffusers above), its row names the group it was steered to, and the settings record the method
    (a run without it never resumes into this one)."""
    import numpy as np
    from PIL import Image

    from fastfair.audit import AuditInputError

    fd = FairDiffusion.preset("gender", warmup=0)
    kw = dict(pipeline=tiny_sd, attributes="gender", seeds=2, steps=2, progress=False, n_boot=0, classifier="none",
              entanglement="open")
    res = fastfair.audit("tiny-sd", "list:doctor", out=tmp_path / "fd", edit_guidance=fd, **kw)
    df = res.results
    assert list(df["edit_target"]) == ["female", "male"]
    g = fastfair.generate(tiny_sd, "a photo of the face of a doctor", seeds=[0, 1], steps=2, progress=False,
                          edit_guidance=fd, attributions={"gender": ("a photo of the face of a doctor and gender",
                                                                     ["doctor", "gender"])})
    for i, rel in enumerate(df["image"]):
        assert np.array_equal(np.asarray(Image.open(res.run_dir / rel).convert("RGB")), np.asarray(g.images[i]))
    am = g.attribution_maps["gender"]
    np.testing.assert_allclose(df["iou_open_gender"], fastfair.metrics.iou(am["doctor"], am["gender"], 70.0).numpy(),
                               rtol=1e-6)
    settings = __import__("json").loads((res.run_dir / "audit.json").read_text())["settings"]
    assert settings["generation"]["edit_guidance"]["method"] == "fair-diffusion"
    with pytest.raises(Exception, match="other settings|differ|settings"):
        fastfair.audit("tiny-sd", "list:doctor", out=tmp_path / "fd", resume=True, **kw)
    with pytest.raises(AuditInputError, match="classifier-free guidance"):
        fastfair.audit("tiny-sd", "list:doctor", out=tmp_path / "cfg1", edit_guidance=fd,
                       **dict(kw, guidance_scale=1.0))
    assert not (tmp_path / "cfg1").exists()


def test_cli(tiny_sd, tmp_path, capsys):
    """--sega-toward / --sega-away give generate()'s SemanticGuidance (the same images); --fair-diffusion with a
    target draws groups per seed; contradictory flags are refused before any work."""
    import json

    import numpy as np
    from PIL import Image

    from fastfair.cli import main

    base = ["generate", "--model", "tiny-sd", "--prompt", PROMPT, "--seeds", "0-1", "--steps", "2", "--no-progress"]
    assert main(base + ["--sega-toward", "a woman", "--sega-away", "a man", "--sega-warmup", "0", "--sega-scale", "3",
                        "--out", str(tmp_path / "s")]) == 0
    assert "semantic guidance: applied at 2 of 2 steps (from step 0)" in capsys.readouterr().out
    g = fastfair.generate(fastfair.load_pipeline("tiny-sd"), PROMPT, seeds=[0, 1], steps=2, progress=False,
                          edit_guidance=SemanticGuidance(["a woman", "a man"], reverse=[False, True], warmup=0, scale=3))
    for i, s in enumerate((0, 1)):
        got = np.asarray(Image.open(tmp_path / "s" / "images" / f"{i:04d}_seed{s}.png").convert("RGB"))
        assert np.array_equal(got, np.asarray(g.images[i]))
    assert main(base + ["--fair-diffusion", "gender", "--fair-target", "female=1", "--batch-size", "1",  # 2 batches
                        "--sega-warmup", "1", "--out", str(tmp_path / "f")]) == 0
    assert "Fair Diffusion: applied at 1 of 2 steps (from step 1); groups: female 2" in capsys.readouterr().out
    meta = json.loads((tmp_path / "f" / "generation.json").read_text())
    assert meta["edit_targets"] == ["female", "female"] and meta["edit_guidance"]["assign"] == "random"
    assert main(base + ["--fair-diffusion", "gender,race", "--fair-target", "female=1,White=1", "--sega-warmup", "1",
                        "--out", str(tmp_path / "j")]) == 0
    assert json.loads((tmp_path / "j" / "generation.json").read_text())["edit_targets"] == ["female|White"] * 2
    capsys.readouterr()
    # BiasMap's mitigated pipeline from the README: the attribution prompt serves --guide alone (no --maps)
    assert main(base + ["--guidance-scale", "7", "--fair-diffusion", "gender", "--sega-warmup", "0", "--guide", "doctor:gender",
                        "--attribution-prompt", PROMPT + " and gender", "--guide-branch", "uncond",
                        "--out", str(tmp_path / "bm")]) == 0
    assert "guidance: 4 of 4 image-steps updated" in capsys.readouterr().out
    for bad, msg in ((["--fair-diffusion", "gender", "--sega-toward", "x"], "drop --sega-toward"),
                     (["--fair-target", "female=1"], "needs --fair-diffusion"),
                     (["--sega-scale", "2"], "need --sega-toward"),
                     (["--fair-diffusion", "gender", "--fair-target", "female"], "GROUP=P"),
                     (["--fair-diffusion", "age"], "presets"),
                     (["--fair-diffusion", "gender"], "would never apply"),  # warm-up 10 >= 2 steps
                     (["--fair-diffusion", "gender", "--fair-target", "female=0.5,female=0.5"], "twice"),
                     (["--fair-diffusion", "gender,race", "--fair-target", "young=1"], "of none of"),
                     (["--sega-toward", "a man", "--sega-away", "a man"], "more than once"),
                     (["--sega-toward", "a man", "--guidance-scale", "1"], "classifier-free guidance")):
        assert main(base + bad + ["--out", str(tmp_path / "bad")]) == 1
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_audit_with_entanglement_guidance(tiny_sd, tmp_path, capsys):
    """guide='gender': each neutral image is generate()'s with EntanglementGuidance(profession, "gender",
    attribution_prompt=...) (with Fair Diffusion too, BiasMap's mitigated pipeline); rows carry the guidance
    diagnostics; bad combinations are refused before the run directory exists."""
    import numpy as np
    from PIL import Image

    from fastfair.audit import AuditInputError
    from fastfair.cli import main

    fd = FairDiffusion.preset("gender", warmup=0)
    opts = dict(scale=50.0, branch="uncond")
    kw = dict(pipeline=tiny_sd, attributes="gender,race", seeds=2, steps=3, progress=False, n_boot=0,
              classifier="none", entanglement="open")
    res = fastfair.audit("tiny-sd", "list:nurse", out=tmp_path / "g", edit_guidance=fd, guide="gender",
                         guide_options=opts, **kw)
    df = res.results
    ap = {a: f"a photo of the face of a nurse and {a}" for a in ("gender", "race")}
    g = fastfair.generate(tiny_sd, "a photo of the face of a nurse", seeds=[0, 1], steps=3, progress=False,
                          edit_guidance=fd, guidance=EntanglementGuidance("nurse", "gender",
                                                                          attribution_prompt=ap["gender"], **opts),
                          attributions={a: (t, ["nurse", a]) for a, t in ap.items()})
    for i, rel in enumerate(df["image"]):
        assert np.array_equal(np.asarray(Image.open(res.run_dir / rel).convert("RGB")), np.asarray(g.images[i]))
    for a in ("gender", "race"):
        am = g.attribution_maps[a]
        np.testing.assert_allclose(df[f"iou_open_{a}"], fastfair.metrics.iou(am["nurse"], am[a], 70.0).numpy(),
                                   rtol=1e-6)
    d = g.diagnostics
    assert list(df["guide_steps_applied"]) == d["applied"].sum(0).tolist()
    np.testing.assert_allclose(df["guide_energy_last"], d["energy"][-1].numpy(), rtol=1e-6)
    plain = fastfair.generate(tiny_sd, "a photo of the face of a nurse", seeds=[0, 1], steps=3, progress=False,
                              edit_guidance=fd)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(g.images[0]))
    assert ("mitigation: Fair Diffusion (female, male) + entanglement guidance (gender, scale 50.0)"
            in (res.run_dir / "report.html").read_text())
    for extra, msg in ((dict(guide="age"), "names no audited attribute set"),
                       (dict(guide="gender", entanglement="open,inprompt"), "entanglement='open'"),
                       (dict(guide="gender", guide_options=dict(scale=-1)), "scale must be > 0"),
                       (dict(guide="gender", guide_options=dict(sclae=1)), "unknown guide_options")):
        with pytest.raises(AuditInputError, match=msg):
            fastfair.audit("tiny-sd", "list:nurse", out=tmp_path / "bad", **dict(kw, **extra))
    assert not (tmp_path / "bad").exists()
    assert main(["audit", "--model", "tiny-sd", "--prompts", "list:nurse", "--seeds", "1", "--steps", "2",
                 "--classifier", "none", "--entanglement", "open", "--guide-attribute", "gender", "--n-boot", "0",
                 "--no-progress", "--out", str(tmp_path / "cli")]) == 0
    import pandas as pd

    assert pd.read_parquet(tmp_path / "cli" / "results.parquet")["guide_steps_applied"].notna().all()


def test_cli_resume_checks_the_guidance_attribution_prompt(tiny_sd, tmp_path, capsys, monkeypatch):
    """--guide with --attribution-prompt and no --maps: the attribution prompt is part of the run's settings, so
    a resume with another one is refused instead of mixing images guided on two prompts."""
    from tiny_models import interrupt_generate

    from fastfair.cli import main

    restore = interrupt_generate(monkeypatch, 2)
    args = ["generate", "--model", "tiny-sd", "--prompt", PROMPT, "--seeds", "0-1", "--steps", "2", "--no-progress",
            "--batch-size", "1", "--guide", "doctor:gender", "--out", str(tmp_path / "r")]
    assert main(args + ["--attribution-prompt", PROMPT + " and gender"]) != 0
    restore()
    capsys.readouterr()
    assert main(args + ["--attribution-prompt", "a photo of gender and a doctor", "--resume"]) == 1
    assert "other settings" in capsys.readouterr().err
    assert main(args + ["--attribution-prompt", PROMPT + " and gender", "--resume"]) == 0


def test_audit_guide_input_checks(tiny_sd, tmp_path):
    from fastfair.audit import AuditInputError

    kw = dict(pipeline=tiny_sd, attributes="gender", seeds=1, steps=2, progress=False, n_boot=0, classifier="none",
              entanglement="open")
    for extra, msg in ((dict(guide_options=dict(scale=5.0)), "without guide="),
                       (dict(guide="gender", guide_options=dict(steps=[])), "non-empty"),
                       (dict(guide="gender", guide_options=dict(steps=[2])), "0..1"),
                       (dict(edit_guidance=FairDiffusion.preset("gender")), "never apply")):
        with pytest.raises(AuditInputError, match=msg):
            fastfair.audit("tiny-sd", "list:doctor", out=tmp_path / "bad", **dict(kw, **extra))
    assert not (tmp_path / "bad").exists()
    # Fair Diffusion steers the neutral images only: in-prompt images name the attribute
    fd = FairDiffusion.preset("gender", warmup=0)
    res = fastfair.audit("tiny-sd", "list:doctor", out=tmp_path / "ip", edit_guidance=fd,
                         **dict(kw, entanglement="open,inprompt"))
    df = res.results
    assert df.loc[df["kind"] == "neutral", "edit_target"].tolist() == ["female"]
    assert df.loc[df["kind"] == "inprompt", "edit_target"].isna().all()
    ip = df[(df["kind"] == "inprompt") & (df["word"] == "female")].iloc[0]
    plain = fastfair.generate(tiny_sd, ip["prompt"], seeds=[0], steps=2, progress=False, maps=["doctor", "female"])
    import numpy as np
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(res.run_dir / ip["image"]).convert("RGB")), np.asarray(plain.images[0]))


def test_audit_reports_fair_diffusion_steering(tiny_sd, tmp_path):
    """With a classifier, the summary gives the share of neutral images classified as the group they were steered
    to (here a classifier that always answers "female": 1.0 for the female-steered seeds, 0.0 for the others)."""
    import numpy as np

    from fastfair.classify import AttributeClassifier

    class AlwaysFemale(AttributeClassifier):
        labels = {"gender": ("male", "female")}

        def predict(self, images):
            return {"gender": np.tile([0.1, 0.9], (len(images), 1))}

    res = fastfair.audit("tiny-sd", "list:doctor", pipeline=tiny_sd, attributes="gender", seeds=4, steps=2,
                         progress=False, n_boot=0, classifier=AlwaysFemale(), entanglement="none",
                         edit_guidance=FairDiffusion.preset("gender", warmup=0), out=tmp_path / "s")
    st = res.summary["steering"]["gender"]
    assert st == {"overall": 0.5, "n": 4, "per_target": {"female": 1.0, "male": 0.0},
                  "per_target_n": {"female": 2, "male": 2}}
    page = (res.run_dir / "report.html").read_text()
    assert "Fair Diffusion steering" in page and "female 100% of 2" in page and "male 0% of 2" in page


def test_edit_rows_ride_on_the_pipeline_call(sd64):
    """Without maps or entanglement guidance the edit rows join the pipeline's own UNet call (one (2 + E) N-row
    pass per step, as diffusers' semantic pipeline); with maps they get a call of their own. Same latents."""
    sega = SemanticGuidance(["a woman", "a man"], reverse=[False, True], warmup=1)
    calls = []
    hook = sd64.unet.conv_in.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))  # each UNet pass
    try:
        folded = fastfair.generate(sd64, PROMPT, seeds=[0, 1], steps=3, progress=False, edit_guidance=sega)
        assert calls == [8, 8, 8]  # 2 images x (uncond + cond + 2 concepts)
        calls.clear()
        split = fastfair.generate(sd64, PROMPT, seeds=[0, 1], steps=3, progress=False, edit_guidance=sega,
                                  maps=["doctor"], backend="reference")
        assert calls == [4, 4, 4, 4, 4, 4]
    finally:
        hook.remove()
    torch.testing.assert_close(folded.latents, split.latents, rtol=0, atol=1e-6)


def test_joint_fair_diffusion(sd64):
    """Gender x race: parity covers the four intersections once per four seeds; each image equals diffusers'
    pipeline run alone with both parts' editing prompts side by side; random draws are independent per part."""
    from fastfair import JointFairDiffusion

    j = JointFairDiffusion(FairDiffusion.preset("gender", warmup=1), FairDiffusion.preset("race", warmup=1))
    assert sorted(j.label_for(s) for s in range(4)) == sorted(
        f"{g}|{r}" for g in ("female", "male") for r in ("African-American", "White"))
    # balanced at every count of seeds: 2 seeds already steer to both groups of each attribute
    assert [j.label_for(s) for s in range(4)] == ["female|African-American", "male|White", "female|White",
                                                  "male|African-American"]
    seeds = [0, 1]
    g = fastfair.generate(sd64, PROMPT, seeds=seeds, steps=3, progress=False, edit_guidance=j)
    assert g.edit_targets == ["female|African-American", "male|White"]
    for i, s in enumerate(seeds):
        prompts, rev, _ = j.plan(s)
        ref = reference(sd64, [s], 3, prompts, rev, scale=4, warmup=1, threshold=0.95, momentum_scale=0.3,
                        momentum_beta=0.6)
        close(g.latents[i:i + 1], ref)
    r = JointFairDiffusion(FairDiffusion.preset("gender", assign="random"),
                           FairDiffusion.preset("race", assign="random", target={"White": 0.25, "African-American": 0.75}))
    labels = [r.labels_for(s) for s in range(4000)]
    g_f = np.array([a == "female" for a, _ in labels])
    r_b = np.array([b == "African-American" for _, b in labels])
    assert abs(r_b.mean() - 0.75) < 0.03 and abs(g_f.mean() - 0.5) < 0.03
    assert abs((g_f & r_b).mean() - g_f.mean() * r_b.mean()) < 0.02  # independent draws
    single = FairDiffusion.preset("gender", assign="random")  # part 0 as a run of its own would steer it
    assert [a for a, _ in labels[:200]] == [single.label_for(s) for s in range(200)]
    with pytest.raises(ValueError, match="share the group labels"):
        JointFairDiffusion(FairDiffusion({"yes": "x", "no": "y"}), FairDiffusion({"yes": "z", "no": "w"}))
    with pytest.raises(ValueError, match="without '\\|'"):
        FairDiffusion({"a|b": "x", "c": "y"})
    with pytest.raises(ValueError, match="sum to 1"):
        FairDiffusion({"a": "x", "b": "y"}, target={"a": 0.75}, assign="random")
    with pytest.raises(ValueError, match="same assign"):
        JointFairDiffusion(FairDiffusion.preset("gender"), FairDiffusion.preset("race", assign="random"))
    with pytest.raises(ValueError, match="momentum"):
        JointFairDiffusion(FairDiffusion.preset("gender"), FairDiffusion.preset("race", momentum_scale=0.1))
    with pytest.raises(ValueError, match="two or more"):
        JointFairDiffusion(FairDiffusion.preset("gender"))


def test_audit_steering_of_joint_fair_diffusion(tiny_sd, tmp_path):
    """A gender x race Fair Diffusion audit: steering per attribute (each part of the joint target) and per
    intersection, against a classifier that always answers female / White."""
    from fastfair import JointFairDiffusion
    from fastfair.classify import AttributeClassifier

    class FemaleWhite(AttributeClassifier):
        labels = {"gender": ("male", "female"), "race": ("White", "African-American")}

        def predict(self, images):
            n = len(images)
            return {"gender": np.tile([0.1, 0.9], (n, 1)), "race": np.tile([0.8, 0.2], (n, 1))}

    for order in ("gender", "race"):  # the joint target's parts in either order against the audit's gender x race
        parts = [FairDiffusion.preset("gender", warmup=0), FairDiffusion.preset("race", warmup=0)]
        j = JointFairDiffusion(*(parts if order == "gender" else parts[::-1]))
        res = fastfair.audit("tiny-sd", "list:doctor", pipeline=tiny_sd, attributes="gender,race", seeds=4, steps=2,
                             progress=False, n_boot=0, classifier=FemaleWhite(), entanglement="none", edit_guidance=j,
                             out=tmp_path / order)
        st = res.summary["steering"]
        assert st["gender"]["overall"] == 0.5 and st["race"]["overall"] == 0.5
        assert st["gender×race"] == {"overall": 0.25, "n": 4, "per_target": {
            "male|White": 0.0, "male|African-American": 0.0, "female|White": 1.0, "female|African-American": 0.0},
            "per_target_n": {"male|White": 1, "male|African-American": 1, "female|White": 1,
                             "female|African-American": 1}}
