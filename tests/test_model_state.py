"""A pipeline's state beyond its name: images blacked out by a safety checker are not measured as pictures, and
a resumed run refuses a model changed under the same name (found by a helper's review)."""
import json

import numpy as np
import pytest
import torch
from test_audit import tiny_clip_classifier

import fastfair
from fastfair.audit import RunDirError
from fastfair.audit.attributes import parse_attributes
from fastfair.pipelines import pipeline_fingerprint

PROMPT = "a photo of the face of a doctor"


def _with_checker(base, flag_all: bool):
    """tiny-sd's components with a tiny CLIP safety checker that flags every image (or none)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=small, vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    sc = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():  # a concept is flagged where cosine - weight > 0: weight -10 flags all, +10 none
        sc.concept_embeds_weights.fill_(-10.0 if flag_all else 10.0)
        sc.special_care_embeds_weights.fill_(10.0)
    fe = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    comps = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor")}
    pipe = StableDiffusionPipeline(**comps, safety_checker=sc, feature_extractor=fe, requires_safety_checker=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_safety_checker_blocks_are_recorded(tiny_sd, tmp_path):
    pipe = _with_checker(tiny_sd, flag_all=True)
    gen = fastfair.generate(pipe, PROMPT, seeds=[0, 1], steps=2, maps=["doctor", "face"], progress=False)
    assert gen.safety_blocked == [True, True]
    assert all(np.asarray(im).max() == 0 for im in gen.images)  # what the checker does to a flagged image
    plain = fastfair.generate(tiny_sd, PROMPT, seeds=[0, 1], steps=2, maps=["doctor", "face"], progress=False)
    assert plain.safety_blocked == []  # no checker
    torch.testing.assert_close(gen.maps["doctor"], plain.maps["doctor"])  # the maps are the model's
    out = fastfair.generation.generate_to_dir(pipe, PROMPT, tmp_path / "g", seeds=[0, 1], settings={}, steps=2,
                                              maps=["doctor"], batch_size=1, progress=False)
    assert json.loads((tmp_path / "g" / "generation.json").read_text())["safety_blocked"] == [True, True]
    assert out.safety_blocked == [True, True]
    none = _with_checker(tiny_sd, flag_all=False)
    assert fastfair.generate(none, PROMPT, seeds=[0], steps=2, progress=False).safety_blocked == [False]


def test_audit_abstains_on_blocked_images(tiny_sd, tmp_path):
    """Black pictures were classified (every one "male") and entered the distribution metrics."""
    pipe = _with_checker(tiny_sd, flag_all=True)
    sets, _ = parse_attributes("gender")
    res = fastfair.audit("tiny-sd+checker", "list:doctor", pipeline=pipe, attributes="gender", seeds=2, steps=2,
                         classifier=tiny_clip_classifier(sets), clip_score=True, out=tmp_path / "a",
                         progress=False, n_boot=50, report=True)
    df = res.results
    assert df["safety_blocked"].all() and df["pred_gender"].isna().all() and df["clip_score"].isna().all()
    neutral, inprompt = df[df["kind"] == "neutral"], df[df["kind"] == "inprompt"]
    assert len(inprompt) and neutral["iou_open_gender"].notna().all() and inprompt["iou_inprompt"].notna().all()
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["safety_blocked"] == len(df)
    assert "safety checker blacked out" in (res.run_dir / "report.html").read_text()


def test_resume_refuses_a_model_changed_in_place(tiny_sd, tmp_path):
    """A LoRA added to the same pipeline object, or another scheduler under the same name: refused, not mixed."""
    from diffusers import EulerDiscreteScheduler

    pipe = fastfair.load_pipeline("tiny-sd")
    before = pipeline_fingerprint(pipe)
    assert pipeline_fingerprint(fastfair.load_pipeline("tiny-sd")) == before  # a fresh load is the same model
    kw = dict(seeds=[0, 1], steps=2, maps=["doctor"], batch_size=1, progress=False)
    out = tmp_path / "h"  # an unfinished run (one finished batch), made with the model as loaded
    real = fastfair.generation.generate
    calls = []

    def stop_after_one(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    fastfair.generation.generate = stop_after_one
    try:
        with pytest.raises(KeyboardInterrupt):
            fastfair.generation.generate_to_dir(pipe, PROMPT, out, settings={"model": "tiny-sd"}, **kw)
    finally:
        fastfair.generation.generate = real
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="model_state"):
        fastfair.generation.generate_to_dir(pipe, PROMPT, out, settings={"model": "tiny-sd"}, resume=True, **kw)
    assert pipeline_fingerprint(pipe)["scheduler"] == "EulerDiscreteScheduler"

    pipe = fastfair.load_pipeline("tiny-sd")
    akw = dict(pipeline=pipe, attributes="gender", classifier="none", seeds=1, steps=2, progress=False,
               report=False, out=tmp_path / "a")
    fastfair.audit("tiny-sd", "list:doctor", **akw)
    with torch.no_grad():  # an edit in place (as a MIST edit of to_k): same name, other weights
        pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.mul_(1.01)
    with pytest.raises(RunDirError, match="model_state"):
        fastfair.audit("tiny-sd", "list:doctor", resume=True, **akw)
