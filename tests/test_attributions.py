"""Several attribution prompts from one generation (``generate(..., attributions=)``) and the
maps-only op behind it (``ops.attention_maps``)."""
import copy

import pytest
import torch

import fastfair
from fastfair import ops
from fastfair.guidance import EntanglementGuidance
from fastfair.maps import Aggregation

PROMPT = "a photo of the face of a doctor"
ATTR = {w: (f"{PROMPT} and {w}", ["doctor", w]) for w in ("gender", "race", "age")}
DAAM_TINY = Aggregation.get("daam").with_factors([6, 12])  # tiny-sd is not 512 / 1024


def explicit_maps(q, mk, tok, scale, per_head):
    """float64 softmax with every probability written out, then the selected columns."""
    p = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q.double(), mk.double()) * scale, dim=-1)
    sel = torch.stack([p[b][:, :, tok[b]] for b in range(q.shape[0])]).transpose(2, 3)  # (B,H,T,Nq)
    return sel if per_head else sel.sum(1)


@pytest.mark.parametrize("B,H,Nq,Nm,D", [(1, 1, 5, 1, 8), (2, 3, 37, 9, 40), (2, 2, 130, 14, 64)])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_attention_maps_against_explicit_softmax(B, H, Nq, Nm, D, per_head, dtype):
    g = torch.Generator().manual_seed(B * 1000 + Nq)
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    mk = torch.randn(B, H, Nm, D, generator=g).to(dtype)
    tok = torch.stack([torch.randperm(Nm, generator=g)[:min(3, Nm)] for _ in range(B)])
    scale = D ** -0.5
    got = ops.attention_maps(q, mk, tok, scale=scale, head_reduce="none" if per_head else "sum")
    want = explicit_maps(q, mk, tok, scale, per_head)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5}[dtype]  # fp16 inputs, fp32 math
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 1e-2)
    # the maps the fused op gives for the same attribution keys (any k, v)
    k = torch.randn(B, H, 7, D, generator=g).to(dtype)
    _, fused = ops.cross_attention(q, k, k, map_tokens=tok, map_keys=mk, scale=scale,
                                   head_reduce="none" if per_head else "sum", backend="reference")
    torch.testing.assert_close(got, fused, rtol=0, atol=0)


@pytest.mark.parametrize("Nm", [9, 333, 1100])  # a UNet's attribution prompt; an MMDiT's [image; text] keys
@pytest.mark.parametrize("per_head", [False, True])
def test_attention_maps_fused_backend(Nm, per_head):
    """A fused backend's maps-only path (its forward over one zero key, the maps from the attribution keys) against
    float64 explicit softmax, and equal to its own fused op's maps."""
    if "native" not in ops.available_backends("cpu"):
        pytest.skip("native extension not built")
    g = torch.Generator().manual_seed(Nm)
    B, H, Nq, D = 2, 3, 70, 40
    q, mk = torch.randn(B, H, Nq, D, generator=g), torch.randn(B, H, Nm, D, generator=g)
    tok = torch.stack([torch.randperm(Nm, generator=g)[:3] for _ in range(B)])
    red = "none" if per_head else "sum"
    got = ops.attention_maps(q, mk, tok, scale=D ** -0.5, head_reduce=red, backend="native")
    torch.testing.assert_close(got.double(), explicit_maps(q, mk, tok, D ** -0.5, per_head), rtol=1e-5, atol=1e-8)
    k = torch.randn(B, H, 77, D, generator=g)
    _, fused = ops.cross_attention(q, k, k, map_tokens=tok, map_keys=mk, scale=D ** -0.5, head_reduce=red,
                                   backend="native")
    torch.testing.assert_close(got, fused, rtol=1e-6, atol=1e-9)
    # with a gradient to take, the reference (autograd) path runs
    qg = q.clone().requires_grad_(True)
    torch.testing.assert_close(ops.attention_maps(qg, mk, tok, scale=D ** -0.5, head_reduce=red, backend="native"),
                               ops.attention_maps(q, mk, tok, scale=D ** -0.5, head_reduce=red), rtol=0, atol=0)


