"""fastfair's cross-attention processor for diffusers, and patch / unpatch.

``patch(pipe)`` puts a ``FastFairCrossAttnProcessor`` on every cross-attention module (``attn2``)
of the UNet; self-attention keeps its processor. While no ``MapRecorder`` is active, the
processor calls the module's original processor, so the pipeline's output is unchanged bit for bit.
While recording, it computes attention for the rows that count (the conditional half of a CFG
batch) with ``fastfair.ops.cross_attention`` -- one fused pass giving the output and the maps --
and the other rows with ``scaled_dot_product_attention``. ``unpatch(pipe)`` restores the exact
original processor objects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .maps import MapRecorder, block_of

# diffusers processors that compute plain scaled-dot-product attention; anything else is "custom".
_STANDARD = {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU",
             "SlicedAttnProcessor", "FusedAttnProcessor2_0"}


class PatchError(RuntimeError):
    pass


class PatchState:
    """Attached to a patched pipeline as ``pipe._fastfair``."""

    def __init__(self, originals: dict, backend: str):
        self.originals = originals        # module name -> original processor object
        self.backend = backend
        self.recorder: MapRecorder | None = None


def cross_attention_modules(unet) -> dict:
    """name -> Attention module for every cross-attention module of the UNet."""
    mods = {}
    for name, m in unet.named_modules():
        if hasattr(m, "set_processor") and getattr(m, "is_cross_attention", False):
            mods[name] = m
    return mods


class FastFairCrossAttnProcessor:
    def __init__(self, name: str, state: PatchState, original):
        self.name = name
        self.block = block_of(name)
        self.state = state
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        rec = self.state.recorder
        if rec is None or encoder_hidden_states is None or not rec.active:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        nq_in = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        if not rec.wants(self.block, nq_in):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None:
            raise PatchError(f"{self.name}: cross-attention maps with an attention mask are not supported; "
                             "run without encoder_attention_mask")
        return self._attend(attn, hidden_states, encoder_hidden_states, temb, rec)

    def _attend(self, attn, hidden_states, encoder_hidden_states, temb, rec: MapRecorder):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        head_dim = key.shape[-1] // heads

        def split(x):
            return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)

        query, key, value = split(query), split(key), split(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        def keys_of(states):  # the layer's keys for an attribution prompt's encoder states
            ms = states.to(encoder_hidden_states.dtype)
            if attn.norm_cross:
                ms = attn.norm_encoder_hidden_states(ms)
            mk = split(attn.to_k(ms))
            return attn.norm_k(mk) if attn.norm_k is not None else mk

        rows = rec.rows(batch)
        map_keys = keys_of(rec.map_states) if rec.map_states is not None else None
        per_head = rec.aggregation.per_head
        reduce = "none" if per_head else "sum"
        out_rec, maps = ops.cross_attention(query[rows], key[rows], value[rows], map_tokens=rec.tokens,
                                            map_keys=map_keys, scale=attn.scale, head_reduce=reduce,
                                            backend=self.state.backend)
        if maps is not None:  # None: the recorder only serves further attribution prompts
            rec.add(self.name, maps, query.shape[2], heads)
        extras = getattr(rec, "extras", None)  # MapRecorder and the guidance joint recorder have them
        if extras:  # further attribution prompts: maps only, from the same queries (never differentiated)
            with torch.no_grad():
                q_rec = query[rows].detach()
                for sub in extras.values():
                    sub.add(self.name, ops.attention_maps(q_rec, keys_of(sub.map_states), sub.tokens,
                                                          scale=attn.scale, head_reduce=reduce),
                            query.shape[2], heads)
        if rows.start == 0 and rows.stop == batch:
            out = out_rec
        else:
            other = slice(0, rows.start) if rows.start > 0 else slice(rows.stop, batch)
            out_other = F.scaled_dot_product_attention(query[other], key[other], value[other], dropout_p=0.0,
                                                       is_causal=False, scale=attn.scale)
            out = torch.cat([out_other, out_rec] if rows.start > 0 else [out_rec, out_other], dim=0)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def is_patched(pipe) -> bool:
    return getattr(pipe, "_fastfair", None) is not None


def patch(pipe, *, backend: str = "auto", force: bool = False) -> PatchState:
    """Install fastfair's processor on every cross-attention module of ``pipe.unet``.

    Raises ``PatchError`` for a pipeline without cross-attention, and for processors that are
    not plain diffusers attention (IP-Adapter, custom user processors...) unless ``force=True``:
    while recording maps fastfair computes plain attention for those layers, which would
    silently drop what the custom processor did. Idempotent on an already patched pipeline.
    """
    if is_patched(pipe):
        pipe._fastfair.backend = backend
        _prime_backend(backend, pipe.unet)
        return pipe._fastfair
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise PatchError(f"{type(pipe).__name__} has no UNet; fastfair patches UNet cross-attention "
                         "(Stable Diffusion 1.x/2.x and SDXL pipelines)")
    mods = cross_attention_modules(unet)
    if not mods:
        raise PatchError(f"{type(unet).__name__} has no cross-attention layer (no text conditioning): "
                         "there are no word maps to capture")
    custom = {n: type(m.processor).__name__ for n, m in mods.items() if type(m.processor).__name__ not in _STANDARD}
    if custom and not force:
        first = next(iter(custom.items()))
        raise PatchError(f"{len(custom)} cross-attention layers already use a custom processor (e.g. {first[0]}: "
                         f"{first[1]}). fastfair would bypass it while recording maps. Remove it, or call "
                         "patch(pipe, force=True) to accept that; unpatch() restores it either way.")
    state = PatchState({n: m.processor for n, m in mods.items()}, backend)
    for n, m in mods.items():
        m.set_processor(FastFairCrossAttnProcessor(n, state, state.originals[n]))
    pipe._fastfair = state
    _prime_backend(backend, unet)
    return state


def _prime_backend(backend: str, unet) -> None:
    """Resolve the backend for the UNet's device now, outside any torch.compile trace: a compiled UNet
    then reads the resolved name instead of running resolve_backend's imports (a graph break per layer)."""
    p = next(unet.parameters(), None)
    if p is not None:
        ops._resolve_for_call(backend, p.device)


def unpatch(pipe) -> None:
    """Restore the exact processor objects that were there before ``patch``."""
    state = getattr(pipe, "_fastfair", None)
    if state is None:
        return
    mods = cross_attention_modules(pipe.unet)
    for n, proc in state.originals.items():
        mods[n].set_processor(proc)
    pipe._fastfair = None
