"""MIST: closed-form, disentangled cross-attention editing for single and intersectional attributes.

MIST (Yesiltepe et al., 2024, "Mitigating Intersectional Bias with Disentangled Cross-Attention
Editing in Text-to-Image Diffusion Models") debiases a model without retraining and without
reference images. For every cross-attention layer (down, mid and up blocks) it edits the value
projection ``to_v`` (and the key projection ``to_k`` when ``with_to_k``) in closed form,

    W <- (lam W + eta_e sum_c v*_c k_c^T + eta_p sum_p W k_p k_p^T) (lam I + eta_e sum_c k_c k_c^T + eta_p sum_p k_p k_p^T)^-1,

the minimiser of ``lam ||W' - W||^2 + eta_e sum_c ||W' k_c - v*_c||^2 + eta_p sum_p ||W' k_p - W k_p||^2``.

* ``k_c`` is the end-of-sentence (EOS) token's text embedding of concept prompt ``c`` ("a doctor"):
  the position right after the last word token, taken from ``pipe.encode_prompt`` so it is exactly
  what the UNet sees (for SDXL: both encoders' penultimate states, concatenated).
* ``k_p`` runs over every token embedding (all 77 positions, padding included) of the preserve
  prompts; the default preserve set is the empty prompt. A concept that reaches its target joins it.
* The target moves the concept's output towards attribute directions:
  ``v*_c = W k_c + sum_j w_cj ||W k_c|| u_cj``, ``u_cj = W k_cj / ||W k_cj||``, with ``k_cj`` the
  EOS embedding of the attribute phrase joined to the concept ("a woman doctor") and
  ``w_cj = step (t_j - p_cj)``: ``t`` the target distribution (uniform, or any, e.g. 75/25), ``p``
  the attribute distribution a classifier measures on images of "a headshot of a {concept}".
  Rounds repeat (each on the weights the last one left) until ``max_j |p_cj - t_j| < tol`` for
  every concept, or ``max_rounds``.

The solve runs in float64 through a Cholesky factorisation (``torch.linalg.solve`` as fallback),
never an explicit inverse. Every cross-attention layer of a UNet reads the same encoder states, so
the normal matrix ``A`` is shared: all to_k/to_v weights of all layers are stacked row-wise and
solved in one call (``closed_form`` also takes batched, per-layer systems).

Classifiers (``resolve_classifier``): the simple protocol is a callable
``classifier(images: list[PIL.Image]) -> torch.Tensor (N, K)`` of probabilities over the joint
classes, with an attribute ``labels`` (the K class names, "female|Black" for intersections, in the
order of ``attributes``; any order is matched by name). ``fastfair.classify``'s classifiers
(``labels`` {set: labels}, ``predict`` -> {set: (N, C)}), its specs ("clip", "python:FILE.py:FUNC")
and per-set callables are accepted too; per-set probabilities are multiplied into the joint
distribution. Rows of NaN are abstentions and are left out.

The result is a ``MistEdit``: the to_k/to_v deltas only, ``save``/``load`` as safetensors with JSON
metadata (model id and fingerprint, concepts, attributes, target, measured distribution per
round), ``apply(pipe)`` / ``revert(pipe)`` (revert copies the kept original weights back: bit-exact).
Differences from the reference code (yesiltepe-hidir/mist): any target distribution, not only
uniform; ``v*`` uses ``||W k_c||`` of the unedited output (the reference accumulates in place);
fixed seeds per round by default (deterministic feedback; ``reseed=True`` draws new ones).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import concepts as _concepts
from ._io import atomic_write

FORMAT = "fastfair.mist/1"
PROJECTIONS = ("to_v", "to_k")
_PROBES = 3
_PROBE_RTOL = 2e-2  # probe values may move by fp16/bf16 rounding; another model moves them by ~100%


class MistError(ValueError):
    """Bad MIST input (targets, concepts, attributes, classifier output) or an edit that does not fit."""


# --------------------------------------------------------------------------------------------
# Attribute sets
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttributeSet:
    """Ordered classes of one attribute. ``phrases`` are joined to the concept ("a woman doctor");
    ``prompts`` are the zero-shot CLIP prompts per class (``fastfair.classify.load_classifier("clip")``);
    ``order`` places the phrase in an intersection: age (0), race (1), others (1), gender (2)."""

    name: str
    labels: tuple[str, ...]
    phrases: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...] = ()
    order: int = 1

    def __post_init__(self):
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise MistError(f"attribute set {self.name!r} needs at least two distinct labels, got {self.labels}")
        if len(self.phrases) != len(self.labels) or not all(isinstance(p, str) and p.strip() for p in self.phrases):
            raise MistError(f"attribute set {self.name!r}: one non-empty phrase per label")
        if not self.prompts:
            object.__setattr__(self, "prompts", tuple((f"a photo of a {p} person",) for p in self.phrases))


# MIST's phrase per class where it differs from the audit's in-prompt word ("a woman doctor").
PHRASES = {"gender": ("man", "woman")}
_ORDER = {"age": 0, "race": 1, "fairface4": 1, "fairface7": 1, "gender": 2}


def builtin_attributes() -> dict[str, AttributeSet]:
    """The audit's attribute sets (``fastfair.audit.attributes``: same labels and CLIP prompts, so
    the audit's classifiers fit), with MIST phrases: gender, race, fairface4, fairface7, age."""
    from .audit.attributes import ATTRIBUTE_SETS

    return {n: AttributeSet(n, tuple(s.labels), tuple(PHRASES.get(n, s.words)), tuple(map(tuple, s.prompts)),
                            _ORDER.get(n, 1)) for n, s in ATTRIBUTE_SETS.items()}


