"""The ``fastfair`` command."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

DTYPES = ("fp32", "fp16", "bf16")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate images with per-word cross-attention maps",
                       description="Generate images for every prompt x seed, capture per-word cross-attention maps, "
                                   "write images, maps (safetensors) and heat-map overlays, and print the IoU of "
                                   "every pair of words per image.")
    p.add_argument("--model", default="tiny-sd",
                   help="offline preset (tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux, sd15-shaped), a hub id or a local "
                        "pipeline folder")
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeat for several)")
    p.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="prompts, one per line (blank lines and '#' comments skipped), after any --prompt")
    p.add_argument("--maps", default="", help="comma-separated words to map, e.g. doctor,face")
    p.add_argument("--attribution-prompt", default=None,
                   help='open-vocabulary maps: words are looked up in this prompt, e.g. "a photo of a doctor and gender"')
    p.add_argument("--attribution", nargs=3, action="append", default=None, metavar=("NAME", "PROMPT", "WORDS"),
                   help="further open-vocabulary maps from the same images (repeat for several), e.g. "
                        '--attribution race "a photo of a doctor and race" doctor,race')
    p.add_argument("--seeds", default="0", help="seeds: 0-3, or 0,2,5")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="default 7.5; on SD3 7.0 and on Flux 3.5 (the pipelines' own defaults); "
                        "FLUX.1-schnell has no guidance input (recorded as none)")
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
    p.add_argument("--guide-branch", default="cond", choices=("cond", "uncond"),
                   help="CFG half whose maps guide (BiasMap's released code reads the unconditional one)")
    p.add_argument("--edit", default=None, metavar="PATH",
                   help="apply a MIST edit (fastfair edit mist --out PATH) to the model before generating")
    _add_finetuned_args(p, "generating")
    _add_sega_args(p)
    p.add_argument("--negative-prompt", default=None, help="negative prompt (classifier-free guidance's other branch)")
    p.add_argument("--out", type=_path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier generation's outputs in --out (otherwise such a folder is refused)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted generation in --out (each finished batch is kept on disk)")
    p.add_argument("--no-progress", action="store_true")


def _add_sega_args(p) -> None:
    g = p.add_argument_group("semantic guidance (SEGA) / Fair Diffusion")
    g.add_argument("--fair-diffusion", default=None, metavar="PRESET[,PRESET]",
                   help="Fair Diffusion with BiasMap's editing prompts: gender, race, or gender,race for the "
                        "intersections (each image is steered to one group of each, chosen by its seed)")
    g.add_argument("--fair-target", default=None, metavar="GROUP=P,...",
                   help="Fair Diffusion target distribution, e.g. female=0.75,male=0.25 (groups drawn per seed; "
                        "default: alternate by seed parity, as BiasMap)")
    g.add_argument("--sega-toward", action="append", default=None, metavar="TEXT",
                   help="SEGA: steer towards this concept (repeat for several)")
    g.add_argument("--sega-away", action="append", default=None, metavar="TEXT",
                   help="SEGA: steer away from this concept (repeat for several)")
    g.add_argument("--sega-scale", type=float, default=None, help="edit scale (SEGA 5, Fair Diffusion 4)")
    g.add_argument("--sega-warmup", type=int, default=None, help="steps before the edit applies (10)")
    g.add_argument("--sega-threshold", type=float, default=None,
                   help="quantile of |edit| below which it is dropped (SEGA 0.9, Fair Diffusion 0.95)")
    g.add_argument("--sega-momentum", type=float, default=None, help="momentum scale (SEGA 0.1, Fair Diffusion 0.3)")
    g.add_argument("--sega-beta", type=float, default=None, help="momentum beta (SEGA 0.4, Fair Diffusion 0.6)")


def _edit_guidance(args):
    """The SEGA / Fair Diffusion object the flags describe, or None."""
    from .sega import FairDiffusion, JointFairDiffusion, SemanticGuidance

    opts = {k: v for k, v in dict(scale=args.sega_scale, warmup=args.sega_warmup, threshold=args.sega_threshold,
                                  momentum_scale=args.sega_momentum, momentum_beta=args.sega_beta).items()
            if v is not None}
    sega = (args.sega_toward or []) + (args.sega_away or [])
    if args.fair_diffusion and sega:
        raise ValueError("--fair-diffusion chooses its own editing prompts; drop --sega-toward / --sega-away")
    if args.fair_target and not args.fair_diffusion:
        raise ValueError("--fair-target needs --fair-diffusion gender|race")
    if args.fair_diffusion:
        target = None
        if args.fair_target:
            target = {}
            for part in args.fair_target.split(","):
                k, sep, v = part.partition("=")
                try:
                    p = float(v)
                except ValueError:
                    sep = ""
                if not sep or not k.strip():
                    raise ValueError(f"--fair-target expects GROUP=P pairs like female=0.75,male=0.25; got {part!r}")
                if k.strip() in target:
                    raise ValueError(f"--fair-target names {k.strip()!r} twice; give each group once")
                target[k.strip()] = p
        names = [n.strip() for n in args.fair_diffusion.split(",") if n.strip()]
        if len(set(names)) != len(names):
            raise ValueError(f"--fair-diffusion names an attribute twice: {args.fair_diffusion!r}")
        parts = []
        for n in names:
            mine = None
            if target is not None:  # each attribute gets the groups of its own
                labels = set(FairDiffusion.preset(n).labels)
                mine = {k: v for k, v in target.items() if k in labels} or None
            parts.append(FairDiffusion.preset(n, target=mine, assign="random" if target else "parity", **opts))
        if target is not None:
            known = {k for p in parts for k in p.labels}
            unknown = sorted(set(target) - known)
            if unknown:
                raise ValueError(f"--fair-target names groups {unknown} of none of {names} (groups: {sorted(known)})")
        return parts[0] if len(parts) == 1 else JointFairDiffusion(*parts)
    if sega:
        return SemanticGuidance(sega, reverse=[False] * len(args.sega_toward or []) + [True] * len(args.sega_away or []),
                                **opts)
    if opts:
        raise ValueError("--sega-* settings need --sega-toward / --sega-away or --fair-diffusion")
    return None


def _add_finetuned_args(p, doing: str) -> None:
    p.add_argument("--lora", default=None, metavar="DIR",
                   help=f"load a LoRA (e.g. fastfair finetune dft's OUT/lora) before {doing}; the run's settings "
                        "name the model as MODEL+lora:<hash>, so before/after runs never mix")
    p.add_argument("--soft-tokens", default=None, metavar="FILE",
                   help=f"load DFT soft tokens (OUT/soft_tokens.safetensors or soft_tokens-ema.safetensors) before "
                        f"{doing} and start every prompt with them; the model is named MODEL+soft:<hash>")
    p.add_argument("--token", default=None,
                   help="the soft tokens' placeholder (default: the one the file or its run's dft.json names; SD3 / "
                        "Flux files hold k tokens, named <TOKEN_0> ... <TOKEN_k-1> when --token TOKEN is given)")


def _check_finetuned_args(args, texts=()) -> None:
    """--lora / --soft-tokens / --token checked before any model loads: paths that exist and are what they say,
    --token only with --soft-tokens and never inside a prompt (diffusers would rewrite the word that holds it)."""
    from pathlib import Path

    if args.token and not args.soft_tokens:
        raise ValueError("--token names the placeholder of --soft-tokens: give --soft-tokens FILE too")
    if args.token is not None and (not args.token.strip() or any(c in args.token for c in "{} ")):
        raise ValueError(f"--token {args.token!r}: give one word without spaces or braces, e.g. '<fastfair>'")
    if args.lora:
        p = Path(args.lora)
        if not p.exists():
            raise ValueError(f"--lora {args.lora!r} does not exist (fastfair finetune dft writes OUT/lora)")
        if p.is_dir() and (p / "dft.json").exists():
            raise ValueError(f"--lora {args.lora!r} is a DFT run folder: give its LoRA, {str(p / 'lora')!r} (or "
                             "lora-ema), or --soft-tokens for a soft-token run")
        if p.name.startswith("soft_tokens"):
            raise ValueError(f"--lora {args.lora!r} holds DFT soft tokens: load it with --soft-tokens")
    if args.soft_tokens:
        p = Path(args.soft_tokens)
        if p.is_dir():
            raise ValueError(f"--soft-tokens {args.soft_tokens!r} is a folder; give the soft-token file "
                             "(OUT/soft_tokens.safetensors), or --lora for a LoRA folder")
        if not p.is_file():
            raise ValueError(f"--soft-tokens {args.soft_tokens!r}: no such file (fastfair finetune dft --trainable "
                             "soft-tokens writes OUT/soft_tokens.safetensors)")
        from .dft import soft_token_names

        for name in soft_token_names(p, args.token):   # from the file's header: no model needed
            for t in texts:
                if name in t:
                    raise ValueError(f"the soft token {name!r} occurs in {t!r}: it would be read as the soft token "
                                     "(SD 1.x/2.x and SDXL rewrite the word holding it); load the tokens under a name "
                                     "no prompt contains (--token)")


def _apply_finetuned(pipe, args, model: str, verbose: bool = False) -> tuple[str, str | None]:
    """--edit, --lora, --soft-tokens applied to ``pipe``: the model's name for the run's settings and the soft
    tokens' placeholder (None without soft tokens)."""
    if args.edit:
        from .mist import apply_file

        edit = apply_file(pipe, args.edit)
        model += f"+mist:{_digest(args.edit)}"
        if verbose:
            print(f"applied MIST edit {args.edit} (concepts: {', '.join(edit.meta.get('concepts', []))})")
    if args.lora:
        from diffusers.utils import logging as dlog

        rec = Path(args.lora).parent / "dft.json"
        if rec.is_file():  # a DFT run's LoRA: the model it was trained on (an SD 1.5 text LoRA loads into SDXL's
            try:           # first encoder without a word)
                trained = json.loads(rec.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                trained = {}
            kind = trained.get("pipeline")
            if kind and kind != type(pipe).__name__:
                raise ValueError(f"--lora {args.lora!r} was trained on {trained.get('model')!r} ({kind}, {rec}); this "
                                 f"run loads {model!r} ({type(pipe).__name__}): use a model of that kind")
            if trained.get("model") and trained["model"] != model:
                print(f"fastfair: note: --lora {args.lora!r} was trained on {trained['model']!r}; this run loads "
                      f"{model!r}", file=sys.stderr)
        level = dlog.get_verbosity()
        dlog.set_verbosity_error()   # "no LoRA keys associated to the UNet" for a text-encoder LoRA: expected
        try:
            pipe.load_lora_weights(args.lora)
        except ValueError as e:
            raise ValueError(f"--lora {args.lora!r} is not a LoRA diffusers can load ({e}); DFT soft tokens load "
                             "with --soft-tokens") from None
        finally:
            dlog.set_verbosity(level)
        model += f"+lora:{_digest(args.lora)}"
    token = None
    if args.soft_tokens:
        from .dft import load_soft_tokens

        token = load_soft_tokens(pipe, args.soft_tokens, token=args.token)
        model += f"+soft:{_digest(args.soft_tokens)}"
        if verbose:
            print(f"loaded soft tokens {args.soft_tokens}: prompts start with {token}")
    return model, token


def _digest(path) -> str:
    """A short content hash of a file or folder (an edit's or a LoRA's), for run names that never mix."""
    import hashlib
    from pathlib import Path

    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _read_prompt_file(path) -> list[str]:
    """Prompts of a text file, one per line; blank lines and lines starting with '#' skipped ('#' inside a prompt is
    kept: "a doctor, #portrait")."""
    from ._io import read_text_lines

    out = read_text_lines(path, "--prompt-file", inline_comments=False)
    if not out:
        raise ValueError(f"--prompt-file {str(path)!r} has no prompts")
    return out


def _generate(args) -> int:
    from pathlib import Path

    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from .generation import PARTS, check_out_dir, generate_to_dir, parse_seeds
    from .pipelines import load_pipeline

    if args.resume and args.overwrite:
        raise ValueError("--resume continues the generation in --out, --overwrite replaces it: give one")
    args.prompt = list(args.prompt or []) + (_read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not args.prompt:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    if not (args.resume and (Path(args.out) / PARTS).exists()):
        check_out_dir(args.out, args.overwrite, resuming=args.resume)  # before any work: a bad --out costs nothing
    parse_seeds(args.seeds)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.percentile < 100:  # printed IoUs only, but checked before the run (was after every image)
        raise ValueError(f"--percentile must be in [0, 100), got {args.percentile} (BiasMap uses 70)")
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
                                              on_large_grad=args.guide_on_large_grad, branch=args.guide_branch)
    edit_guidance = _edit_guidance(args)
    _check_finetuned_args(args, [*args.prompt, args.attribution_prompt or "",
                                 *(t for _, t, _ in (args.attribution or []))])
    from ._io import flock_held

    if flock_held(Path(args.out) / ".fastfair.lock"):  # said before loading the model, not after
        raise RuntimeError(f"another fastfair generate process is writing to {args.out}; wait for it to finish, or "
                           "use another output folder")
    pipe = load_pipeline(args.model, device=device, dtype=dtype)
    from .processors import guidance_scale_for

    model, token = _apply_finetuned(pipe, args, args.model, verbose=True)

    def pre(text):   # every text the finetuned model encodes starts with the soft tokens, attribution prompts too
        return f"{token} {text}" if token and text is not None else text

    prompts = [pre(p) for p in args.prompt]
    attribution_prompt = pre(args.attribution_prompt)
    if guidance is not None and guidance.attribution_prompt is not None:
        guidance.attribution_prompt = pre(guidance.attribution_prompt)
    attributions = None
    if args.attribution:
        attributions = {}
        for name, text, ws in args.attribution:
            if name in attributions:
                raise ValueError(f"--attribution {name!r} given twice; give each name once")
            attributions[name] = (pre(text), ws)
    # --attribution-prompt serves --maps and --guide; with --guide alone it is the guidance's only
    kw = dict(maps=args.maps, attribution_prompt=attribution_prompt if (args.maps or not args.guide) else None,
              attributions=attributions, steps=args.steps,
              guidance_scale=guidance_scale_for(pipe, args.guidance_scale),   # recorded resolved in the settings
              height=args.height, width=args.width, aggregation=args.aggregation,
              backend=args.backend, negative_prompt=args.negative_prompt)
    # everything the images and maps depend on (which model made them, too); a resumed run must match it
    settings = dict(kw, model=model, edit=args.edit, dtype=dtype, device=device, prompts=prompts,
                    seeds=parse_seeds(args.seeds),
                    guide=None if guidance is None else [args.guide, args.guide_scale, args.guide_max_grad_norm,
                                                         args.guide_on_large_grad, args.guide_branch,
                                                         args.attribution_prompt],
                    edit_guidance=None if edit_guidance is None else edit_guidance.describe())
    gen = generate_to_dir(pipe, prompts, args.out, seeds=args.seeds, settings=settings, resume=args.resume,
                          overwrite=args.overwrite, batch_size=args.batch_size, guidance=guidance,
                          edit_guidance=edit_guidance,
                          progress=not args.no_progress, **kw)
    out = Path(args.out)
    if gen.config.get("resumed_batches"):
        print(f"resumed: {gen.config['resumed_batches']} finished batch(es) read from {out}")
    words = list(gen.maps)
    pairs = list(itertools.combinations(words, 2))
    head = ["item", "seed", "prompt"] + [f"IoU({a},{b})" for a, b in pairs]
    ious = [gen.iou(a, b, args.percentile) for a, b in pairs]
    from .metrics import iou

    for name, amaps in gen.attribution_maps.items():
        for a, b in itertools.combinations(list(amaps), 2):
            head.append(f"{name}:IoU({a},{b})")
            ious.append(iou(amaps[a], amaps[b], args.percentile))
    if ious:
        print("\t".join(head))
        for i in range(len(gen)):
            print("\t".join([str(i), str(gen.seeds[i]), gen.prompts[i]] + [f"{float(v[i]):.4f}" for v in ious]))
    d = gen.diagnostics
    if "applied" in d:
        print(f"guidance: {int(d['applied'].sum())} of {d['applied'].numel()} image-steps updated, "
              f"{int(d['nonfinite'].sum())} non-finite; energy {d['energy'][0].mean():.4f} -> {d['energy'][-1].mean():.4f}")
    if "edit_norm" in d:
        on = (d["edit_norm"] > 0).any(1)
        first = int(on.nonzero()[0]) if on.any() else None
        what = "Fair Diffusion" if gen.edit_targets else "semantic guidance"
        print(f"{what}: applied at {int(on.sum())} of {len(on)} steps"
              + (f" (from step {first})" if first is not None else "")
              + ("; groups: " + ", ".join(f"{k} {gen.edit_targets.count(k)}" for k in dict.fromkeys(gen.edit_targets))
                 if gen.edit_targets else ""))
    print(f"wrote {len(gen)} images{', maps and overlays' if words else ''}"
          f"{', attribution maps' if gen.attribution_maps else ''} to {out}")
    if any(gen.safety_blocked):
        which = [i for i, b in enumerate(gen.safety_blocked) if b]
        print(f"warning: the pipeline's safety checker blacked out {len(which)} image(s) (items {which}; listed as "
              "safety_blocked in generation.json): their maps are the model's, their pictures are not. Load the "
              "pipeline with safety_checker=None to keep them", file=sys.stderr)
    return 0


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="large-scale, resumable bias audit (entanglement maps + output distribution)",
                       description="Audit a model over professions x seeds: BiasMap's entanglement (IoU / SoftIoU of "
                                   "profession and attribute maps, open-vocabulary and in-prompt) and the output "
                                   "distribution (attribute classifier; DFT bias, Delta, KL, target gap, risk "
                                   "difference). One Parquet row per image, resumable, shardable with torchrun.")
    p.add_argument("--model", required=True, help="offline preset (tiny-sd, sd15-shaped, ...), a hub id or a folder")
    p.add_argument("--edit", default=None, metavar="PATH",
                   help="apply a MIST edit (fastfair edit mist --out PATH) before auditing; the run's settings "
                        "name the model as MODEL+mist:<hash of the edit>, so before/after runs never mix")
    _add_finetuned_args(p, "auditing")
    p.add_argument("--prompts", default="builtin:biasmap19",
                   help="builtin:biasmap19 | builtin:winobias | builtin:broad, file:PATH (one profession per line), "
                        "or list:doctor,nurse")
    p.add_argument("--template", default="a photo of the face of a {}", help="prompt template; {} is the profession")
    p.add_argument("--attributes", default="gender",
                   help="comma-separated: gender, race (BiasMap binary), fairface4, fairface7, age; intersections "
                        "as gender*race (every pair of listed sets is reported too)")
    p.add_argument("--seeds", default="8", help="N (seeds 0..N-1), a range 0-99, or a list 1,5,9")
    p.add_argument("--entanglement", default="open,inprompt", help="open, inprompt, both (open,inprompt) or none")
    p.add_argument("--attribution-template", default="{prompt} and {attribute}",
                   help='open-vocabulary attribution prompt; {prompt}, {profession}, {attribute} '
                        '(default gives "a photo of the face of a doctor and gender")')
    p.add_argument("--inprompt-template", default=None,
                   help='prompt with the attribute word; default puts it before the profession: '
                        '"a photo of the face of a {attribute} {profession}"')
    p.add_argument("--classifier", default="clip",
                   help="clip (zero-shot CLIP), clip:MODEL_ID, none, or python:FILE.py:FUNCTION returning a classifier "
                        "or a torch module with a `labels` attribute")
    p.add_argument("--clip-model", default="openai/clip-vit-large-patch14",
                   help="model id or folder for --classifier clip")
    p.add_argument("--face-detector", default=None,
                   help="classify each image's largest face (crop grown by --face-expand, --face-crop-size px) "
                        "instead of the whole image: insightface (pip install insightface onnxruntime), "
                        "face_recognition, python:FILE.py:FUNC (FUNC() returns a callable on RGB uint8 images giving "
                        "faces), or several joined by commas, tried in order; images without a face are abstentions")
    p.add_argument("--clip-score", action="store_true",
                   help="also score every image's prompt alignment: 100 * max(cos(image, prompt), 0) with CLIP (the "
                        "--classifier clip model, else --clip-model); column clip_score, in the summary and report")
    p.add_argument("--face-crop-size", type=int, default=224, help="face crop size for the classifier (pixels)")
    p.add_argument("--face-expand", type=float, default=0.5, help="face box growth before the square crop")
    p.add_argument("--target", action="append", default=None, metavar="SET=P1,P2,...",
                   help="target distribution of a set, e.g. age=0.75,0.25 (default uniform); repeatable")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="default 7.5; on SD3 7.0 and on Flux 3.5 (the pipelines' own defaults); "
                        "FLUX.1-schnell has no guidance input (recorded as none)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--aggregation", default="fastfair", choices=("fastfair", "daam", "biasmap"))
    p.add_argument("--percentile", type=float, default=70.0, help="IoU binarisation percentile")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default="auto", help="auto, reference, triton or native")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--out", type=_path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished images")
    p.add_argument("--overwrite", action="store_true", help="delete the results in --out and start again")
    p.add_argument("--no-save-maps", action="store_true", help="do not keep the maps (safetensors shards)")
    p.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the confidence intervals")
    p.add_argument("--boot-seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    _add_sega_args(p)
    g = p.add_argument_group("entanglement guidance (BiasMap mitigation) of the neutral images")
    g.add_argument("--guide-attribute", default=None, metavar="SET",
                   help="guide every neutral image away from entangling the profession with this attribute set's word "
                        "(e.g. gender); needs --entanglement open")
    g.add_argument("--guide-scale", type=float, default=None, help="(100)")
    g.add_argument("--guide-max-grad-norm", type=float, default=None, help="(1)")
    g.add_argument("--guide-on-large-grad", default=None, choices=("skip", "clip"), help="(skip)")
    g.add_argument("--guide-branch", default=None, choices=("cond", "uncond"),
                   help="CFG half whose maps guide (cond; BiasMap's released code reads the unconditional one)")


def _quiet_libraries() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def _audit(args) -> int:
    import os

    from .audit import audit

    _quiet_libraries()
    edit_guidance = _edit_guidance(args)
    guide_options = {k: v for k, v in dict(scale=args.guide_scale, max_grad_norm=args.guide_max_grad_norm,
                                           on_large_grad=args.guide_on_large_grad, branch=args.guide_branch).items()
                     if v is not None}
    if guide_options and not args.guide_attribute:
        raise ValueError("--guide-scale / --guide-max-grad-norm / --guide-on-large-grad / --guide-branch need "
                         "--guide-attribute SET")
    model, pipe, token = args.model, None, None
    _check_finetuned_args(args, [args.template, args.inprompt_template or "", args.attribution_template])
    if args.edit or args.lora or args.soft_tokens:
        import torch

        from .pipelines import load_pipeline

        # under torchrun each process its own GPU (audit() sets the same device; this loads before it runs)
        device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available()
                                 else "cpu")
        pipe = load_pipeline(args.model, device=device,
                             dtype=args.dtype or ("fp16" if device.startswith("cuda") else "fp32"))
        model, token = _apply_finetuned(pipe, args, model)
    res = audit(model, args.prompts, pipeline=pipe, template=args.template, prompt_prefix=token, attributes=args.attributes, seeds=args.seeds,
                out=args.out, entanglement=args.entanglement, attribution_template=args.attribution_template,
                inprompt_template=args.inprompt_template, classifier=args.classifier, clip_model=args.clip_model,
                face_detector=args.face_detector, face_crop_size=args.face_crop_size, face_expand=args.face_expand,
                clip_score=args.clip_score,
                targets=" ".join(args.target) if args.target else None, steps=args.steps,
                guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                negative_prompt=args.negative_prompt, aggregation=args.aggregation, percentile=args.percentile,
                batch_size=args.batch_size, device=args.device, dtype=args.dtype, backend=args.backend,
                resume=args.resume, overwrite=args.overwrite, save_maps=not args.no_save_maps,
                report=not args.no_report, n_boot=args.n_boot, boot_seed=args.boot_seed,
                progress=not args.no_progress, edit_guidance=edit_guidance, guide=args.guide_attribute,
                guide_options=guide_options)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    s = res.summary
    def est(o) -> str:  # mean [lo, hi]; "n/a" where undefined (no finite values) or not bootstrapped (--n-boot 0)
        f = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        if o["lo"] is None:
            return f(o["mean"])
        return (f"{f(o['mean'])} [{f(o['lo'])}, {f(o['hi'])}]"
                + (" (the estimate lies outside its interval: small-sample bias; more seeds)" if o.get("outside")
                   else ""))

    for w, blk in s.get("entanglement", {}).get("open", {}).items():
        print(f"mIoU(profession, {w}) = {est(blk['iou']['overall'])} (open vocabulary)")
    for name, blk in s.get("entanglement", {}).get("inprompt", {}).items():
        print(f"mIoU(profession, {name} word) = {est(blk['iou']['overall'])} (in-prompt)")
    for name, blk in s.get("distribution", {}).items():
        o = blk["overall"]["dft_bias"]
        if o["mean"] is not None:
            print(f"DFT bias({name}) = {est(o)} (mean over professions)")
    print(f"wrote {len(res.results)} rows to {res.run_dir / 'results.parquet'}"
          + ("" if args.no_report else f" and the report to {res.run_dir / 'report.html'}"))
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write the self-contained HTML report of an audit run directory or a "
                                      "fastfair finetune dft folder")
    p.add_argument("run_dir", help="an audit run directory (fastfair audit --out) or a DFT folder (fastfair finetune dft --out)")
    p.add_argument("--out", type=_path, default=None, help="output HTML file (default RUN_DIR/report.html; with --target, "
                                                 "RUN_DIR/report-targets.html)")
    p.add_argument("--target", action="append", default=None, metavar="SET=P1,P2,...",
                   help="override a target distribution, e.g. age=0.75,0.25 (the page says so; the run's own "
                        "report.html and summary.json keep its targets)")


