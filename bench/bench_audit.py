"""Audit throughput (images/s) with attention maps against the same generation without maps.

Three timings over the same prompts x seeds on one pipeline (default ``sd15-shaped``: SD1.5's UNet
topology, 64x64 latent, 16 cross-attention layers):

* ``generate``: ``fastfair.generate`` without maps -- the plain pipeline (the baseline);
* ``audit, no maps``: ``fastfair.audit`` with ``entanglement="none"`` (generation + PNG + Parquet);
* ``audit, maps``: ``fastfair.audit`` with open-vocabulary entanglement for the ``--attributes``
  (default "gender"; maps of the profession and the attribute word, IoU@p70, SoftIoU, map shard,
  PNG, Parquet). Every attribute word's attribution prompt is read from the neutral image's one
  generation, so ``--attributes gender,race,age`` should cost about what "gender" alone does.

The classifier is off in all three so that only the map machinery differs. One warm-up batch runs
first. Usage::

    python bench/bench_audit.py                       # sd15-shaped, 4 images, 4 steps, CPU
    python bench/bench_audit.py --model tiny-sd --images 8 --steps 10 --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15-shaped")
    ap.add_argument("--images", type=int, default=4, help="images per timing (professions x seeds)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--attributes", default="gender", help="attribute sets of the open-vocabulary audit")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import fastfair
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    pipe = fastfair.load_pipeline(args.model, device=device, dtype=dtype)
    profs = ["doctor", "nurse"]
    seeds = max(1, args.images // len(profs))
    n = seeds * len(profs)
    prompts = [f"a photo of the face of a {p}" for p in profs]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # warm-up (weights paged in, kernels chosen)
    fastfair.generate(pipe, prompts[0], seeds=[10_000], steps=args.steps, maps=["doctor", "gender"],
                      attribution_prompt=prompts[0] + " and gender", batch_size=1, progress=False)
    results = {}
    sync()
    t = time.perf_counter()
    fastfair.generate(pipe, prompts, seeds=range(seeds), steps=args.steps, batch_size=args.batch_size, progress=False)
    sync()
    results["generate"] = time.perf_counter() - t
    tmp = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    try:
        # warm-up of the audit's own imports (pyarrow, pandas, safetensors writer)
        fastfair.audit(args.model, "list:doctor", pipeline=pipe, attributes="gender", seeds=[10_000], steps=args.steps,
                       entanglement="open", classifier="none", report=False, progress=False, n_boot=10,
                       out=tmp / "warmup")
        for name, ent in (("audit, no maps", "none"), ("audit, maps", "open")):
            sync()
            t = time.perf_counter()
            fastfair.audit(args.model, "list:" + ",".join(profs), pipeline=pipe, attributes=args.attributes, seeds=seeds,
                           steps=args.steps, batch_size=args.batch_size, entanglement=ent, classifier="none",
                           report=False, progress=False, n_boot=100, out=tmp / name.replace(", ", "-"))
            sync()
            results[name] = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = {k: {"seconds": v, "images_per_s": n / v} for k, v in results.items()}
    base = rows["generate"]["images_per_s"]
    for r in rows.values():
        r["vs_generate"] = r["images_per_s"] / base
    meta = {"model": args.model, "device": device, "dtype": dtype, "images": n, "steps": args.steps,
            "attributes": args.attributes,
            "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine()}
    print(f"{args.model} on {device} ({dtype}), {n} images, {args.steps} steps, batch {args.batch_size}, "
          f"{meta['torch_threads']} threads, attributes {args.attributes}")
    print(f"{'':16s} {'seconds':>8s} {'images/s':>9s} {'vs generate':>12s}")
    for k, r in rows.items():
        print(f"{k:16s} {r['seconds']:8.2f} {r['images_per_s']:9.4f} {r['vs_generate']:12.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
