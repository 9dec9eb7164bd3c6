"""Attribute classifiers for the output-distribution side of an audit.

An ``AttributeClassifier`` has ``labels`` -- attribute set name -> class labels -- and
``predict(images)`` -> {set name: (N, C) float64 probabilities, columns in ``labels`` order}.
A row of NaN means the classifier abstains on that image (no face found, say); abstentions are
left out of the frequencies.

* ``ClipZeroShot``: zero-shot CLIP through transformers' ``CLIPModel`` (default model id
  ``openai/clip-vit-large-patch14``). Each class has one or more text prompts; a class's text
  embedding is the normalised mean of its prompts' normalised embeddings (CLIP's prompt
  ensembling), and p(class | image) = softmax over the set's classes of
  ``exp(logit_scale) * cos(image, class)``.
* ``ModuleClassifier``: any ``torch.nn.Module`` that maps a (N, 3, H, W) batch in [0, 1] to
  {set name: (N, C) probabilities}.

``check_labels`` refuses a classifier whose labels do not match the audited attribute sets.
"""
from __future__ import annotations

import abc

import hashlib
import importlib
import importlib.util
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClassifierMismatchError(ValueError):
    """The classifier's attribute sets or labels differ from those being audited, or its output is
    not a probability table of the declared shape."""


class AttributeClassifier(abc.ABC):
    """Interface: ``labels`` and ``predict``; ``describe`` identifies the classifier in a run's settings."""

    labels: dict[str, tuple[str, ...]]

    @abc.abstractmethod
    def predict(self, images: Sequence) -> dict[str, np.ndarray]:
        """{attribute set: (N, K) probabilities} for a list of PIL images."""

    def describe(self) -> dict:
        return {"type": type(self).__name__, "labels": {k: list(v) for k, v in self.labels.items()}}


def check_labels(classifier: AttributeClassifier, attribute_sets) -> None:
    """Every audited set must be among the classifier's sets, with the same labels (any order)."""
    have = getattr(classifier, "labels", None)
    if not isinstance(have, Mapping):
        raise ClassifierMismatchError(f"{type(classifier).__name__} has no `labels` mapping (set name -> labels)")
    for s in attribute_sets:
        if isinstance(have.get(s.name), str):
            raise ClassifierMismatchError(f"the classifier's labels for {s.name!r} are one string ({have[s.name]!r}); "
                                          f"give a list of labels, e.g. {list(s.labels)}")
        if s.name not in have:
            raise ClassifierMismatchError(
                f"the classifier has no attribute set {s.name!r} (it classifies {sorted(have)}); audit only those "
                f"sets, or give a classifier with labels for {s.name!r} = {list(s.labels)}")
        got = tuple(have[s.name])
        if set(got) != set(s.labels) or len(got) != len(s.labels):
            raise ClassifierMismatchError(
                f"the classifier's labels for {s.name!r} are {list(got)} but the audited set {s.name!r} has "
                f"{list(s.labels)}; rename the classifier's labels or define a custom attribute set with its labels")


def check_probabilities(name: str, p, n: int, n_classes: int) -> np.ndarray:
    """(n, C) probabilities (rows of NaN allowed = abstain) or a clear error."""
    if isinstance(p, torch.Tensor):
        p = p.detach().float().cpu().numpy()
    if p is None:
        raise ClassifierMismatchError(f"the classifier returned no output for {name!r}; expected ({n}, {n_classes}) "
                                      "probabilities, one column per label")
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (n, n_classes):
        raise ClassifierMismatchError(f"classifier output for {name!r} has shape {p.shape}; "
                                      f"expected ({n}, {n_classes}) probabilities, one column per label")
    rows = np.isfinite(p).all(1)
    partial = ~rows & np.isfinite(p).any(1)
    if partial.any():
        raise ClassifierMismatchError(f"classifier output for {name!r} mixes NaN and numbers in a row; "
                                      "a row of all NaN means 'abstain', anything else must be probabilities")
    q = p[rows]
    if q.size and ((q < -1e-6).any() or (q > 1 + 1e-6).any() or (np.abs(q.sum(1) - 1) > 2e-2).any()):
        raise ClassifierMismatchError(f"classifier output for {name!r} is not probabilities "
                                      "(rows must be in [0, 1] and sum to 1); apply softmax to logits")
    if q.size:  # a softmax computed in bf16 / fp16 sums to 1 only within ~1e-2: renormalised
        p = p.copy()
        p[rows] = np.clip(q, 0.0, None) / np.clip(q, 0.0, None).sum(1, keepdims=True)
    return p


