"""Semantic guidance (SEGA, Brack et al., NeurIPS 2023) and Fair Diffusion (Friedrich et al., 2023) in
``fastfair.generate``.

SEGA steers a generation towards (or away from) editing concepts: each concept c is one more UNet row
per image (its prompt's text embedding, no grad, no maps), and at every step the noise estimate gets

    g_c = s_c * sign_c * (eps_c - eps_uncond), kept only where |g_c| >= its per-(image, channel)
          quantile at ``threshold_c`` (the rest set to 0),
    sega = sum_c w_c g_c + momentum_scale * m,    m <- beta * m + (1 - beta) * sega,

added once every concept is past its warm-up (while only some are, their weight-normalised sum without
momentum is added); a concept past its cool-down adds no new guidance (the momentum it built decays on).
Warm-up and cool-down count scheduler steps (loop iterations: PNDM's first step is doubled, Heun steps
twice per timestep). That is exactly diffusers'
``SemanticStableDiffusionPipeline`` (tested against it), with the edit rows folded into any SD 1.x/2.x,
SDXL or SD3 pipeline (SD3: on the velocity, where its pipeline applies CFG), per-image editing prompts (a batch may push its images in different directions), and
with fastfair's maps and entanglement guidance in the same run.

Fair Diffusion instructs a generation on fairness with SEGA: per image a target group is chosen (by
the seed, from a target distribution), the editing prompt of every other group is applied in reverse
and the target group's forward. ``FairDiffusion.preset("gender")`` / ``("race")`` are the settings of
BiasMap's released code, whose baseline and mitigated images are both generated this way
("a male" / "a female", "a white person" / "an African-american person", even seeds -> the second group,
warm-up 10, edit scale 4, threshold 0.95, momentum 0.3, beta 0.6).

The hooks wrap ``unet.forward`` and ``scheduler.step`` outermost: an entanglement guider inside still
sees the pipeline's own 2N-row CFG call, and the edit rows run through the plain UNet forward.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from .guidance import StepHooks, _map_rows

__all__ = ["SemanticGuidance", "FairDiffusion", "JointFairDiffusion", "sega_update"]


def _convert(v, name: str, kind):
    if v is None:
        return None
    if kind is bool:
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{name} takes True / False (or one per prompt); got {v!r}")
        return bool(v)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} takes numbers (or one per prompt); got {v!r}")
    if kind is int:
        if not float(v).is_integer():
            raise ValueError(f"{name} counts steps: give a whole number; got {v!r}")
        return int(v)
    return float(v)


def _per_concept(value, n: int, name: str, kind=float, per_concept: bool = True) -> list:
    if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
        if not per_concept:
            raise ValueError(f"FairDiffusion takes one {name} for all groups (each image orders its groups "
                             f"differently); got {value!r}")
        vals = np.asarray(value, dtype=object).reshape(-1).tolist() if not isinstance(value, (list, tuple)) else list(value)
    else:
        vals = [value] * n
    if len(vals) != n:
        raise ValueError(f"{name}: {len(vals)} values for {n} editing prompts; give one, or one per prompt")
    return [_convert(v.item() if isinstance(v, (np.generic, torch.Tensor)) else v, name, kind) for v in vals]


@dataclass(kw_only=True)
class _EditParams:
    """Per-concept SEGA settings shared by both front ends (diffusers' defaults)."""
    scale: float | Sequence[float] = 5.0
    warmup: int | Sequence[int] = 10
    cooldown: int | Sequence[int] | None = None
    threshold: float | Sequence[float] = 0.9
    momentum_scale: float = 0.1
    momentum_beta: float = 0.4
    weights: Sequence[float] | None = None

    def _check(self, n: int, per_concept: bool = True) -> None:
        if n < 1:
            raise ValueError("semantic guidance needs at least one editing prompt")
        self.scales = _per_concept(self.scale, n, "scale", float, per_concept)
        self.warmups = _per_concept(self.warmup, n, "warmup", int, per_concept)
        self.cooldowns = _per_concept(self.cooldown, n, "cooldown", int, per_concept)
        self.thresholds = _per_concept(self.threshold, n, "threshold", float, per_concept)
        self.concept_weights = _per_concept(1.0 if self.weights is None else self.weights, n, "weights", float,
                                            per_concept)
        self.momentum_scale = _convert(self.momentum_scale, "momentum_scale", float)
        self.momentum_beta = _convert(self.momentum_beta, "momentum_beta", float)
        for s in self.scales:
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"edit scale must be > 0 (the direction is `reverse`); got {s}")
        for t in self.thresholds:
            if not 0.0 <= t < 1.0:
                raise ValueError(f"edit threshold is the quantile of |guidance| below which it is dropped, in "
                                 f"[0, 1); got {t}")
        for w in self.warmups:
            if w < 0:
                raise ValueError(f"warmup must be >= 0 steps; got {w}")
        for w, c in zip(self.warmups, self.cooldowns):
            if c is not None and c <= w:
                raise ValueError(f"cooldown ({c}) must be after the warm-up ({w}): the concept would never apply "
                                 "(None: no cool-down)")
        for w in self.concept_weights:
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"concept weights must be >= 0 (push away from a concept with reverse=True); got {w}")
        if not (math.isfinite(self.momentum_scale) and self.momentum_scale >= 0):
            raise ValueError(f"momentum_scale must be >= 0; got {self.momentum_scale}")
        if not 0.0 <= self.momentum_beta <= 1.0:
            raise ValueError(f"momentum_beta must be in [0, 1]; got {self.momentum_beta}")

    def _settings(self) -> dict:
        return dict(scale=self.scales, warmup=self.warmups, cooldown=self.cooldowns, threshold=self.thresholds,
                    weights=self.concept_weights, momentum_scale=self.momentum_scale,
                    momentum_beta=self.momentum_beta)


