"""``fastfair.generate``: batched generation over prompts x seeds with per-word attention maps."""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import concepts, metrics
from ._env import add_environment, provenance
from ._io import BackgroundWriter, FolderLock, atomic_write, check_not_foreign, encode_pngs
from .maps import Aggregation, MapRecorder
from .processors import (default_sample_size, denoiser, guidance_scale_for, is_flux, is_patched, patch,
                         unpatch)


class NonFiniteError(FloatingPointError):
    """Latents, images or maps became NaN/Inf: fastfair refuses to return them."""


def parse_seeds(seeds) -> list[int]:
    """``[0, 1]``, ``3``, ``"0-3"`` or ``"0,2,5-7"`` -> list of distinct non-negative ints."""
    import re

    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = [int(seeds)]
    elif isinstance(seeds, str):
        out: list[int] = []
        for part in seeds.split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if m is None:
                raise ValueError(f"seeds: {part!r} is not a seed or a range of seeds; write e.g. '0-3' or '0,2,5-7' "
                                 "(non-negative integers)")
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise ValueError(f"seeds: range {part!r} is empty (end before start)")
            out.extend(range(lo, hi + 1))
        seeds = out
    else:
        try:
            given = list(seeds)
            seeds = [int(s) for s in given]
        except (TypeError, ValueError) as e:
            raise ValueError(f"seeds must be integers, e.g. seeds=[0, 1] or seeds='0-3'; got {seeds!r}") from e
        frac = next((g for g, s in zip(given, seeds) if isinstance(g, bool) or g != s), None)
        if frac is not None:  # int(0.5) would silently be seed 0
            raise ValueError(f"seeds must be integers; got {frac!r}")
    if not seeds:
        raise ValueError("no seeds given; pass e.g. seeds=[0, 1] or seeds='0-3'")
    neg = [s for s in seeds if s < 0]
    if neg:
        raise ValueError(f"seeds must be >= 0; got {neg[0]}")
    big = [s for s in seeds if s >= 2 ** 64]
    if big:
        raise ValueError(f"seeds must be below 2**64 (torch.Generator's range); got {big[0]}")
    seen: set[int] = set()
    dup = next((s for s in seeds if s in seen or seen.add(s)), None)
    if dup is not None:
        raise ValueError(f"seed {dup} is given twice: every image would be generated twice; give each seed once")
    return seeds


def _colormap(x: np.ndarray) -> np.ndarray:
    """[0,1] -> RGB uint8 with a 'jet'-like ramp (no matplotlib needed)."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(image, heat: torch.Tensor, alpha: float = 0.5):
    """Blend a min-max-normalised heat map over a PIL image."""
    from PIL import Image

    W, H = image.size
    h = F.interpolate(heat[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    h = (h - h.min()) / (h.max() - h.min() + 1e-8)
    rgb = _colormap(h.numpy())
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((base * (1 - alpha) + rgb * alpha).astype(np.uint8))


@dataclass
class Generation:
    """Images, final latents and per-word maps of one ``generate`` call, item by item
    (items are prompts x seeds, prompt-major)."""

    images: list
    latents: torch.Tensor
    maps: dict[str, torch.Tensor]
    prompts: list[str]
    seeds: list[int]
    config: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)  # guidance: (steps, N) tensors per key
    # ``attributions=``: name -> word -> (N, h, w) maps looked up in that attribution prompt
    attribution_maps: dict = field(default_factory=dict)
    # ``edit_guidance=FairDiffusion(...)``: the group each item was steered towards
    edit_targets: list = field(default_factory=list)
    # what made it: library versions, device, git revision (``fastfair._env.provenance``); a resumed
    # ``generate_to_dir`` run lists every distinct one its batches were made under
    environment: dict = field(default_factory=dict)
    environments: list = field(default_factory=list)
    # the pipeline's safety checker (SD 1.x / 2.x checkpoints that ship one): per item, whether it blacked the
    # image out -- the maps are still the model's, the picture is not; empty when the pipeline has no checker
    safety_blocked: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def _map(self, word: str) -> torch.Tensor:
        if word not in self.maps:
            raise KeyError(f"no map for {word!r}; this generation has maps for {sorted(self.maps)}")
        return self.maps[word]

    def iou(self, a: str, b: str, percentile: float = 70.0) -> torch.Tensor:
        """Per-item IoU of two words' maps, each binarised at its own percentile."""
        return metrics.iou(self._map(a), self._map(b), percentile)

    def soft_iou(self, a: str, b: str, **kwargs) -> torch.Tensor:
        """Per-item SoftIoU of two words' maps (see ``fastfair.metrics.soft_iou``)."""
        return metrics.soft_iou(self._map(a), self._map(b), **kwargs)

    def save(self, out_dir: str | os.PathLike, overlays: bool = True, overwrite: bool = False, _keep=(),
             _images: bool = True) -> Path:
        """Write images/, maps.safetensors, overlays/ and generation.json under ``out_dir``.
        Each file is written atomically (temporary file + rename). A folder that already holds a
        generation's outputs is refused (its images and maps would mix with these) unless
        ``overwrite=True``, which first removes those outputs (and nothing else)."""
        from safetensors.torch import save as st_save

        out = check_out_dir(out_dir, overwrite)
        _check_attribution_names(self.attribution_maps)
        images = self.images
        if overwrite and _images and isinstance(images, ImagesOnDisk):
            images = list(images)  # read before the folder they may live in is cleared
        if overwrite:
            _remove_outputs(out, keep=_keep)
        names = image_names(self.seeds)
        if _images:  # generate_to_dir wrote them (and their overlays) batch by batch
            for name, data in zip(names, encode_pngs(images)):
                atomic_write(out / "images" / f"{name}.png", data)
        if self.maps:
            tensors = {w: m.contiguous() for w, m in self.maps.items()}
            tensors["latents"] = self.latents.float().contiguous()
            atomic_write(out / "maps.safetensors", st_save(tensors, metadata={"words": json.dumps(list(self.maps))}))
            if overlays and _images:
                _write_overlays(out, names, images, self.maps)
        if self.attribution_maps:
            tensors = {f"{name}/{w}": m.contiguous() for name, d in self.attribution_maps.items() for w, m in d.items()}
            atomic_write(out / "attribution_maps.safetensors",
                         st_save(tensors, metadata={"names": json.dumps({n: list(d) for n, d in
                                                                        self.attribution_maps.items()})}))
        meta = dict(self.config, prompts=self.prompts, seeds=self.seeds, words=list(self.maps),
                    images=[f"images/{n}.png" for n in names])
        if self.edit_targets:
            meta["edit_targets"] = self.edit_targets
        if self.safety_blocked:
            meta["safety_blocked"] = self.safety_blocked
        if self.environment:
            meta["environment"] = self.environment
        if len(self.environments) > 1:
            meta["environments"] = self.environments
        atomic_write(out / "generation.json", json.dumps(meta, indent=2).encode())
        return out


