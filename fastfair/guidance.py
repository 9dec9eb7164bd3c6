"""BiasMap's entanglement (energy) guidance, batched, as a hook around the scheduler step.

At every guided step, for the batch of N images:

1. one extra UNet forward of the conditional rows only, with gradients to the latents, records
   the current step's maps of the semantic and demographic words (fused op backward: attention
   probabilities are never kept);
2. E_i = sum over pairs of soft_iou(semantic_i, demographic_i) with BiasMap's Sinkhorn top-k masks;
3. g_i = dE_i / dx_t -- images are independent in the UNet (GroupNorm is per sample), so the
   gradient of sum_i E_i gives exactly the N per-image gradients;
4. if ||g_i|| < max_grad_norm: eps_i <- eps_i + scale * sqrt(1 - alpha_bar_t) * g_i (BiasMap's rule;
   it skips the update otherwise; ``on_large_grad="clip"`` rescales g_i to max_grad_norm instead);
   NaN/Inf gradients skip the image's update and are counted;
5. the scheduler's own step.

The hook reads the pipeline's UNet call (a forward pre-hook) and wraps ``pipe.scheduler.step``,
so it works with any diffusers SD/SDXL pipeline and any scheduler that has ``alphas_cumprod`` and
predicts epsilon (DDIM, DPM-Solver++, Euler, ...). Nothing is retained across steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import metrics
from .maps import Aggregation, MapRecorder

GUIDANCE_AGGREGATION = Aggregation("guidance", frozenset({"down", "up"}), True, "cond")


@dataclass
class EntanglementGuidance:
    """Sampling-time mitigation of concept entanglement (BiasMap).

    ``semantic`` / ``demographic``: words (or equal-length sequences of words, one pair each).
    ``attribution_prompt``: look the words up in this prompt (open vocabulary, e.g.
    "a photo of the face of a doctor and gender") instead of the generation prompt.
    ``steps``: step indices to guide (None: all). ``checkpointing``: gradient checkpointing of the
    UNet blocks during the guided forward.
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
        if not 0 < self.top_k < 1:
            raise ValueError(f"top_k must be in (0, 1); got {self.top_k}")

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


def check_scheduler(scheduler) -> None:
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: entanglement guidance needs a "
                         "DDPM-family scheduler (DDIM, DPMSolverMultistep, EulerDiscrete, ...)")
    pred = getattr(scheduler.config, "prediction_type", "epsilon")
    if pred != "epsilon":
        raise ValueError(f"entanglement guidance adds to the noise estimate; this scheduler predicts {pred!r}. "
                         "Use an epsilon-prediction model/scheduler")