@dataclass
class SemanticGuidance(_EditParams):
    """SEGA with the same editing prompts for every image: ``prompts`` (one concept each), ``reverse``
    (push away from the concept; one flag or one per prompt). The other settings, per concept or one
    for all, default to diffusers' ``SemanticStableDiffusionPipeline``: scale 5, warm-up 10 steps, no
    cool-down, threshold 0.9, momentum scale 0.1, beta 0.4, weights 1."""
    prompts: Sequence[str] = ()
    reverse: bool | Sequence[bool] = False

    def __post_init__(self):
        self.prompts = [self.prompts] if isinstance(self.prompts, str) else list(self.prompts)
        for p in self.prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"editing prompts must be non-empty strings; got {p!r}")
        dup = sorted({p for p in self.prompts if self.prompts.count(p) > 1})
        if dup:
            raise ValueError(f"editing prompts {dup} given more than once (towards and away would cancel); give "
                             "each concept once")
        self._check(len(self.prompts))
        self.reverses = _per_concept(self.reverse, len(self.prompts), "reverse", bool)

    @property
    def n_concepts(self) -> int:
        return len(self.prompts)

    def plan(self, seed: int) -> tuple[list[str], list[bool], str | None]:
        """(editing prompts, reverse flags, target label) of the image with ``seed``."""
        return list(self.prompts), list(self.reverses), None

    def describe(self) -> dict:
        return dict(method="sega", prompts=self.prompts, reverse=self.reverses, **self._settings())


_PRESETS = {
    # BiasMap's released code (run_gender.py / run_race.py batch runs): even seeds -> the first group here;
    # labels as the audit's attribute sets name them (so audits report how often the steer lands)
    "gender": {"female": "a female", "male": "a male"},
    "race": {"African-American": "an African-american person", "White": "a white person"},
}


