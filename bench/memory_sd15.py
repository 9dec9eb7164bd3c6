"""Peak host memory of generation on the `sd15-shaped` preset (CPU): plain diffusers vs fastfair maps vs DAAM.

What it compares: the peak resident-set growth during one generation (64x64 latent, CFG, batch 1),
for (a) the unpatched pipeline, (b) fastfair.generate with maps for 4 words, (c) DAAM 0.2.0's trace
when daam is installed. Each mode runs in a fresh subprocess; the kernel's high-water mark (VmHWM)
is reset after loading and a one-step warm-up run of the same mode, so the number is the growth caused by generation itself.

    python bench/memory_sd15.py [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

PROMPT = "a photo of the face of a doctor"
WORDS = ["photo", "face", "doctor", "a"]


from fastfair.bench import _kb as _rss_kb  # noqa: E402  (the workloads are fastfair.bench's, shared)


def child(mode: str, steps: int) -> None:
    import gc

    import torch

    import fastfair

    torch.set_num_threads(2)
    pipe = fastfair.load_pipeline("sd15-shaped")
    from fastfair.bench import _workload

    name = {"plain": "gen-plain", "fastfair": "gen-maps", "daam": "gen-daam"}[mode]

    def run(steps: int) -> None:  # one image, seed 0; maps for WORDS (fastfair.bench.WORDS)
        _workload(pipe, name, 1, steps, 1)()

    run(1)  # warm-up of the same code path: first-use imports and allocator pools are not counted
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM
    base = _rss_kb("VmRSS")
    run(steps)
    peak = _rss_kb("VmHWM")
    print(json.dumps({"mode": mode, "base_mb": base / 1024, "peak_growth_mb": (peak - base) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.steps)
    rows = []
    modes = ["plain", "fastfair"]
    try:
        import daam  # noqa: F401

        modes.append("daam")
    except ImportError:
        pass
    for m in modes:
        out = subprocess.run([sys.executable, __file__, "--child", m, "--steps", str(a.steps)], capture_output=True,
                             text=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain = next(r["peak_growth_mb"] for r in rows if r["mode"] == "plain")
    print(f"sd15-shaped, 64x64 latent, CFG, {a.steps} DDIM steps, CPU, peak RSS growth during generation")
    print("| mode | peak growth (MB) | ratio to plain |\n|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_growth_mb']:.0f} | {r['peak_growth_mb'] / plain:.3f} |")


if __name__ == "__main__":
    main()