def _pil_rgb(img):
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def to_tensor(images: Sequence, size: int | None = None) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) float32 in [0, 1]; with ``size``, resized (bicubic) to size x size."""
    from PIL import Image

    out = []
    for img in images:
        im = _pil_rgb(img)
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass image_size= to resize them")
    return torch.stack(out)


def clip_preprocess(images: Sequence, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """CLIP's preprocessing: resize the shorter side to ``size`` (bicubic), centre crop, normalise."""
    from PIL import Image

    out = []
    for img in images:
        im = _pil_rgb(img)
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    return torch.stack(out)


class ClipZeroShot(AttributeClassifier):
    """Zero-shot CLIP over attribute prompts.

    ``prompts``: {set name: {label: [text prompts]}}; the labels of a set are its keys, in order.
    ``model`` is a ``transformers.CLIPModel``; ``tokenizer`` a CLIP tokenizer.
    """

    def __init__(self, model, tokenizer, prompts: Mapping[str, Mapping[str, Sequence[str]]], *,
                 image_size: int | None = None, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 device=None, batch_size: int = 32, model_id: str | None = None):
        if not prompts:
            raise ValueError("ClipZeroShot needs prompts: {set: {label: [text, ...]}}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompts = {s: {lab: [p] if isinstance(p, str) else list(p) for lab, p in d.items()}
                        for s, d in prompts.items()}
        for s, d in self.prompts.items():
            if len(d) < 2:
                raise ValueError(f"attribute set {s!r} needs prompts for at least two labels; got {list(d)}")
            for lab, ps in d.items():
                if not ps or not all(isinstance(p, str) and p.strip() for p in ps):
                    raise ValueError(f"label {lab!r} of {s!r} needs at least one non-empty text prompt")
        self.labels = {s: tuple(d) for s, d in self.prompts.items()}
        self.image_size = int(image_size or model.config.vision_config.image_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batch_size = batch_size
        self.model_id = model_id
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, model_id: str = DEFAULT_CLIP, attribute_sets=(), prompts=None, *, device=None,
                        dtype=None, **kwargs) -> "ClipZeroShot":
        """Load ``CLIPModel`` + tokenizer (+ the image processor's size, mean and std) from a hub id or folder.
        Prompts default to the attribute sets' own zero-shot prompts."""
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(model_id, torch_dtype=dtype or torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(model_id)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"could not load CLIP model {model_id!r} for the zero-shot classifier: {e}\n"
                               "(give --clip-model a local folder, --classifier python:FILE.py:FUNC for your own, "
                               "or --classifier none to skip the distribution audit)") from e
        size, mean, std = None, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(model_id)
            crop = getattr(proc, "crop_size", None) or {}
            size = crop.get("height") if isinstance(crop, dict) else None
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except Exception:  # no preprocessor config: the model's own image size and OpenAI's statistics
            pass
        if device is not None:
            model = model.to(device)
        if prompts is None:
            prompts = {s.name: {lab: list(ps) for lab, ps in zip(s.labels, s.prompts)} for s in attribute_sets}
        return cls(model, tokenizer, prompts, image_size=size, image_mean=mean, image_std=std, device=device,
                   model_id=model_id, **kwargs)

    def describe(self) -> dict:
        return {"type": "ClipZeroShot", "model": self.model_id or type(self.model).__name__,
                "prompts": self.prompts, "image_size": self.image_size}

    @torch.no_grad()
    def text_embeddings(self, name: str) -> torch.Tensor:
        """(C, D) unit class embeddings of set ``name`` (prompt-ensembled)."""
        if name not in self._text:
            rows = []
            for lab, ps in self.prompts[name].items():
                tok = self.tokenizer(list(ps), padding=True, return_tensors="pt")
                tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
                pooled = self.model.text_model(**tok).pooler_output
                e = self.model.text_projection(pooled).float()
                e = e / e.norm(dim=-1, keepdim=True)
                m = e.mean(0)
                rows.append(m / m.norm())
            self._text[name] = torch.stack(rows)
        return self._text[name]

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        """(N, D) unit image embeddings."""
        out = []
        dtype = next(self.model.parameters()).dtype
        for i in range(0, len(images), self.batch_size):
            x = clip_preprocess(images[i:i + self.batch_size], self.image_size, self.image_mean, self.image_std)
            pooled = self.model.vision_model(pixel_values=x.to(self.device, dtype)).pooler_output
            e = self.model.visual_projection(pooled).float()
            out.append(e / e.norm(dim=-1, keepdim=True))
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: Sequence) -> dict[str, np.ndarray]:
        if not len(images):
            return {s: np.zeros((0, len(lab))) for s, lab in self.labels.items()}
        img = self.image_embeddings(images)
        scale = float(self.model.logit_scale.detach().float().exp())
        out = {}
        for s in self.labels:
            logits = scale * img @ self.text_embeddings(s).T
            out[s] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
        return out


