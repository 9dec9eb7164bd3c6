"""The ``fastfair`` command."""
from __future__ import annotations

import argparse
import itertools
import sys

DTYPES = ("fp32", "fp16", "bf16")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images with per-word cross-attention maps",
                       description="Generate images for every prompt x seed, capture per-word cross-attention maps, "
                                   "write images, maps (safetensors) and heat-map overlays, and print the IoU of "
                                   "every pair of words per image.")
    p.add_argument("--model", default="tiny-sd",
                   help="offline preset (tiny-sd, tiny-sdxl, sd15-shaped), a hub id or a local pipeline folder")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--maps", default="", help="comma-separated words to map, e.g. doctor,face")
    p.add_argument("--attribution-prompt", default=None,
                   help='open-vocabulary maps: words are looked up in this prompt, e.g. "a photo of a doctor and gender"')
    p.add_argument("--seeds", default="0", help="seeds: 0-3, or 0,2,5")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--aggregation", default="fastfair", choices=("fastfair", "daam", "biasmap"))
    p.add_argument("--percentile", type=float, default=70.0, help="IoU binarisation percentile")
    p.add_argument("--backend", default="auto", help="auto, reference, triton or native")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--guide", default=None, metavar="SEM:DEM[,SEM:DEM]",
                   help="entanglement guidance (BiasMap), e.g. doctor:gender; uses --attribution-prompt if given")
    p.add_argument("--guide-scale", type=float, default=100.0)
    p.add_argument("--guide-max-grad-norm", type=float, default=1.0)
    p.add_argument("--guide-on-large-grad", default="skip", choices=("skip", "clip"))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true")


def _generate(args) -> int:
    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from .generation import generate
    from .pipelines import load_pipeline

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    guidance = None
    if args.guide:
        from .guidance import EntanglementGuidance

        guidance = EntanglementGuidance.parse(args.guide, attribution_prompt=args.attribution_prompt,
                                              scale=args.guide_scale, max_grad_norm=args.guide_max_grad_norm,
                                              on_large_grad=args.guide_on_large_grad)
    pipe = load_pipeline(args.model, device=device, dtype=dtype)
    gen = generate(pipe, args.prompt, seeds=args.seeds, maps=args.maps, attribution_prompt=args.attribution_prompt,
                   steps=args.steps, guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                   batch_size=args.batch_size, aggregation=args.aggregation, backend=args.backend,
                   guidance=guidance, progress=not args.no_progress)
    out = gen.save(args.out)
    words = list(gen.maps)
    pairs = list(itertools.combinations(words, 2))
    if pairs:
        head = ["item", "seed", "prompt"] + [f"IoU({a},{b})" for a, b in pairs]
        ious = [gen.iou(a, b, args.percentile) for a, b in pairs]
        print("\t".join(head))
        for i in range(len(gen)):
            print("\t".join([str(i), str(gen.seeds[i]), gen.prompts[i]] + [f"{float(v[i]):.4f}" for v in ious]))
    if gen.diagnostics:
        d = gen.diagnostics
        print(f"guidance: {int(d['applied'].sum())} of {d['applied'].numel()} image-steps updated, "
              f"{int(d['nonfinite'].sum())} non-finite; energy {d['energy'][0].mean():.4f} -> {d['energy'][-1].mean():.4f}")
    print(f"wrote {len(gen)} images{', maps and overlays' if words else ''} to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastfair", description="Find and reduce social bias in text-to-image "
                                     "diffusion models, with fused cross-attention map kernels.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    _add_generate(sub)
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return {"generate": _generate}[args.command](args)
    except (ValueError, KeyError, RuntimeError, FloatingPointError) as e:
        print(f"fastfair {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
