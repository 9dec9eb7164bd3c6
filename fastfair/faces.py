"""Faces in generated images: detection (any detector), differentiable face crops and aligned faces.

Shen et al.'s fairness finetuning classifies the *face* of each generated image, not the whole image: a
detector finds the largest face, its box is expanded (by 50%, to a square) and cropped to 224 x 224 for the
attribute classifier, and the five landmarks (eyes, nose tip, mouth corners) align the face onto the
112 x 112 ArcFace template for a face-recognition embedding (their face-realism loss). Images without a
face get no alignment target. This module holds those pieces; ``fastfair.dft`` uses them when a detector
is given.

Detectors: anything callable on one RGB ``uint8`` image (H, W, 3) returning a list of :class:`Face`
(box ``(x0, y0, x1, y1)`` in pixels, optional ``(5, 2)`` landmarks in the order left eye, right eye, nose
tip, left mouth corner, right mouth corner, optional score). :class:`InsightFaceDetector` wraps
insightface's ``FaceAnalysis`` detection model (``buffalo_l``), the detector of the paper's code
(``pip install insightface onnxruntime``; it downloads its model on first use).

Detection runs on the image quantised to ``uint8`` (no gradient); crops and alignment are differentiable
functions of the image, so losses on them reach the generator.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Face", "FaceBatch", "FaceCropper", "InsightFaceDetector", "FaceRecognitionDetector", "FirstFound",
           "load_detector", "ARCFACE_TEMPLATE_112", "expand_box",
           "largest_face", "crop_boxes", "similarity_transform", "warp_affine", "align_faces", "FaceError"]

# the five-point template of ArcFace's 112 x 112 aligned faces (left eye, right eye, nose tip, mouth corners)
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]])


class FaceError(ValueError):
    pass


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]          # x0, y0, x1, y1 in pixels
    landmarks: np.ndarray | None = None               # (5, 2) x, y in pixels
    score: float | None = None
    expand: float | None = None                       # this detector's box growth (None: the cropper's)


def _clipped_area(box, width: int, height: int) -> float:
    w = min(box[2], width) - max(box[0], 0)
    h = min(box[3], height) - max(box[1], 0)
    return max(w, 0.0) * max(h, 0.0)


def largest_face(faces: Sequence[Face], width: int, height: int) -> Face | None:
    """The face whose box covers the largest area inside the image (the first one on ties), or None."""
    best, area = None, -1.0
    for f in faces:
        a = _clipped_area(f.box, width, height)
        if a > area:
            best, area = f, a
    return best


def expand_box(box, coef: float = 0.5, ratio: float = 1.0) -> tuple[int, int, int, int]:
    """Grow a box to height/width ``ratio``: the longer side (relative to ``ratio``) grows by ``coef`` of itself,
    the other side follows the ratio, the centre stays; corners rounded to pixels (may fall outside the image)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        raise FaceError(f"face box {tuple(box)} has no area")
    if h / w > ratio:
        more_h = h * coef
        more_w = (h + more_h) / ratio - w
    else:
        more_w = w * coef
        more_h = (w + more_w) * ratio - h
    return (int(round(x0 - more_w / 2)), int(round(y0 - more_h / 2)),
            int(round(x1 + more_w / 2)), int(round(y1 + more_h / 2)))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):   # no half antialiasing on CPU
        return _resize(x.float(), size).to(x.dtype)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def crop_boxes(images: torch.Tensor, boxes: Sequence[Sequence[int]], size: int, fill: float = 0.0) -> torch.Tensor:
    """Differentiable crops: image i's pixels in ``boxes[i]`` (x0, y0, x1, y1; the parts outside the image are
    ``fill``), resized to ``size`` x ``size`` (bilinear, antialiased)."""
    if len(boxes) != len(images):
        raise FaceError(f"{len(boxes)} crop boxes for {len(images)} images")
    out = []
    H, W = images.shape[-2:]
    for img, box in zip(images, boxes):
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        if x1 <= x0 or y1 <= y0:
            raise FaceError(f"crop box {(x0, y0, x1, y1)} has no area")
        cx0, cx1 = min(max(x0, 0), W), min(max(x1, 0), W)
        cy0, cy1 = min(max(y0, 0), H), min(max(y1, 0), H)
        if cx1 > cx0 and cy1 > cy0:
            part = F.pad(img[:, cy0:cy1, cx0:cx1], (cx0 - x0, x1 - cx1, cy0 - y0, y1 - cy1), value=fill)
        else:                                              # the box lies entirely outside the image
            part = img.new_full((img.shape[0], y1 - y0, x1 - x0), fill) + 0 * img.sum()
        out.append(_resize(part[None], size))
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, translation; no reflection) mapping ``src``
    points onto ``dst`` points (Umeyama's solution), as a (2, 3) matrix acting on [x, y, 1]."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise FaceError(f"need matching (n >= 2, 2) point sets; got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    U, S, Vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(cov) < 0:
        sign[-1] = -1.0
    R = U @ np.diag(sign) @ Vt
    var = (s ** 2).sum(1).mean()
    if var <= 0:
        raise FaceError("the landmarks coincide: no transform can align them")
    scale = float((S * sign).sum() / var)
    M = np.zeros((2, 3))
    M[:, :2] = scale * R
    M[:, 2] = mu_d - scale * R @ mu_s
    return M


def warp_affine(images: torch.Tensor, M: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``out[..., y, x] = images[..., M^-1 (x, y)]`` sampled bilinearly, zero outside the image; pixel centres at
    integer coordinates (OpenCV's ``warpAffine`` convention, with ``M`` mapping input to output pixels).
    ``M``: (N, 2, 3). ``size``: (height, width). Differentiable in ``images``."""
    N, _, H, W = images.shape
    h, w = size
    A = torch.zeros((N, 3, 3), dtype=torch.float64)
    A[:, :2] = M.to(torch.float64).cpu()
    A[:, 2, 2] = 1
    inv = torch.linalg.inv(A)                              # output pixel -> input pixel
    # normalised output coords (align_corners=False) -> output pixels -> input pixels -> normalised input coords
    def norm(n):                                           # pixel p -> (2p + 1) / n - 1
        T = torch.eye(3, dtype=torch.float64)
        T[0, 0], T[0, 2] = 2.0 / n[1], 1.0 / n[1] - 1
        T[1, 1], T[1, 2] = 2.0 / n[0], 1.0 / n[0] - 1
        return T
    theta = norm((H, W)) @ inv @ torch.linalg.inv(norm((h, w)))
    grid = F.affine_grid(theta[:, :2].to(images.dtype).to(images.device), [N, images.shape[1], h, w],
                         align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def align_faces(images: torch.Tensor, landmarks: torch.Tensor | np.ndarray, size: int = 112,
                template: np.ndarray = ARCFACE_TEMPLATE_112) -> torch.Tensor:
    """Faces aligned by their five landmarks (N, 5, 2) onto ``template`` (ArcFace's 112 x 112 one, scaled to
    ``size``): (N, C, size, size), zero (black) outside the image, differentiable in ``images``."""
    lm = np.asarray(landmarks.detach().cpu() if isinstance(landmarks, torch.Tensor) else landmarks, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (5, 2) or len(lm) != len(images):
        raise FaceError(f"landmarks must be (N, 5, 2) for N={len(images)} images; got {lm.shape}")
    tpl = np.asarray(template, dtype=np.float64) * (size / 112.0)
    Ms = torch.tensor(np.stack([similarity_transform(p, tpl) for p in lm])) if len(lm) else torch.zeros((0, 2, 3))
    if not len(lm):
        return images.new_zeros((0, images.shape[1], size, size))
    return warp_affine(images, Ms, (size, size))


@dataclass
class FaceBatch:
    """The largest face of every image (``found[i]`` False where none was detected)."""
    found: torch.Tensor             # (N,) bool
    boxes: list                     # detected boxes (x0, y0, x1, y1) or None
    crop_boxes: list                # expanded integer boxes used for the crops, or None
    landmarks: list                 # (5, 2) arrays or None

    @property
    def n(self) -> int:
        return int(self.found.sum())


class FaceCropper:
    """Finds the largest face of each image with ``detector`` and cuts the classifier's crops and aligned faces.

    Settings follow Shen et al.'s code: box expanded by ``expand`` = 0.5 to a square, crops of ``crop_size`` =
    224 filled with black outside the image, aligned faces of ``aligned_size`` = 112 (ArcFace template)."""

    def __init__(self, detector: Callable, crop_size: int = 224, expand: float = 0.5, aligned_size: int = 112,
                 fill: float = 0.0):
        if not callable(detector):
            raise FaceError(f"the face detector must be callable on an RGB uint8 image (H, W, 3); got "
                            f"{type(detector).__name__}")
        if crop_size < 1 or aligned_size < 1 or expand < 0:
            raise FaceError("crop_size and aligned_size must be >= 1 and expand >= 0")
        self.detector = detector
        self.crop_size, self.expand, self.aligned_size, self.fill = int(crop_size), float(expand), int(aligned_size), fill

    @property
    def name(self) -> str:
        d = self.detector
        return getattr(d, "name", None) or (d.__qualname__ if isinstance(d, types.FunctionType) else type(d).__name__)

    def describe(self) -> dict:
        return dict(detector=self.name, crop_size=self.crop_size, expand=self.expand, aligned_size=self.aligned_size)

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> FaceBatch:
        """``images``: (N, 3, H, W) in [0, 1]. Detection sees each image as uint8 RGB (values truncated, as
        the paper's code does)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise FaceError(f"images must be (N, 3, H, W) in [0, 1]; got {tuple(images.shape)}")
        arr = (images.detach().float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        H, W = images.shape[-2:]
        found, boxes, cboxes, lms = [], [], [], []
        for a in arr:
            faces = [_as_face(f) for f in _face_list(self.detector(np.ascontiguousarray(a)))]
            f = largest_face(faces, W, H)
            if f is not None and _clipped_area(f.box, W, H) <= 0:
                f = None
            found.append(f is not None)
            boxes.append(None if f is None else tuple(float(v) for v in f.box))
            cboxes.append(None if f is None else expand_box(f.box, self.expand if f.expand is None else f.expand, 1.0))
            lms.append(None if f is None or f.landmarks is None else np.asarray(f.landmarks, dtype=np.float64))
        if any(found) and max(max(abs(v) for v in b) for b in boxes if b is not None) <= 1.5 and min(H, W) > 8:
            raise FaceError(f"every face box lies within [0, 1.5] on {W} x {H} images: the detector seems to return "
                            f"coordinates normalised to [0, 1]; {BOX_CONVENTION}")
        return FaceBatch(torch.tensor(found, dtype=torch.bool), boxes, cboxes, lms)

    def crops(self, images: torch.Tensor, faces: FaceBatch) -> torch.Tensor:
        """(n_found, 3, crop_size, crop_size) crops of the images with a face, in image order."""
        idx = [i for i, b in enumerate(faces.crop_boxes) if b is not None]
        if not idx:
            return images.new_zeros((0, images.shape[1], self.crop_size, self.crop_size))
        return crop_boxes(images[idx], [faces.crop_boxes[i] for i in idx], self.crop_size, self.fill)

    def aligned(self, images: torch.Tensor, faces: FaceBatch, which: Sequence[int]) -> torch.Tensor:
        """Aligned faces of images ``which`` (each must have a face with landmarks)."""
        which = list(which)
        missing = [i for i in which if faces.landmarks[i] is None]
        if missing:
            raise FaceError(f"images {missing} have no face landmarks: the face detector "
                            f"{self.name} must return five landmarks per face for aligned faces")
        if not which:
            return images.new_zeros((0, images.shape[1], self.aligned_size, self.aligned_size))
        return align_faces(images[which], np.stack([faces.landmarks[i] for i in which]), self.aligned_size)


BOX_CONVENTION = ("boxes are (x0, y0, x1, y1) in pixels of the image given to the detector (left, top, right, "
                  "bottom); convert face_recognition's (top, right, bottom, left) or an (x, y, width, height) "
                  "box first")


def _as_face(f) -> Face:
    """A detector's face in another shape, checked: a :class:`Face`, an object with ``bbox`` / ``kps`` /
    ``det_score`` (insightface), a mapping with ``box`` (or ``bbox``) / ``landmarks`` (or ``kps``) /
    ``score``, or a bare (x0, y0, x1, y1) box."""
    expand = None
    if isinstance(f, Face):
        box, lm, score, expand = f.box, f.landmarks, f.score, f.expand
    elif isinstance(f, dict):
        if "keypoints" in f or ("box" not in f and "bbox" not in f):
            raise FaceError(f"the face detector returned a dict with keys {sorted(f)}; fastfair reads 'box' "
                            "(x0, y0, x1, y1) and optional 'landmarks' (5, 2) and 'score' (mtcnn's {'box': [x, y, "
                            "w, h], 'keypoints': {...}} must be converted: box (x, y, x + w, y + h), landmarks in the "
                            "order left eye, right eye, nose, mouth left, mouth right)")
        box = f.get("box", f.get("bbox"))
        lm, score = f.get("landmarks", f.get("kps")), f.get("score", f.get("det_score"))
    elif hasattr(f, "bbox"):
        box, lm, score = f.bbox, getattr(f, "kps", None), getattr(f, "det_score", None)
    else:
        box, lm, score = f, None, None
    try:
        box = np.asarray(box.detach().cpu() if isinstance(box, torch.Tensor) else box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise FaceError(f"the face detector returned {f!r}: expected Face objects, (x0, y0, x1, y1) boxes or "
                        "dicts with 'box' and 'landmarks'") from e
    if len(box) != 4 and not (len(box) == 5 and hasattr(f, "bbox")):   # insightface-style (x0, y0, x1, y1, score)
        raise FaceError(f"the face detector returned a box of {len(box)} numbers {box.tolist()}; {BOX_CONVENTION}")
    box = box[:4]
    if not np.isfinite(box).all():
        raise FaceError(f"the face detector returned a non-finite box {box.tolist()}")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise FaceError(f"the face detector returned the box {box.tolist()}, whose right / bottom edge is not beyond "
                        f"its left / top edge; {BOX_CONVENTION}")
    if lm is not None:
        lm = np.asarray(lm.detach().cpu() if isinstance(lm, torch.Tensor) else lm, dtype=np.float64)
        if lm.shape != (5, 2):
            raise FaceError(f"the face detector returned landmarks of shape {lm.shape}; expected (5, 2): left eye, "
                            "right eye, nose tip, left and right mouth corners")
        if not np.isfinite(lm).all():
            raise FaceError(f"the face detector returned non-finite landmarks {lm.tolist()}")
    return Face(tuple(float(v) for v in box), lm, None if score is None else float(score), expand)


def _face_list(out) -> list:
    """A detector's return value as a list of faces: None / empty -> [], a single face or box -> [it], an (n, 4)
    array or tensor -> its rows."""
    if out is None:
        return []
    if isinstance(out, (Face, dict)) or hasattr(out, "bbox"):
        return [out]
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().numpy()
    if isinstance(out, np.ndarray):
        return [] if out.size == 0 else (list(out) if out.ndim == 2 else [out])
    out = list(out)
    if out and all(isinstance(v, (int, float, np.integer, np.floating)) for v in out):
        return [out]                                  # one bare box
    return out


class InsightFaceDetector:
    """insightface's ``FaceAnalysis`` detection model (``buffalo_l``'s RetinaFace-style detector at 640 x 640),
    the detector of Shen et al.'s code. Needs ``pip install insightface onnxruntime`` (``onnxruntime-gpu`` on
    CUDA) and downloads its model to ``root`` (default ``~/.insightface``) on first use. ``app``: an already
    prepared ``FaceAnalysis`` (or anything with its ``get(bgr_image)``)."""

    def __init__(self, model: str = "buffalo_l", det_size: int = 640, providers: Sequence[str] | None = None,
                 root: str | None = None, ctx_id: int = 0, app=None):
        self.model, self.det_size, self.providers, self.root, self.ctx_id = model, int(det_size), providers, root, ctx_id
        self._app = app
        self.name = f"insightface:{model}@{self.det_size}"
        if app is None:   # before any model or image work: a missing package is said now, not at the first image
            import importlib.util

            missing = [m for m in ("insightface", "onnxruntime") if importlib.util.find_spec(m) is None]
            if missing:
                raise FaceError(f"the insightface face detector needs {' and '.join(missing)}: pip install insightface "
                                "onnxruntime (onnxruntime-gpu on CUDA); or give any detector callable on an RGB uint8 "
                                "image (python:FILE.py:FUNC)")
            self.app   # load (and on first use download) the model now: a failure comes before any generation

    @property
    def app(self):
        if self._app is None:
            try:
                from insightface.app import FaceAnalysis
            except ImportError as e:
                raise FaceError("the insightface face detector needs `pip install insightface onnxruntime` "
                                "(onnxruntime-gpu on CUDA); or give any detector callable on an RGB uint8 image") from e
            kw = {"root": self.root} if self.root else {}
            if self.providers is not None:
                kw["providers"] = list(self.providers)
            try:
                app = FaceAnalysis(name=self.model, allowed_modules=["detection"], **kw)
                app.prepare(ctx_id=self.ctx_id, det_size=(self.det_size, self.det_size))
            except Exception as e:   # a download that failed, a missing model folder (insightface asserts)...
                raise FaceError(f"insightface could not load its {self.model!r} detection model: "
                                f"{type(e).__name__}: {e} (it downloads to {self.root or '~/.insightface'}/models on "
                                "first use; offline, put the model folder there)") from e
            self._app = app
        return self._app

    def __call__(self, image: np.ndarray) -> list[Face]:
        faces = self.app.get(np.ascontiguousarray(image[:, :, ::-1]))   # insightface takes BGR
        return [_as_face(f) for f in faces]


class FaceRecognitionDetector:
    """dlib's CNN face detector and 68-point landmarks through the ``face_recognition`` package, the paper's
    second detector (tried where insightface finds no face). As there: no upsampling, the five points are the
    eyes' centres, the nose bridge's last point and the upper lip's outer corners, and its boxes (tighter than
    insightface's) grow by 1.1 instead of 0.5. Needs ``pip install face_recognition`` (dlib)."""

    def __init__(self, model: str = "cnn", upsample: int = 0, landmarks_model: str = "large", expand: float = 1.1):
        import importlib.util

        if importlib.util.find_spec("face_recognition") is None:
            raise FaceError("the face_recognition detector needs `pip install face_recognition` (it builds dlib); or "
                            "give any detector callable on an RGB uint8 image (python:FILE.py:FUNC)")
        self.model, self.upsample, self.landmarks_model, self.expand = model, int(upsample), landmarks_model, expand
        self.name = f"face_recognition:{model}"

    def __call__(self, image: np.ndarray) -> list[Face]:
        import face_recognition as fr

        out = []
        for top, right, bottom, left in fr.face_locations(image, number_of_times_to_upsample=self.upsample,
                                                          model=self.model):
            marks = fr.face_landmarks(image, face_locations=[(top, right, bottom, left)], model=self.landmarks_model)
            kps = None
            if marks:
                d = marks[0]
                kps = np.stack([np.mean(d["left_eye"], 0), np.mean(d["right_eye"], 0), np.asarray(d["nose_bridge"][-1]),
                                np.asarray(d["top_lip"][0]), np.asarray(d["top_lip"][6])]).astype(np.float64)
            out.append(Face((float(left), float(top), float(right), float(bottom)), kps, None, self.expand))
        return out


class FirstFound:
    """Detectors tried in order on each image until one finds a face (the paper: insightface, then
    face_recognition)."""

    def __init__(self, detectors: Sequence[Callable]):
        self.detectors = list(detectors)
        if not self.detectors:
            raise FaceError("no face detectors to try")
        self.name = " then ".join(getattr(d, "name", None) or type(d).__name__ for d in self.detectors)

    def __call__(self, image: np.ndarray):
        for d in self.detectors:
            faces = _face_list(d(image))
            if faces:
                return faces
        return []


def load_detector(spec):
    """A detector from a CLI spec: ``insightface``, ``face_recognition``, ``python:FILE.py:FUNC`` (``FUNC()`` returns
    a callable on RGB uint8 images giving faces), or several joined by commas, tried in order until one finds a
    face (``insightface,face_recognition`` is the paper's); a callable or a :class:`FaceCropper` is returned as
    it is."""
    if spec is None or not isinstance(spec, str):
        return spec
    if "," in spec:
        return FirstFound([load_detector(part.strip()) for part in spec.split(",") if part.strip()])
    if spec == "insightface":
        return InsightFaceDetector()
    if spec == "face_recognition":
        return FaceRecognitionDetector()
    if spec.startswith("python:"):
        from .classify import _import_factory

        try:
            det = _import_factory(spec[len("python:"):], "face detector")()
        except ValueError as e:
            raise FaceError(str(e)) from e
        if not callable(det):
            raise FaceError(f"{spec} returned {type(det).__name__}; it must return a callable on RGB uint8 images")
        ref = spec[len("python:"):]
        mod, _, func = ref.rpartition(":")
        if mod.endswith(".py"):
            mod = str(Path(mod).resolve())
        if getattr(det, "name", None) is None:
            try:
                det.name = f"python:{mod}:{func}"   # how runs record it (a file-loaded module's names are not stable)
            except (AttributeError, TypeError):
                pass
        return det
    raise FaceError(f"face detector {spec!r}: give insightface, face_recognition, python:FILE.py:FUNCTION, or "
                    "several joined by commas (tried in order)")
