"""Peak host memory of one adjusted-DFT training step on `sd15-shaped` (CPU): fastfair's attention vs diffusers'.

One DFT step = sample N images with gradients (CFG, the UNet fed detached latents), decode, classify, alignment
loss, backward, AdamW. Modes, each in a fresh subprocess:

* ``fastfair``: the pipeline patched by fastfair; every cross-attention runs through ``fastfair.ops`` (the
  reference backend on CPU), whose backward recomputes the probabilities from the saved log-sum-exp;
* ``diffusers``: diffusers' default processor (``AttnProcessor2_0``, ``scaled_dot_product_attention``);
* ``diffusers-classic``: diffusers' ``AttnProcessor`` on the cross-attention layers (explicit softmax; autograd keeps
  the probabilities).

Self-attention is diffusers' in every mode. The kernel's high-water mark (VmHWM) is reset after loading and a
warm-up step of the same mode, so the number is the growth caused by the measured step.

    python bench/bench_dft.py [--images 2] [--sampling-steps 2] [--checkpointing both]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PROMPT = "a photo of the face of a doctor"


from fastfair.bench import _kb as _rss_kb  # noqa: E402  (the DFT workload is fastfair.bench's, shared)


def child(mode: str, images: int, sampling_steps: int, checkpointing: bool) -> None:
    import gc

    import torch

    import fastfair
    from fastfair.bench import _workload

    torch.set_num_threads(2)
    pipe = fastfair.load_pipeline("sd15-shaped")
    if mode == "diffusers-classic":
        from diffusers.models.attention_processor import AttnProcessor

        from fastfair.processors import cross_attention_modules

        for m in cross_attention_modules(pipe.unet).values():  # cross-attention only, like fastfair's patch
            m.set_processor(AttnProcessor())
    step = _workload(pipe, "dft-fastfair" if mode == "fastfair" else "dft-diffusers", images, sampling_steps, images,
                     checkpointing=checkpointing)
    step()  # warm-up of the same code path: first-use imports and allocator pools are not counted
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM
    base = _rss_kb("VmRSS")
    t = time.perf_counter()
    rec = step()
    dt = time.perf_counter() - t
    peak = _rss_kb("VmHWM")
    print(json.dumps({"mode": mode, "checkpointing": checkpointing, "base_mb": base / 1024,
                      "peak_growth_mb": (peak - base) / 1024, "step_s": dt, "loss": rec["loss"]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2, help="N images per step (CFG doubles the UNet batch)")
    ap.add_argument("--sampling-steps", type=int, default=2)
    ap.add_argument("--checkpointing", default="both", choices=("on", "off", "both"))
    ap.add_argument("--modes", default="fastfair,diffusers,diffusers-classic")
    ap.add_argument("--child", default=None)
    ap.add_argument("--ckpt", type=int, default=1)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.images, a.sampling_steps, bool(a.ckpt))
    rows = []
    cks = {"on": [1], "off": [0], "both": [1, 0]}[a.checkpointing]
    for ck in cks:
        for m in a.modes.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", m, "--images", str(a.images), "--sampling-steps",
                                  str(a.sampling_steps), "--ckpt", str(ck)], capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"sd15-shaped, 512x512 (64x64 latent), {a.images} images x {a.sampling_steps} DPM-Solver++ steps, CFG, "
          "text-encoder LoRA r=4, one DFT step, CPU, peak RSS growth")
    print("| attention | gradient checkpointing | peak growth (MB) | step (s) | loss |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {'on' if r['checkpointing'] else 'off'} | {r['peak_growth_mb']:.0f} | "
              f"{r['step_s']:.1f} | {r['loss']:.6f} |")


if __name__ == "__main__":
    main()
