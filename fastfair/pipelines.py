"""Load diffusers pipelines: offline tiny presets built in code, or anything ``from_pretrained`` takes.

Presets (random weights, deterministic from ``seed``, real CLIP BPE tokenizer, DDIM with SD betas):

* ``"tiny-sd"``: a small StableDiffusionPipeline (cross-attention at 16x16, 8x8 and a 4x4 mid block
  for a 16x16 latent; VAE scale factor 8, so 128x128 images).
* ``"tiny-sdxl"``: a small StableDiffusionXLPipeline with two text encoders.
* ``"sd15-shaped"``: SD1.5's UNet topology with narrow channels: 16 cross-attention layers at query
  lengths 4096x5, 1024x5, 256x5 and 64x1 for a 64x64 latent, 8 heads, VAE scale factor 8.
* ``"tiny-sd3"``: a small StableDiffusion3Pipeline (MMDiT with 2 joint blocks, patch size 2, 16 latent
  channels, flow-matching Euler) with the two CLIP text encoders and a 2-layer T5 encoder whose
  SentencePiece-style tokenizer is built in code (``t5_tokenizer``: no T5 vocabulary is downloadable).
* ``"tiny-flux"``: a small FluxPipeline (one double-stream and one single-stream block, RoPE, guidance
  embedding as FLUX.1-dev, packed 16-channel latents, flow matching with dynamic shifting), CLIP for the
  pooled embedding and the same built-in T5.

Presets are built once, saved with ``save_pretrained`` under the cache folder
(``$FASTFAIR_CACHE`` or ``~/.cache/fastfair``; one folder per diffusers / transformers release pair, whose random
initialisation differs: ``preset_path``) with an atomic rename, and always loaded back
through ``from_pretrained`` -- the same path a real model takes. Any other name goes unchanged to
``diffusers.DiffusionPipeline.from_pretrained`` (a hub id or a local folder).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

PRESETS = ("tiny-sd", "tiny-sdxl", "sd15-shaped", "tiny-sd3", "tiny-flux")
_PRESET_VERSION = "v1"
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


# The oldest diffusers each model family's code here runs on. pyproject's floor (0.28: Attention.norm_q) covers
# SD 1.x / 2.x and SDXL; SD3's joint-attention processor reads Attention.norm_added_q (0.30); Flux's calls
# transformer_flux._get_qkv_projections and apply_rotary_emb(sequence_dim=...) (both new in 0.35).
DIFFUSERS_FOR = {"sd3": "0.30", "flux": "0.35"}


def _release(version: str) -> tuple[int, ...]:
    import re

    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def require_diffusers(family: str, what: str | None = None) -> None:
    """Raise a one-line RuntimeError when the installed diffusers is older than ``DIFFUSERS_FOR[family]``
    (instead of an ImportError / AttributeError from deep inside diffusers)."""
    from ._env import _version

    need = DIFFUSERS_FOR[family]
    have = _version("diffusers")
    if have is None:
        raise RuntimeError(f"{what or family} needs diffusers>={need}: pip install 'diffusers>={need}'")
    if _release(have) < _release(need):
        raise RuntimeError(f"{what or family} needs diffusers>={need}; this one is {have}: "
                           f"pip install -U 'diffusers>={need}'")


def cache_dir() -> Path:
    return Path(os.environ.get("FASTFAIR_CACHE", Path.home() / ".cache" / "fastfair"))


# --------------------------------------------------------------------------------------------
# The CLIP tokenizer from the shipped BPE vocabulary
# --------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def tokenizer_files() -> tuple[str, str]:
    """Write vocab.json and merges.txt (once, into the cache) from the shipped BPE file."""
    out = cache_dir() / "clip-bpe"
    vocab_p, merges_p = out / "vocab.json", out / "merges.txt"
    if vocab_p.exists() and merges_p.exists():
        return str(vocab_p), str(merges_p)
    src = resources.files("fastfair") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    with src.open("rb") as fh:
        lines = gzip.decompress(fh.read()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out))
    (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    os.replace(tmp / "vocab.json", vocab_p)
    os.replace(tmp / "merges.txt", merges_p)
    shutil.rmtree(tmp, ignore_errors=True)
    return str(vocab_p), str(merges_p)


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """An offline CLIPTokenizer with SD's vocabulary (49,408 tokens, max length 77)."""
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    return CLIPTokenizer(vocab, merges, model_max_length=77, pad_token=pad_token,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


# A small T5-style (SentencePiece unigram) tokenizer for the SD3 preset's T5: no sentencepiece model can be
# downloaded here, so its vocabulary is built in code -- whole pieces for common prompt words, and every
# printable character (with and without the word-start marker) so that any prompt tokenizes.
_T5_WORDS = ("a an the of and or in on at with for to photo picture portrait face headshot image person people "
             "man woman men women boy girl male female young old child doctor nurse janitor teacher engineer "
             "lawyer ceo chef pilot farmer cashier scientist gender race age white black asian african american "
             "indian latino hispanic middle eastern")


def t5_tokenizer(max_length: int = 256):
    """A T5TokenizerFast (pad 0, eos 1, unk 2; "▁" marks a word start) with a built-in vocabulary."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -2.0) for w in dict.fromkeys(_T5_WORDS.split())]
    vocab += [("\u2581" + c, -6.0) for c in chars] + [(c, -8.0) for c in chars] + [("\u2581", -10.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

def _text_encoder(hidden: int, seed: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407, projection_dim=projection or hidden, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(channels: tuple[int, ...], seed: int, latent_channels: int = 4, groups: int = 8):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=channels, layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=groups, sample_size=32).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULER)


def _sd_pipeline(unet, text_hidden: int, seed: int):
    """A StableDiffusionPipeline around ``unet`` (built first, from seed + 1) with the presets' VAE
    (seed + 2) and text encoder (seed + 3)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=_vae((16, 16, 16, 16), seed + 2),
                                   text_encoder=_text_encoder(text_hidden, seed + 3),
                                   tokenizer=clip_tokenizer(), unet=unet, scheduler=_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _build(name: str, seed: int):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    if name == "tiny-sd":
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16).eval()
        return _sd_pipeline(unet, 32, seed)
    if name == "sd15-shaped":
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16).eval()
        return _sd_pipeline(unet, 64, seed)
    if name == "tiny-sdxl":
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=16).eval()
        return StableDiffusionXLPipeline(
            vae=_vae((16, 16, 16, 16), seed + 2), text_encoder=_text_encoder(32, seed + 3), tokenizer=clip_tokenizer(),
            text_encoder_2=_text_encoder(32, seed + 4, projection=32), tokenizer_2=clip_tokenizer(pad_token="!"),
            unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True)
    if name == "tiny-sd3":
        require_diffusers("sd3", "the tiny-sd3 preset")
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        torch.manual_seed(seed + 1)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=32).eval()
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_sd3_vae(seed + 2),
            text_encoder=_text_encoder(32, seed + 3, projection=32), tokenizer=clip_tokenizer(),
            text_encoder_2=_text_encoder(32, seed + 4, projection=32), tokenizer_2=clip_tokenizer(pad_token="!"),
            text_encoder_3=_t5_encoder(seed + 5), tokenizer_3=t5_tokenizer())
    if name == "tiny-flux":
        require_diffusers("flux", "the tiny-flux preset")
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        torch.manual_seed(seed + 1)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6)).eval()
        return FluxPipeline(
            transformer=transformer, vae=_sd3_vae(seed + 2, scaling_factor=0.3611, shift_factor=0.1159),
            scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                      base_image_seq_len=256, max_image_seq_len=4096),
            text_encoder=_text_encoder(32, seed + 3), tokenizer=clip_tokenizer(),
            text_encoder_2=_t5_encoder(seed + 5), tokenizer_2=t5_tokenizer(512))
    raise KeyError(name)


