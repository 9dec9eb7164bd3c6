"""The engine on tiny pipelines: patching, maps against an independent recorder, determinism, errors."""
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastfair
from fastfair.generation import NonFiniteError
from fastfair.processors import FastFairCrossAttnProcessor, PatchError

PROMPT = "a photo of the face of a doctor"


def pil_float(img):
    return np.asarray(img, dtype=np.float32) / 255.0


class RecordingProcessor:
    """Independent reference: diffusers' explicit baddbmm+softmax attention, keeping the probabilities."""

    def __init__(self, name, store):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (batch*heads, Nq, Nk)
        self.store.append((self.name, probs.reshape(batch, attn.heads, *probs.shape[1:]).detach().double()))
        h = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](h))


def reference_maps(pipe, prompt, seed, steps, positions, blocks=("down", "mid", "up")):
    """Mean over heads, layers and steps of cond-branch probabilities, bilinearly upsampled."""
    store = []
    mods = fastfair.processors.cross_attention_modules(pipe.unet)
    saved = {n: m.processor for n, m in mods.items()}
    for n, m in mods.items():
        m.set_processor(RecordingProcessor(n, store))
    try:
        pipe(prompt, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
    finally:
        for n, m in mods.items():
            m.set_processor(saved[n])
    H = W = pipe.unet.config.sample_size
    total, count = 0, 0
    for name, p in store:
        if name.split("_")[0] not in blocks:
            continue
        cond = p[p.shape[0] // 2:]  # CFG batch is [uncond, cond]
        heads, nq = cond.shape[1], cond.shape[2]
        s = int(round((H * W / nq) ** 0.5))
        m = cond[..., list(positions)].mean(-1).sum(1).reshape(-1, 1, H // s, W // s)
        total = total + F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        count += heads
    return total / count


def test_no_maps_equals_plain_pipeline(tiny_sd):
    ref = tiny_sd(PROMPT, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(7), output_type="np").images
    fastfair.patch(tiny_sd)
    try:
        patched = tiny_sd(PROMPT, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(7),
                          output_type="np").images
    finally:
        fastfair.unpatch(tiny_sd)
    assert np.abs(patched - ref).max() <= 1e-5
    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[7], steps=3, progress=False)
    assert np.abs(pil_float(gen.images[0]) - ref[0]).max() <= 1.0 / 255 + 1e-6  # PIL rounding only
    gen_none = fastfair.generate(tiny_sd, PROMPT, seeds=[7], steps=3, maps=None, progress=False)  # None = no maps
    assert torch.equal(gen_none.latents, gen.latents) and not gen_none.maps


def test_maps_match_independent_recorder_and_images_unchanged(tiny_sd):
    ref_img = tiny_sd(PROMPT, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(1),
                      output_type="np").images
    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[1], steps=3, maps=["doctor", "face"], progress=False)
    assert np.abs(pil_float(gen.images[0]) - ref_img[0]).max() <= 1.0 / 255 + 1e-4
    for word, pos in (("doctor", (8,)), ("face", (5,))):
        expect = reference_maps(tiny_sd, PROMPT, 1, 3, pos)
        torch.testing.assert_close(gen.maps[word].double(), expect, rtol=1e-4, atol=1e-6)
    assert gen.maps["doctor"].dtype == torch.float32


def test_maps_after_a_multi_vector_textual_inversion_token():
    """A token loaded with k vectors (DFT's soft tokens: k = 4) is k tokens in the encoded prompt (diffusers'
    maybe_convert_prompt): the words after it sit k - 1 positions further on. The maps must read those positions
    (before, they were read 3 positions too early: a silent wrong map), and the token itself maps to its k positions."""
    pipe = fastfair.load_pipeline("tiny-sd")
    w = pipe.text_encoder.get_input_embeddings().weight
    pipe.load_textual_inversion({"<ff>": torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(0))},
                                token="<ff>")
    prompt = "<ff> " + PROMPT
    assert pipe.maybe_convert_prompt(prompt, pipe.tokenizer).startswith("<ff> <ff>_1 <ff>_2 <ff>_3 a photo")
    gen = fastfair.generate(pipe, prompt, seeds=[1], steps=2, maps=["doctor", "<ff>"], progress=False)
    torch.testing.assert_close(gen.maps["doctor"].double(), reference_maps(pipe, prompt, 1, 2, (8 + 4,)),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gen.maps["<ff>"].double(), reference_maps(pipe, prompt, 1, 2, (1, 2, 3, 4)),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("in_prompt", [False, True])
def test_biasmap_preset_uses_attribution_prompt_tokens_and_uncond_branch(tiny_sd, in_prompt):
    """BiasMap's maps: the unconditional half's queries against the attribution prompt's keys -- for words of the
    prompt itself, the prompt's own keys (the unconditional half's own keys are the negative prompt's: those maps
    were the same for every word at a position, a silent wrong answer)."""
    attr = PROMPT if in_prompt else "a photo of the face of a doctor and gender"
    word = "doctor" if in_prompt else "gender"
    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[2], steps=2, maps=[word],
                            attribution_prompt=None if in_prompt else attr, aggregation="biasmap", progress=False)
    # independent: queries of the uncond branch against the attribution prompt's keys (no padding), summed
    n = len(tiny_sd.tokenizer.tokenize(attr)) + 2
    emb = tiny_sd.encode_prompt(attr, "cpu", 1, False)[0][:, :n]
    qs = []
    mods = fastfair.processors.cross_attention_modules(tiny_sd.unet)

    def hook(name):
        def f(mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            qs.append((name, mod, hs[:1].detach()))
        return f

    handles = [m.register_forward_pre_hook(hook(nm), with_kwargs=True) for nm, m in mods.items()]
    try:
        tiny_sd(PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(2), output_type="latent")
    finally:
        for h in handles:
            h.remove()
    H = tiny_sd.unet.config.sample_size
    total = 0
    pos = n - 2  # the word is the last one
    for name, mod, hs in qs:
        if name.startswith("mid"):
            continue
        q = mod.head_to_batch_dim(mod.to_q(hs)).double()
        k = mod.head_to_batch_dim(mod.to_k(emb)).double()
        p = torch.softmax(q @ k.transpose(1, 2) * mod.scale, -1)[..., pos].sum(0)
        s = int(round((H * H / p.numel()) ** 0.5))
        total = total + F.interpolate(p.reshape(1, 1, H // s, H // s), size=(H, H), mode="bilinear",
                                      align_corners=False)[0, 0]
    torch.testing.assert_close(gen.maps[word][0].double(), total, rtol=1e-4, atol=1e-5)


def test_seed_determinism_across_batch_sizes(tiny_sd):
    a = fastfair.generate(tiny_sd, [PROMPT, "a photo of a nurse"], seeds=[0, 1, 2], steps=2, maps=["a"],
                          batch_size=1, progress=False)
    b = fastfair.generate(tiny_sd, [PROMPT, "a photo of a nurse"], seeds=[0, 1, 2], steps=2, maps=["a"],
                          batch_size=4, progress=False)
    assert a.seeds == b.seeds == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.maps["a"], b.maps["a"], rtol=1e-4, atol=1e-6)


def test_seed_equals_diffusers_generator_convention(tiny_sd):
    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[11], steps=2, progress=False)
    out = tiny_sd(PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(11), output_type="latent")
    torch.testing.assert_close(gen.latents, out.images, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["EulerAncestralDiscreteScheduler", "DDPMScheduler"])
