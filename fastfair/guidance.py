"""BiasMap's entanglement (energy) guidance, batched, folded into the pipeline's own UNet call.

At every guided step, for the batch of N images:

1. the pipeline's UNet call (on ``scale_model_input(cat([x_t] * 2), t)``) runs as two halves: the N
   unconditional rows without grad, the N conditional rows with grad to their (scaled) input and
   none to the weights, recording the current step's maps of the semantic and demographic words
   (fused op backward: attention probabilities are never kept) -- plus, in the same fused calls,
   whatever maps ``generate`` records; the pipeline gets the concatenated, detached output, so
   every row goes through the UNet once;
2. E_i = sum over pairs of soft_iou(semantic_i, demographic_i) with BiasMap's Sinkhorn top-k masks;
3. at the scheduler step, g_i = dE_i / dx_t from that graph, x_t being the UNet's input -- the
   variance-preserving latent BiasMap's rule is stated for: DDIM's sample, Euler's sample / sqrt(sigma^2 + 1)
   (``scale_model_input``), so one latent gets the same nudge under every scheduler (the gradient with respect
   to Euler's own sample is sqrt(alpha_bar_t) times smaller: 15x weaker guidance at SDXL's first steps) --
   images are independent in the UNet (GroupNorm is per sample), so the gradient of sum_i E_i gives exactly
   the N per-image gradients; the graph is freed there;
4. if ||g_i|| < max_grad_norm: eps_i <- eps_i + scale * sqrt(1 - alpha_bar_t) * g_i (BiasMap's rule;
   it skips the update otherwise; ``on_large_grad="clip"`` rescales g_i to max_grad_norm instead);
   NaN/Inf gradients skip the image's update and are counted;
5. the scheduler's own step.

The guider wraps ``pipe.unet.forward`` and ``pipe.scheduler.step``, so it works with any diffusers
SD/SDXL pipeline (every batch-sized argument of the UNet call -- encoder states, SDXL's
``added_cond_kwargs``, ``timestep_cond``, ControlNet residuals -- is split the same way) and any
scheduler that has ``alphas_cumprod`` and predicts epsilon or v (DDIM, DPM-Solver++, Euler, ...), and
SD3 and Flux pipelines (keyword-called MMDiT, flow-matching Euler: the nudge is translated to the velocity). Steps
outside ``steps`` run the plain UNet call, without grad. Nothing is retained across steps.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from . import metrics
from .maps import Aggregation, MapRecorder

GUIDANCE_AGGREGATION = Aggregation("guidance", frozenset({"down", "up", "joint"}), True, "cond")


@dataclass
class EntanglementGuidance:
    """Sampling-time mitigation of concept entanglement (BiasMap).

    ``semantic`` / ``demographic``: words (or equal-length sequences of words, one pair each).
    ``attribution_prompt``: look the words up in this prompt (open vocabulary, e.g.
    "a photo of the face of a doctor and gender") instead of the generation prompt.
    ``steps``: step indices to guide (None: all). ``checkpointing``: gradient checkpointing of the
    UNet blocks during the guided forward. ``branch``: the classifier-free-guidance half whose maps give
    the energy and its gradient -- "cond" (default: the prompt's own attention) or "uncond", which is what
    BiasMap's released code does (its OVAM hooks store the unconditional half's queries).
    """

    semantic: str | Sequence[str]
    demographic: str | Sequence[str]
    attribution_prompt: str | None = None
    scale: float = 100.0
    max_grad_norm: float = 1.0
    on_large_grad: str = "skip"
    steps: Sequence[int] | None = None
    top_k: float = 0.3
    gamma: float = 0.01
    iters: int = 20
    checkpointing: bool = False
    branch: str = "cond"
    pairs: list = field(init=False)

    def __post_init__(self):
        sem = [self.semantic] if isinstance(self.semantic, str) else list(self.semantic)
        dem = [self.demographic] if isinstance(self.demographic, str) else list(self.demographic)
        if len(sem) != len(dem) or not sem:
            raise ValueError(f"need as many semantic as demographic words; got {sem} and {dem}")
        self.pairs = list(zip(sem, dem))
        if not self.scale > 0:
            raise ValueError(f"guidance scale must be > 0; got {self.scale}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0; got {self.max_grad_norm}")
        if self.on_large_grad not in ("skip", "clip"):
            raise ValueError(f"on_large_grad must be 'skip' or 'clip'; got {self.on_large_grad!r}")
        if self.top_k is None or not 0 < self.top_k < 1:  # the energy needs the soft top-k masks (BiasMap's)
            raise ValueError(f"top_k must be in (0, 1) (the energy's soft top-k masks); got {self.top_k}")
        if self.steps is not None:
            if isinstance(self.steps, (str, bytes)) or not hasattr(self.steps, "__iter__"):
                raise ValueError(f"steps must be a collection of step indices, e.g. [0, 1, 2] or range(10), or None "
                                 f"(every step); got {self.steps!r}")
            steps = list(self.steps)
            bad = [x for x in steps if not isinstance(x, (int, np.integer)) or isinstance(x, bool) or x < 0]
            if bad or not steps:
                raise ValueError(f"steps must be a non-empty collection of non-negative step indices (0 is the first "
                                 f"denoising step); got {self.steps!r}")
            self.steps = frozenset(int(x) for x in steps)
        if self.branch not in ("cond", "uncond"):
            raise ValueError(f"branch must be 'cond' or 'uncond' (the CFG half whose maps guide); got {self.branch!r}")

    @property
    def words(self) -> list[str]:
        out: list[str] = []
        for a, b in self.pairs:
            for w in (a, b):
                if w not in out:
                    out.append(w)
        return out

    @staticmethod
    def parse(spec: str, **kwargs) -> "EntanglementGuidance":
        """``"doctor:gender"`` or ``"doctor:gender,nurse:gender"`` (the CLI's --guide)."""
        pairs = [p.split(":") for p in spec.split(",") if p.strip()]
        if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
            raise ValueError(f"--guide expects semantic:demographic pairs like doctor:gender; got {spec!r}")
        return EntanglementGuidance([p[0].strip() for p in pairs], [p[1].strip() for p in pairs], **kwargs)


def is_flow_matching(scheduler) -> bool:
    """A rectified-flow scheduler (SD3): x_t = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0."""
    return type(scheduler).__name__.startswith("FlowMatch") and getattr(scheduler, "sigmas", None) is not None


def check_scheduler(scheduler, flow_model: bool = False) -> None:
    """Raise unless guidance can run with ``scheduler``: a DDPM-family one, or (``flow_model``: SD3's
    transformer) a flow-matching one."""
    if is_flow_matching(scheduler):
        if flow_model:
            return
        raise ValueError(f"{type(scheduler).__name__} is a flow-matching scheduler but this pipeline's UNet is a "
                         "diffusion (noise-prediction) model: use a DDPM-family scheduler (DDIM, DPMSolverMultistep, "
                         "EulerDiscrete, ...), which has alphas_cumprod")
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: entanglement guidance needs a "
                         "DDPM-family scheduler (DDIM, DPMSolverMultistep, EulerDiscrete, ...) or SD3's "
                         "flow-matching Euler")
    pred = getattr(scheduler.config, "prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise ValueError(f"entanglement guidance adds to the noise estimate; this scheduler predicts {pred!r}. "
                         "Use an epsilon- or v-prediction model/scheduler")


