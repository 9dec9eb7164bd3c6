"""generate with a torch.compile'd UNet: fastfair's processors trace without graph breaks (the point of
compiling on a GPU is one graph per UNet call, without Python between layers) and give the eager results."""
import pytest
import torch

import fastfair
from fastfair import pipelines

PROMPT = "a photo of the face of a doctor"


def _eager_and_compiled(**kw):
    """(eager result, compiled-UNet result, dynamo's graph-break counts, graphs compiled) on tiny-sd."""
    from torch._dynamo.utils import counters

    pipe = pipelines.load_pipeline("tiny-sd", device="cpu")
    eager = fastfair.generate(pipe, PROMPT, progress=False, **kw)
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    try:
        comp = fastfair.generate(pipe, PROMPT, progress=False, **kw)
    finally:
        pipe.unet = pipe.unet._orig_mod
        torch._dynamo.reset()
    return pipe, eager, comp, dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


def test_compiled_unet_no_graph_breaks_same_maps():
    _, eager, comp, breaks, graphs = _eager_and_compiled(seeds=[0, 1], steps=2, maps=["doctor", "face"])
    assert not breaks, list(breaks)[:1]
    assert graphs <= 2  # the UNet call (and at most one recompile)
    for w in ("doctor", "face"):
        torch.testing.assert_close(comp.maps[w], eager.maps[w], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(comp.latents, eager.latents, rtol=1e-4, atol=1e-5)


def test_compiled_unet_guided_sampling():
    """Entanglement guidance (gradient of SoftIoU through the maps into the latents) through a compiled UNet:
    the custom op's registered autograd formula is traced too; no graph breaks, eager latents."""
    pipe, eager, comp, breaks, _ = _eager_and_compiled(
        seeds=[0, 1], steps=2, guidance=fastfair.EntanglementGuidance("doctor", "face"))
    assert not breaks, list(breaks)[:1]
    plain = fastfair.generate(pipe, PROMPT, seeds=[0, 1], steps=2, progress=False)
    assert not torch.equal(eager.latents, plain.latents)  # the guidance did act
    torch.testing.assert_close(comp.latents, eager.latents, rtol=1e-4, atol=1e-5)


def test_compiled_unet_further_attribution_prompts():
    """attributions= (maps-only calls beside the fused op) inside a compiled UNet: no graph breaks, eager maps."""
    attr = {w: (f"{PROMPT} and {w}", ["doctor", w]) for w in ("gender", "race")}
    _, eager, comp, breaks, graphs = _eager_and_compiled(seeds=[0, 1], steps=2, maps=["face"], attributions=attr)
    assert not breaks, list(breaks)[:1]
    assert graphs <= 2
    for name, (_, words) in attr.items():
        for w in words:
            torch.testing.assert_close(comp.attribution_maps[name][w], eager.attribution_maps[name][w],
                                       rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(comp.maps["face"], eager.maps["face"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_compiled_mmdit_transformer_maps_and_attribution_text_streams(model):
    """A torch.compile'd SD3 / Flux transformer with fastfair's processors and the attribution text-stream hooks
    (fastfair.shadow): no graph breaks, the eager maps, for in-prompt and open-vocabulary maps. (Flux's
    single-stream blocks under the compiled wrapper's "_orig_mod." names were recorded as no block at all.)"""
    from torch._dynamo.utils import counters

    pipe = pipelines.load_pipeline(model, device="cpu")
    size = dict(height=128, width=128) if model == "tiny-flux" else {}
    for kw in (dict(maps=["doctor", "face"]), dict(maps=["doctor", "woman"], attribution_prompt=PROMPT + " and a woman")):
        kw.update(size)
        eager = fastfair.generate(pipe, PROMPT, seeds=[0, 1], steps=2, progress=False, **kw)
        torch._dynamo.reset()
        counters.clear()
        pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
        try:
            comp = fastfair.generate(pipe, PROMPT, seeds=[0, 1], steps=2, progress=False, **kw)
        finally:
            pipe.transformer = pipe.transformer._orig_mod
            torch._dynamo.reset()
        assert not dict(counters["graph_break"]), list(counters["graph_break"])[:1]
        assert counters["stats"]["unique_graphs"] >= 1  # it was compiled
        for w in kw["maps"]:
            torch.testing.assert_close(comp.maps[w], eager.maps[w], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(comp.latents, eager.latents, rtol=1e-4, atol=1e-5)
