"""Cost of open-vocabulary maps on an MMDiT (fastfair.shadow): SD3-medium-wide transformer blocks, random weights.

Compares ``fastfair.generate`` on the same pipeline and seeds:
  plain                        no maps (the unpatched pipeline)
  in-prompt maps               2 words of the prompt
  1 attribution prompt         2 words of "... and gender" (one text stream beside the real one)
  3 attribution prompts        gender, race, age in one pass (``attributions=``, what an audit runs)
Each row reports seconds per image and the ratio to plain. The transformer has SD3-medium's width (1536,
24 heads of 64, 16 latent channels, patch 2) with ``--layers`` of its 24 blocks; text encoders and VAE are
tiny-sd3's, so the transformer dominates. Default 512 px: 1024 image tokens against 333 text tokens per stream
(at 1024 px the text share, and the cost of a stream, is four times smaller).

    python bench/bench_mmdit_attribution.py [--layers 2] [--size 512] [--steps 3] [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def build(layers: int, size: int, device: str, dtype):
    from diffusers import SD3Transformer2DModel

    import fastfair

    pipe = fastfair.load_pipeline("tiny-sd3", device="cpu")
    cfg = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    cfg.update(num_layers=layers, attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
               sample_size=size // pipe.vae_scale_factor, pos_embed_max_size=max(96, size // pipe.vae_scale_factor))
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (a 24-block transformer has 2 B parameters)
        pipe.transformer = SD3Transformer2DModel(**cfg).eval()
    return pipe.to(device, dtype)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import fastfair

    if a.threads:
        torch.set_num_threads(a.threads)

    dtype = torch.float16 if a.device.startswith("cuda") else torch.float32
    pipe = build(a.layers, a.size, a.device, dtype)
    prompt = "a photo of the face of a doctor"
    attr = {w: (f"{prompt} and {w}", ["doctor", w]) for w in ("gender", "race", "age")}
    cases = {
        "plain": dict(),
        "in-prompt maps": dict(maps=["doctor", "face"]),
        "1 attribution prompt": dict(maps=["doctor", "gender"], attribution_prompt=attr["gender"][0]),
        "3 attribution prompts": dict(attributions=attr),
    }
    kw = dict(seeds=list(range(a.images)), steps=a.steps, batch_size=a.images, height=a.size, width=a.size,
              progress=False)
    fastfair.generate(pipe, prompt, **kw, **cases["3 attribution prompts"])  # warm-up
    times = {name: [] for name in cases}
    cpu = {name: [] for name in cases}  # process CPU time: steadier than wall time on a shared CPU
    for _ in range(a.repeats):  # interleaved, so that drift hits every case alike
        for name, extra in cases.items():
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            fastfair.generate(pipe, prompt, **kw, **extra)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / a.images)
            cpu[name].append((time.process_time() - c) / a.images)
    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"SD3-medium-wide MMDiT, {a.layers} blocks, {a.size}px ({(a.size // pipe.vae_scale_factor // 2) ** 2} "
          f"image tokens, 333 text tokens), {a.steps} steps, batch {a.images}, {dtype}, {a.device} ({dev}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {a.repeats}")
    print("| case | s / image | x plain | CPU s / image | x plain (CPU time) |\n|---|---|---|---|---|")
    for k, v in best.items():
        print(f"| {k} | {v:.3f} | {v / best['plain']:.2f} | {best_cpu[k]:.3f} | {best_cpu[k] / best_cpu['plain']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "times": times, "cpu_times": cpu, "device": dev}, f, indent=1)


if __name__ == "__main__":
    main()
