"""fastfair's cross-attention processor for diffusers, and patch / unpatch.

``patch(pipe)`` puts a ``FastFairCrossAttnProcessor`` on every cross-attention module (``attn2``)
of the UNet; self-attention keeps its processor. SD3 pipelines (an MMDiT ``transformer``) get a
``FastFairJointAttnProcessor`` on every joint attention module instead, Flux a
``FastFairFluxAttnProcessor`` on every double- and single-stream attention. While no ``MapRecorder`` is active, the
processor calls the module's original processor, so the pipeline's output is unchanged bit for bit.
While recording, it computes attention for the rows that count (the conditional half of a CFG
batch) with ``fastfair.ops.cross_attention`` -- one fused pass giving the output and the maps --
and the other rows with ``scaled_dot_product_attention``. On an MMDiT, ``patch`` also hooks the transformer
blocks to carry attribution prompts' text streams (``fastfair.shadow``) for open-vocabulary maps; the
hooks do nothing while no recorder with attribution prompts is installed. ``unpatch(pipe)`` restores the
exact original processor objects and removes the hooks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops, shadow
from .maps import MapRecorder, block_of

# diffusers processors that compute plain scaled-dot-product attention; anything else is "custom".
_STANDARD = {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU",
             "SlicedAttnProcessor", "FusedAttnProcessor2_0"}
# SD3's and Flux's plain attention, also after fuse_qkv_projections() (the same math from the fused weights; the
# fastfair processors read to_q / to_k / to_v, which fusing keeps)
_STANDARD_JOINT = {"JointAttnProcessor2_0", "FusedJointAttnProcessor2_0", "FluxAttnProcessor", "FluxAttnProcessor2_0",
                   "FusedFluxAttnProcessor2_0"}


class PatchError(RuntimeError):
    pass


class PatchState:
    """Attached to a patched pipeline as ``pipe._fastfair``."""

    def __init__(self, originals: dict, backend: str):
        self.originals = originals        # module name -> original processor object
        self.backend = backend
        self.recorder: MapRecorder | None = None
        self.n_text: int | None = None  # Flux: text length of the current call (single-stream blocks)
        self.shadows: dict = {}  # MMDiT: attribution prompts' text streams in the current call (fastfair.shadow)
        self.shadow_hooks = None


def cross_attention_modules(unet) -> dict:
    """name -> Attention module for every cross-attention module of the UNet."""
    mods = {}
    for name, m in unet.named_modules():
        if hasattr(m, "set_processor") and getattr(m, "is_cross_attention", False):
            mods[name] = m
    return mods


def joint_attention_modules(transformer) -> dict:
    """name -> attention module for every attention over image and text tokens of an MMDiT: SD3's joint
    attention; Flux's double-stream (joint) and single-stream (one sequence [text; image]) attention."""
    if is_flux(transformer):
        return {name: m for name, m in transformer.named_modules()
                if type(m).__name__ == "FluxAttention" and hasattr(m, "set_processor")}
    return {name: m for name, m in transformer.named_modules()
            if hasattr(m, "set_processor") and getattr(m, "add_k_proj", None) is not None}


def is_flux(net) -> bool:
    return net is not None and hasattr(net, "single_transformer_blocks")


def denoiser(pipe):
    """The pipeline's denoising network: ``unet`` (SD 1.x/2.x, SDXL) or ``transformer`` (SD3, Flux)."""
    net = getattr(pipe, "unet", None)
    return net if net is not None else getattr(pipe, "transformer", None)


def default_sample_size(pipe) -> int:
    """The denoiser's default latent size (its config's ``sample_size``; Flux has none: the pipeline's)."""
    net = denoiser(pipe)
    return getattr(net.config, "sample_size", None) or getattr(pipe, "default_sample_size", 64)


def guidance_scale_for(pipe, value: float | None = None) -> float | None:
    """The guidance scale a run uses and records: ``value``, or when None :func:`default_guidance_scale`; None for a
    Flux transformer without a guidance embedding (FLUX.1-schnell), which has no guidance input at all (any value
    is unused there, e.g. the 0.0 diffusers' examples pass)."""
    net = denoiser(pipe)
    if is_flux(net) and not getattr(net.config, "guidance_embeds", False):
        return None
    return default_guidance_scale(pipe) if value is None else value


