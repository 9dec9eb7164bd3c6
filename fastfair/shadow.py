"""Open-vocabulary maps on MMDiTs (SD3, Flux): an attribution prompt's text stream beside the real one.

In a UNet an attribution prompt's keys at a cross-attention layer are ``to_k`` of its encoder states,
the same at every step and layer. An MMDiT has no such keys: its text tokens are a stream of their own
that every block updates, and the update reads the image tokens (joint attention). fastfair therefore
carries each attribution prompt's text through the transformer beside the real text -- its *shadow
stream*:

* it starts as ``context_embedder(attribution prompt's encoder states)``, as the real text does;
* at every block it takes exactly the text-side computation of that block (AdaLN modulation by the
  call's ``temb``, text queries attending over [image; text] keys, gated residual, feed-forward; for
  Flux's single-stream blocks the one-sequence MLP and attention), with the *real* image stream's keys
  and values -- what the block would have made of the attribution prompt's text, given this image;
* the image stream is never changed, so the generated images are the plain pipeline's.

An attribution word's map at a block is then the image queries' joint softmax over [image keys; shadow
text keys] at the word's columns: the attention the image tokens would pay the word had the prompt been
the attribution prompt at this block. For one block and the real prompt's text this is exactly the
in-prompt map (tests/test_mmdit_attribution.py checks the shadow against diffusers' own blocks run on
the attribution prompt's text with the real image tokens, in float64).

Cost: the text tokens only (SD3 333, Flux 512 against 4096 image tokens at 1024 px): per block their
projections, their attention over all keys and their feed-forward.

Gradient checkpointing (guidance with ``checkpointing=True``) re-runs every block in the backward; the
hooks then replay the block's saved shadow input and do not move the stream on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ShadowText:
    """One attribution prompt's text stream through one transformer call."""

    __slots__ = ("h", "inputs", "pending", "attn", "grad")

    def __init__(self, h: torch.Tensor, grad: bool):
        self.h = h              # (N, L, C): the stream before the next block; None after SD3's last block
        self.inputs = {}        # block index -> the stream it read (for the checkpointing replay)
        self.pending = None     # (block kind, normalised text, gates, input) between pre-hook and post-hook
        self.attn = None        # the block's attention output for this stream (from the processor)
        self.grad = grad        # differentiated (guidance's attribution prompt) or maps only


def sources(rec) -> dict:
    """key -> (N, L, C) encoder states of every attribution prompt the recorder reads: "" for its own
    maps' (``map_states``), a name for each further attribution prompt (``extras``)."""
    out = {}
    if getattr(rec, "map_states", None) is not None:
        out[""] = rec.map_states
    for name, sub in getattr(rec, "attribution_recorders", lambda: {})().items():
        out[name] = sub.map_states
    return out


def _block_kind(block) -> str:
    if hasattr(block, "proj_mlp"):  # Flux single-stream block: one sequence [text; image]
        return "single"
    return "last" if getattr(block, "context_pre_only", False) else "double"


def _call_args(args, kwargs, index: int, name: str):
    return kwargs[name] if name in kwargs else args[index]