def test_stochastic_scheduler_seeds_fix_the_images(scheduler):
    """Schedulers that draw noise every step: each image's step noise comes from its own seed's generator (it
    came from torch's global state: other images every run, and per batch composition)."""
    import diffusers

    pipe = fastfair.load_pipeline("tiny-sd")
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    kw = dict(steps=3, maps=["doctor"], progress=False)
    both = fastfair.generate(pipe, PROMPT, seeds=[0, 1], batch_size=2, **kw)
    torch.manual_seed(123)  # the global state must not matter
    one = fastfair.generate(pipe, PROMPT, seeds=[1], batch_size=1, **kw)
    ref = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(1), output_type="latent")
    # fastfair's attention vs diffusers' SDPA rounds differently (1e-6), which ancestral steps carry to ~3e-5;
    # a step's noise from another generator moves latents by ~1
    torch.testing.assert_close(one.latents, ref.images, rtol=0, atol=2e-4)
    torch.testing.assert_close(both.latents[1:], ref.images, rtol=0, atol=2e-4)
    torch.testing.assert_close(both.maps["doctor"][1:], one.maps["doctor"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("hook", ["guidance", "edit_guidance"])
def test_stochastic_scheduler_seeds_fix_guided_images(hook):
    """Entanglement guidance and SEGA wrap scheduler.step: the wrapper must keep its generator parameter, or the
    pipeline passes no generator and the step noise comes from torch's global state again."""
    import diffusers

    pipe = fastfair.load_pipeline("tiny-sd")
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    extra = ({"guidance": fastfair.EntanglementGuidance("doctor", "face", gamma=0.1)} if hook == "guidance"
             else {"edit_guidance": fastfair.SemanticGuidance(["a woman"], warmup=0)})
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(fastfair.generate(pipe, PROMPT, seeds=[3], steps=3, maps=["doctor"], progress=False, **extra))
    assert torch.equal(runs[0].latents, runs[1].latents)


def test_negative_prompt_per_prompt(tiny_sd):
    """A list of negative prompts is one per prompt (it was passed whole to every image: a text pair)."""
    prompts, negs = [PROMPT, "a photo of a nurse"], ["blurry", "dark"]
    gen = fastfair.generate(tiny_sd, prompts, seeds=[0], steps=2, negative_prompt=negs, progress=False)
    for i in range(2):
        ref = tiny_sd(prompts[i], negative_prompt=negs[i], num_inference_steps=2,
                      generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
        torch.testing.assert_close(gen.latents[i:i + 1], ref.images, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one string per prompt"):
        fastfair.generate(tiny_sd, prompts, seeds=[0], steps=2, negative_prompt=["blurry"], progress=False)
    with pytest.raises(ValueError, match="77"):
        fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=2, negative_prompt="word " * 90, progress=False)


def test_unpatch_restores_exact_processors_including_custom(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor

    mods = fastfair.processors.cross_attention_modules(tiny_sd.unet)
    first = next(iter(mods))
    before = {n: m.processor for n, m in mods.items()}
    self_before = {n: m.processor for n, m in tiny_sd.unet.named_modules() if n.endswith("attn1")}
    fastfair.patch(tiny_sd)
    assert all(isinstance(m.processor, FastFairCrossAttnProcessor) for m in mods.values())
    assert all(m.processor is self_before[n] for n, m in tiny_sd.unet.named_modules() if n.endswith("attn1"))
    fastfair.unpatch(tiny_sd)
    assert all(m.processor is before[n] for n, m in mods.items())
    # a user's custom processor: refused, or replaced with force=True and restored exactly
    custom = RecordingProcessor(first, [])
    mods[first].set_processor(custom)
    try:
        with pytest.raises(PatchError, match="custom processor"):
            fastfair.patch(tiny_sd)
        fastfair.patch(tiny_sd, force=True)
        fastfair.unpatch(tiny_sd)
        assert mods[first].processor is custom
    finally:
        mods[first].set_processor(before[first] if not isinstance(before[first], AttnProcessor) else AttnProcessor())


def test_pipeline_without_cross_attention():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                mid_block_type=None, cross_attention_dim=8, norm_num_groups=8)
    with pytest.raises(PatchError, match="no cross-attention"):
        fastfair.patch(types.SimpleNamespace(unet=unet))
    with pytest.raises(PatchError, match="no UNet"):
        fastfair.patch(types.SimpleNamespace())


def test_word_not_in_prompt_and_long_prompt(tiny_sd):
    with pytest.raises(ValueError, match="not in the prompt"):
        fastfair.generate(tiny_sd, PROMPT, seeds=[0], maps=["nurse"], progress=False)
    with pytest.raises(ValueError, match="limit of 77"):
        fastfair.generate(tiny_sd, "doctor " * 100, seeds=[0], progress=False)
    with pytest.raises(ValueError, match="seed"):
        fastfair.generate(tiny_sd, PROMPT, seeds=[], progress=False)


def test_non_finite_latents_raise(tiny_sd):
    w = tiny_sd.unet.conv_out.bias
    saved = w.detach().clone()
    with torch.no_grad():
        w.fill_(float("nan"))
    try:
        with pytest.raises(NonFiniteError, match="non-finite at step 0"):
            fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=2, maps=["doctor"], progress=False)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert not fastfair.processors.is_patched(tiny_sd)  # cleaned up after the error


def test_sdxl_generate_with_maps(tiny_sdxl):
    gen = fastfair.generate(tiny_sdxl, "a photo of an African-American janitor", seeds=[0, 1], steps=2,
                            maps=["african-american", "janitor"], progress=False)
    assert gen.maps["janitor"].shape == (2, 16, 16)
    assert torch.isfinite(gen.maps["janitor"]).all() and (gen.maps["janitor"] > 0).all()
    iou = gen.iou("african-american", "janitor")
    assert iou.shape == (2,) and ((iou >= 0) & (iou <= 1)).all()


def test_save_and_reload(tiny_sd, tmp_path):
    from safetensors.torch import load_file

    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[0, 1], steps=2, maps=["doctor", "face"], progress=False)
    out = gen.save(tmp_path / "run")
    maps = load_file(out / "maps.safetensors")
    torch.testing.assert_close(maps["doctor"], gen.maps["doctor"])
    assert len(list((out / "images").glob("*.png"))) == 2
    assert len(list((out / "overlays").glob("*.png"))) == 4
    assert not list(out.rglob(".*"))  # no temporary files left behind


def test_from_pretrained_of_a_saved_tiny_pipeline(tiny_sd, tmp_path):
    tiny_sd.save_pretrained(tmp_path / "saved")
    pipe = fastfair.load_pipeline(str(tmp_path / "saved"))
    a = fastfair.generate(pipe, PROMPT, seeds=[3], steps=2, progress=False)
    b = fastfair.generate(tiny_sd, PROMPT, seeds=[3], steps=2, progress=False)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="offline presets"):
        fastfair.load_pipeline(str(tmp_path / "does-not-exist"))


