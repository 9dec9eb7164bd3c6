"""Guided sampling throughput and memory: fastfair (batched, fused op backward) vs a reference-style
implementation (one image at a time, autograd through explicit softmax probabilities, as BiasMap's code does).

Both run BiasMap's rule (SoftIoU of the semantic and demographic maps with Sinkhorn top-k masks,
gradient to the latents, eps += scale*sqrt(1-abar)*g when ||g|| < 1) on the same pipeline.
Each mode runs in a fresh subprocess; peak memory is the growth of the resident set (VmHWM, reset
after a one-step warm-up of the same mode) divided by the images in flight.

    python bench/bench_guidance.py [--model sd15-shaped] [--batch 8] [--steps 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

PROMPT = "a photo of the face of a doctor"


def _kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


class ExplicitProcessor:
    """attn2 with explicit probabilities kept in the autograd graph (DAAM / prompt-to-prompt / BiasMap style)."""

    def __init__(self, name, store):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        import torch

        b = hidden_states.shape[0]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        p = attn.get_attention_scores(q, k, None)
        if not self.name.startswith("mid"):
            self.store.append(p.reshape(b, attn.heads, *p.shape[1:]))
        return attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(p, v))))


def reference_style(pipe, seed, steps, sem, dem, scale=100.0):
    import torch
    import torch.nn.functional as F

    from fastfair.kernels import naive
    from fastfair.processors import cross_attention_modules

    store = []
    mods = cross_attention_modules(pipe.unet)
    saved = {n: m.processor for n, m in mods.items()}
    for n, m in mods.items():
        m.set_processor(ExplicitProcessor(n, store))
    try:
        dev = pipe.device
        emb, neg = pipe.encode_prompt(PROMPT, dev, 1, True)
        ehs = torch.cat([neg, emb])
        H = pipe.unet.config.sample_size
        x = torch.randn(1, 4, H, H, generator=torch.Generator(dev).manual_seed(seed), device=dev)
        pipe.scheduler.set_timesteps(steps)
        x = x * pipe.scheduler.init_noise_sigma
        for t in pipe.scheduler.timesteps:
            store.clear()
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                inp = pipe.scheduler.scale_model_input(torch.cat([x, x]), t)
                eps = pipe.unet(inp, t, encoder_hidden_states=ehs, return_dict=False)[0]
                maps = {}
                for pos in (sem, dem):
                    acc = 0
                    for p in store:
                        m = p[1:, :, :, pos].sum(1)  # cond row, sum over heads
                        s = int(round(math.sqrt(H * H / m.shape[-1])))
                        acc = acc + F.interpolate(m.reshape(1, 1, H // s, H // s), size=(H, H), mode="bilinear")
                    maps[pos] = acc.reshape(1, -1)
                E = naive.soft_iou(maps[sem], maps[dem], 0.3, 0.01, 20, 1e-8)
                g = torch.autograd.grad(E.sum(), x)[0]
            eps = eps.detach()
            eps = eps[:1] + 7.5 * (eps[1:] - eps[:1])
            if g.norm() < 1.0:
                abar = pipe.scheduler.alphas_cumprod[int(t)]
                eps = eps + scale * float(1 - abar) ** 0.5 * g
            x = pipe.scheduler.step(eps, t, x.detach(), return_dict=False)[0]
        with torch.no_grad():
            img = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return img
    finally:
        for n, m in mods.items():
            m.set_processor(saved[n])


def child(mode, model, batch, steps, device):
    import gc

    import torch

    import fastfair

    pipe = fastfair.load_pipeline(model, device=device)
    guide = fastfair.EntanglementGuidance("doctor", "face")
    sem, dem = 8, 5  # key positions of "doctor" and "face" in PROMPT

    def run(n_steps, n_imgs):
        if mode == "fastfair":
            fastfair.generate(pipe, PROMPT, seeds=list(range(n_imgs)), steps=n_steps, batch_size=batch,
                              guidance=guide, progress=False)
        else:
            for s in range(n_imgs):
                reference_style(pipe, s, n_steps, sem, dem)

    run(1, batch)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _kb("VmRSS")
    t0 = time.perf_counter()
    run(steps, batch)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    in_flight = batch if mode == "fastfair" else 1
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak_mb = (_kb("VmHWM") - base) / 1024
    print(json.dumps(dict(mode=mode, images_per_s=batch / dt, seconds=dt, peak_mb=peak_mb,
                          peak_mb_per_image=peak_mb / in_flight)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd15-shaped")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.model, a.batch, a.steps, a.device)
    rows = {}
    for mode in ("reference-style", "fastfair"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", a.model, "--batch", str(a.batch),
                              "--steps", str(a.steps), "--device", a.device], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            sys.exit(1)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    r, f = rows["reference-style"], rows["fastfair"]
    mem = "GPU max_memory_allocated growth" if a.device == "cuda" else "peak RSS growth"
    print(f"guided sampling, {a.model}, {a.steps} DDIM steps, {a.batch} images, device {a.device}; memory = {mem}")
    print("| implementation | images/s | peak MB per image in flight |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['images_per_s']:.3f} | {v['peak_mb_per_image']:.0f} |")
    print(f"throughput ratio fastfair/reference-style: {f['images_per_s'] / r['images_per_s']:.2f}x; "
          f"peak memory per image ratio: {f['peak_mb_per_image'] / r['peak_mb_per_image']:.2f}x")


if __name__ == "__main__":
    main()
