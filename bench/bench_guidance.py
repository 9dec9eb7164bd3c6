"""Guided sampling throughput and memory: fastfair (batched, fused op backward) vs a reference-style
implementation (one image at a time, autograd through explicit softmax probabilities, as BiasMap's code does).

Both run BiasMap's rule (SoftIoU of the semantic and demographic maps with Sinkhorn top-k masks,
gradient to the latents, eps += scale*sqrt(1-abar)*g when ||g|| < 1) on the same pipeline.
Each mode runs in a fresh subprocess; peak memory is the growth of the resident set (VmHWM, reset
after a one-step warm-up of the same mode) divided by the images in flight.

    python bench/bench_guidance.py [--model sd15-shaped] [--batch 8] [--steps 5] [--device cpu]

Each row also gives the machine's 1-minute load average when the timed run started and ended: on a
shared CPU the two modes run minutes apart, and a ratio measured under different loads means little.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPT = "a photo of the face of a doctor"


def _kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


# the reference style (one image at a time, explicit probabilities) is shared with `fastfair bench`
from fastfair.bench import ExplicitProcessor, reference_style  # noqa: E402,F401


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
    load0 = os.getloadavg()[0]
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
                          peak_mb_per_image=peak_mb / in_flight, load=[load0, os.getloadavg()[0]])))


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
    print("| implementation | images/s | peak MB per image in flight | 1-min load average (start, end) |\n|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['images_per_s']:.3f} | {v['peak_mb_per_image']:.0f} | {v['load'][0]:.2f}, {v['load'][1]:.2f} |")
    print(f"throughput ratio fastfair/reference-style: {f['images_per_s'] / r['images_per_s']:.2f}x; "
          f"peak memory per image ratio: {f['peak_mb_per_image'] / r['peak_mb_per_image']:.2f}x")


if __name__ == "__main__":
    main()
