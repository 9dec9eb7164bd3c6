"""generate with 4 word maps, eager vs a torch.compile'd UNet: time per call and the maps' agreement.

    python bench/compile_check.py [--device cuda] [--model random-sd15] [--modes default,reduce-overhead]

For a GPU session: whether compiling the UNet (one graph per UNet call; `reduce-overhead` adds CUDA graphs,
which remove the host's per-layer launch cost that dominates fastfair's kernels at SD shapes, bench/RESULTS.md)
keeps the maps equal to eager ones -- CUDA graphs reuse their output memory, so maps recorded from one replay
must not be overwritten by the next -- and what it gains. Prints one row per mode: seconds per generate call
(after a warm-up call that compiles), speed-up over eager, max |maps - eager maps| / max |eager maps|.
On CPU (`--device cpu --model tiny-sd --modes aot_eager`) it checks the script itself.
"""
from __future__ import annotations

import argparse
import time

import torch

import fastfair
from fastfair import bench

PROMPT = "a photo of the face of a doctor"
WORDS = ["doctor", "face", "photo", "a"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="random-sd15")
    ap.add_argument("--modes", default="default,reduce-overhead")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    dev = torch.device(a.device)
    pipe = bench._load(a.model, a.device, "fp16" if dev.type == "cuda" else "fp32")
    kw = dict(seeds=list(range(a.batch)), steps=a.steps, maps=WORDS, batch_size=a.batch, progress=False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run():
        sync()
        t0 = time.perf_counter()
        g = fastfair.generate(pipe, PROMPT, **kw)
        sync()
        return g, time.perf_counter() - t0

    run()
    ref, t_eager = run()
    print(f"{a.model} on {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, batch {a.batch}, "
          f"{a.steps} steps, backend {fastfair.ops.resolve_backend('auto', dev)}")
    print("| UNet | s per generate | x eager | max map diff / max map |")
    print("|---|---|---|---|")
    print(f"| eager | {t_eager:.3f} | 1.00 | 0 |")
    unet = pipe.unet
    for mode in a.modes.split(","):
        torch._dynamo.reset()
        try:
            if mode in ("aot_eager", "eager", "inductor"):
                pipe.unet = torch.compile(unet, backend=mode)
            else:
                pipe.unet = torch.compile(unet, mode=mode)
            t0 = time.perf_counter()
            run()  # compiles
            t_compile = time.perf_counter() - t0
            g, t = run()
            err = max(float((g.maps[w].float() - ref.maps[w].float()).abs().max() / ref.maps[w].float().abs().max())
                      for w in WORDS)
            print(f"| compile {mode} (first call {t_compile:.0f} s) | {t:.3f} | {t_eager / t:.2f} | {err:.2e} |",
                  flush=True)
        except Exception as e:
            print(f"| compile {mode} | error: {type(e).__name__}: {str(e).splitlines()[0][:150]} | | |", flush=True)
        finally:
            pipe.unet = unet


if __name__ == "__main__":
    main()