def _report(args) -> int:
    from pathlib import Path

    from .audit import report

    root = Path(args.run_dir)
    if (not (root / "dft.json").is_file() and not (root / "audit.json").is_file()
            and any((root / "checkpoints").glob("checkpoint-*"))):
        raise ValueError(f"{root} is an unfinished fastfair finetune run (checkpoints, no dft.json yet): continue it "
                         "with the same command and --resume latest; its report is written when it finishes")
    if (root / "dft.json").is_file() and not (root / "audit.json").is_file():   # a fastfair finetune dft folder
        from .dft_report import write_dft_report

        if args.target:
            raise ValueError("--target re-summarises audits; a DFT run's targets are its own")
        print(f"wrote {write_dft_report(root, out=args.out)}")
        return 0
    path = report(args.run_dir, out=args.out, targets=" ".join(args.target) if args.target else None)
    print(f"wrote {path}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare audit runs (a mitigation against its baseline), image by image",
                       description="Compare audit runs against a baseline run of the same plan: every entanglement "
                                   "and distribution metric on the images both runs hold, with paired, "
                                   "profession-stratified bootstrap intervals of the difference (run - baseline).")
    p.add_argument("baseline", help="the baseline audit run directory")
    p.add_argument("runs", nargs="+", help="audit run directories to compare against it")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--boot-seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the full result as JSON")
    p.add_argument("--image-similarity", default=None, metavar="ENCODERS",
                   help="also the cosine similarity of every image to the baseline's image of the same profession and "
                        "seed: clip, clip:MODEL_ID, dinov2, dinov2:MODEL_ID, several joined by '+', or paper")
    p.add_argument("--device", default=None, help="device of the --image-similarity encoders (default: cuda if "
                                                  "available)")


