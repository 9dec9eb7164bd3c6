"""Time of ``fastfair.generate`` with word maps against the unpatched pipeline (issue 4's end-to-end target:
within 1.10x). Same prompt, seed, steps and batch; runs alternate after one warm-up of each.

    python bench/bench_generate_overhead.py [--model sd15-shaped] [--steps 10] [--runs 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fastfair

PROMPT = "a photo of the face of a doctor"
WORDS = ["photo", "face", "doctor", "a"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd15-shaped")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto")
    a = ap.parse_args()
    pipe = fastfair.load_pipeline(a.model, device=a.device)
    pipe.set_progress_bar_config(disable=True)

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain():
        pipe(PROMPT, num_inference_steps=a.steps, generator=torch.Generator(a.device).manual_seed(0),
             output_type="latent")

    def maps():
        fastfair.generate(pipe, PROMPT, seeds=[0], steps=a.steps, maps=WORDS, backend=a.backend, progress=False)

    times = {"plain": [], "maps": []}
    plain(), maps()
    for _ in range(a.runs):
        for name, fn in (("plain", plain), ("maps", maps)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    load = os.getloadavg()[0]
    print(f"{a.model}, {a.steps} DDIM steps, batch 1, device {a.device}, backend {a.backend} "
          f"({fastfair.ops.resolve_backend(a.backend, torch.device(a.device))}), torch threads {torch.get_num_threads()}, "
          f"load average {load:.2f}")
    for k, v in times.items():
        print(f"{k:6s} " + " / ".join(f"{x:.2f}" for x in v) + f" s (median {statistics.median(v):.2f})")
    print(f"ratio of medians maps/plain: {statistics.median(times['maps']) / statistics.median(times['plain']):.3f}x")


if __name__ == "__main__":
    main()