def _write_part(out: Path, stem: str, names: list, images, maps: dict, info: dict, tensors: dict) -> None:
    """generate_to_dir's background job for one batch: its images, overlays, then the part's record and tensors --
    the .safetensors last: a part counts as done once it is on disk."""
    from safetensors.torch import save as st_save

    for name, data in zip(names, encode_pngs(images)):
        atomic_write(out / "images" / f"{name}.png", data)
    if maps:  # per batch, not all at the end (a 10,000-image run: an hour more after the GPU)
        _write_overlays(out, names, images, maps)
    atomic_write(out / PARTS / f"{stem}.json", json.dumps(info, default=str).encode())
    atomic_write(out / PARTS / f"{stem}.safetensors", st_save(tensors))


def _write_overlays(out: Path, names: list, images, maps: dict) -> None:
    """overlays/{name}_w{k}_{word}.png of every image and word (the word's index keeps names unique)."""
    for k, (w, m) in enumerate(maps.items()):
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in w)
        pngs = encode_pngs(overlay(img, m[i]) for i, img in enumerate(images))
        for name, data in zip(names, pngs):
            atomic_write(out / "overlays" / f"{name}_w{k}_{safe}.png", data)


class ImagesOnDisk(Sequence):
    """A run's images as a list of PIL images read from their files when asked for (``generate_to_dir``: a
    10,000-image run does not hold them all in memory)."""

    def __init__(self, paths: list):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"ImagesOnDisk({len(self)} images under {self.paths[0].parent if self.paths else '-'})"


OUTPUTS = ("images", "overlays", "maps.safetensors", "attribution_maps.safetensors", "generation.json", ".parts",
           ".parts.done")
PARTS = ".parts"  # generate_to_dir's finished batches until the run is complete
DONE_PARTS = ".parts.done"  # .parts of a complete run, being deleted


def image_names(seeds: list) -> list[str]:
    """File stems of a run's images, item by item: "0007_seed3" (zero-padded to at least 4 digits, more for runs of
    10,000 images and beyond, so that names sort in item order)."""
    width = max(4, len(str(len(seeds) - 1)))
    return [f"{i:0{width}d}_seed{s}" for i, s in enumerate(seeds)]


