"""Image feature encoders on images in [0, 1] with differentiable preprocessing: CLIP image embeddings, DINOv2's
CLS token, a resize wrapper, and the spec parser shared by DFT's quality regulariser and ``fastfair compare
--image-similarity``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ClipFeatures", "DinoFeatures", "Resized", "load_encoders", "encoder_name", "FeatureError", "PAPER_CLIP",
           "PAPER_DINO"]


class FeatureError(ValueError):
    """An encoder that cannot be loaded, or a spec that names none."""


def _model_type(model_id: str, what: str, flag: str) -> str | None:
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(model_id), "model_type", None)
    except (OSError, ValueError) as e:
        raise FeatureError(f"could not load {what} model {model_id!r}: {e}\n(give a local folder as {flag}:PATH "
                           "(--quality-encoder, --image-similarity), or leave it out)") from e


def _load_frozen(cls, model_id: str, what: str, flag: str, dtype, device, **kw):
    """``cls.from_pretrained`` in eval mode without gradients; weights that would load at random are refused."""
    try:
        model, info = cls.from_pretrained(model_id, torch_dtype=dtype or torch.float32, output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise FeatureError(f"could not load {what} model {model_id!r}: {e}\n(give a local folder as {flag}:PATH "
                           "(--quality-encoder, --image-similarity), or leave it out)") from e
    if info.get("missing_keys"):
        raise FeatureError(f"{model_id!r} lacks {what} weights {sorted(info['missing_keys'])[:4]}: they would be "
                           "random")
    model.requires_grad_(False).eval()
    return model.to(device) if device is not None else model


class ClipFeatures(torch.nn.Module):
    """CLIP image embeddings of images in [0, 1] (differentiable preprocessing), the default feature encoder
    of the quality regulariser."""

    def __init__(self, model_id: str = "openai/clip-vit-large-patch14", device=None, dtype=None):
        super().__init__()
        from transformers import AutoConfig, CLIPVisionModelWithProjection

        kind = _model_type(model_id, "CLIP", "clip")
        if kind not in ("clip", "clip_vision_model"):
            raise FeatureError(f"{model_id!r} holds a {kind!r} model, not CLIP")
        kw = {}
        if kind == "clip":   # a whole CLIPModel: the projection width is on the top config, not always in its vision
            cfg = AutoConfig.from_pretrained(model_id)   # part
            cfg.vision_config.projection_dim = cfg.projection_dim
            kw["config"] = cfg.vision_config
        self.model = _load_frozen(CLIPVisionModelWithProjection, model_id, "CLIP", "clip", dtype, device, **kw)
        self.size = int(self.model.config.image_size)
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        x = F.interpolate(images, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x - self.mean.to(x)) / self.std.to(x)
        return self.model(pixel_values=x.to(next(self.model.parameters()).dtype)).image_embeds.float()


class DinoFeatures(torch.nn.Module):
    """DINOv2 features (the final layer-normed CLS token, what ``torch.hub``'s ``dinov2_vit*14`` models return) of
    images in [0, 1], ImageNet-normalised; no resize (patch-14 models take any size, position embeddings are
    interpolated)."""

    def __init__(self, model_id: str = "facebook/dinov2-base", device=None, dtype=None):
        super().__init__()
        from transformers import Dinov2Model

        kind = _model_type(model_id, "DINOv2", "dinov2")
        if kind != "dinov2":
            raise FeatureError(f"{model_id!r} holds a {kind!r} model, not DINOv2")
        self.model = _load_frozen(Dinov2Model, model_id, "DINOv2", "dinov2", dtype, device)
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)

    def forward(self, images):
        x = (images - self.mean.to(images)) / self.std.to(images)
        return self.model(pixel_values=x.to(next(self.model.parameters()).dtype)).pooler_output.float()


class Resized(torch.nn.Module):
    """``encoder`` applied to the images resized to ``size`` x ``size`` (bilinear, antialiased: torchvision's
    ``Resize`` on tensors since 0.17), as the paper's code feeds CLIP and DINOv2 224-pixel images (its pinned
    torchvision 0.16 did not antialias tensors: the features differ slightly, README "Differences")."""

    def __init__(self, encoder: torch.nn.Module, size: int = 224):
        super().__init__()
        self.encoder, self.size = encoder, int(size)

    def forward(self, images):
        if tuple(images.shape[-2:]) != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=True)
        return self.encoder(images)


PAPER_CLIP = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PAPER_DINO = "facebook/dinov2-base"


def load_encoders(spec, device=None) -> list[torch.nn.Module]:
    """Image feature encoders (DFT's quality regulariser, ``fastfair compare --image-similarity``).

    ``spec``: ``"clip"`` (CLIP ViT-L/14), ``"clip:MODEL_ID"``, ``"dinov2"`` (DINOv2 ViT-B/14), ``"dinov2:MODEL_ID"``,
    several joined by ``+``, ``"paper"`` (Shen et al.'s: CLIP ViT-H/14 + DINOv2 ViT-B/14 on the image resized to
    224), ``"none"`` / None, a torch module mapping images in [0, 1] to features, or a list of modules."""
    if spec is None or (isinstance(spec, str) and spec.strip() == "none"):
        return []
    if isinstance(spec, torch.nn.Module) or (callable(spec) and not isinstance(spec, str)):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [e for s in spec for e in load_encoders(s, device)]
    if not isinstance(spec, str):
        raise FeatureError(f"an encoder spec must be a string, a module or a list; got {type(spec).__name__}")
    if spec.strip() == "paper":
        return [Resized(ClipFeatures(PAPER_CLIP, device=device), 224), Resized(DinoFeatures(PAPER_DINO, device), 224)]
    out = []
    for part in (p.strip() for p in spec.split("+")):
        kind, _, mid = part.partition(":")
        if kind == "clip":
            out.append(ClipFeatures(mid or "openai/clip-vit-large-patch14", device=device))
        elif kind == "dinov2":
            out.append(DinoFeatures(mid or PAPER_DINO, device=device))
        else:
            raise FeatureError(f"encoder {part!r}: use clip, clip:MODEL_ID, dinov2, dinov2:MODEL_ID, several joined by "
                               "'+', or alone: paper (CLIP ViT-H/14 + DINOv2 ViT-B/14, as Shen et al.) or none")
    return out


def encoder_name(m) -> str:
    """How runs record an encoder: its model id where it has one (CLIP / DINOv2), else its class."""
    inner = getattr(m, "encoder", None)
    if isinstance(m, Resized) and inner is not None:
        return f"{encoder_name(inner)}@{m.size}px"
    cfg = getattr(getattr(m, "model", None), "config", None)
    ident = getattr(cfg, "_name_or_path", None) if cfg is not None else None
    return f"{type(m).__name__}({ident})" if ident else type(m).__name__