class ModuleClassifier(AttributeClassifier):
    """A user ``torch.nn.Module``: (N, 3, H, W) in [0, 1] -> {set name: (N, C) probabilities}.

    ``labels``: {set name: [labels]} in the module's column order (default: ``module.labels``).
    ``image_size``: resize images to this square size first (default: keep their size).
    """

    def __init__(self, module: torch.nn.Module, labels: Mapping[str, Sequence[str]] | None = None, *,
                 image_size: int | None = None, device=None, batch_size: int = 32, name: str | None = None):
        labels = labels if labels is not None else getattr(module, "labels", None)
        if not isinstance(labels, Mapping) or not labels:
            raise ClassifierMismatchError("a module classifier needs labels: pass labels={set: [label, ...]} "
                                          "or give the module a `labels` attribute")
        self.module = module.eval()
        self.labels = {str(s): tuple(str(x) for x in v) for s, v in labels.items()}
        for s, v in self.labels.items():
            if len(v) < 2 or len(set(v)) != len(v):
                raise ClassifierMismatchError(f"labels for {s!r} must be at least two distinct names; got {list(v)}")
        self.image_size = image_size
        try:
            default_device = next(module.parameters()).device
        except StopIteration:
            default_device = torch.device("cpu")
        self.device = torch.device(device) if device is not None else default_device
        self.batch_size = batch_size
        self.name = name or f"{type(module).__module__}.{type(module).__qualname__}"

    def describe(self) -> dict:
        return {"type": "ModuleClassifier", "module": self.name, "labels": {k: list(v) for k, v in self.labels.items()},
                "image_size": self.image_size}

    @torch.no_grad()
    def predict(self, images: Sequence) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {s: [] for s in self.labels}
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            out = self.module(to_tensor(chunk, self.image_size).to(self.device))
            if not isinstance(out, Mapping):
                raise ClassifierMismatchError(f"the classifier module returned {type(out).__name__}; it must return "
                                              f"{{set name: (N, C) probabilities}} for the sets {sorted(self.labels)}")
            missing = [s for s in self.labels if s not in out]
            if missing:
                raise ClassifierMismatchError(f"the classifier module returned sets {sorted(out)} but declared "
                                              f"labels for {sorted(self.labels)} (missing {missing})")
            for s, lab in self.labels.items():
                parts[s].append(check_probabilities(s, out[s], len(chunk), len(lab)))
        return {s: (np.concatenate(v) if v else np.zeros((0, len(self.labels[s])))) for s, v in parts.items()}