def test_attention_maps_gradient_matches_explicit():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mk = torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    tok = torch.tensor([[1, 4], [0, 2]])
    w = torch.randn(2, 2, 11, generator=g, dtype=torch.float64)
    gq, gk = torch.autograd.grad((ops.attention_maps(q, mk, tok, scale=0.3) * w).sum(), (q, mk))
    eq, ek = torch.autograd.grad((explicit_maps(q, mk, tok, 0.3, False) * w).sum(), (q, mk))
    torch.testing.assert_close(gq, eq, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gk, ek, rtol=1e-10, atol=1e-12)


def test_attention_maps_errors():
    q, mk = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        ops.attention_maps(q, mk, [3])
    with pytest.raises(ValueError, match="map_keys must be"):
        ops.attention_maps(q, torch.randn(1, 2, 3, 4), [0])
    with pytest.raises(ValueError, match="map_tokens"):
        ops.attention_maps(q, mk, None)


@pytest.mark.parametrize("agg", ["fastfair", "biasmap", "daam"])
@pytest.mark.parametrize("with_words", [False, True])
def test_equal_to_one_generation_per_attribution_prompt(tiny_sd, agg, with_words):
    aggregation = DAAM_TINY if agg == "daam" else agg
    kw = dict(seeds=[0, 1], steps=2, progress=False, backend="reference", aggregation=aggregation, batch_size=2)
    words = ["doctor", "face"] if with_words else []
    gen = fastfair.generate(tiny_sd, PROMPT, maps=words, attributions=ATTR, **kw)
    assert list(gen.attribution_maps) == list(ATTR)
    for name, (ap, ws) in ATTR.items():
        sep = fastfair.generate(tiny_sd, PROMPT, maps=ws, attribution_prompt=ap, **kw)
        assert torch.equal(gen.latents, sep.latents)
        assert list(gen.attribution_maps[name]) == ws
        for w in ws:
            # same rows of q, same attribution keys, same formula: the same bits on the reference backend
            torch.testing.assert_close(gen.attribution_maps[name][w], sep.maps[w], rtol=0, atol=0)
    if with_words:
        plain = fastfair.generate(tiny_sd, PROMPT, maps=words, **kw)
        for w in words:
            assert torch.equal(gen.maps[w], plain.maps[w])
    else:
        assert gen.maps == {}


def test_per_prompt_attribution_prompts_and_batching(tiny_sd):
    prompts = [PROMPT, "a photo of the face of a nurse"]
    attr = {"gender": ([f"{p} and gender" for p in prompts], ["gender"])}
    gen = fastfair.generate(tiny_sd, prompts, seeds=[3, 4, 5], steps=2, progress=False, attributions=attr,
                            batch_size=4, backend="reference")
    sep = fastfair.generate(tiny_sd, prompts, seeds=[3, 4, 5], steps=2, progress=False, maps=["gender"],
                            attribution_prompt=attr["gender"][0], batch_size=2, backend="reference")
    torch.testing.assert_close(gen.attribution_maps["gender"]["gender"], sep.maps["gender"], rtol=1e-6, atol=1e-9)
    assert gen.config["attributions"] == {"gender": {"prompt": attr["gender"][0], "words": ["gender"]}}


def test_attribution_prompts_of_different_lengths_in_one_batch(tiny_sd):
    """One attribution prompt per prompt, of different token lengths, batched together: their unpadded encodings
    could not be stacked (a crash); batches now break where the length changes, with each image unchanged."""
    prompts = [PROMPT, "a photo of a janitor"]
    attr = [f"{PROMPT} and gender", "janitor gender"]
    kw = dict(seeds=[0, 1], steps=2, progress=False, backend="reference")
    gen = fastfair.generate(tiny_sd, prompts, maps=["gender"], attribution_prompt=attr, batch_size=4,
                            attributions={"g": (attr, ["gender"])}, **kw)
    for i, (p, a) in enumerate(zip(prompts, attr)):
        one = fastfair.generate(tiny_sd, p, maps=["gender"], attribution_prompt=a, batch_size=1, **kw)
        torch.testing.assert_close(gen.maps["gender"][2 * i:2 * i + 2], one.maps["gender"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(gen.attribution_maps["g"]["gender"][2 * i:2 * i + 2], one.maps["gender"],
                                   rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(gen.latents[2 * i:2 * i + 2], one.latents, rtol=0, atol=1e-5)


def test_native_backend_close_to_reference(tiny_sd):
    if "native" not in ops.available_backends("cpu"):
        pytest.skip("native extension not built")
    kw = dict(seeds=[0], steps=2, progress=False, attributions={"race": ATTR["race"]}, maps=["face"])
    a = fastfair.generate(tiny_sd, PROMPT, backend="native", **kw)
    b = fastfair.generate(tiny_sd, PROMPT, backend="reference", **kw)
    torch.testing.assert_close(a.attribution_maps["race"]["race"], b.attribution_maps["race"]["race"],
                               rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def sd64(tiny_sd):
    return copy.deepcopy(tiny_sd).to(torch.float64)


@pytest.mark.parametrize("guide_attr,ckpt", [(None, False), (None, True), (f"{PROMPT} and gender", False)])
def test_with_guidance(sd64, guide_attr, ckpt):
    """Under entanglement guidance the further attribution prompts read the guided images' queries:
    they equal a guided run that maps the same words in that attribution prompt."""
    # with checkpointing the backward replays the UNet: the further prompts must not record twice (daam
    # sums per layer, so a second recording would double its maps)
    kw = dict(seeds=[0, 1], steps=3, progress=False, backend="reference", aggregation=DAAM_TINY if ckpt else "fastfair")
    guidance = EntanglementGuidance("doctor", "face", attribution_prompt=None, scale=50.0, checkpointing=ckpt)
    if guide_attr is not None:
        guidance = EntanglementGuidance("doctor", "gender", attribution_prompt=guide_attr, scale=50.0)
    gen = fastfair.generate(sd64, PROMPT, attributions={"race": ATTR["race"]}, guidance=guidance, **kw)
    sep = fastfair.generate(sd64, PROMPT, maps=ATTR["race"][1], attribution_prompt=ATTR["race"][0],
                            guidance=guidance, **kw)
    assert gen.diagnostics["applied"].any()
    torch.testing.assert_close(gen.latents, sep.latents, rtol=0, atol=1e-12)
    for w in ATTR["race"][1]:
        torch.testing.assert_close(gen.attribution_maps["race"][w], sep.maps[w], rtol=1e-10, atol=1e-14)
    unguided = fastfair.generate(sd64, PROMPT, attributions={"race": ATTR["race"]}, **kw)
    assert not torch.allclose(gen.attribution_maps["race"]["race"], unguided.attribution_maps["race"]["race"])


def test_save_writes_attribution_maps(tiny_sd, tmp_path):
    from safetensors import safe_open

    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=2, progress=False,
                            attributions={"age": ATTR["age"]}, backend="reference")
    out = gen.save(tmp_path / "run", overlays=False)
    with safe_open(str(out / "attribution_maps.safetensors"), "pt") as f:
        assert set(f.keys()) == {"age/doctor", "age/age"}
        torch.testing.assert_close(f.get_tensor("age/age"), gen.attribution_maps["age"]["age"])


@pytest.mark.parametrize("spec,err,match", [
    ({"gender": (f"{PROMPT} and gender", ["doctor", "race"])}, ValueError, "race"),
    ({"gender": (f"{PROMPT} and gender", [])}, ValueError, "no words"),
    ({"gender": f"{PROMPT} and gender"}, ValueError, r"\(attribution prompt, words\)"),
    ({"gender": ([f"{PROMPT} and gender"] * 2, ["gender"])}, ValueError, "one per prompt"),
    ({"gender": (f"{PROMPT} and gender", ["gender", "gender"])}, ValueError, "duplicate"),
    ({"": (f"{PROMPT} and gender", ["gender"])}, ValueError, "non-empty"),
    ({"gender": (f"{PROMPT} and gender", ["gender", " "])}, ValueError, "non-blank"),
    ([("gender", ("x", ["x"]))], TypeError, "mapping"),
])
def test_bad_attributions(tiny_sd, spec, err, match):
    with pytest.raises(err, match=match):
        fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=1, progress=False, attributions=spec)


def test_cli_attribution(tmp_path, capsys):
    from fastfair import metrics
    from fastfair.cli import main

    args = ["generate", "--model", "tiny-sd", "--prompt", PROMPT, "--seeds", "0-1", "--steps", "2", "--no-progress",
            "--attribution", "race", ATTR["race"][0], "doctor,race",
            "--attribution", "age", ATTR["age"][0], "doctor,age"]
    assert main(args + ["--out", str(tmp_path / "cli")]) == 0
    lines = [ln.split("\t") for ln in capsys.readouterr().out.splitlines() if ln.count("\t") >= 3]
    assert lines[0][3:] == ["race:IoU(doctor,race)", "age:IoU(doctor,age)"]
    sep = fastfair.generate(fastfair.load_pipeline("tiny-sd"), PROMPT, seeds=[0, 1], steps=2, progress=False,
                            maps=["doctor", "race"], attribution_prompt=ATTR["race"][0])
    want = metrics.iou(sep.maps["doctor"], sep.maps["race"], 70.0)
    assert [float(r[3]) for r in lines[1:]] == pytest.approx(want.tolist(), abs=1e-4)
    assert (tmp_path / "cli" / "attribution_maps.safetensors").is_file()
    assert main(args[:-4] + ["--attribution", "race", ATTR["age"][0], "age", "--out", str(tmp_path / "bad")]) == 1
    assert "twice" in capsys.readouterr().err
    assert main(args[:-4] + ["--attribution", "age", ATTR["age"][0], "race", "--out", str(tmp_path / "bad")]) == 1
    assert "race" in capsys.readouterr().err


def test_sdxl_equal_to_separate_generations(tiny_sdxl):
    """SDXL: the attribution prompt's keys come from both text encoders (as for attribution_prompt=)."""
    p = "a photo of a janitor"
    attr = {a: (f"{p} and {a}", ["janitor", a]) for a in ("gender", "age")}
    kw = dict(seeds=[0], steps=2, progress=False, backend="reference")
    gen = fastfair.generate(tiny_sdxl, p, attributions=attr, **kw)
    for name, (ap, ws) in attr.items():
        sep = fastfair.generate(tiny_sdxl, p, maps=ws, attribution_prompt=ap, **kw)
        for w in ws:
            torch.testing.assert_close(gen.attribution_maps[name][w], sep.maps[w], rtol=0, atol=0)


@pytest.mark.parametrize("maps,match", [([" "], "non-blank"), (["doctor", ""], "non-blank"), (" , ", "names no word"),
                                        (["latents", "doctor"], "final latents")])
def test_bad_map_words(tiny_sd, maps, match):
    """Blank words were dropped silently; a word named 'latents' was overwritten in maps.safetensors by the final
    latents (a review)."""
    with pytest.raises(ValueError, match=match):
        fastfair.generate(tiny_sd, "a photo of latents and a doctor", seeds=[0], steps=1, progress=False, maps=maps)


def test_attribution_names_with_a_slash_are_refused_where_saved(tiny_sd, tmp_path):
    """attribution_maps.safetensors keys are NAME/word: a name holding '/' is refused before writing (and up front by
    generate_to_dir); generate itself keeps it (audits name attributions by open words such as 'he/she')."""
    from fastfair.generation import generate_to_dir

    spec = {"he/she": (f"{PROMPT} and gender", ["gender"])}
    gen = fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=1, progress=False, attributions=spec)
    assert list(gen.attribution_maps) == ["he/she"]
    with pytest.raises(ValueError, match="holds '/'"):
        gen.save(tmp_path / "a")
    assert not (tmp_path / "a" / "attribution_maps.safetensors").exists()
    with pytest.raises(ValueError, match="holds '/'"):
        generate_to_dir(tiny_sd, PROMPT, tmp_path / "b", seeds=[0], settings={}, steps=1, progress=False,
                        attributions=spec)
    assert not (tmp_path / "b").exists()
