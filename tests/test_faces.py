"""Faces (fastfair.faces) and DFT's face setting (Shen et al.): box expansion, differentiable crops and aligned
faces against independent float64 references, detector adapters, and DFT with a face detector -- crops for the
classifier, images without a face dropped from the alignment, the face-region relaxation of the quality loss,
the face-realism loss -- plus DINOv2 / several quality encoders.

Detectors here are stand-ins with the documented output formats (no detector model is reachable offline).
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastfair
from fastfair import alignment, dft, faces
from fastfair.dft import DFTConfig, DFTError, DFTTrainer
from fastfair.faces import ARCFACE_TEMPLATE_112, Face, FaceCropper, FaceError

from dft_helpers import RedClassifier, needs_peft, small, tiny_encoder

PROMPT = "a photo of the face of a doctor"


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------

def test_expand_box_by_hand():
    # tall box 20 x 40: height grows by half (20), width follows to a square: 60 x 60 around the same centre
    assert faces.expand_box((10, 20, 30, 60), 0.5, 1.0) == (-10, 10, 50, 70)
    # wide box 40 x 10: width grows by 20, height to 60
    assert faces.expand_box((0, 0, 40, 10), 0.5, 1.0) == (-10, -25, 50, 35)
    # square, no growth: unchanged; ratio 2 (twice as tall as wide)
    assert faces.expand_box((5, 5, 15, 15), 0.0, 1.0) == (5, 5, 15, 15)
    assert faces.expand_box((0, 0, 10, 10), 0.0, 2.0) == (0, -5, 10, 15)
    with pytest.raises(FaceError, match="no area"):
        faces.expand_box((3, 3, 3, 9))


def test_largest_face_counts_the_area_inside_the_image():
    big_outside = Face((-100, -100, 5, 5))          # 5 x 5 inside a 20 x 20 image
    small_inside = Face((2, 2, 10, 10))             # 8 x 8
    assert faces.largest_face([big_outside, small_inside], 20, 20) is small_inside
    assert faces.largest_face([], 20, 20) is None


def _crop_reference(img: np.ndarray, box, size, fill):
    """A float64 canvas holding the box (fill outside the image), then the same antialiased resize."""
    C, H, W = img.shape
    x0, y0, x1, y1 = box
    canvas = np.full((C, y1 - y0, x1 - x0), fill, dtype=np.float64)
    for y in range(y0, y1):
        for x in range(x0, x1):
            if 0 <= y < H and 0 <= x < W:
                canvas[:, y - y0, x - x0] = img[:, y, x]
    t = torch.from_numpy(canvas)[None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


@pytest.mark.parametrize("box", [(2, 3, 12, 13), (-4, -2, 8, 10), (10, 9, 22, 21), (-8, -8, -2, -2), (0, 0, 16, 16)])
def test_crop_boxes_against_a_canvas(box):
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    out = faces.crop_boxes(img, [box, (0, 0, 8, 8)], size=7, fill=0.25)
    assert out.shape == (2, 3, 7, 7)
    torch.testing.assert_close(out[0], _crop_reference(img[0].numpy(), box, 7, 0.25), rtol=1e-12, atol=1e-12)
    # gradient: float64 gradcheck through slicing, padding and the resize
    x = img[:1].clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda t: faces.crop_boxes(t, [box], 5, 0.1), (x,))


def test_similarity_transform_recovers_and_is_least_squares():
    rng = np.random.default_rng(0)
    tpl = ARCFACE_TEMPLATE_112
    for _ in range(5):
        th, s, t = rng.uniform(-1, 1), rng.uniform(0.5, 3), rng.uniform(-50, 50, 2)
        R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        pts = (s * (R @ tpl.T)).T + t
        M = faces.similarity_transform(pts, tpl)          # maps the image's points back onto the template
        np.testing.assert_allclose((M[:, :2] @ pts.T).T + M[:, 2], tpl, atol=1e-9)
    # noisy points: the optimum of the linear least squares over [[a, -b], [b, a]] | t (no reflection)
    for _ in range(5):
        src = rng.uniform(0, 100, (5, 2))
        dst = rng.uniform(0, 100, (5, 2))
        A = np.zeros((10, 4))
        A[0::2] = np.c_[src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)]
        A[1::2] = np.c_[src[:, 1], src[:, 0], np.zeros(5), np.ones(5)]
        a, b, tx, ty = np.linalg.lstsq(A, dst.reshape(-1), rcond=None)[0]
        M = faces.similarity_transform(src, dst)
        np.testing.assert_allclose(M, [[a, -b, tx], [b, a, ty]], atol=1e-9)
    with pytest.raises(FaceError, match="coincide"):
        faces.similarity_transform(np.ones((5, 2)), tpl)


def _warp_reference(img: np.ndarray, M: np.ndarray, h: int, w: int) -> np.ndarray:
    """out[y, x] = bilinear sample of img at M^-1 (x, y), neighbours outside the image count as 0."""
    C, H, W = img.shape
    A = np.vstack([M, [0, 0, 1]])
    inv = np.linalg.inv(A)
    out = np.zeros((C, h, w))
    for y in range(h):
        for x in range(w):
            sx, sy, _ = inv @ [x, y, 1.0]
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    yy, xx = y0 + dy, x0 + dx
                    if 0 <= yy < H and 0 <= xx < W:
                        out[:, y, x] += wy * wx * img[:, yy, xx]
    return out


def test_warp_affine_against_per_pixel_bilinear():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 12, 10, generator=g, dtype=torch.float64)
    M = np.array([[[0.8, -0.3, 1.5], [0.25, 0.9, -2.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    out = faces.warp_affine(img, torch.tensor(M), (7, 9))
    for i in range(2):
        np.testing.assert_allclose(out[i].numpy(), _warp_reference(img[i].numpy(), M[i], 7, 9), atol=1e-12)
    x = img[:1].clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda t: faces.warp_affine(t, torch.tensor(M[:1]), (5, 6)), (x,))


def test_align_faces_puts_the_landmarks_on_the_template():
    """A synthetic 'face': five bright dots at rotated / scaled / shifted template positions. Aligned at 112, each
    dot lands on its template position."""
    th, s, t = 0.3, 1.6, np.array([30.0, 20.0])
    R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    lm = (s * (R @ ARCFACE_TEMPLATE_112.T)).T + t
    img = torch.zeros(1, 3, 256, 256, dtype=torch.float64)
    for x, y in lm:
        xi, yi = int(round(x)), int(round(y))
        img[0, :, yi - 1:yi + 2, xi - 1:xi + 2] = 1.0
    out = faces.align_faces(img, lm[None], size=112)
    assert out.shape == (1, 3, 112, 112)
    for x, y in ARCFACE_TEMPLATE_112:
        xi, yi = int(round(x)), int(round(y))
        assert out[0, 0, yi, xi] > 0.5, (x, y)
    assert float(out[0, 0].sum()) < 5 * 9 * 1.2 / s ** 2 + 10      # nothing else lit (dots shrink by 1/s^2)
    with pytest.raises(FaceError, match=r"\(N, 5, 2\)"):
        faces.align_faces(img, lm[None, :4])


# --------------------------------------------------------------------------------------------
# detection and detector adapters
# --------------------------------------------------------------------------------------------

class SquareDetector:
    """Stand-in detector for synthetic images: the bounding box of pixels brighter than 200 in every channel, with
    landmarks at fixed places inside it. Checks what it is given (RGB uint8, H x W x 3)."""

    name = "square"

    def __init__(self):
        self.seen = []

    def __call__(self, image):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.flags["C_CONTIGUOUS"]
        self.seen.append(image.copy())
        ys, xs = np.nonzero((image > 200).all(-1))
        if not len(xs):
            return []
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        w, h = x1 - x0, y1 - y0
        lm = np.array([[x0 + w * a, y0 + h * b] for a, b in ARCFACE_TEMPLATE_112 / 112.0])
        return [Face((x0, y0, x1, y1), lm, 0.99)]


def _square_images(n=3, size=32):
    imgs = torch.full((n, 3, size, size), 0.2, dtype=torch.float64)
    imgs[0, :, 4:14, 6:16] = 1.0          # a 10 x 10 'face'
    imgs[1, :, 10:30, 2:22] = 1.0         # 20 x 20
    return imgs                            # image 2: no face


def test_face_cropper_detects_crops_and_aligns():
    det = SquareDetector()
    fc = FaceCropper(det, crop_size=16, expand=0.5)
    imgs = _square_images()
    imgs[2, 0] = 0.999                      # red 254.7 -> detector sees 254 (truncated), not a face (green 51)
    fb = fc.detect(imgs)
    assert fb.found.tolist() == [True, True, False] and fb.n == 2
    assert det.seen[2][0, 0].tolist() == [254, 51, 51]                 # RGB order, truncation
    assert fb.crop_boxes[0] == faces.expand_box((6, 4, 16, 14)) and fb.crop_boxes[2] is None
    crops = fc.crops(imgs, fb)
    assert crops.shape == (2, 3, 16, 16)
    torch.testing.assert_close(crops[1], _crop_reference(imgs[1].numpy(), fb.crop_boxes[1], 16, 0.0))
    al = fc.aligned(imgs, fb, [0, 1])
    assert al.shape == (2, 3, 112, 112)
    with pytest.raises(FaceError, match="no face landmarks"):
        fc.aligned(imgs, fb, [2])


@pytest.mark.parametrize("fmt", ["face", "dict", "insightface", "tuple", "single-face", "flat-box", "array",
                                 "tensor"])
def test_detector_output_formats(fmt):
    box, lm = (3.0, 4.0, 13.0, 14.0), ARCFACE_TEMPLATE_112 / 10
    one = {"face": Face(box, lm, 0.9), "dict": {"box": box, "landmarks": lm, "score": 0.9},
           "insightface": type("F", (), {"bbox": np.array(box + (0.9,)), "kps": lm, "det_score": np.float32(0.9)})(),
           "tuple": box}
    out = {"single-face": Face(box, lm), "flat-box": list(box), "array": np.array([box, (0, 0, 2, 2)]),
           "tensor": torch.tensor([box])}.get(fmt, [one.get(fmt)])
    fb = FaceCropper(lambda im: out).detect(torch.zeros(1, 3, 20, 20))
    assert fb.boxes[0] == box
    assert (fb.landmarks[0] is None) == (fmt not in ("face", "dict", "insightface", "single-face"))
    assert FaceCropper(lambda im: np.zeros((0, 4))).detect(torch.zeros(1, 3, 20, 20)).n == 0


@pytest.mark.parametrize("out,match", [
    ([(4, 30, 20, 10)], "right / bottom edge"),                 # face_recognition's (top, right, bottom, left)
    ([{"box": [3, 4, 10, 10], "keypoints": {}, "confidence": 0.9}], "mtcnn"),
    ([(0.1, 0.2, 0.5, 0.6)], "normalised"),
    ([(0, 0, float("inf"), 5)], "non-finite box"),
    ([Face((0, 0, 5, 5), np.full((5, 2), np.nan))], "non-finite landmarks"),
    ([(1, 2, 3, 4, 5)], "5 numbers"),
    ([{"score": 0.3}], "reads 'box'"),
])
def test_boxes_in_other_conventions_are_refused(out, match):
    with pytest.raises(FaceError, match=match):
        FaceCropper(lambda im: out).detect(torch.zeros(1, 3, 32, 32))


def test_insightface_missing_is_said_up_front():
    import importlib.util

    if importlib.util.find_spec("insightface") and importlib.util.find_spec("onnxruntime"):
        pytest.skip("insightface is installed")
    with pytest.raises(FaceError, match="pip install insightface onnxruntime"):
        faces.InsightFaceDetector()
    with pytest.raises(FaceError, match="pip install insightface"):
        faces.load_detector("insightface")


def test_crop_boxes_checks_and_half_precision():
    with pytest.raises(FaceError, match="2 crop boxes for 3 images"):
        faces.crop_boxes(torch.zeros(3, 3, 8, 8), [(0, 0, 4, 4)] * 2, 4)
    x = torch.rand(1, 3, 8, 8)
    half = faces.crop_boxes(x.half(), [(1.0, 1.0, 7.0, 7.0)], 4)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), faces.crop_boxes(x, [(1, 1, 7, 7)], 4), atol=2e-3, rtol=0)


def test_bad_detector_output_is_refused():
    with pytest.raises(FaceError, match="landmarks of shape"):
        FaceCropper(lambda im: [{"box": (0, 0, 5, 5), "landmarks": np.zeros((68, 2))}]).detect(torch.zeros(1, 3, 8, 8))
    with pytest.raises(FaceError, match="expected Face objects"):
        FaceCropper(lambda im: ["a face"]).detect(torch.zeros(1, 3, 8, 8))
    with pytest.raises(FaceError, match="callable"):
        FaceCropper("retinaface")


def test_insightface_adapter_gives_bgr_and_maps_fields():
    class App:  # insightface's FaceAnalysis.get: BGR image -> faces with bbox / kps / det_score
        def get(self, bgr):
            self.bgr = bgr.copy()
            F_ = type("Face", (), {})
            f = F_()
            f.bbox, f.kps, f.det_score = np.array([1.0, 2.0, 9.0, 12.0]), ARCFACE_TEMPLATE_112 / 12, 0.8
            return [f]

    app = App()
    det = faces.InsightFaceDetector(app=app)
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    img[..., 0] = 200                                     # red
    out = det(img)
    assert app.bgr[0, 0].tolist() == [0, 0, 200]          # given as BGR
    assert out[0].box == (1.0, 2.0, 9.0, 12.0) and out[0].landmarks.shape == (5, 2) and out[0].score == 0.8


# --------------------------------------------------------------------------------------------
# DFT with faces
# --------------------------------------------------------------------------------------------

def whole_image(im):
    h, w = im.shape[:2]
    return [Face((0, 0, w, h), ARCFACE_TEMPLATE_112 * (w / 112.0), 1.0)]


class Scripted:
    """Faces by call order: ``plan`` is a list of booleans (face or not) for successive images."""

    def __init__(self, plan):
        self.plan, self.i = list(plan), 0

    def __call__(self, im):
        found = self.plan[self.i % len(self.plan)]
        self.i += 1
        return whole_image(im) if found else []


@needs_peft
def test_whole_image_faces_give_the_plain_step():
    """A face covering the whole image, no expansion, crop size = image size: the crop is the image, so the step
    (loss, update) equals the step without a detector -- the face path adds nothing of its own."""
    out = []
    for det in (None, whole_image):
        cfg = small(images_per_prompt=4, batch_size=2, quality_weight=1.0, face_expand=0.0, face_crop_size=32,
                    face_relax=1.0)
        tr = DFTTrainer(fastfair.load_pipeline("tiny-sd"), [PROMPT], RedClassifier(), cfg,
                        quality_encoder=tiny_encoder(), face_detector=det)
        rec = tr.step()
        tr.close()
        out.append((rec, [p.detach().clone() for p in tr.params]))
    (r1, p1), (r2, p2) = out
    assert r2["faces"] == 4 and "faces" not in r1
    # two fresh trainers agree to ~1e-6 (CPU kernels' threading), as in test_dft's micro-batch test
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5) and r1["distribution"] == r2["distribution"]
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_peft
@pytest.mark.parametrize("plan", [[True, False, True, False], [False, True, False, False]])
def test_images_without_a_face_are_not_aligned(plan):
    """Faces in some of 4 images: the targets are the alignment targets of those images alone (same random stream),
    the others have none and no alignment loss; the loss is recomputed from the sampled images. One face with 2
    classes too: the paper's code aligns whatever faces a step found (its gender x race x age runs: 16 classes);
    fastfair dropped the whole step when fewer faces than classes were found."""
    tr = DFTTrainer(fastfair.load_pipeline("tiny-sd"), [PROMPT], RedClassifier(),
                    small(images_per_prompt=4, face_expand=0.0, face_crop_size=32),
                    quality_encoder=None, face_detector=Scripted(plan))
    seen = []
    sample = tr.sample
    tr.sample = lambda *a, **k: seen.append(sample(*a, **k)) or seen[-1]
    rng_state = json.dumps(tr.np_rng.bit_generator.state)
    rec = tr.step()
    tr.close()
    idx = [i for i, f in enumerate(plan) if f]
    assert rec["faces"] == len(idx)
    probs = RedClassifier()(seen[-1].detach())["gender"]
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(rng_state)
    t = alignment.alignment_targets({"gender": probs[idx]}, [0.5, 0.5], samples=100, threshold=1.0, rng=rng)
    expected = sum(-math.log(float(probs[idx[r], t.labels["gender"][r]])) for r in range(len(idx))) / 4
    assert rec["loss_align"] == pytest.approx(expected, rel=1e-5) and rec["loss_align"] > 0
    assert rec["kept"]["gender"] == len(idx) / 4
    assert sum(rec["distribution"]["gender"]) == pytest.approx(1.0)


@needs_peft
def test_no_face_anywhere_means_no_alignment_gradient():
    tr = DFTTrainer(fastfair.load_pipeline("tiny-sd"), [PROMPT], RedClassifier(), small(images_per_prompt=2),
                    quality_encoder=None, face_detector=lambda im: [])
    with pytest.warns(UserWarning, match="found no face in any of the 2 images"):
        rec = tr.step()
    tr.close()
    assert rec["faces"] == 0 and rec["loss"] == 0.0 and rec["grad_norm"] == 0.0 and rec["kept"]["gender"] == 0.0
    assert all(math.isnan(v) for v in rec["distribution"]["gender"])


def test_face_region_relaxation_scales_only_that_gradient():
    """The quality loss's gradient inside the (current n frozen) face box of images whose target changes the
    face is scaled by face_relax; elsewhere and for other images untouched; the values are unchanged."""
    tr = object.__new__(DFTTrainer)
    tr.cfg = DFTConfig(face_relax=0.2)
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64, requires_grad=True)
    cur = faces.FaceBatch(torch.tensor([True, True]), [None, None], [(2, 2, 8, 8), (0, 0, 5, 5)], [None, None])
    ref = faces.FaceBatch(torch.tensor([True, False]), [None, None], [(4, 0, 10, 6), None], [None, None])
    y = tr._relax_face_region(x, cur, ref, torch.tensor([0.2, 1.0]))  # image 0 changes (face_relax 0.2)
    assert torch.equal(y, x)
    y.sum().backward()
    expect = torch.ones_like(x)
    expect[0, :, 2:6, 4:8] = 0.2                                         # rows 2..5, columns 4..7
    torch.testing.assert_close(x.grad, expect)


def test_face_region_relaxation_per_image_factors():
    """Per-attribute face_relax gives each image its own factor (relax_factors): 0.3 and 1 here."""
    tr = object.__new__(DFTTrainer)
    tr.cfg = DFTConfig(face_relax={"gender": 0.2, "race": 0.3})
    x = torch.rand(2, 3, 10, 10, dtype=torch.float64, requires_grad=True)
    cur = faces.FaceBatch(torch.tensor([True, True]), [None, None], [(2, 2, 8, 8), (0, 0, 5, 5)], [None, None])
    y = tr._relax_face_region(x, cur, None, torch.tensor([0.3, 1.0]))
    y.sum().backward()
    expect = torch.ones_like(x)
    expect[0, :, 2:8, 2:8] = 0.3
    torch.testing.assert_close(x.grad, expect)


def test_face_realism_targets():
    """1 - cosine to the frozen face where the kept target equals the frozen class with confidence >= 0.9, else
    to the nearest bank face; no face or no kept target: no loss. Checked against numpy on fixed embeddings."""
    tr = object.__new__(DFTTrainer)
    tr.cfg = DFTConfig(face_confidence=0.9, face_flip=False)
    tr.attributes = ["gender"]
    W = torch.randn(3 * 4 * 4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tr.face_embedder = lambda a: F.interpolate(a, size=(4, 4), mode="area").flatten(1) @ W
    tr._autocast = lambda: __import__("contextlib").nullcontext()
    bank = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tr.face_bank = F.normalize(bank, dim=-1)

    class Crop:
        def aligned(self, images, fb, which):
            return images[which][:, :, :8, :8]
    tr.faces = Crop()
    n = 4
    imgs = torch.rand(n, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    fb = faces.FaceBatch(torch.tensor([True, True, True, False]), [None] * n, [None] * n, [None] * n)
    sub = alignment.AlignmentTargets(["gender"], {"gender": torch.tensor([0, 1, 0, 0])}, {"gender": torch.zeros(n)},
                                     {"gender": torch.tensor([True, True, False, True])}, {}, None, None)
    same = torch.tensor([True, False, False, True])
    conf = {"gender": torch.tensor([0.95, 0.99, 0.99, 0.99], dtype=torch.float64)}
    ref_emb = F.normalize(torch.randn(n, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64), dim=-1)
    loss = tr._face_loss(imgs, fb, sub, same, conf, ref_emb, torch.ones(n, dtype=torch.bool), slice(0, n))
    e = F.normalize(tr.face_embedder(imgs.detach()), dim=-1).numpy()
    bk = tr.face_bank.numpy()
    expect = [1 - e[0] @ ref_emb[0].numpy(),                     # same class, confident: the frozen face
              1 - (e[1] @ bk.T).max(),                           # target changes the class: nearest bank face
              0.0,                                               # target dropped
              0.0]                                               # no face
    np.testing.assert_allclose(loss.detach().numpy(), expect, rtol=1e-6, atol=1e-7)   # embeddings in float32
    loss.sum().backward()
    assert imgs.grad[:2].abs().sum() > 0 and imgs.grad[2:].abs().sum() == 0
    tr.face_bank = None                                          # no bank: only frozen-face targets
    loss = tr._face_loss(imgs, fb, sub, same, conf, ref_emb, torch.ones(n, dtype=torch.bool), slice(0, n))
    assert loss[1] == 0 and loss[0] > 0


@needs_peft
def test_face_realism_loss_in_a_step_and_cli(tmp_path, capsys):
    """A step with a face embedder reports its face loss (0 at the first step: LoRA B = 0 gives the frozen
    images), and the CLI wires detector, embedder and bank from python files."""
    emb_file = tmp_path / "parts.py"
    emb_file.write_text(
        "import numpy as np, torch\n"
        "from fastfair.faces import Face, ARCFACE_TEMPLATE_112\n"
        "def detector():\n"
        "    return lambda im: [Face((0, 0, im.shape[1], im.shape[0]), ARCFACE_TEMPLATE_112 * im.shape[1] / 112)]\n"
        "def embedder(device=None):\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 8))\n")
    np.save(tmp_path / "bank.npy", np.random.default_rng(0).normal(size=(10, 8)))
    from fastfair.cli import main

    args = ["finetune", "dft", "--model", "tiny-sd", "--prompt", PROMPT, "--steps", "2", "--images-per-prompt", "2",
            "--sampling-steps", "2", "--height", "32", "--width", "32", "--rank", "4", "--classifier",
            f"python:{tmp_path / 'clf.py'}:make", "--quality-encoder", "none", "--ema-decay", "0",
            "--uncertainty-threshold", "1", "--face-detector", f"python:{emb_file}:detector",
            "--face-embedder", f"python:{emb_file}:embedder", "--face-bank", str(tmp_path / "bank.npy"),
            "--face-confidence", "0", "--no-progress", "--out", str(tmp_path / "run")]
    (tmp_path / "clf.py").write_text(
        "import torch\n"
        "class C(torch.nn.Module):\n"
        "    labels = {'gender': ('male', 'female')}\n"
        "    def forward(self, x):\n"
        "        p0 = torch.sigmoid(300.0 * (x[:, 0].mean((1, 2)) - 0.43))\n"
        "        return {'gender': torch.stack([p0, 1 - p0], 1)}\n"
        "def make(attribute_sets=None, device=None):\n"
        "    return C()\n")
    assert main(args) == 0
    meta = json.loads((tmp_path / "run" / "dft.json").read_text())
    hist = meta["history"]
    assert meta["faces"]["detector"] == f"python:{emb_file}:detector" and meta["faces"]["bank"] == [10, 8]
    assert meta["quality_encoders"] == [] and meta["environment"]["device"] == "cpu"
    assert [h["faces"] for h in hist] == [2, 2] and all("loss_face" in h for h in hist)
    assert hist[1]["loss_face"] >= 0
    capsys.readouterr()
    assert main(args[:args.index("--face-detector")] + args[args.index("--face-embedder"):-2]
                + ["--out", str(tmp_path / "r2")]) != 0
    assert "need --face-detector" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    assert main(args[:args.index("--face-detector")] + ["--face-relax", "0.5", "--out", str(tmp_path / "r3")]) != 0
    assert "--face-relax only apply with --face-detector" in capsys.readouterr().err
    torch.save({"feats": torch.ones(3, 8)}, tmp_path / "bank.pt")
    assert main(args[:-2] + ["--face-bank", str(tmp_path / "bank.pt"), "--out", str(tmp_path / "r4")]) != 0
    assert "holds a dict with keys ['feats']" in capsys.readouterr().err


def test_face_option_errors():
    pipe = fastfair.load_pipeline("tiny-sd")
    with pytest.raises(DFTError, match="needs a face detector"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(), quality_encoder=None, face_embedder=torch.nn.Identity())
    with pytest.raises(DFTError, match="give face_embedder"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(), quality_encoder=None, face_detector=whole_image,
                   face_bank=np.ones((3, 4)))
    with pytest.raises(DFTError, match=r"\(M, D\)"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(), quality_encoder=None, face_detector=whole_image,
                   face_embedder=torch.nn.Identity(), face_bank=np.ones(4))
    with pytest.raises(DFTError, match="face_confidence"):
        small(face_confidence=1.5)
    with pytest.raises(DFTError, match="8-dimensional embeddings but the face bank holds 16"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(), quality_encoder=None, face_detector=whole_image,
                   face_embedder=lambda a: a.mean((2, 3)).repeat(1, 3)[:, :8], face_bank=np.ones((3, 16)))
    with pytest.raises(DFTError, match="config says face_crop_size=224"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(), quality_encoder=None,
                   face_detector=FaceCropper(whole_image, crop_size=32))
    with pytest.raises(DFTError, match="python:FILE.py:FUNCTION"):
        DFTTrainer(pipe, [PROMPT], RedClassifier(), small(), quality_encoder=None, face_detector="mtcnn")


@needs_peft
def test_face_realism_needs_landmarks_up_front():
    tr = DFTTrainer(fastfair.load_pipeline("tiny-sd"), [PROMPT], RedClassifier(), small(), quality_encoder=None,
                    face_detector=lambda im: [(0, 0, im.shape[1], im.shape[0])],
                    face_embedder=lambda a: a.mean((2, 3)))
    with pytest.raises(DFTError, match="found faces without landmarks"):
        tr.step()
    tr.close()


# --------------------------------------------------------------------------------------------
# quality encoders
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    m = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=56, patch_size=14))
    path = tmp_path_factory.mktemp("dino")
    m.save_pretrained(path)
    return str(path), m


def test_dinov2_features_are_the_normalised_cls_token(tiny_dino):
    path, m = tiny_dino
    enc = dft.DinoFeatures(path)
    x = torch.rand(2, 3, 56, 56, requires_grad=True)
    out = enc(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h = m(pixel_values=(x.detach() - mean) / std, output_hidden_states=True).hidden_states[-1][:, 0]
    torch.testing.assert_close(out.detach(), m.layernorm(h), rtol=1e-5, atol=1e-5)   # final norm of the CLS token
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert x.grad.abs().sum() > 0


def test_quality_encoder_specs(tiny_dino):
    path, _ = tiny_dino
    encs = dft.load_quality_encoders(f"dinov2:{path}+dinov2:{path}")
    assert len(encs) == 2 and all(isinstance(e, dft.DinoFeatures) for e in encs)
    assert dft.load_quality_encoders("none") == [] and dft.load_quality_encoders(None) == []
    mod = torch.nn.Identity()
    assert dft.load_quality_encoders([mod, mod]) == [mod, mod]
    with pytest.raises(DFTError, match="use clip, clip:MODEL_ID, dinov2"):
        dft.load_quality_encoders("vit")
    r = dft.Resized(torch.nn.Identity(), 8)
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(r(x), F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True))


@needs_peft
def test_several_quality_encoders_add_up():
    """Two encoders: the quality loss is the sum of the two 1 - cosine terms (Shen et al. add CLIP's and DINO's).
    The same encoder twice at half the weight: the same training (loss and update), twice the quality term."""
    recs = []
    for encs, w in (([tiny_encoder()], 1.0), ([tiny_encoder(), tiny_encoder()], 0.5)):
        torch.manual_seed(0)
        tr = DFTTrainer(fastfair.load_pipeline("tiny-sd"), [PROMPT], RedClassifier(),
                        small(quality_weight=w, steps=2), quality_encoder=encs)
        tr.step()
        recs.append(tr.step())
        tr.close()
    assert recs[0]["loss_quality"] > 0
    assert recs[1]["loss_quality"] == pytest.approx(2 * recs[0]["loss_quality"], rel=1e-4)
    assert recs[1]["loss"] == pytest.approx(recs[0]["loss"], rel=1e-5)


@needs_peft
def test_measure_counts_faces_only():
    tr = DFTTrainer(fastfair.load_pipeline("tiny-sd"), [PROMPT], RedClassifier(), small(),
                    quality_encoder=None, face_detector=Scripted([True, False, False, False]))
    freq = tr.measure(seeds=range(4), n_steps=2)["gender"]
    assert freq.sum() == pytest.approx(1.0) and sorted(freq.tolist()) == [0.0, 1.0]     # one face among 4 images
    tr.faces.detector.plan = [False]
    assert np.isnan(tr.measure(seeds=range(2), n_steps=2)["gender"]).all()
    tr.close()


# --------------------------------------------------------------------------------------------
# audits on faces (fastfair.classify.FaceCrops)
# --------------------------------------------------------------------------------------------

class _Recorder(torch.nn.Module):
    """p(male) = mean red of what it is given; keeps its inputs."""
    labels = {"gender": ("male", "female")}

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        m = x[:, 0].mean((1, 2))
        return {"gender": torch.stack([m, 1 - m], 1)}


def test_face_crops_classify_the_crop_and_abstain_without_a_face():
    from PIL import Image

    from fastfair.classify import FaceCrops, ModuleClassifier

    imgs = _square_images(3, 32)
    imgs[0, 0, 4:14, 6:16] = 0.9                      # a reddish-white 'face'... still > 200 in every channel
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in imgs]
    inner = _Recorder()
    fc = FaceCrops(ModuleClassifier(inner), SquareDetector(), crop_size=16, expand=0.5)
    out = fc.predict(pil)["gender"]
    assert np.isnan(out[2]).all() and np.isfinite(out[:2]).all()
    x = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32) / 255).permute(2, 0, 1) for p in pil])
    boxes = [faces.expand_box((6, 4, 16, 14)), faces.expand_box((2, 10, 22, 30))]
    ref = torch.stack([_crop_reference(x[i].double().numpy(), boxes[i], 16, 0.0) for i in range(2)])
    got = inner.inputs[0].double()                    # the crops reached the inner classifier (uint8 round trip)
    assert got.shape == (2, 3, 16, 16) and (got - ref).abs().max() <= 0.5 / 255 + 1e-6
    np.testing.assert_allclose(out[:2, 0], got[:, 0].mean((1, 2)).numpy(), rtol=1e-6)
    d = fc.describe()
    assert d["face_crops"] == "detector=square crop_size=16 expand=0.5" and d["labels"] == {"gender": ["male", "female"]}


def test_face_crops_of_whole_images_change_nothing():
    from PIL import Image

    from fastfair.classify import FaceCrops, ModuleClassifier

    g = np.random.default_rng(0)
    pil = [Image.fromarray(g.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(3)]
    inner = ModuleClassifier(_Recorder())
    fc = FaceCrops(inner, whole_image, crop_size=24, expand=0.0)
    np.testing.assert_array_equal(fc.predict(pil)["gender"], inner.predict(pil)["gender"])


def test_audit_on_faces_counts_images_without_a_face_as_abstentions(tiny_sd, tmp_path):
    decisions = []

    def every_other(im):
        decisions.append(len(decisions) % 2 == 0)
        return whole_image(im) if decisions[-1] else []

    res = fastfair.audit("tiny-sd", "list:doctor,nurse", pipeline=tiny_sd, attributes="gender", seeds=2,
                         out=tmp_path / "a", entanglement="none", classifier=_Recorder(), face_detector=every_other,
                         steps=2, height=32, width=32, progress=False, report=True, n_boot=20)
    assert "distributions of each image's largest face" in (res.run_dir / "report.html").read_text()
    df = res.results
    neutral = df[df["kind"] == "neutral"]
    assert len(decisions) == len(neutral) == 4
    assert neutral["pred_gender"].notna().tolist() == decisions
    assert res.summary["distribution"]["gender"]["overall"]["abstained"] == 2
    cfg = json.loads((res.run_dir / "audit.json").read_text())
    assert "every_other crop_size=224 expand=0.5" in cfg["settings"]["classifier"]["face_crops"]
    from fastfair.audit import AuditInputError

    with pytest.raises(AuditInputError, match="give --classifier"):
        fastfair.audit("tiny-sd", "list:doctor", pipeline=tiny_sd, attributes="gender", seeds=1,
                       out=tmp_path / "b", entanglement="none", classifier="none", face_detector=every_other,
                       steps=2, height=32, width=32, progress=False)


def test_runs_with_and_without_face_crops_are_not_compared(tiny_sd, tmp_path):
    from fastfair.audit import CompareError, compare

    kw = dict(pipeline=tiny_sd, attributes="gender", seeds=2, entanglement="none", steps=2, height=32, width=32,
              progress=False, report=False, n_boot=20)
    a = fastfair.audit("tiny-sd", "list:doctor", out=tmp_path / "a", classifier=_Recorder(), **kw)
    b = fastfair.audit("tiny-sd", "list:doctor", out=tmp_path / "b", classifier=_Recorder(),
                       face_detector=whole_image, **kw)
    with pytest.raises(CompareError, match="different classifiers"):
        compare(a.run_dir, b.run_dir)


def test_face_recognition_adapter_and_fallback_chain(monkeypatch, tmp_path):
    """The paper's second detector through a stand-in face_recognition module (its documented return shapes):
    (top, right, bottom, left) boxes become (x0, y0, x1, y1), the five points are the eye centres, the nose
    bridge's last point and the upper lip's corners, the crop grows by 1.1; a chain falls back to it."""
    import sys
    import types

    fr = types.ModuleType("face_recognition")
    calls = {}

    def face_locations(img, number_of_times_to_upsample=1, model="hog"):
        calls["loc"] = (number_of_times_to_upsample, model)
        return [(10, 30, 26, 14)]                                   # top, right, bottom, left

    def face_landmarks(img, face_locations=None, model="large"):
        calls["lm"] = (face_locations, model)
        return [{"left_eye": [(15, 14), (17, 14), (16, 16)], "right_eye": [(25, 14), (27, 16), (26, 15)],
                 "nose_bridge": [(21, 14), (21, 16), (21, 18)], "top_lip": [(16, 22), (17, 21), (18, 21), (19, 21),
                                                                           (20, 21), (22, 21), (26, 22)]}]

    fr.face_locations, fr.face_landmarks = face_locations, face_landmarks
    monkeypatch.setitem(sys.modules, "face_recognition", fr)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "face_recognition" else None)
    det = faces.load_detector("face_recognition")
    out = det(np.zeros((40, 40, 3), dtype=np.uint8))
    assert calls["loc"] == (0, "cnn") and calls["lm"] == ([(10, 30, 26, 14)], "large")
    assert out[0].box == (14.0, 10.0, 30.0, 26.0) and out[0].expand == 1.1
    np.testing.assert_allclose(out[0].landmarks, [[16, 14.666666666666666], [26, 15], [21, 18], [16, 22], [26, 22]])
    fb = FaceCropper(det).detect(torch.zeros(1, 3, 40, 40))
    assert fb.crop_boxes[0] == faces.expand_box((14, 10, 30, 26), 1.1)
    # a chain: the first detector finds nothing, the second is used
    chain = faces.FirstFound([lambda im: [], det])
    assert chain(np.zeros((40, 40, 3), dtype=np.uint8))[0].box == (14.0, 10.0, 30.0, 26.0)
    assert FaceCropper(faces.FirstFound([whole_image, det])).detect(torch.zeros(1, 3, 40, 40)).boxes[0] == (0, 0, 40, 40)
    parts = tmp_path / "d.py"
    parts.write_text("def none():\n    return lambda im: []\n")
    chained = faces.load_detector(f"python:{parts}:none,face_recognition")
    assert isinstance(chained, faces.FirstFound) and chained.name.endswith("then face_recognition:cnn")


def test_face_recognition_missing_is_said_up_front():
    import importlib.util

    if importlib.util.find_spec("face_recognition"):
        pytest.skip("face_recognition is installed")
    with pytest.raises(FaceError, match="pip install face_recognition"):
        faces.load_detector("face_recognition")


def test_clip_features_from_a_whole_clip_model_folder(tmp_path):
    """ClipFeatures on a saved CLIPModel (whose projection width sits on the top-level config): the embeddings are
    CLIPModel's own get_image_features of the normalised image."""
    from tiny_models import tiny_clip

    model, _ = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    enc = dft.ClipFeatures(str(tmp_path / "clip"))
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=(x - mean) / std)
    ref = getattr(ref, "pooler_output", ref)
    torch.testing.assert_close(enc(x), ref, rtol=1e-5, atol=1e-6)