def abar_at(sched, timestep) -> tuple[int, float]:
    """(rounded timestep, alpha_bar) of a scheduler step: ``alphas_cumprod[t]``, or 1 / (1 + sigma^2) for
    sigma-parametrised schedulers (Euler) at fractional timesteps."""
    t_val = float(timestep.item() if torch.is_tensor(timestep) else timestep)
    t_int = int(round(t_val))
    sigmas, step_index = getattr(sched, "sigmas", None), getattr(sched, "step_index", None)
    if sigmas is not None and step_index is not None and t_val != t_int:
        return t_int, 1.0 / (1.0 + float(sigmas[step_index]) ** 2)
    return t_int, float(sched.alphas_cumprod[t_int])


def _map_rows(obj, fn, batch: int):
    """``obj`` with ``fn`` applied to every tensor whose leading dimension is ``batch`` (through dicts,
    lists and tuples); everything else unchanged."""
    if torch.is_tensor(obj):
        return fn(obj) if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: _map_rows(v, fn, batch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_rows(v, fn, batch) for v in obj)
    return obj


def _split_rows(obj, rows: slice, batch: int):
    """``obj`` with every tensor whose leading dimension is ``batch`` cut to ``rows``."""
    return _map_rows(obj, lambda t: t[rows], batch)