class Guider:
    """Installed on a patched pipeline for one batch of ``generate``."""

    def __init__(self, pipe, guidance: EntanglementGuidance, tokens: torch.Tensor, pair_index: list,
                 latent_hw, map_states: torch.Tensor | None, n_items: int):
        check_scheduler(pipe.scheduler)
        self.pipe, self.g = pipe, guidance
        self.tokens, self.pair_index = tokens, pair_index   # pair_index: [(col_sem, col_dem)] into token groups
        self.latent_hw, self.map_states, self.n = latent_hw, map_states, n_items
        self.step_idx = 0
        self.unet_call = None
        self._inside = False
        self.records: list[dict] = []
        self.word_weights = None  # (B, W, T), set by generate

    # -- the pieces -----------------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        if not self._inside:
            self.unet_call = (args, kwargs)

    def _cond_slice(self, x: torch.Tensor) -> torch.Tensor:
        n = self.n
        if x.shape[0] == 2 * n:
            return x[n:]
        if x.shape[0] == n:
            return x
        raise RuntimeError(f"UNet batch {x.shape[0]} does not match {n} images")

    def energy_and_grad(self, latents: torch.Tensor, t, want_grad: bool = True):
        """E (N,) and dE/dlatents for the current UNet call's conditioning."""
        pipe = self.pipe
        args, kwargs = self.unet_call
        kw = dict(kwargs)
        kw["return_dict"] = False
        ehs = kw.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        kw["encoder_hidden_states"] = self._cond_slice(ehs)
        if kw.get("added_cond_kwargs"):
            kw["added_cond_kwargs"] = {k: self._cond_slice(v) for k, v in kw["added_cond_kwargs"].items()}
        if kw.get("timestep_cond") is not None:
            kw["timestep_cond"] = self._cond_slice(kw["timestep_cond"])
        x = latents.detach().requires_grad_(want_grad)
        state = pipe._fastfair
        rec = MapRecorder(self.tokens, self.n, self.latent_hw, GUIDANCE_AGGREGATION, map_states=self.map_states)
        saved, state.recorder = state.recorder, rec
        self._inside = True
        try:
            with torch.enable_grad():
                x_in = pipe.scheduler.scale_model_input(x, t)
                pipe.unet(x_in, t, **kw)
                maps = rec.finalize()  # (B, T, h, w)
                wm = torch.einsum("bkt,btyx->bkyx", self.word_weights.to(maps.device, maps.dtype), maps)
                energy = 0
                for si, di in self.pair_index:
                    energy = energy + metrics.soft_iou(wm[:, si], wm[:, di], top_k=self.g.top_k, gamma=self.g.gamma,
                                                       iters=self.g.iters, backend=state.backend)
                grad = torch.autograd.grad(energy.sum(), x)[0] if want_grad else None
        finally:
            self._inside = False
            state.recorder = saved
        return energy.detach(), grad

    def _step(self, orig_step, model_output, timestep, sample, *args, **kwargs):
        g = self.g
        i = self.step_idx
        self.step_idx += 1
        if g.steps is not None and i not in g.steps:
            return orig_step(model_output, timestep, sample, *args, **kwargs)
        E, grad = self.energy_and_grad(sample, timestep)
        n = grad.flatten(1).norm(dim=1)
        finite = torch.isfinite(grad.flatten(1)).all(1) & torch.isfinite(n)
        if g.on_large_grad == "skip":
            apply = finite & (n < g.max_grad_norm)
            factor = apply.to(grad.dtype)
        else:
            apply = finite
            factor = torch.where(finite, torch.clamp(g.max_grad_norm / (n + 1e-12), max=1.0), torch.zeros_like(n))
        grad = torch.where(finite.view(-1, *[1] * (grad.dim() - 1)), grad, torch.zeros_like(grad))
        t_val = float(timestep.item() if torch.is_tensor(timestep) else timestep)
        t_int = int(round(t_val))
        sched = self.pipe.scheduler
        sigmas, step_index = getattr(sched, "sigmas", None), getattr(sched, "step_index", None)
        if sigmas is not None and step_index is not None and t_val != t_int:
            # sigma-parametrised schedulers (Euler) with fractional timesteps: abar = 1 / (1 + sigma^2)
            abar = 1.0 / (1.0 + float(sigmas[step_index]) ** 2)
        else:
            abar = float(sched.alphas_cumprod[t_int])
        coef = g.scale * math.sqrt(1.0 - abar)
        model_output = model_output + (coef * factor.view(-1, *[1] * (grad.dim() - 1)) * grad).to(model_output.dtype)
        self.records.append(dict(step=i, timestep=t_int, energy=E.float().cpu(), grad_norm=n.float().cpu(),
                                 applied=apply.cpu(), clipped=(apply & (n >= g.max_grad_norm)).cpu(),
                                 nonfinite=(~finite).cpu()))
        return orig_step(model_output, timestep, sample, *args, **kwargs)

    # -- install / remove ------------------------------------------------------------------------
    def __enter__(self):
        sched = self.pipe.scheduler
        orig = sched.step
        self._orig_attr = sched.__dict__.get("step")
        sched.step = lambda *a, **k: self._step(orig, *a, **k)
        self._handle = self.pipe.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._ckpt = None
        if self.g.checkpointing and hasattr(self.pipe.unet, "enable_gradient_checkpointing"):
            self._ckpt = getattr(self.pipe.unet, "gradient_checkpointing", False)
            self.pipe.unet.enable_gradient_checkpointing()
        return self

    def __exit__(self, *exc):
        sched = self.pipe.scheduler
        if self._orig_attr is None:
            del sched.step
        else:
            sched.step = self._orig_attr
        self._handle.remove()
        if self._ckpt is False:
            self.pipe.unet.disable_gradient_checkpointing()
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