def _custom_set(name: str, s) -> AttributeSet:
    if isinstance(s, AttributeSet):
        return s
    if hasattr(s, "labels") and hasattr(s, "words"):  # an audit AttributeSet
        return AttributeSet(name, tuple(s.labels), tuple(s.words), tuple(map(tuple, s.prompts)), _ORDER.get(name, 1))
    if isinstance(s, Mapping) and "labels" in s:      # the audit's dict form
        labels = tuple(s["labels"])
        phrases = tuple(s.get("phrases", s.get("words", labels)))
        prompts = tuple(tuple(p) if isinstance(p, (list, tuple)) else (p,) for p in s.get("prompts", ()))
        return AttributeSet(name, labels, phrases, prompts, int(s.get("order", 1)))
    if isinstance(s, Mapping):                        # {label: phrase}
        return AttributeSet(name, tuple(s), tuple(s.values()))
    return AttributeSet(name, tuple(s), tuple(s))     # [phrase, ...]: labels = phrases


def parse_attributes(spec, custom: Mapping | None = None) -> list[AttributeSet]:
    """``"gender,race"`` (or ``"gender*race"``, a list, AttributeSets) -> the attribute sets whose
    product is the joint class set. ``custom``: ``{name: {label: phrase}}``, ``{name: [phrase, ...]}``
    or the audit's ``{name: dict(labels=..., words=..., prompts=...)}``."""
    table = builtin_attributes()
    for name, s in (custom or {}).items():
        table[name] = _custom_set(name, s)
    if isinstance(spec, AttributeSet):
        spec = [spec]
    items = re.split(r"[,*×]", spec) if isinstance(spec, str) else list(spec or [])
    out: list[AttributeSet] = []
    for it in items:
        if isinstance(it, AttributeSet):
            out.append(it)
            continue
        it = str(it).strip()
        if not it:
            continue
        if it not in table:
            raise MistError(f"unknown attribute set {it!r}; built-in sets are {', '.join(builtin_attributes())}"
                            + (f", custom: {', '.join(custom)}" if custom else ""))
        out.append(table[it])
    if not out:
        raise MistError(f"no attributes given; choose from {', '.join(table)} (intersections: gender,race)")
    if len({s.name for s in out}) != len(out):
        raise MistError(f"attribute set repeated in {[s.name for s in out]}")
    return out


def joint_classes(sets: Sequence[AttributeSet]) -> tuple[list[str], list[str]]:
    """Joint class labels ("female|Black", product in the order of ``sets``) and their phrases
    (words ordered age, race, gender: "Black woman")."""
    labels, phrases = [], []
    for combo in itertools.product(*[range(len(s.labels)) for s in sets]):
        labels.append("|".join(s.labels[i] for s, i in zip(sets, combo)))
        parts = sorted(((s.order, k, s.phrases[i]) for k, (s, i) in enumerate(zip(sets, combo))))
        phrases.append(" ".join(p for _, _, p in parts))
    return labels, phrases


def _as_dist(x, n: int, what: str) -> torch.Tensor:
    if isinstance(x, str):
        if x.strip().lower() == "uniform":
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        try:
            x = [float(v) for v in x.replace("/", ",").split(",") if v.strip()]
        except ValueError:
            raise MistError(f"{what}: cannot read {x!r}; give 'uniform' or comma-separated probabilities") from None
    t = torch.as_tensor(x, dtype=torch.float64).flatten()
    if t.numel() != n:
        raise MistError(f"{what} has {t.numel()} values but there are {n} classes; give one probability per class")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise MistError(f"{what} must be finite and non-negative, got {t.tolist()}")
    if abs(float(t.sum()) - 1.0) > 1e-6:
        raise MistError(f"{what} must sum to 1, got {t.tolist()} (sum {float(t.sum()):.6g})")
    return t


def parse_target(spec, sets: Sequence[AttributeSet]) -> torch.Tensor:
    """Target distribution over the joint classes (float64, sums to 1).

    ``"uniform"``/None; joint probabilities ("0.75,0.25" or a list, in ``joint_classes`` order); or
    marginals multiplied: ``{"gender": [0.75, 0.25], "race": "uniform"}`` or
    ``"gender=0.75,0.25;race=uniform"`` (or space-separated, as ``fastfair audit --target``; sets not
    named are uniform).
    """
    K = math.prod(len(s.labels) for s in sets)
    if spec is None:
        spec = "uniform"
    if isinstance(spec, str) and "=" in spec:
        parts = {}
        for part in re.split(r"[;\s]+", spec.strip()):
            if not part.strip():
                continue
            if "=" not in part:
                raise MistError(f"target {spec!r}: write marginals as set=p1,p2;set2=uniform")
            k, v = part.split("=", 1)
            parts[k.strip()] = v
        spec = parts
    if isinstance(spec, Mapping):
        names = [s.name for s in sets]
        unknown = set(spec) - set(names)
        if unknown:
            raise MistError(f"target names sets {sorted(unknown)} that are not among the attributes {names}")
        t = torch.ones((), dtype=torch.float64)
        for s in sets:
            m = _as_dist(spec.get(s.name, "uniform"), len(s.labels), f"target for {s.name!r}")
            t = (t[..., None] * m).reshape(-1)
        return t.reshape(-1)
    return _as_dist(spec, K, "target")


# --------------------------------------------------------------------------------------------
# The closed form
# --------------------------------------------------------------------------------------------

def normal_matrix(K_e: torch.Tensor, K_p: torch.Tensor | None, lam: float, eta_e: float, eta_p: float) -> torch.Tensor:
    """``lam I + eta_e K_e^T K_e + eta_p K_p^T K_p`` for keys as rows (..., n, d); float64."""
    K_e = K_e.double()
    d = K_e.shape[-1]
    A = eta_e * (K_e.mT @ K_e)
    if K_p is not None and K_p.shape[-2] and eta_p:
        K_p = K_p.double()
        A = A + eta_p * (K_p.mT @ K_p)
    return A + lam * torch.eye(d, dtype=torch.float64, device=A.device)


