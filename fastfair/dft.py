"""Fairness finetuning: adjusted direct finetuning (DFT) toward a target attribute distribution.

Shen et al., "Finetuning Text-to-Image Diffusion Models for Fairness" (ICLR 2024). One iteration:

1. pick a prompt, draw N initial noises and a number of sampling steps (19-23 in the paper);
2. sample the N images *with gradients* (on UNets DPM-Solver++ by default, classifier-free guidance). The
   UNet is fed *detached* latents, so no gradient flows z_t -> eps_hat across steps; the latents
   still carry gradient through the solver's update, which makes every step's eps_hat reach the
   image. Each step's eps_hat gradient is multiplied by
   ``c_t = sqrt(abar_t) * sqrt(1 - abar_t) / (1 - alpha_t)``, the c_t normalised by their geometric
   mean over the steps ("adjusted DFT", :func:`grad_coefficients`, :class:`ScaleGrad`);
3. a differentiable attribute classifier gives per-attribute probabilities; the distributional
   alignment targets (``fastfair.alignment``: exact OT to histograms sampled from the target, or with
   ``ot_samples=0`` to every histogram weighted by its probability) give a
   label per image and attribute, uncertain ones dropped; the loss is their cross-entropy;
4. a quality regulariser keeps each image close (1 - cosine of encoder features, CLIP by default; the
   paper's CLIP ViT-H + DINOv2 with ``quality_encoder="paper"``) to the frozen model's image for the same
   noise and step count; the paper relaxes it (factor 0.2) for images whose target class differs from the
   frozen image's class;
   with a face detector (the paper's setting, ``fastfair.faces``) the classifier sees each image's face
   crop, images without a face are not aligned, the quality gradient is relaxed inside the face region,
   and a face embedder adds the face-realism loss (see :class:`DFTTrainer`);
5. AdamW, gradient clipping, EMA of the trainables, a skipped update on non-finite gradients.

Trainables: LoRA (peft) on the text encoder (default) and/or the UNet, or k soft prefix tokens
(saved as a textual-inversion embedding). SD3 and Flux (fastfair's extension): LoRA on the CLIP text encoders
and/or the transformer, or k soft tokens added to every tokenizer that reads the prompt (CLIPs and T5; loaded with
:func:`load_soft_tokens`); the sampler is the pipeline's flow-matching Euler loop, each step's velocity gradient
scaled by 1 / (sigma_i - sigma_(i+1)) (:func:`flow_grad_coefficients`), the analogue of the c_t above. On UNets
on the CPU cross-attention runs through ``fastfair.ops`` by default (``attention="fastfair"``): fastfair's
patched processor, whose backward recomputes the attention probabilities instead of keeping them (SDPA's CPU path
keeps them); on CUDA and on SD3 / Flux the default is diffusers' SDPA (``attention="diffusers"``), whose CUDA
kernels keep none either and ran faster than fastfair's on an H200 (see ``_resolve_defaults``). The
model-dependent defaults (scheduler, guidance scale, attention) are resolved into the trainer's copy of the config
(``trainer.cfg``).

Classifier protocol (``classifier=`` of :class:`DFTTrainer`): anything :func:`as_differentiable`
accepts -- a ``torch.nn.Module`` or callable mapping images as a float tensor (N, 3, H, W) in [0, 1]
to per-class probabilities, either one (N, K) tensor (give ``labels=[...]``) or a mapping
{attribute: (N, K_a)} (give ``labels={attribute: [...]}`` or a ``labels`` attribute). Joint classes
of an intersection are just one head with the joint labels. ``fastfair.classify``'s
``ModuleClassifier`` and ``ClipZeroShot`` are accepted as they are (CLIP zero-shot is made
differentiable here, reusing its text embeddings).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import random
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import _dist, alignment, distribution
from .features import (PAPER_CLIP, PAPER_DINO, ClipFeatures, DinoFeatures, FeatureError,  # noqa: F401
                       Resized, encoder_name, load_encoders)
from .alignment import TargetError
from .guidance import abar_at
from .processors import default_sample_size, denoiser, guidance_scale_for

__all__ = ["DFTConfig", "DFTTrainer", "DFTResult", "DFTError", "ClassifierMismatch", "ResumeError", "finetune_dft",
           "grad_coefficients", "flow_grad_coefficients", "load_soft_tokens", "soft_token_names", "ScaleGrad", "scale_grad", "as_differentiable", "DifferentiableClassifier",
           "ClipFeatures", "DinoFeatures", "Resized", "load_quality_encoders", "parse_targets", "TargetError"]

CHECKPOINT_VERSION = 1
TEXT_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")   # the paper also adapts the MLP
UNET_LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# an MMDiT's (SD3, Flux) attention: the image and the text stream's projections (diffusers' SD3 / Flux LoRA scripts)
TRANSFORMER_LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
TRAINABLES = ("text-lora", "unet-lora", "text+unet-lora", "transformer-lora", "text+transformer-lora", "soft-tokens")


class DFTError(ValueError):
    """A DFT setting that cannot work (explained in the message)."""


class ClassifierMismatch(DFTError):
    """The attributes to align (or their targets) do not match the classifier's heads and labels."""


class ResumeError(DFTError):
    """A checkpoint that does not exist or does not belong to this training setup."""


def _need_peft():
    try:
        import peft  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA finetuning needs peft: pip install 'fastfair[train]' (or pip install peft); "
                          "soft tokens (trainable='soft-tokens') need no peft, only scipy as every DFT run") from e
    return peft


def _need_scipy():
    """Every DFT run needs scipy (the alignment targets' exact assignment, fastfair.alignment): say so before
    the model is loaded and sampled from, not from inside the first training step."""
    import importlib.util

    if importlib.util.find_spec("scipy") is None:
        raise ImportError("DFT needs scipy (the alignment targets' exact assignment): pip install 'fastfair[train]' "
                          "(or pip install scipy)")


# --------------------------------------------------------------------------------------------
# Adjusted gradient
# --------------------------------------------------------------------------------------------

def grad_coefficients(scheduler, timesteps=None, normalize: bool = True) -> np.ndarray:
    """Adjusted-DFT gradient scales c_t = sqrt(abar_t) sqrt(1 - abar_t) / (1 - alpha_t) per sampling step.

    ``timesteps`` default to ``scheduler.timesteps`` (call ``set_timesteps`` first); abar and alpha are
    the scheduler's training-schedule ``alphas_cumprod`` and ``alphas`` (1 - betas) at those timesteps.
    With ``normalize`` the coefficients are divided by their geometric mean (their product is 1).
    """
    ts = scheduler.timesteps if timesteps is None else timesteps
    ts = [int(t) for t in (ts.tolist() if torch.is_tensor(ts) else ts)]
    if not ts:
        raise ValueError("no timesteps: call scheduler.set_timesteps(n) first")
    abar = scheduler.alphas_cumprod.double().cpu().numpy()
    alphas = getattr(scheduler, "alphas", None)
    alphas = (1.0 - scheduler.betas.double()).cpu().numpy() if alphas is None else alphas.double().cpu().numpy()
    c = np.array([math.sqrt(abar[t]) * math.sqrt(1.0 - abar[t]) / (1.0 - alphas[t]) for t in ts])
    if normalize:
        c = c / math.exp(np.log(c).mean())
    return c


class ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale.detach() if torch.is_tensor(scale) else float(scale)  # a tensor: broadcast (per image)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    return ScaleGrad.apply(x, scale)


def flow_grad_coefficients(scheduler, normalize: bool = True) -> np.ndarray:
    """Adjusted-DFT gradient scales for flow matching (SD3, Flux; fastfair's extension of the paper's adjustment):
    c_i = 1 / (sigma_i - sigma_(i+1)) per Euler step (call ``set_timesteps`` first).

    An Euler step is z_(i+1) = z_i + (sigma_(i+1) - sigma_i) v_i, so with detached inputs the final latent's
    gradient reaches step i's velocity with the factor sigma_(i+1) - sigma_i; scaled by c_i every step
    contributes alike, as :func:`grad_coefficients` makes every step of a noise-prediction sampler contribute
    alike. With ``normalize`` the c_i are divided by their geometric mean (their product is 1).
    """
    sig = scheduler.sigmas.double().cpu().numpy()
    if len(sig) < 2:
        raise ValueError("no timesteps: call scheduler.set_timesteps(n) first")
    d = sig[:-1] - sig[1:]
    if not (d > 0).all():
        raise ValueError(f"the scheduler's sigmas do not decrease step by step ({sig.tolist()})")
    c = 1.0 / d
    if normalize:
        c = c / math.exp(np.log(c).mean())
    return c


def _flow_shift(scheduler, image_seq_len: int, max_shift: float = 1.15) -> float:
    """The resolution-dependent shift mu of SD3.5 / Flux schedulers (dynamic shifting), as their pipelines compute
    it from the number of image tokens."""
    c = scheduler.config
    base, top = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    lo, hi = c.get("base_shift", 0.5), c.get("max_shift", max_shift)   # the default: Flux's 1.15, SD3's 1.16
    m = (hi - lo) / (top - base)
    return image_seq_len * m + (lo - m * base)


# --------------------------------------------------------------------------------------------
# Classifier protocol
# --------------------------------------------------------------------------------------------

class DifferentiableClassifier:
    """images (N, 3, H, W) in [0, 1] -> {attribute: (N, K_a) probabilities}, with gradients.

    ``labels``: {attribute: (label, ...)} in column order. ``image_size``: resize (bilinear) to a square
    of this size first.
    """

    def __init__(self, fn: Callable, labels: Mapping[str, Sequence[str]], image_size: int | None = None,
                 name: str | None = None, single: bool = False):
        self.fn = fn
        self.labels = {str(a): tuple(str(x) for x in v) for a, v in labels.items()}
        for a, v in self.labels.items():
            if len(v) < 2 or len(set(v)) != len(v):
                raise ClassifierMismatch(f"labels for {a!r} must be at least two distinct names; got {list(v)}")
        self.image_size = image_size
        self.name = name or getattr(type(fn), "__qualname__", repr(fn))
        self.single = single

    def modules(self) -> list[torch.nn.Module]:
        return [self.fn] if isinstance(self.fn, torch.nn.Module) else []

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        out = self.fn(x)
        if isinstance(out, torch.Tensor):
            if not self.single:
                raise ClassifierMismatch(f"the classifier returned one tensor but declares {len(self.labels)} "
                                         f"attributes {sorted(self.labels)}; return {{attribute: probabilities}}")
            out = {next(iter(self.labels)): out}
        if not isinstance(out, Mapping):
            raise ClassifierMismatch(f"the classifier returned {type(out).__name__}; it must return (N, K) "
                                     "probabilities or {attribute: (N, K) probabilities}")
        res = {}
        for a, lab in self.labels.items():
            if a not in out:
                raise ClassifierMismatch(f"the classifier returned attributes {sorted(out)} but declares "
                                         f"{sorted(self.labels)}")
            p = out[a]
            if not isinstance(p, torch.Tensor) or p.shape != (images.shape[0], len(lab)):
                raise ClassifierMismatch(f"classifier output for {a!r} has shape "
                                         f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}; "
                                         f"expected ({images.shape[0]}, {len(lab)}) probabilities, one column per "
                                         "label")
            res[a] = p
        return res


