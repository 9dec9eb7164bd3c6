"""Fair Diffusion / SEGA in ``fastfair.generate`` against diffusers' ``SemanticStableDiffusionPipeline``.

Compares, at the same prompt, seeds, steps, editing prompts ("a male" reversed, "a female"; BiasMap's
settings: scale 4, warm-up 10, threshold 0.95, momentum 0.3 / 0.6) and batch:
  * diffusers:   SemanticStableDiffusionPipeline (one UNet call of (2 + E) N rows per step), no maps;
  * fastfair:    generate(edit_guidance=SemanticGuidance(...)) (CFG call + an E N-row edit call), no maps;
  * +maps:       the same with 4 word maps of the prompt;
  * +guidance:   BiasMap's mitigated pipeline: + entanglement guidance (doctor:gender, attribution prompt).
Runs alternate after one warm-up each; prints seconds per run, images/s, and peak memory (CUDA:
max_memory_allocated; CPU: growth of the process's peak RSS, which only shows the first run that raises it).

    python bench/bench_fair_diffusion.py [--model sd15-shaped] [--steps 10] [--warmup 10] [--batch 2] [--runs 2]
                                         [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

import fastfair
from fastfair import EntanglementGuidance, SemanticGuidance

PROMPT = "a photo of the face of a doctor"
WORDS = ["photo", "face", "doctor", "a"]
EDITS, REVERSE = ["a male", "a female"], [True, False]
SEGA = dict(scale=4.0, warmup=10, threshold=0.95, momentum_scale=0.3, momentum_beta=0.6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd15-shaped")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--warmup", type=int, default=10, help="SEGA warm-up steps (BiasMap: 10)")
    ap.add_argument("--skip-guidance", action="store_true")
    a = ap.parse_args()
    from diffusers import SemanticStableDiffusionPipeline

    dtype = a.dtype or ("fp16" if a.device.startswith("cuda") else "fp32")
    pipe = fastfair.load_pipeline(a.model, device=a.device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    sem = SemanticStableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                          unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    sem.set_progress_bar_config(disable=True)
    seeds = list(range(a.batch))
    hw = fastfair.processors.default_sample_size(pipe)
    lat = torch.cat([fastfair.generation._initial_latents(pipe, s, (hw, hw), pipe.device) for s in seeds])
    SEGA["warmup"] = a.warmup
    sega = SemanticGuidance(EDITS, reverse=REVERSE, **SEGA)
    cuda = a.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def diffusers_sem():
        sem([PROMPT] * a.batch, latents=lat.clone(), num_inference_steps=a.steps, output_type="pil",  # decoded, as fastfair
            editing_prompt=EDITS, reverse_editing_direction=REVERSE, edit_guidance_scale=SEGA["scale"],
            edit_warmup_steps=SEGA["warmup"], edit_threshold=SEGA["threshold"],
            edit_momentum_scale=SEGA["momentum_scale"], edit_mom_beta=SEGA["momentum_beta"])

    def ff(maps=(), guidance=None):
        return lambda: fastfair.generate(pipe, PROMPT, seeds=seeds, steps=a.steps, maps=list(maps), progress=False,
                                         batch_size=a.batch, backend=a.backend, edit_guidance=sega, guidance=guidance)

    cases = {"diffusers": diffusers_sem, "fastfair": ff(), "+maps": ff(WORDS)}
    if not a.skip_guidance:
        cases["+guidance"] = ff(WORDS, EntanglementGuidance("doctor", "gender",
                                                            attribution_prompt=PROMPT + " and gender"))
    times = {k: [] for k in cases}
    peak = {}
    for k, fn in cases.items():  # warm-up, and the peak memory of each case
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn()
        sync()
        peak[k] = ((torch.cuda.max_memory_allocated() - base) if cuda else
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20
    for _ in range(a.runs):
        for k, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    dev = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"{a.model} {dtype}, {a.steps} steps ({type(pipe.scheduler).__name__}), batch {a.batch}, 2 editing prompts, "
          f"{dev}, load average {os.getloadavg()[0]:.2f}")
    print("| case | s per run | images/s | x diffusers time | peak MB |")
    print("|---|---|---|---|---|")
    ref = statistics.median(times["diffusers"])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"| {k} | {' / '.join(f'{x:.2f}' for x in v)} | {a.batch / m:.3f} | {m / ref:.3f} | {peak[k]:.0f} |")


if __name__ == "__main__":
    main()