@dataclass
class FairDiffusion(_EditParams):
    """Fair Diffusion: per image, pick a target group and steer towards it with SEGA, away from the others.

    ``choices``: group label -> editing prompt, e.g. ``{"female": "a female", "male": "a male"}``.
    ``target``: label -> probability (default: uniform). ``assign``: "parity" gives the image with seed
    s the group ``labels[s % k]`` (uniform targets only; BiasMap's even / odd seeds), "random" draws it
    from ``target`` with a generator seeded by s alone (the same image gets the same group whatever the
    batch). Every other group's prompt is applied in reverse (in ``choices`` order), then the target's
    forward. Defaults are Fair Diffusion's as BiasMap runs it: scale 4, warm-up 10, threshold 0.95,
    momentum 0.3, beta 0.6.
    """
    choices: Mapping[str, str] = field(default_factory=dict)
    target: Mapping[str, float] | None = None
    assign: str = "parity"
    scale: float | Sequence[float] = field(default=4.0, kw_only=True)
    threshold: float | Sequence[float] = field(default=0.95, kw_only=True)
    momentum_scale: float = field(default=0.3, kw_only=True)
    momentum_beta: float = field(default=0.6, kw_only=True)

    def __post_init__(self):
        self.choices = dict(self.choices)
        if len(self.choices) < 2:
            raise ValueError(f"Fair Diffusion needs at least two groups to choose from; got {list(self.choices)}")
        for k, v in self.choices.items():
            if not isinstance(k, str) or not k.strip() or "|" in k:
                raise ValueError(f"group labels must be non-empty strings without '|' (it joins intersections); "
                                 f"got {k!r}")
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"group {k!r}: its editing prompt must be a non-empty string; got {v!r}")
        prompts = list(self.choices.values())
        dup = sorted({p for p in prompts if prompts.count(p) > 1})
        if dup:
            raise ValueError(f"groups share the editing prompts {dup}; each group needs its own")
        self.labels = list(self.choices)
        if self.assign not in ("parity", "random"):
            raise ValueError(f"assign must be 'parity' or 'random'; got {self.assign!r}")
        if self.target is None:
            self.probs = [1.0 / len(self.labels)] * len(self.labels)
        else:
            unknown = set(self.target) - set(self.labels)
            if unknown:
                raise ValueError(f"target names groups {sorted(unknown)} not among the choices {self.labels}")
            p = [float(self.target.get(k, 0.0)) for k in self.labels]
            if any(not (math.isfinite(x) and x >= 0) for x in p) or abs(sum(p) - 1.0) > 1e-6:
                raise ValueError(f"target probabilities must be >= 0 and sum to 1 (groups left out get 0); got "
                                 f"{dict(self.target)} over the groups {self.labels}")
            self.probs = p
            if self.assign == "parity" and max(self.probs) - min(self.probs) > 1e-12:
                raise ValueError("assign='parity' cycles through the groups by seed, which gives a uniform target; "
                                 "use assign='random' for the target " + str(dict(self.target)))
        self._check(len(self.labels), per_concept=False)

    @classmethod
    def preset(cls, name: str, **kwargs) -> "FairDiffusion":
        """BiasMap's Fair Diffusion settings: "gender" or "race"."""
        if name not in _PRESETS:
            raise ValueError(f"no Fair Diffusion preset {name!r}; presets: {sorted(_PRESETS)} "
                             "(or give choices={label: editing prompt})")
        return cls(choices=_PRESETS[name], **kwargs)

    @property
    def n_concepts(self) -> int:
        return len(self.labels)

    def label_for(self, seed: int) -> str:
        if self.assign == "parity":
            return self.labels[int(seed) % len(self.labels)]
        return self.labels[_draw(seed, 0, self.probs)]

    def plan(self, seed: int) -> tuple[list[str], list[bool], str]:
        t = self.label_for(seed)
        others = [k for k in self.labels if k != t]
        return ([self.choices[k] for k in others] + [self.choices[t]], [True] * len(others) + [False], t)

    def describe(self) -> dict:
        return dict(method="fair-diffusion", choices=self.choices, target=dict(zip(self.labels, self.probs)),
                    assign=self.assign, **self._settings())