def default_guidance_scale(pipe) -> float:
    """The guidance scale used when none is given: 7.5 on UNet pipelines (SD 1.x/2.x, SDXL; BiasMap's and the DFT
    paper's setting), the pipeline's own default on SD3 (7.0) and Flux (3.5: FLUX.1-dev's distilled guidance
    embedding, for which 7.5 is far outside the range it was distilled on)."""
    if getattr(pipe, "unet", None) is not None:
        return 7.5
    import inspect

    par = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    d = par.default if par is not None else None
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        return float(d)
    return 3.5 if is_flux(denoiser(pipe)) else 7.0


def text_attention_modules(pipe) -> dict:
    """The attention modules whose keys include the prompt's tokens: UNet cross-attention, or an MMDiT's (SD3,
    Flux) attention over image and text tokens."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return cross_attention_modules(unet)
    tr = getattr(pipe, "transformer", None)
    return joint_attention_modules(tr) if tr is not None else {}


class _FastFairProcessor:
    """What every fastfair processor holds: its module's name and block, the patch state, the original."""

    def __init__(self, name: str, state: PatchState, original):
        self.name = name
        self.block = block_of(name)
        self.state = state
        self.original = original


class FastFairCrossAttnProcessor(_FastFairProcessor):
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
        out = _with_other_rows(out_rec, query, key, value, rows, batch, attn.scale)

        hidden_states = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class FastFairJointAttnProcessor(_FastFairProcessor):
    """SD3's joint attention (image and text tokens in one softmax) with maps: the image queries of the rows
    that count go through ``ops.cross_attention`` over the keys [image; text] (Nk = image tokens + 333: the
    online-softmax path), the maps reading the text columns; everything else through SDPA, as diffusers'
    ``JointAttnProcessor2_0`` computes it. Attribution prompts (open-vocabulary maps) read their own text
    stream's keys (``fastfair.shadow``), whose attention output this layer computes too."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        rec = self.state.recorder
        if rec is None or encoder_hidden_states is None or not rec.active or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        shadows = _pending_shadows(self.state)
        wants = rec.wants(self.block, hidden_states.shape[1])
        if not wants and not shadows:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch, n_img = hidden_states.shape[0], hidden_states.shape[1]
        heads = attn.heads
        head_dim = attn.to_k.out_features // heads

        def split(x):
            return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)

        def text_qkv(states):
            tq, tk, tv = split(attn.add_q_proj(states)), split(attn.add_k_proj(states)), split(attn.add_v_proj(states))
            if attn.norm_added_q is not None:
                tq = attn.norm_added_q(tq)
            if attn.norm_added_k is not None:
                tk = attn.norm_added_k(tk)
            return tq, tk, tv

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq, ck, cv = text_qkv(encoder_hidden_states)
        key, value = torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        rows = rec.rows(batch)
        sqkv = {name: _shadow_projection(sh, text_qkv) for name, sh in shadows.items()}
        if wants:
            out_img = self._record(rec, attn, q, key, value, rows, n_img, heads, sqkv,
                                   lambda name: torch.cat([k[rows], sqkv[name][1]], dim=2), batch)
        else:
            out_img = F.scaled_dot_product_attention(q, key, value, dropout_p=0.0, is_causal=False, scale=attn.scale)
        out_txt = F.scaled_dot_product_attention(cq, key, value, dropout_p=0.0, is_causal=False, scale=attn.scale)

        def merge(x):
            return x.transpose(1, 2).reshape(x.shape[0], -1, heads * head_dim).to(q.dtype)

        for name, sh in shadows.items():  # each attribution prompt's text: its queries over [image; its text]
            sq, sk, sv = sqkv[name]
            if sh.pending[0] == "last":  # SD3's last block writes no text
                sh.attn = ()
                continue
            o = merge(shadow.attend(sh, sq, torch.cat([k[rows], sk], 2), torch.cat([v[rows], sv], 2), attn.scale))
            with torch.set_grad_enabled(sh.grad and torch.is_grad_enabled()):
                sh.attn = attn.to_add_out(o)
        hidden_states = attn.to_out[1](attn.to_out[0](merge(out_img)))
        encoder_hidden_states = merge(out_txt)
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    def _record(self, rec, attn, q, key, value, rows, n_img, heads, sqkv, map_keys_of, batch, text_first=False,
                scale=None):
        """The recorded rows' image attention with their maps (the prompt's text columns, or the attribution
        prompt's shadow keys), the further attribution prompts' maps, the other rows through SDPA."""
        scale = attn.scale if scale is None else scale
        per_head = rec.aggregation.per_head
        reduce = "none" if per_head else "sum"
        off = 0 if text_first else n_img
        if getattr(rec, "map_states", None) is not None and "" not in sqkv:
            raise RuntimeError(f"{self.name}: the attribution prompt's text stream did not reach this layer "
                               "(fastfair.shadow's block hooks are missing: patch the pipeline with fastfair.patch)")
        mk = map_keys_of("") if "" in sqkv else None
        tokens = None if rec.tokens is None else rec.tokens + off  # text columns: the prompt's or the shadow's
        out_rec, maps = ops.cross_attention(q[rows], key[rows], value[rows], map_tokens=tokens, map_keys=mk,
                                            scale=scale, head_reduce=reduce, backend=self.state.backend)
        if maps is not None:
            rec.add(self.name, maps, n_img, heads)
        extras = getattr(rec, "extras", None)
        if extras:  # further attribution prompts: maps only (never differentiated)
            with torch.no_grad():
                q_rec = q[rows].detach()
                for name, sub in extras.items():
                    if name not in sqkv:
                        raise RuntimeError(f"attribution prompt {name!r} has no text stream in {self.name}")
                    sub.add(self.name, ops.attention_maps(q_rec, map_keys_of(name).detach(), sub.tokens + off,
                                                          scale=scale, head_reduce=reduce,
                                                          backend=self.state.backend), n_img, heads)
        return _with_other_rows(out_rec, q, key, value, rows, batch, scale)


class FastFairFluxAttnProcessor(FastFairJointAttnProcessor):
    """Flux: text tokens come first ([text; image]) and RoPE rotates q and k. Double-stream blocks get the
    text as ``encoder_hidden_states``; single-stream blocks get the one sequence, whose text length the
    state remembers from the double-stream blocks of the same call. The image queries of the rows that count
    go through ``ops.cross_attention`` over all keys (maps at the text columns); the rest through SDPA.
    Attribution prompts' text streams (``fastfair.shadow``) take the text positions' rotations."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 *args, **kwargs):
        double = encoder_hidden_states is not None
        if double:
            self.state.n_text = encoder_hidden_states.shape[1]
        n_text = getattr(self.state, "n_text", None)
        rec = self.state.recorder

        def plain():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 *args, **kwargs)

        if rec is None or not rec.active or attention_mask is not None or n_text is None:
            return plain()
        n_img = hidden_states.shape[1] - (0 if double else n_text)
        shadows = _pending_shadows(self.state)
        wants = rec.wants(self.block, n_img)
        if not wants and not shadows:
            return plain()
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if double:
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D)
        batch, scale = q.shape[0], attn.head_dim ** -0.5
        rows = rec.rows(batch)

        def text_qkv(states):  # a text stream's q, k, v as this layer makes them (rotated at the text positions)
            if states.shape[1] != n_text:
                raise RuntimeError(f"attribution prompt's text has {states.shape[1]} tokens, the prompt's {n_text}")
            if double:
                tq, tk, tv = _get_qkv_projections(attn, states[:, :0], states)[3:]
            else:
                tq, tk, tv = _get_qkv_projections(attn, states)[:3]
            tq, tk, tv = (x.unflatten(-1, (-1, attn.head_dim)) for x in (tq, tk, tv))
            tq, tk = (attn.norm_added_q(tq), attn.norm_added_k(tk)) if double else (attn.norm_q(tq), attn.norm_k(tk))
            if image_rotary_emb is not None:
                rot = tuple(f[:n_text] for f in image_rotary_emb)
                tq = apply_rotary_emb(tq, rot, sequence_dim=1)
                tk = apply_rotary_emb(tk, rot, sequence_dim=1)
            return tuple(x.transpose(1, 2) for x in (tq, tk, tv))

        sqkv = {name: _shadow_projection(sh, text_qkv) for name, sh in shadows.items()}
        q_img = q[:, :, n_text:]
        if wants:
            out_img = self._record(rec, attn, q_img, k, v, rows, n_img, attn.heads, sqkv,
                                   lambda name: torch.cat([sqkv[name][1], k[rows, :, n_text:]], dim=2), batch,
                                   text_first=True, scale=scale)
        else:
            out_img = F.scaled_dot_product_attention(q_img, k, v, scale=scale)
        out_txt = F.scaled_dot_product_attention(q[:, :, :n_text], k, v, scale=scale)

        def merge(x):
            return x.transpose(1, 2).flatten(2, 3).to(q.dtype)

        for name, sh in shadows.items():
            sq, sk, sv = sqkv[name]
            o = merge(shadow.attend(sh, sq, torch.cat([sk, k[rows, :, n_text:]], 2),
                                    torch.cat([sv, v[rows, :, n_text:]], 2), scale))
            with torch.set_grad_enabled(sh.grad and torch.is_grad_enabled()):
                sh.attn = attn.to_add_out(o.contiguous()) if double else o
        out = torch.cat([merge(out_txt), merge(out_img)], dim=1)
        if not double:
            return out
        txt, img = out[:, :n_text], out[:, n_text:]
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())


