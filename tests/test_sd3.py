"""SD3 (MMDiT joint attention): word maps from the joint softmax over image and text tokens.

The reference here is independent of fastfair's ops: a processor that writes out every attention
probability in float64 (softmax over [image tokens; text tokens]) and records the image rows' text
columns, aggregated by hand as the "fastfair" preset says (mean over heads, layers and steps).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastfair
from fastfair import concepts
from fastfair.guidance import EntanglementGuidance
from fastfair.processors import joint_attention_modules

PROMPT = "a photo of the face of a doctor"


@pytest.fixture(scope="module")
def sd3(_fastfair_cache):
    return fastfair.load_pipeline("tiny-sd3")


@pytest.fixture(scope="module")
def sd35(sd3):
    """SD3.5's transformer features on the tiny model: RMS q/k norms and a dual-attention block (an extra
    image-only self-attention, which is not patched)."""
    from diffusers import SD3Transformer2DModel

    pipe = copy.deepcopy(sd3)
    torch.manual_seed(7)
    cfg = dict(sd3.transformer.config)
    cfg.update(qk_norm="rms_norm", dual_attention_layers=(0,))
    tr = SD3Transformer2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    for n, prm in tr.named_parameters():  # RMS norm weights start at 1: move them so that they matter
        if "norm_" in n and n.endswith("weight"):
            prm.data.uniform_(0.5, 1.5)
    pipe.transformer = tr
    return pipe


@pytest.fixture(scope="module")
def sd3_no_t5(sd3):
    """SD3 run without its T5 encoder (diffusers then feeds zeros for T5's 256 tokens): CLIP positions only."""
    pipe = copy.copy(sd3)
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    return pipe


def test_preset_is_sd3_with_a_t5(sd3):
    assert type(sd3).__name__ == "StableDiffusion3Pipeline"
    assert sd3.text_encoder_3 is not None and sd3.transformer.config.in_channels == 16
    assert sd3.tokenizer_3.tokenize("a photo of a janitor") == ["\u2581a", "\u2581photo", "\u2581of", "\u2581a",
                                                                "\u2581janitor"]
    assert len(joint_attention_modules(sd3.transformer)) == 2


def test_word_positions_clip_and_t5(sd3, sd3_no_t5):
    # CLIP: BOS + tokens (jan + itor); T5 after the 77 CLIP positions, no BOS
    assert concepts.resolve(sd3, "a photo of a janitor", "janitor").positions == (5, 6, 77 + 4)
    assert concepts.resolve(sd3_no_t5, "a photo of a janitor", "janitor").positions == (5, 6)
    with pytest.raises(concepts.ConceptError, match="more than the 256"):
        concepts.resolve(sd3, "doctor " + "photographs " * 40, "doctor")  # 41 CLIP tokens, 281 T5 pieces


def test_no_maps_is_the_plain_pipeline(sd3):
    import numpy as np

    gen = fastfair.generate(sd3, PROMPT, seeds=[0], steps=3, progress=False)
    out = sd3(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(np.asarray(gen.images[0]), np.asarray(out.images[0]))
    assert gen.config["guidance_scale"] == 7.0   # the pipeline's own default
    gen = fastfair.generate(sd3, PROMPT, seeds=[0], steps=3, guidance_scale=7.5, progress=False)
    out = sd3(PROMPT, guidance_scale=7.5, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(np.asarray(gen.images[0]), np.asarray(out.images[0]))


class _ExplicitJoint:
    """Joint attention with the probabilities written out (float64); records P[cond rows, :, img, n_img + pos]."""

    def __init__(self, store, positions, cond_rows_only=True):
        self.store, self.positions, self.cond_rows_only = store, positions, cond_rows_only

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        B, n_img = hidden_states.shape[:2]
        H = attn.heads
        hd = attn.to_k.out_features // H

        def split(x):
            return x.view(B, -1, H, hd).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        cq, ck = split(attn.add_q_proj(encoder_hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        norms = (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)
        q, k, cq, ck = [x if f is None else f(x) for f, x in zip(norms, (q, k, cq, ck))]
        Q, K, V = torch.cat([q, cq], 2).double(), torch.cat([k, ck], 2).double(), torch.cat([v, cv], 2).double()
        P = torch.softmax(Q @ K.transpose(-1, -2) * attn.scale, dim=-1)
        half = B // 2 if self.cond_rows_only else 0  # CFG batch [uncond, cond]
        self.store.append({w: P[half:, :, :n_img][..., [n_img + p for p in pos]].sum(1) for w, pos in
                           self.positions.items()})  # (N, n_img, T_w), summed over heads
        out = (P @ V).to(q.dtype).transpose(1, 2).reshape(B, -1, H * hd)
        img, txt = out[:, :n_img], out[:, n_img:]
        img = attn.to_out[1](attn.to_out[0](img))
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


@pytest.mark.parametrize("model,backend", [("sd3", "reference"), ("sd3", "native"), ("sd35", "reference"),
                                           ("sd3_no_t5", "reference")])
def test_maps_equal_explicit_joint_softmax(request, model, backend):
    if backend == "native" and "native" not in fastfair.ops.available_backends("cpu"):
        pytest.skip("native extension not built")
    sd3 = request.getfixturevalue(model)
    words = ["doctor", "face"]
    gen = fastfair.generate(sd3, PROMPT, seeds=[0, 1], steps=3, maps=words, progress=False, backend=backend,
                            batch_size=2)
    pipe = copy.deepcopy(sd3)
    positions = {w: concepts.resolve(pipe, PROMPT, w).positions for w in words}
    t5 = pipe.text_encoder_3 is not None
    assert positions == ({"doctor": (8, 84), "face": (5, 81)} if t5 else {"doctor": (8,), "face": (5,)})
    store = []
    mods = joint_attention_modules(pipe.transformer)
    for m in mods.values():
        m.set_processor(_ExplicitJoint(store, positions))
    from diffusers.utils.torch_utils import randn_tensor

    lat = torch.cat([randn_tensor((1, 16, 16, 16), generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    out = pipe([PROMPT] * 2, latents=lat, num_inference_steps=3, output_type="pt")
    assert len(store) == 3 * len(mods)  # every layer of every step
    n_terms = len(store) * pipe.transformer.config.num_attention_heads
    for w in words:
        acc = sum(rec[w].mean(-1) for rec in store) / n_terms  # (N, n_img): mean over heads, layers, steps
        ref = F.interpolate(acc.reshape(2, 1, 8, 8).float(), size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(gen.maps[w], ref, rtol=2e-4, atol=1e-7)
    import numpy as np

    # the same images (explicit float64 softmax against fastfair's op and SDPA): at most a step of 1/255
    got = torch.from_numpy(np.stack([np.asarray(im) for im in gen.images])).permute(0, 3, 1, 2).float() / 255
    assert float((got - out.images.float()).abs().max()) <= 1 / 255 + 1e-6
    if model == "sd35":
        assert len(mods) == 2 and any(getattr(b, "attn2", None) is not None for b in pipe.transformer.transformer_blocks)


def test_patched_output_matches_plain_and_unpatch(sd3):
    from fastfair.processors import is_patched

    before = {n: m.processor for n, m in joint_attention_modules(sd3.transformer).items()}
    plain = fastfair.generate(sd3, PROMPT, seeds=[3], steps=3, progress=False)
    mapped = fastfair.generate(sd3, PROMPT, seeds=[3], steps=3, maps=["doctor"], progress=False, backend="reference")
    torch.testing.assert_close(mapped.latents, plain.latents, rtol=1e-4, atol=5e-5)
    assert not is_patched(sd3)
    assert {n: m.processor for n, m in joint_attention_modules(sd3.transformer).items()} == before


@pytest.fixture(scope="module")
def sd3_64(sd3):
    pipe = copy.deepcopy(sd3).to(torch.float64)
    fastfair.patch(pipe, backend="reference")
    return pipe


def _sd3_guider(pipe, n):
    from fastfair.generation import _token_layout
    from fastfair.guidance import Guider

    g = EntanglementGuidance("doctor", "face", gamma=0.1)
    tok, w = _token_layout(pipe, [PROMPT], g.words)
    pipe.scheduler.set_timesteps(6)
    t = pipe.scheduler.timesteps[2]
    emb, neg, pooled, npooled = pipe.encode_prompt([PROMPT] * n, None, None, device="cpu", do_classifier_free_guidance=True)
    gd = Guider(pipe, g, tok.expand(n, -1), [(0, 1)], (16, 16), None, n)
    gd.word_weights = w.expand(n, -1, -1)
    gd.unet_call = ((), dict(encoder_hidden_states=torch.cat([neg, emb]), pooled_projections=torch.cat([npooled, pooled])))
    return gd, t.expand(2 * n)


def test_guidance_gradient_matches_central_finite_differences(sd3_64):
    """dE/dx_t through SD3's joint attention (fastfair's op for the image rows, SDPA for the text rows)."""
    gd, t = _sd3_guider(sd3_64, 1)
    from tiny_models import check_gradient_fd

    check_gradient_fd(gd, torch.randn(1, 16, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), t)


def test_guided_sd3_ends_less_entangled(sd3):
    """Flow matching: v += scale sigma / (1 - sigma) g (BiasMap's eps += scale sigma g, as eps = x_t + (1 - sigma) v);
    the first step (sigma = 1, pure noise) is not guided."""
    seeds = list(range(6))
    kw = dict(seeds=seeds, steps=6, maps=["doctor", "face"], progress=False)
    base = fastfair.generate(sd3, PROMPT, **kw)
    guided = fastfair.generate(sd3, PROMPT, **kw, guidance=EntanglementGuidance("doctor", "face", scale=100.0))
    b, g = base.soft_iou("doctor", "face").mean().item(), guided.soft_iou("doctor", "face").mean().item()
    assert g < b, (g, b)
    d = guided.diagnostics
    assert not d["applied"][0].any() and d["applied"][1:].any()
    assert d["energy"][-1].mean() < d["energy"][0].mean()


def test_clear_errors(sd3):
    with pytest.raises(ValueError, match="reads UNet blocks"):
        fastfair.generate(sd3, PROMPT, seeds=[0], steps=1, progress=False, maps=["doctor"], aggregation="daam")
    with pytest.raises(ValueError, match="not in the prompt"):
        fastfair.generate(sd3, PROMPT, seeds=[0], steps=1, progress=False, maps=["nurse"])


def test_clip_and_t5_draw_word_boundaries_alike(sd3):
    """CLIP's pre-tokenizer splits words at digits and '_' ("doctor2" holds "doctor"), T5's side required a
    non-word character: the same prompt resolved on SDXL and was refused on SD3 (a review). Letters' boundaries on
    both sides now; a longer word is still refused."""
    from fastfair import concepts

    for prompt in ("a photo of a doctor2", "a photo of a doctor_nurse"):
        c = concepts.resolve(sd3, prompt, "doctor")
        assert len([p for p in c.positions if p < 77]) == 1 and len([p for p in c.positions if p >= 77]) == 1
    with pytest.raises(concepts.ConceptError):
        concepts.resolve(sd3, "a photo of two doctors", "doctor")