class JointFairDiffusion:
    """Fair Diffusion over several attributes at once, for intersections (e.g. gender x race): per image one
    group of every part, each part's editing prompts applied as that part alone would (others reversed, the
    target forward), the parts' concepts side by side in one SEGA step. The groups are assigned jointly, so
    that the intersections are covered: "parity" (every part parity) cycles through the joint groups by seed
    in an order that keeps every part's groups balanced at every count of seeds (2 x 2: f|B, m|W, f|W, m|B),
    uniform over the intersections every full cycle; "random" (every part random) draws each part's group
    from its own target (part 0 exactly as a FairDiffusion of its own, the others from streams of their own:
    independent attributes). Labels are joined with "|" in part order ("female|White"), as the
    audit names intersections. The parts must share momentum settings (one momentum per image).
    """

    def __init__(self, *parts: FairDiffusion):
        if len(parts) < 2 or not all(isinstance(p, FairDiffusion) for p in parts):
            raise ValueError("JointFairDiffusion takes two or more FairDiffusion parts (one per attribute)")
        modes = {p.assign for p in parts}
        if len(modes) > 1:
            raise ValueError(f"the parts assign their groups differently ({sorted(modes)}); give every part the "
                             "same assign ('parity': uniform over the intersections, 'random': independent draws)")
        if len({(p.momentum_scale, p.momentum_beta) for p in parts}) > 1:
            raise ValueError("the parts must share momentum_scale and momentum_beta (one momentum per image)")
        prompts = [q for p in parts for q in p.choices.values()]
        dup = sorted({q for q in prompts if prompts.count(q) > 1})
        if dup:
            raise ValueError(f"parts share the editing prompts {dup}; each group needs its own")
        labels = [lab for p in parts for lab in p.labels]
        dup = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dup:
            raise ValueError(f"parts share the group labels {dup}; give every attribute's groups their own names")
        self.parts, self.assign = list(parts), modes.pop()
        self.momentum_scale, self.momentum_beta = parts[0].momentum_scale, parts[0].momentum_beta
        for name in ("scales", "warmups", "cooldowns", "thresholds", "concept_weights"):
            setattr(self, name, [v for p in parts for v in getattr(p, name)])
        self._order = _balanced_order([len(p.labels) for p in parts]) if self.assign == "parity" else None

    @property
    def n_concepts(self) -> int:
        return sum(p.n_concepts for p in self.parts)

    def labels_for(self, seed: int) -> list[str]:
        if self.assign == "parity":
            combo = self._order[int(seed) % len(self._order)]
            return [p.labels[i] for p, i in zip(self.parts, combo)]
        # part 0 draws as a FairDiffusion of its own would (a joint run and a single-attribute run steer the
        # same seed to the same group of it); every further part from a stream of its own
        return [p.labels[_draw(seed, j, p.probs)] for j, p in enumerate(self.parts)]

    def label_for(self, seed: int) -> str:
        return "|".join(self.labels_for(seed))

    def plan(self, seed: int) -> tuple[list[str], list[bool], str]:
        prompts, rev = [], []
        for p, t in zip(self.parts, self.labels_for(seed)):
            others = [k for k in p.labels if k != t]
            prompts += [p.choices[k] for k in others] + [p.choices[t]]
            rev += [True] * len(others) + [False]
        return prompts, rev, self.label_for(seed)

    def describe(self) -> dict:
        return dict(method="fair-diffusion", joint=True, assign=self.assign, parts=[p.describe() for p in self.parts])


def _draw(seed: int, stream: int, probs) -> int:
    rng = np.random.default_rng([int(seed), 0x5E6A] + ([stream] if stream else []))
    return int(rng.choice(len(probs), p=probs))