def _pending_shadows(state) -> dict:
    """The attribution prompts' text streams waiting for this block's attention (``fastfair.shadow``)."""
    return {name: sh for name, sh in getattr(state, "shadows", {}).items() if sh.pending is not None}


def _shadow_projection(sh, text_qkv):
    with torch.set_grad_enabled(sh.grad and torch.is_grad_enabled()):
        return text_qkv(sh.pending[1])


def _with_other_rows(out_rec, q, k, v, rows: slice, batch: int, scale: float):
    """The whole batch's attention output: the recorded rows' from the fused op, the other rows' (the CFG half
    whose maps do not count) from SDPA."""
    if rows.start == 0 and rows.stop == batch:
        return out_rec
    other = slice(0, rows.start) if rows.start > 0 else slice(rows.stop, batch)
    out_other = F.scaled_dot_product_attention(q[other], k[other], v[other], dropout_p=0.0, is_causal=False,
                                               scale=scale)
    return torch.cat([out_other, out_rec] if rows.start > 0 else [out_rec, out_other], dim=0)


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
        _prime_backend(backend, denoiser(pipe))
        return pipe._fastfair
    unet = denoiser(pipe)
    if unet is None:
        raise PatchError(f"{type(pipe).__name__} has no UNet or transformer; fastfair patches the attention "
                         "layers that read the prompt (Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux pipelines)")
    mods = text_attention_modules(pipe)
    if not mods:
        raise PatchError(f"{type(unet).__name__} has no cross-attention or joint-attention layer (no text "
                         "conditioning): there are no word maps to capture")
    joint = getattr(pipe, "unet", None) is None
    standard = _STANDARD_JOINT if joint else _STANDARD
    custom = {n: type(m.processor).__name__ for n, m in mods.items() if type(m.processor).__name__ not in standard}
    if custom and not force:
        first = next(iter(custom.items()))
        raise PatchError(f"{len(custom)} attention layers that read the prompt already use a custom processor (e.g. {first[0]}: "
                         f"{first[1]}). fastfair would bypass it while recording maps. Remove it, or call "
                         "patch(pipe, force=True) to accept that; unpatch() restores it either way.")
    unknown = [n for n in mods if block_of(n) == "other"]
    if unknown:  # its maps would silently be left out of every aggregation
        raise PatchError(f"cannot place attention layer {unknown[0]!r} in a UNet block (down / mid / up) or an MMDiT "
                         "block (transformer_blocks / single_transformer_blocks); fastfair supports the diffusers "
                         "layouts of SD 1.x/2.x, SDXL, SD3 and Flux")
    if joint:  # the processors below use diffusers internals that older releases lack
        from .pipelines import require_diffusers

        flux = is_flux(unet)
        require_diffusers("flux" if flux else "sd3", f"fastfair's {'Flux' if flux else 'SD3'} attention processor")
    state = PatchState({n: m.processor for n, m in mods.items()}, backend)
    cls = (FastFairFluxAttnProcessor if is_flux(unet) else FastFairJointAttnProcessor) if joint \
        else FastFairCrossAttnProcessor
    for n, m in mods.items():
        m.set_processor(cls(n, state, state.originals[n]))
    if joint:
        state.shadow_hooks = shadow.ShadowHooks(state, unet)
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
    mods = text_attention_modules(pipe)
    for n, proc in state.originals.items():
        mods[n].set_processor(proc)
    if state.shadow_hooks is not None:
        state.shadow_hooks.remove()
    pipe._fastfair = None