def _sd3_vae(seed: int, scaling_factor: float = 1.5305, shift_factor: float = 0.0609):
    """A 16-channel VAE with SD3 / Flux's latent scaling and shift."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16),
                         layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=32,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
                         use_post_quant_conv=False).eval()


def _t5_encoder(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), d_model=64, d_ff=128, d_kv=16, num_layers=2,
                                   num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()


def _major_minor(dist: str) -> str:
    """``dist``'s installed version as major.minor ("0.42"), "none" when it is not installed."""
    from ._env import _version

    v = _version(dist)
    return ".".join(v.split(".")[:2]) if v else "none"


def preset_path(name: str, seed: int = 0) -> Path:
    """The preset's cache folder. Its name holds the diffusers and transformers releases (major.minor): the random
    weights a seed gives depend on them (model constructors' initialisation), and a folder saved by one
    transformers may not load in another (transformers 5 writes no slow-tokenizer files), so each pair of
    releases builds and keeps its own."""
    libs = f"diffusers{_major_minor('diffusers')}-transformers{_major_minor('transformers')}"
    return cache_dir() / "pipelines" / f"{name}-seed{seed}-{_PRESET_VERSION}-{libs}"


def _save_slow_tokenizer_files(pipe, folder: Path) -> None:
    """Also write vocab.json / merges.txt beside each CLIP tokenizer's tokenizer.json (transformers 5 saves only
    the latter; transformers 4's slow CLIPTokenizer needs the former). Small: ~2 MB per tokenizer."""
    vocab, merges = tokenizer_files()
    for cname, comp in pipe.components.items():
        if type(comp).__name__ in ("CLIPTokenizer", "CLIPTokenizerFast") and (folder / cname).is_dir():
            for src in (vocab, merges):
                dst = folder / cname / Path(src).name
                if not dst.exists():
                    shutil.copyfile(src, dst)


