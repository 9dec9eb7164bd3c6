"""``fastfair.audit``: a resumable, shardable bias audit over professions x seeds.

For every profession p and seed s the audit generates the *neutral* image of ``template(p)`` and,
for in-prompt entanglement, one image per class word w of each audited attribute set
(``inprompt_template(w, p)``, "a photo of the face of a female doctor"). Per image it records:

* open-vocabulary entanglement (neutral images): for each attribute set's word a ("gender",
  "race", "age"), the maps of p and a looked up in the attribution prompt
  ``attribution_template(prompt, a)`` ("a photo of the face of a doctor and gender"), and their
  IoU@p and SoftIoU (``fastfair.metrics``);
* in-prompt entanglement (in-prompt images): IoU and SoftIoU of the maps of p and w in the prompt;
* the classifier's per-class probabilities and argmax for every attribute set, and the joint
  label of every intersection.

One row per image goes to Parquet (``fastfair.audit.store``). Work ids hash (model, prompt,
seed, settings); a run directory refuses other settings; ``resume=True`` skips committed rows.
Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) the plan is split round-robin by
rank, each rank commits its own part files, and rank 0 merges, summarises and writes the report.

The open-vocabulary maps of different attribute words need different attribution prompts; a
neutral image is generated once and every attribution prompt's maps come from that one UNet pass
(``generate(..., attributions=...)``).
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .. import concepts
from .._dist import barrier as _barrier, broadcast as _broadcast, setup as _dist_setup, teardown as _dist_teardown
from .._env import provenance
from ..classify import (AttributeClassifier, ClassifierMismatchError, check_labels, check_probabilities,
                        classifier_digest, load_classifier)
from . import prompts as P
from .attributes import AttributeSet, parse_attributes, slug
from .._io import BackgroundWriter, atomic_write, encode_pngs
from ..ops import backend_override
from ..pipelines import pipeline_fingerprint
from .store import RunDirError, RunStore

MODES = ("open", "inprompt")
DEFAULT_ATTRIBUTION_TEMPLATE = "{prompt} and {attribute}"


class AuditInputError(ValueError):
    """Bad audit input found before any image is generated."""


class AuditResult(NamedTuple):
    """``run_dir, results = fastfair.audit(...)``; ``.summary`` reads the run's summary.json."""

    run_dir: Path
    results: "object"  # pandas.DataFrame

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class WorkItem:
    work_id: str
    index: int
    kind: str                 # "neutral" | "inprompt"
    profession: str
    seed: int
    prompt: str
    attribute: str | None     # in-prompt: the attribute set
    label: str | None         # in-prompt: the class label
    word: str | None          # in-prompt: the class word in the prompt

    @property
    def group(self) -> tuple:
        return (self.kind, self.profession, self.attribute, self.label)


# ------------------------------------------------------------------------------------------ inputs

def parse_audit_seeds(seeds) -> list[int]:
    """An int N means seeds 0..N-1; otherwise as ``fastfair.generation.parse_seeds`` ("0-99", "1,5", [3, 4])."""
    from ..generation import parse_seeds

    if isinstance(seeds, bool):
        raise AuditInputError("seeds must be a count, a range or a list")
    if isinstance(seeds, int) or (isinstance(seeds, str) and seeds.strip().isdigit()):
        n = int(seeds)
        if n < 1:
            raise AuditInputError(f"seeds={seeds!r}: need at least one seed")
        return list(range(n))
    try:
        return parse_seeds(seeds)  # distinct, non-negative
    except ValueError as e:
        raise AuditInputError(str(e)) from e


def parse_targets(targets, sets: Sequence[AttributeSet]) -> dict[str, list[float]]:
    """{set: [p per label]} or "age=0.75,0.25;gender=0.5,0.5" -> validated targets (default uniform)."""
    by_name = {s.name: s for s in sets}
    out = {s.name: [1.0 / len(s.labels)] * len(s.labels) for s in sets}
    if not targets:
        return out
    if isinstance(targets, str):
        items = {}
        for part in targets.replace(";", " ").split():
            if "=" not in part:
                raise AuditInputError(f"target {part!r} must look like age=0.75,0.25")
            k, v = part.split("=", 1)
            try:
                items[k.strip()] = [float(x) for x in v.split(",") if x.strip()]
            except ValueError:
                raise AuditInputError(f"target {part!r}: the probabilities must be numbers, e.g. age=0.75,0.25") from None
        targets = items
    for name, t in dict(targets).items():
        if name not in by_name:
            raise AuditInputError(f"target for {name!r}, which is not an audited attribute set ({', '.join(by_name)})")
        labels = by_name[name].labels
        if isinstance(t, dict):
            missing = set(labels) - set(t)
            if missing or set(t) - set(labels):
                raise AuditInputError(f"target for {name!r} must give each of {list(labels)}; got {sorted(t)}")
            t = [t[lab] for lab in labels]
        t = [float(x) for x in t]
        if len(t) != len(labels) or any(x < 0 for x in t) or abs(sum(t) - 1) > 1e-6:
            raise AuditInputError(f"target for {name!r} must be {len(labels)} non-negative numbers summing to 1, "
                                  f"one per label {list(labels)}; got {t}")
        out[name] = t
    return out


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _describe_classifier(clf) -> dict:
    """The classifier's own description; a duck-typed one without ``describe()``: its type and labels."""
    d = getattr(clf, "describe", None)
    if callable(d):
        return d()
    return {"type": f"{type(clf).__module__}.{type(clf).__qualname__}",
            "labels": {k: list(v) for k, v in dict(clf.labels).items()}}