def _spd_solve(A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """Solve ``A X = Bt`` for symmetric positive definite ``A`` (Cholesky; LU if that fails)."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info.max()) == 0:
        return torch.cholesky_solve(Bt, L)
    return torch.linalg.solve(A, Bt)


def closed_form(W: torch.Tensor, K_e: torch.Tensor, V_e: torch.Tensor, K_p: torch.Tensor | None = None, *,
                lam: float = 0.5, eta_e: float = 1.0, eta_p: float = 0.2) -> torch.Tensor:
    """The MIST/UCE closed form, in float64, batched over leading dimensions.

    ``W`` (..., out, d) weights; ``K_e`` (..., C, d) edit keys with targets ``V_e`` (..., C, out);
    ``K_p`` (..., P, d) preserve keys (their outputs ``W k_p`` are kept). Leading dimensions
    broadcast, so one normal matrix can serve a stack of layers. Returns the minimiser ``W'`` of
    ``lam ||W' - W||^2 + eta_e sum ||W' k_c - v_c||^2 + eta_p sum ||W' k_p - W k_p||^2``:
    ``W' = B A^-1`` with ``B = lam W + eta_e V_e^T K_e + eta_p W K_p^T K_p``, ``A`` as in
    ``normal_matrix``, solved as ``A W'^T = B^T`` (A is symmetric), never by inverting ``A``.
    """
    _check_weights(lam, eta_e, eta_p)
    W, K_e, V_e = W.double(), K_e.double(), V_e.double()
    Bt = lam * W.mT + eta_e * (K_e.mT @ V_e)                       # (..., d, out)
    if K_p is not None and K_p.shape[-2] and eta_p:
        K_p = K_p.double()
        Bt = Bt + eta_p * (K_p.mT @ (K_p @ W.mT))
    A = normal_matrix(K_e, K_p, lam, eta_e, eta_p)
    return _spd_solve(A, Bt).mT


# --------------------------------------------------------------------------------------------
# Pipelines: layers, text keys
# --------------------------------------------------------------------------------------------

def edit_layers(pipe) -> dict:
    """name -> cross-attention module (attn2) of every down, mid and up block of ``pipe.unet``."""
    from .processors import cross_attention_modules

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise MistError(f"{type(pipe).__name__} has no UNet; MIST edits UNet cross-attention")
    mods = {n: m for n, m in cross_attention_modules(unet).items()
            if n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks")}
    if not mods:
        raise MistError(f"{type(unet).__name__} has no cross-attention layer to edit")
    for n, m in mods.items():
        if getattr(m, "norm_cross", None) is not None:
            raise MistError(f"{n} normalises the encoder states before to_k/to_v (norm_cross); "
                            "MIST's shared keys do not apply to it")
    return mods


def _projections(mods: dict, with_to_k: bool) -> list[tuple[str, torch.nn.Linear]]:
    names = ("to_v", "to_k") if with_to_k else ("to_v",)
    return [(f"{n}.{p}", getattr(m, p)) for n, m in mods.items() for p in names]


def check_prompts(pipe, prompts: Sequence[str], allow_empty: bool = False) -> None:
    """Raise ``ConceptError`` (a ValueError) for a prompt the text encoder would truncate."""
    toks = _concepts.pipeline_tokenizers(pipe)
    for p in prompts:
        if allow_empty and isinstance(p, str) and not p.strip():
            continue
        for t in toks:
            _concepts.prompt_tokens(t, p)


@torch.no_grad()
def encode(pipe, prompts: Sequence[str], *, check: bool = True) -> torch.Tensor:
    """Encoder states (B, 77, C) exactly as the UNet's cross-attention receives them
    (``pipe.encode_prompt``; for SDXL both encoders' penultimate states, concatenated)."""
    prompts = list(prompts)
    if check:
        check_prompts(pipe, prompts)
    device = pipe.device
    if getattr(pipe, "text_encoder_2", None) is not None:
        emb = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0]
    else:
        emb = pipe.encode_prompt(prompts, device, 1, False)[0]
    return emb.detach()


def eos_positions(pipe, prompts: Sequence[str]) -> list[int]:
    """Key position of each prompt's EOS token (the same through every tokenizer of the pipeline)."""
    toks = _concepts.pipeline_tokenizers(pipe)
    out = []
    for p in prompts:
        pos = {_concepts.eos_position(t, p) for t in toks}
        if len(pos) != 1:
            raise MistError(f"the pipeline's tokenizers disagree on the EOS position of {p!r}: {sorted(pos)}")
        out.append(pos.pop())
    return out


@torch.no_grad()
def eos_keys(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """(B, C) EOS-token encoder states of ``prompts`` (float64); refuses prompts over the limit."""
    prompts = list(prompts)
    pos = eos_positions(pipe, prompts)  # tokenizes (and length-checks) every prompt once
    emb = encode(pipe, prompts, check=False)
    return emb[torch.arange(len(prompts), device=emb.device), torch.tensor(pos, device=emb.device)].double()


@torch.no_grad()
def preserve_keys(pipe, prompts: Sequence[str]) -> torch.Tensor | None:
    """(77 * P, C) every token's encoder state of the preserve prompts (padding included: the UNet
    attends to all of them); the empty prompt is allowed. None for no prompts."""
    prompts = list(prompts)
    if not prompts:
        return None
    check_prompts(pipe, prompts, allow_empty=True)
    emb = encode(pipe, prompts, check=False)
    return emb.reshape(-1, emb.shape[-1]).double()


_VOWEL = re.compile(r"\b([Aa]) (?=(?!eu|uni|use|one)[aeiouAEIOU])")


def _articles(text: str) -> str:
    """'a engineer' -> 'an engineer', 'a old doctor' -> 'an old doctor' (templates write 'a')."""
    return _VOWEL.sub(lambda m: m.group(1) + "n ", text)


def fill(template: str, concept: str, phrase: str | None = None) -> str:
    if "{concept}" not in template:
        raise MistError(f"template {template!r} has no {{concept}} placeholder")
    return _articles(template.replace("{concept}", f"{phrase} {concept}" if phrase else concept))


# --------------------------------------------------------------------------------------------
# Fingerprints and the edit object
# --------------------------------------------------------------------------------------------

def _probe_vectors(n: int, k: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + n)
    return torch.randn(n, k, generator=g, dtype=torch.float64).to(device)


def _probes(W: torch.Tensor) -> list[float]:
    """Random bilinear probes r_out^T W r_in and the Frobenius norm: dtype-robust model identity."""
    W = W.detach().double()
    a, b = _probe_vectors(W.shape[0], _PROBES, W.device), _probe_vectors(W.shape[1], _PROBES, W.device)
    vals = ((a.mT @ W) * b.mT).sum(-1)
    return [float(W.norm())] + [float(v) for v in vals]


def fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 bytes of the given weights (exact identity)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name].detach().float().contiguous().cpu()
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


class _Applied:
    """Kept on an edited pipeline as ``pipe._fastfair_mist``: the original weights (restored by copy)."""

    def __init__(self, originals: dict[str, torch.Tensor], edit: "MistEdit | None"):
        self.originals = originals
        self.edit = edit


def _modules_by_name(pipe, names: Sequence[str]) -> dict[str, torch.nn.Linear]:
    mods = dict(pipe.unet.named_modules())
    out = {}
    for n in names:
        if n not in mods or not isinstance(mods[n], torch.nn.Linear):
            raise MistError(f"this pipeline has no projection {n!r} (another architecture)")
        out[n] = mods[n]
    return out


def is_edited(pipe) -> bool:
    return getattr(pipe, "_fastfair_mist", None) is not None


def revert(pipe) -> None:
    """Restore the weights an applied MIST edit replaced (bit-exact copies). No-op if none is applied."""
    state = getattr(pipe, "_fastfair_mist", None)
    if state is None:
        return
    mods = _modules_by_name(pipe, list(state.originals))
    with torch.no_grad():
        for n, w in state.originals.items():
            mods[n].weight.copy_(w)
    pipe._fastfair_mist = None


def _original_weights(pipe, names: Sequence[str]) -> dict[str, torch.Tensor]:
    state = getattr(pipe, "_fastfair_mist", None)
    mods = _modules_by_name(pipe, names)
    if state is not None and all(n in state.originals for n in names):
        return {n: state.originals[n] for n in names}
    return {n: mods[n].weight.detach() for n in names}


@dataclass
class MistEdit:
    """to_k/to_v weight deltas of a MIST edit and its metadata (``meta``, JSON-serialisable)."""

    deltas: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the deltas (float32 safetensors, metadata in the header) and ``<path>.json``."""
        from safetensors.torch import save as st_save

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        bad = [k for k, v in self.deltas.items() if not bool(torch.isfinite(v).all())]
        if bad:  # overflow with extreme lam / eta: writing it would fail later as "non-finite latents"
            raise MistError(f"the solved edit is not finite in {len(bad)} projection(s) (e.g. {bad[0]}): overflow with "
                            "these lam / eta_e / eta_p; nothing written")
        meta_json = json.dumps(self.meta, indent=1, default=str)
        data = st_save({k: v.detach().float().contiguous().cpu() for k, v in self.deltas.items()},
                       metadata={"format": FORMAT, "fastfair_mist": meta_json})
        atomic_write(path, data)
        atomic_write(path.with_suffix(".json"), meta_json.encode())
        return path

    # -- application --------------------------------------------------------------------------
    def check(self, pipe) -> None:
        """Raise ``MistError`` unless the edit was made for this model (layer names, shapes, probes)."""
        model = self.meta.get("model", {})
        names = list(self.deltas)
        try:
            originals = _original_weights(pipe, names)
        except MistError as e:
            raise MistError(f"this edit was made for another model ({model.get('id')!r}): {e}") from None
        for n, w in originals.items():
            if tuple(w.shape) != tuple(self.deltas[n].shape):
                raise MistError(f"this edit was made for another model ({model.get('id')!r}): {n} has shape "
                                f"{tuple(w.shape)} here, {tuple(self.deltas[n].shape)} in the edit")
        probes = model.get("probes", {})
        for n, w in originals.items():
            ref = probes.get(n)
            if ref is None:
                continue
            got = _probes(w)
            scale = max(abs(ref[0]), 1e-12)
            if any(abs(a - b) > _PROBE_RTOL * scale for a, b in zip(got, ref)):
                raise MistError(f"this edit was made for another model ({model.get('id')!r}, fingerprint "
                                f"{str(model.get('fingerprint'))[:12]}): the weights of {n} differ from the ones "
                                f"it was computed on. Refusing to apply it; recompute it for this model")

    def apply(self, pipe, *, check: bool = True):
        """Add the deltas to the pipeline's weights (the originals are kept for ``revert``)."""
        if is_edited(pipe):
            raise MistError("this pipeline already has a MIST edit applied; call revert(pipe) first")
        if check:
            self.check(pipe)
        mods = _modules_by_name(pipe, list(self.deltas))
        originals = {n: m.weight.detach().clone() for n, m in mods.items()}
        try:
            with torch.no_grad():
                for n, m in mods.items():
                    m.weight.copy_(_edited(originals[n], self.deltas[n]))
        except BaseException:
            with torch.no_grad():
                for n, m in mods.items():
                    m.weight.copy_(originals[n])
            raise
        pipe._fastfair_mist = _Applied(originals, self)
        return pipe

    def revert(self, pipe):
        """Restore the original weights bit for bit."""
        state = getattr(pipe, "_fastfair_mist", None)
        if state is not None and state.edit is not None and state.edit is not self:
            raise MistError("a different MIST edit is applied to this pipeline; use fastfair.mist.revert(pipe)")
        revert(pipe)
        return pipe

    # -- analysis -----------------------------------------------------------------------------
    @torch.no_grad()
    def output_change(self, pipe, prompts: Sequence[str]) -> list[dict]:
        """Relative change ``||dW k|| / ||W k||`` of the to_k/to_v outputs for each prompt's tokens
        (BOS through EOS), max over layers: ``to_v_eos`` at the EOS token, ``to_v_max`` the max over
        tokens (same for to_k); ``eos_cos``: the cosine of the prompt's EOS key with the nearest
        edited concept's (what the change follows: dW k = (V* - W K_e) A^-1 K_e^T k)."""
        names = list(self.deltas)
        W0 = _original_weights(pipe, names)
        emb = encode(pipe, prompts).double()
        eos = eos_positions(pipe, prompts)
        kc = eos_keys(pipe, self.meta["concept_prompts"]) if self.meta.get("concept_prompts") else None
        rows = []
        for i, p in enumerate(prompts):
            k = emb[i, :eos[i] + 1]
            rec = {"prompt": p}
            if kc is not None:
                rec["eos_cos"] = float(torch.nn.functional.cosine_similarity(k[-1:], kc.to(k), dim=-1).max())
            for proj in PROJECTIONS:
                sel = [n for n in names if n.endswith("." + proj)]
                if not sel:
                    continue
                rel = torch.stack([(k @ self.deltas[n].to(k).mT).norm(dim=-1)
                                   / (k @ W0[n].to(k).mT).norm(dim=-1).clamp_min(1e-30) for n in sel])  # (L, T)
                rec[f"{proj}_eos"] = float(rel[:, -1].max())
                rec[f"{proj}_max"] = float(rel.max())
            rows.append(rec)
        return rows


def _edited(original: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The one way edited weights are formed (fit and apply agree bit for bit)."""
    return (original.float() + delta.to(original.device, torch.float32)).to(original.dtype)


def _check_weights(lam: float, eta_e: float, eta_p: float) -> None:
    """NaN / inf passed plain comparisons and wrote an all-NaN edit."""
    if not (math.isfinite(lam) and lam > 0 and math.isfinite(eta_e) and eta_e >= 0 and math.isfinite(eta_p)
            and eta_p >= 0):
        raise MistError(f"need finite lam > 0 and eta_e, eta_p >= 0; got lam={lam}, eta_e={eta_e}, eta_p={eta_p}")


def load(path: str | os.PathLike) -> MistEdit:
    """Read an edit written by ``MistEdit.save``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists() and path.suffix != ".safetensors" and path.with_name(path.name + ".safetensors").is_file():
        path = path.with_name(path.name + ".safetensors")  # `edit mist --out o/e9` wrote o/e9.safetensors
    if not path.exists():
        raise MistError(f"no MIST edit at {str(path)!r}")
    if path.is_dir() or path.suffix == ".json":
        raise MistError(f"{str(path)!r} is not an edit file: give the .safetensors file `fastfair edit mist --out` "
                        "wrote")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            deltas = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise MistError(f"{str(path)!r} is not a safetensors file: {e}") from e
    if header.get("format") != FORMAT or "fastfair_mist" not in header:
        raise MistError(f"{str(path)!r} is not a fastfair MIST edit (format {header.get('format')!r}, "
                        f"expected {FORMAT!r})")
    return MistEdit(deltas, json.loads(header["fastfair_mist"]))


def apply_file(pipe, path: str | os.PathLike) -> MistEdit:
    """``load(path).apply(pipe)``; returns the edit (``edit.revert(pipe)`` undoes it)."""
    edit = load(path)
    edit.apply(pipe)
    return edit


# --------------------------------------------------------------------------------------------
# Classifiers and measurement
# --------------------------------------------------------------------------------------------

def _classifier_probs(clf, images, labels: Sequence[str], what: str) -> torch.Tensor:
    p = clf(images)
    p = torch.as_tensor(p).detach().double().cpu()
    if p.ndim != 2 or p.shape[0] != len(images):
        raise MistError(f"{what} returned shape {tuple(p.shape)} for {len(images)} images; expected "
                        f"({len(images)}, {len(labels)}) probabilities")
    if p.shape[1] != len(labels):
        raise MistError(f"{what} gives {p.shape[1]} classes, the attributes have {len(labels)}: {list(labels)}")
    clf_labels = getattr(clf, "labels", None)
    if clf_labels is not None:
        clf_labels = [str(x) for x in clf_labels]
        if clf_labels != list(labels):
            if sorted(clf_labels) == sorted(labels):
                p = p[:, [clf_labels.index(x) for x in labels]]
            else:
                raise MistError(f"{what} labels {clf_labels} do not match the attribute classes {list(labels)}")
    ok = torch.isfinite(p).all(1)
    if (p[ok] < -1e-6).any():
        raise MistError(f"{what} returned negative probabilities")
    return p


def _product(parts: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    p = torch.ones(n, 1, dtype=torch.float64)
    for q in parts:
        q = q / q.sum(1, keepdim=True).clamp_min(1e-30)
        p = (p[:, :, None] * q[:, None, :]).reshape(n, -1)
    return p


def _is_attribute_classifier(obj) -> bool:
    return hasattr(obj, "predict") and isinstance(getattr(obj, "labels", None), Mapping)


def resolve_classifier(classifier, sets: Sequence[AttributeSet], *, device=None, clip_model: str | None = None,
                       face_detector=None):
    """Any supported classifier -> ``f(images) -> (N, K)`` joint probabilities (float64), checked
    against the attribute sets up front. Accepted:

    * a ``fastfair.classify`` spec string: ``"clip"``, ``"clip:MODEL_ID"``, ``"python:FILE.py:FUNC"``;
    * a ``fastfair.classify.AttributeClassifier`` (``labels`` {set: labels}, ``predict`` -> {set: (N, C)})
      or a ``torch.nn.Module`` with such ``labels``: per-set probabilities multiplied into the joint;
    * a callable ``classifier(images) -> (N, K)`` over the joint classes (``labels``: K names, any order);
    * a list or ``{set name: callable}`` of per-set callables.

    ``face_detector`` (a ``fastfair.faces`` detector or spec): the classifier sees each image's largest face
    crop (``fastfair.classify.FaceCrops``), images without a face are abstentions; needs one of the first two.
    """
    labels, _ = joint_classes(sets)
    if isinstance(classifier, str) or isinstance(classifier, torch.nn.Module):
        from . import classify

        if isinstance(classifier, str):
            kw = {"clip_model": clip_model} if clip_model else {}
            classifier = classify.load_classifier(classifier, list(sets), device=device, **kw)
            if classifier is None:
                raise MistError("classifier 'none': MIST's rounds need a classifier (or measured=...)")
        else:
            classifier = classify.as_classifier(classifier)
    if face_detector is not None:
        from .classify import FaceCrops
        from .faces import FaceError, load_detector

        if not _is_attribute_classifier(classifier):
            raise MistError("face crops need a fastfair.classify classifier (a spec such as 'clip', an "
                            "AttributeClassifier or a module with labels), not a joint-class callable")
        try:
            classifier = FaceCrops(classifier, load_detector(face_detector))
        except (FaceError, ValueError) as e:
            raise MistError(str(e)) from None
    if _is_attribute_classifier(classifier):
        from .classify import check_labels

        check_labels(classifier, sets)
        clf = classifier
        cols = {s.name: [list(map(str, clf.labels[s.name])).index(x) for x in s.labels] for s in sets}

        def f(images):
            out = clf.predict(images)
            parts = []
            for s in sets:
                q = torch.as_tensor(out[s.name], dtype=torch.float64)
                if q.shape != (len(images), len(s.labels)):
                    raise MistError(f"the classifier's {s.name!r} output has shape {tuple(q.shape)}, expected "
                                    f"({len(images)}, {len(s.labels)})")
                parts.append(q[:, cols[s.name]])
            return _product(parts, len(images))

        f.describe = clf.describe() if hasattr(clf, "describe") else {"type": type(clf).__name__}
        return f
    if isinstance(classifier, Mapping) or isinstance(classifier, (list, tuple)):
        if isinstance(classifier, Mapping):
            missing = [s.name for s in sets if s.name not in classifier]
            if missing:
                raise MistError(f"no classifier for attribute sets {missing}")
            clfs = [classifier[s.name] for s in sets]
        else:
            clfs = list(classifier)
            if len(clfs) != len(sets):
                raise MistError(f"{len(clfs)} classifiers for {len(sets)} attribute sets")

        def f(images):
            return _product([_classifier_probs(c, images, s.labels, f"the {s.name} classifier")
                             for s, c in zip(sets, clfs)], len(images))

        f.describe = {"type": "per-set", "sets": {s.name: type(c).__name__ for s, c in zip(sets, clfs)}}
        return f
    if callable(classifier):
        def f(images):
            return _classifier_probs(classifier, images, labels, "the classifier")

        f.describe = {"type": getattr(classifier, "__name__", type(classifier).__name__),
                      "labels": list(map(str, getattr(classifier, "labels", labels)))}
        return f
    raise MistError(f"unsupported classifier {type(classifier).__name__}: give a callable images -> (N, K) "
                    "probabilities with .labels, a fastfair.classify classifier or spec ('clip'), or per-set ones")


def joint_probs(classifier, images, sets: Sequence[AttributeSet]) -> torch.Tensor:
    """(N, K) joint class probabilities of ``images`` (see ``resolve_classifier``)."""
    return resolve_classifier(classifier, sets)(images)


def distribution(probs: torch.Tensor, mode: str = "argmax") -> torch.Tensor:
    """Attribute distribution of a set of images: share of argmax classes (MIST, audits) or mean
    probability. Abstentions (rows with NaN) are left out."""
    ok = torch.isfinite(probs).all(1)
    if not ok.any():
        raise MistError("the classifier abstained on every image; cannot measure the attribute distribution")
    p = probs[ok]
    if mode == "argmax":
        return torch.nn.functional.one_hot(p.argmax(1), p.shape[1]).double().mean(0)
    if mode == "mean":
        return (p / p.sum(1, keepdim=True).clamp_min(1e-30)).mean(0)
    raise MistError(f"measure must be 'argmax' or 'mean', got {mode!r}")


# --------------------------------------------------------------------------------------------
# The MIST loop
# --------------------------------------------------------------------------------------------

def _measured_table(measured, concepts: Sequence[str], K: int) -> torch.Tensor:
    if isinstance(measured, Mapping):
        missing = [c for c in concepts if c not in measured]
        if missing:
            raise MistError(f"measured distribution missing for concepts {missing}")
        rows = [measured[c] for c in concepts]
    else:
        rows = torch.as_tensor(measured, dtype=torch.float64)
        if rows.ndim == 1:
            rows = rows[None].expand(len(concepts), -1)
        if rows.shape[0] != len(concepts):
            raise MistError(f"measured has {rows.shape[0]} rows for {len(concepts)} concepts")
    return torch.stack([_as_dist(r if isinstance(r, str) else torch.as_tensor(r, dtype=torch.float64), K,
                                 f"measured distribution of {c!r}") for r, c in zip(rows, concepts)])


def _check_concepts(concepts) -> list[str]:
    if isinstance(concepts, str):
        concepts = concepts.split(",")
    out = [c.strip() for c in (concepts or []) if isinstance(c, str) and c.strip()]
    if not out:
        raise MistError("no concepts given; pass e.g. concepts=['doctor', 'nurse']")
    if len(set(out)) != len(out):
        raise MistError(f"duplicate concepts in {out}")
    return out


def mist(pipe, concepts: str | Sequence[str], attributes="gender", *, target="uniform", classifier=None,
         measured=None, with_to_k: bool = True, lam: float = 0.5, eta_e: float = 1.0, eta_p: float = 0.2,
         step: float = 0.1, tol: float = 0.05, max_rounds: int = 10, preserve: Sequence[str] = ("",),
         template: str = "a {concept}", measure_template: str = "a headshot of a {concept}",
         images: int = 20, seeds=None, reseed: bool = False, steps: int = 20, guidance_scale: float | None = None,
         height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
         batch_size: int = 8, measure: str = "argmax", custom_attributes: Mapping | None = None,
         clip_model: str | None = None, model_id: str | None = None, progress: bool = True,
         callback: Callable | None = None, face_detector=None) -> MistEdit:
    """Debias ``concepts`` over ``attributes`` towards ``target`` with MIST; returns the ``MistEdit``
    and leaves it applied to ``pipe`` (``edit.revert(pipe)`` restores the model bit for bit).

    With a ``classifier`` (see ``resolve_classifier``: a callable over the joint classes, a
    ``fastfair.classify`` classifier, or a spec such as "clip") each round generates ``images``
    images of ``measure_template`` per concept, measures the attribute distribution p (``measure``:
    "argmax" share or "mean" probability), and edits with ``w = step (target - p)`` until every
    concept is within ``tol`` of the target (it then joins the preserve set) or ``max_rounds``
    edits were made. Without a classifier, ``measured`` (``{concept: distribution}``, or one row per
    concept, e.g. from an audit) drives a single edit round. ``callback(round, p_hat)`` is called
    after every measurement. ``face_detector``: measure on each image's largest face (images without one are
    abstentions), as audits and DFT do with a detector.
    """
    from tqdm.auto import tqdm

    concepts = _check_concepts(concepts)
    from .processors import guidance_scale_for

    guidance_scale = guidance_scale_for(pipe, guidance_scale)
    sets = parse_attributes(attributes, custom_attributes)
    labels, phrases = joint_classes(sets)
    K = len(labels)
    t = parse_target(target, sets)
    for name, v in (("step", step), ("tol", tol)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise MistError(f"{name} must be a positive number, got {v!r}")
    _check_weights(lam, eta_e, eta_p)
    if classifier is None and measured is None:
        raise MistError("MIST needs the attribute distribution: pass classifier=... (a callable images -> (N, K) "
                        "probabilities with .labels) or measured={concept: distribution} from an audit")
    if classifier is not None and measured is not None:
        raise MistError("pass either classifier= or measured=, not both")
    if is_edited(pipe):
        raise MistError("this pipeline already has a MIST edit applied; call revert(pipe) first")
    table = _measured_table(measured, concepts, K) if measured is not None else None
    if classifier is not None and max_rounds < 1:
        raise MistError(f"max_rounds must be >= 1, got {max_rounds}")
    if measure not in ("argmax", "mean"):
        raise MistError(f"measure must be 'argmax' or 'mean', got {measure!r}")
    if face_detector is not None and classifier is None:
        raise MistError("face_detector crops faces for the classifier: give classifier= too (measured= needs none)")
    clf = None if classifier is None else resolve_classifier(classifier, sets, device=pipe.device,
                                                             clip_model=clip_model, face_detector=face_detector)

    # prompts (length-checked up front, before any work)
    c_prompts = [fill(template, c) for c in concepts]
    a_prompts = [[fill(template, c, ph) for ph in phrases] for c in concepts]
    m_prompts = [fill(measure_template, c) for c in concepts]
    if isinstance(preserve, str):
        preserve = [preserve]
    preserve = list(preserve)
    if not all(isinstance(p, str) for p in preserve):
        raise MistError(f"preserve prompts must be strings, got {preserve!r}")
    for c, p, row in zip(concepts, c_prompts, a_prompts):
        try:
            check_prompts(pipe, [p] + row)
        except _concepts.ConceptError as e:
            raise MistError(f"concept {c!r} does not fit the text encoder: {e}") from None
    check_prompts(pipe, m_prompts)
    check_prompts(pipe, preserve, allow_empty=True)
    if seeds is None:
        seeds = list(range(images))
    else:
        from .generation import parse_seeds

        seeds = parse_seeds(seeds)

    mods = edit_layers(pipe)
    projs = _projections(mods, with_to_k)
    names = [n for n, _ in projs]
    lin = dict(projs)
    device = projs[0][1].weight.device
    originals = {n: m.weight.detach().clone() for n, m in projs}
    master = {n: w.double() for n, w in originals.items()}

    K_e = eos_keys(pipe, c_prompts).to(device)                                     # (C, d)
    K_a = eos_keys(pipe, [q for row in a_prompts for q in row]).to(device)
    K_a = K_a.reshape(len(concepts), K, -1)                                        # (C, J, d)

    meta = {
        "method": "MIST (Yesiltepe et al. 2024)",
        "model": {"id": model_id or _model_id(pipe), "name_or_path": _str(getattr(pipe, "name_or_path", None)),
                  "pipeline": type(pipe).__name__,
                  "fingerprint": fingerprint(originals), "probes": {n: _probes(w) for n, w in originals.items()}},
        "layers": list(mods), "with_to_k": with_to_k, "concepts": concepts, "concept_prompts": c_prompts,
        "attributes": [{"name": s.name, "labels": list(s.labels), "phrases": list(s.phrases)} for s in sets],
        "classes": labels, "class_prompts": a_prompts, "target": t.tolist(),
        "hyperparameters": dict(lam=lam, eta_e=eta_e, eta_p=eta_p, step=step, tol=tol, max_rounds=max_rounds,
                                measure=measure),
        "measurement": None if classifier is None else dict(
            template=measure_template, prompts=m_prompts, images=len(seeds), seeds=seeds, reseed=reseed,
            steps=steps, guidance_scale=guidance_scale, height=height, width=width,
            negative_prompt=negative_prompt, classifier=clf.describe,
            # what else the measured images depend on (a DDIM- and an Euler-ancestral-measured edit differ)
            scheduler=type(pipe.scheduler).__name__, dtype=str(next(pipe.unet.parameters()).dtype).replace(
                "torch.", ""), batch_size=batch_size),
        "preserve": list(preserve), "rounds": [],
    }

    def measure_now(r: int) -> torch.Tensor:
        if classifier is None:
            return table
        from .generation import generate

        sd = [s + r * 1_000_003 for s in seeds] if reseed else seeds
        gen = generate(pipe, m_prompts, seeds=sd, steps=steps, guidance_scale=guidance_scale, height=height,
                       width=width, negative_prompt=negative_prompt, batch_size=batch_size, progress=False)
        probs = clf(gen.images)
        n = len(sd)
        return torch.stack([distribution(probs[i * n:(i + 1) * n], measure) for i in range(len(concepts))])

    pipe._fastfair_mist = _Applied(originals, None)  # revert() works even if the loop fails
    ok = False
    bar = tqdm(total=max_rounds if classifier is not None else 1, disable=not progress, desc="MIST", unit="round")
    try:
        pres_prompts = list(preserve)
        r = 0
        while True:
            p_hat = measure_now(r)
            gap = (p_hat - t).abs().max(1).values
            done = gap < tol  # judged every round: a concept pushed out again by other edits is edited again
            for i in done.nonzero().flatten().tolist():
                if c_prompts[i] not in pres_prompts:
                    pres_prompts.append(c_prompts[i])  # reached its target: joins the preserve set (as MIST)
            rec = {"round": r, "p_hat": {c: p_hat[i].tolist() for i, c in enumerate(concepts)},
                   "max_gap": {c: float(gap[i]) for i, c in enumerate(concepts)}}
            meta["rounds"].append(rec)
            if callback is not None:
                callback(r, {c: p_hat[i].clone() for i, c in enumerate(concepts)})
            bar.set_postfix_str(_postfix(concepts, p_hat, gap), refresh=True)
            last = (classifier is None and r == 1) or (classifier is not None and r == max_rounds)
            if bool(done.all()) or last:
                break
            w = step * (t - p_hat)                                                   # (C, J)
            w[done] = 0.0
            rec["weights"] = {c: w[i].tolist() for i, c in enumerate(concepts)}
            rec["preserve"] = list(pres_prompts)
            K_p = preserve_keys(pipe, pres_prompts)
            K_p = K_p.to(device) if K_p is not None else None
            _round(master, lin, K_e, K_a, w.to(device), K_p, lam, eta_e, eta_p)
            with torch.no_grad():
                for n in names:
                    lin[n].weight.copy_(master[n].to(lin[n].weight.dtype))
            r += 1
            bar.update(1)
            if classifier is None:
                break
        deltas = {n: (master[n] - originals[n].double()).float().cpu() for n in names}
        meta["converged"] = {c: bool(done[i]) for i, c in enumerate(concepts)}
        meta["edit_rounds"] = r
        edit = MistEdit(deltas, meta)
        with torch.no_grad():
            for n in names:
                lin[n].weight.copy_(_edited(originals[n], deltas[n]))
        pipe._fastfair_mist = _Applied(originals, edit)
        ok = True
        return edit
    finally:
        bar.close()
        if not ok:
            revert(pipe)


def summary(edit: MistEdit) -> str:
    """A text table: the measured distribution of every concept per round, and the target."""
    m = edit.meta
    classes = m.get("classes", [])
    lines = [f"MIST edit of {m.get('model', {}).get('id')}: {len(m.get('concepts', []))} concepts, classes "
             f"{' / '.join(classes)}, target [{', '.join(f'{v:.3f}' for v in m.get('target', []))}]",
             "round\tconcept\tp_hat\tmax|p-t|"]
    for r in m.get("rounds", []):
        for c, p in r["p_hat"].items():
            lines.append(f"{r['round']}\t{c}\t[{', '.join(f'{v:.3f}' for v in p)}]\t{r['max_gap'][c]:.3f}")
    conv = m.get("converged", {})
    if m.get("measurement") is None:
        lines.append("one edit round from the given distributions (no classifier)")
    else:
        lines.append(f"{m.get('edit_rounds')} edit rounds; within tol: "
                     f"{', '.join(c for c, ok in conv.items() if ok) or 'none'}")
    return "\n".join(lines)


def _str(x):
    return None if x is None else str(x)


def _model_id(pipe) -> str | None:
    """The preset name for an offline preset ("tiny-sd", seed 0), else ``pipe.name_or_path``."""
    from . import pipelines

    path = _str(getattr(pipe, "name_or_path", None))
    if path is None:
        return None
    m = re.fullmatch(r"(.+)-seed(\d+)-v\d+", Path(path).name)
    if m and m.group(1) in pipelines.PRESETS:
        return m.group(1) if m.group(2) == "0" else f"{m.group(1)}@seed{m.group(2)}"
    return path


def _postfix(concepts, p_hat, gap) -> str:
    parts = [f"{c}=[{', '.join(f'{v:.2f}' for v in p_hat[i].tolist())}]" for i, c in enumerate(concepts[:3])]
    more = f" +{len(concepts) - 3}" if len(concepts) > 3 else ""
    return " ".join(parts) + more + f" max|p-t|={float(gap.max()):.3f}"


@torch.no_grad()
def targets(W: torch.Tensor, K_e: torch.Tensor, K_a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``v*_c = W k_c + sum_j w_cj ||W k_c|| W k_cj / ||W k_cj||`` for one projection: (C, out)."""
    o = K_e @ W.mT                                                                   # (C, out)
    u = K_a @ W.mT                                                                   # (C, J, out)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return o + o.norm(dim=-1, keepdim=True) * (w[..., None] * u).sum(1)


@torch.no_grad()
def _round(master: dict, lin: dict, K_e, K_a, w, K_p, lam, eta_e, eta_p) -> None:
    """One MIST edit of every projection in ``master`` (float64, in place): targets per projection,
    then one shared-normal-matrix solve for all rows of all projections with the same key size."""
    groups: dict[int, list[str]] = {}
    for n, W in master.items():
        groups.setdefault(W.shape[1], []).append(n)
    for d, ns in groups.items():
        if K_e.shape[1] != d:
            raise MistError(f"projections {ns[:2]}... take {d}-dim inputs but the text encoder gives "
                            f"{K_e.shape[1]}-dim states")
        W = torch.cat([master[n] for n in ns])                                       # (R, d)
        V = torch.cat([targets(master[n], K_e, K_a, w) for n in ns], dim=1)          # (C, R)
        W_new = closed_form(W, K_e, V, K_p, lam=lam, eta_e=eta_e, eta_p=eta_p)
        off = 0
        for n in ns:
            rows = master[n].shape[0]
            master[n] = W_new[off:off + rows].contiguous()
            off += rows
