"""Engine checks and figures on a CUDA device (run by bench/gpu_all.sh on a lent GPU).

1. tiny-sd on CUDA: generate() without maps equals the plain pipeline; maps from the triton backend
   equal the reference backend's.
2. sd15-shaped on CUDA, fp16, 64x64 latent, CFG: peak GPU memory (max_memory_allocated growth) and
   time of the plain pipeline vs generate() with maps for 4 words, per backend.
Prints markdown; also writes JSON to --json.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fastfair

PROMPT = "a photo of the face of a doctor"
WORDS = ["photo", "face", "doctor", "a"]


def peak(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    # 1. correctness on tiny-sd
    pipe = fastfair.load_pipeline("tiny-sd", device="cuda")
    plain = pipe(PROMPT, num_inference_steps=5, generator=torch.Generator("cuda").manual_seed(0), output_type="latent").images
    g0 = fastfair.generate(pipe, PROMPT, seeds=[0], steps=5, progress=False)
    res["tiny_sd_nomaps_max_abs_latent_diff"] = float((g0.latents.cuda() - plain).abs().max())
    gr = fastfair.generate(pipe, PROMPT, seeds=[0, 1], steps=5, maps=["doctor", "face"], backend="reference", progress=False)
    gt = fastfair.generate(pipe, PROMPT, seeds=[0, 1], steps=5, maps=["doctor", "face"], backend="triton", progress=False)
    res["tiny_sd_triton_vs_reference_max_abs_map_diff"] = max(float((gr.maps[w] - gt.maps[w]).abs().max()) for w in gr.maps)
    res["tiny_sd_triton_vs_reference_max_abs_latent_diff"] = float((gr.latents - gt.latents).abs().max())
    # 2. memory and time on sd15-shaped, fp16
    pipe = fastfair.load_pipeline("sd15-shaped", device="cuda", dtype=torch.float16)
    rows = []
    for batch in (1, 8):
        def run_plain():
            pipe([PROMPT] * batch, num_inference_steps=a.steps, generator=[torch.Generator("cuda").manual_seed(s) for s in range(batch)])

        run_plain()
        m, t = peak(run_plain)
        rows.append(dict(mode="plain diffusers", batch=batch, peak_mb=m, s=t))
        for backend in ("reference", "triton"):
            def run_ff():
                fastfair.generate(pipe, PROMPT, seeds=list(range(batch)), steps=a.steps, maps=WORDS, batch_size=batch,
                                  backend=backend, progress=False)

            run_ff()
            m, t = peak(run_ff)
            rows.append(dict(mode=f"fastfair maps x4 ({backend})", batch=batch, peak_mb=m, s=t))
    res["sd15_shaped"] = rows
    print(f"device: {res['device']}, torch {res['torch']}")
    for k, v in res.items():
        if k.startswith("tiny"):
            print(f"- {k}: {v:.3g}")
    print(f"\nsd15-shaped, fp16, 64x64 latent, CFG, {a.steps} DDIM steps; peak = growth of torch.cuda.max_memory_allocated")
    print("| mode | batch | peak MB | ratio to plain | seconds | ratio to plain |\n|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["mode"] == "plain diffusers")
        print(f"| {r['mode']} | {r['batch']} | {r['peak_mb']:.1f} | {r['peak_mb'] / base['peak_mb']:.3f} | "
              f"{r['s']:.3f} | {r['s'] / base['s']:.2f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