def _balanced_order(sizes: list[int]) -> list[tuple[int, ...]]:
    """Every combination of one group per part, in an order where every part's groups stay as balanced as
    possible over any first s seeds (greedy: next the unused combination whose groups were used least, then
    the lowest): for 2 x 2, (0, 0), (1, 1), (0, 1), (1, 0); for 2 x 3 both parts cycle evenly."""
    left = list(itertools.product(*(range(k) for k in sizes)))
    counts = [[0] * k for k in sizes]
    out = []
    while left:
        best = min(left, key=lambda c: (sum(counts[j][i] for j, i in enumerate(c)), c))
        left.remove(best)
        out.append(best)
        for j, i in enumerate(best):
            counts[j][i] += 1
    return out


def sega_update(uncond: torch.Tensor, edits: torch.Tensor, signs: torch.Tensor, step: int, params: _EditParams,
                momentum: torch.Tensor | None):
    """One step of SEGA. ``uncond`` (N, ...) the unconditional noise estimate, ``edits`` (E, N, ...) the
    editing concepts', ``signs`` (E, N) +1 / -1 (reverse). Returns (what to add to the CFG noise
    estimate, the new momentum, whether every concept is past its warm-up). Computed in float32 at
    least (``torch.quantile``'s dtypes)."""
    dt = torch.promote_types(uncond.dtype, torch.float32)
    u, e = uncond.to(dt), edits.to(dt)
    E, N = e.shape[:2]
    if momentum is None:
        momentum = torch.zeros_like(u)
    guides = torch.zeros_like(e)
    w = torch.zeros(E, dtype=dt, device=u.device)
    warm = []
    for c in range(E):
        if step >= params.warmups[c]:
            warm.append(c)
        cd = params.cooldowns[c]
        if cd is not None and step >= cd:
            continue
        g = (e[c] - u) * signs[c].to(device=u.device, dtype=dt).view(N, *[1] * (u.dim() - 1)) * params.scales[c]
        a = g.abs().flatten(2)  # per image and channel, over the spatial positions
        q = torch.quantile(a, params.thresholds[c], dim=2)
        guides[c] = torch.where(g.abs() >= q.view(*q.shape, *[1] * (g.dim() - 2)), g, torch.zeros_like(g))
        w[c] = params.concept_weights[c]
    delta = torch.zeros_like(u)
    if 0 < len(warm) < E:
        ww = w[warm]
        ww = torch.nan_to_num(ww / ww.sum())  # all warm concepts cooled down: nothing (diffusers: 0 / 0)
        delta = delta + torch.einsum("c,c...->...", ww, guides[warm])
    sega = torch.einsum("c,c...->...", w, guides) + params.momentum_scale * momentum
    momentum = params.momentum_beta * momentum + (1 - params.momentum_beta) * sega
    all_warm = len(warm) == E
    if all_warm:
        delta = delta + sega
    return delta, momentum, all_warm


def _take_rows(obj, idx: torch.Tensor, batch: int):
    """``obj`` with every tensor whose leading dimension is ``batch`` indexed by ``idx`` along it."""
    return _map_rows(obj, lambda t: t.index_select(0, idx.to(t.device)), batch)