def _id_settings(settings: dict) -> dict:
    out = {k: v for k, v in settings.items() if k not in ("model_state", "classifier_weights", "clip_score_weights")}
    out["generation"] = {k: v for k, v in settings["generation"].items() if k not in ("backend", "backend_env")}
    return out


def _sha(obj, n: int) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _resolve_or_raise(pipe, text: str, word: str, what: str) -> None:
    """Raise unless ``word`` occurs in ``text`` exactly once: a map averages every occurrence, so an attribute word
    that is also part of the profession ("race" in "race car driver and race") would read the profession's token."""
    try:
        concepts.resolve(pipe, text, word)
    except concepts.ConceptError as e:
        raise AuditInputError(f"{what}: {e}") from None
    # occurrences as whole words, as the tokenizers match them (counting token positions would count a word that
    # one tokenizer splits differently in context, e.g. T5 after a '/', as two)
    if len(re.findall(concepts.whole_word(word), text, flags=re.IGNORECASE)) > 1:
        raise AuditInputError(f"{what}: {word!r} occurs more than once in {text!r}, and its map would average every "
                              "occurrence (e.g. an attribute word that is part of the profession). Rename the "
                              "profession in the prompt list (e.g. 'racing driver' for 'race car driver') or change "
                              "the template")


# ------------------------------------------------------------------------------------------ plan

def without_prefix(prompt: str, prefix: str | None) -> str:
    """``prompt`` without the ``prefix`` (DFT's soft tokens) that generation put before it."""
    pre = f"{prefix} " if prefix else ""
    return prompt[len(pre):] if pre and prompt.startswith(pre) else prompt


def attribution_prompt(template: str, profession: str, word: str, prompt: str, prefix: str | None = None) -> str:
    """The open-vocabulary attribution prompt of an image of ``prompt``. With a prompt prefix (DFT's soft tokens)
    it is built from the prompt without the prefix and then prefixed, as every text the finetuned model encodes:
    the same text whether the template says {prompt} or spells the prompt out."""
    text = P.fill(template, profession, attribute=word, prompt=without_prefix(prompt, prefix))
    return f"{prefix} {text}" if prefix else text


def build_plan(professions, seeds, template, sets, modes, inprompt_template, model, settings_hash) -> list[WorkItem]:
    items: list[WorkItem] = []

    def add(kind, prof, prompt, attribute=None, label=None, word=None):
        for s in seeds:
            wid = _sha([model, prompt, s, settings_hash, kind, attribute, label], 20)
            items.append(WorkItem(wid, len(items), kind, prof, s, prompt, attribute, label, word))

    for prof in professions:
        add("neutral", prof, P.fill(template, prof))
        if "inprompt" in modes:
            for st in sets:
                for lab, w in zip(st.labels, st.words):
                    add("inprompt", prof, P.fill(inprompt_template, prof, attribute=w), st.name, lab, w)
    ids = [it.work_id for it in items]
    if len(set(ids)) != len(ids):
        raise AuditInputError("two work items got the same id (a profession or class word listed twice?)")
    return items


def batches(items: Sequence[WorkItem], batch_size: int):
    """Consecutive items of the same group, at most ``batch_size`` each."""
    cur: list[WorkItem] = []
    for it in items:
        if cur and (it.group != cur[0].group or len(cur) >= batch_size):
            yield cur
            cur = []
        cur.append(it)
    if cur:
        yield cur


def row_schema(open_words, inprompt: bool, sets, inters, edit_target: bool = False, guided: bool = False,
               clip_score: bool = False, safety_checker: bool = False):
    import pyarrow as pa

    fields = [("work_id", pa.string()), ("kind", pa.string()), ("profession", pa.string()), ("prompt", pa.string()),
              ("seed", pa.int64()), ("attribute", pa.string()), ("label", pa.string()), ("word", pa.string()),
              ("image", pa.string()), ("maps", pa.string()), ("rank", pa.int32()), ("seconds", pa.float64())]
    if edit_target:  # Fair Diffusion: the group the image was steered towards
        fields.append(("edit_target", pa.string()))
    if guided:  # entanglement guidance: steps whose update applied, energy at the first and last guided step
        fields += [("guide_steps_applied", pa.int32()), ("guide_energy_first", pa.float64()),
                   ("guide_energy_last", pa.float64())]
    for w in open_words:
        fields += [(f"iou_open_{slug(w)}", pa.float64()), (f"softiou_open_{slug(w)}", pa.float64())]
    if inprompt:
        fields += [("iou_inprompt", pa.float64()), ("softiou_inprompt", pa.float64())]
    if safety_checker:  # the pipeline's safety checker blacked the image out: maps kept, no label, no CLIP score
        fields.append(("safety_blocked", pa.bool_()))
    if clip_score:
        fields.append(("clip_score", pa.float64()))
    for s in sets:
        fields += [(f"p_{s.slug}_{slug(lab)}", pa.float64()) for lab in s.labels]
        fields.append((f"pred_{s.slug}", pa.string()))
    for it in inters:
        fields.append((f"pred_{it.slug}", pa.string()))
    names = [n for n, _ in fields]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AuditInputError(f"attribute labels give clashing column names {dup}; rename the labels")
    return pa.schema(fields)


