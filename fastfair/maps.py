"""Map accumulation and aggregation presets.

A ``MapRecorder`` lives for one batch of one ``generate`` call. The patched cross-attention
processors hand it each layer's maps -- (B, T, Nq) summed over heads, or (B, H, T, Nq) for the
``"daam"`` preset -- and it folds them into a few accumulators. ``finalize`` gives (B, T, h, w).

Presets (``aggregation=``):

``"fastfair"`` (default)
    All cross-attention layers (down, mid and up blocks; SD3: every joint-attention layer, the
    probability that an image token gives the word's text tokens in the joint softmax over image and
    text tokens). Per resolution, one accumulator sums
    the maps over heads, layers and the selected timesteps; each is bilinearly upsampled
    (align_corners=False) to the latent grid and the sum is divided by the number of
    (head, layer, step) terms. A word's map is therefore the *mean attention probability* that a
    latent pixel gives the word's tokens, in [0, 1]. Memory: one (B, T, Nq) float32 tensor per
    resolution.
``"daam"``
    DAAM 0.2.0's global heat map: down and up blocks only, and only maps whose DAAM factor
    ``int(sqrt(latent_hw // Nq))`` is in ``factors`` and is not 8 (``latent_hw`` is 4096 when
    sample_size x vae_scale_factor is 512 or 1024, else 9216). Maps are summed over steps per
    (layer, head); each is upsampled bicubically to sqrt(latent_hw) squared, clamped at 0, and
    the result is the mean over the kept (layer, head) pairs. Output is 64x64 (or 96x96).
``"biasmap"``
    What BiasMap's reference code gets through OVAM: down and up blocks only, sum over heads,
    steps and blocks after bilinear upsampling to the latent grid, no normalisation. With an
    attribution prompt the softmax runs over that prompt's own tokens (BOS..EOS, no padding).
    BiasMap's OVAM hook reads the queries of the *unconditional* CFG branch (batch index 0);
    this preset does the same (``branch="uncond"``). The other presets use the conditional half.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DAAM_FACTORS = frozenset({0, 1, 2, 4, 8, 16, 32, 64})


@dataclass(frozen=True)
class Aggregation:
    name: str = "fastfair"
    blocks: frozenset = frozenset({"down", "mid", "up", "joint"})
    normalize: bool = True            # divide by the number of (head, layer, step) terms
    branch: str = "cond"              # which half of a CFG batch the maps read
    factors: frozenset | None = None  # daam only
    per_head: bool = False            # daam: per-head upsample + clamp

    @staticmethod
    def get(spec) -> "Aggregation":
        if isinstance(spec, Aggregation):
            return spec
        presets = {
            "fastfair": Aggregation(),
            "daam": Aggregation("daam", frozenset({"down", "up"}), True, "cond", DAAM_FACTORS, True),
            "biasmap": Aggregation("biasmap", frozenset({"down", "up"}), False, "uncond"),
        }
        if spec not in presets:
            raise ValueError(f"unknown aggregation {spec!r}; choose one of {sorted(presets)} or pass an Aggregation")
        return presets[spec]

    def with_factors(self, factors) -> "Aggregation":
        return Aggregation(self.name, self.blocks, self.normalize, self.branch, frozenset(factors), self.per_head)


def block_of(module_name: str) -> str:
    """"down" / "mid" / "up" for UNet layers, "joint" for an MMDiT's (SD3, Flux) transformer blocks."""
    parts = module_name.split(".")  # whatever wraps the network ("_orig_mod." of torch.compile, "unet.", ...)
    for p in parts:
        for b in ("down", "mid", "up"):
            if p in (f"{b}_blocks", f"{b}_block"):
                return b
    if any(p in ("transformer_blocks", "single_transformer_blocks") for p in parts):  # SD3 joint, Flux both
        return "joint"
    return "other"