def _compare(args) -> int:
    from .audit.compare import compare, format_markdown, write_json

    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    if device.startswith("cuda") and not __import__("torch").cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device; use --device cpu")
    res = compare(args.baseline, *args.runs, n_boot=args.n_boot, seed=args.boot_seed,
                  image_similarity=args.image_similarity, device=device if args.image_similarity else None)
    print(format_markdown(res))
    if args.json:
        print(f"wrote {write_json(res, args.json)}")
    return 0


def _add_edit(sub) -> None:
    p = sub.add_parser("edit", help="edit a model's weights (MIST debiasing)")
    esub = p.add_subparsers(dest="method", required=True)
    m = esub.add_parser("mist", help="MIST: closed-form cross-attention edit towards a target attribute distribution",
                        description="Edit to_k/to_v of every cross-attention layer in closed form (MIST, Yesiltepe "
                                    "et al. 2024) so that the concepts' images follow a target attribute "
                                    "distribution, measured each round with a classifier. Writes the weight deltas "
                                    "(safetensors) and their metadata (JSON); apply with generate --edit.")
    m.add_argument("--model", default="tiny-sd", help="offline preset, a hub id or a local pipeline folder")
    m.add_argument("--concepts", required=True, help="comma-separated concepts, e.g. doctor,nurse,ceo")
    m.add_argument("--attributes", default="gender",
                   help="comma-separated attribute sets whose product is edited: gender, race, fairface4, fairface7, "
                        "age (e.g. gender,race)")
    m.add_argument("--target", action="append", default=None,
                   help="uniform (default); joint probabilities 0.75,0.25; or marginals SET=P1,P2 (repeatable)")
    m.add_argument("--classifier", default="clip",
                   help="clip, clip:MODEL_ID or python:FILE.py:FUNCTION (fastfair.classify); ignored with --measured")
    m.add_argument("--clip-model", default=None, help="model id or folder for --classifier clip")
    m.add_argument("--face-detector", default=None,
                   help="measure each image's largest face (insightface, face_recognition, python:FILE.py:FUNC or "
                        "several joined by commas); images without a face are abstentions")
    m.add_argument("--measured", default=None, metavar="JSON",
                   help='measured distributions {"doctor": [p1, p2], ...}: one edit round, no classifier')
    m.add_argument("--protocol", default="fastfair", choices=("fastfair", "reference"),
                   help="defaults of the prompt and measurement settings below: fastfair's, or the MIST authors' "
                        "released code's (concept prompt 'a person of {concept}', 100 new random-seed 'a headshot of a "
                        "person of {concept}' images per round with their negative prompt, CLIP ViT-B/32, up to 150 "
                        "rounds); flags given explicitly win")
    m.add_argument("--rounds", type=int, default=None, help="most edit rounds (10; reference 150)")
    m.add_argument("--tol", type=float, default=0.05, help="stop when max |p - target| < tol for every concept")
    m.add_argument("--step", type=float, default=0.1, help="w = step * (target - p)")
    m.add_argument("--lam", type=float, default=0.5)
    m.add_argument("--eta-e", type=float, default=1.0)
    m.add_argument("--eta-p", type=float, default=0.2)
    m.add_argument("--no-to-k", action="store_true", help="edit to_v only")
    m.add_argument("--preserve", action="append", default=None, help='preserve prompt (repeatable; default "")')
    m.add_argument("--template", default=None, help="concept prompt for the EOS keys ('a {concept}')")
    m.add_argument("--measure-template", default=None,
                   help="prompt of the measured images ('a headshot of a {concept}')")
    m.add_argument("--measure", default="argmax", choices=("argmax", "mean"))
    m.add_argument("--images", type=int, default=None, help="images per concept and round (20; reference 100)")
    m.add_argument("--seeds", default=None, help="seeds of the measured images (default 0..images-1)")
    m.add_argument("--reseed", action="store_true", default=None,
                   help="new seeds every round (the reference protocol's random images) instead of fixed ones")
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--guidance-scale", type=float, default=None, help="default 7.5")
    m.add_argument("--height", type=int, default=None)
    m.add_argument("--width", type=int, default=None)
    m.add_argument("--negative-prompt", default=None)
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    m.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: fp16 on CUDA, fp32 on CPU; fp32 with --protocol reference")
    m.add_argument("--out", type=_path, required=True, help="output .safetensors (metadata also in OUT.json)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing edit at --out")
    m.add_argument("--no-progress", action="store_true")