# ------------------------------------------------------------------------------------------ distributed

# ------------------------------------------------------------------------------------------ the audit

def audit(model=None, prompts="builtin:biasmap19", *, template: str = P.DEFAULT_TEMPLATE,
          attributes="gender", seeds=8, out="runs/audit", entanglement=MODES,
          attribution_template: str = DEFAULT_ATTRIBUTION_TEMPLATE, inprompt_template: str | None = None,
          classifier="clip", clip_model: str | None = None, targets=None, custom_attributes: dict | None = None,
          steps: int = 50, guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
          negative_prompt: str | None = None, aggregation: str = "fastfair", percentile: float = 70.0,
          soft_iou_top_k: float | None = 0.3, soft_iou_gamma: float = 0.01, soft_iou_iters: int = 20,
          batch_size: int = 8, device=None, dtype=None, backend: str = "auto", pipeline=None,
          resume: bool = False, overwrite: bool = False, save_maps: bool = True, report: bool = True,
          n_boot: int = 1000, boot_seed: int = 0, progress: bool = True, edit_guidance=None,
          guide: str | None = None, guide_options: dict | None = None, face_detector=None,
          face_crop_size: int = 224, face_expand: float = 0.5, clip_score: bool = False,
          prompt_prefix: str | None = None, dist_timeout_s: float = 6 * 3600) -> AuditResult:
    """Run (or resume) an audit; returns ``AuditResult(run_dir, results_dataframe)``.

    ``model``: preset / hub id / folder (``pipeline=`` gives an already loaded pipeline; ``model``
    is then its name in the settings). ``prompts``: ``builtin:biasmap19|winobias|broad``,
    ``file:PATH``, ``list:a,b`` or a list. ``attributes``: "gender,race,age,fairface4,fairface7",
    intersections "gender*race" (every pair of listed sets is also reported). ``entanglement``:
    any of "open", "inprompt" (or "none"). ``classifier``: "clip" (zero-shot, ``clip_model``),
    "clip:ID", "none", "python:FILE.py:FUNC", an ``AttributeClassifier`` or a ``torch.nn.Module``
    returning {set: probabilities} (with a ``labels`` attribute). ``targets``: {set: [p per label]}
    or "age=0.75,0.25" (default uniform). ``seeds``: N (0..N-1), "0-99" or a list.
    ``custom_attributes``: extra sets, {name: dict(labels=[...], words=[...], prompts=[[...], ...],
    open_word=...)}, usable in ``attributes``. ``edit_guidance``: a ``fastfair.FairDiffusion`` or
    ``fastfair.SemanticGuidance`` applied to every neutral generation (the audited model is then the
    pipeline with that mitigation, as BiasMap's baseline; in-prompt images name the attribute and are
    generated without it); Fair Diffusion's group per image lands in ``edit_target``.
    ``guide``: an audited attribute set's name -- every neutral image is generated with BiasMap's
    entanglement guidance between the profession and that set's word in its attribution prompt
    (``fastfair.EntanglementGuidance(profession, word, attribution_prompt=..., **guide_options)``), so
    the audit measures the mitigated model (open-vocabulary entanglement only); rows gain
    ``guide_steps_applied``, ``guide_energy_first`` and ``guide_energy_last``.
    ``face_detector``: classify each image's largest face instead of the whole image ("insightface",
    "python:FILE.py:FUNC" or a callable on RGB uint8 images; ``fastfair.classify.FaceCrops``); images without
    a face are abstentions (left out of the frequencies, counted in the summary's ``abstained``).
    ``clip_score``: every image's prompt alignment, 100 * max(cos(image, its prompt), 0) with CLIP (the CLIP
    classifier's model, else ``clip_model``), column ``clip_score``, summarised per profession.
    ``prompt_prefix``: text put before every generated prompt (DFT's soft tokens, ``--soft-tokens``): part of the
    model, so the settings keep the templates as given and ``compare`` pairs the run with a baseline; CLIP scores
    are against the prompt without it.
    """
    from ..generation import generate

    rank, world, local, own_pg = _dist_setup(dist_timeout_s)
    store = None
    try:
        # ---- inputs that need no model
        try:
            professions = P.load_professions(prompts)
            P.check_template(template, {"profession"}, {"", "profession"}, "template")
        except P.PromptSetError as e:
            raise AuditInputError(str(e)) from None
        seeds = parse_audit_seeds(seeds)
        modes = [entanglement] if isinstance(entanglement, str) else list(entanglement)
        modes = [m.strip() for part in modes for m in str(part).split(",") if m.strip()]
        if modes == ["none"] or not modes:
            modes = []
        if modes == ["both"]:
            modes = list(MODES)
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise AuditInputError(f"unknown entanglement mode(s) {bad}; choose from {', '.join(MODES)} or none")
        try:
            sets, inters = parse_attributes(attributes, custom_attributes)
        except ValueError as e:
            raise AuditInputError(str(e)) from None
        targets_v = parse_targets(targets, sets)
        if batch_size < 1:
            raise AuditInputError(f"batch_size must be >= 1; got {batch_size}")
        if resume and overwrite:  # overwrite won silently: the run the user asked to continue was deleted
            raise AuditInputError("resume=True (--resume) continues the run in --out, overwrite=True (--overwrite) "
                                  "deletes it: give one")
        if not 0 <= percentile < 100:  # at 100 no pixel is strictly above the threshold: every IoU undefined
            raise AuditInputError(f"percentile must be in [0, 100); got {percentile} (BiasMap uses 70)")
        per_rank = -(-len(seeds) // world)  # a prompt's seeds are dealt round-robin over the ranks
        if batch_size > per_rank and rank == 0:
            import warnings

            on = f" on each of {world} processes" if world > 1 else ""
            warnings.warn(f"batch_size {batch_size} > {per_rank} seed(s){on}: an audit's GPU batch holds one "
                          f"prompt's seeds (a profession, or a profession with one class word), so at most "
                          f"{per_rank} image(s); more seeds per profession fill larger batches", UserWarning,
                          stacklevel=2)
        if steps < 1:
            raise AuditInputError(f"steps must be >= 1; got {steps}")
        if isinstance(n_boot, bool) or int(n_boot) != n_boot or n_boot < 0:
            raise AuditInputError(f"n_boot must be a whole number >= 0 (0: no confidence intervals); got {n_boot}")
        guide_opts = dict(guide_options or {})
        if guide is None and guide_opts:
            raise AuditInputError(f"guide_options {sorted(guide_opts)} given without guide=<attribute set>: the "
                                  "audit would run unguided")
        if guide is not None:
            from ..guidance import EntanglementGuidance

            names = [s.name for s in sets]
            if guide not in names:
                raise AuditInputError(f"guide={guide!r} names no audited attribute set; audited: {names}")
            if "inprompt" in modes:
                raise AuditInputError("entanglement guidance mitigates the neutral generations, and in-prompt images "
                                      "name the attribute: audit with entanglement='open' (--entanglement open)")
            if "open" not in modes:
                raise AuditInputError("guide= needs entanglement='open': the guided pair is the profession and the "
                                      "attribute word in the attribution prompt")
            bad = sorted(set(guide_opts) - {"scale", "max_grad_norm", "on_large_grad", "steps", "top_k", "gamma",
                                             "iters", "checkpointing", "branch"})
            if bad:
                raise AuditInputError(f"unknown guide_options {bad}")
            try:
                EntanglementGuidance("a", "b", **guide_opts)  # the options' own checks, before any work
            except (TypeError, ValueError) as e:
                raise AuditInputError(str(e)) from None
            gsteps = guide_opts.get("steps")
            if gsteps is not None:
                gsteps = list(gsteps)
                if not gsteps or any(isinstance(i, bool) or int(i) != i or not 0 <= i < steps for i in gsteps):
                    raise AuditInputError(f"guide_options steps {gsteps} must be a non-empty list of step indices "
                                          f"in 0..{steps - 1}")
        if inprompt_template is None:
            inprompt_template = P.inprompt_template_from(template)
        if prompt_prefix is not None and (not isinstance(prompt_prefix, str) or not prompt_prefix.strip()
                                          or "{" in prompt_prefix):
            raise AuditInputError(f"prompt_prefix must be a non-empty string without braces (e.g. DFT's soft tokens "
                                  f"'<fastfair>'); got {prompt_prefix!r}")
        try:
            if "inprompt" in modes:
                P.check_template(inprompt_template, {"profession", "attribute"}, {"", "profession", "attribute"},
                                 "in-prompt template")
            if "open" in modes:
                P.check_template(attribution_template, set(), {"", "profession", "attribute", "prompt"},
                                 "attribution template")
        except P.PromptSetError as e:
            raise AuditInputError(str(e)) from None

        # ---- the pipeline (after a quick look whether another process works in --out: said before the loading)
        from .._io import flock_held

        if flock_held(Path(out) / "locks" / f"rank{rank}.lock"):
            raise RunDirError(f"another fastfair audit process (rank {rank}) is working in {out}; wait for it to "
                              "finish, or use another --out")
        if pipeline is None:
            from ..pipelines import load_pipeline

            if model is None:
                raise AuditInputError("give model= (a preset such as tiny-sd, a hub id or a folder) or pipeline=")
            if device is None:
                device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
            if dtype is None:
                dtype = "fp16" if str(device).startswith("cuda") else "fp32"
            pipe = load_pipeline(str(model), device=device, dtype=dtype)
            model_name = str(model)
        else:
            pipe = pipeline
            model_name = str(model) if model is not None else str(getattr(pipe, "name_or_path", None)
                                                                  or type(pipe).__name__)
        dev = pipe.device
        from ..generation import check_text_to_image
        from ..processors import default_sample_size, denoiser, guidance_scale_for

        try:
            check_text_to_image(pipe)
        except ValueError as e:
            raise AuditInputError(str(e)) from None

        net = denoiser(pipe)
        if net is None:
            raise AuditInputError(f"{type(pipe).__name__} has neither a UNet nor a transformer: not a text-to-image "
                                  "diffusion pipeline fastfair can audit")
        size = default_sample_size(pipe) * pipe.vae_scale_factor
        height, width = height or size, width or size
        # recorded resolved: runs of one model with and without the flag are one run
        guidance_scale = guidance_scale_for(pipe, guidance_scale)
        if guide is not None and guide_opts.get("branch") == "uncond" and (
                guidance_scale is None or guidance_scale <= 1 or getattr(pipe, "unet", None) is None
                and hasattr(net, "single_transformer_blocks")):
            raise AuditInputError("guide_options branch='uncond' reads the unconditional half of classifier-free "
                                  f"guidance, which this audit does not run (guidance_scale {guidance_scale}); use "
                                  "branch='cond' or a guidance_scale > 1")
        if edit_guidance is not None:
            from ..sega import check_edit_guidance

            try:
                check_edit_guidance(pipe, edit_guidance, guidance_scale, seeds, steps)
            except (TypeError, ValueError) as e:
                raise AuditInputError(str(e)) from None

        # ---- the model sees every generated prompt after prompt_prefix (DFT's soft tokens: part of the model, not
        # of the measurement, so the settings keep the templates as given and compare pairs such runs with others)
        measured = dict(template=template, inprompt_template=inprompt_template)
        if prompt_prefix:
            template, inprompt_template = f"{prompt_prefix} {template}", f"{prompt_prefix} {inprompt_template}"

        # ---- every prompt and word, checked before any image
        open_words: list[str] = []
        if "open" in modes:
            for st in sets:
                if st.open_word not in open_words:
                    open_words.append(st.open_word)
        for prof in professions:
            prompt = P.fill(template, prof)
            if prompt_prefix:   # a pipeline rewrites every occurrence of a soft token, the word holding it too
                plain = P.fill(measured["template"], prof)
                hit = [t for t in prompt_prefix.split() if t in plain]
                if hit:
                    raise AuditInputError(f"the soft token {hit[0]!r} occurs in the prompt {plain!r}: the pipeline "
                                          "would rewrite that word into the soft tokens; load them under another "
                                          "token (--token)")
            _resolve_or_raise(pipe, prompt, prof, f"profession {prof!r} in the prompt made from the template")
            for w in open_words:
                ap = attribution_prompt(attribution_template, prof, w, prompt, prompt_prefix)
                _resolve_or_raise(pipe, ap, prof, f"profession {prof!r} in the attribution prompt {ap!r} "
                                                  f"(attribution template {attribution_template!r})")
                _resolve_or_raise(pipe, ap, w, f"attribute word {w!r} missing from the attribution prompt {ap!r} "
                                               f"(attribution template {attribution_template!r}; "
                                               "it needs {attribute})")
            if "inprompt" in modes:
                for st in sets:
                    for w in st.words:
                        ip = P.fill(inprompt_template, prof, attribute=w)
                        _resolve_or_raise(pipe, ip, prof, f"profession {prof!r} in the in-prompt prompt {ip!r}")
                        _resolve_or_raise(pipe, ip, w, f"attribute word {w!r} of {st.name!r} in the in-prompt "
                                                       f"prompt {ip!r} (in-prompt template {inprompt_template!r})")

        # ---- the classifier
        clf: AttributeClassifier | None = load_classifier(classifier, sets, device=dev,
                                                          clip_model=clip_model or "openai/clip-vit-large-patch14")
        if face_detector is None and (face_crop_size != 224 or face_expand != 0.5):
            raise AuditInputError("--face-crop-size / --face-expand only apply with --face-detector")
        if face_detector is not None:
            if clf is None:
                raise AuditInputError("a face detector crops faces for the attribute classifier: give --classifier "
                                      "too (it is 'none')")
            from ..classify import FaceCrops
            from ..faces import FaceError, load_detector

            try:
                clf = FaceCrops(clf, load_detector(face_detector), crop_size=face_crop_size, expand=face_expand)
            except (FaceError, ValueError) as e:
                raise AuditInputError(str(e)) from None
        if clf is not None:
            check_labels(clf, sets)
        scorer = None
        if clip_score:
            from ..classify import ClipScore

            scorer = ClipScore.load(clf, clip_model or "openai/clip-vit-large-patch14", device=dev, attribute_sets=sets)

        settings = {
            "model": model_name, "pipeline": type(pipe).__name__, "dtype": _dtype_name(net.dtype),
            "template": measured["template"], "entanglement": modes,
            **({"prompt_prefix": prompt_prefix} if prompt_prefix else {}),
            "attribution_template": attribution_template if "open" in modes else None,
            "inprompt_template": measured["inprompt_template"] if "inprompt" in modes else None,
            "attributes": {s.name: s.as_dict() for s in sets}, "intersections": [i.name for i in inters],
            "generation": {"steps": steps, "guidance_scale": guidance_scale, "height": height, "width": width,
                           "negative_prompt": negative_prompt, "aggregation": aggregation, "backend": backend,
                           # FASTFAIR_BACKEND overrides "auto": a resume under another value would mix backends
                           "backend_env": backend_override(),
                           **({} if edit_guidance is None else {"edit_guidance": edit_guidance.describe()}),
                           **({} if guide is None else {"guide": dict(attribute=guide, **{
                               k: (sorted(v) if k == "steps" and v is not None else v)
                               for k, v in sorted(guide_opts.items())})})},
            "metrics": {"percentile": percentile,
                        "soft_iou": {"top_k": soft_iou_top_k, "gamma": soft_iou_gamma, "iters": soft_iou_iters}},
            "classifier": _describe_classifier(clf) if clf is not None else None,
            **({"clip_score": scorer.describe()} if scorer is not None else {}),
            "save_maps": bool(save_maps), "maps_dtype": "float16",
            # the model as loaded: a resume refuses one changed under the same name (scheduler, adapters, weights)
            # (rank 0's: ranks on other GPUs could round a weight sum differently and refuse each other)
            "model_state": _broadcast(pipeline_fingerprint(pipe) if rank == 0 else None, world),
            # the classifier's and CLIP scorer's weights (and python: source), not just their names: a resume with a
            # retrained classifier at the same path would label half the rows with each
            "classifier_weights": _broadcast(classifier_digest(clf) if (rank == 0 and clf is not None) else None, world),
            **({"clip_score_weights": _broadcast(classifier_digest(scorer) if rank == 0 else None, world)}
               if scorer is not None else {}),
        }
        # work ids from the measurement settings: the later-recorded model state and backend stay out, so the rows of
        # a run directory made before they were recorded keep their ids (the lock still compares them when recorded)
        settings_hash = _sha(_id_settings(settings), 16)
        config = {
            "settings": settings, "settings_hash": settings_hash,
            "work": {"professions": professions, "seeds": seeds},
            "prompts_spec": prompts if isinstance(prompts, str) else "list",
            "summary": {"targets": targets_v, "n_boot": n_boot, "boot_seed": boot_seed, "level": 0.95},
            "fastfair_version": __import__("fastfair").__version__,
            # the store keeps every distinct one a resumed run was made under; with the batch size and process count
            # (batch composition moves results by float rounding; both may change on resume)
            "environments": [dict(provenance(dev), batch_size=batch_size, processes=world)],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        plan = build_plan(professions, seeds, template, sets, modes, inprompt_template, model_name, settings_hash)
        fair = edit_guidance is not None and hasattr(edit_guidance, "label_for")
        schema = row_schema(open_words, "inprompt" in modes, sets, inters, edit_target=fair, guided=guide is not None,
                            clip_score=scorer is not None,
                            safety_checker=getattr(pipe, "safety_checker", None) is not None)

        # ---- the run directory (rank 0 decides; everyone hears the verdict)
        store = RunStore(out, rank)
        verdict, failure = None, None
        if rank == 0:
            try:
                store.prepare(config, resume=resume, overwrite=overwrite)
            except Exception as e:  # every rank must hear it, or the others wait at the broadcast forever
                verdict, failure = f"{type(e).__name__}: {e}", e
        verdict = _broadcast(verdict, world)
        if failure is not None:
            raise failure
        if verdict is not None:
            raise RunDirError(f"rank 0 could not prepare {out}: {verdict}")
        if rank != 0:
            store.verify(config)
            store.acquire()
        done = store.done_ids()
        store.count_batch_parts()  # earlier sessions' batch parts count towards the next compaction
        mine = [it for it in plan if it.index % world == rank and it.work_id not in done]
        if rank == 0 and len(done) < len(plan):
            # a resumed run adds rows (and may compact shards away): an earlier results.parquet would be stale
            # until this run merges again; load_results reads the parts meanwhile (and after a kill)
            store.results_path.unlink(missing_ok=True)

        # ---- work
        ctx = _BatchContext(pipe=pipe, generate=generate, clf=clf, scorer=scorer, prompt_prefix=prompt_prefix,
                            sets=sets, inters=inters, open_words=open_words,
                            attribution_template=attribution_template, steps=steps, guidance_scale=guidance_scale,
                            height=height, width=width, negative_prompt=negative_prompt, aggregation=aggregation,
                            backend=backend, percentile=percentile,
                            soft=dict(top_k=soft_iou_top_k, gamma=soft_iou_gamma, iters=soft_iou_iters),
                            save_maps=save_maps, store=store, schema=schema, rank=rank,
                            edit_guidance=edit_guidance,
                            guide=None if guide is None else next(s for s in sets if s.name == guide).open_word,
                            guide_options=guide_opts)
        from tqdm.auto import tqdm

        desc = "fastfair audit" + (f" (rank 0 of {world})" if world > 1 else "")
        bar = tqdm(total=len(mine), disable=not progress or rank != 0, desc=desc, unit="img", dynamic_ncols=True)
        if done and rank == 0 and progress:
            bar.set_postfix_str(f"{len(done)} done before", refresh=False)
        try:
            for batch in batches(mine, batch_size):
                ctx.run(batch)
                bar.update(len(batch))
        finally:
            try:
                ctx.close()  # the last batch's files (also on Ctrl-C: a generated batch is kept)
            finally:
                bar.close()

        # ---- merge, summarise, report
        _barrier(world)
        if rank == 0:
            config = store.read_config() or config  # as recorded: a resumed run's first start and every environment
            df = store.merge([it.work_id for it in plan], config)
            missing = len(plan) - len(df)
            if missing:
                raise RuntimeError(f"{missing} planned image(s) have no row after the run; --resume to redo them")
            from .summary import summarize

            summary = summarize(df, config)
            atomic_write(store.root / "summary.json", json.dumps(summary, indent=2, default=_json_default).encode())
            abst = {n: b["overall"]["abstained"] for n, b in summary.get("distribution", {}).items()
                    if "parts" not in b and b.get("overall", {}).get("abstained")}
            if abst:
                import warnings

                warnings.warn(f"the classifier abstained (NaN probabilities: no face, a safety-checker block, or the "
                              f"classifier's own NaN) on {abst} image(s); they are left out of the frequencies "
                              "(summary.json: abstained)", stacklevel=2)
            if report:
                from .page import write_report

                write_report(store.root, df=df, config=config, summary=summary)
            store.cleanup_temps()
            store.remove_unnamed_shards()  # every rank has finished (barrier above): orphans of killed compactions
        _barrier(world)
        if rank != 0:
            import pandas as pd

            df = pd.read_parquet(store.results_path)
        return AuditResult(store.root, df)
    finally:
        if store is not None:
            store.release()
        _dist_teardown(own_pg)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _commit_batch(store, rows, schema, images: dict, maps, tag) -> None:
    """The writer's job: encode the batch's images, then the store's commit (images, maps, part file last)."""
    store.commit(rows, schema, dict(zip(images, encode_pngs(images.values()))), maps, tag)


@dataclass
class _BatchContext:
    pipe: object
    generate: object
    clf: object
    sets: list
    inters: list
    open_words: list
    attribution_template: str
    steps: int
    guidance_scale: float
    height: int
    width: int
    negative_prompt: str | None
    aggregation: str
    backend: str
    percentile: float
    soft: dict
    save_maps: bool
    store: RunStore
    schema: object
    rank: int
    edit_guidance: object = None
    guide: str | None = None  # the attribute word whose entanglement with the profession is guided
    guide_options: dict | None = None
    scorer: object = None  # CLIP score of every image against its prompt
    prompt_prefix: str | None = None  # not scored (DFT soft tokens: the model's, not the prompt's)
    # one background writer: a batch's PNG encoding and fsynced files overlap the next batch's generation; at most
    # one batch is in flight, and its part file (the commit record) is still written last
    _writer: BackgroundWriter = field(default_factory=lambda: BackgroundWriter("fastfair-audit-writer"))

    def _submit(self, *args) -> None:
        """Commit a batch in the background, after the previous one has finished (its error raised here)."""
        self._writer.submit(_commit_batch, self.store, *args)

    def drain(self) -> None:
        """Wait for the batch being written; raise its error."""
        self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    def _gen(self, prompt, seeds, words=(), attributions=None, guidance=None, edit=None):
        return self.generate(self.pipe, prompt, seeds=seeds, maps=list(words), attributions=attributions,
                             guidance=guidance, edit_guidance=edit,
                             steps=self.steps, guidance_scale=self.guidance_scale, height=self.height,
                             width=self.width, batch_size=len(seeds), aggregation=self.aggregation,
                             negative_prompt=self.negative_prompt, backend=self.backend, progress=False)

    def _pair(self, maps, a, b):
        from .. import metrics

        iou = metrics.iou(maps[a], maps[b], self.percentile).double().cpu().numpy()
        soft = metrics.soft_iou(maps[a], maps[b], top_k=self.soft["top_k"], gamma=self.soft["gamma"],
                                iters=self.soft["iters"]).double().cpu().numpy()
        return iou, soft

    def run(self, batch: list[WorkItem]) -> None:
        t0 = time.perf_counter()
        first = batch[0]
        prof, prompt = first.profession, first.prompt
        seeds = [it.seed for it in batch]
        tag = batch[0].work_id
        rows = [{f.name: None for f in self.schema} for _ in batch]
        maps: dict[str, torch.Tensor] = {}
        images = None
        gen = None
        if first.kind == "neutral":
            # one generation: every open word's attribution prompt is read from the same UNet pass
            attributions = {w: (attribution_prompt(self.attribution_template, prof, w, prompt, self.prompt_prefix),
                                [prof, w]) for w in self.open_words}
            guidance = None
            if self.guide is not None:
                from ..guidance import EntanglementGuidance

                guidance = EntanglementGuidance(prof, self.guide, attribution_prompt=attributions[self.guide][0],
                                                **self.guide_options)
            gen = self._gen(prompt, seeds, attributions=attributions or None, guidance=guidance,
                            edit=self.edit_guidance)
            images = gen.images
            if guidance is not None:
                d = gen.diagnostics
                for i in range(len(batch)):
                    guided = "applied" in d  # False only if no step of the window ran
                    rows[i]["guide_steps_applied"] = int(d["applied"][:, i].sum()) if guided else 0
                    rows[i]["guide_energy_first"] = float(d["energy"][0, i]) if guided else None
                    rows[i]["guide_energy_last"] = float(d["energy"][-1, i]) if guided else None
            for w in self.open_words:
                amaps = gen.attribution_maps[w]
                iou, soft = self._pair(amaps, prof, w)
                for i, it in enumerate(batch):
                    rows[i][f"iou_open_{slug(w)}"] = float(iou[i])
                    rows[i][f"softiou_open_{slug(w)}"] = float(soft[i])
                    maps[f"{it.work_id}:open:{slug(w)}:profession"] = amaps[prof][i].half()
                    maps[f"{it.work_id}:open:{slug(w)}:attribute"] = amaps[w][i].half()
        else:
            gen = self._gen(prompt, seeds, [prof, first.word])
            images = gen.images
            iou, soft = self._pair(gen.maps, prof, first.word)
            for i, it in enumerate(batch):
                rows[i]["iou_inprompt"] = float(iou[i])
                rows[i]["softiou_inprompt"] = float(soft[i])
                maps[f"{it.work_id}:inprompt::profession"] = gen.maps[prof][i].half()
                maps[f"{it.work_id}:inprompt::attribute"] = gen.maps[first.word][i].half()
        blocked = [bool(b) for b in gen.safety_blocked] if gen.safety_blocked else [False] * len(batch)
        if "safety_blocked" in self.schema.names:
            for i in range(len(batch)):
                rows[i]["safety_blocked"] = blocked[i]
        if self.scorer is not None:
            texts = [without_prefix(it.prompt, self.prompt_prefix) for it in batch]   # the prompt as written
            for i, sc in enumerate(self.scorer(images, texts)):
                rows[i]["clip_score"] = None if blocked[i] else float(sc)
        preds: dict[str, list] = {}
        if self.clf is not None:
            probs = self.clf.predict(images)
            if not isinstance(probs, dict) and not hasattr(probs, "keys"):
                raise ClassifierMismatchError(f"the classifier's predict() returned {type(probs).__name__}; expected "
                                              "{attribute set: (N, C) probabilities}")
            # every classifier's output is checked here (an AttributeClassifier subclass or a duck-typed one was used
            # unchecked: logits or a wrong column count went into the frequencies)
            probs = {st.name: check_probabilities(st.name, probs[st.name] if st.name in probs else None, len(batch),
                                                  len(self.clf.labels[st.name])) for st in self.sets}
            if any(blocked):  # a blacked-out picture shows no one: the classifier abstains on it
                probs = {k: np.where(np.asarray(blocked)[:, None], np.nan, np.asarray(v, dtype=np.float64))
                         for k, v in probs.items()}
            for st in self.sets:
                order = [list(self.clf.labels[st.name]).index(lab) for lab in st.labels]
                p = np.asarray(probs[st.name], dtype=np.float64)[:, order]
                preds[st.name] = []
                for i in range(len(batch)):
                    for j, lab in enumerate(st.labels):
                        rows[i][f"p_{st.slug}_{slug(lab)}"] = float(p[i, j])
                    lab = st.labels[int(np.argmax(p[i]))] if np.isfinite(p[i]).all() else None
                    rows[i][f"pred_{st.slug}"] = lab
                    preds[st.name].append(lab)
            for inter in self.inters:
                for i in range(len(batch)):
                    parts = [preds[n][i] for n in inter.parts]
                    rows[i][f"pred_{inter.slug}"] = "|".join(parts) if all(x is not None for x in parts) else None
        shard = f"maps/maps-r{self.rank}-{tag}.safetensors" if (maps and self.save_maps) else None
        pngs = {}
        secs = (time.perf_counter() - t0) / len(batch)
        for i, it in enumerate(batch):
            rel = self.store.image_relpath(it.work_id)
            pngs[rel] = images[i]  # encoded by the writer
            rows[i].update(work_id=it.work_id, kind=it.kind, profession=it.profession, prompt=it.prompt, seed=it.seed,
                           attribute=it.attribute, label=it.label, word=it.word, image=rel, maps=shard,
                           rank=self.rank, seconds=secs)
            if gen.edit_targets:
                rows[i]["edit_target"] = gen.edit_targets[i]
        self._submit(rows, self.schema, pngs, maps if self.save_maps else None, tag)