def grid_for(nq: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a UNet level with nq query positions, for a latent grid (H, W)."""
    H, W = latent_hw
    for level in range(12):
        h, w = math.ceil(H / 2 ** level), math.ceil(W / 2 ** level)
        if h * w == nq:
            return h, w
    raise ValueError(f"cannot place {nq} query positions on a downsampled {H}x{W} latent grid")


@dataclass
class MapRecorder:
    """Accumulates one batch's maps. ``tokens`` (B, T) are key positions (of the prompt, or of the
    attribution prompt when ``map_states`` is set)."""

    tokens: torch.Tensor
    n_items: int
    latent_hw: tuple[int, int]
    aggregation: Aggregation
    map_states: torch.Tensor | None = None   # (B, Nm, C) encoder states of the attribution prompt
    steps: frozenset | None = None            # step indices that count (None: all)
    daam_latent_hw: int = 4096
    step: int = 0
    # further attribution prompts, recorded in the same UNet pass (maps only, ``ops.attention_maps``):
    # name -> a MapRecorder with the same aggregation, its own ``tokens`` and ``map_states``
    extras: dict = field(default_factory=dict)
    _acc: dict = field(default_factory=dict)
    _count: dict = field(default_factory=dict)
    _seen_factors: set = field(default_factory=set)

    @property
    def active(self) -> bool:
        return self.steps is None or self.step in self.steps

    def attribution_recorders(self) -> dict:
        """name -> recorder of each further attribution prompt (their text streams on an MMDiT)."""
        return self.extras

    def set_step(self, step: int) -> None:
        self.step = step
        for sub in self.extras.values():
            sub.step = step

    def wants(self, block: str, nq: int) -> bool:
        agg = self.aggregation
        if block not in agg.blocks:
            return False
        if agg.factors is not None:
            f = int(math.sqrt(self.daam_latent_hw // nq))
            self._seen_factors.add(f)
            return f != 8 and f in agg.factors
        return True

    def rows(self, batch: int) -> slice:
        """The batch rows whose maps count: the conditional half of a CFG batch [uncond, cond]."""
        n = self.n_items
        if batch == n:
            return slice(0, n)
        if batch == 2 * n:
            return slice(n, 2 * n) if self.aggregation.branch == "cond" else slice(0, n)
        raise RuntimeError(f"cross-attention saw a batch of {batch} for {n} images; fastfair expects {n} "
                           f"(no CFG) or {2 * n} (CFG as [uncond, cond])")

    def add(self, layer: str, maps: torch.Tensor, nq: int, heads: int) -> None:
        """Fold one layer call's maps in: (B, T, Nq) summed over ``heads`` heads, or (B, H, T, Nq)."""
        key = layer if self.aggregation.per_head else nq
        if key in self._acc:
            self._acc[key] = self._acc[key] + maps  # out of place: keeps autograd graphs valid
        else:
            self._acc[key] = maps
            self._count[key] = 0
        self._count[key] += heads

    def finalize(self) -> torch.Tensor:
        """(B, T, h, w) float32 maps of the batch."""
        if not self._acc and self._seen_factors:
            raise RuntimeError(f"no layer's DAAM factor is in factors={sorted(self.aggregation.factors)}; this pipeline's "
                               f"layers have factors {sorted(self._seen_factors)} (DAAM needs factors= unless "
                               "sample_size x vae_scale is 512 or 1024): use "
                               "Aggregation.get('daam').with_factors([...]) from Python, or the 'fastfair' / "
                               "'biasmap' aggregation (the command line's --aggregation)")
        if not self._acc:
            raise RuntimeError("no cross-attention maps were recorded: the pipeline ran no cross-attention layer "
                               "that the aggregation keeps (check the steps window and the aggregation's blocks/factors)")
        agg = self.aggregation
        if agg.per_head:  # daam
            x = int(math.sqrt(self.daam_latent_hw))
            total, n = None, 0
            for layer, m in self._acc.items():
                B, Hh, T, nq = m.shape
                h, w = grid_for(nq, self.latent_hw)
                up = F.interpolate(m.reshape(B * Hh, T, h, w), size=(x, x), mode="bicubic").clamp(min=0)
                up = up.reshape(B, Hh, T, x, x).sum(1)
                total = up if total is None else total + up
                n += Hh
            return total / n
        H, W = self.latent_hw
        total, n = None, 0
        for nq, m in self._acc.items():
            B, T, _ = m.shape
            h, w = grid_for(nq, self.latent_hw)
            m = m.reshape(B, T, h, w)
            if (h, w) != (H, W):
                m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
            total = m if total is None else total + m
            n += self._count[nq]
        return total / n if agg.normalize else total