def generate_to_dir(pipe, prompts: str | Sequence[str], out_dir: str | os.PathLike, *, seeds, settings: dict,
                    resume: bool = False, overwrite: bool = False, batch_size: int = 8, overlays: bool = True,
                    **kwargs) -> Generation:
    """``generate`` into ``out_dir`` batch by batch, so that an interrupted run keeps every finished batch:
    each batch's images go to ``images/`` and its maps, latents and guidance diagnostics to ``.parts/`` as
    soon as it is done (atomic writes); when every batch is done they are merged into ``Generation.save``'s
    layout and ``.parts`` is removed. ``resume=True`` continues a run in ``out_dir`` (generating only the
    batches it lacks) and refuses one made with other ``settings`` (a dict that names everything the
    images depend on: the model, prompts, seeds and generate's arguments). The seeds alone fix each image,
    so the batches give exactly the images of one ``generate`` call. A single attribution prompt and
    ``attributions={name: (text, words)}`` apply to every prompt."""
    import shutil

    from tqdm.auto import tqdm

    check_text_to_image(pipe)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = parse_seeds(seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_words(pipe, prompts, kwargs)  # every prompt's words, before the first batch
    # one per prompt: each batch (one prompt) gets its own; one string goes to every batch as it is
    neg = kwargs.get("negative_prompt")
    negs = None if neg is None or isinstance(neg, str) else _negative_prompts(neg, len(prompts))
    if kwargs.get("edit_guidance") is not None:  # and the edit's settings, before the folder is made
        from .sega import check_edit_guidance

        gs = kwargs.get("guidance_scale")
        check_edit_guidance(pipe, kwargs["edit_guidance"], guidance_scale_for(pipe, gs), seeds,
                            kwargs.get("steps", 50))
    out = Path(out_dir)
    with FolderLock(out, "generate"):  # a second process writing here would mix its batches with these
        run_file = out / PARTS / "run.json"
        from .pipelines import as_recorded_model_state, pipeline_fingerprint

        # the model as loaded (scheduler, adapters, safety checker, weights): a resume refuses a model changed under
        # the same name (a scheduler swapped in its folder, a LoRA added to the same pipeline object). The batch size
        # is recorded, not compared: each finished part names the images it holds, so a resume may take another size
        # (a lower one after the GPU ran out of memory). batch_layout 2: prompts with fewer seeds than batch_size share
        # batches (1: one prompt per batch, as runs started before the tenth session of 2026-11-26 lay out their batch
        # files; they resume with it)
        # "call": generate's own arguments, whatever the caller's settings name (a Python caller's may not)
        settings = {**settings, "batch_size": batch_size, "model_state": pipeline_fingerprint(pipe), "batch_layout": 2,
                    "call": _call_settings(pipe, kwargs)}
        key = json.dumps(settings, sort_keys=True, default=str)
        layout, first_size = 2, batch_size
        check_not_foreign(out, "generation.json", "generate")  # before anything here is removed
        if _stale_run(out):  # under the lock: no other process is writing here; every file left is of a batch that
            _remove_outputs(out)  # never finished (its part is written last)
        if resume and run_file.exists():
            before = _read_json(run_file, "the run's settings", "start over with --overwrite")
            now = json.loads(key)
            for later in ("model_state", "batch_layout", "call"):  # recorded since 2026-11-26's 9th / 10th session,
                # 2026-11-27 (call)
                if later not in before:
                    now.pop(later, None)
            if "model_state" in now:
                now["model_state"] = as_recorded_model_state(before.get("model_state"), now["model_state"])
            layout = before.get("batch_layout", 1)
            first_size = before.get("batch_size", batch_size)
            before.pop("batch_size", None)
            now.pop("batch_size", None)
            if before != now:
                diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
                raise ValueError(f"{str(out)!r} holds an unfinished generation made with other settings ({', '.join(diff)}); "
                                 "run it with those settings, or start over with --overwrite")
        elif resume and (out / "generation.json").exists():
            raise ValueError(f"{str(out)!r} holds a finished generation; nothing to resume (use --overwrite to redo it)")
        else:
            check_out_dir(out, overwrite)
            if overwrite:
                _remove_outputs(out)
            atomic_write(run_file, key.encode())
        items = [(pi, s) for pi in range(len(prompts)) for s in seeds]
        names = dict(zip(items, image_names([s for _, s in items])))
        pos = {it: i for i, it in enumerate(items)}
        finished = _finished_parts(out / PARTS, items, _batches(len(prompts), seeds, first_size, layout), first_size)
        todo = _batches(len(prompts), seeds, batch_size, layout, done={it for _, its, _ in finished for it in its})
        config, order, diag_parts, sizes = None, [], [], []
        latents, maps, amaps, targets, envs, blocked = [], {}, {}, [], [], []
        bar = tqdm(total=len(items), disable=not kwargs.pop("progress", True), desc="fastfair generate", unit="img")
        writer = BackgroundWriter("fastfair-generate-writer")
        failed = True
        try:
            for stem, batch, size in finished + [(None, b, batch_size) for b in todo]:
                if stem is not None:
                    t, info = _read_part(out / PARTS, stem)
                    if t["latents"].shape[0] != len(batch):  # an older run (no batch size recorded) resumed at another
                        raise ValueError(f"{str(out)!r} was started before fastfair recorded its batch size, with "
                                         f"another one than {batch_size}: resume it with the --batch-size it was "
                                         "started with, or start over with --overwrite")
                    bnames = [names[it] for it in batch]
                    if overlays and info["words"] and not any((out / "overlays").glob(f"{bnames[0]}_w0_*.png")):
                        # a batch finished by a version that wrote overlays only at the end
                        _write_overlays(out, bnames, ImagesOnDisk([out / "images" / f"{n}.png" for n in bnames]),
                                        {w: t[f"maps/{w}"] for w in info["words"]})
                else:
                    bp = list(dict.fromkeys(pi for pi, _ in batch))  # the batch's prompts x its seeds, prompt-major
                    kw = kwargs if negs is None else dict(kwargs, negative_prompt=[negs[pi] for pi in bp])
                    g = generate(pipe, [prompts[pi] for pi in bp], seeds=list(dict.fromkeys(s for _, s in batch)),
                                 batch_size=batch_size, progress=False, **kw)
                    t = {f"maps/{w}": m.contiguous() for w, m in g.maps.items()}
                    t.update({f"attr/{n}/{w}": m.contiguous() for n, d in g.attribution_maps.items() for w, m in d.items()})
                    t.update({f"diag/{k}": v.contiguous() for k, v in g.diagnostics.items()})
                    t["latents"] = g.latents.float().contiguous()
                    info = dict(config=g.config, words=list(g.maps), attributions={n: list(d) for n, d in g.attribution_maps.items()},
                                diagnostics=list(g.diagnostics), edit_targets=g.edit_targets, environment=g.environment,
                                safety_blocked=g.safety_blocked, items=[list(it) for it in batch], batch_size=batch_size)
                    # written in the background while the next batch generates (images, overlays, the part last)
                    writer.submit(_write_part, out, f"part-{names[batch[0]]}", [names[it] for it in batch], g.images,
                                  g.maps if overlays else {}, info, t)
                bar.update(len(batch))
                order += [pos[it] for it in batch]
                sizes.append(size)
                config = config or info["config"]
                targets += info.get("edit_targets") or []
                blocked += info.get("safety_blocked") or []
                add_environment(envs, info.get("environment"))
                latents.append(t["latents"])
                for w in info["words"]:
                    maps.setdefault(w, []).append(t[f"maps/{w}"])
                for n, ws in info["attributions"].items():
                    for w in ws:
                        amaps.setdefault(n, {}).setdefault(w, []).append(t[f"attr/{n}/{w}"])
                diag_parts.append({k: t[f"diag/{k}"] for k in info["diagnostics"]})
            failed = False
        finally:
            if failed:  # the batch being written is kept (Ctrl-C, errors); its own failure must not hide this one
                try:
                    writer.close()
                except Exception as w:
                    print(f"fastfair: also, writing the last batch failed: {w}", file=sys.stderr)
            else:
                writer.close()  # a write error is raised here
        bar.close()
        if sorted(order) != list(range(len(items))):  # _finished_parts and _batches cover every image exactly once
            raise RuntimeError(f"{str(out)!r}: the finished parts and the batches made do not cover each image once")
        # parts in item order: a resume with another batch size finishes images in another order than one run
        perm = torch.tensor(sorted(range(len(order)), key=order.__getitem__))
        cat = lambda ts, dim=0: torch.cat(ts, dim).index_select(dim, perm)  # noqa: E731
        per_image = lambda xs: [xs[i] for i in perm.tolist()] if len(xs) == len(items) else []  # noqa: E731
        diagnostics = {}
        if diag_parts and diag_parts[0]:
            diagnostics = {k: cat([d[k] for d in diag_parts], 1) if diag_parts[0][k].dim() == 2
                           else diag_parts[0][k] for k in diag_parts[0]}
        images = ImagesOnDisk([out / "images" / f"{names[it]}.png" for it in items])
        gen = Generation(images=images, latents=cat(latents), maps={w: cat(v) for w, v in maps.items()},
                         prompts=[prompts[pi] for pi, _ in items], seeds=[s for _, s in items], config=dict(config),
                         diagnostics=diagnostics,
                         attribution_maps={n: {w: cat(v) for w, v in d.items()} for n, d in amaps.items()},
                         edit_targets=per_image(targets) or targets, environment=envs[-1] if envs else {}, environments=envs,
                         safety_blocked=per_image(blocked))
        used = sorted(set(sizes))  # the sizes the images were made with (a resume may make none at its own)
        gen.config = {**settings, **gen.config, "batch_size": used[0] if len(used) == 1 else batch_size,
                      "resumed_batches": len(finished)}  # generate's values win
        if len(used) > 1:  # resumed with another batch size: every size its images were made with
            gen.config["batch_sizes"] = used
        if negs is not None:  # each batch recorded its own prompt's negative prompt: the run used them all
            gen.config["negative_prompt"] = negs
        # images and overlays are on disk already (batch by batch): the maps and generation.json remain
        gen.save(out, overlays=overlays, overwrite=True, _keep=(PARTS, "images", "overlays"), _images=False)
        # the run is complete: its outputs are in Generation.save's layout. Renamed first, so that a kill while
        # deleting leaves a finished folder, not a half-deleted .parts every command refuses
        os.replace(out / PARTS, out / DONE_PARTS)
        shutil.rmtree(out / DONE_PARTS)
        return gen


def _check_attribution_names(names) -> None:
    """attribution_maps.safetensors keys are NAME/word: a name holding '/' cannot be saved."""
    bad = sorted(n for n in names if "/" in n)
    if bad:
        raise ValueError(f"an attribution name holds '/' ({', '.join(map(repr, bad))}), which the saved keys NAME/word "
                         "cannot; rename it")


def _batches(n_prompts: int, seeds: list, batch_size: int, layout: int = 2, done=frozenset()) -> list[list[tuple]]:
    """generate_to_dir's batches of (prompt index, seed), in item order (prompt-major), of the items not in ``done``
    (a resume's finished images). Each is a set of prompts crossed with a set of seeds (what one ``generate`` call
    makes): a prompt's remaining seeds in chunks of ``batch_size``; with fewer than that (layout 2), up to
    ``batch_size // len(seeds)`` consecutive prompts with the same remaining seeds per batch, so a run of many
    prompts and few seeds fills the GPU batch. Layout 1: one prompt per batch (runs started before layout 2)."""
    left = [(pi, [s for s in seeds if (pi, s) not in done]) for pi in range(n_prompts)]
    left = [(pi, ss) for pi, ss in left if ss]
    out, i = [], 0
    while i < len(left):
        pi, ss = left[i]
        per = batch_size // len(ss) if layout >= 2 and len(ss) < batch_size else 1
        if per > 1:
            group = left[i:i + per]
            group = group[:next((j for j, (_, s2) in enumerate(group) if s2 != ss), len(group))]
            out.append([(p, s) for p, _ in group for s in ss])
            i += len(group)
        else:
            out += [[(pi, s) for s in ss[j:j + batch_size]] for j in range(0, len(ss), batch_size)]
            i += 1
    return out


_REDO = "delete {stem}.safetensors and {stem}.json there and rerun with --resume to redo its images"


def _read_json(path: Path, what: str, way_out: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {str(path)!r} is unreadable ({e}); {way_out}") from None


def _read_part(parts: Path, stem: str) -> tuple[dict, dict]:
    """A finished batch's tensors and record, or an error naming the damaged file and the way out."""
    from safetensors.torch import load_file

    info = _read_json(parts / f"{stem}.json", "a finished batch's record", _REDO.format(stem=stem))
    try:
        return load_file(str(parts / f"{stem}.safetensors")), info
    except Exception as e:  # safetensors' own error type is not a ValueError
        raise ValueError(f"a finished batch's file {str(parts / (stem + '.safetensors'))!r} is unreadable "
                         f"({str(e).splitlines()[0][:200]}); {_REDO.format(stem=stem)}") from None


def _finished_parts(parts: Path, items: list, first: list[list[tuple]], first_size: int) -> list[tuple]:
    """A resumed generate_to_dir's finished parts: (file stem, its (prompt index, seed) items, its batch size), in
    item order. Parts written since 2026-11-27 ("part-*") list their items; older ones ("batch-NNNNN") are batch
    NNNNN of the run's first layout ``first``, made at ``first_size``. A part counts once its .safetensors is there
    (written last). Raises if two parts hold the same image, or a part holds an image the run does not plan."""
    known, out = set(items), []
    for f in sorted(parts.glob("*.safetensors")) if parts.is_dir() else []:
        stem = f.name[:-len(".safetensors")]
        if stem.startswith("batch-") and stem[6:].isdigit() and int(stem[6:]) < len(first):
            its, size = first[int(stem[6:])], first_size
        elif stem.startswith("part-"):
            info = _read_json(parts / f"{stem}.json", "a finished batch's record", _REDO.format(stem=stem))
            its, size = [tuple(it) for it in info["items"]], info["batch_size"]
        else:
            raise ValueError(f"{str(f)!r} is not a part of this generation; remove it, or start over with --overwrite")
        out.append((stem, its, size))
    seen = [it for _, its, _ in out for it in its]
    if len(set(seen)) != len(seen) or not set(seen) <= known:
        raise ValueError(f"{str(parts)!r} holds parts that overlap or name images this generation does not make; "
                         "start over with --overwrite")
    order = {it: i for i, it in enumerate(items)}
    return sorted(out, key=lambda p: order[p[1][0]])


def _check_words(pipe, prompts: list, kwargs: dict) -> None:
    """Resolve every word generate would map for every prompt (tokenizers only): a word missing from a later
    prompt fails before any image is made."""
    words = _parse_words(kwargs.get("maps"))
    attr = kwargs.get("attribution_prompt")
    for p in prompts:
        concepts.check_prompt(pipe, p)
        if words:
            _token_layout(pipe, [attr if attr is not None else p], words)
    attributions = _parse_attributions(kwargs.get("attributions"), len(prompts))
    _check_attribution_names(attributions)
    for texts, ws in attributions.values():
        for t in set(texts):
            _token_layout(pipe, [t], ws)
    g = kwargs.get("guidance")
    if g is not None:
        for p in ([g.attribution_prompt] if g.attribution_prompt else prompts):
            _token_layout(pipe, [p], g.words)


def _remove_outputs(out: Path, keep=()) -> None:
    import shutil

    for name in OUTPUTS:
        p = out / name
        if name in keep or not (p.exists() or p.is_symlink()):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


_OUR_FILE = re.compile(r"\d{4,}_seed\d+(_w\d+_[-\w]*)?\.png")


def _stale_run(out: Path) -> bool:
    """``out`` holds a generation that failed before its first batch finished (a bad size, backend, ...; or a kill
    while its images were written): ``.parts`` without a finished part, and only this run's own image / overlay files
    besides -- nothing to keep or resume; the corrected command starts afresh."""
    parts = out / PARTS
    if not parts.is_dir() or any(parts.glob("*.safetensors")):
        return False
    if any((out / n).exists() for n in OUTPUTS if n not in (PARTS, "images", "overlays")):
        return False
    return all(_OUR_FILE.fullmatch(f.name) for d in ("images", "overlays") if (out / d).is_dir()
               for f in (out / d).iterdir())


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False, resuming: bool = False) -> Path:
    """The output folder of ``Generation.save``, checked before any work: not a file, and not holding an
    earlier generation's outputs unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {str(out)!r} is a file; give a folder (it is created if missing)")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"output folder {str(out)!r} cannot be created: {str(parent)!r} is a file")
    check_not_foreign(out, "generation.json", "generate")
    if out.is_dir() and not overwrite:
        stale = _stale_run(out)
        found = [n for n in OUTPUTS if (out / n).exists() and not stale]
        if (out / PARTS).exists() and not stale:
            raise ValueError(f"output folder {str(out)!r} holds an unfinished generation: continue it with --resume "
                             "(the same settings), or start over with --overwrite")
        if found and resuming:
            raise ValueError(f"output folder {str(out)!r} holds a finished generation ({', '.join(found)}): nothing to "
                             "resume. Choose another folder, or start over with --overwrite")
        if found:
            raise ValueError(f"output folder {str(out)!r} already holds a generation ({', '.join(found)}); its images "
                             "and maps would mix with the new ones. Choose another folder, or overwrite it "
                             "(--overwrite / save(..., overwrite=True))")
    return out


def _encode_attribution(pipe, text: str, device) -> torch.Tensor:
    """Encoder states (1, L+2, C) of the attribution prompt: BOS, its tokens, EOS (no padding).
    CLIP's text encoder is causal, so these equal the first L+2 positions of the padded encoding."""
    if getattr(pipe, "unet", None) is None:
        return _encode_mmdit_text(pipe, text, device)
    n = len(concepts.prompt_tokens(concepts.pipeline_tokenizers(pipe)[0], text)) + 2
    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is not None:
            emb = pipe.encode_prompt(prompt=text, device=device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)[0]
        else:
            emb = pipe.encode_prompt(text, device, 1, False)[0]
    return emb[:, :n]


def _encode_mmdit_text(pipe, text: str, device) -> torch.Tensor:
    """An MMDiT's (SD3, Flux) encoder states (1, L, C) of an attribution prompt, exactly as the pipeline encodes a
    prompt (padded: SD3 77 CLIP + 256 T5 positions, Flux 512 T5 positions): its text stream starts from them
    (``fastfair.shadow``)."""
    concepts.check_prompt(pipe, text)
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_3"):  # SD3: (embeds, negative, pooled, negative pooled)
            return pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[0]
        return pipe.encode_prompt(prompt=text, prompt_2=None, device=device, num_images_per_prompt=1)[0]  # Flux


def _token_layout(pipe, texts: Sequence[str], words: Sequence[str]):
    """Per item: key positions (B, T) and word weights (B, W, T) with a word's map = mean of its tokens."""
    per_item = [[concepts.resolve(pipe, t, w).positions for w in words] for t in texts]
    T = max(sum(len(p) for p in item) for item in per_item)
    tok = torch.zeros(len(texts), T, dtype=torch.long)
    wts = torch.zeros(len(texts), len(words), T)
    for b, item in enumerate(per_item):
        col = 0
        for w, pos in enumerate(item):
            tok[b, col:col + len(pos)] = torch.tensor(pos)
            wts[b, w, col:col + len(pos)] = 1.0 / len(pos)
            col += len(pos)
    return tok, wts


def _parse_words(maps, main: bool = True) -> list[str]:
    """Words from "a,b" (empty pieces of a comma list are skipped) or a sequence of non-blank strings."""
    maps = () if maps is None else maps
    if isinstance(maps, str):
        if maps and not maps.replace(",", "").strip():
            raise ValueError(f"maps={maps!r} names no word; give words of the prompt, e.g. maps='doctor,face'")
        words = [w.strip() for w in maps.split(",") if w.strip()]
    else:
        maps = list(maps)
        bad = [w for w in maps if not isinstance(w, str) or not w.strip()]
        if bad:
            raise ValueError(f"maps must be non-blank words; got {bad!r} in {maps!r}")
        words = [w.strip() for w in maps]
    if len(set(words)) != len(words):
        raise ValueError(f"duplicate words in maps={words} (--maps)")
    if main and "latents" in words:  # maps.safetensors keeps the final latents under that key
        raise ValueError("'latents' cannot be a map word: maps.safetensors stores the final latents under that name. "
                         "Map it through an attribution prompt with another spelling, or rename it in the prompt")
    return words


def _parse_attributions(attributions, n_prompts: int) -> dict:
    """{name: (attribution prompt or one per prompt, words)} -> {name: (texts per prompt, words)}."""
    if attributions is None:
        return {}
    if not hasattr(attributions, "items"):
        raise TypeError("attributions must be a mapping name -> (attribution prompt, words), e.g. "
                        "{'gender': ('a photo of the face of a doctor and gender', ['doctor', 'gender'])}")
    out = {}
    for name, spec in attributions.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"attribution names must be non-empty strings; got {name!r}")
        if not isinstance(spec, (tuple, list)) or len(spec) != 2:
            raise ValueError(f"attributions[{name!r}] must be (attribution prompt, words); got {spec!r}")
        text, words = spec
        texts = [text] * n_prompts if isinstance(text, str) else list(text)
        if len(texts) != n_prompts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"attributions[{name!r}]: give one attribution prompt, or one per prompt "
                             f"({n_prompts}); got {text!r}")
        words = _parse_words(words, main=False)
        if not words:
            raise ValueError(f"attributions[{name!r}] has no words to map")
        out[name] = (texts, words)
    return out