# defaults of ``fastfair edit mist --protocol``: fastfair's, and the MIST authors' released code's (README,
# "Differences from the authors' released code"); the attribute keys stay concept + phrase in both
MIST_PROTOCOLS = {
    "fastfair": dict(template="a {concept}", measure_template="a headshot of a {concept}", images=20, rounds=10,
                     reseed=False),
    "reference": dict(template="a person of {concept}", measure_template="a headshot of a person of {concept}",
                      images=100, rounds=150, reseed=True, clip_model="openai/clip-vit-base-patch32",
                      negative_prompt="black and white, drawing, painting, unrealistic, low quality",
                      dtype="fp32"),  # the authors edit and measure an fp32 pipeline
}


def _edit(args) -> int:
    import json

    import torch

    from . import mist
    from .pipelines import load_pipeline

    _quiet_libraries()
    measured = None
    if args.measured:
        with open(args.measured, encoding="utf-8") as fh:
            try:
                measured = json.load(fh)
            except ValueError as e:
                raise ValueError(f"--measured {args.measured!r} is not valid JSON ({e}); expected "
                                 '{"doctor": [p1, p2, ...], ...}') from None
    target = " ".join(args.target) if args.target else "uniform"
    if args.measured and args.face_detector:
        raise ValueError("--face-detector crops faces for the classifier, and --measured replaces the classifier's "
                         "measurement: give one of them")
    if args.images is not None and args.images < 1:
        raise ValueError(f"--images must be >= 1 (images measured per concept and round); got {args.images}")
    if args.seeds is not None and args.reseed:
        raise ValueError("--seeds fixes the measured images' seeds and --reseed draws new ones every round: give one")
    if args.seeds is not None:
        args.reseed = False  # explicit fixed seeds win over a protocol's new seeds every round
    for k, v in MIST_PROTOCOLS[args.protocol].items():  # explicit flags win
        if getattr(args, k) is None:
            setattr(args, k, v)
    out = Path(args.out)
    out = out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} already holds an edit; --overwrite replaces it, or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=out.parent).close()  # writable: fail now, not after every round has run
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    pipe = load_pipeline(args.model, device=device, dtype=dtype)
    edit = mist.mist(pipe, args.concepts, args.attributes, target=target,
                     classifier=None if measured is not None else args.classifier, measured=measured,
                     with_to_k=not args.no_to_k, lam=args.lam, eta_e=args.eta_e, eta_p=args.eta_p, step=args.step,
                     tol=args.tol, max_rounds=args.rounds, preserve=args.preserve or [""], template=args.template,
                     measure_template=args.measure_template, images=args.images, seeds=args.seeds, reseed=args.reseed,
                     steps=args.steps, guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                     negative_prompt=args.negative_prompt, batch_size=args.batch_size, measure=args.measure,
                     clip_model=args.clip_model, model_id=args.model, progress=not args.no_progress,
                     face_detector=args.face_detector)
    path = edit.save(args.out)
    print(mist.summary(edit))
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="finetune a model toward a target attribute distribution (DFT)")
    fsub = p.add_subparsers(dest="method", required=True)
    d = fsub.add_parser("dft", help="adjusted direct finetuning with the distributional alignment loss (Shen et al.)",
                        description="Finetune LoRA (text encoder by default, and/or the UNet / SD3's and Flux's "
                                    "transformer) or soft prefix tokens by "
                                    "backpropagating through sampling (adjusted DFT) so that the classifier's "
                                    "attribute distribution over each prompt's images matches the target. Writes "
                                    "OUT/lora (diffusers load_lora_weights) or OUT/soft_tokens.safetensors, EMA "
                                    "versions, checkpoints, dft.json and report.html. Under torchrun "
                                    "--nproc-per-node K the images of every step are shared by K processes.")
    d.add_argument("--model", default="tiny-sd", help="offline preset, a hub id or a local pipeline folder")
    d.add_argument("--prompt", action="append", default=None, help="a training prompt (repeatable)")
    d.add_argument("--prompts", default=None,
                   help="builtin:NAME, file:PATH or list:a,b professions (filled into --template)")
    d.add_argument("--template", default="a photo of the face of a {}", help="prompt template for --prompts")
    d.add_argument("--attributes", default="gender",
                   help="comma-separated classifier heads to align jointly, e.g. gender,race,age")
    d.add_argument("--target", action="append", default=None, metavar="SET=P1,P2,...",
                   help="target distribution of an attribute, e.g. age=0.75,0.25 (default uniform); repeatable")
    d.add_argument("--joint-target", default=None,
                   help="comma-separated probabilities over the joint classes (row-major)")
    d.add_argument("--classifier", default="clip",
                   help="clip, clip:MODEL_ID or python:FILE.py:FUNCTION (a differentiable module)")
    d.add_argument("--clip-model", default=None, help="model id or folder for --classifier clip")
    d.add_argument("--trainable", default="text-lora",
                   choices=("text-lora", "unet-lora", "text+unet-lora", "transformer-lora", "text+transformer-lora",
                            "soft-tokens"),
                   help="LoRA of the CLIP text encoder(s), of the UNet (SD 1.x/2.x, SDXL) or the transformer (SD3, "
                        "Flux), or soft prefix tokens")
    d.add_argument("--rank", type=int, default=50, help="LoRA rank")
    d.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    d.add_argument("--soft-tokens", type=int, default=None,
                   help="number of soft prefix tokens (--trainable soft-tokens; default 4)")
    d.add_argument("--token", default=None,
                   help="the soft tokens' placeholder (--trainable soft-tokens; default <fastfair>; SD3 / Flux: the k "
                        "tokens <TOKEN_0> ... <TOKEN_k-1>)")
    d.add_argument("--steps", type=int, default=1000, help="optimisation steps")
    d.add_argument("--images-per-prompt", type=int, default=8, help="N, the images whose distribution is aligned")
    d.add_argument("--batch-size", type=int, default=None, help="images per backward pass (default N)")
    d.add_argument("--sampling-steps", default="19-23", help="random sampling-step count per iteration, LO-HI or N")
    d.add_argument("--scheduler", default=None, choices=("dpm++", "ddim", "pipeline"),
                   help="sampler while training (default: dpm++ as the paper on UNets; the pipeline's flow-matching "
                        "Euler on SD3 / Flux, the only one there)")
    d.add_argument("--guidance-scale", type=float, default=None,
                   help="default 7.5 (the paper) on UNets, 7.0 on SD3, 3.5 on Flux (its guidance embedding; none "
                        "on FLUX.1-schnell)")
    d.add_argument("--prompt-padding", default="max_length", choices=("max_length", "longest"),
                   help="text conditioning while training: max_length (77 tokens, as pipelines sample) or longest "
                        "(the paper's code: the prompt's tokens only, the empty prompt padded to their length)")
    d.add_argument("--height", type=int, default=None)
    d.add_argument("--width", type=int, default=None)
    d.add_argument("--lr", type=float, default=5e-5)
    d.add_argument("--weight-decay", type=float, default=1e-2)
    d.add_argument("--max-grad-norm", type=float, default=100.0)
    d.add_argument("--ema-decay", type=float, default=0.996, help="0 disables the EMA")
    d.add_argument("--uncertainty-threshold", type=float, default=0.2)
    d.add_argument("--ot-samples", type=int, default=100,
                   help="histograms sampled from the target per step; 0: the exact expectation over every histogram "
                        "(the paper's closed form for one binary attribute; up to 20000 histograms)")
    d.add_argument("--quality-weight", type=float, default=8.0)
    d.add_argument("--quality-relax", default="0.2",
                   help="quality-loss weight of images whose target changes an attribute: one number, or one per "
                        "attribute (gender=0.2,race=0.6,age=0.6: the smallest of the changed ones, as the paper's "
                        "intersectional runs)")
    d.add_argument("--quality-encoder", default="clip",
                   help="clip (ViT-L/14), clip:MODEL_ID, dinov2, dinov2:MODEL_ID, several joined by '+', paper "
                        "(CLIP ViT-H/14 + DINOv2 ViT-B/14 on 224-pixel images, as Shen et al.) or none")
    d.add_argument("--face-detector", default=None,
                   help="classify each image's largest face (Shen et al.): insightface (pip install insightface "
                        "onnxruntime; downloads buffalo_l), face_recognition (dlib CNN), python:FILE.py:FUNC (FUNC() "
                        "returns a callable on RGB uint8 images giving faces, see fastfair.faces), or several joined "
                        "by commas, tried in order (insightface,face_recognition is the paper's); images without a "
                        "face are not aligned")
    d.add_argument("--face-embedder", default=None,
                   help="face-realism loss: python:FILE.py:FUNC, FUNC(device=) returns a module mapping aligned "
                        "112x112 faces in [0,1] to embeddings (needs --face-detector with landmarks)")
    d.add_argument("--face-bank", default=None,
                   help=".pt / .npy (M, D) embeddings of real faces: the face-realism target where the frozen "
                        "image's face is not kept")
    d.add_argument("--face-weight", type=float, default=1.0, help="face-realism loss weight")
    d.add_argument("--face-relax", default="0.2",
                   help="quality-loss gradient factor inside the face region when the target changes the face: one "
                        "number, or one per attribute (gender=0.2,race=0.3,age=0.3: the paper's intersectional runs)")
    d.add_argument("--face-confidence", type=float, default=0.9,
                   help="frozen image's class confidence needed to keep its face as the face-realism target")
    d.add_argument("--face-expand", type=float, default=0.5, help="face box growth before the square crop")
    d.add_argument("--face-crop-size", type=int, default=224, help="classifier crop size (pixels)")
    d.add_argument("--checkpoint-every", type=int, default=20)
    d.add_argument("--eval-every", type=int, default=0,
                   help="evaluate before the first step, every N steps and after the last one (class frequencies "
                        "on the evaluation "
                        "prompts at fixed seeds, current and EMA weights; in dft.json); 0: never")
    d.add_argument("--eval-prompt", action="append", default=None,
                   help="an evaluation prompt (repeatable; default the training prompts)")
    d.add_argument("--eval-prompts", default=None,
                   help="evaluation professions (builtin:NAME, file:PATH or list:a,b) filled into --template, e.g. "
                        "held-out occupations as the paper's validation set")
    d.add_argument("--eval-seeds", type=int, default=16, help="images per evaluation prompt (seeds 0..N-1)")
    d.add_argument("--eval-steps", type=int, default=None,
                   help="sampling steps of evaluation images (default: the top of --sampling-steps)")
    d.add_argument("--keep-checkpoints", type=int, default=2)
    d.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest' in --out")
    d.add_argument("--no-checkpointing", action="store_true", help="no gradient checkpointing")
    d.add_argument("--attention", default=None, choices=("fastfair", "diffusers"),
                   help="cross-attention through fastfair.ops (fused backward; the default on UNets on the CPU) or "
                        "diffusers' processors (SDPA: the default on CUDA and on SD3 / Flux)")
    d.add_argument("--backend", default="auto", help="auto, reference, triton or native")
    d.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"), help="autocast on CUDA")
    d.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    d.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="frozen weights' dtype (LoRA / tokens stay fp32)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", type=_path, required=True, help="output folder")
    d.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a DFT run (removes its outputs and checkpoints); "
                        "otherwise such a folder is refused unless --resume")
    d.add_argument("--no-progress", action="store_true")


