"""Attribute classifiers: zero-shot CLIP on a tiny random CLIPModel built in code (real CLIP tokenizer),
user torch modules, and the label / output checks."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastfair.audit.attributes import ATTRIBUTE_SETS
from tiny_models import tiny_clip
from fastfair.classify import (ClassifierMismatchError, ClipZeroShot, ModuleClassifier, check_labels,
                               clip_preprocess, load_classifier)


pytestmark = pytest.mark.usefixtures("one_thread")


def images(n, seed=0, size=48):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_zero_shot_equals_hand_computation():
    model, tok = tiny_clip()
    sets = [ATTRIBUTE_SETS["gender"], ATTRIBUTE_SETS["fairface4"]]
    prompts = {s.name: {lab: list(p) for lab, p in zip(s.labels, s.prompts)} for s in sets}
    clf = ClipZeroShot(model, tok, prompts)
    assert clf.labels == {"gender": ("male", "female"), "fairface4": ("White", "Black", "Asian", "Indian")}
    imgs = images(3)
    out = clf.predict(imgs)
    # by hand, with CLIPModel's own feature functions
    with torch.no_grad():
        px = clip_preprocess(imgs, 32)
        img = model.get_image_features(pixel_values=px)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        for s in sets:
            cls = []
            for ps in s.prompts:
                t = tok(list(ps), padding=True, return_tensors="pt")
                e = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
                e = e if isinstance(e, torch.Tensor) else e.pooler_output
                e = e / e.norm(dim=-1, keepdim=True)
                m = e.mean(0)
                cls.append(m / m.norm())
            logits = model.logit_scale.exp() * img @ torch.stack(cls).T
            expect = torch.softmax(logits.double(), -1).numpy()
            assert out[s.name].shape == (3, len(s.labels))
            np.testing.assert_allclose(out[s.name], expect, rtol=1e-5, atol=1e-6)
    # gender has two prompts per class: the ensemble differs from using the first prompt only
    single = ClipZeroShot(model, tok, {"gender": {"male": ["a photo of a man"], "female": ["a photo of a woman"]}})
    assert not np.allclose(single.predict(imgs)["gender"], out["gender"])
    np.testing.assert_allclose(out["gender"].sum(1), 1.0)


def test_clip_preprocess_is_resize_shorter_side_then_centre_crop():
    img = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3) % 251)
    x = clip_preprocess([img], 20, mean=(0, 0, 0), std=(1, 1, 1))
    ref = img.resize((30, 20), Image.BICUBIC).crop((5, 0, 25, 20))
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), np.asarray(ref, dtype=np.float32) / 255, atol=1e-6)


class _Brightness(torch.nn.Module):
    labels = {"gender": ["male", "female"], "age": ["young", "old"]}

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        p = torch.stack([m, 1 - m], 1)
        nan_row = (m > 0.99)[:, None]  # abstain on white images
        q = torch.stack([torch.full_like(m, 0.3), torch.full_like(m, 0.7)], 1)
        return {"gender": torch.where(nan_row, torch.nan, p), "age": q}


def test_module_classifier_probabilities_and_abstentions():
    imgs = [Image.new("RGB", (8, 8), (51, 51, 51)), Image.new("RGB", (8, 8), (255, 255, 255))]
    clf = ModuleClassifier(_Brightness())
    out = clf.predict(imgs)
    np.testing.assert_allclose(out["gender"][0], [0.2, 0.8], atol=1e-6)
    assert np.isnan(out["gender"][1]).all()
    np.testing.assert_allclose(out["age"], [[0.3, 0.7]] * 2)
    assert clf.describe()["labels"]["age"] == ["young", "old"]


def test_label_mismatch_and_bad_outputs_are_refused():
    clf = ModuleClassifier(_Brightness(), labels={"gender": ["man", "woman"], "age": ["young", "old"]})
    with pytest.raises(ClassifierMismatchError,
                       match=r"labels for 'gender' are \['man', 'woman'\].*\['male', 'female'\]"):
        check_labels(clf, [ATTRIBUTE_SETS["gender"]])
    with pytest.raises(ClassifierMismatchError, match="no attribute set 'race'"):
        check_labels(ModuleClassifier(_Brightness()), [ATTRIBUTE_SETS["race"]])
    check_labels(ModuleClassifier(_Brightness()), [ATTRIBUTE_SETS["gender"], ATTRIBUTE_SETS["age"]])

    class Logits(torch.nn.Module):
        def forward(self, x):
            return {"gender": torch.tensor([[2.0, -1.0]] * x.shape[0])}

    with pytest.raises(ClassifierMismatchError, match="not probabilities"):
        ModuleClassifier(Logits(), labels={"gender": ["male", "female"]}).predict(images(1))

    class Wrong(torch.nn.Module):
        def forward(self, x):
            return {"gender": torch.full((x.shape[0], 3), 1 / 3)}

    with pytest.raises(ClassifierMismatchError, match=r"shape \(1, 3\); expected \(1, 2\)"):
        ModuleClassifier(Wrong(), labels={"gender": ["male", "female"]}).predict(images(1))
    with pytest.raises(ClassifierMismatchError, match="needs labels"):
        ModuleClassifier(Wrong())


def test_load_classifier_specs(tmp_path):
    assert load_classifier("none") is None
    f = tmp_path / "myclf.py"
    f.write_text("import torch\n"
                 "class M(torch.nn.Module):\n"
                 "    labels = {'gender': ['male', 'female']}\n"
                 "    def forward(self, x):\n"
                 "        return {'gender': torch.full((x.shape[0], 2), 0.5)}\n"
                 "def make(attribute_sets, device):\n"
                 "    assert [s.name for s in attribute_sets] == ['gender']\n"
                 "    return M()\n")
    clf = load_classifier(f"python:{f}:make", [ATTRIBUTE_SETS["gender"]])
    assert isinstance(clf, ModuleClassifier) and clf.describe()["module"] == f"{f}:make"
    np.testing.assert_allclose(clf.predict(images(2))["gender"], 0.5)
    with pytest.raises(ValueError, match="unknown classifier"):
        load_classifier("resnet")
    with pytest.raises(ValueError, match="does not exist"):
        load_classifier(f"python:{tmp_path / 'nope.py'}:make")
    with pytest.raises(ValueError, match="has no function"):
        load_classifier(f"python:{f}:build")
    with pytest.raises(RuntimeError, match="could not load CLIP model"):
        load_classifier("clip:" + str(tmp_path / "no-such-clip"), [ATTRIBUTE_SETS["gender"]])


def test_python_factories_get_the_keywords_they_name(tmp_path):
    """`def make(): ...` crashed with "unexpected keyword argument 'attribute_sets'" (a docs review)."""
    from fastfair.audit.attributes import parse_attributes
    from fastfair.classify import load_classifier

    f = tmp_path / "c.py"
    f.write_text("import torch\n\nclass M(torch.nn.Module):\n    labels = {'gender': ('male', 'female')}\n"
                 "    def forward(self, x):\n        return {'gender': torch.full((len(x), 2), 0.5)}\n\n"
                 "def bare():\n    return M()\n\ndef some(device=None):\n    assert device == 'cpu'\n    return M()\n\n"
                 "def anykw(**kw):\n    assert set(kw) == {'attribute_sets', 'device'}\n    return M()\n")
    sets, _ = parse_attributes("gender")
    for fn in ("bare", "some", "anykw"):
        clf = load_classifier(f"python:{f}:{fn}", sets, device="cpu")
        assert clf.labels["gender"] == ("male", "female")


def test_prompt_file_comments(tmp_path):
    from fastfair.audit.prompts import load_professions

    f = tmp_path / "p.txt"
    f.write_text("# professions\nnurse # a comment\n\ndoctor\n")
    assert load_professions(f"file:{f}") == ["nurse", "doctor"]
    import fastfair

    assert fastfair.NonFiniteError.__name__ == "NonFiniteError"


def test_prompt_file_hash_inside_a_word(tmp_path):
    from fastfair.audit.prompts import load_professions

    f = tmp_path / "p.txt"
    f.write_text("C# developer\nF# programmer  # functional\n#nurse\n")
    assert load_professions(f"file:{f}") == ["C# developer", "F# programmer"]


def test_half_precision_softmax_rows_are_renormalised():
    """A bf16 softmax sums to 1 only within ~1e-2: accepted and renormalised (audits refused it), logits refused."""
    import numpy as np

    from fastfair.classify import ClassifierMismatchError, check_probabilities

    p = check_probabilities("gender", [[0.59765625, 0.40039062], [float("nan")] * 2], 2, 2)
    np.testing.assert_allclose(p[0], [0.59765625 / 0.99804687, 0.40039062 / 0.99804687], rtol=1e-6)
    assert np.isnan(p[1]).all()
    with pytest.raises(ClassifierMismatchError, match="softmax"):
        check_probabilities("gender", [[5.0, -3.0]], 1, 2)