def _stack_layouts(lay):
    """Per-item layouts [(tok (1,T_i), weights (1,W,T_i))] -> (B, T) tokens and (B, W, T) weights,
    padded with key 0 at weight 0."""
    T = max(t.shape[1] for t, _ in lay)
    tok = torch.stack([F.pad(t[0], (0, T - t.shape[1])) for t, _ in lay])
    wts = torch.stack([F.pad(w[0], (0, T - w.shape[2])) for _, w in lay])
    return tok, wts


def generate(pipe, prompt: str | Sequence[str], *, seeds, maps: str | Sequence[str] = (),
             attribution_prompt: str | Sequence[str] | None = None, attributions=None,
             steps: int = 50, guidance_scale: float | None = None,
             height: int | None = None, width: int | None = None, batch_size: int = 8,
             aggregation: str | Aggregation = "fastfair", map_steps: Sequence[int] | None = None,
             negative_prompt: str | Sequence[str] | None = None, backend: str = "auto", guidance=None,
             edit_guidance=None, progress: bool = True) -> Generation:
    """Generate images for every (prompt, seed) and capture per-word cross-attention maps.

    ``seeds=[s]`` reproduces ``pipe(prompt, generator=torch.Generator(device).manual_seed(s))``; the
    seeds alone fix the output, whatever ``batch_size``. ``maps`` are words of each prompt (or of
    ``attribution_prompt`` for open-vocabulary maps, e.g. "a photo of the face of a doctor and
    gender"). ``attributions`` adds open-vocabulary maps of further attribution prompts from the
    same generation: ``{name: (attribution prompt or one per prompt, words)}`` gives
    ``Generation.attribution_maps[name][word]``, equal to what ``maps=words,
    attribution_prompt=...`` would give, without generating the images again (BiasMap's
    attribution prompt holds one attribute word, so auditing gender, race and age of one image
    needs three). ``aggregation`` is "fastfair" (default: mean attention probability over heads, all
    layers and steps, on the latent grid), "daam" or "biasmap" (see ``fastfair.maps``).
    ``map_steps`` restricts the maps to those denoising step indices. ``guidance`` takes a
    ``fastfair.EntanglementGuidance`` (BiasMap's energy guidance); its per-step diagnostics land in
    ``Generation.diagnostics``. ``edit_guidance`` takes a ``fastfair.SemanticGuidance`` (SEGA) or
    ``fastfair.FairDiffusion`` (SD 1.x/2.x, SDXL and SD3, with classifier-free guidance); it combines with
    ``guidance`` as in BiasMap's released code, and its editing prompts get no maps. ``guidance_scale``
    defaults to 7.5 on UNet pipelines, to the pipeline's own default on SD3 (7.0) and Flux (3.5); FLUX.1-schnell
    has no guidance input (None, whatever is given).
    """
    from contextlib import ExitStack

    from tqdm.auto import tqdm

    check_text_to_image(pipe)
    if prompt is None or not isinstance(prompt, (str, list, tuple)):
        raise ValueError(f"prompt must be a string or a list of strings; got {type(prompt).__name__}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given")
    words = _parse_words(maps)
    extra = _parse_attributions(attributions, len(prompts))
    seeds = parse_seeds(seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    agg = Aggregation.get(aggregation)
    for p in prompts:
        concepts.check_prompt(pipe, p)  # length check up front, before any work
    negs = None
    if negative_prompt is not None:
        negs = _negative_prompts(negative_prompt, len(prompts))
        for n in set(negs):
            concepts.check_prompt(pipe, n)
    attr = None
    if attribution_prompt is not None:
        attr = [attribution_prompt] * len(prompts) if isinstance(attribution_prompt, str) else list(attribution_prompt)
        if len(attr) != len(prompts):
            raise ValueError(f"{len(attr)} attribution prompts for {len(prompts)} prompts; give one, or one per prompt")
        if not words:
            raise ValueError("attribution_prompt (--attribution-prompt) given but no maps= (--maps) words to map")

    device = pipe.device
    vsf = pipe.vae_scale_factor
    net = denoiser(pipe)
    if net is None:
        raise ValueError(f"{type(pipe).__name__} has neither a UNet nor a transformer; fastfair.generate runs "
                         "Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux pipelines")
    guidance_scale = guidance_scale_for(pipe, guidance_scale)
    if guidance_scale is not None and not np.isfinite(guidance_scale):  # NaN silently switched CFG off
        raise ValueError(f"guidance_scale must be a finite number; got {guidance_scale}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1; got {steps}")
    if guidance is not None and guidance.steps is not None and not any(i < steps for i in guidance.steps):
        raise ValueError(f"the guidance's steps {sorted(guidance.steps)} are all past the {steps} denoising steps "
                         f"(indices 0..{steps - 1}): no step would be guided")
    if guidance is not None and guidance.branch == "uncond" and (guidance_scale is None or guidance_scale <= 1
                                                                  or is_flux(net)):
        if is_flux(net):
            raise ValueError("branch='uncond' (--guide-branch uncond) reads the unconditional half of classifier-free "
                             "guidance; FLUX.1 is guidance-distilled and runs none at any guidance scale: use "
                             "branch='cond'")
        raise ValueError("branch='uncond' (--guide-branch uncond) reads the unconditional half of classifier-free "
                         f"guidance, which this call does not run (guidance_scale {guidance_scale}); use branch='cond' "
                         "or a guidance_scale > 1")
    if getattr(pipe, "unet", None) is None:  # SD3 / Flux (MMDiT): maps from the joint attention over the text tokens
        if negative_prompt is not None and is_flux(net):
            raise ValueError("FLUX.1 is guidance-distilled: its pipeline uses a negative prompt only with true CFG "
                             "(a second, unconditional transformer call per step), which fastfair does not run; "
                             "drop negative_prompt")
        if agg.name != "fastfair":
            raise ValueError(f"aggregation {agg.name!r} reads UNet blocks; {type(pipe).__name__} has none. "
                             "Use aggregation='fastfair'")
    for name, v in (("height", height), ("width", width)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name} (--{name}) must be a positive number of pixels (or None: the model's default); "
                             f"got {v!r}")
    sample_size = default_sample_size(pipe)
    height = height or sample_size * vsf
    width = width or sample_size * vsf
    # the latent grid's unit: the VAE's scale factor, times the patch size of an MMDiT (Flux packs 2x2 latents,
    # SD3 patchifies by patch_size; diffusers' Flux pipeline rounds other sizes down with a warning, SD3 refuses)
    psize = 2 if is_flux(net) else (getattr(getattr(net, "config", None), "patch_size", None) or 1)
    unit = vsf * psize
    if height % unit or width % unit:
        def near(x):
            lo = x // unit * unit
            return f"{lo} or {lo + unit}" if lo >= unit else f"{lo + unit}"
        raise ValueError(f"height and width must be multiples of {unit} on {type(pipe).__name__} (the VAE's scale "
                         f"factor {vsf}" + (f" x patch size {psize}" if psize > 1 else "") + f"); got {height}x{width}: "
                         f"use height {near(height)} and width {near(width)}")
    latent_hw = (height // vsf, width // vsf)
    if agg.name == "daam":
        daam_hw = 4096 if sample_size * vsf in (512, 1024) else 9216
    else:
        daam_hw = 4096

    items = [(pi, s) for pi in range(len(prompts)) for s in seeds]
    # resolve every word once per distinct text, before generating anything
    texts = attr if attr is not None else prompts
    layouts = {t: _token_layout(pipe, [t], words) for t in set(texts)} if words else {}
    # the keys the maps read: the attribution prompt's; on the unconditional CFG half (BiasMap's aggregation)
    # the prompt's own encoding too -- that half's own keys are the negative prompt's, which hold no prompt word
    state_texts = attr if attr is not None else (prompts if words and agg.branch == "uncond" else None)
    attr_states = {t: _encode_attribution(pipe, t, device) for t in set(state_texts)} if state_texts else {}
    extra_layouts = {}
    for name, (etexts, ewords) in extra.items():
        extra_layouts[name] = {t: _token_layout(pipe, [t], ewords) for t in set(etexts)}
        for t in set(etexts) - set(attr_states):
            attr_states[t] = _encode_attribution(pipe, t, device)
    edit_texts = {}
    if edit_guidance is not None:
        from .sega import check_edit_guidance, encode_edits

        texts_e = check_edit_guidance(pipe, edit_guidance, guidance_scale, seeds, steps)
        edit_texts = {t: encode_edits(pipe, [t], device) for t in texts_e}  # once, before the first image
    if guidance is not None:
        from .guidance import check_scheduler

        check_scheduler(pipe.scheduler, flow_model=getattr(pipe, "unet", None) is None)
        gwords = guidance.words
        gtexts = [guidance.attribution_prompt] * len(prompts) if guidance.attribution_prompt else prompts
        glayouts = {t: _token_layout(pipe, [t], gwords) for t in set(gtexts)}
        # keys of the guidance maps: the attribution prompt's, or on the unconditional half the prompt's own
        gstate_texts = gtexts if guidance.attribution_prompt or guidance.branch == "uncond" else None
        for t in set(gstate_texts or ()) - set(attr_states):
            attr_states[t] = _encode_attribution(pipe, t, device)
        gpairs = [(gwords.index(a), gwords.index(b)) for a, b in guidance.pairs]

    records = bool(words) or bool(extra)
    needs_patch = records or guidance is not None
    we_patched = False
    if needs_patch and not is_patched(pipe):
        patch(pipe, backend=backend)
        we_patched = True
    elif needs_patch:
        pipe._fastfair.backend = backend
    saved_pb = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)
    images, latents_out, map_chunks, diag_chunks, edit_targets, blocked = [], [], [], [], [], []
    extra_chunks = {name: [] for name in extra}
    bar = tqdm(total=len(items), disable=not progress, desc="fastfair generate", unit="img")
    # a batch's attribution encodings (BOS..EOS, unpadded on UNet pipelines) must have one length: batches
    # break where it changes (the seeds alone fix each image, so the grouping changes no output)
    lengths = [_state_lengths(pi, attr_states, state_texts, extra,
                              gstate_texts if guidance is not None else None) for pi, _ in items]
    sde_seed = (pipe.scheduler.noise_sampler_seed if type(pipe.scheduler).__name__ == "DPMSolverSDEScheduler"
                else _NO_SDE)
    try:
        for chunk in _chunks(items, lengths, batch_size):
            # each image's own generator: its initial latents, then (stochastic schedulers whose step takes a
            # generator: DDPM, ancestral, DPM++ SDE variants) its noise at every step, as pipe(prompt,
            # generator=manual_seed(s)) draws them
            gens = [torch.Generator(device).manual_seed(s) for _, s in chunk]
            lat = torch.cat([_initial_latents(pipe, g, latent_hw, device) for g in gens])
            rec = None
            if records:
                msteps = frozenset(map_steps) if map_steps is not None else None
                tok = ms = None
                if words:
                    tok, wts = _stack_layouts([layouts[texts[pi]] for pi, _ in chunk])
                    tok = tok.to(device)
                    ms = (torch.cat([attr_states[state_texts[pi]] for pi, _ in chunk]) if state_texts is not None
                          else None)
                rec = MapRecorder(tok, len(chunk), latent_hw, agg, map_states=ms, steps=msteps,
                                  daam_latent_hw=daam_hw)
                extra_wts = {}
                for name, (etexts, _) in extra.items():
                    etok, extra_wts[name] = _stack_layouts([extra_layouts[name][etexts[pi]] for pi, _ in chunk])
                    ems = torch.cat([attr_states[etexts[pi]] for pi, _ in chunk])
                    rec.extras[name] = MapRecorder(etok.to(device), len(chunk), latent_hw, agg, map_states=ems,
                                                   steps=msteps, daam_latent_hw=daam_hw,
                                                   _seen_factors=rec._seen_factors)
                pipe._fastfair.recorder = rec
            final = {}

            def on_step_end(_pipe, i, t, kw, _chunk=chunk, _rec=rec, _final=final):
                x = kw["latents"]
                bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
                if bad.any():
                    who = [f"{prompts[_chunk[j][0]]!r} seed {_chunk[j][1]}" for j in bad.nonzero().flatten().tolist()]
                    raise NonFiniteError(f"latents became non-finite at step {i} for {who}; try float32 "
                                         "(dtype=torch.float32) or a smaller guidance_scale")
                _final["latents"] = x.detach()
                if _rec is not None:
                    _rec.set_step(i + 1)
                return {}

            if sde_seed is not _NO_SDE:  # DPMSolverSDEScheduler draws its step noise from a Brownian tree, not from the
                # generators: one tree per image, seeded by the image's seed (else the global RNG seeds one tree for
                # the whole batch: images depend on the batch and are not reproducible)
                pipe.scheduler.noise_sampler_seed = [s % (2**63 - 1) for _, s in chunk]
            kwargs = dict(prompt=[prompts[pi] for pi, _ in chunk], latents=lat, generator=gens, num_inference_steps=steps,
                          guidance_scale=guidance_scale, height=height, width=width, output_type="pt",
                          callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
            if negative_prompt is not None:
                kwargs["negative_prompt"] = [negs[pi] for pi, _ in chunk]
            guider = None
            if guidance is not None:
                from .guidance import Guider

                gtok, gw = _stack_layouts([glayouts[gtexts[pi]] for pi, _ in chunk])
                gtok = gtok.to(device)
                ms = (torch.cat([attr_states[gstate_texts[pi]] for pi, _ in chunk]) if gstate_texts is not None
                      else None)
                guider = Guider(pipe, guidance, gtok, gpairs, latent_hw, ms, len(chunk))
                guider.word_weights = gw
            eguider = None
            if edit_guidance is not None:
                from .sega import EditGuider

                plans = [edit_guidance.plan(s) for _, s in chunk]
                ne = edit_guidance.n_concepts
                enc = [edit_texts[plans[b][0][c]] for c in range(ne) for b in range(len(chunk))]  # concept-major
                emb = torch.cat([e for e, _ in enc])
                pooled = torch.cat([p for _, p in enc]) if enc[0][1] is not None else None
                signs = torch.tensor([[-1.0 if plans[b][1][c] else 1.0 for b in range(len(chunk))] for c in range(ne)])
                eguider = EditGuider(pipe, edit_guidance, emb, pooled, signs, len(chunk), raw_forward=net.forward)
                if plans[0][2] is not None:
                    edit_targets.extend(p[2] for p in plans)
            with torch.no_grad(), ExitStack() as hooks:
                if guider is not None:
                    hooks.enter_context(guider)
                if eguider is not None:  # outermost: the guider inside sees the pipeline's own CFG call
                    hooks.enter_context(eguider)
                out = pipe(**kwargs)
            if guider is not None or eguider is not None:
                d = guider.diagnostics() if guider is not None else {}
                if eguider is not None:
                    d.update(eguider.diagnostics())
                diag_chunks.append(d)
            imgs = out.images
            bad = ~torch.isfinite(imgs.reshape(imgs.shape[0], -1)).all(1)
            if bad.any():
                raise NonFiniteError(f"decoded images are NaN/Inf for items {bad.nonzero().flatten().tolist()} "
                                     "(a half-precision VAE overflow?); use float32 or upcast the VAE")
            images.extend(pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(imgs)))
            flags = getattr(out, "nsfw_content_detected", None)
            if flags is not None:
                blocked.extend(bool(f) for f in flags)
            fin = final.get("latents", lat)
            if fin.dim() == 3:  # Flux packs 2x2 latent patches into tokens: back to (N, C, h, w)
                fin = pipe._unpack_latents(fin, height, width, vsf)
            latents_out.append(fin.float().cpu())
            if rec is not None:
                for r, w, dest in ([(rec, wts, map_chunks)] if words else []) + [
                        (rec.extras[name], extra_wts[name], extra_chunks[name]) for name in extra]:
                    m = r.finalize()  # (B, T, h, w)
                    wm = torch.einsum("bkt,btyx->bkyx", w.to(m.device, m.dtype), m).float().cpu()
                    if not torch.isfinite(wm).all():
                        raise NonFiniteError("attention maps are non-finite; use float32")
                    dest.append(wm)
                pipe._fastfair.recorder = None
            bar.update(len(chunk))
    finally:
        bar.close()
        if sde_seed is not _NO_SDE:
            pipe.scheduler.noise_sampler_seed = sde_seed
        if needs_patch:
            pipe._fastfair.recorder = None
        if we_patched:
            unpatch(pipe)
        pipe.set_progress_bar_config(**saved_pb)
    word_maps = {}
    if words:
        allm = torch.cat(map_chunks)
        word_maps = {w: allm[:, i].contiguous() for i, w in enumerate(words)}
    attribution_maps = {}
    for name, (_, ewords) in extra.items():
        allm = torch.cat(extra_chunks[name])
        attribution_maps[name] = {w: allm[:, i].contiguous() for i, w in enumerate(ewords)}
    diagnostics = {}
    if diag_chunks and diag_chunks[0]:
        diagnostics = {k: (torch.cat([d[k] for d in diag_chunks], dim=1) if diag_chunks[0][k].dim() == 2
                           else diag_chunks[0][k]) for k in diag_chunks[0]}
    from . import ops

    # what else the images depend on: the scheduler, the denoiser's dtype, the batch size (float rounding), and which
    # attention ran (fastfair's backend only when maps or guidance patched the pipeline; else diffusers' own)
    config = dict(steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                  scheduler=type(pipe.scheduler).__name__, dtype=str(next(net.parameters()).dtype).replace("torch.", ""),
                  batch_size=batch_size, backend=backend,
                  attention=(f"fastfair ({ops.resolve_backend(backend, device)})" if needs_patch
                             else "diffusers (no maps, no guidance)"),
                  aggregation=agg.name, attribution_prompt=attribution_prompt, map_steps=map_steps,
                  attributions={n: dict(prompt=t[0] if len(set(t)) == 1 else t, words=w) for n, (t, w) in extra.items()}
                  or None,
                  negative_prompt=negative_prompt, pipeline=type(pipe).__name__,
                  guidance=_describe_guidance(guidance),
                  edit_guidance=None if edit_guidance is None else edit_guidance.describe())
    return Generation(images=images, latents=torch.cat(latents_out), maps=word_maps,
                      prompts=[prompts[pi] for pi, _ in items], seeds=[s for _, s in items], config=config,
                      diagnostics=diagnostics, attribution_maps=attribution_maps, edit_targets=edit_targets,
                      environment=provenance(device), safety_blocked=blocked)


_NO_SDE = object()  # generate: the scheduler is not DPMSolverSDEScheduler
_GENERATE = generate  # its signature's defaults (tests replace the module attribute with wrappers)


def _describe_guidance(guidance) -> dict | None:
    """An EntanglementGuidance's settings as generate records them."""
    if guidance is None:
        return None
    return dict(pairs=guidance.pairs, scale=guidance.scale, max_grad_norm=guidance.max_grad_norm,
                on_large_grad=guidance.on_large_grad, attribution_prompt=guidance.attribution_prompt,
                steps=None if guidance.steps is None else sorted(guidance.steps), top_k=guidance.top_k,
                branch=guidance.branch)


def _call_settings(pipe, kwargs: dict) -> dict:
    """generate_to_dir's own record of the ``generate`` arguments its images depend on (every keyword, defaults
    filled in, the guidance scale resolved, guidance objects described), so that a resume with other ones is refused
    whatever the caller's ``settings`` name (the CLI names them; a Python caller may not)."""
    import inspect

    skip = {"pipe", "prompt", "seeds", "batch_size", "progress"}
    out = {k: p.default for k, p in inspect.signature(_GENERATE).parameters.items()
           if k not in skip and p.default is not inspect.Parameter.empty}
    out.update({k: v for k, v in kwargs.items() if k not in skip})
    out["maps"] = _parse_words(out["maps"])
    out["guidance_scale"] = guidance_scale_for(pipe, out["guidance_scale"])
    out["guidance"] = _describe_guidance(out["guidance"])
    out["edit_guidance"] = None if out["edit_guidance"] is None else out["edit_guidance"].describe()
    if isinstance(out["aggregation"], Aggregation):
        out["aggregation"] = out["aggregation"].name
    # FASTFAIR_BACKEND overrides backend="auto": a resume under another value would mix backends (the flag is compared)
    from .ops import backend_override

    out["backend_env"] = backend_override()
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def _state_lengths(pi: int, states: dict, state_texts, extra: dict, gstate_texts) -> tuple:
    """Prompt ``pi``'s attribution-encoding lengths: the maps', each further attribution prompt's, the guidance's."""
    out = [] if state_texts is None else [states[state_texts[pi]].shape[1]]
    out += [states[etexts[pi]].shape[1] for etexts, _ in extra.values()]
    if gstate_texts is not None:
        out.append(states[gstate_texts[pi]].shape[1])
    return tuple(out)


def _chunks(items: list, keys: list, batch_size: int):
    """``items`` in order, in batches of at most ``batch_size`` whose ``keys`` are equal."""
    chunk, key = [], None
    for item, k in zip(items, keys):
        if chunk and (len(chunk) == batch_size or k != key):
            yield chunk
            chunk = []
        chunk.append(item)
        key = k
    if chunk:
        yield chunk


def _negative_prompts(negative_prompt, n: int) -> list[str]:
    """One negative prompt per prompt, from one string or a sequence of ``n`` strings."""
    negs = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negs) != n or not all(isinstance(x, str) for x in negs):
        raise ValueError(f"negative_prompt must be one string, or one string per prompt ({n}); got {negative_prompt!r}")
    return negs