class ClipScore:
    """Prompt alignment of images, CLIP score as torchmetrics defines it: 100 * max(cos(image, prompt), 0) with
    CLIP's image and text embeddings (``ClipZeroShot``'s preprocessing: shorter side resized, centre crop)."""

    def __init__(self, zero_shot: "ClipZeroShot"):
        self.zs = zero_shot

    @classmethod
    def load(cls, classifier=None, model_id: str = DEFAULT_CLIP, device=None, attribute_sets=()) -> "ClipScore":
        """Reuse the audit's CLIP classifier (also inside ``FaceCrops``: the score is of the whole image), else load
        ``model_id`` (its zero-shot prompts, those of ``attribute_sets``, are not used for the score)."""
        inner = getattr(classifier, "inner", classifier)
        if isinstance(inner, ClipZeroShot):
            return cls(inner)
        if Path(model_id).exists():   # a local folder: recorded by its absolute path (runs compare by it)
            model_id = str(Path(model_id).resolve())
        try:
            return cls(ClipZeroShot.from_pretrained(model_id, attribute_sets, device=device))
        except RuntimeError as e:
            raise ValueError(f"--clip-score could not load CLIP model {model_id!r} ({e.__cause__ or e}); give "
                             "--clip-model a local CLIP folder, or leave --clip-score out") from e

    def describe(self) -> dict:
        return {"model": self.zs.model_id or type(self.zs.model).__name__, "score": "100 * max(cos, 0)"}

    @torch.no_grad()
    def __call__(self, images: Sequence, prompts: Sequence[str]) -> np.ndarray:
        zs = self.zs
        img = zs.image_embeddings(list(images))
        tok = zs.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        tok = {k: v.to(zs.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        txt = zs.model.text_projection(zs.model.text_model(**tok).pooler_output).float()
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (100.0 * (img * txt.to(img.device)).sum(-1).clamp_min(0)).double().cpu().numpy()


class FaceCrops(AttributeClassifier):
    """``classifier`` applied to the crop of each image's largest face (``fastfair.faces``: the box grown by
    ``expand`` to a square, ``crop_size`` pixels, black outside the image), abstaining (a NaN row) on images
    without a face -- the evaluation protocol of Shen et al. (faces only; images without one reported apart).
    ``detector``: "insightface", a callable on RGB uint8 images returning faces, or a ``FaceCropper`` (which
    brings its own crop size and expansion)."""

    def __init__(self, classifier: AttributeClassifier, detector, crop_size: int = 224, expand: float = 0.5):
        from .faces import FaceCropper, InsightFaceDetector

        if isinstance(detector, FaceCropper):
            self.cropper = detector
        else:
            if detector == "insightface":
                detector = InsightFaceDetector()
            elif isinstance(detector, str):
                raise ValueError(f"face detector {detector!r}: give 'insightface' or a callable on RGB uint8 images "
                                 "returning faces (see fastfair.faces)")
            self.cropper = FaceCropper(detector, crop_size=crop_size, expand=expand)
        self.inner = classifier
        self.labels = dict(classifier.labels)

    def describe(self) -> dict:
        d = self.cropper.describe()
        faces = " ".join(f"{k}={d[k]}" for k in ("detector", "crop_size", "expand"))
        # the inner classifier's keys stay at the top level (per-set parts are compared set by set)
        inner = (self.inner.describe() if hasattr(self.inner, "describe")   # duck-typed classifiers may have none
                 else {"type": type(self.inner).__name__, "labels": {k: list(v) for k, v in self.labels.items()}})
        return {**inner, "type": f"FaceCrops({inner.get('type')})", "face_crops": faces}

    def predict(self, images: Sequence) -> dict[str, np.ndarray]:
        from PIL import Image

        images = list(images)
        out = {k: np.full((len(images), len(v)), np.nan) for k, v in self.labels.items()}
        if not images:
            return out
        x = to_tensor(images)
        faces = self.cropper.detect(x)
        idx = faces.found.nonzero().flatten().tolist()
        if not idx:
            return out
        crops = self.cropper.crops(x, faces)
        arr = (crops.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        pred = self.inner.predict([Image.fromarray(a) for a in arr])
        for k in self.labels:
            p = check_probabilities(k, pred[k], len(idx), len(self.labels[k]))
            out[k][idx] = p
        return out


def as_classifier(obj, labels: Mapping[str, Sequence[str]] | None = None) -> AttributeClassifier:
    """An ``AttributeClassifier`` as is; a ``torch.nn.Module`` wrapped in ``ModuleClassifier``."""
    if isinstance(obj, AttributeClassifier):
        return obj
    if isinstance(obj, torch.nn.Module):
        return ModuleClassifier(obj, labels)
    if hasattr(obj, "predict") and hasattr(obj, "labels"):
        return obj  # duck-typed classifier
    raise ClassifierMismatchError(f"expected an AttributeClassifier (labels + predict) or a torch.nn.Module with "
                                  f"`labels`, got {type(obj).__name__}")


def _import_factory(ref: str, what: str = "classifier"):
    """"path/to/file.py:func" or "package.module:func" -> the callable."""
    if ":" not in ref:
        raise ValueError(f"python {what} {ref!r} must be FILE.py:FUNCTION or module:FUNCTION")
    mod_ref, func = ref.rsplit(":", 1)
    if mod_ref.endswith(".py"):
        path = Path(mod_ref)
        if not path.is_file():
            raise ValueError(f"{what} file {mod_ref!r} does not exist")
        name = "fastfair_user_classifier_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except Exception as e:  # the user's file: one line naming it, not a traceback through fastfair
            raise ValueError(f"python {what} {ref!r}: importing {mod_ref} failed: {_where(e, path)}") from e
    else:
        try:
            mod = importlib.import_module(mod_ref)
        except ImportError as e:
            raise ValueError(f"python {what} {ref!r}: cannot import {mod_ref!r} ({e})") from e
    if not hasattr(mod, func):
        raise ValueError(f"{mod_ref!r} has no function {func!r}")
    return _keywords_it_takes(getattr(mod, func))


def _where(e: BaseException, path: Path) -> str:
    """``e`` as one line, with the line of the user's file it came from."""
    import traceback

    line = next((f"{path.name}:{fs.lineno}" for fs in reversed(traceback.extract_tb(e.__traceback__))
                 if Path(fs.filename).resolve() == path.resolve()), None)
    if line is None and isinstance(e, SyntaxError) and e.lineno:
        line = f"{path.name}:{e.lineno}"
    return f"{type(e).__name__}: {e}" + (f" (at {line})" if line else "")


def _keywords_it_takes(fn):
    """``fn`` called with only the keyword arguments its signature names (all of them with ``**kwargs``): a
    factory ``def make(): ...`` works as well as ``def make(attribute_sets=None, device=None): ...``."""
    import functools
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn
    params = list(params)
    if any(p.kind in (p.VAR_KEYWORD, p.POSITIONAL_ONLY) for p in params):  # positional-only: its own TypeError
        return fn
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*args, **{k: v for k, v in kwargs.items() if k in names})

    return call


def classifier_digest(clf) -> str | None:
    """A digest of what decides a classifier's outputs, so that a resumed audit refuses one changed under the same
    name (a retrained checkpoint at the same path, a CLIP folder updated in place): the weights of its torch modules
    (``pipelines.module_digest``) and, for a ``python:FILE.py`` spec, the file's bytes. None when there is nothing
    to read (a plain callable)."""
    from .pipelines import module_digest

    parts = []
    inner = getattr(clf, "inner", None)  # FaceCrops: the classifier it wraps
    if inner is not None:
        parts.append(classifier_digest(inner) or "")
    seen = []
    for m in (clf, getattr(clf, "module", None), getattr(clf, "model", None), getattr(clf, "zs", None)):
        if isinstance(m, torch.nn.Module) and not any(m is x for x in seen):
            seen.append(m)
            parts.append(module_digest(m))
        elif m is not None and m is not clf and getattr(m, "model", None) is not None:  # ClipScore's zero-shot
            parts.append(classifier_digest(m) or "")
    if getattr(clf, "source_digest", None):
        parts.append(clf.source_digest)
    if not any(parts):
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def load_classifier(spec, attribute_sets=(), *, device=None, clip_model: str = DEFAULT_CLIP):
    """``"clip"`` / ``"clip:MODEL_ID"`` (zero-shot CLIP), ``"none"``, ``"python:FILE.py:FUNC"``
    (``FUNC(attribute_sets=..., device=...)`` returns a classifier or module), or an object (classifier or
    module). Returns None for "none"."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("none", "")):
        return None
    if not isinstance(spec, str):
        return as_classifier(spec)
    spec = spec.strip()
    if spec == "clip" or spec.startswith("clip:"):
        model_id = spec[5:] if spec.startswith("clip:") else clip_model
        return ClipZeroShot.from_pretrained(model_id, attribute_sets, device=device)
    if spec.startswith("python:"):
        ref = spec[len("python:"):]
        src = Path(ref.rsplit(":", 1)[0])
        factory = _import_factory(ref)
        try:
            obj = factory(attribute_sets=list(attribute_sets), device=device)
        except Exception as e:  # the user's factory failed: say whose
            raise ValueError(f"--classifier python:{ref}: the factory raised {_where(e, src)}") from e
        try:
            clf = as_classifier(obj)
        except ClassifierMismatchError as e:
            raise ClassifierMismatchError(f"--classifier python:{ref} returned {type(obj).__name__}: {e}") from None
        if isinstance(clf, ModuleClassifier) and clf.name.startswith("fastfair_user_classifier_"):
            clf.name = ref  # a file-loaded module's class path is a random module name: use the spec
        if src.suffix == ".py" and src.is_file():  # what the file hard-codes (thresholds, a weights path) counts too
            try:
                clf.source_digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
            except AttributeError:  # an object that takes no attributes: its weights alone
                pass
        return clf
    raise ValueError(f"unknown classifier {spec!r}; use clip, clip:MODEL_ID, none or python:FILE.py:FUNCTION")

