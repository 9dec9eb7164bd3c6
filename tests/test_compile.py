"""generate with a torch.compile'd UNet: fastfair's processors trace without graph breaks (the point of
compiling on a GPU is one graph per UNet call, without Python between layers) and give the eager maps."""
import torch

import fastfair
from fastfair import pipelines

PROMPT = "a photo of the face of a doctor"


def test_compiled_unet_no_graph_breaks_same_maps():
    from torch._dynamo.utils import counters

    pipe = pipelines.load_pipeline("tiny-sd", device="cpu")
    kw = dict(seeds=[0, 1], steps=2, maps=["doctor", "face"], progress=False)
    eager = fastfair.generate(pipe, PROMPT, **kw)
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    try:
        comp = fastfair.generate(pipe, PROMPT, **kw)
    finally:
        pipe.unet = pipe.unet._orig_mod
        torch._dynamo.reset()
    breaks = dict(counters["graph_break"])
    assert not breaks, list(breaks)[:1]
    assert counters["stats"]["unique_graphs"] <= 2  # the UNet call (and at most one recompile)
    for w in ("doctor", "face"):
        torch.testing.assert_close(comp.maps[w], eager.maps[w], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(comp.latents, eager.latents, rtol=1e-4, atol=1e-5)


def test_compiled_unet_guided_sampling():
    """Entanglement guidance (gradient of SoftIoU through the maps into the latents) through a compiled UNet:
    the custom op's registered autograd formula is traced too; no graph breaks, eager latents."""
    from torch._dynamo.utils import counters

    pipe = pipelines.load_pipeline("tiny-sd", device="cpu")
    kw = dict(seeds=[0, 1], steps=2, guidance=fastfair.EntanglementGuidance("doctor", "face"), progress=False)
    eager = fastfair.generate(pipe, PROMPT, **kw)
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    try:
        comp = fastfair.generate(pipe, PROMPT, **kw)
    finally:
        pipe.unet = pipe.unet._orig_mod
        torch._dynamo.reset()
    assert not dict(counters["graph_break"])
    assert not torch.equal(eager.latents, fastfair.generate(pipe, PROMPT, seeds=[0, 1], steps=2, progress=False).latents)
    torch.testing.assert_close(comp.latents, eager.latents, rtol=1e-4, atol=1e-5)