TEXT_TO_IMAGE = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")


def check_text_to_image(pipe) -> None:
    """Refuse pipelines ``generate`` does not run (image-to-image, inpainting, ControlNet, PAG, other model
    families): their calls need other inputs, or their attention is not where fastfair reads the maps."""
    names = {c.__name__ for c in type(pipe).__mro__}
    if not names & set(TEXT_TO_IMAGE):
        raise ValueError(f"fastfair generates with the text-to-image pipelines {', '.join(TEXT_TO_IMAGE)} (or their "
                         f"subclasses); got {type(pipe).__name__}. Build one from the same components, e.g. "
                         "StableDiffusionPipeline(**pipe.components) for an SD 1.x/2.x img2img or inpainting pipeline")


def _initial_latents(pipe, g: torch.Generator | int, latent_hw, device) -> torch.Tensor:
    """The latents ``pipe(..., generator=g)`` would draw (``g`` a generator, or a seed for a fresh
    ``torch.Generator(device).manual_seed(seed)``); ``g`` is left where the pipeline leaves it."""
    from diffusers.utils.torch_utils import randn_tensor

    if not isinstance(g, torch.Generator):
        g = torch.Generator(device).manual_seed(g)
    net = denoiser(pipe)
    if hasattr(pipe, "_pack_latents"):  # Flux: 16 channels drawn as (1, C, h, w), then packed into 2x2 tokens
        c = net.config.in_channels // 4
        x = randn_tensor((1, c, latent_hw[0], latent_hw[1]), generator=g, device=device, dtype=net.dtype)
        return pipe._pack_latents(x, 1, c, latent_hw[0], latent_hw[1])
    shape = (1, net.config.in_channels, latent_hw[0], latent_hw[1])
    return randn_tensor(shape, generator=g, device=device, dtype=net.dtype)