def _finetune(args) -> int:
    from . import dft

    _quiet_libraries()
    return dft.cli_main(args)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark kernels and end-to-end workloads against the alternatives",
                       description="Time fastfair's cross-attention backends, SDPA, explicit softmax and xformers "
                                   "at SD1.5/SDXL shapes with the measured copy-bandwidth and matmul ceilings, and "
                                   "generation, guidance and a DFT step against diffusers, DAAM and the reference "
                                   "style. Writes OUT/bench.json, OUT/bench.md and OUT/bench.png.")
    from .bench import add_arguments

    add_arguments(p)


def _bench(args) -> int:
    from .bench import cli_main

    _quiet_libraries()
    return cli_main(args)


def _process() -> str:
    """" (process R of K)" under torchrun, so that each process's error says whose it is."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (process {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""


def _peer_failure(e: BaseException) -> str | None:
    """A collective that failed because another process stopped: say so instead of the backend's text."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    dist_error = getattr(__import__("torch").distributed, "DistError", ())
    text = str(e)
    if isinstance(e, dist_error) or "Connection closed by peer" in text or "Connection reset by peer" in text:
        return "another process failed (its error is printed above or below); this one stopped with it"
    return None


def _path(value: str) -> str:
    """A path argument: not empty ("" was the current folder: a run's files landed beside the user's)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty; give a path")
    return value


def _gpu_failure(e: BaseException, args, kept: str) -> str | None:
    """Out of GPU memory, or a CUDA error (a kernel fault: the process's CUDA context is lost): the error's first
    line and the ways out, instead of torch's multi-line text."""
    import torch

    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    resume = f" ({kept})" if kept else ""
    batch = " lower --batch-size" if "batch_size" in vars(args) else ""
    low = first.lower()
    if isinstance(e, getattr(torch, "OutOfMemoryError", ())) or ("out of memory" in low and
                                                                   ("cuda" in low or "gpu" in low)):
        return f"{first[:300]} -- out of GPU memory:{batch or ' use smaller inputs'}{resume}"
    # Triton's launch errors read "Triton Error [CUDA]: ..."
    if (isinstance(e, getattr(torch, "AcceleratorError", ())) or first.startswith(("CUDA error", "cuDNN error"))
            or "Error [CUDA]" in first):
        attn = ("; --attention diffusers keeps fastfair's kernels out of DFT" if args.command == "finetune" else "")
        return (f"{first[:300]} -- a GPU fault{resume}. To rule out fastfair's kernels rerun with "
                f"FASTFAIR_BACKEND=reference (or native){attn}; CUDA_LAUNCH_BLOCKING=1 names the failing call "
                "(please report it with that traceback)")
    return None


def _sigterm_as_interrupt():
    """SIGTERM (a batch scheduler's stop, ``kill``) raises KeyboardInterrupt, so a run stops as on Ctrl-C: finished
    work kept, the message saying how to resume. Returns the restorer (``.fired``: whether it came), or None where
    another handler is installed or this is not the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None

    def on_term(signum, frame):
        restore.fired = True
        raise KeyboardInterrupt

    def restore():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    restore.fired = False
    signal.signal(signal.SIGTERM, on_term)
    return restore


# import name -> pip name, where they differ (a dependency missing from a partial install)
_PIP_NAMES = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "cv2": "opencv-python"}
# the packages fastfair's commands import (declared or optional)
_DEPENDENCIES = {"diffusers", "transformers", "tokenizers", "safetensors", "PIL", "pandas", "pyarrow", "numpy", "tqdm",
                 "scipy", "peft", "accelerate", "triton", "matplotlib", "insightface", "face_recognition", "onnxruntime",
                 "daam", "xformers", "yaml", "sklearn", "cv2", "huggingface_hub", "open_clip"}


def main(argv: list[str] | None = None) -> int:
    argv_given = argv
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:  # without building the parser (bench's arguments import torch)
        from . import __version__

        print(__version__)
        return 0
    parser = argparse.ArgumentParser(prog="fastfair", description="Find and reduce social bias in text-to-image "
                                     "diffusion models, with fused cross-attention map kernels.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    _add_generate(sub)
    _add_audit(sub)
    _add_report(sub)
    _add_compare(sub)
    _add_edit(sub)
    _add_finetune(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    kept = {"generate": "finished batches are kept: rerun with --resume",
            "audit": "finished batches are kept: rerun with --resume",
            "finetune": "the last checkpoint is kept: rerun with --resume latest",
            "edit": "nothing was written (an edit is saved when its rounds finish): rerun the command",
            "bench": "finished cases are in bench.partial.json"}.get(args.command, "")
    # the command line's own process only (a program calling main([...]) keeps its SIGTERM), and not under torchrun,
    # whose launcher stops workers with SIGTERM and expects them gone at once (not after a blocking collective)
    restore = _sigterm_as_interrupt() if argv_given is None and "LOCAL_RANK" not in os.environ else None
    if argv_given is None:  # the command line: warnings as one line each, not Python's file:line and source line
        import warnings

        warnings.formatwarning = (lambda message, category, filename, lineno, line=None:
                                  f"fastfair {args.command}: warning: {message}\n")
    try:
        return {"generate": _generate, "audit": _audit, "report": _report, "compare": _compare, "edit": _edit,
                "finetune": _finetune, "bench": _bench}[args.command](args)
    except (ValueError, KeyError, RuntimeError, FloatingPointError) as e:
        # a bare KeyError prints only the key ("error: 'settings'"): say it is a field missing from a file it read
        msg = (f"a field {e.args[0]!r} is missing from a record it read (a damaged file, or one that is not "
               "fastfair's)" if type(e) is KeyError and e.args else None)
        print(f"fastfair {args.command}: error{_process()}: "
              f"{_peer_failure(e) or _gpu_failure(e, args, kept) or msg or e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # a dependency missing (pip install --no-deps, a partial environment)
        import importlib.util

        # only a known dependency that is absent as a whole; a missing submodule of an installed package (a version
        # mismatch) or an unknown name (a bug) keeps its traceback
        top = (e.name or "").split(".")[0]
        if top not in _DEPENDENCIES or importlib.util.find_spec(top) is not None:
            raise
        pkg = _PIP_NAMES.get(top, top)
        print(f"fastfair {args.command}: error: needs the Python package {pkg}, which is not installed: "
              f"pip install {pkg}", file=sys.stderr)
        return 1
    except OSError as e:  # a file or folder the command reads or writes (missing, a file where a folder goes...)
        import errno

        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        full = e.errno in (errno.ENOSPC, errno.EDQUOT) and kept and args.command != "edit"
        print(f"fastfair {args.command}: error: {e.strerror or e}{where}"
              + (f"; free some space ({kept})" if full else ""),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        term = restore is not None and restore.fired
        print(f"fastfair {args.command}: {'terminated (SIGTERM)' if term else 'interrupted'}"
              + (f"; {kept}" if kept else ""), file=sys.stderr)
        return 143 if term else 130
    finally:
        if restore is not None:
            restore()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