def check_edit_guidance(pipe, spec, guidance_scale: float, seeds, steps: int | None = None) -> list[str]:
    """Raise unless ``spec`` can run on ``pipe`` (for ``steps`` inference steps: an edit whose warm-up
    outlasts the sampling loop would never apply); returns every editing prompt the seeds use."""
    import copy

    from . import concepts

    if not hasattr(spec, "plan"):
        raise TypeError(f"edit_guidance takes a fastfair.SemanticGuidance or fastfair.FairDiffusion; got "
                        f"{type(spec).__name__}")
    from .processors import denoiser, is_flux

    net = denoiser(pipe)
    if net is None or is_flux(net):
        raise ValueError(f"semantic guidance / Fair Diffusion needs a pipeline with classifier-free guidance (SD 1.x/2.x, "
                         f"SDXL, SD3); {type(pipe).__name__} has none (FLUX.1 is guidance-distilled)")
    if not guidance_scale > 1:
        raise ValueError(f"semantic guidance / Fair Diffusion edits ride on classifier-free guidance; "
                         f"guidance_scale is {guidance_scale}: use a value > 1")
    if steps is not None:
        sched = copy.deepcopy(pipe.scheduler)
        try:
            sched.set_timesteps(steps)
            n_calls = len(sched.timesteps)
        except Exception:  # a scheduler that needs more arguments: the loop is at least `steps` long
            n_calls = steps
        if min(spec.warmups) >= n_calls:
            raise ValueError(f"the edit would never apply: its warm-up ({min(spec.warmups)} steps) is not shorter "
                             f"than the sampling loop ({n_calls} scheduler steps for {steps} inference steps); "
                             "lower the warm-up (--sega-warmup) or raise the steps")
    texts: list[str] = []
    for s in seeds:
        for t in spec.plan(s)[0]:
            if t not in texts:
                concepts.check_prompt(pipe, t)
                texts.append(t)
    return texts


def _cat_rows(main, extra, batch: int):
    """``main`` with every tensor whose leading dimension is ``batch`` followed by the same place's rows of
    ``extra`` (a structure of the same shape); everything else from ``main``."""
    if torch.is_tensor(main):
        return torch.cat([main, extra.to(main.dtype)]) if main.dim() > 0 and main.shape[0] == batch else main
    if isinstance(main, dict):
        return {k: (_cat_rows(v, extra[k], batch) if k in extra else v) for k, v in main.items()}
    if isinstance(main, (list, tuple)):
        return type(main)(_cat_rows(a, b, batch) for a, b in zip(main, extra))
    return main