def build_preset(name: str, seed: int = 0) -> Path:
    """Build preset ``name`` (if not cached) and return the folder it is saved in."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {PRESETS}")
    path = preset_path(name, seed)
    if (path / "model_index.json").exists():
        return path
    pipe = _build(name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _save_slow_tokenizer_files(pipe, tmp)
        try:
            os.replace(tmp, path)  # atomic; loses the race harmlessly if another process won
        except OSError:
            if not (path / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _has_accelerate() -> bool:
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def load_pipeline(name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                  seed: int = 0, **kwargs):
    """A diffusers pipeline by preset name (offline, see module doc), hub id or local path."""
    import warnings

    from diffusers import DiffusionPipeline

    if isinstance(dtype, str):
        names = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
        if dtype.lower() not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16")
        dtype = names[dtype.lower()]
    if device is not None:
        check_device(device)
    path = Path(str(name)).expanduser()
    if name in PRESETS and path.exists():
        raise ValueError(f"{name!r} is both an offline preset and a path here; write ./{name} for the folder, or "
                         "run from another directory for the preset")
    if path.is_file():
        raise ValueError(f"{name!r} is a file; fastfair loads diffusers pipeline folders (model_index.json and one "
                         "folder per component). Convert a single-file checkpoint once with diffusers: "
                         "StableDiffusionPipeline.from_single_file(PATH).save_pretrained(FOLDER) (or the SDXL / SD3 / "
                         "Flux pipeline class), then pass FOLDER")
    source = build_preset(name, seed) if name in PRESETS else name
    if "variant" not in kwargs and path.is_dir():
        variant = _only_variant(path)
        if variant is not None:
            kwargs["variant"] = variant
    if "low_cpu_mem_usage" not in kwargs and "device_map" not in kwargs and not _has_accelerate():
        # diffusers' default (True) needs accelerate; without it diffusers prints a "Cannot initialize model with
        # low cpu memory usage because accelerate was not found" block on every load, then loads normally
        kwargs["low_cpu_mem_usage"] = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        try:
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype or torch.float32, **kwargs)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"could not load pipeline {name!r}: {e}\n(offline presets: {', '.join(PRESETS)}; "
                               f"or pass a local folder saved with save_pretrained)") from e
    missing = [] if "device_map" in kwargs else [f"{cname}.{pname}" for cname, comp in pipe.components.items() if isinstance(comp, torch.nn.Module)
               for pname, p in list(comp.named_parameters()) + list(comp.named_buffers()) if p.is_meta]
    if missing:
        raise RuntimeError(f"pipeline {name!r} lacks {len(missing)} weight(s) (e.g. {', '.join(missing[:3])}): they "
                           "were never loaded and would compute garbage. The checkpoint is incomplete or was saved "
                           "for another architecture; re-save it with save_pretrained")
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def module_digest(module: torch.nn.Module) -> str:
    """A digest of a module's parameters and floating-point buffers: names, shapes, and per-tensor sums and L2 norms accumulated in float64 (8
    significant digits, so reduction order on another device does not change it). One pass over the weights:
    ~2 s per 100M parameters on a 2-core CPU (an SD 1.5 UNet and text encoder: ~25 s, once per run; on a GPU
    one read of the weights, not measured)."""
    import hashlib

    # names as the model's own: torch.compile's wrapper prefixes "_orig_mod."; fused QKV projections are derived
    # from to_q / to_k / to_v, which stay (fusing changes no weight)
    named = [(n.replace("_orig_mod.", ""), p)
             for n, p in list(module.named_parameters()) + list(module.named_buffers())
             if not p.is_meta and p.is_floating_point() and "to_qkv" not in n and "to_added_qkv" not in n]
    h = hashlib.sha256()
    by_dev: dict = {}
    for i, (_, p) in enumerate(named):
        by_dev.setdefault(p.device, []).append(i)
    sums = [None] * len(named)
    with torch.no_grad():  # one transfer per device (no sync per tensor on a GPU); no float64 copy of the weights
        for dev, idx in by_dev.items():
            vals = torch.stack([torch.stack([named[i][1].sum(dtype=torch.float64),
                                             torch.linalg.vector_norm(named[i][1], dtype=torch.float64)])
                                for i in idx]).cpu().tolist()
            for i, v in zip(idx, vals):
                sums[i] = v
    for (pname, p), (s1, s2) in zip(named, sums):
        h.update(f"{pname}:{tuple(p.shape)}:{s1:.8g}:{s2:.8g};".encode())
    return h.hexdigest()[:16]


def pipeline_fingerprint(pipe) -> dict:
    """What a run's images depend on in ``pipe`` beyond its name: the scheduler (class and configuration), the
    adapters loaded into each component, whether a safety checker runs, and a digest of the weights of the
    denoiser and text encoders (``module_digest``), so a resumed run refuses a model changed in place (a scheduler
    swapped in the folder, a LoRA added or fused, a MIST edit applied to the same pipeline object)."""
    import hashlib

    sch = pipe.scheduler
    cfg = {k: v for k, v in dict(sch.config).items() if not k.startswith("_")}
    out = {"scheduler": type(sch).__name__,
           "scheduler_config": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]}
    adapters = {}
    h = hashlib.sha256()
    for name in sorted(pipe.components):
        comp = pipe.components[name]
        if not isinstance(comp, torch.nn.Module):
            continue
        peft = getattr(comp, "peft_config", None)
        if peft:
            adapters[name] = sorted(peft)
        if name in ("unet", "transformer") or name.startswith("text_encoder"):
            h.update(f"{name}:{module_digest(comp)};".encode())
    if adapters:
        out["adapters"] = adapters
    if getattr(pipe, "safety_checker", None) is not None:
        out["safety_checker"] = True
    out["weights"] = h.hexdigest()[:16]
    # the decoder too (a VAE swapped under the same model name changes every image); recorded since 2026-11-27:
    # records without it are compared without it (LATER_MODEL_KEYS)
    vae = getattr(pipe, "vae", None)
    if isinstance(vae, torch.nn.Module):
        out["vae_weights"] = module_digest(vae)
    return out


# model_state keys recorded since a later release: a run recorded without one is compared without it
LATER_MODEL_KEYS = ("vae_weights",)


def as_recorded_model_state(old: dict | None, new: dict | None):
    """``new`` without the LATER_MODEL_KEYS that ``old`` does not record (a run made before they were recorded
    resumes; one that records them is compared on them)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    return {k: v for k, v in new.items() if k in old or k not in LATER_MODEL_KEYS}


def check_device(device) -> torch.device:
    """``device`` as a torch.device, or a clear error before anything is loaded onto it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch has no CUDA device (a CPU build, or no GPU visible); "
                             "use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def _only_variant(folder: Path) -> str | None:
    """The weight variant (e.g. "fp16") of a folder saved with ``save_pretrained(variant=...)`` whose components
    hold only that variant's files; None when plain weight files are there (or no weights at all)."""
    variants, plain = set(), False
    for f in folder.glob("*/*"):
        parts = f.name.split(".")
        if f.suffix not in (".safetensors", ".bin") or f.name.endswith(".index.json"):
            continue
        if len(parts) == 3:  # model.fp16.safetensors, or sharded: model.fp16-00001-of-00002.safetensors
            variants.add(parts[1].split("-")[0])
        elif len(parts) == 2:  # model.safetensors, model-00001-of-00002.safetensors
            plain = True
    return next(iter(variants)) if (len(variants) == 1 and not plain) else None