class ShadowHooks:
    """Forward hooks on an MMDiT (installed by ``processors.patch``) that move the shadow streams.

    ``state.shadows`` (key -> ShadowText) is rebuilt at the first block of every transformer call while a
    recorder with attribution prompts is installed, and is empty otherwise: then every hook returns at once."""

    def __init__(self, state, net):
        self.state = state
        self.handles = []
        blocks = list(net.transformer_blocks) + list(getattr(net, "single_transformer_blocks", []))
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(self._post(i), with_kwargs=True))
        self.embed = net.context_embedder  # not the transformer itself: a torch.compile'd transformer traces these hooks
        state.shadows = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _start(self) -> None:
        """At the first block of a transformer call (a hook on the transformer itself would miss calls of its
        ``forward``, which the guidance makes): one stream per attribution prompt of the installed recorder."""
        st = self.state
        rec = st.recorder
        srcs = sources(rec) if rec is not None and rec.active else {}
        if st.shadows or srcs:  # (no write while nothing is carried: compiled transformers stay side-effect free)
            st.shadows = {}
        emb = self.embed
        for key, states in srcs.items():
            grad = key == "" and torch.is_grad_enabled()
            with torch.set_grad_enabled(grad):
                st.shadows[key] = ShadowText(emb(states.to(emb.weight.dtype)), grad)

    def _replaying(self) -> bool:
        return bool(getattr(self.state.recorder, "replay", False))

    def _pre(self, index: int):
        def hook(block, args, kwargs):
            st = self.state
            replay = self._replaying()
            if index == 0 and not replay:
                self._start()
            if not st.shadows:
                return
            hidden = _call_args(args, kwargs, 0, "hidden_states")
            temb = _call_args(args, kwargs, 2, "temb")
            rows = st.recorder.rows(hidden.shape[0])
            kind = _block_kind(block)
            for sh in st.shadows.values():
                sh.pending, sh.attn = None, None
                if replay:
                    if not sh.grad or index not in sh.inputs:
                        continue  # maps-only streams left nothing for the backward to recompute
                    h = sh.inputs[index]
                else:
                    h = sh.h
                    if sh.grad:
                        sh.inputs[index] = h
                if h is None:
                    continue
                t = temb[rows]
                with torch.set_grad_enabled(sh.grad and torch.is_grad_enabled()):
                    if kind == "single":
                        norm, gate = block.norm(h, emb=t)
                        sh.pending = (kind, norm, (gate,), h)
                    elif kind == "last":
                        sh.pending = (kind, block.norm1_context(h, t), None, h)
                    else:
                        norm, *gates = block.norm1_context(h, emb=t)
                        sh.pending = (kind, norm, tuple(gates), h)
        return hook

    def _post(self, index: int):
        def hook(block, args, kwargs, output):
            st = self.state
            if not st.shadows:
                return
            replay = self._replaying()
            for sh in st.shadows.values():
                if sh.pending is None:
                    continue
                kind, norm, gates, h = sh.pending
                if sh.attn is None:
                    raise RuntimeError(f"block {index}: the attention layer did not serve the attribution prompt's "
                                       "text stream (was its processor replaced after fastfair.patch?)")
                with torch.set_grad_enabled(sh.grad and torch.is_grad_enabled()):
                    new = _advance(block, kind, norm, gates, h, sh.attn)
                sh.pending, sh.attn = None, None
                if not replay:
                    sh.h = new
        return hook


def _advance(block, kind: str, norm, gates, h, attn_out):
    """The block's text-side update of a stream ``h`` given its attention output (diffusers' formulas)."""
    if kind == "last":  # SD3's last block reads the text but writes none
        return None
    if kind == "single":
        (gate,) = gates
        mlp = block.act_mlp(block.proj_mlp(norm))
        out = h + gate.unsqueeze(1) * block.proj_out(torch.cat([attn_out, mlp], dim=2))
    else:
        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = gates
        out = h + c_gate_msa.unsqueeze(1) * attn_out
        n2 = block.norm2_context(out) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        out = out + c_gate_mlp.unsqueeze(1) * block.ff_context(n2)
    if out.dtype == torch.float16 and type(block).__name__.startswith("Flux"):
        out = out.clip(-65504, 65504)  # Flux clips its fp16 streams
    return out


def attend(sh: ShadowText, q_text, k_all, v_all, scale: float):
    """The stream's text queries over all keys (SDPA, as diffusers' processors compute it)."""
    with torch.set_grad_enabled(sh.grad and torch.is_grad_enabled()):
        return F.scaled_dot_product_attention(q_text, k_all, v_all, dropout_p=0.0, is_causal=False, scale=scale)
