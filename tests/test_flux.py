"""Flux (double- and single-stream blocks, RoPE, text tokens first, T5 only, packed latents): word maps from
the attention of the image tokens to the prompt's T5 tokens.

The reference is independent of fastfair's ops: a processor that writes out every probability in float64
with diffusers' own RoPE and projections, aggregated by hand as the "fastfair" preset says.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastfair
from fastfair import concepts
from fastfair.guidance import EntanglementGuidance
from fastfair.processors import joint_attention_modules

PROMPT = "a photo of the face of a doctor"
SIZE = dict(height=128, width=128)  # 16x16 latent, 8x8 = 64 image tokens


@pytest.fixture(scope="module")
def flux(_fastfair_cache):
    return fastfair.load_pipeline("tiny-flux")


def test_preset_and_positions(flux):
    assert type(flux).__name__ == "FluxPipeline"
    mods = joint_attention_modules(flux.transformer)
    assert sorted(mods) == ["single_transformer_blocks.0.attn", "transformer_blocks.0.attn"]
    # T5 tokens only, no BOS: "a photo of the face of a doctor" -> doctor is token 7
    assert concepts.resolve(flux, PROMPT, "doctor").positions == (7,)
    with pytest.raises(concepts.ConceptError, match="not in the prompt"):
        concepts.resolve(flux, PROMPT, "nurse")
    long = "doctor " + "photographs " * 80  # 561 T5 pieces do not fit 512 (CLIP only gives the pooled embedding)
    with pytest.raises(concepts.ConceptError, match="more than the 512"):
        fastfair.generate(flux, long, seeds=[0], steps=1, progress=False, **SIZE)


def test_no_maps_is_the_plain_pipeline(flux):
    gen = fastfair.generate(flux, PROMPT, seeds=[0], steps=3, progress=False, **SIZE)
    out = flux(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), **SIZE)
    np.testing.assert_array_equal(np.asarray(gen.images[0]), np.asarray(out.images[0]))
    assert gen.config["guidance_scale"] == 3.5   # the pipeline's own default (its distilled guidance embedding)
    assert gen.latents.shape == (1, 16, 16, 16)


class _ExplicitFlux:
    def __init__(self, store, positions, n_text):
        self.store, self.positions, self.n_text = store, positions, n_text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        Q, K, V = (x.transpose(1, 2).double() for x in (q, k, v))
        P = torch.softmax(Q @ K.transpose(-1, -2) * attn.head_dim ** -0.5, dim=-1)
        nt = self.n_text
        self.store.append({w: P[:, :, nt:][..., list(pos)].sum(1) for w, pos in self.positions.items()})
        out = (P @ V).to(q.dtype).transpose(1, 2).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        img = attn.to_out[1](attn.to_out[0](out[:, nt:].contiguous()))
        return img, attn.to_add_out(out[:, :nt].contiguous())


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_maps_equal_explicit_softmax(flux, backend):
    import copy

    if backend == "native" and "native" not in fastfair.ops.available_backends("cpu"):
        pytest.skip("native extension not built")
    words = ["doctor", "face"]
    gen = fastfair.generate(flux, PROMPT, seeds=[0, 1], steps=3, maps=words, progress=False, backend=backend,
                            batch_size=2, **SIZE)
    pipe = copy.deepcopy(flux)
    positions = {w: concepts.resolve(pipe, PROMPT, w).positions for w in words}
    assert positions == {"doctor": (7,), "face": (4,)}
    store = []
    mods = joint_attention_modules(pipe.transformer)
    for m in mods.values():
        m.set_processor(_ExplicitFlux(store, positions, 512))
    from diffusers.utils.torch_utils import randn_tensor

    lat = torch.cat([pipe._pack_latents(randn_tensor((1, 16, 16, 16), generator=torch.Generator().manual_seed(s)),
                                        1, 16, 16, 16) for s in (0, 1)])
    out = pipe([PROMPT] * 2, latents=lat, num_inference_steps=3, output_type="pt", **SIZE)
    assert len(store) == 3 * len(mods)  # both blocks, every step
    n_terms = len(store) * pipe.transformer.config.num_attention_heads
    for w in words:
        acc = sum(rec[w].mean(-1) for rec in store) / n_terms  # (N, 64): mean over heads, blocks, steps
        ref = F.interpolate(acc.reshape(2, 1, 8, 8).float(), size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(gen.maps[w], ref, rtol=2e-4, atol=1e-8)
    got = torch.from_numpy(np.stack([np.asarray(im) for im in gen.images])).permute(0, 3, 1, 2).float() / 255
    assert float((got - out.images.float()).abs().max()) <= 1 / 255 + 1e-6


@pytest.mark.parametrize("block", ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"])
def test_processor_gradients_equal_diffusers_and_explicit(flux, block):
    """The gradient guidance needs, per block: d(output) as diffusers' own processor gives it, and d(maps) as
    an explicit float64 softmax over the same rotated q, k gives it (Flux's RoPE runs in float32, so a finite
    difference test in float64 would only see its rounding)."""
    import copy

    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    from fastfair.maps import Aggregation, MapRecorder

    pipe = copy.deepcopy(flux).to(torch.float64)
    fastfair.patch(pipe, backend="reference")
    attn = joint_attention_modules(pipe.transformer)[block]
    ours, theirs = attn.processor, FluxAttnProcessor()
    nt, ni, double = 5, 16, block.startswith("transformer")
    ids = torch.cat([torch.zeros(nt, 3, dtype=torch.float64),
                     pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float64)])
    rope = pipe.transformer.pos_embed(ids)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, ni, 32, dtype=torch.float64, generator=g, requires_grad=True)
    e = torch.randn(1, nt, 32, dtype=torch.float64, generator=g, requires_grad=True)
    tok = torch.tensor([[1, 3]])
    w_out = torch.randn(1, nt + ni, 32, dtype=torch.float64, generator=g)
    w_map = torch.randn(1, 2, ni, dtype=torch.float64, generator=g)

    def run(proc):
        args = (x, e, None, rope) if double else (torch.cat([e, x], 1), None, None, rope)
        out = proc(attn, *args)
        return torch.cat([out[1], out[0]], 1) if double else out

    pipe._fastfair.n_text = nt
    rec = MapRecorder(tok, 1, (8, 8), Aggregation())
    pipe._fastfair.recorder = rec
    out = run(ours)
    pipe._fastfair.recorder = None
    loss = (out * w_out).sum() + (rec._acc[ni] * w_map).sum()
    got = torch.autograd.grad(loss, (x, e))

    store = []
    ref_out = run(theirs)
    run(_ExplicitFlux(store, {"a": (1,), "b": (3,)}, nt))
    ref_maps = torch.stack([store[0]["a"][..., 0], store[0]["b"][..., 0]], 1)  # (1, 2, ni), summed over heads
    want = torch.autograd.grad((ref_out * w_out).sum() + (ref_maps * w_map).sum(), (x, e))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)  # float32 RoPE rounds gradients at ~1e-7


def test_guided_flux_descends_and_ends_less_entangled(flux):
    """Guidance on Flux (keyword-called transformer, packed latents, no CFG, flow matching): a step along
    -dE/dx_t lowers E, and guided sampling lowers the mean SoftIoU."""
    import copy

    from fastfair.generation import _token_layout
    from fastfair.guidance import Guider

    pipe = copy.deepcopy(flux).to(torch.float64)
    fastfair.patch(pipe, backend="reference")
    g = EntanglementGuidance("doctor", "face", gamma=0.1)
    tok, wts = _token_layout(pipe, [PROMPT], g.words)
    pe, pooled, text_ids = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, device="cpu", num_images_per_prompt=1)
    img_ids = pipe._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float64)
    gd = Guider(pipe, g, tok, [(0, 1)], (16, 16), None, 1)
    gd.word_weights = wts
    gd.unet_call = ((), dict(encoder_hidden_states=pe, pooled_projections=pooled, txt_ids=text_ids, img_ids=img_ids,
                             guidance=torch.full([1], 3.5, dtype=torch.float64)))
    t = torch.full([1], 0.6, dtype=torch.float64)
    x = torch.randn(1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    E0, grad = gd.energy_and_grad(x, t)
    E1, _ = gd.energy_and_grad(x - 0.5 * grad / grad.norm(), t, want_grad=False)
    assert E1.item() < E0.item()
    fastfair.unpatch(pipe)

    kw = dict(seeds=list(range(4)), steps=5, maps=["doctor", "face"], progress=False, **SIZE)
    base = fastfair.generate(flux, PROMPT, **kw)
    guided = fastfair.generate(flux, PROMPT, **kw, guidance=EntanglementGuidance("doctor", "face", scale=100.0))
    assert guided.diagnostics["applied"][1:].any()
    assert guided.soft_iou("doctor", "face").mean() < base.soft_iou("doctor", "face").mean()


def test_negative_prompt_refused(flux):
    """FLUX.1's pipeline would ignore it (it acts only with true CFG, a second transformer call per step whose
    maps would count too): refused with the reason."""
    with pytest.raises(ValueError, match="guidance-distilled"):
        fastfair.generate(flux, PROMPT, seeds=[0], steps=1, progress=False, negative_prompt="blurry", **SIZE)


def test_sizes_off_the_packed_grid_are_refused_with_the_nearest(flux, tiny_sd):
    """Flux packs 2x2 latents: 136 px (a multiple of the VAE's 8, not of 16) crashed inside the packing with a
    reshape error, maps on or off (a review); now refused up front naming the sizes that work. UNets keep 8."""
    unit = flux.vae_scale_factor * 2
    bad = unit * 8 + flux.vae_scale_factor
    with pytest.raises(ValueError, match=rf"multiples of {unit} on FluxPipeline .*patch size 2.*use height "
                                         rf"{unit * 8} or {unit * 9}"):
        fastfair.generate(flux, "a photo of a doctor", seeds=[0], steps=1, height=bad, width=unit * 8, progress=False)
    vsf = tiny_sd.vae_scale_factor
    g = fastfair.generate(tiny_sd, "a photo of a doctor", seeds=[0], steps=1, height=vsf * 9, width=vsf * 8,
                          progress=False)
    assert g.latents.shape[-2:] == (9, 8)