def encode_edits(pipe, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings (and SDXL's pooled embeddings) of editing prompts, as the pipeline encodes a prompt."""
    kw = dict(prompt=list(texts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    import inspect

    if "prompt_3" in inspect.signature(pipe.encode_prompt).parameters:
        kw.update(prompt_2=None, prompt_3=None)  # SD3: the same text for its three encoders, as its pipeline does
    out = pipe.encode_prompt(**kw)
    if len(out) == 4:  # SDXL / SD3: (embeds, negative, pooled, negative pooled)
        return out[0], out[2]
    return out[0], None


class EditGuider(StepHooks):
    """Installed on a pipeline for one batch of ``generate``: adds SEGA's edit rows to every UNet call and
    its guidance to every scheduler step. ``raw_forward``: the UNet forward the edit rows go through
    (the plain one, not an entanglement guider's)."""

    def __init__(self, pipe, spec, embeds: torch.Tensor, pooled: torch.Tensor | None, signs: torch.Tensor,
                 n_items: int, raw_forward):
        from .processors import denoiser

        self.pipe, self.spec, self.n = pipe, spec, n_items
        self.embeds, self.pooled, self.signs = embeds, pooled, signs  # (E*N, L, D) concept-major, (E*N, P), (E, N)
        self.E = signs.shape[0]
        self.net = denoiser(pipe)
        self._by_keyword = getattr(pipe, "unet", None) is None  # SD3's transformer: hidden_states=, timestep=
        self.raw = raw_forward
        self.step_idx = 0
        self.momentum = None
        self._pending = None
        self.records: list[dict] = []

    def _unet_forward(self, *args, **kwargs):
        if self._by_keyword:
            sample, timestep, rest = kwargs["hidden_states"], kwargs["timestep"], args
        else:
            sample, timestep, rest = args[0], args[1], args[2:]
        n, batch = self.n, sample.shape[0]
        if batch != 2 * n:
            raise RuntimeError(f"semantic guidance needs classifier-free guidance (a UNet call of {2 * n} rows "
                               f"for {n} images); got {batch}. Use guidance_scale > 1")
        if self._pending is not None:
            raise RuntimeError("two UNet calls before one scheduler step: semantic guidance needs a scheduler "
                               "that steps once per UNet call")
        idx = torch.arange(n, 2 * n).repeat(self.E)  # the conditional rows, once per concept
        t_e = _take_rows(timestep, idx, batch)
        rest_e = _take_rows(rest, idx, batch)
        kw = _take_rows(dict(kwargs, return_dict=False), idx, batch)
        kw.pop("hidden_states", None)
        kw.pop("timestep", None)
        if "encoder_hidden_states" in kw:
            kw["encoder_hidden_states"] = self.embeds.to(sample.dtype)
        else:
            rest_e = (self.embeds.to(sample.dtype),) + tuple(rest_e[1:])
        if self.pooled is not None and "pooled_projections" in kw:  # SD3
            kw["pooled_projections"] = self.pooled.to(kw["pooled_projections"].dtype)
        elif self.pooled is not None:
            added = dict(kw.get("added_cond_kwargs") or {})
            if "text_embeds" not in added:
                raise RuntimeError("SDXL UNet call without pooled text embeddings (added_cond_kwargs['text_embeds'])")
            added["text_embeds"] = self.pooled.to(added["text_embeds"].dtype)
            kw["added_cond_kwargs"] = added
        x = sample.index_select(0, idx.to(sample.device))
        from .guidance import _as_output, _recording

        state = getattr(self.pipe, "_fastfair", None)
        if self._inner == self.raw and (state is None or state.recorder is None):
            # nothing records maps and no guider splits the call: the edit rows ride on the pipeline's own
            # call, one (2 + E) N-row UNet pass per step as diffusers' semantic pipeline makes
            main_kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "timestep")}
            main_kw["return_dict"] = False
            both = self._call(torch.cat([sample, x]), _cat_rows(timestep, t_e, batch),
                              _cat_rows(tuple(rest), tuple(rest_e), batch), _cat_rows(main_kw, kw, batch))
            o, e = both[:batch], both[batch:]
            out = _as_output(o, self._by_keyword, kwargs.get("return_dict", True))
        else:
            out = self._inner(*args, **kwargs)
            with torch.no_grad():
                if state is not None:
                    with _recording(state, None):  # no maps of the editing prompts
                        e = self._call(x, t_e, rest_e, kw)
                else:
                    e = self._call(x, t_e, rest_e, kw)
            o = out[0] if isinstance(out, tuple) else out.sample
        self._pending = (o[:n].detach(), e.view(self.E, n, *e.shape[1:]))
        return out

    def _call(self, x, t, rest, kw):
        """The plain denoiser on ``x`` (its first output)."""
        with torch.no_grad():
            if self._by_keyword:
                return self.raw(*rest, hidden_states=x, timestep=t, **kw)[0]
            return self.raw(x, t, *rest, **kw)[0]

    def _step(self, orig_step, model_output, timestep, sample, *args, **kwargs):
        if self._pending is None:
            raise RuntimeError("scheduler step without a UNet call before it")
        uncond, edits = self._pending
        self._pending = None
        i = self.step_idx
        self.step_idx += 1
        delta, self.momentum, applied = sega_update(uncond, edits, self.signs, i, self.spec, self.momentum)
        model_output = model_output + delta.to(model_output.dtype)
        self.records.append(dict(step=i, norm=delta.flatten(1).norm(dim=1).float().cpu(), all_warm=applied))
        return orig_step(model_output, timestep, sample, *args, **kwargs)

    def __enter__(self):
        self._inner = self._install(self.pipe.scheduler, self.net, self._step, self._unet_forward)
        return self

    def __exit__(self, *exc):
        self._pending = None
        self._uninstall(self.pipe.scheduler, self.net)
        return False

    def diagnostics(self) -> dict:
        """``edit_norm`` (steps, N): the norm of what SEGA added to each image's noise estimate."""
        if not self.records:
            return {}
        return dict(edit_step=torch.tensor([r["step"] for r in self.records]),
                    edit_norm=torch.stack([r["norm"] for r in self.records]))