def test_cli_generate(tmp_path, capsys):
    from fastfair.cli import main

    rc = main(["generate", "--model", "tiny-sd", "--prompt", PROMPT, "--maps", "doctor,face", "--seeds", "0-1",
               "--steps", "2", "--out", str(tmp_path / "cli"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "IoU(doctor,face)" in out and len((tmp_path / "cli" / "images").glob("*.png").__iter__().__next__().name) > 0
    assert main(["generate", "--prompt", "a doctor", "--maps", "nurse", "--out", str(tmp_path / "bad")]) == 1
    assert "not in the prompt" in capsys.readouterr().err


def test_sd15_shaped_topology():
    """SD1.5's cross-attention layout: 16 layers at 4096x5, 1024x5, 256x5, 64x1 queries, 8 heads, VAE scale 8."""
    from collections import Counter

    pipe = fastfair.load_pipeline("sd15-shaped")
    mods = fastfair.processors.cross_attention_modules(pipe.unet)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
                                         with_kwargs=True) for m in mods.values()]
    try:
        with torch.no_grad():
            pipe.unet(torch.randn(1, 4, 64, 64), 10, encoder_hidden_states=torch.randn(1, 77, 64))
    finally:
        for h in hooks:
            h.remove()
    assert Counter(seen) == {4096: 5, 1024: 5, 256: 5, 64: 1}
    assert {m.heads for m in mods.values()} == {8}
    assert pipe.vae_scale_factor == 8


def test_cli_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fastfair.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout
