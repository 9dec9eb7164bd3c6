"""Bringing one's own model: load_pipeline's refusals and conveniences, and the pipelines generate refuses
(found by a helper's review; each checked against what diffusers itself does)."""

import pytest
import torch

import fastfair
from fastfair.generation import parse_seeds
from fastfair.pipelines import check_device, load_pipeline

PROMPT = "a photo of the face of a doctor"


@pytest.fixture(scope="module")
def saved(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_sd.save_pretrained(root / "plain")
    tiny_sd.save_pretrained(root / "fp16", variant="fp16")
    return root


def test_variant_only_folder_loads(saved):
    """A folder saved with save_pretrained(variant="fp16") holds only variant files: loaded as that variant (diffusers
    alone said 'no file named diffusion_pytorch_model.bin', and fastfair then suggested save_pretrained)."""
    pipe = load_pipeline(str(saved / "fp16"))
    ref = load_pipeline(str(saved / "plain"))
    for (n, a), (_, b) in zip(pipe.unet.named_parameters(), ref.unet.named_parameters()):
        assert torch.equal(a, b), n


def test_missing_weights_are_refused(saved, tmp_path):
    """Weights missing from a checkpoint stayed on the meta device: garbage maps, or a late 'Cannot copy out of meta'."""
    from safetensors.torch import load_file, save_file
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved / "plain", broken)
    f = broken / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    gone = [k for k in sd if k.endswith("attn2.to_k.weight")]
    assert gone
    save_file({k: v for k, v in sd.items() if k not in gone}, str(f))
    with pytest.raises(RuntimeError, match=r"lacks %d weight" % len(gone)):
        load_pipeline(str(broken))


def test_load_pipeline_argument_errors(saved, tmp_path, monkeypatch):
    assert load_pipeline(str(saved / "plain"), dtype="HALF").unet.dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        load_pipeline(str(saved / "plain"), dtype="fp8")
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"\0")
    with pytest.raises(ValueError, match="from_single_file"):
        load_pipeline(str(ckpt))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-sd").mkdir()
    with pytest.raises(ValueError, match="both an offline preset and a path"):
        load_pipeline("tiny-sd")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_device_without_cuda():
    with pytest.raises(ValueError, match="no CUDA device"):
        check_device("cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        load_pipeline("tiny-sd", device="cuda:0")


def test_seed_values():
    with pytest.raises(ValueError, match="integers"):
        parse_seeds([0.5])
    with pytest.raises(ValueError, match="2\\*\\*64"):
        parse_seeds([2 ** 64 + 1])
    assert parse_seeds([2 ** 64 - 1, 3.0]) == [2 ** 64 - 1, 3]


def test_generate_refuses_other_pipelines_and_inputs(tiny_sd):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**tiny_sd.components)
    with pytest.raises(ValueError, match="text-to-image pipelines .*got StableDiffusionImg2ImgPipeline"):
        fastfair.generate(img2img, PROMPT, seeds=[0], steps=1, progress=False)
    with pytest.raises(ValueError, match="prompt must be a string"):
        fastfair.generate(tiny_sd, None, seeds=[0], steps=1, progress=False)
    with pytest.raises(ValueError, match="finite"):
        fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=1, guidance_scale=float("nan"), progress=False)


def test_sd3_fused_qkv_is_accepted():
    """fuse_qkv_projections() gives diffusers' FusedJointAttnProcessor2_0, the same math: maps and latents equal the
    unfused pipeline's (it was refused as a custom processor)."""
    tiny_sd3 = load_pipeline("tiny-sd3")
    kw = dict(seeds=[0], steps=2, maps=["doctor"], progress=False)
    plain = fastfair.generate(tiny_sd3, PROMPT, **kw)
    tiny_sd3.transformer.fuse_qkv_projections()
    try:
        assert any(type(m.processor).__name__ == "FusedJointAttnProcessor2_0"
                   for m in tiny_sd3.transformer.modules() if hasattr(m, "processor"))
        fused = fastfair.generate(tiny_sd3, PROMPT, **kw)
    finally:
        tiny_sd3.transformer.unfuse_qkv_projections()
    torch.testing.assert_close(fused.latents, plain.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused.maps["doctor"], plain.maps["doctor"], rtol=1e-4, atol=1e-6)


def test_preset_cache_folder_names_the_library_releases(monkeypatch):
    """The presets' random weights depend on the diffusers / transformers releases, and a folder saved by
    transformers 5 failed to load in transformers 4: each release pair gets its own folder."""
    from importlib import metadata

    from fastfair import pipelines

    real = metadata.version
    here = pipelines.preset_path("tiny-sd")
    mm = lambda d: ".".join(real(d).split(".")[:2])  # noqa: E731
    assert here.name == f"tiny-sd-seed0-v1-diffusers{mm('diffusers')}-transformers{mm('transformers')}"
    monkeypatch.setattr(metadata, "version", lambda d: "4.38.2" if d == "transformers" else real(d))
    other = pipelines.preset_path("tiny-sd")
    assert other != here and other.name.endswith("-transformers4.38") and other.parent == here.parent


def test_preset_folder_has_slow_tokenizer_files(tiny_sd):
    """vocab.json / merges.txt are saved beside tokenizer.json (what transformers 4's CLIPTokenizer reads)."""
    from transformers import CLIPTokenizer

    from fastfair import pipelines

    tok = pipelines.preset_path("tiny-sd") / "tokenizer"
    assert (tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()
    slow = CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"))
    assert slow(PROMPT).input_ids == tiny_sd.tokenizer(PROMPT).input_ids


def test_old_diffusers_is_named_for_sd3_and_flux(monkeypatch):
    """SD3 / Flux code reads diffusers internals newer than the package's floor: an older diffusers gets a one-line
    error naming the release needed, not an ImportError from inside diffusers."""
    from importlib import metadata

    from fastfair import pipelines

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "0.34.0" if d == "diffusers" else real(d))
    with pytest.raises(RuntimeError, match=r"the tiny-flux preset needs diffusers>=0\.35; this one is 0\.34\.0"):
        pipelines._build("tiny-flux", 0)
    pipelines.require_diffusers("sd3")  # 0.34 is enough there
    monkeypatch.setattr(metadata, "version", lambda d: "0.29.2" if d == "diffusers" else real(d))
    with pytest.raises(RuntimeError, match=r"needs diffusers>=0\.30"):
        pipelines.require_diffusers("sd3", "SD3")
    monkeypatch.setattr(metadata, "version", lambda d: "0.35.0.dev0" if d == "diffusers" else real(d))
    pipelines.require_diffusers("flux")


def test_without_accelerate_loads_with_low_cpu_mem_usage_off(saved, monkeypatch):
    """diffusers' default low_cpu_mem_usage=True printed an 'accelerate was not found' block on every command."""
    from diffusers import DiffusionPipeline

    from fastfair import pipelines

    seen = {}
    real = DiffusionPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.clear()
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(pipelines, "_has_accelerate", lambda: False)
    assert load_pipeline(str(saved / "plain")).unet is not None
    assert seen["low_cpu_mem_usage"] is False
    monkeypatch.setattr(pipelines, "_has_accelerate", lambda: True)
    load_pipeline(str(saved / "plain"))
    assert "low_cpu_mem_usage" not in seen