@contextmanager
def _recording(state, recorder):
    saved, state.recorder = state.recorder, recorder
    try:
        yield
    finally:
        state.recorder = saved


@contextmanager
def _input_grads_only(module):
    """No parameter of ``module`` requires grad inside: the graph built there leads to the inputs only,
    so backward computes no weight gradient (nor dk/dv of the fused op, whose keys come from weights
    applied to constant encoder states) and the forward saves nothing for weight gradients."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _JointRecorder:
    """What the cross-attention processors see during a guided step's conditional half: the
    guidance's recorder and (optionally) ``generate``'s, served by one fused call per layer.

    The maps of both come from one ``ops.cross_attention`` call with their token lists
    concatenated; that needs both to read the same keys (the prompt's, or the same attribution
    prompt's), which the guider checks. The user's share is detached. ``replay`` (set once the
    forward is done) makes ``add`` a no-op, for the recomputation of gradient checkpointing
    during the backward: it runs the same processors, which must not record again.
    """

    active = True

    def __init__(self, guide: MapRecorder, user: MapRecorder | None):
        self.guide, self.user = guide, user
        self.replay = False
        user_tok = None if user is None else user.tokens  # None: the user records only further attribution prompts
        self._tu = 0 if user_tok is None else user_tok.shape[1]
        self.tokens = guide.tokens if user_tok is None else torch.cat([user_tok, guide.tokens.to(user_tok.device)], 1)
        self.map_states = guide.map_states if user is None or guide.map_states is not None else user.map_states
        self.aggregation = user.aggregation if user is not None else guide.aggregation  # processors read .per_head
        self._want = (False, False)

    def wants(self, block: str, nq: int) -> bool:
        u = self.user is not None and self.user.wants(block, nq)
        g = self.guide.wants(block, nq)
        self._want = (u, g)
        return u or g

    @property
    def extras(self) -> dict:
        """The user's further attribution prompts, recorded when the user's maps are (not on replay)."""
        return self.user.extras if self.user is not None and self._want[0] and not self.replay else {}

    def attribution_recorders(self) -> dict:
        """The user's further attribution prompts (their text streams on an MMDiT run whenever the user's are)."""
        return self.user.extras if self.user is not None else {}

    def rows(self, batch: int) -> slice:
        if batch != self.guide.n_items:
            raise RuntimeError(f"guided conditional pass saw a batch of {batch} for {self.guide.n_items} images")
        return slice(0, batch)

    def add(self, layer: str, maps: torch.Tensor, nq: int, heads: int) -> None:
        if self.replay:
            return
        u, g = self._want
        tu, per_head = self._tu, self.aggregation.per_head
        if u and tu:
            self.user.add(layer, (maps[:, :, :tu] if per_head else maps[:, :tu]).detach(), nq, heads)
        if g:
            self.guide.add(layer, maps[:, :, tu:].sum(1) if per_head else maps[:, tu:], nq, heads)


def _as_output(out: torch.Tensor, by_keyword: bool, return_dict: bool):
    """A denoiser's return value for ``out``: diffusers' output class, or the ``return_dict=False`` tuple."""
    if not return_dict:
        return (out,)
    if by_keyword:  # SD3's transformer
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=out)


class StepHooks:
    """Replaces ``scheduler.step`` (with ``step(orig_step, *args)``) and the denoiser's ``forward`` for the
    duration of a with-block, restoring exactly what was there (an instance attribute such as accelerate's
    offload wrapper, or none)."""

    def _install(self, sched, net, step, forward):
        """Returns the forward in effect before."""
        orig = sched.step
        self._orig_step_attr = sched.__dict__.get("step")
        # keep step's signature: pipelines pass generator= (stochastic schedulers' per-image noise) only to a step
        # whose signature names it (prepare_extra_step_kwargs inspects it)
        sched.step = functools.wraps(orig)(lambda *a, **k: step(orig, *a, **k))
        self._orig_forward_attr = net.__dict__.get("forward")
        inner = net.forward
        net.forward = forward
        return inner

    def _uninstall(self, sched, net) -> None:
        if self._orig_step_attr is None:
            del sched.step
        else:
            sched.step = self._orig_step_attr
        if self._orig_forward_attr is None:
            del net.forward
        else:
            net.forward = self._orig_forward_attr


class Guider(StepHooks):
    """Installed on a patched pipeline for one batch of ``generate``."""

    def __init__(self, pipe, guidance: EntanglementGuidance, tokens: torch.Tensor, pair_index: list,
                 latent_hw, map_states: torch.Tensor | None, n_items: int):
        check_scheduler(pipe.scheduler, flow_model=getattr(pipe, "unet", None) is None)
        self.pipe, self.g = pipe, guidance
        self.tokens, self.pair_index = tokens, pair_index   # pair_index: [(col_sem, col_dem)] into token groups
        self.latent_hw, self.map_states, self.n = latent_hw, map_states, n_items
        self.step_idx = 0
        self.unet_call = None     # (args, kwargs) of a UNet call, for ``energy_and_grad``
        self._forward = None      # the UNet's own forward while installed
        self._pending = None      # (energy, leaf, recorder) between a guided UNet call and its step
        self._compat: dict = {}
        self.records: list[dict] = []
        self.word_weights = None  # (B, W, T), set by generate
        from .processors import denoiser

        self.net = denoiser(pipe)
        self._by_keyword = getattr(pipe, "unet", None) is None  # SD3's transformer: hidden_states=, timestep=

    # -- the pieces -----------------------------------------------------------------------------
    def _guided(self, i: int) -> bool:
        return self.g.steps is None or i in self.g.steps

    def _shares_keys(self, user: MapRecorder) -> bool:
        """Whether the user's maps and the guidance's read the same keys (one fused call serves both)."""
        key = id(user)
        if key not in self._compat:
            a, b = user.map_states, self.map_states
            if user.tokens is None:  # no maps of its own: only further attribution prompts (maps-only calls)
                ok = True
            elif a is None or b is None:
                ok = a is None and b is None
            else:
                ok = a.shape == b.shape and torch.equal(a, b.to(a.device, a.dtype))
            self._compat[key] = ok
        return self._compat[key]

    def _energy(self, rec: MapRecorder) -> torch.Tensor:
        maps = rec.finalize()  # (B, T, h, w)
        wm = torch.einsum("bkt,btyx->bkyx", self.word_weights.to(maps.device, maps.dtype), maps)
        energy = 0
        for si, di in self.pair_index:
            energy = energy + metrics.soft_iou(wm[:, si], wm[:, di], top_k=self.g.top_k, gamma=self.g.gamma,
                                               iters=self.g.iters, backend=self.pipe._fastfair.backend)
        return energy

    def _invoke(self, forward, sample, timestep, args, kwargs):
        if self._by_keyword:
            return forward(*args, hidden_states=sample, timestep=timestep, **kwargs)
        return forward(sample, timestep, *args, **kwargs)

    def _guided_call(self, forward, sample: torch.Tensor, timestep, args, kwargs, want_grad: bool = True):
        """The UNet call of a guided step: unconditional rows without grad, conditional rows with
        grad to their input (recording the guidance maps, and the user's), one pass each. Leaves
        (energy, leaf, recorder) in ``_pending``; returns what the plain call would."""
        n, batch = self.n, sample.shape[0]
        if batch not in (n, 2 * n):
            raise RuntimeError(f"UNet batch {batch} does not match {n} images")
        return_dict = kwargs.get("return_dict", True)
        kwargs = dict(kwargs, return_dict=False)
        state = self.pipe._fastfair
        user = state.recorder if state.recorder is not None and state.recorder.active else None
        cfg = batch == 2 * n
        gb = self.g.branch if cfg else "cond"  # the CFG half whose maps the energy reads (BiasMap / OVAM: uncond)
        cond = (slice(n, 2 * n) if gb == "cond" else slice(0, n)) if cfg else slice(0, n)  # the guided rows

        def part(rows):
            return (_split_rows(timestep, rows, batch), _split_rows(args, rows, batch),
                    _split_rows(kwargs, rows, batch))

        out_other = None
        if cfg:  # the other half: no grad (recording the user's maps if they read that half)
            other_b = "uncond" if gb == "cond" else "cond"
            other = slice(0, n) if gb == "cond" else slice(n, 2 * n)
            t_u, a_u, k_u = part(other)
            mine = user is not None and user.aggregation.branch == other_b
            with torch.no_grad(), _recording(state, user if mine else None):
                out_other = self._invoke(forward, sample[other], t_u, a_u, k_u)[0]
            if mine:
                user = None
        t_c, a_c, k_c = part(cond)
        if user is not None and not self._shares_keys(user):
            # the user's maps read other keys than the guidance's (e.g. the prompt's against an
            # attribution prompt's): the fused op gives one softmax per call, so they need their own pass
            with torch.no_grad(), _recording(state, user):
                self._invoke(forward, sample[cond], t_c, a_c, k_c)
            user = None
        guide = MapRecorder(self.tokens, n, self.latent_hw, GUIDANCE_AGGREGATION, map_states=self.map_states)
        joint = _JointRecorder(guide, user)
        leaf = sample[cond].detach().requires_grad_(want_grad)
        with torch.enable_grad(), _input_grads_only(self.net), _recording(state, joint):
            eps_c = self._invoke(forward, leaf, t_c, a_c, k_c)[0]
            energy = self._energy(guide)
        joint.replay = True
        self._pending = (energy, leaf, joint)
        if out_other is None:
            out = eps_c.detach()
        else:  # CFG order [uncond, cond]
            out = torch.cat([out_other, eps_c.detach()] if gb == "cond" else [eps_c.detach(), out_other])
        return _as_output(out, self._by_keyword, return_dict)

    def _finish(self, sample: torch.Tensor, want_grad: bool = True):
        """E (N,) and dE/dx from the pending guided call's graph, which is freed here: x is the UNet's input (of the
        shape of the scheduler's ``sample``)."""
        if self._pending is None:
            raise RuntimeError("guided scheduler step without a guided UNet call before it")
        energy, leaf, joint = self._pending
        self._pending = None
        if not want_grad:
            return energy.detach(), None
        if leaf.shape != sample.shape:
            raise RuntimeError(f"the UNet's conditional input {tuple(leaf.shape)} does not match the latents "
                               f"{tuple(sample.shape)}; entanglement guidance needs a plain text-to-image UNet input")
        with torch.enable_grad(), _input_grads_only(self.net), _recording(self.pipe._fastfair, joint):
            # with respect to the UNet's input, the variance-preserving x_t of BiasMap's rule (not through
            # scale_model_input: Euler's sample is x_t / sqrt(alpha_bar), its gradient sqrt(alpha_bar) times smaller)
            grad = torch.autograd.grad(energy.sum(), leaf)[0]
        return energy.detach(), grad

    def energy_and_grad(self, latents: torch.Tensor, t, want_grad: bool = True):
        """E (N,) and dE/dx for the conditioning of ``unet_call`` (a UNet call's (args, kwargs) for N or 2N rows),
        through the same folded call a guided step makes; x is the UNet's input ``scale_model_input(latents, t)``
        (``latents`` itself for DDIM and flow matching)."""
        args, kwargs = self.unet_call
        ehs = kwargs.get("encoder_hidden_states", args[0] if args else None)
        x = torch.cat([latents] * 2) if ehs.shape[0] == 2 * self.n else latents
        forward = self._forward or self.net.forward
        scale_in = getattr(self.pipe.scheduler, "scale_model_input", None)
        with torch.no_grad():
            x_in = x if scale_in is None else scale_in(x, t)
        self._guided_call(forward, x_in, t, args, kwargs, want_grad=want_grad)
        return self._finish(latents, want_grad)

    def _unet_forward(self, *args, **kwargs):
        if not self._guided(self.step_idx):
            return self._forward(*args, **kwargs)
        if self._by_keyword:  # SD3 calls its transformer with keywords only
            sample, timestep = kwargs.pop("hidden_states"), kwargs.pop("timestep")
        else:
            sample, timestep, args = args[0], args[1], args[2:]
        return self._guided_call(self._forward, sample, timestep, args, kwargs)

    def _step(self, orig_step, model_output, timestep, sample, *args, **kwargs):
        g = self.g
        i = self.step_idx
        self.step_idx += 1
        if not self._guided(i):
            return orig_step(model_output, timestep, sample, *args, **kwargs)
        E, grad = self._finish(sample)
        n = grad.flatten(1).norm(dim=1)
        finite = torch.isfinite(grad.flatten(1)).all(1) & torch.isfinite(n)
        if g.on_large_grad == "skip":
            apply = finite & (n < g.max_grad_norm)
            factor = apply.to(grad.dtype)
        else:
            apply = finite
            factor = torch.where(finite, torch.clamp(g.max_grad_norm / (n + 1e-12), max=1.0), torch.zeros_like(n))
        grad = torch.where(finite.view(-1, *[1] * (grad.dim() - 1)), grad, torch.zeros_like(grad))
        sched = self.pipe.scheduler
        if is_flow_matching(sched):
            # x_t = (1 - sigma) x0 + sigma eps and v = eps - x0, so eps = x_t + (1 - sigma) v: BiasMap's
            # eps += scale * sigma * g (sigma: the noise's std, as sqrt(1 - abar) in DDPM) is
            # v += scale * sigma / (1 - sigma) * g; at sigma ~ 1 (the first step, pure noise) v says nothing
            # about eps and the step is not guided
            if getattr(sched, "step_index", None) is None:
                sched._init_step_index(timestep)
            sigma = float(sched.sigmas[sched.step_index])
            t_int = int(round(float(timestep.flatten()[0] if torch.is_tensor(timestep) else timestep)))
            if 1.0 - sigma < 1e-3:
                factor = torch.zeros_like(factor)
                apply = torch.zeros_like(apply)
                coef = 0.0
            else:
                coef = g.scale * sigma / (1.0 - sigma)
        else:
            t_int, abar = abar_at(sched, timestep)
            coef = g.scale * math.sqrt(1.0 - abar)
        if not is_flow_matching(sched) and getattr(sched.config, "prediction_type", "epsilon") == "v_prediction":
            # eps = sqrt(abar) v + sqrt(1 - abar) x_t: at fixed x_t the same nudge of the noise estimate
            # is a nudge of v divided by sqrt(abar) (SD 2.x 768-v)
            coef = coef / math.sqrt(abar)
        model_output = model_output + (coef * factor.view(-1, *[1] * (grad.dim() - 1)) * grad).to(model_output.dtype)
        self.records.append(dict(step=i, timestep=t_int, energy=E.float().cpu(), grad_norm=n.float().cpu(),
                                 applied=apply.cpu(), clipped=(apply & (n >= g.max_grad_norm)).cpu(),
                                 nonfinite=(~finite).cpu()))
        return orig_step(model_output, timestep, sample, *args, **kwargs)

    # -- install / remove ------------------------------------------------------------------------
    def __enter__(self):
        unet = self.net
        self._forward = self._install(self.pipe.scheduler, unet, self._step, self._unet_forward)
        self._ckpt = None
        if self.g.checkpointing and hasattr(unet, "enable_gradient_checkpointing"):
            self._ckpt = getattr(unet, "gradient_checkpointing", False)
            unet.enable_gradient_checkpointing()
        return self

    def __exit__(self, *exc):
        unet = self.net
        self._pending = None
        self._uninstall(self.pipe.scheduler, unet)
        self._forward = None
        if self._ckpt is False:
            unet.disable_gradient_checkpointing()
        return False
    def diagnostics(self) -> dict:
        """Per guided step (rows) and image (columns)."""
        if not self.records:
            return {}
        stack = lambda k: torch.stack([r[k] for r in self.records])  # noqa: E731
        return dict(step=torch.tensor([r["step"] for r in self.records]),
                    timestep=torch.tensor([r["timestep"] for r in self.records]),
                    energy=stack("energy"), grad_norm=stack("grad_norm"), applied=stack("applied"),
                    clipped=stack("clipped"), nonfinite=stack("nonfinite"))