class _ClipZeroShotHead(torch.nn.Module):
    """A differentiable forward for ``fastfair.classify.ClipZeroShot``: the same class text embeddings and
    logit scale, the image preprocessed with tensor ops (resize the shorter side, centre crop, normalise)."""

    def __init__(self, zs):
        super().__init__()
        self.zs = zs
        self.model = zs.model
        self.size = int(zs.image_size)
        self.register_buffer("mean", torch.tensor(zs.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(zs.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        H, W = images.shape[-2:]
        s = self.size / min(H, W)
        nh, nw = max(self.size, round(H * s)), max(self.size, round(W * s))
        x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False)
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size]
        x = (x - self.mean.to(x)) / self.std.to(x)
        dtype = next(self.model.parameters()).dtype
        pooled = self.model.vision_model(pixel_values=x.to(dtype)).pooler_output
        e = self.model.visual_projection(pooled).float()
        e = e / e.norm(dim=-1, keepdim=True)
        scale = self.model.logit_scale.detach().float().exp()
        return {a: torch.softmax(scale * e @ self.zs.text_embeddings(a).to(e).T, dim=-1) for a in self.zs.labels}


def as_differentiable(classifier, labels=None, image_size: int | None = None) -> DifferentiableClassifier:
    """Wrap a classifier for DFT (see the module docstring for the protocol)."""
    if isinstance(classifier, DifferentiableClassifier):
        return classifier
    # fastfair.classify objects, recognised by shape (the module is optional and owned elsewhere)
    if type(classifier).__name__ == "ClipZeroShot" and hasattr(classifier, "text_embeddings"):
        head = _ClipZeroShotHead(classifier)
        return DifferentiableClassifier(head, classifier.labels, None, name=f"ClipZeroShot({classifier.model_id})")
    if type(classifier).__name__ == "ModuleClassifier" and hasattr(classifier, "module"):
        return DifferentiableClassifier(classifier.module, classifier.labels, image_size or classifier.image_size,
                                        name=getattr(classifier, "name", None))
    if not callable(classifier):
        raise ClassifierMismatch(f"{type(classifier).__name__} is not callable: DFT needs a differentiable classifier "
                                 "(a torch module mapping (N,3,H,W) images in [0,1] to probabilities)")
    labels = labels if labels is not None else getattr(classifier, "labels", None)
    if labels is None:
        raise ClassifierMismatch("the classifier has no labels: pass labels=[...] (one head) or {attribute: [...]}, "
                                 "or give it a `labels` attribute")
    single = not isinstance(labels, Mapping)
    if single:
        labels = {str(getattr(classifier, "attribute", "attribute")): list(labels)}
    return DifferentiableClassifier(classifier, labels, image_size, single=single and len(labels) == 1)


def load_classifier(spec, attributes: Sequence[str], *, device=None, clip_model: str | None = None):
    """A classifier from a ``fastfair.classify`` spec -- ``clip``, ``clip:MODEL_ID``, ``python:FILE.py:FUNC`` (FUNC is
    called with ``attribute_sets=`` and ``device=`` and returns a torch module with ``labels``) -- or an object,
    ready for :func:`as_differentiable`."""
    from . import classify

    if not isinstance(spec, str):
        return spec
    sets = []
    try:
        from .audit.attributes import parse_attributes

        sets, _ = parse_attributes(",".join(attributes))
    except ValueError:
        if spec.strip().startswith("clip"):
            raise
    kw = {"clip_model": clip_model} if clip_model else {}
    clf = classify.load_classifier(spec, sets, device=device, **kw)
    if clf is None:
        raise DFTError("DFT needs a classifier; --classifier none is not possible here")
    return clf


# --------------------------------------------------------------------------------------------
# Quality regulariser encoder
# --------------------------------------------------------------------------------------------

def load_quality_encoders(spec, device=None) -> list[torch.nn.Module]:
    """The quality regulariser's encoders (:func:`fastfair.features.load_encoders`; errors as DFTError)."""
    try:
        return load_encoders(spec, device)
    except FeatureError as e:
        raise DFTError(str(e)) from e


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def parse_targets(specs) -> dict[str, list[float]]:
    """``["age=0.75,0.25", "gender=0.5,0.5"]`` (or one string joined by ';') -> {attribute: [p, ...]}."""
    if specs is None:
        return {}
    if isinstance(specs, str):
        specs = [s for s in specs.split(";") if s.strip()]
    out = {}
    for s in specs:
        if "=" not in s:
            raise TargetError(f"target {s!r} must look like attribute=p1,p2,... (e.g. age=0.75,0.25)")
        name, vals = s.split("=", 1)
        try:
            out[name.strip()] = [float(v) for v in vals.split(",") if v.strip()]
        except ValueError as e:
            raise TargetError(f"target {s!r}: probabilities must be numbers ({e})") from e
    return out


def parse_relax(value, what: str = "relax"):
    """A relaxation factor: one number for every attribute, or one per attribute ({"gender": 0.2, "race": 0.6} or
    "gender=0.2,race=0.6", as the paper's intersectional runs: factor1 / factor2 per attribute)."""
    if isinstance(value, str):
        v = value.strip()
        if "=" not in v:
            try:
                value = float(v)
            except ValueError:
                raise DFTError(f"{what} {value!r} must be a number or attribute=number pairs "
                               "(e.g. gender=0.2,race=0.6)") from None
        else:
            value = {}
            for part in (x for x in v.split(",") if x.strip()):
                name, _, num = part.partition("=")
                try:
                    value[name.strip()] = float(num)
                except ValueError:
                    raise DFTError(f"{what} {part!r}: the factor must be a number (e.g. race=0.6)") from None
    if isinstance(value, Mapping):
        value = {str(k): float(x) for k, x in value.items()}
        bad = [k for k, x in value.items() if not (math.isfinite(x) and x >= 0) or not k]
        if bad or not value:
            raise DFTError(f"{what} must give each attribute a finite factor >= 0; got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise DFTError(f"{what} must be a finite number >= 0 or per-attribute factors; got {value!r}")
    return float(value)


def relax_factors(changed: Mapping[str, torch.Tensor], factors) -> torch.Tensor:
    """Per image, the relaxation of the quality loss (or of its gradient in the face region): 1 where no attribute's
    target changes the frozen image's class (``changed[a]``: (N,) bool, the target dropped or another class),
    else the smallest factor among the attributes that change -- the rule of the paper's intersectional code (one
    number: that number wherever anything changes)."""
    names = list(changed)
    out = torch.full((len(changed[names[0]]),), float("inf"), device=changed[names[0]].device)
    for a in names:
        f = factors[a] if isinstance(factors, Mapping) else factors
        out = torch.where(changed[a], torch.clamp(out, max=f), out)
    return torch.where(torch.isinf(out), torch.ones_like(out), out)  # nothing changed: 1 (a factor > 1 is kept)


@dataclass
class DFTConfig:
    """Settings of a DFT run; defaults follow the paper's code where it has one. N (``images_per_prompt``) is 8, the
    reference's per-GPU default; its runs align N = 24 (gender: 2 GPUs x 12), 32 (gender x race) and 40 (gender x
    race x age) images, which need the memory of several GPUs (``torchrun``)."""

    attributes: Sequence[str] | None = None        # classifier heads to align (default: all of them)
    target: Mapping[str, Sequence[float]] | None = None   # per attribute, in label order; default uniform
    joint_target: Sequence[float] | None = None    # over the joint classes (row-major); overrides `target`
    trainable: str = "text-lora"                   # text-lora | unet-lora | text+unet-lora | soft-tokens; on SD3 /
                                                   # Flux: text-lora | transformer-lora | text+transformer-lora |
                                                   # soft-tokens
    rank: int = 50
    lora_alpha: float | None = None                # None: = rank (scale 1)
    text_lora_modules: Sequence[str] = TEXT_LORA_MODULES
    unet_lora_modules: Sequence[str] = UNET_LORA_MODULES
    transformer_lora_modules: Sequence[str] = TRANSFORMER_LORA_MODULES
    soft_tokens: int = 4                           # k, for trainable="soft-tokens"
    token: str = "<fastfair>"                      # SD3 / Flux: the k tokens are <fastfair_0> ... <fastfair_k-1>
    images_per_prompt: int = 8                     # N: the batch the distribution is aligned over
    batch_size: int | None = None                  # images per backward pass (None: all N in one pass)
    steps: int = 1000                              # optimisation steps
    sampling_steps: tuple[int, int] = (19, 23)     # inclusive range of the random step count
    scheduler: str | None = None                   # dpm++ | ddim | pipeline; None: dpm++ (the paper's) on UNets,
                                                   # the pipeline's flow-matching Euler on SD3 / Flux
    guidance_scale: float | None = None            # None: 7.5 (the paper's) on UNets, 7.0 on SD3, 3.5 on Flux (its
                                                   # distilled guidance embedding; Flux has no CFG batch); always
                                                   # None on FLUX.1-schnell (no guidance input)
    prompt_padding: str = "max_length"             # max_length (77 tokens, as pipelines) | longest (the paper's
                                                   # code: BOS..EOS only, the empty prompt padded to that length)
    height: int | None = None
    width: int | None = None
    gradient_checkpointing: bool = True
    attention: str | None = None                   # fastfair (patched processor, fastfair.ops) | diffusers; None:
                                                   # fastfair on UNets on the CPU, diffusers (SDPA) on CUDA and on
                                                   # SD3 / Flux; fastfair whenever a backend is named
    backend: str = "auto"
    lr: float = 5e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 100.0
    ema_decay: float | None = 0.996
    uncertainty_threshold: float = 0.2
    ot_samples: int = 100                          # 0: exact expectation over every histogram (the paper's
                                                   # closed form for one binary attribute)
    quality_weight: float = 8.0
    quality_relax: float | Mapping[str, float] = 0.2   # per attribute: the smallest factor of the changed ones
    # faces (with a face detector): crops for the classifier, the face-realism loss, the face-region relaxation
    face_crop_size: int = 224                      # classifier crop of the expanded face box
    face_expand: float = 0.5                       # the detected box grows by this fraction, to a square
    face_relax: float | Mapping[str, float] = 0.2  # quality-loss gradient factor inside the face region of images
                                                   # whose target changes the face (the paper's factor2)
    face_weight: float = 1.0                       # face-realism loss (with a face embedder)
    face_confidence: float = 0.9                   # frozen image's class confidence to use its face as the target
    face_flip: bool = True                         # face embedding of the face plus its mirror image
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    # evaluation during training (the paper's code evaluates every 200 steps on validation prompts)
    eval_every: int = 0                            # before the first step and every k steps; 0: never
    eval_prompts: Sequence[str] | None = None      # default: the training prompts
    eval_seeds: int = 16                           # fixed noises (seeds 0..n-1), the same at every evaluation
    eval_steps: int | None = None                  # sampling steps (default: the top of sampling_steps)
    mixed_precision: str = "no"                    # no | fp16 | bf16 (autocast, CUDA only)
    seed: int = 0

    def __post_init__(self):
        if self.trainable not in TRAINABLES:
            raise DFTError(f"trainable must be one of {TRAINABLES}; got {self.trainable!r}")
        if self.scheduler not in (None, "dpm++", "ddim", "pipeline"):
            raise DFTError(f"scheduler must be dpm++, ddim or pipeline; got {self.scheduler!r}")
        if self.guidance_scale is not None and not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise DFTError(f"guidance_scale must be a finite number >= 0; got {self.guidance_scale}")
        if self.attention not in (None, "fastfair", "diffusers"):
            raise DFTError(f"attention must be 'fastfair' or 'diffusers'; got {self.attention!r}")
        if self.prompt_padding not in ("max_length", "longest"):
            raise DFTError(f"prompt_padding must be 'max_length' or 'longest'; got {self.prompt_padding!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise DFTError(f"mixed_precision must be no, fp16 or bf16; got {self.mixed_precision!r}")
        ss = self.sampling_steps
        lo, hi = (ss, ss) if isinstance(ss, int) else ss
        if not 1 <= lo <= hi:
            raise DFTError(f"sampling_steps must be a range lo <= hi with lo >= 1; got {self.sampling_steps}")
        self.sampling_steps = (int(lo), int(hi))
        for k in ("height", "width"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise DFTError(f"{k} must be a positive number of pixels (or None: the model's default); got {v!r}")
        if self.images_per_prompt < 1 or (self.batch_size is not None and self.batch_size < 1):
            raise DFTError("images_per_prompt and batch_size must be >= 1")
        if self.steps < 1:  # 0 wrote an untrained LoRA and reported success
            raise DFTError(f"steps (--steps) must be >= 1 optimisation steps; got {self.steps}")
        if self.rank < 1 or self.soft_tokens < 1:
            raise DFTError("rank and soft_tokens must be >= 1")
        if not isinstance(self.token, str) or not self.token.strip("<>") or any(c.isspace() or c in "{}"
                                                                                for c in self.token):
            raise DFTError(f"token must be one word without spaces or braces, e.g. '<fastfair>'; got {self.token!r}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise DFTError(f"ema_decay must be in [0, 1) or None; got {self.ema_decay}")
        if self.checkpoint_every < 0:
            raise DFTError("checkpoint_every must be >= 0 (0: no checkpoints)")
        if self.eval_every < 0 or self.eval_seeds < 1 or (self.eval_steps is not None and self.eval_steps < 1):
            raise DFTError("eval_every must be >= 0 (0: no evaluation), eval_seeds >= 1 and eval_steps >= 1")
        if isinstance(self.eval_prompts, str):
            self.eval_prompts = [self.eval_prompts]
        if self.ot_samples < 0:
            raise DFTError(f"ot_samples must be >= 1, or 0 for the exact expectation; got {self.ot_samples}")
        self.quality_relax = parse_relax(self.quality_relax, "quality_relax")
        self.face_relax = parse_relax(self.face_relax, "face_relax")
        if self.face_crop_size < 1 or self.face_expand < 0 or self.face_weight < 0:
            raise DFTError("face_crop_size must be >= 1, face_expand and face_weight >= 0")
        if not 0 <= self.face_confidence <= 1:
            raise DFTError(f"face_confidence must be in [0, 1]; got {self.face_confidence}")
        if isinstance(self.target, (str, list, tuple)):
            self.target = parse_targets(self.target)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attributes"] = list(self.attributes) if self.attributes is not None else None
        d["target"] = {k: list(v) for k, v in self.target.items()} if self.target else None
        d["joint_target"] = list(self.joint_target) if self.joint_target is not None else None
        d["eval_prompts"] = list(self.eval_prompts) if self.eval_prompts is not None else None
        for k in ("text_lora_modules", "unet_lora_modules", "transformer_lora_modules", "sampling_steps", "adam_betas"):
            d[k] = list(d[k])
        return d


# --------------------------------------------------------------------------------------------
# Pieces of the trainer
# --------------------------------------------------------------------------------------------

class _ComputeAllRecorder:
    """Stands in for a MapRecorder on a patched pipeline: every cross-attention goes through
    ``fastfair.ops.cross_attention`` (no maps asked for), so its backward is fastfair's."""

    active = True
    tokens = None
    map_states = None

    def __init__(self):
        from .maps import Aggregation

        self.aggregation = Aggregation("dft", frozenset({"down", "mid", "up", "other"}), True, "cond")

    def wants(self, block, nq):
        return True

    def rows(self, batch):
        return slice(0, batch)

    def add(self, *args, **kwargs):
        pass


class _EMA:
    """diffusers' ``EMAModel`` as the reference training script uses it: update k (1-based) takes the decay
    min(decay, (1 + j) / (10 + j)) with j = k - 1 (0 at the first update: the shadow starts as the weights),
    so short runs are not dominated by the initial weights."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    def decay_at(self, k: int) -> float:
        j = k - 1
        return 0.0 if j <= 0 else min(self.decay, (1 + j) / (10 + j))

    @torch.no_grad()
    def update(self, params):
        self.updates += 1
        d = self.decay_at(self.updates)
        for s, p in zip(self.shadow, params):
            s.lerp_(p.detach(), 1.0 - d)


@dataclass
class DFTResult:
    out_dir: Path | None
    steps: int
    history: list[dict]
    lora_dir: Path | None = None
    lora_ema_dir: Path | None = None
    soft_tokens: Path | None = None
    soft_tokens_ema: Path | None = None
    token: str | None = None
    evaluations: list = field(default_factory=list)
    report: Path | None = None


def _enable_lora(module: torch.nn.Module, enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


def _rng_state(r: random.Random):
    v, state, gauss = r.getstate()
    return [v, list(state), gauss]


def _set_rng_state(r: random.Random, s):
    r.setstate((s[0], tuple(s[1]), s[2]))


def _model_kind(pipe) -> str:
    """sd (1.x / 2.x), sdxl, sd3 or flux; anything else is refused."""
    from .processors import is_flux

    if getattr(pipe, "text_encoder", None) is not None:
        if getattr(pipe, "unet", None) is not None:
            return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
        net = getattr(pipe, "transformer", None)
        if net is not None and is_flux(net) and hasattr(pipe, "_pack_latents"):
            return "flux"
        if net is not None and hasattr(pipe, "text_encoder_3"):
            return "sd3"
    raise DFTError("DFT supports Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux pipelines (a UNet with CLIP text "
                   f"encoders, or SD3's / Flux's transformer); got {type(pipe).__name__}")


def _resolve_defaults(cfg: DFTConfig, kind: str, pipe) -> None:
    """The settings left to the model (None): DPM-Solver++, the paper's 7.5 and fastfair's attention on UNets (SDPA
    on CUDA); the pipeline's flow-matching Euler, the pipeline's guidance scale and SDPA on SD3 / Flux. A named
    ``backend`` takes fastfair's attention (the only one that runs it)."""
    mmdit = kind in ("sd3", "flux")
    if cfg.scheduler is None:
        cfg.scheduler = "pipeline" if mmdit else "dpm++"
    # None on a Flux transformer without a guidance embedding (FLUX.1-schnell: no guidance input, any value unused)
    cfg.guidance_scale = guidance_scale_for(pipe, cfg.guidance_scale)
    if cfg.attention is None:
        # UNets on CUDA: diffusers' SDPA too. Its CUDA kernels (flash / memory-efficient) keep no probabilities for
        # the backward either, and on an H200 (bench/RESULTS.md, 2026-11-27) fastfair's Triton forward + backward
        # took 0.95-2.6x SDPA's time at SD1.5's shapes (fp16; fp32 unmeasured), and a DFT step at SD1.5 size with 8
        # images through them died of a CUDA error (not understood yet). On the CPU SDPA's math path keeps every
        # probability for the backward; fastfair's does not. A named backend (triton / native / reference) runs only
        # through fastfair's attention.
        on_cuda = getattr(getattr(pipe, "device", None), "type", None) == "cuda"
        named = (cfg.backend or "auto") != "auto"
        cfg.attention = "diffusers" if (mmdit or on_cuda) and not named else "fastfair"


def _check_for_model(cfg: DFTConfig, kind: str, pipe) -> None:
    _check_kind(cfg, kind)
    if kind in ("sd3", "flux"):
        name = {"sd3": "SD3", "flux": "Flux"}[kind]
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = pipe.scheduler
        if type(sched) is not FlowMatchEulerDiscreteScheduler or sched.config.get("stochastic_sampling", False):
            raise DFTError(f"adjusted DFT on {name} scales each Euler step's velocity by the step's sigma difference; "
                           f"the pipeline's scheduler is {type(sched).__name__}"
                           f"{' with stochastic sampling' if type(sched) is FlowMatchEulerDiscreteScheduler else ''}: "
                           "set pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config) "
                           "(deterministic)")


PIPELINE_KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                  "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
PRESET_KINDS = {"tiny-sd": "sd", "sd15-shaped": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}


def _kind_without_loading(model: str) -> str | None:
    """The model kind of a preset or a local pipeline folder (its model_index.json), without loading weights;
    None when it cannot be told (a hub id: loading decides)."""
    if model in PRESET_KINDS:
        return PRESET_KINDS[model]
    index = Path(model) / "model_index.json"
    try:
        return PIPELINE_KINDS.get(json.loads(index.read_text()).get("_class_name")) if index.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _check_kind(cfg: DFTConfig, kind: str) -> None:
    """The settings that the model kind alone rules out (checked before loading the model where it can be told)."""
    name = {"sd": "Stable Diffusion", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}[kind]
    if kind in ("sd3", "flux"):
        if cfg.trainable in ("unet-lora", "text+unet-lora"):
            raise DFTError(f"{name}'s denoiser is a transformer, not a UNet: use trainable="
                           f"{cfg.trainable.replace('unet', 'transformer')!r} (--trainable "
                           f"{cfg.trainable.replace('unet', 'transformer')})")
        if cfg.prompt_padding != "max_length":
            raise DFTError(f"prompt_padding='longest' reproduces the paper's SD 1.5 code; {name} is trained with its "
                           "pipeline's own padded conditioning (use 'max_length')")
        if cfg.scheduler not in (None, "pipeline"):
            raise DFTError(f"{name} samples by flow matching: scheduler={cfg.scheduler!r} is a noise-prediction "
                           "solver; use 'pipeline' (the pipeline's flow-matching Euler scheduler, the default)")
    else:
        if cfg.trainable in ("transformer-lora", "text+transformer-lora"):
            raise DFTError(f"{name}'s denoiser is a UNet, not a transformer: use trainable="
                           f"{cfg.trainable.replace('transformer', 'unet')!r} (--trainable "
                           f"{cfg.trainable.replace('transformer', 'unet')})")
        if kind == "sdxl" and cfg.prompt_padding != "max_length":
            raise DFTError("prompt_padding='longest' reproduces the paper's SD 1.5 code; SDXL pipelines are sampled "
                           "with their own 77-token conditioning (use 'max_length')")


def mmdit_soft_token_names(token: str, k: int) -> list[str]:
    """SD3 / Flux soft tokens: k distinct added tokens "<fastfair_0>" ... (their pipelines have no multi-vector
    textual inversion, so the prompt spells every one of them out)."""
    return [f"<{token.strip('<>')}_{i}>" for i in range(k)]


def _prompt_soft_tokens(token: str, k: int, kind: str) -> list[str]:
    """The soft tokens as prompts spell them: the textual-inversion token (SD 1.x/2.x, SDXL: the pipeline expands
    it into its k vectors), or every one of the k added tokens (SD3, Flux)."""
    return mmdit_soft_token_names(token, k) if kind in ("sd3", "flux") else [token]


def _soft_encoders(pipe, kind: str) -> list[tuple[str, str, str]]:
    """(text encoder, tokenizer, file key) that soft tokens live in: every encoder that reads the prompt -- SD3's
    CLIPs and T5, Flux's CLIP (pooled) and T5; SD 1.x/2.x's and SDXL's CLIPs."""
    if kind == "sd":
        return [("text_encoder", "tokenizer", "clip_l")]
    out = [("text_encoder", "tokenizer", "clip_l")]
    if kind in ("sdxl", "sd3"):
        out.append(("text_encoder_2", "tokenizer_2", "clip_g"))
    if kind == "sd3" and getattr(pipe, "text_encoder_3", None) is not None:
        out.append(("text_encoder_3", "tokenizer_3", "t5"))
    if kind == "flux":
        out.append(("text_encoder_2", "tokenizer_2", "t5"))
    return out


def _fix_clip_pooling(enc, tok) -> None:
    """CLIP text encoders whose config keeps the legacy ``eos_token_id = 2`` (openai/clip-vit-large-patch14 and the
    encoders copied from it: SD 1.5, SDXL, SD3, FLUX.1) pool at the *highest token id* of the prompt, which is EOS
    only until tokens are added: with soft tokens the pooled embedding would be read at the last soft token, before
    any word (CLIP is causal), and no longer depend on the prompt. Point the encoder at the tokenizer's real EOS id:
    for prompts without added tokens the pooled position is the same (the first EOS is the highest id)."""
    tm = getattr(enc, "text_model", enc)   # transformers 5's CLIPTextModel pools itself; older ones in text_model
    eos = getattr(tok, "eos_token_id", None)
    if eos is None or getattr(tm, "eos_token_id", None) != 2 or eos == 2:
        return
    tm.eos_token_id = eos
    enc.config.eos_token_id = eos
    if hasattr(enc.config, "text_config"):
        enc.config.text_config.eos_token_id = eos


def _add_token_rows(enc, tok, names: list[str], rows: torch.Tensor | None) -> list[int]:
    """Add ``names`` to the tokenizer (and rows to the encoder's embedding table where its ids fall outside it);
    with ``rows`` (k, width) set their embeddings. Returns their ids."""
    tok.add_tokens(names)
    ids = tok.convert_tokens_to_ids(names)
    emb = enc.get_input_embeddings()
    if max(ids) >= emb.num_embeddings:   # T5's table already has spare rows past its 32100 pieces
        try:
            enc.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        except TypeError:   # transformers without mean_resizing
            enc.resize_token_embeddings(max(ids) + 1)
        emb = enc.get_input_embeddings()
    if rows is not None:
        with torch.no_grad():
            emb.weight[ids] = rows.to(emb.weight.device, emb.weight.dtype)
    return ids


def _check_untouched(pipe, cfg: DFTConfig, kind: str) -> None:
    """Refuse a pipeline that already holds LoRA adapters or the soft tokens' placeholder: a previous trainer's (DFT
    changes the pipeline in place) or a loaded LoRA, which the frozen reference would silently switch off too."""
    names = ["transformer" if kind in ("sd3", "flux") else "unet", "text_encoder", "text_encoder_2", "text_encoder_3"]
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:   # no peft: no adapters can have been added
        BaseTunerLayer = None
    if BaseTunerLayer is not None:
        held = [n for n in names if getattr(pipe, n, None) is not None
                and any(isinstance(m, BaseTunerLayer) for m in getattr(pipe, n).modules())]
        if held:
            raise DFTError(f"the pipeline's {', '.join(held)} already hold LoRA adapters (a previous DFT trainer's -- "
                           "DFT changes the pipeline in place -- or a LoRA loaded with load_lora_weights); the frozen "
                           "reference of the quality loss switches every adapter off, so start from a pipeline "
                           "without them: load it afresh, or bake a LoRA to keep into the weights first with "
                           "pipe.fuse_lora(); pipe.unload_lora_weights()")
    if cfg.trainable == "soft-tokens":
        first = _prompt_soft_tokens(cfg.token, cfg.soft_tokens, kind)[0]
        for t in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tok = getattr(pipe, t, None)
            if tok is not None and first in tok.get_vocab():
                raise DFTError(f"the pipeline's {t} already has the token {cfg.token!r} (soft tokens of a previous "
                               "DFT trainer or a loaded textual inversion): load the pipeline afresh, or give another "
                               "token= (--token)")


class DFTTrainer:
    """Adjusted DFT on a Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux pipeline; the pipeline is changed in place
    (adapters or soft tokens are added and trained). ``step()`` runs one iteration; ``train()`` runs
    ``config.steps``. ``config`` is copied: the settings left to the model (None: scheduler, guidance scale,
    attention) are resolved in ``trainer.cfg``, the caller's object is not changed.

    ``prompts``: the training prompts. ``classifier``: see the module docstring (``labels`` goes to
    :func:`as_differentiable`). ``quality_encoder``: see :func:`load_quality_encoders` ("clip", the default, is
    CLIP ViT-L/14; "paper" is CLIP ViT-H/14 + DINOv2 as Shen et al.; a module; None for no quality regulariser).

    Faces (Shen et al.'s setting): with ``face_detector`` (a callable on RGB uint8 images, "insightface",
    "python:FILE.py:FUNC", or a :class:`fastfair.faces.FaceCropper`) the classifier sees the crop of each image's largest face (box expanded
    by ``face_expand``, ``face_crop_size`` pixels); images without a face get no alignment target (the targets
    are computed over the images with a face), keep the full quality weight, and the quality loss's gradient is
    scaled by ``face_relax`` inside the (crop) face box of images whose target is not a kept target equal to
    the frozen image's class. ``face_embedder``
    (a module mapping aligned 112 x 112 faces in [0, 1] to embeddings) adds the face-realism loss: 1 - cosine
    to the frozen image's face where the target keeps its class (frozen confidence >= ``face_confidence``),
    otherwise to the nearest of ``face_bank`` ((M, D) embeddings of real faces; without one such images get
    no face-realism loss).
    ``out_dir``: where checkpoints and outputs go. ``resume``: a checkpoint folder, or "latest" in out_dir.
    An ``out_dir`` that holds a run (outputs or checkpoints) is refused without ``resume`` -- its LoRA would be
    replaced and its checkpoints would mix with the new run's -- unless ``overwrite=True``, which removes them.
    """

    def __init__(self, pipe, prompts: Sequence[str] | str, classifier, config: DFTConfig | None = None, *,
                 labels=None, quality_encoder="clip", out_dir: str | os.PathLike | None = None,
                 resume: str | os.PathLike | None = None, overwrite: bool = False, face_detector=None,
                 face_embedder=None, face_bank=None, model_name: str | None = None):
        _need_scipy()
        self.pipe = pipe
        name = model_name or getattr(getattr(pipe, "config", None), "_name_or_path", None)
        self.model_name = str(name) if name else None
        # a copy: the model-dependent defaults (scheduler, guidance scale, attention) are resolved into it
        self.cfg = cfg = copy.copy(config) if config is not None else DFTConfig()
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.prompts:
            raise DFTError("no training prompts")
        self.kind = _model_kind(pipe)
        self._mmdit = self.kind in ("sd3", "flux")
        self._xl = self.kind == "sdxl"   # SDXL: two text encoders, pooled + time ids
        self.net = denoiser(pipe)
        self.device = pipe.device
        if cfg.mixed_precision != "no" and self.device.type != "cuda":
            raise DFTError(f"mixed_precision={cfg.mixed_precision!r} is autocast on CUDA; on {self.device.type} "
                           "use 'no'")
        _resolve_defaults(cfg, self.kind, pipe)
        _check_for_model(cfg, self.kind, pipe)
        _check_untouched(pipe, cfg, self.kind)
        if cfg.trainable == "soft-tokens":   # a pipeline rewrites every occurrence of the token, inside words too
            names = _prompt_soft_tokens(cfg.token, cfg.soft_tokens, self.kind)
            for p in [*self.prompts, *(cfg.eval_prompts or [])]:
                hit = [t for t in names if t in p]
                if hit:
                    raise DFTError(f"the soft token {hit[0]!r} occurs in the prompt {p!r}: the pipeline would rewrite "
                                   "it; choose a token that no prompt contains (token= / --token)")
        if self._mmdit:   # as the pipelines require (SD3 refuses, Flux silently rounds down)
            mult = pipe.vae_scale_factor * (2 if self.kind == "flux" else self.net.config.patch_size)
            hw = self._image_hw()
            if hw[0] % mult or hw[1] % mult:
                raise DFTError(f"{self.kind.upper()} images need a height and width divisible by {mult}; got "
                               f"{hw[0]}x{hw[1]} (height=, width= / --height, --width)")
        self.rank, self.world = _world()
        if self.world == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise DFTError(f"running under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) without a process group: "
                           "call torch.distributed.init_process_group() first (fastfair finetune dft does), or every "
                           "process trains on all the images and writes the same folder")
        if cfg.images_per_prompt % self.world:
            raise DFTError(f"images_per_prompt={cfg.images_per_prompt} must be a multiple of the {self.world} "
                           "processes: each takes an equal share of every prompt's images")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        # rank 0 checks the folder now (and with overwrite clears it once every other check has passed, below);
        # every rank hears why not
        self._run_dir(resume is not None, overwrite, remove=False)
        resume_path = self._resolve_resume(resume) if resume is not None else None

        # classifier and targets ---------------------------------------------------------------
        self.classifier = as_differentiable(classifier, labels)
        for m in self.classifier.modules():
            m.requires_grad_(False)
        have = self.classifier.labels
        attrs = list(cfg.attributes) if cfg.attributes is not None else list(have)
        missing = [a for a in attrs if a not in have]
        if missing or not attrs:
            raise ClassifierMismatch(f"attributes {missing or attrs} are not heads of the classifier "
                                     f"({self.classifier.name} classifies {sorted(have)}); align only those, or give a "
                                     "classifier with these attributes")
        self.attributes = attrs
        for what in ("quality_relax", "face_relax"):  # per-attribute factors: exactly the aligned attributes
            f = getattr(cfg, what)
            if isinstance(f, Mapping) and set(f) != set(attrs):
                raise DFTError(f"{what} gives factors for {sorted(f)} but the aligned attributes are {attrs}; give one "
                               "factor per aligned attribute, or one number")
        self.labels = {a: have[a] for a in attrs}
        self.joint_target = self._joint_target()
        K = len(self.joint_target)
        if cfg.ot_samples == 0:   # the exact expectation: its histogram count is known now, not at the first step
            alignment.check_exact(self.joint_target, cfg.images_per_prompt)
        if cfg.images_per_prompt < 2:
            raise TargetError(f"images_per_prompt={cfg.images_per_prompt}: the distribution is aligned over the N "
                              "images of a prompt, so use images_per_prompt >= 2 (the paper's runs: 24-40)")
        if cfg.images_per_prompt < K:
            warnings.warn(f"images_per_prompt={cfg.images_per_prompt} is smaller than the {K} "
                          f"{'joint ' if len(attrs) > 1 else ''}classes of {' x '.join(attrs)}: each step's targets "
                          "fill at most that many classes and the uncertainty threshold drops most images (the "
                          f"paper's runs aligned N = 40 images over 16 classes); consider images_per_prompt >= {K}",
                          UserWarning, stacklevel=2)

        # faces ------------------------------------------------------------------------------------
        self.faces = self.face_embedder = self.face_bank = None
        if face_detector is not None:
            from .faces import FaceCropper, FaceError, load_detector

            if isinstance(face_detector, FaceCropper):
                if (face_detector.crop_size, face_detector.expand) != (cfg.face_crop_size, cfg.face_expand):
                    raise DFTError(f"the FaceCropper crops {face_detector.crop_size} px with expand "
                                   f"{face_detector.expand} but the config says face_crop_size={cfg.face_crop_size}, "
                                   f"face_expand={cfg.face_expand}; set the config to match, or pass the detector "
                                   "alone")
                self.faces = face_detector
            else:
                try:
                    face_detector = load_detector(face_detector)
                except FaceError as e:
                    raise DFTError(str(e)) from e
                self.faces = FaceCropper(face_detector, crop_size=cfg.face_crop_size, expand=cfg.face_expand)
        if face_embedder is not None and cfg.face_weight > 0:
            if self.faces is None:
                raise DFTError("a face embedder needs a face detector (face_detector=...): the face-realism loss is "
                               "computed on each image's aligned face")
            self.face_embedder = face_embedder
            if isinstance(face_embedder, torch.nn.Module):
                face_embedder.requires_grad_(False).eval()
        if face_bank is not None and face_embedder is None:
            raise DFTError("face_bank is used by the face-realism loss: give face_embedder too")
        if face_bank is not None and self.face_embedder is not None:
            bank = torch.as_tensor(np.asarray(face_bank) if not isinstance(face_bank, torch.Tensor) else face_bank)
            if bank.ndim != 2 or len(bank) == 0 or not torch.isfinite(bank).all():
                raise DFTError(f"face_bank must be a finite (M, D) matrix of face embeddings; got shape "
                               f"{tuple(bank.shape)}")
            self.face_bank = F.normalize(bank.float(), dim=-1).to(self.device)
            with torch.no_grad():   # the embedder's width must be the bank's: checked now, not steps into the run
                d = self._embed_faces(torch.zeros((1, 3, 112, 112), device=self.device)).shape[1]
            if d != self.face_bank.shape[1]:
                raise DFTError(f"the face embedder gives {d}-dimensional embeddings but the face bank holds "
                               f"{self.face_bank.shape[1]}-dimensional ones: embed the bank's faces with the same "
                               "network")
        self._warned_no_face = False

        # quality encoders ----------------------------------------------------------------------------
        self.quality = [] if cfg.quality_weight <= 0 else load_quality_encoders(quality_encoder, self.device)
        for enc in self.quality:
            if isinstance(enc, torch.nn.Module):
                enc.requires_grad_(False)

        self._sched = self._make_scheduler()
        if self._mmdit:
            self._check_schedule()
        # every check has passed: the model and the folder change from here on
        self._run_dir(resume is not None, overwrite, remove=True)

        # the model ---------------------------------------------------------------------------------
        for m in (self.net, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                  getattr(pipe, "text_encoder_3", None)):
            if m is not None:
                m.requires_grad_(False)
        # the frozen models' identity (weights digests), before adapters are added: a checkpoint resumes only on the
        # same base model, quality encoders and face embedder / bank (a same-shaped SD 1.4 under a 1.5 run, or a
        # swapped encoder, would continue one training on another model)
        from .pipelines import module_digest, pipeline_fingerprint

        self._identity = None
        if self.rank == 0:  # one pass over the weights, on rank 0 only (broadcast below)
            base = pipeline_fingerprint(pipe)
            self._identity = dict(base={k: base.get(k) for k in ("weights", "vae_weights", "adapters")},
                                  quality=[module_digest(e) if isinstance(e, torch.nn.Module) else type(e).__name__
                                           for e in self.quality])
            if self.face_embedder is not None:
                self._identity["face_embedder"] = (module_digest(self.face_embedder)
                                                   if isinstance(self.face_embedder, torch.nn.Module) else None)
                self._identity["face_bank"] = (
                    hashlib.sha256(self.face_bank.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
                    if self.face_bank is not None else None)
        # rank 0's: processes on other GPUs could round a weight sum differently and refuse each other's checkpoints
        self._identity = _dist.broadcast(self._identity, self.world)
        torch.manual_seed(cfg.seed)  # adapter / token initialisation
        self.named_params = self._add_trainables()
        self.params = [p for _, p in self.named_params]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self.ema = _EMA(self.params, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.scaler = (torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None)
        self._ckpt_state = self._set_checkpointing(cfg.gradient_checkpointing)
        self._we_patched = False
        if cfg.attention == "fastfair":
            from .processors import is_patched, patch

            if not is_patched(pipe):
                patch(pipe, backend=cfg.backend)
                self._we_patched = True
            self._recorder = _ComputeAllRecorder()

        # randomness: all of it lives here and goes into checkpoints ------------------------------------
        self.step_idx = 0
        self.noise_gen = torch.Generator("cpu").manual_seed(cfg.seed)
        self.py_rng = random.Random(cfg.seed + 1)
        self.np_rng = np.random.default_rng(cfg.seed + 2)
        self._order: list[int] = []
        self.history: list[dict] = []
        self.evaluations: list[dict] = []
        if resume_path is not None:
            try:
                self.load_checkpoint(resume_path)
            except ResumeError as e:
                raise ResumeError(f"{e}\n(the pipeline now holds this trainer's "
                                  f"{'soft tokens' if cfg.trainable == 'soft-tokens' else 'LoRA adapters'}: load a "
                                  "fresh pipeline before trying again)") from None

    # ---------------------------------------------------------------------------------------------
    def _run_dir(self, resuming: bool, overwrite: bool, remove: bool) -> None:
        if self.out_dir is None:
            return
        err = None
        if self.rank == 0:
            try:
                _check_run_dir(self.out_dir, resuming, overwrite, remove)
            except DFTError as e:
                err = str(e)
        err = _dist.broadcast(err, self.world)
        if err:
            raise DFTError(err)

    def _set_flow_timesteps(self, n_steps: int, latent_hw=None) -> None:
        """SD3 / Flux: the pipeline's timesteps for n_steps (Flux's linear sigmas and resolution shift mu; SD3's
        static shift, or mu under dynamic shifting)."""
        sched, h_w = self._sched, latent_hw or self._latent_hw()
        h, w = h_w
        if self.kind == "flux":
            sigmas = None if sched.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / n_steps, n_steps)
            sched.set_timesteps(n_steps, device=self.device, sigmas=sigmas, mu=_flow_shift(sched, (h // 2) * (w // 2)))
        else:
            p = self.net.config.patch_size
            mu = (_flow_shift(sched, (h // p) * (w // p), max_shift=1.16)
                  if sched.config.get("use_dynamic_shifting", False) else None)
            sched.set_timesteps(n_steps, device=self.device, **({} if mu is None else {"mu": mu}))

    def _check_schedule(self) -> None:
        """Every step count training or evaluation samples with gives finite, decreasing sigmas (the adjusted
        gradient divides by their differences): checked now, not at the first step."""
        lo, hi = self.cfg.sampling_steps
        counts = sorted(set(range(lo, hi + 1)) | {self.cfg.eval_steps or hi})
        sched = self._sched
        try:
            for n in counts:
                self._set_flow_timesteps(n)
                sig = sched.sigmas.double()
                if len(sig) != n + 1 or not bool(torch.isfinite(sig).all()):
                    raise ValueError(f"{n} steps give the sigmas {sig.tolist()}")
                flow_grad_coefficients(sched)
        except (ValueError, IndexError, ZeroDivisionError) as e:
            opts = {k: sched.config.get(k) for k in ("invert_sigmas", "shift_terminal", "use_karras_sigmas",
                                                     "use_exponential_sigmas", "use_beta_sigmas")
                    if sched.config.get(k)}
            raise DFTError(f"the pipeline's flow-matching schedule cannot be trained through ({e})"
                           + (f"; its scheduler sets {opts}" if opts else "")
                           + ": adjusted DFT needs sigmas that decrease at every step (invert_sigmas is never "
                           "supported; shift_terminal needs at least 2 sampling steps): change the scheduler "
                           "config or the step counts (sampling_steps, eval_steps)") from None

    def _joint_target(self) -> np.ndarray:
        cfg = self.cfg
        sizes = [len(self.labels[a]) for a in self.attributes]
        if cfg.joint_target is not None:
            if cfg.target:  # one would be ignored (and dft.json would record it beside the one used)
                raise TargetError("give target (per attribute) or joint_target (over the joint classes), not both "
                                  "(--target / --joint-target)")
            return alignment.check_target(cfg.joint_target, int(np.prod(sizes)),
                                          f"joint target over {' x '.join(self.attributes)}")
        tg = dict(cfg.target or {})
        extra = [a for a in tg if a not in self.attributes]
        if extra:
            verb = "are" if len(extra) > 1 else "is"
            raise ClassifierMismatch(f"a target is given for {extra}, which {verb} not among "
                                     f"the aligned attributes {self.attributes} (the classifier classifies "
                                     f"{sorted(self.classifier.labels)})")
        per = []
        for a in self.attributes:
            k = len(self.labels[a])
            per.append(alignment.check_target(tg[a], k, f"target for {a!r} ({', '.join(self.labels[a])})")
                       if a in tg else np.full(k, 1.0 / k))
        return alignment.joint_target(per)

    def _make_scheduler(self):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        base = self.pipe.scheduler
        self._v_pred = False
        if self._mmdit:   # flow matching: the pipeline's Euler scheduler (checked in _check_for_model)
            return copy.deepcopy(base)
        if self.cfg.scheduler == "dpm++":
            s = DPMSolverMultistepScheduler.from_config(base.config, algorithm_type="dpmsolver++")
        elif self.cfg.scheduler == "ddim":
            s = DDIMScheduler.from_config(base.config)
        else:
            s = copy.deepcopy(base)
        pred = getattr(s.config, "prediction_type", "epsilon")
        self._v_pred = pred == "v_prediction"
        if self._v_pred:
            # SD 2.x 768-v: the sampler runs on eps = sqrt(abar) v + sqrt(1 - abar) x_t (exact at the UNet's
            # input x_t), so adjusted DFT scales the noise prediction's gradient as for an epsilon model
            s = type(s).from_config(s.config, prediction_type="epsilon")
        elif pred != "epsilon":
            raise DFTError("adjusted DFT scales the noise prediction; this model predicts "
                           f"{pred!r} (epsilon and v-prediction models are supported)")
        return s

    def _add_trainables(self) -> list[tuple[str, torch.nn.Parameter]]:
        cfg, pipe = self.cfg, self.pipe
        out = []
        if cfg.trainable == "soft-tokens":
            self._setup_soft_tokens()
            return [("soft_tokens", self.soft)]
        _need_peft()
        from peft import LoraConfig, inject_adapter_in_model

        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.rank
        self.lora_configs = {}
        if cfg.trainable in ("text-lora", "text+unet-lora", "text+transformer-lora"):
            lc = LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                            target_modules=list(cfg.text_lora_modules))
            # peft directly: transformers' add_adapter insists on a newer peft than diffusers needs
            for name in self._text_encoders():
                inject_adapter_in_model(lc, getattr(pipe, name), adapter_name="default")
                self.lora_configs[name] = lc
                out += [(f"{name}.{n}", p) for n, p in getattr(pipe, name).named_parameters() if "lora_" in n]
        if cfg.trainable in ("unet-lora", "text+unet-lora", "transformer-lora", "text+transformer-lora"):
            name = "transformer" if self._mmdit else "unet"
            lc = LoraConfig(r=cfg.rank, lora_alpha=alpha, init_lora_weights="gaussian",
                            target_modules=list(cfg.transformer_lora_modules if self._mmdit else cfg.unet_lora_modules))
            self.net.add_adapter(lc)
            self.lora_configs[name] = lc
            out += [(f"{name}.{n}", p) for n, p in self.net.named_parameters() if "lora_" in n]
        for _, p in out:
            p.requires_grad_(True)
            p.data = p.data.float()
        if not out:
            raise DFTError(f"no LoRA parameters were added (target modules {cfg.text_lora_modules} / "
                           f"{cfg.transformer_lora_modules if self._mmdit else cfg.unet_lora_modules})")
        return out

    def _text_encoders(self) -> tuple[str, ...]:
        """The pipeline's text encoders that text LoRA trains: the CLIP encoders the pipeline's LoRA loader reads --
        SDXL's and SD3's two, SD 1.x/2.x's one, Flux's one (its pooled embedding); not SD3's / Flux's T5 (soft tokens
        live in every encoder: :func:`_soft_encoders`)."""
        return ("text_encoder", "text_encoder_2") if self.kind in ("sdxl", "sd3") else ("text_encoder",)

    def _setup_soft_tokens(self):
        """k trainable token embeddings, one parameter (k, sum of the encoders' widths): on SDXL its first
        columns are the tokens' embeddings in CLIP ViT-L, the rest in OpenCLIP ViT-bigG; on SD3 CLIP ViT-L,
        OpenCLIP ViT-bigG, T5; on Flux CLIP ViT-L (its pooled embedding) and T5. SD 1.x/2.x and SDXL load them as a
        multi-vector textual inversion ("<fastfair>", "<fastfair>_1", ...); SD3 and Flux as k added tokens
        ("<fastfair_0>" ...) that the prompt spells out."""
        cfg, pipe = self.cfg, self.pipe
        g = torch.Generator().manual_seed(cfg.seed)
        toks = (mmdit_soft_token_names(cfg.token, cfg.soft_tokens) if self._mmdit
                else [cfg.token] + [f"{cfg.token}_{i}" for i in range(1, cfg.soft_tokens)])
        inits, self._soft_cols, self._soft_keys, self._soft_hooks, col = [], [], [], [], 0
        self._soft_tables = []
        for name, tname, key in _soft_encoders(pipe, self.kind):
            enc, tok = getattr(pipe, name), getattr(pipe, tname)
            w = enc.get_input_embeddings().weight
            init = torch.randn(cfg.soft_tokens, w.shape[1], generator=g) * float(w.std())
            _fix_clip_pooling(enc, tok)
            if self._mmdit:
                _add_token_rows(enc, tok, toks, init)
            else:
                pipe.load_textual_inversion({cfg.token: init.to(w.dtype)}, token=cfg.token, text_encoder=enc,
                                            tokenizer=tok)
            ids = torch.tensor(tok.convert_tokens_to_ids(toks), device=self.device)
            self._soft_keys.append(key)
            self._soft_tables.append((enc, ids))
            cols = slice(col, col + w.shape[1])
            col = cols.stop
            inits.append(init)
            self._soft_cols.append(cols)

            def hook(module, inputs, output, _ids=ids, _cols=cols):
                ids_in = inputs[0]
                match = ids_in[..., None] == _ids.to(ids_in.device)  # (B, L, k); encoders may sit elsewhere (offload)
                if not match.any():
                    return output
                which = match.float().argmax(-1)
                return torch.where(match.any(-1, keepdim=True), self.soft[which][..., _cols].to(output.dtype), output)

            self._soft_hooks.append(enc.get_input_embeddings().register_forward_hook(hook))
        self.soft = torch.nn.Parameter(torch.cat(inits, 1).to(self.device, torch.float32))

    def _set_checkpointing(self, on: bool):
        state = {}
        for name in ("transformer" if self._mmdit else "unet", "vae"):
            m = getattr(self.pipe, name)
            if hasattr(m, "enable_gradient_checkpointing"):
                state[name] = bool(getattr(m, "gradient_checkpointing", False) or
                                   any(getattr(x, "gradient_checkpointing", False) for x in m.modules()))
                m.enable_gradient_checkpointing() if on else m.disable_gradient_checkpointing()
        return state

    def close(self):
        """Detach fastfair's patch (when the trainer installed it) and the checkpointing switch; the trained
        adapters / soft tokens stay in the pipeline (soft tokens: written into the encoders' embedding tables, the
        training hooks removed, so that ``pipe.save_pretrained`` keeps them)."""
        if getattr(self, "_soft_hooks", None):
            with torch.no_grad():
                for (enc, ids), cols in zip(self._soft_tables, self._soft_cols):
                    emb = enc.get_input_embeddings().weight
                    emb[ids.to(emb.device)] = self.soft[:, cols].detach().to(emb.device, emb.dtype)
            for h in self._soft_hooks:
                h.remove()
            self._soft_hooks = []
        self._closed = True
        for name, was in self._ckpt_state.items():
            m = getattr(self.pipe, name)
            m.enable_gradient_checkpointing() if was else m.disable_gradient_checkpointing()
        self._ckpt_state = {}
        if self._we_patched:
            from .processors import unpatch

            unpatch(self.pipe)
            self._we_patched = False

    # --- sampling -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _attention(self):
        if self.cfg.attention != "fastfair":
            yield
            return
        state = self.pipe._fastfair
        saved, state.recorder = state.recorder, self._recorder
        try:
            yield
        finally:
            state.recorder = saved

    @contextlib.contextmanager
    def frozen(self):
        """The frozen (original) model: adapters disabled; soft tokens are left out of the prompt by the caller."""
        mods = [getattr(self.pipe, n) for n in getattr(self, "lora_configs", {})]
        for m in mods:
            _enable_lora(m, False)
        try:
            yield
        finally:
            for m in mods:
                _enable_lora(m, True)

    def _autocast(self):
        if self.cfg.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16 if self.cfg.mixed_precision == "fp16" else torch.bfloat16)

    def train_prompt(self, prompt: str) -> str:
        """The prompt the finetuned model is sampled with (soft tokens prefixed)."""
        return f"{self.prompt_prefix} {prompt}" if self.cfg.trainable == "soft-tokens" else prompt

    @property
    def prompt_prefix(self) -> str | None:
        """What a prompt starts with to use the soft tokens: the token (SD 1.x/2.x, SDXL), every token spelled out
        (SD3, Flux); None without soft tokens."""
        if self.cfg.trainable != "soft-tokens":
            return None
        return " ".join(_prompt_soft_tokens(self.cfg.token, self.cfg.soft_tokens, self.kind))

    def _image_hw(self):
        vsf = self.pipe.vae_scale_factor
        size = default_sample_size(self.pipe) * vsf
        return self.cfg.height or size, self.cfg.width or size

    def _latent_hw(self):
        vsf = self.pipe.vae_scale_factor
        h, w = self._image_hw()
        if self.kind == "flux":   # as FluxPipeline: the latent grid is a multiple of its 2x2 packing
            return 2 * (h // (vsf * 2)), 2 * (w // (vsf * 2))
        return h // vsf, w // vsf

    def noises(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Initial noises (n, C, h, w) (Flux: unpacked; the sampler packs them as FluxPipeline does)."""
        h, w = self._latent_hw()
        c = self.net.config.in_channels // (4 if self.kind == "flux" else 1)
        x = torch.randn(n, c, h, w, generator=generator)
        return x.to(self.device, self.net.dtype)

    def sample(self, prompt: str, noise: torch.Tensor, n_steps: int, *, grad: bool,
               frozen: bool = False) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] for ``noise`` (B, C, h, w) (:meth:`noises`). With ``grad``: adjusted DFT
        (detached denoiser inputs; eps_hat gradients scaled by :func:`grad_coefficients`, or on SD3 / Flux each Euler
        step's velocity gradient by :func:`flow_grad_coefficients`). ``frozen``: the original model."""
        ctx = self.frozen() if frozen else contextlib.nullcontext()
        text = prompt if frozen else self.train_prompt(prompt)
        with ctx, torch.set_grad_enabled(grad), self._attention(), self._autocast():
            if self._mmdit:
                return self._sample_flow(text, noise, n_steps, grad)
            return self._sample_unet(text, noise, n_steps, grad)

    def _sample_flow(self, text: str, noise: torch.Tensor, n_steps: int, grad: bool) -> torch.Tensor:
        """SD3 / Flux: the pipeline's own loop (encodings, timesteps and shift, transformer call, CFG on SD3, Euler
        step, VAE scaling and shift), with detached transformer inputs and scaled velocity gradients."""
        pipe, cfg, sched, net = self.pipe, self.cfg, self._sched, self.net
        B, C, h, w = noise.shape
        H, W = self._image_hw()
        flux = self.kind == "flux"
        cfg_on = not flux and cfg.guidance_scale > 1.0
        kw = {}
        if flux:
            emb, pooled, txt_ids = pipe.encode_prompt(prompt=text, prompt_2=None, device=self.device,
                                                      num_images_per_prompt=1)
            z = pipe._pack_latents(noise, B, C, h, w)
            kw.update(encoder_hidden_states=emb.expand(B, -1, -1), pooled_projections=pooled.expand(B, -1),
                      txt_ids=txt_ids, img_ids=pipe._prepare_latent_image_ids(B, h // 2, w // 2, self.device,
                                                                               emb.dtype))
            if cfg.guidance_scale is not None:   # None: no guidance embedding (FLUX.1-schnell)
                kw["guidance"] = torch.full([B], cfg.guidance_scale, device=self.device, dtype=torch.float32)
        else:
            cond, uncond, pooled, upooled = pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None,
                                                               device=self.device, num_images_per_prompt=1,
                                                               do_classifier_free_guidance=cfg_on)
            z = noise
            if cfg_on:
                kw.update(encoder_hidden_states=torch.cat([uncond.expand(B, -1, -1), cond.expand(B, -1, -1)]),
                          pooled_projections=torch.cat([upooled.expand(B, -1), pooled.expand(B, -1)]))
            else:
                kw.update(encoder_hidden_states=cond.expand(B, -1, -1), pooled_projections=pooled.expand(B, -1))
        self._set_flow_timesteps(n_steps, (h, w))
        coefs = flow_grad_coefficients(sched) if grad else None
        z = z.float()
        for i, t in enumerate(sched.timesteps):
            zin = z.detach().to(net.dtype)
            zin = torch.cat([zin, zin]) if cfg_on else zin
            tt = t.expand(len(zin))   # as the pipelines: SD3's timestep in float32, Flux's in the model's dtype
            v = net(hidden_states=zin, timestep=tt.to(zin.dtype) / 1000 if flux else tt, return_dict=False,
                    **kw)[0].float()
            if cfg_on:
                vu, vc = v.chunk(2)
                v = vu + cfg.guidance_scale * (vc - vu)
            if grad:
                v = scale_grad(v, float(coefs[i]))
            z = sched.step(v, t, z, return_dict=False)[0]
        if flux:
            z = pipe._unpack_latents(z, H, W, pipe.vae_scale_factor)
        vae = pipe.vae
        x = vae.decode((z / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype), return_dict=False)[0]
        return ((x.float() + 1) / 2).clamp(0, 1)

    def _sample_unet(self, text: str, noise: torch.Tensor, n_steps: int, grad: bool) -> torch.Tensor:
        pipe, cfg, sched = self.pipe, self.cfg, self._sched
        B = noise.shape[0]
        cfg_on = cfg.guidance_scale > 1.0
        extra = {}
        if self._xl:  # SDXL: pooled text embeddings and size / crop ids next to the token embeddings
            cond, uncond, pooled, upooled = pipe.encode_prompt(prompt=text, device=self.device,
                                                               num_images_per_prompt=1,
                                                               do_classifier_free_guidance=cfg_on)
            h, w = self._latent_hw()
            vsf = pipe.vae_scale_factor
            ids = torch.tensor([[h * vsf, w * vsf, 0, 0, h * vsf, w * vsf]], device=self.device,
                               dtype=cond.dtype).expand(B, -1)
            pooled = torch.cat([upooled.expand(B, -1), pooled.expand(B, -1)]) if cfg_on else pooled.expand(B, -1)
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.cat([ids, ids]) if cfg_on else ids}
        elif cfg.prompt_padding == "longest":
            cond, uncond = self._encode_unpadded(text, cfg_on)
        else:
            cond, uncond = pipe.encode_prompt(text, self.device, 1, cfg_on)
        emb = torch.cat([uncond.expand(B, -1, -1), cond.expand(B, -1, -1)]) if cfg_on else cond.expand(B, -1, -1)
        sched.set_timesteps(n_steps, device=self.device)
        coefs = grad_coefficients(sched) if grad else None
        z = noise * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            zin = z.detach()
            zin = torch.cat([zin, zin]) if cfg_on else zin
            zin = sched.scale_model_input(zin, t)
            eps = pipe.unet(zin, t, encoder_hidden_states=emb, return_dict=False, **extra)[0].float()
            if cfg_on:
                eu, ec = eps.chunk(2)
                eps = eu + cfg.guidance_scale * (ec - eu)
            if self._v_pred:  # the model's output is v (CFG is linear, so combine first)
                abar = abar_at(sched, t)[1]
                eps = math.sqrt(abar) * eps + math.sqrt(1.0 - abar) * zin[:B].float()
            if grad:
                eps = scale_grad(eps, float(coefs[i]))
            z = sched.step(eps, t, z.float(), return_dict=False)[0]
        x = pipe.vae.decode(z.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return ((x.float() + 1) / 2).clamp(0, 1)

    def _encode_unpadded(self, text: str, cfg_on: bool):
        """The paper's code's text conditioning: the prompt's tokens BOS..EOS without padding, and the empty prompt
        padded to that length with an attention mask on the padding (so the UNet attends over n <= 77 keys)."""
        pipe = self.pipe
        tok, enc = pipe.tokenizer, pipe.text_encoder
        if hasattr(pipe, "maybe_convert_prompt"):   # multi-vector textual-inversion tokens, as encode_prompt
            text = pipe.maybe_convert_prompt(text, tok)
        ids = tok(text, padding=False, truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids.to(self.device)
        cond = enc(ids)[0]
        if not cfg_on:
            return cond, None
        empty = tok("", padding="max_length", max_length=ids.shape[1], truncation=True, return_tensors="pt")
        uncond = enc(empty.input_ids.to(self.device), attention_mask=empty.attention_mask.to(self.device))[0]
        return cond, uncond

    def classify(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with self._autocast():
            out = self.classifier(images)
        return {a: out[a].float() for a in self.attributes}

    def _probs(self, images: torch.Tensor, faces=None):
        """Classifier probabilities of every image and which images count (N,) bool. With a face detector: of the
        crop of each image's face (``faces``: a detection to reuse); rows of images without one are uniform
        constants and do not count."""
        if self.faces is None:
            return self.classify(images), torch.ones(len(images), dtype=torch.bool)
        faces = faces if faces is not None else self.faces.detect(images)
        idx = faces.found.nonzero().flatten().to(images.device)
        found = self.classify(self.faces.crops(images, faces)) if len(idx) else None
        out = {}
        for a in self.attributes:
            k = len(self.labels[a])
            rows = torch.full((len(images), k), 1.0 / k, device=images.device)
            out[a] = rows.index_copy(0, idx, found[a].to(rows.dtype)) if found is not None else rows
        return out, faces.found

    def _targets(self, probs, counted: torch.Tensor) -> alignment.AlignmentTargets:
        """Alignment targets over the counted images (all, or those with a face, however few: as the paper's code);
        the others are dropped (every image when none counts)."""
        idx = counted.nonzero().flatten()
        N, K = len(counted), len(self.joint_target)
        sub = None
        if len(idx):
            sub = alignment.alignment_targets({a: p[idx.to(p.device)] for a, p in probs.items()}, self.joint_target,
                                              samples=self.cfg.ot_samples, threshold=self.cfg.uncertainty_threshold,
                                              rng=self.np_rng)
            if len(idx) == N:   # every image counts: the targets as they are
                return sub
        labels, unc, keep, q = {}, {}, {}, {}
        for a in self.attributes:
            k = len(self.labels[a])
            labels[a] = torch.zeros(N, dtype=torch.int64)
            unc[a] = torch.ones(N, dtype=torch.float64)
            keep[a] = torch.zeros(N, dtype=torch.bool)
            q[a] = np.zeros((N, k))
            if sub is not None:
                labels[a][idx], unc[a][idx], keep[a][idx] = sub.labels[a], sub.uncertainty[a], sub.keep[a]
                q[a][idx.numpy()] = sub.q[a]
        jq = np.zeros((N, K))
        if sub is not None:
            jq[idx.numpy()] = sub.joint_q
        return alignment.AlignmentTargets(list(self.attributes), labels, unc, keep, q, jq,
                                          sub.histograms if sub is not None else np.zeros((0, K)))

    def _embed_faces(self, aligned: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            e = self.face_embedder(aligned).float()
            if self.cfg.face_flip:
                e = e + self.face_embedder(torch.flip(aligned, dims=[-1])).float()
        return F.normalize(e.flatten(1), dim=-1)

    def _relax_face_region(self, images, faces, ref_faces, factors) -> torch.Tensor:
        """``images`` with the gradient scaled by ``factors`` (N,) (see relax_factors) inside the expanded (crop) face
        box (intersected with the frozen image's crop box where it has one); images whose factor is 1 are untouched."""
        factors = factors.to(images.device, torch.float32)
        H, W = images.shape[-2:]
        mask = torch.zeros((len(images), 1, H, W), dtype=torch.bool, device=images.device)
        for i in (factors != 1.0).nonzero().flatten().tolist():
            box = faces.crop_boxes[i]
            if box is None:
                continue
            rb = ref_faces.crop_boxes[i] if ref_faces is not None else None
            x0, y0, x1, y1 = box if rb is None else (max(box[0], rb[0]), max(box[1], rb[1]), min(box[2], rb[2]),
                                                      min(box[3], rb[3]))
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
            if x1 > x0 and y1 > y0:
                mask[i, :, y0:y1, x0:x1] = True
        if not bool(mask.any()):
            return images
        return torch.where(mask, scale_grad(images, factors.view(-1, 1, 1, 1).to(images.dtype)), images)

    @torch.no_grad()
    def measure(self, prompts: Sequence[str] | str | None = None, seeds: Sequence[int] = range(16),
                n_steps: int | None = None, frozen: bool = False, batch_size: int = 8) -> dict[str, np.ndarray]:
        """Class frequencies (argmax) per attribute over prompts x seeds, sampled the way training samples
        (``prompts`` default: the training prompts; ``n_steps`` default: the top of ``sampling_steps``).
        ``frozen``: the original model. With a face detector: of the faces' crops, over the images with a face
        (NaN frequencies when none has one). Under several processes every process must
        call it (the seeds are shared out and the counts summed)."""
        counts, _ = self._counts(prompts, seeds, n_steps, frozen, batch_size)
        # with a face detector only images with a face count; none at all gives NaN frequencies
        return {a: c / c.sum() if c.sum() else np.full(len(c), np.nan) for a, c in counts.items()}

    @torch.no_grad()
    def _counts(self, prompts, seeds, n_steps=None, frozen=False, batch_size=8):
        """Argmax class counts per attribute over prompts x seeds, and the number of images that counted."""
        prompts = self.prompts if prompts is None else ([prompts] if isinstance(prompts, str) else list(prompts))
        n_steps = n_steps or self.cfg.sampling_steps[1]
        counts = {a: np.zeros(len(self.labels[a])) for a in self.attributes}
        seeds, counted = list(seeds)[self.rank::self.world], 0   # each rank a share of the seeds, summed below
        for p in prompts:
            for s in range(0, len(seeds), batch_size):
                noise = torch.cat([self.noises(1, torch.Generator("cpu").manual_seed(int(x)))
                                   for x in seeds[s:s + batch_size]])
                probs, found = self._probs(self.sample(p, noise, n_steps, grad=False, frozen=frozen))
                counted += int(found.sum())
                for a, pr in probs.items():
                    counts[a] += np.bincount(pr[found.to(pr.device)].argmax(1).cpu().numpy(),
                                             minlength=len(self.labels[a]))
        if self.world > 1:
            flat = torch.tensor(np.concatenate([counts[a] for a in self.attributes] + [[counted]]),
                                dtype=torch.float64, device=self._comm_device())
            flat = _dist.sum_(flat, self.world).cpu().numpy()
            k = 0
            for a in self.attributes:
                counts[a] = flat[k:k + len(counts[a])]
                k += len(counts[a])
            counted = int(round(flat[-1]))
        return counts, counted

    def marginal_targets(self) -> dict[str, np.ndarray]:
        """Each attribute's target distribution (the joint target's marginals)."""
        return dict(zip(self.attributes, alignment.marginals(self.joint_target,
                                                             [len(self.labels[a]) for a in self.attributes])))

    def evaluate(self) -> dict:
        """Class frequencies on the evaluation prompts (``eval_prompts``, default the training prompts) at the fixed
        seeds 0..eval_seeds-1, for the current weights and (once the EMA has been updated) the EMA weights: per
        prompt and attribute
        the frequencies, and per attribute the mean over prompts of the target gap mean_c |f_c - t_c| (0 = on
        target; the paper's age gap), of the paper's bias mean_{i<j} |f_i - f_j| (its gender and race metric, for
        uniform targets: twice the target gap for two classes) and of the largest class's share. Recorded in ``evaluations`` (dft.json, checkpoints). Under
        several processes every process must call it (the seeds are shared out and the counts summed)."""
        cfg = self.cfg
        prompts = list(cfg.eval_prompts) if cfg.eval_prompts else self.prompts
        seeds = range(cfg.eval_seeds)
        targets = self.marginal_targets()

        def one() -> dict:
            per, counted = {}, 0
            for p in prompts:
                c, n = self._counts([p], seeds, cfg.eval_steps)
                counted += n
                per[p] = {a: (v / v.sum()).tolist() if v.sum() else None for a, v in c.items()}
            summary = {}
            for a in self.attributes:
                fs = [np.array(per[p][a]) for p in prompts if per[p][a] is not None]
                summary[a] = (dict(target_gap=float(np.mean([np.abs(f - targets[a]).mean() for f in fs])),
                                   bias=float(np.mean([distribution.dft_bias(f) for f in fs])),
                                   max_share=float(np.mean([f.max() for f in fs])),
                                   freq=np.mean(fs, 0).tolist()) if fs else None)
            return dict(per_prompt=per, summary=summary, counted=counted, images=len(prompts) * cfg.eval_seeds)

        with self._attention():
            rec = dict(step=self.step_idx, model=one())
            if self.ema is not None and self.ema.updates > 0:
                with self.ema_weights():
                    rec["ema"] = one()
        self.evaluations.append(rec)
        return rec

    # --- one iteration --------------------------------------------------------------------------
    def _next_prompt(self) -> str:
        if not self._order:
            self._order = list(range(len(self.prompts)))
            self.py_rng.shuffle(self._order)
        return self.prompts[self._order.pop(0)]

    def step(self) -> dict:
        """One DFT iteration; returns its metrics (loss, its parts, this batch's class frequencies...)."""
        if getattr(self, "_closed", False):
            raise DFTError("this trainer was closed (its soft tokens / adapters were handed to the pipeline): make a "
                           "new DFTTrainer, with resume= to continue from a checkpoint")
        # the attention route must hold through backward too: checkpointed blocks are recomputed there
        with self._attention():
            rec = self._step()
        cfg = self.cfg
        if cfg.eval_every and self.step_idx % cfg.eval_every == 0:
            self.evaluate()
        if self.out_dir is not None and cfg.checkpoint_every and self.step_idx % cfg.checkpoint_every == 0:
            if self.rank == 0:   # every rank holds the same state (same draws, summed gradients)
                self.save_checkpoint()
            _dist.barrier(self.world)
        return rec

    def _step(self) -> dict:
        cfg = self.cfg
        N = cfg.images_per_prompt
        # several processes: each takes an equal slice [lo, hi) of the N images (every rank draws the same
        # prompt, step count and N noises); targets are computed over all N, the gradients summed over ranks
        Nl = N // self.world
        lo, hi = self.rank * Nl, (self.rank + 1) * Nl
        B = min(cfg.batch_size or Nl, Nl)
        prompt = self._next_prompt()
        n_steps = self.py_rng.randint(*cfg.sampling_steps)
        noise = self.noises(N, self.noise_gen)[lo:hi]
        self.optimizer.zero_grad(set_to_none=True)
        for m in self.classifier.modules():
            m.eval()

        targets = None
        if B < Nl:  # targets need every image first: a no-grad pass, then the gradient passes in micro-batches
            with torch.no_grad():
                parts = [self._probs(self.sample(prompt, noise[j:j + B], n_steps, grad=False))
                         for j in range(0, Nl, B)]
            targets = self._targets(*self._gather({a: torch.cat([p[a] for p, _ in parts]) for a in self.attributes},
                                                  torch.cat([c for _, c in parts])))
        # the frozen model's images: quality features, predicted classes, faces and face embeddings
        ref_feats, ref_pred, ref_conf, ref_faces, ref_emb = [], None, None, None, None
        if self.quality or self.face_embedder is not None:
            with torch.no_grad():
                ref = torch.cat([self.sample(prompt, noise[j:j + B], n_steps, grad=False, frozen=True)
                                 for j in range(0, Nl, B)])
                ref_feats = [F.normalize(enc(ref).float().flatten(1), dim=-1) for enc in self.quality]
                ref_faces = self.faces.detect(ref) if self.faces is not None else None
                rp, rfound = self._probs(ref, ref_faces)
                rfound = rfound.to(ref.device)
                ref_pred = {a: torch.where(rfound, p.argmax(1), torch.full_like(p.argmax(1), -1)) for a, p in rp.items()}
                ref_conf = {a: p.max(1).values for a, p in rp.items()}
                if self.face_embedder is not None:
                    ok = [i for i in range(Nl) if ref_faces.landmarks[i] is not None]
                    if len(ok) < ref_faces.n:
                        raise DFTError(f"the face detector {self.faces.name} found faces without landmarks; the "
                                       "face-realism loss aligns each face by its five landmarks (left eye, right eye, "
                                       "nose tip, mouth corners): use a detector that returns them, or no face "
                                       "embedder")
                    ref_emb = torch.zeros((Nl, 0), device=ref.device)
                    if ok:
                        e = self._embed_faces(self.faces.aligned(ref, ref_faces, ok))
                        ref_emb = torch.zeros((Nl, e.shape[1]), device=e.device).index_copy(
                            0, torch.tensor(ok, device=e.device), e)
                    ref_has_emb = torch.zeros(Nl, dtype=torch.bool, device=ref.device)
                    ref_has_emb[ok] = True
        tot = dict(loss=0.0, align=0.0, quality=0.0, face=0.0)
        codes, n_faces = [], 0
        for j in range(0, Nl, B):
            idx = slice(j, min(j + B, Nl))                 # in this rank's images
            gidx = slice(lo + idx.start, lo + idx.stop)     # in all N
            images = self.sample(prompt, noise[idx], n_steps, grad=True)
            dev = images.device
            with torch.enable_grad():
                faces = self.faces.detect(images) if self.faces is not None else None
                probs, counted = self._probs(images, faces)
                if targets is None:  # one pass holds all N images: targets from its own (detached) probabilities
                    targets = self._targets(*self._gather({a: p.detach() for a, p in probs.items()}, counted))
                sub = self._sub_targets(targets, gidx)
                if faces is not None:  # a face must be found in this pass too (as the paper's code re-detects)
                    sub.keep = {a: k & counted for a, k in sub.keep.items()}
                l_align = alignment.alignment_loss(probs, sub, reduction="none")
                # "changed": an attribute's target dropped or another class than the frozen image's; "same": none
                changed = {a: ~sub.keep[a].to(dev) | ((sub.labels[a].to(dev) != ref_pred[a][idx]) if ref_pred
                                                      is not None else False) for a in self.attributes}
                same = ~torch.stack(list(changed.values())).any(0)
                l_quality = torch.zeros_like(l_align)
                if self.quality:
                    w = relax_factors(changed, cfg.quality_relax).to(l_quality.dtype)
                    x = images
                    if faces is not None:
                        w = torch.where(counted.to(dev), w, torch.ones_like(w))   # no face: the full weight
                        fr = relax_factors(changed, cfg.face_relax)
                        if bool((fr != 1.0).any()):
                            x = self._relax_face_region(images, faces, _sub_faces(ref_faces, idx), fr)
                    dist = 0.0
                    for enc, rf in zip(self.quality, ref_feats):
                        feat = F.normalize(enc(x).float().flatten(1), dim=-1)
                        dist = dist + (1.0 - (feat * rf[idx]).sum(-1))
                    l_quality = w * dist
                l_face = torch.zeros_like(l_align)
                if self.face_embedder is not None:
                    l_face = self._face_loss(images, faces, sub, same, ref_conf, ref_emb, ref_has_emb, idx)
                loss = (l_align + cfg.quality_weight * l_quality + cfg.face_weight * l_face).sum() / N
            if not loss.requires_grad:
                pass   # nothing to learn from these images (e.g. no face found and no other loss term)
            elif self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            tot["loss"] += float(loss.detach())
            tot["align"] += float(l_align.detach().sum()) / N
            tot["quality"] += float(l_quality.detach().sum()) / N
            tot["face"] += float(l_face.detach().sum()) / N
            c = counted.to(dev)
            n_faces += int(c.sum())
            codes.append(torch.stack([torch.where(c, p.detach().argmax(1), torch.full_like(c, -1, dtype=torch.long))
                                      for p in probs.values()], 1))

        if self.world > 1:
            self._sum_grads()
            red = torch.tensor([tot["loss"], tot["align"], tot["quality"], tot["face"], float(n_faces)],
                               dtype=torch.float64, device=self._comm_device())
            _dist.sum_(red, self.world)
            tot = dict(zip(("loss", "align", "quality", "face"), red[:4].tolist()))
            n_faces = int(round(float(red[4])))
        all_codes = _dist.gather_cat(torch.cat(codes).to(self._comm_device()), self.world).cpu()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)) if grads else 0.0
        if self.scaler is not None:
            if finite:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if finite and self.ema is not None:
            self.ema.update(self.params)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_idx += 1
        counts = {a: np.bincount(all_codes[:, i][all_codes[:, i] >= 0].numpy(), minlength=len(self.labels[a]))
                  for i, a in enumerate(self.attributes)}
        # the distribution of the counted images (with a face detector: the faces found; none: NaN)
        dist = {a: (c / c.sum() if c.sum() else np.full(len(c), np.nan)) for a, c in counts.items()}
        rec = dict(step=self.step_idx, prompt=prompt, sampling_steps=n_steps, loss=tot["loss"], loss_align=tot["align"],
                   loss_quality=tot["quality"], grad_norm=gnorm, skipped=not finite,
                   kept={a: float(targets.keep[a].float().mean()) for a in self.attributes},
                   distribution={a: d.tolist() for a, d in dist.items()})
        if self.faces is not None:
            rec["faces"] = n_faces
            if n_faces == 0 and not self._warned_no_face and self.rank == 0:
                import warnings

                warnings.warn(f"DFT step {self.step_idx}: the face detector {self.faces.name} found no face in any of "
                              f"the {N} images, so nothing was aligned (check the detector and the prompts)",
                              stacklevel=2)
                self._warned_no_face = True
        if self.face_embedder is not None:
            rec["loss_face"] = tot["face"]
        self.history.append(rec)
        return rec

    def _comm_device(self) -> torch.device:
        """Where collectives run: the CPU under gloo, the model's device under NCCL."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.get_backend() == "gloo":
                return torch.device("cpu")
        return self.device

    def _gather(self, probs, counted):
        """Every rank's (detached) probabilities and counted flags, concatenated in rank order: all N images."""
        if self.world == 1:
            return probs, counted
        dev = self._comm_device()
        out = {a: _dist.gather_cat(p.detach().float().to(dev), self.world) for a, p in probs.items()}
        return out, _dist.gather_cat(counted.to(dev, torch.uint8), self.world).bool().cpu()

    def _sum_grads(self) -> None:
        """Sum the trainables' gradients over ranks (each rank's loss is its images' share of the sum over N)."""
        dev = self._comm_device()
        had = _dist.sum_(torch.tensor([float(p.grad is not None) for p in self.params], device=dev), self.world)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().flatten().to(dev)
                          for p in self.params])
        _dist.sum_(flat, self.world)
        k = 0
        for p, h in zip(self.params, had.tolist()):
            n = p.numel()
            # no rank had a gradient: None, as with one process (AdamW then skips the tensor: no decay, no state)
            p.grad = flat[k:k + n].view_as(p).to(p.device, p.dtype).clone() if h > 0 else None
            k += n

    def _face_loss(self, images, faces, sub, same, ref_conf, ref_emb, ref_has_emb, idx) -> torch.Tensor:
        """Face realism: 1 - cosine between the aligned face's embedding and its target embedding -- the frozen
        image's face where every target keeps the frozen class with confidence >= face_confidence, else the
        nearest face of the bank (none: no loss for that image). Only images with a face and a kept target."""
        dev = images.device
        n = len(images)
        found = faces.found.to(dev)
        any_keep = torch.zeros(n, dtype=torch.bool, device=dev)
        for a in self.attributes:
            any_keep |= sub.keep[a].to(dev)
        cand = found & any_keep
        conf_ok = torch.ones(n, dtype=torch.bool, device=dev)
        for a in self.attributes:
            conf_ok &= ref_conf[a][idx] >= self.cfg.face_confidence
        from_ref = cand & same & conf_ok & ref_has_emb[idx]
        from_bank = cand & ~from_ref if self.face_bank is not None else torch.zeros_like(cand)
        which = (from_ref | from_bank).nonzero().flatten().tolist()
        loss = torch.zeros(n, device=dev)
        if not which:
            return loss
        emb = self._embed_faces(self.faces.aligned(images, faces, which))
        tgt = torch.empty_like(emb)
        with torch.no_grad():
            for r, i in enumerate(which):
                if from_ref[i]:
                    tgt[r] = ref_emb[idx][i]
            bank_rows = [r for r, i in enumerate(which) if not from_ref[i]]
            if bank_rows:
                sims = emb.detach()[bank_rows] @ self.face_bank.to(emb).T
                tgt[bank_rows] = self.face_bank.to(emb)[sims.argmax(1)]
        return loss.index_put((torch.tensor(which, device=dev),), 1.0 - (emb * tgt).sum(-1))

    @staticmethod
    def _sub_targets(t: alignment.AlignmentTargets, idx: slice) -> alignment.AlignmentTargets:
        return alignment.AlignmentTargets(t.names, {a: v[idx] for a, v in t.labels.items()},
                                          {a: v[idx] for a, v in t.uncertainty.items()},
                                          {a: v[idx] for a, v in t.keep.items()}, {a: v[idx] for a, v in t.q.items()},
                                          t.joint_q[idx], t.histograms)

    def train(self, steps: int | None = None, progress: bool = True) -> DFTResult:
        """Run until ``steps`` (default ``config.steps``) optimisation steps are done, then save the outputs."""
        from tqdm.auto import tqdm

        total = self.cfg.steps if steps is None else steps
        if self.step_idx > total:  # a resumed run past its target: outputs would say `steps` and hold more
            raise ResumeError(f"this run is at step {self.step_idx} (resumed), beyond steps={total} (--steps): give at "
                              "least that many (a resume trains on to --steps)")
        bar = tqdm(total=total, initial=min(self.step_idx, total), disable=not progress or self.rank != 0,
                   desc="fastfair dft", unit="step")
        try:
            ev_k = self.cfg.eval_every
            if ev_k and self.step_idx % ev_k == 0 and not any(e["step"] == self.step_idx for e in self.evaluations):
                self.evaluate()   # the starting point (step 0)
            while self.step_idx < total:
                r = self.step()
                bar.update(1)
                ev = self.evaluations[-1]["model"]["summary"] if self.evaluations else {}
                bar.set_postfix_str(f"loss {r['loss']:.4f} " + " ".join(
                    f"{a}=" + "/".join(f"{v:.2f}" for v in d) for a, d in r["distribution"].items())
                    + "".join(f" eval {a} gap {v['target_gap']:.3f}" for a, v in ev.items() if v))
            if ev_k and self.evaluations and self.evaluations[-1]["step"] != self.step_idx:
                self.evaluate()   # the final weights, when the last step is not a multiple of eval_every
        finally:
            bar.close()
        if self.out_dir is not None and self.rank == 0:
            res = self.save_outputs()
        else:
            res = DFTResult(self.out_dir, self.step_idx, self.history, evaluations=self.evaluations)
        _dist.barrier(self.world)
        return res

    # --- checkpoints ------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed here."""
        cfg = self.cfg
        u, te = self.net.config, self.pipe.text_encoder.config
        if self._mmdit:   # UNet runs keep their fingerprint of before (their checkpoints still resume)
            lora = dict(rank=cfg.rank, alpha=cfg.lora_alpha, text=list(cfg.text_lora_modules),
                        transformer=list(cfg.transformer_lora_modules))
            model = dict(kind=self.kind, layers=u.num_layers, heads=u.num_attention_heads,
                         head_dim=u.attention_head_dim, joint_attention_dim=u.joint_attention_dim,
                         text_hidden=te.hidden_size, text_layers=te.num_hidden_layers)
        else:
            lora = dict(rank=cfg.rank, alpha=cfg.lora_alpha, text=list(cfg.text_lora_modules),
                        unet=list(cfg.unet_lora_modules))
            model = dict(unet_blocks=list(u.block_out_channels), cross_attention_dim=u.cross_attention_dim,
                         text_hidden=te.hidden_size, text_layers=te.num_hidden_layers)
        return dict(version=CHECKPOINT_VERSION, trainable=cfg.trainable,
                    lora=lora if cfg.trainable != "soft-tokens" else None,
                    soft_tokens=dict(k=cfg.soft_tokens, token=cfg.token) if cfg.trainable == "soft-tokens" else None,
                    model=model,
                    params={n: list(p.shape) for n, p in self.named_params},
                    attributes={a: list(self.labels[a]) for a in self.attributes},
                    target=[round(float(x), 8) for x in self.joint_target],
                    images_per_prompt=cfg.images_per_prompt, **self._face_fingerprint(),
                    # what the images are sampled with: a resumed run continues the same training distribution
                    sampling=dict(size=list(self._image_hw()), scheduler=cfg.scheduler, guidance_scale=cfg.guidance_scale,
                                  steps=list(cfg.sampling_steps)),
                    **({} if cfg.prompt_padding == "max_length" else {"prompt_padding": cfg.prompt_padding}),
                    # what is optimised and how: a resume with other values would mix two trainings in one run
                    # (the total step count may grow: continuing a run further is a resume)
                    training=self._training_fingerprint(),
                    # the frozen models' weights digests (recorded since 2026-11-27)
                    identity=self._identity)

    def _training_fingerprint(self) -> dict:
        from .pipelines import module_digest

        cfg = self.cfg
        clf = self.classifier
        fn = getattr(clf, "fn", None)
        return dict(prompts=hashlib.sha256(json.dumps(self.prompts).encode()).hexdigest()[:16],
                    classifier=dict(name=getattr(clf, "name", type(clf).__name__),
                                    weights=module_digest(fn) if isinstance(fn, torch.nn.Module) else None),
                    lr=cfg.lr, adam_betas=list(cfg.adam_betas), weight_decay=cfg.weight_decay, adam_eps=cfg.adam_eps,
                    max_grad_norm=cfg.max_grad_norm, ema_decay=cfg.ema_decay,
                    uncertainty_threshold=cfg.uncertainty_threshold, ot_samples=cfg.ot_samples,
                    quality_weight=cfg.quality_weight, quality_relax=cfg.quality_relax, seed=cfg.seed)

    def _face_fingerprint(self) -> dict:
        """Faces change what is aligned (crops, images without a face dropped) and the loss: a run is resumed only
        with the same face setup. Absent without faces (checkpoints from before faces existed still match)."""
        if self.faces is None:
            return {}
        cfg = self.cfg
        face = dict(self.faces.describe(), relax=cfg.face_relax)
        if self.face_embedder is not None:
            face.update(embedder=getattr(self.face_embedder, "name", None) or type(self.face_embedder).__name__,
                        weight=cfg.face_weight, confidence=cfg.face_confidence, flip=cfg.face_flip,
                        bank=list(self.face_bank.shape) if self.face_bank is not None else None)
        return {"faces": face}

    def state_dict(self) -> dict:
        return dict(fingerprint=self.fingerprint(), step=self.step_idx,
                    params={n: p.detach().cpu().clone() for n, p in self.named_params},
                    optimizer=self.optimizer.state_dict(),
                    ema=[s.cpu().clone() for s in self.ema.shadow] if self.ema is not None else None,
                    ema_updates=self.ema.updates if self.ema is not None else 0,
                    scaler=self.scaler.state_dict() if self.scaler is not None else None,
                    rng=dict(noise=self.noise_gen.get_state(), python=_rng_state(self.py_rng),
                             numpy=json.dumps(self.np_rng.bit_generator.state), torch=torch.get_rng_state(),
                             order=list(self._order)),
                    history=json.dumps(self.history), evaluations=json.dumps(self.evaluations),
                    config=json.dumps(self.cfg.to_dict()))

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        if path is None:
            if self.out_dir is None:
                raise DFTError("no out_dir: pass a checkpoint path")
            path = self.out_dir / "checkpoints" / f"checkpoint-{self.step_idx:06d}"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            torch.save(self.state_dict(), tmp / "state.pt")
            (tmp / "fingerprint.json").write_text(json.dumps(self.fingerprint(), indent=1))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.out_dir is not None and path.parent == self.out_dir / "checkpoints" and self.cfg.keep_checkpoints > 0:
            old = sorted(p for p in path.parent.glob("checkpoint-*") if p.is_dir())[:-self.cfg.keep_checkpoints]
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
        return path

    def _resolve_resume(self, resume) -> Path:
        if str(resume) == "latest":
            if self.out_dir is None:
                raise ResumeError("resume='latest' needs out_dir")
            found = sorted(p for p in (self.out_dir / "checkpoints").glob("checkpoint-*") if (p / "state.pt").exists())
            if not found:
                raise ResumeError(f"no checkpoint to resume under {self.out_dir / 'checkpoints'}")
            return found[-1]
        p = Path(resume)
        if p.is_file():
            p = p.parent
        if not (p / "state.pt").exists():
            raise ResumeError(f"{str(resume)!r} is not a DFT checkpoint (no state.pt in it)")
        return p

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        path = self._resolve_resume(path)
        try:
            sd = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise ResumeError(f"cannot read checkpoint {str(path)!r}: {e}") from e
        mine, theirs = self.fingerprint(), sd.get("fingerprint", {})
        for key in ("sampling", "training", "identity"):
            if key not in theirs:   # checkpoints from before it was recorded
                mine.pop(key)
        if mine != theirs:
            diff = []
            for k in sorted(set(mine) | set(theirs)):
                a, b = theirs.get(k), mine.get(k)
                if k == "params" or a == b:
                    continue
                if isinstance(a, dict) and isinstance(b, dict):  # name only the entries that differ
                    diff += [f"{k}.{j}: checkpoint {a.get(j)!r} vs now {b.get(j)!r}" for j in sorted(set(a) | set(b))
                             if a.get(j) != b.get(j)]
                else:
                    diff.append(f"{k}: checkpoint {a!r} vs now {b!r}")
            pm, pt = mine.get("params") or {}, theirs.get("params") or {}
            if pm != pt:  # summarised: the full list is every trainable tensor's shape
                first = next((n for n in list(pm) + list(pt) if pm.get(n) != pt.get(n)), None)
                diff.append(f"params: {len(pt)} trainable tensors in the checkpoint vs {len(pm)} now; first "
                            f"difference {first}: checkpoint {pt.get(first)} vs now {pm.get(first)}")
            raise ResumeError(f"checkpoint {str(path)!r} does not match this training setup:\n  " + "\n  ".join(diff))
        with torch.no_grad():
            for n, p in self.named_params:
                p.copy_(sd["params"][n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.ema is not None and sd.get("ema") is not None:
            self.ema.shadow = [s.to(self.device) for s in sd["ema"]]
            self.ema.updates = sd.get("ema_updates", sum(not h.get("skipped") for h in json.loads(sd["history"])))
        if self.scaler is not None and sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        r = sd["rng"]
        self.noise_gen.set_state(r["noise"])
        _set_rng_state(self.py_rng, r["python"])
        self.np_rng.bit_generator.state = json.loads(r["numpy"])
        torch.set_rng_state(r["torch"])
        self._order = list(r["order"])
        self.step_idx = int(sd["step"])
        self.history = json.loads(sd["history"])
        self.evaluations = json.loads(sd.get("evaluations", "[]"))

    # --- outputs --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily put the EMA weights into the trainables."""
        if self.ema is None:
            yield
            return
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.ema.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def save_lora(self, out_dir: str | os.PathLike) -> Path:
        """Write the LoRA in diffusers' format: ``pipe.load_lora_weights(out_dir)`` loads it."""
        from diffusers import (FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline,
                               StableDiffusionXLPipeline)
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        kw = {}
        for name, lc in self.lora_configs.items():
            sd = get_peft_model_state_dict(getattr(self.pipe, name))
            if name != "transformer":   # transformers are saved in peft's naming, as diffusers' SD3 / Flux scripts
                sd = convert_state_dict_to_diffusers(sd)
            kw[f"{name}_lora_layers"] = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
            if lc.lora_alpha != lc.r:
                kw[f"{name}_lora_adapter_metadata"] = lc.to_dict()
        cls = dict(sd=StableDiffusionPipeline, sdxl=StableDiffusionXLPipeline, sd3=StableDiffusion3Pipeline,
                   flux=FluxPipeline)[self.kind]
        # written whole or not at all (a folder beside it, then renamed), in the umask's mode (safetensors writes
        # its files 0600)
        from ._io import _MODE, _umask

        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            cls.save_lora_weights(str(tmp), safe_serialization=True, **kw)
            for f in tmp.iterdir():
                os.chmod(f, _MODE)
            os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes it 0700
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def save_soft_tokens(self, path: str | os.PathLike) -> Path:
        """The soft-token file; :func:`load_soft_tokens` loads every kind (SD 1.x/2.x: a textual-inversion file,
        ``pipe.load_textual_inversion(path, token=...)``; SDXL: clip_l / clip_g, one per encoder -- diffusers' loader
        alone leaves a legacy CLIP config pooling at the soft token, :func:`_fix_clip_pooling`; SD3 / Flux: clip_l,
        clip_g, t5 with the tokens in the metadata), then prompts that start with :attr:`prompt_prefix`."""
        from safetensors.torch import save

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        soft = self.soft.detach().cpu().float()
        meta = None
        if self.kind == "sd":
            tensors = {self.cfg.token: soft.contiguous()}
        else:  # SDXL's textual-inversion layout (load each with text_encoder= / tokenizer=); SD3 / Flux add t5
            tensors = {key: soft[:, cols].contiguous() for key, cols in zip(self._soft_keys, self._soft_cols)}
            if self._mmdit:   # fastfair.dft.load_soft_tokens reads the model kind and the tokens from here
                meta = {"fastfair_model_kind": self.kind, "fastfair_tokens": self.prompt_prefix}
        from ._io import atomic_write

        atomic_write(path, save(tensors, metadata=meta))   # whole or not at all, in the umask's mode
        return path

    def save_outputs(self, out_dir: str | os.PathLike | None = None) -> DFTResult:
        out = Path(out_dir) if out_dir is not None else self.out_dir
        if out is None:
            raise DFTError("no out_dir to save to")
        out.mkdir(parents=True, exist_ok=True)
        soft = self.cfg.trainable == "soft-tokens"
        res = DFTResult(out, self.step_idx, self.history, token=self.prompt_prefix,
                        evaluations=self.evaluations)
        if soft:
            res.soft_tokens = self.save_soft_tokens(out / "soft_tokens.safetensors")
            if self.ema is not None:
                with self.ema_weights():
                    res.soft_tokens_ema = self.save_soft_tokens(out / "soft_tokens-ema.safetensors")
        else:
            res.lora_dir = self.save_lora(out / "lora")
            if self.ema is not None:
                with self.ema_weights():
                    res.lora_ema_dir = self.save_lora(out / "lora-ema")
        outputs = dict(lora=res.lora_dir, lora_ema=res.lora_ema_dir, soft_tokens=res.soft_tokens,
                       soft_tokens_ema=res.soft_tokens_ema)
        from ._env import provenance
        from ._io import atomic_write

        meta = dict(model=self.model_name, pipeline=type(self.pipe).__name__, config=self.cfg.to_dict(),
                    steps=self.step_idx, processes=self.world,
                    attributes={a: list(self.labels[a]) for a in self.attributes},
                    joint_target=self.joint_target.tolist(), classifier=self.classifier.name, prompts=self.prompts,
                    quality_encoders=[encoder_name(e) for e in self.quality],
                    faces=self._face_fingerprint().get("faces"),
                    history=self.history, evaluations=self.evaluations,
                    outputs={k: str(v) for k, v in outputs.items() if v is not None},
                    environment=provenance(self.device))
        atomic_write(out / "dft.json", json.dumps(meta, indent=1).encode())
        try:
            from .dft_report import write_dft_report

            res.report = write_dft_report(out)
        except Exception as e:  # the report is a view of dft.json: never lose a run's outputs over it
            import warnings

            warnings.warn(f"could not write the DFT report ({e}); dft.json holds everything, retry with fastfair "
                          "report", stacklevel=2)
        return res


def _soft_file(path) -> tuple[list[str], dict, int, str]:
    """A soft-token file's header: its tensor names, metadata, k and the model kind it was made for (SD 1.x/2.x:
    one tensor named by its token; SDXL: clip_l / clip_g; SD3 / Flux: named in the metadata). Refuses other files."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys, meta = sorted(f.keys()), (f.metadata() or {})
            k = f.get_slice(keys[0]).get_shape()[0] if keys else 0
    except (SafetensorError, OSError) as e:
        raise DFTError(f"soft tokens {str(path)!r} is not a safetensors file ({e})") from e
    kind = meta.get("fastfair_model_kind") or ("sdxl" if keys == ["clip_g", "clip_l"] else
                                              "sd" if len(keys) == 1 else None)
    if kind not in ("sd", "sdxl", "sd3", "flux"):
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        raise DFTError(f"{str(path)!r} is not a DFT soft-token file (tensors {shown}; expected one named by its "
                       "token, clip_l and clip_g, or those of SD3 / Flux with their metadata); a LoRA loads with --lora")
    return keys, meta, k, kind


def soft_token_names(path: str | os.PathLike, token: str | None = None) -> list[str]:
    """The tokens a soft-token file puts into prompts, read from its header (no model needed): SD 1.x/2.x the
    file's token (or ``token``), SDXL ``token`` / the run's dft.json / ``<fastfair>``, SD3 / Flux the k names in its
    metadata (``token`` T gives <T_0> ...; the spelled-out prefix "<a> <b>" is accepted as it is)."""
    keys, meta, k, kind = _soft_file(path)
    if kind in ("sd3", "flux"):
        if token and len(token.split()) > 1:
            names = token.split()
        else:
            names = mmdit_soft_token_names(token, k) if token else meta.get("fastfair_tokens", "").split()
        if len(names) != k:
            raise DFTError(f"soft tokens {str(path)!r}: {len(names)} token names ({' '.join(names)!r}) for its {k} "
                           "embeddings")
        return names
    if kind == "sdxl":
        if token is None:
            run = Path(path).parent / "dft.json"
            try:
                token = json.loads(run.read_text())["config"]["token"] if run.exists() else None
            except (ValueError, KeyError, TypeError):
                token = None
        return [token or "<fastfair>"]
    return [token or keys[0]]


def load_soft_tokens(pipe, path: str | os.PathLike, token: str | None = None) -> str:
    """Load a DFT soft-token file (``OUT/soft_tokens.safetensors`` or ``soft_tokens-ema.safetensors``) into ``pipe``
    and return what prompts start with to use them. SD 1.x/2.x files hold one tensor named by the token and SDXL
    files ``clip_l`` / ``clip_g`` (one per text encoder), both loaded as textual inversion; the SDXL token is
    ``token``, else the run's ``dft.json`` beside the file, else ``<fastfair>``. SD3 / Flux files add ``t5`` and name
    their k tokens in their metadata; they are added to every tokenizer and returned spelled out
    ("<fastfair_0> <fastfair_1> ...")."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DFTError(f"soft tokens {str(path)!r}: no such file (fastfair finetune dft --trainable soft-tokens writes "
                       "OUT/soft_tokens.safetensors)")
    keys, _, _, made_for = _soft_file(path)
    kind = _model_kind(pipe)
    names = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}
    if made_for != kind:
        raise DFTError(f"{str(path)!r} holds {names[made_for]} soft tokens but the pipeline is "
                       f"{type(pipe).__name__}: load them into the model they were trained on")
    sd = load_file(str(path))
    parts = {key: (getattr(pipe, e), getattr(pipe, t)) for e, t, key in _soft_encoders(pipe, kind)}
    if kind == "sd":
        token = soft_token_names(path, token)[0]
        parts = {keys[0]: parts["clip_l"]}
    elif kind == "sdxl":
        token = soft_token_names(path, token)[0]
    else:
        if sorted(parts) != keys:
            raise DFTError(f"{str(path)!r} holds soft tokens for the text encoders {keys} but this pipeline has "
                           f"{sorted(parts)}: load them into the model they were trained on")
        token = " ".join(soft_token_names(path, token))
    if token is None or any(c in "{}" for c in token) or (kind in ("sd", "sdxl") and len(token.split()) != 1):
        raise DFTError(f"soft tokens {str(path)!r}: token {token!r} must be one word without braces")
    for key, (enc, tok) in parts.items():
        vocab = tok.get_vocab()
        taken = [t for t in token.split() if t in vocab]
        if taken:
            raise DFTError(f"the tokenizer already has the token {taken[0]!r} (soft tokens loaded twice, or a word of "
                           "the vocabulary): give another --token / token=")
    for key, (enc, tok) in parts.items():
        emb = sd[key]
        width = enc.get_input_embeddings().weight.shape[1]
        if emb.ndim != 2 or emb.shape[1] != width:
            raise DFTError(f"the soft tokens {key!r} in {str(path)!r} are {tuple(emb.shape)} but this text encoder's "
                           f"embeddings are {width} wide: they were trained on another model")
    for key, (enc, tok) in parts.items():
        _fix_clip_pooling(enc, tok)
        if kind in ("sd3", "flux"):
            _add_token_rows(enc, tok, token.split(), sd[key])
        else:
            pipe.load_textual_inversion({token: sd[key].to(enc.dtype)}, token=token, text_encoder=enc, tokenizer=tok)
    return token


RUN_FILES = ("dft.json", "report.html", "lora", "lora-ema", "soft_tokens.safetensors", "soft_tokens-ema.safetensors", "checkpoints")


def _world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sub_faces(faces, idx: slice):
    if faces is None:
        return None
    from .faces import FaceBatch

    return FaceBatch(faces.found[idx], faces.boxes[idx], faces.crop_boxes[idx], faces.landmarks[idx])


def _check_run_dir(out: Path, resuming: bool, overwrite: bool, remove: bool = True) -> None:
    """Refuse an ``out_dir`` that is a file, or that holds a run when neither resuming nor overwriting; with
    ``overwrite`` and ``remove`` remove that run's outputs and checkpoints (and nothing else) -- without
    ``remove`` (the first check, before the trainer's other checks) leave them."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise DFTError(f"out_dir {str(out)!r}: {str(p)!r} is a file; give a folder (it is created if missing)")
    from ._io import check_not_foreign

    try:
        check_not_foreign(out, "dft.json", "finetune dft")
    except ValueError as e:
        raise DFTError(str(e)) from None
    found = [n for n in RUN_FILES if (out / n).exists()] if out.is_dir() else []
    if not found or resuming:
        return
    if not overwrite:
        raise DFTError(f"out_dir {str(out)!r} holds a DFT run ({', '.join(found)}): continue it with resume='latest' "
                       "(--resume latest), choose another folder, or start over with overwrite=True (--overwrite), "
                       "which removes its outputs and checkpoints")
    if not remove:
        return
    import shutil

    for n in found:
        p = out / n
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def finetune_dft(pipe, prompts, classifier, config: DFTConfig | None = None, *, labels=None, quality_encoder="clip",
                 out_dir=None, resume=None, overwrite: bool = False, progress: bool = True, face_detector=None,
                 face_embedder=None, face_bank=None, model_name: str | None = None, **overrides) -> DFTResult:
    """Adjusted DFT of ``pipe`` toward the target distribution; see :class:`DFTTrainer`. Keyword ``overrides``
    replace fields of ``config``."""
    cfg = config or DFTConfig()
    if overrides:
        cfg = DFTConfig(**{**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, **overrides})
    tr = DFTTrainer(pipe, prompts, classifier, cfg, labels=labels, quality_encoder=quality_encoder, out_dir=out_dir,
                    resume=resume, overwrite=overwrite, face_detector=face_detector, face_embedder=face_embedder,
                    face_bank=face_bank, model_name=model_name)
    try:
        return tr.train(progress=progress)
    finally:
        tr.close()


def _prompts_from_args(args, eval_: bool = False) -> list[str] | None:
    """The training prompts (``--prompt`` / ``--prompts`` in ``--template``), or with ``eval_`` the evaluation
    prompts (``--eval-prompt`` / ``--eval-prompts``; None: the training prompts)."""
    prompts = list((args.eval_prompt if eval_ else args.prompt) or [])
    spec = args.eval_prompts if eval_ else args.prompts
    if spec:
        from .audit.prompts import PromptSetError, fill, load_professions

        try:
            prompts += [fill(args.template, p) for p in load_professions(spec)]
        except PromptSetError as e:
            raise DFTError(f"--{'eval-' if eval_ else ''}prompts: {e}") from None
    if eval_:
        return prompts or None
    if not prompts:
        raise DFTError("no training prompts: give --prompt TEXT (repeatable) or --prompts builtin:NAME")
    return prompts


def load_face_parts(detector: str | None, embedder: str | None, bank: str | None, device=None):
    """The CLI's face detector (a ``fastfair.faces.load_detector`` spec), face embedder (``python:FILE.py:FUNC``,
    FUNC(device=) returning a module on aligned faces in [0, 1]) and face bank (a ``.pt`` tensor or ``.npy`` array
    of real-face embeddings, (M, D))."""
    from .classify import _import_factory
    from .faces import FaceError, load_detector

    det = emb = bk = None
    if detector:
        try:
            det = load_detector(detector)
        except FaceError as e:
            raise DFTError(str(e)) from e
    if embedder:
        if not embedder.startswith("python:"):
            raise DFTError(f"--face-embedder {embedder!r}: give python:FILE.py:FUNCTION")
        try:
            emb = _import_factory(embedder[len("python:"):], "face embedder")(device=device)
        except ValueError as e:
            raise DFTError(str(e)) from e
    if bank:
        path = Path(bank)
        if not path.is_file():
            raise DFTError(f"--face-bank {bank!r} does not exist (a .pt tensor or .npy array of face embeddings)")
        try:
            bk = np.load(path) if path.suffix == ".npy" else torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DFTError(f"cannot read --face-bank {bank!r}: {e}") from e
        numeric = isinstance(bk, torch.Tensor) or (isinstance(bk, np.ndarray) and bk.dtype.kind in "biuf")
        if not numeric or bk.ndim != 2:
            what = f"a {type(bk).__name__}" + (f" with keys {sorted(bk)}" if isinstance(bk, dict) else "")
            raise DFTError(f"--face-bank {bank!r} holds {what}; it must hold one (M, D) tensor or array of face "
                           "embeddings (save just that matrix)")
    return det, emb, bk


def cli_main(args) -> int:
    """``fastfair finetune dft`` (the parser is in ``fastfair.cli``). Under ``torchrun --nproc-per-node K`` the
    N images of every step are shared by K processes (gloo on CPU, NCCL on GPUs, one GPU each)."""
    if args.overwrite and args.resume is not None:
        raise DFTError("--overwrite starts over and --resume continues a run: give one of them")
    eval_flags = {"--eval-prompt": args.eval_prompt is not None, "--eval-prompts": args.eval_prompts is not None,
                  "--eval-seeds": args.eval_seeds != 16,
                  "--eval-steps": args.eval_steps is not None}
    if not args.eval_every and any(eval_flags.values()):
        raise DFTError(f"{', '.join(k for k, v in eval_flags.items() if v)} only apply with --eval-every N")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if device.startswith("cuda:"):
            raise DFTError(f"--device {device} under torchrun: give --device cuda (each process takes the GPU of its "
                           "LOCAL_RANK) or cpu")
        if args.images_per_prompt % world:
            raise DFTError(f"--images-per-prompt {args.images_per_prompt} must be a multiple of the {world} "
                           "processes: each takes an equal share of every prompt's images")
    rank, world, local, own = _dist.setup(6 * 3600, backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        return _cli_run(args, rank, world, local, f"cuda:{local}" if world > 1 and device == "cuda" else device)
    finally:
        _dist.teardown(own)


def _cli_run(args, rank: int, world: int, local: int, device: str) -> int:
    from .pipelines import load_pipeline

    if not args.overwrite:  # before loading anything: a run in --out is continued or overwritten, never mixed
        err = None
        if rank == 0:
            try:
                _check_run_dir(Path(args.out), args.resume is not None, False)
            except DFTError as e:
                err = str(e)
        err = _dist.broadcast(err, world)
        if err:
            raise DFTError(err)
    prompts = _prompts_from_args(args)
    # "gender*race" (the audits' intersection) is what DFT does with "gender,race": align the joint classes
    attributes = [a.strip() for a in re.split(r"[,*]", args.attributes) if a.strip()]
    if args.trainable != "soft-tokens" and (args.soft_tokens is not None or args.token is not None):
        raise DFTError(f"--soft-tokens / --token set the soft-token trainable; --trainable is {args.trainable}")
    soft = {k: v for k, v in (("soft_tokens", args.soft_tokens), ("token", args.token)) if v is not None}
    ss = str(args.sampling_steps)
    try:
        lo, hi = (ss.split("-", 1) if "-" in ss else (ss, ss))
        sampling = (int(lo), int(hi))
    except ValueError as e:
        raise DFTError(f"--sampling-steps must be N or LO-HI (e.g. 19-23); got {ss!r}") from e
    try:
        joint = [float(x) for x in args.joint_target.split(",") if x.strip()] if args.joint_target else None
    except ValueError:
        raise DFTError(f"--joint-target {args.joint_target!r}: give comma-separated probabilities") from None
    cfg = DFTConfig(attributes=attributes, target=parse_targets(args.target) or None,
                    joint_target=joint,
                    trainable=args.trainable, rank=args.rank, lora_alpha=args.lora_alpha, **soft,
                    images_per_prompt=args.images_per_prompt, batch_size=args.batch_size,
                    steps=args.steps, sampling_steps=sampling, scheduler=args.scheduler,
                    guidance_scale=args.guidance_scale, prompt_padding=args.prompt_padding, height=args.height,
                    width=args.width, gradient_checkpointing=not args.no_checkpointing, attention=args.attention, backend=args.backend,
                    lr=args.lr, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                    ema_decay=args.ema_decay if args.ema_decay > 0 else None,
                    uncertainty_threshold=args.uncertainty_threshold, ot_samples=args.ot_samples,
                    quality_weight=args.quality_weight, quality_relax=args.quality_relax,
                    face_crop_size=args.face_crop_size, face_expand=args.face_expand, face_relax=args.face_relax,
                    face_weight=args.face_weight, face_confidence=args.face_confidence,
                    checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                    eval_every=args.eval_every, eval_prompts=_prompts_from_args(args, eval_=True), eval_seeds=args.eval_seeds,
                    eval_steps=args.eval_steps,
                    mixed_precision=args.mixed_precision, seed=args.seed)
    try:
        _need_scipy()
        _need_peft() if cfg.trainable != "soft-tokens" else None
    except ImportError as e:
        raise DFTError(str(e)) from e
    if (args.face_embedder or args.face_bank) and not args.face_detector:
        raise DFTError("--face-embedder / --face-bank need --face-detector (the face-realism loss works on faces)")
    if args.face_bank and not args.face_embedder:
        raise DFTError("--face-bank is used by the face-realism loss: give --face-embedder too")
    face_flags = {"--face-weight": (args.face_weight, 1.0), "--face-relax": (parse_relax(args.face_relax), 0.2),
                  "--face-confidence": (args.face_confidence, 0.9), "--face-expand": (args.face_expand, 0.5),
                  "--face-crop-size": (args.face_crop_size, 224)}
    if not args.face_detector and any(v != d for v, d in face_flags.values()):
        raise DFTError(f"{', '.join(k for k, (v, d) in face_flags.items() if v != d)} only apply with --face-detector")
    if cfg.mixed_precision != "no" and not device.startswith("cuda"):
        raise DFTError(f"--mixed-precision {cfg.mixed_precision} is autocast on CUDA; on {device} use 'no'")
    kind = _kind_without_loading(args.model)
    if kind is not None:   # what the model kind rules out, before minutes of loading a large model
        _check_kind(cfg, kind)
    det, emb, bank = load_face_parts(args.face_detector, args.face_embedder, args.face_bank, device)
    pipe = load_pipeline(args.model, device=device, dtype=args.dtype)
    clf = load_classifier(args.classifier, attributes, device=device, clip_model=args.clip_model)
    qe = None if args.quality_encoder == "none" or args.quality_weight <= 0 else args.quality_encoder
    res = finetune_dft(pipe, prompts, clf, cfg, quality_encoder=qe, out_dir=args.out, resume=args.resume,
                       overwrite=args.overwrite, progress=not args.no_progress, face_detector=det,
                       face_embedder=emb, face_bank=bank, model_name=args.model)
    if rank != 0:
        return 0
    last = res.history[-1] if res.history else None
    if last is not None:
        dist = "; ".join(f"{a} " + "/".join(f"{v:.2f}" for v in d) for a, d in last["distribution"].items())
        print(f"step {res.steps}: loss {last['loss']:.4f}, last batch distribution {dist}")
    for ev in res.evaluations[-1:]:
        for which in ("model", "ema"):
            if which in ev and not any(ev[which]["summary"].values()):
                print(f"evaluation at step {ev['step']} ({which}): no image counted (no face found)")
            elif which in ev:
                print(f"evaluation at step {ev['step']} ({which}, {ev[which]['counted']}/{ev[which]['images']} images "
                      "counted): " + "; ".join(f"{a} " + "/".join(f"{v:.2f}" for v in x["freq"]) +
                                               f" (target gap {x['target_gap']:.3f})"
                                               for a, x in ev[which]["summary"].items() if x))
    for what, path in (("LoRA", res.lora_dir), ("LoRA (EMA)", res.lora_ema_dir), ("soft tokens", res.soft_tokens),
                       ("soft tokens (EMA)", res.soft_tokens_ema)):
        if path is not None:
            print(f"wrote {what}: {path}")
    if res.soft_tokens is not None:
        print(f"use: fastfair generate / audit --soft-tokens {res.soft_tokens}, or in Python "
              f"fastfair.dft.load_soft_tokens(pipe, '{res.soft_tokens}') and prompts starting with {res.token}")
    elif res.lora_dir is not None:
        print(f"use: pipe.load_lora_weights('{res.lora_dir}')")
    if res.report is not None:
        print(f"wrote the training report: {res.report}")
    return 0
