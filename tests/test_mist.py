"""MIST editing: the closed form against an independent least-squares solve, its limits, targets,
save/load/revert, the classifier feedback loop on tiny-sd, SDXL keys, errors and the CLI."""
import copy
import json
import statistics

import numpy as np
import pytest
import torch

import fastfair
from fastfair import mist
from fastfair.mist import MistError

UNRELATED = [
    "a photo of a mountain lake", "a bowl of fresh fruit on a table", "a red sports car", "a city skyline at night",
    "a cat sleeping on a sofa", "a snowy forest", "a sailing boat at sea", "a plate of pasta",
    "an old stone bridge", "a field of sunflowers", "a bicycle leaning on a wall", "a lighthouse on a cliff",
    "a cup of coffee", "a desert with sand dunes", "a wooden chair", "a waterfall in the jungle",
    "a bookshelf full of books", "a hot air balloon", "a tropical beach", "a vintage clock",
]


# many small ops: one thread avoids OpenMP contention (8 tiny-sd images: 0.4 s on 1 thread, 15 s on 2 under load)
pytestmark = pytest.mark.usefixtures("one_thread")


def lstsq_reference(W, K_e, V_e, K_p, lam, eta_e, eta_p):
    """Independent solution: the stacked regularised least-squares system
    [sqrt(lam) I; sqrt(eta_e) K_e; sqrt(eta_p) K_p] W'^T = [sqrt(lam) W^T; sqrt(eta_e) V_e; sqrt(eta_p) K_p W^T],
    i.e. min lam||W'-W||^2 + eta_e sum||W'k_c - v_c||^2 + eta_p sum||W'k_p - W k_p||^2, by SVD-based lstsq."""
    d = W.shape[1]
    A = torch.cat([lam ** 0.5 * torch.eye(d, dtype=torch.float64), eta_e ** 0.5 * K_e, eta_p ** 0.5 * K_p])
    B = torch.cat([lam ** 0.5 * W.T, eta_e ** 0.5 * V_e, eta_p ** 0.5 * (K_p @ W.T)])
    return torch.linalg.lstsq(A, B, driver="gelsd").solution.T


def rel(a, b):
    return float((a - b).norm() / b.norm())


def random_system(g, L=4, out=24, d=16, C=5, P=40, scale=3.0):
    W = torch.randn(L, out, d, generator=g, dtype=torch.float64)
    K_e = scale * torch.randn(C, d, generator=g, dtype=torch.float64)
    V_e = torch.randn(L, C, out, generator=g, dtype=torch.float64)
    K_p = scale * torch.randn(P, d, generator=g, dtype=torch.float64)
    return W, K_e, V_e, K_p


# ------------------------------------------------------------------------------------------
# the closed form
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lam,eta_e,eta_p", [(0.5, 1.0, 0.2), (0.1, 3.0, 0.0), (2.0, 0.5, 5.0)])
def test_closed_form_matches_lstsq(lam, eta_e, eta_p):
    g = torch.Generator().manual_seed(0)
    W, K_e, V_e, K_p = random_system(g)
    # batched over layers with one shared normal matrix (what the editor does for a UNet)
    got = mist.closed_form(W, K_e[None], V_e, K_p[None], lam=lam, eta_e=eta_e, eta_p=eta_p)
    for i in range(W.shape[0]):
        assert rel(got[i], lstsq_reference(W[i], K_e, V_e[i], K_p, lam, eta_e, eta_p)) < 1e-6
    # per-layer keys (a batch of different normal matrices)
    K_e2 = K_e[None] + torch.randn(W.shape[0], *K_e.shape, generator=g, dtype=torch.float64)
    got2 = mist.closed_form(W, K_e2, V_e, K_p[None], lam=lam, eta_e=eta_e, eta_p=eta_p)
    for i in range(W.shape[0]):
        assert rel(got2[i], lstsq_reference(W[i], K_e2[i], V_e[i], K_p, lam, eta_e, eta_p)) < 1e-6
    # layers of different widths stacked row-wise give the same answer as solving them one by one
    stacked = mist.closed_form(W.reshape(-1, W.shape[-1]), K_e, V_e.permute(1, 0, 2).reshape(K_e.shape[0], -1), K_p,
                               lam=lam, eta_e=eta_e, eta_p=eta_p)
    assert rel(stacked, got.reshape(-1, W.shape[-1])) < 1e-12


def test_closed_form_is_the_issue_formula():
    """W' = (lam W + eta_e sum v k^T + eta_p sum W k_p k_p^T)(lam I + eta_e sum k k^T + eta_p sum k_p k_p^T)^-1."""
    g = torch.Generator().manual_seed(1)
    W, K_e, V_e, K_p = random_system(g, L=1)
    lam, eta_e, eta_p = 0.5, 1.0, 0.2
    B = lam * W[0] + eta_e * V_e[0].T @ K_e + eta_p * W[0] @ K_p.T @ K_p
    A = lam * torch.eye(W.shape[-1], dtype=torch.float64) + eta_e * K_e.T @ K_e + eta_p * K_p.T @ K_p
    want = torch.linalg.solve(A, B.T).T  # A symmetric: B A^-1 = (A^-1 B^T)^T
    assert rel(mist.closed_form(W[0], K_e, V_e[0], K_p), want) < 1e-12


def test_eta_e_dominant_maps_keys_onto_targets():
    g = torch.Generator().manual_seed(2)
    W, K_e, V_e, K_p = random_system(g, L=1)
    out = mist.closed_form(W[0], K_e, V_e[0], K_p, lam=0.5, eta_e=1e9, eta_p=0.2)
    assert rel(K_e @ out.T, V_e[0]) < 1e-6


def test_eta_p_dominant_preserves():
    g = torch.Generator().manual_seed(3)
    W, K_e, V_e, K_p = random_system(g, L=1, P=10)
    out = mist.closed_form(W[0], K_e, V_e[0], K_p, lam=0.5, eta_e=1.0, eta_p=1e9)
    assert rel(K_p @ out.T, K_p @ W[0].T) < 1e-6


# ------------------------------------------------------------------------------------------
# attributes and targets
# ------------------------------------------------------------------------------------------

def test_joint_classes_and_targets():
    sets = mist.parse_attributes("gender,age")
    labels, phrases = mist.joint_classes(sets)
    assert labels == ["male|young", "male|old", "female|young", "female|old"]
    assert phrases == ["young man", "old man", "young woman", "old woman"]
    assert mist.fill("a {concept}", "doctor", "old woman") == "an old woman doctor"
    assert mist.fill("a {concept}", "engineer") == "an engineer"
    assert mist.fill("a {concept}", "doctor", "woman") == "a woman doctor"
    torch.testing.assert_close(mist.parse_target("uniform", sets), torch.full((4,), 0.25, dtype=torch.float64))
    prod = mist.parse_target({"gender": [0.75, 0.25]}, sets)
    torch.testing.assert_close(prod, torch.tensor([0.375, 0.375, 0.125, 0.125], dtype=torch.float64))
    torch.testing.assert_close(mist.parse_target("gender=0.75,0.25;age=0.5,0.5", sets), prod)
    torch.testing.assert_close(mist.parse_target("0.1,0.2,0.3,0.4", sets),
                               torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    custom = mist.parse_attributes("glasses", custom={"glasses": {"with": "bespectacled", "without": "plain"}})
    assert custom[0].labels == ("with", "without")


def test_joint_probs_from_per_set_classifiers():
    sets = mist.parse_attributes("gender,age")

    class Fixed:
        def __init__(self, labels, p):
            self.labels, self.p = labels, torch.tensor(p, dtype=torch.float64)

        def __call__(self, images):
            return self.p[: len(images)]

    g = Fixed(["female", "male"], [[0.9, 0.1], [0.2, 0.8]])        # other label order: reordered by name
    a = Fixed(["young", "old"], [[0.3, 0.7], [0.6, 0.4]])
    p = mist.joint_probs({"gender": g, "age": a}, [None, None], sets)
    want = torch.tensor([[0.1 * 0.3, 0.1 * 0.7, 0.9 * 0.3, 0.9 * 0.7], [0.8 * 0.6, 0.8 * 0.4, 0.2 * 0.6, 0.2 * 0.4]],
                        dtype=torch.float64)
    torch.testing.assert_close(p, want)
    torch.testing.assert_close(mist.distribution(p, "argmax"), torch.tensor([0.5, 0, 0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(mist.distribution(p, "mean"), want.mean(0))
    # an abstention (NaN row) is left out
    p2 = torch.cat([p, torch.full((1, 4), float("nan"), dtype=torch.float64)])
    torch.testing.assert_close(mist.distribution(p2, "mean"), want.mean(0))


def test_audit_classifier_interface():
    """fastfair.classify's interface ({set: labels}, predict -> {set: (N, C)}) is checked and multiplied out."""
    sets = mist.parse_attributes("gender,age")

    class Audit:
        labels = {"age": ("old", "young"), "gender": ("male", "female")}

        def predict(self, images):
            n = len(images)
            return {"gender": np.tile([0.7, 0.3], (n, 1)), "age": np.tile([0.4, 0.6], (n, 1))}

    p = mist.joint_probs(Audit(), [None] * 3, sets)
    torch.testing.assert_close(p[0], torch.tensor([0.7 * 0.6, 0.7 * 0.4, 0.3 * 0.6, 0.3 * 0.4], dtype=torch.float64))

    class Wrong(Audit):
        labels = {"gender": ("man", "woman"), "age": ("old", "young")}

    with pytest.raises(ValueError, match="labels for 'gender'"):
        mist.joint_probs(Wrong(), [None], sets)
    assert mist.parse_attributes("gender")[0].prompts[0][0].startswith("a photo of")  # CLIP prompts for "clip"


# ------------------------------------------------------------------------------------------
# editing a pipeline
# ------------------------------------------------------------------------------------------

def _weights(pipe, names):
    mods = dict(pipe.unet.named_modules())
    return {n: mods[n].weight.detach().clone() for n in names}


def test_edits_every_cross_attention_layer_and_keys(tiny_sd):
    mods = mist.edit_layers(tiny_sd)
    assert len(mods) == 7 and all(n.endswith("attn2") for n in mods)
    # k_c is the EOS state of encode_prompt at the position after the last word token
    emb = tiny_sd.encode_prompt(["a doctor"], tiny_sd.device, 1, False)[0]
    torch.testing.assert_close(mist.eos_keys(tiny_sd, ["a doctor"]), emb[:, 3].double())
    assert mist.preserve_keys(tiny_sd, [""]).shape == (77, 32)


def test_eta_e_dominant_on_pipeline_hits_targets(tiny_sd):
    concepts = ["doctor", "nurse"]
    measured = {"doctor": [1.0, 0.0], "nurse": [0.2, 0.8]}
    names = [n for n, _ in mist._projections(mist.edit_layers(tiny_sd), True)]
    W0 = _weights(tiny_sd, names)
    edit = mist.mist(tiny_sd, concepts, "gender", measured=measured, eta_e=1e7, step=0.5, progress=False)
    try:
        K_e = mist.eos_keys(tiny_sd, ["a doctor", "a nurse"])
        K_a = mist.eos_keys(tiny_sd, ["a man doctor", "a woman doctor", "a man nurse", "a woman nurse"])
        K_a = K_a.reshape(2, 2, -1)
        w = 0.5 * (torch.tensor([[0.5, 0.5], [0.5, 0.5]]) - torch.tensor([[1.0, 0.0], [0.2, 0.8]])).double()
        assert edit.meta["rounds"][0]["weights"]["doctor"] == pytest.approx(w[0].tolist())
        for n in names:
            v = mist.targets(W0[n].double(), K_e, K_a, w)
            got = K_e @ (W0[n].double() + edit.deltas[n].double()).T
            assert float((got - v).norm() / (v - K_e @ W0[n].double().T).norm()) < 1e-3, n
    finally:
        edit.revert(tiny_sd)


def test_preserve_prompts_and_unrelated_report(tiny_sd, capsys):
    names = [n for n, _ in mist._projections(mist.edit_layers(tiny_sd), True)]
    W0 = _weights(tiny_sd, names)
    measured = {"doctor": [1.0, 0.0], "nurse": [0.2, 0.8]}
    kp = mist.preserve_keys(tiny_sd, ["", "a photo of a cat"])

    def preserve_change(edit):
        return max(float((kp @ edit.deltas[n].double().T).norm() / (kp @ W0[n].double().T).norm()) for n in names)

    edit = mist.mist(tiny_sd, ["doctor", "nurse"], "gender", measured=measured, preserve=["", "a photo of a cat"],
                     progress=False)
    try:
        concept = edit.output_change(tiny_sd, ["a doctor", "a nurse"])
        unrelated = edit.output_change(tiny_sd, UNRELATED)
        base_pres = preserve_change(edit)
        conc = statistics.mean(r["to_v_eos"] for r in concept)
        assert base_pres < 0.1 * conc  # the preserve prompts move far less than the edited concepts
    finally:
        edit.revert(tiny_sd)
    strong = mist.mist(tiny_sd, ["doctor", "nurse"], "gender", measured=measured, preserve=["", "a photo of a cat"],
                       eta_p=1e6, progress=False)
    try:
        assert preserve_change(strong) < 1e-4  # with eta_p >> lam, preserved outputs are unchanged
    finally:
        strong.revert(tiny_sd)
    # the report: to_k / to_v output change of 20 unrelated prompts (all tokens BOS..EOS, max over layers)
    with capsys.disabled():
        print("\nMIST unrelated-prompt change on tiny-sd (random 2-layer text encoder), relative ||dW k||/||W k||:")
        print(f"  edited concepts: to_v EOS {[round(r['to_v_eos'], 4) for r in concept]}, "
              f"to_k EOS {[round(r['to_k_eos'], 4) for r in concept]}")
        for key in ("to_v_eos", "to_v_max", "to_k_eos", "to_k_max"):
            vals = [r[key] for r in unrelated]
            print(f"  20 unrelated prompts {key}: median {statistics.median(vals):.4f} max {max(vals):.4f}")
        print(f"  preserve prompts (all 77 tokens): {base_pres:.2e}")
    assert len(unrelated) == 20 and all(np.isfinite(r["to_v_max"]) for r in unrelated)
    assert statistics.median(r["to_v_eos"] for r in unrelated) < conc


def test_save_load_apply_revert_bit_exact(tiny_sd, tmp_path):
    names = [n for n, _ in mist._projections(mist.edit_layers(tiny_sd), True)]
    W0 = _weights(tiny_sd, names)
    edit = mist.mist(tiny_sd, "doctor,nurse", "gender,age", target={"gender": [0.75, 0.25]},
                     measured={"doctor": [1, 0, 0, 0], "nurse": "uniform"}, progress=False, model_id="tiny-sd")
    edited = _weights(tiny_sd, names)
    assert any(not torch.equal(edited[n], W0[n]) for n in names)
    path = edit.save(tmp_path / "edits" / "x.safetensors")
    assert path.exists() and path.with_suffix(".json").exists()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["model"]["id"] == "tiny-sd" and meta["concepts"] == ["doctor", "nurse"]
    assert meta["target"] == pytest.approx([0.375, 0.375, 0.125, 0.125])
    assert meta["rounds"][0]["p_hat"]["doctor"] == [1.0, 0.0, 0.0, 0.0]
    assert path.stat().st_size < 200_000
    edit.revert(tiny_sd)
    assert all(torch.equal(tiny_sd.unet.get_submodule(n).weight, W0[n]) for n in names)
    loaded = mist.load(path)
    assert loaded.meta == edit.meta and set(loaded.deltas) == set(names) == set(edit.deltas)
    assert all(torch.equal(loaded.deltas[n], edit.deltas[n]) for n in names)
    assert all(n.endswith((".to_k", ".to_v")) for n in loaded.deltas)
    loaded.apply(tiny_sd)
    try:
        assert all(torch.equal(tiny_sd.unet.get_submodule(n).weight, edited[n]) for n in names)
        with pytest.raises(MistError, match="already has a MIST edit"):
            loaded.apply(tiny_sd)
    finally:
        loaded.revert(tiny_sd)
    assert all(torch.equal(tiny_sd.unet.get_submodule(n).weight, W0[n]) for n in names)
    assert not mist.is_edited(tiny_sd)


def test_delta_from_another_model_is_refused(tiny_sd, tiny_sdxl, tmp_path):
    edit = mist.mist(tiny_sd, ["doctor"], "gender", measured={"doctor": [1.0, 0.0]}, progress=False)
    edit.revert(tiny_sd)
    path = edit.save(tmp_path / "x.safetensors")
    with pytest.raises(MistError, match="another model"):
        mist.load(path).apply(tiny_sdxl)           # other architecture
    other = copy.deepcopy(tiny_sd)                  # same architecture, other weights
    with torch.no_grad():
        for m in mist.edit_layers(other).values():
            m.to_k.weight.add_(0.5 * torch.randn_like(m.to_k.weight))
            m.to_v.weight.add_(0.5 * torch.randn_like(m.to_v.weight))
    with pytest.raises(MistError, match="another model"):
        mist.load(path).apply(other)
    assert not mist.is_edited(other)
    half = copy.deepcopy(tiny_sd).to(dtype=torch.bfloat16)  # the same model in another dtype is accepted
    mist.load(path).apply(half)
    mist.revert(half)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MistError, match="not a safetensors"):
        mist.load(tmp_path / "bad.safetensors")


def test_sdxl_keys_are_both_encoders(tiny_sdxl):
    emb = tiny_sdxl.encode_prompt(prompt=["a nurse"], device=tiny_sdxl.device, num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]
    assert emb.shape[-1] == 64  # 32 + 32: both encoders' penultimate states
    torch.testing.assert_close(mist.eos_keys(tiny_sdxl, ["a nurse"]), emb[:, 3].double())
    edit = mist.mist(tiny_sdxl, ["nurse"], "gender", measured={"nurse": [0.1, 0.9]}, with_to_k=False, progress=False)
    try:
        assert len(edit.deltas) == 8 and all(n.endswith(".to_v") for n in edit.deltas)
    finally:
        edit.revert(tiny_sdxl)


# ------------------------------------------------------------------------------------------
# the classifier feedback loop
# ------------------------------------------------------------------------------------------

class GreenBottom:
    """Deterministic stand-in attribute classifier: p(class 0) = sigmoid((g - thr) / tau), with g the
    mean green value (0..1) of the image's bottom half. ``thr`` is fixed on the first batch it sees
    (the unedited model's images), so the loop starts near 50/50. On tiny-sd (random weights) an edit
    towards the first attribute phrase ("man") raises that green value, so class 0 is "greener"."""

    labels = ["male", "female"]

    def __init__(self, tau=0.01, thr=None):
        self.tau, self.thr = tau, thr

    @staticmethod
    def value(images):
        a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images])
        return a[:, a.shape[1] // 2:, :, 1].mean((1, 2))

    def __call__(self, images):
        g = self.value(images)
        if self.thr is None:
            self.thr = float(g.mean())
        p0 = torch.sigmoid(torch.from_numpy((g - self.thr) / self.tau))
        return torch.stack([p0, 1 - p0], 1)


def test_feedback_loop_converges_to_non_uniform_target(tiny_sd):
    target = [0.75, 0.25]
    seen = []
    names = [n for n, _ in mist._projections(mist.edit_layers(tiny_sd), True)]
    W0 = _weights(tiny_sd, names)
    edit = mist.mist(tiny_sd, ["doctor"], "gender", target=target, classifier=GreenBottom(), step=20.0, tol=0.05,
                     max_rounds=6, images=8, steps=4, height=64, width=64, measure="mean", progress=False,
                     callback=lambda r, p: seen.append(p["doctor"].tolist()))
    try:
        gaps = [max(abs(a - b) for a, b in zip(p, target)) for p in seen]
        print("\nMIST feedback on tiny-sd, target 75/25, p_hat per round:", [[round(v, 3) for v in p] for p in seen])
        assert abs(seen[0][0] - 0.5) < 0.1                   # starts near 50/50
        assert all(b < a for a, b in zip(gaps, gaps[1:]))   # every round moves p_hat closer to t
        assert gaps[-1] < 0.05 and all(g >= 0.05 for g in gaps[:-1])  # stops as soon as it is within tol
        assert edit.meta["converged"] == {"doctor": True} and 1 <= edit.meta["edit_rounds"] < 6
        assert [r["p_hat"]["doctor"] for r in edit.meta["rounds"]] == seen
        assert edit.meta["rounds"][0]["weights"]["doctor"][0] > 0
    finally:
        edit.revert(tiny_sd)
    assert all(torch.equal(tiny_sd.unet.get_submodule(n).weight, W0[n]) for n in names)


def test_concept_at_target_joins_the_preserve_set(tiny_sd):
    def clf(images):  # called once per round with the concepts' images, concept-major: doctor, nurse
        n = len(images) // 2
        return torch.tensor([[0.53, 0.47]] * n + [[0.9, 0.1]] * n, dtype=torch.float64)

    clf.labels = ["male", "female"]
    edit = mist.mist(tiny_sd, ["doctor", "nurse"], "gender", classifier=clf, measure="mean", max_rounds=1, images=1,
                     steps=1, height=64, width=64, progress=False)
    try:
        r0 = edit.meta["rounds"][0]
        assert r0["p_hat"] == {"doctor": pytest.approx([0.53, 0.47]), "nurse": pytest.approx([0.9, 0.1])}
        assert r0["weights"]["doctor"] == [0.0, 0.0] and r0["weights"]["nurse"] == pytest.approx([-0.04, 0.04])
        assert r0["preserve"] == ["", "a doctor"]
        assert edit.meta["edit_rounds"] == 1 and edit.meta["converged"]["doctor"]
        m = edit.meta["measurement"]  # what the measured images depend on besides the prompts and seeds
        assert (m["scheduler"], m["dtype"]) == (type(tiny_sd.scheduler).__name__, "float32") and m["batch_size"] >= 1
    finally:
        edit.revert(tiny_sd)


def test_failing_loop_restores_the_model(tiny_sd):
    names = [n for n, _ in mist._projections(mist.edit_layers(tiny_sd), True)]
    W0 = _weights(tiny_sd, names)
    calls = []

    def flaky(images):
        calls.append(len(images))
        if len(calls) > 1:
            raise RuntimeError("classifier crashed")
        return torch.tensor([[0.9, 0.1]] * len(images))

    flaky.labels = ["male", "female"]
    with pytest.raises(RuntimeError, match="crashed"):
        mist.mist(tiny_sd, ["doctor"], "gender", classifier=flaky, images=1, steps=1, height=64, width=64,
                  progress=False)
    assert calls == [1, 1] and not mist.is_edited(tiny_sd)
    assert all(torch.equal(tiny_sd.unet.get_submodule(n).weight, W0[n]) for n in names)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_bad_inputs(tiny_sd):
    m = {"doctor": [0.5, 0.5]}
    with pytest.raises(MistError, match="sum to 1"):
        mist.mist(tiny_sd, ["doctor"], "gender", target=[0.7, 0.2], measured=m, progress=False)
    with pytest.raises(MistError, match="3 values but there are 2 classes"):
        mist.mist(tiny_sd, ["doctor"], "gender", target=[0.2, 0.3, 0.5], measured=m, progress=False)
    with pytest.raises(MistError, match="2 values but there are 4 classes"):
        mist.mist(tiny_sd, ["doctor"], "gender,age", target="0.5,0.5", measured=m, progress=False)
    with pytest.raises(MistError, match="sum to 1"):
        mist.parse_target({"gender": [0.9, 0.2]}, mist.parse_attributes("gender"))
    with pytest.raises(MistError, match="no concepts"):
        mist.mist(tiny_sd, [], "gender", measured={}, progress=False)
    with pytest.raises(MistError, match="no concepts"):
        mist.mist(tiny_sd, " , ", "gender", measured={}, progress=False)
    with pytest.raises(MistError, match="duplicate"):
        mist.mist(tiny_sd, ["doctor", "doctor"], "gender", measured=m, progress=False)
    long = " ".join(["doctor"] * 80)
    with pytest.raises(MistError, match="limit of 77"):
        mist.mist(tiny_sd, [long], "gender", measured={long: [0.5, 0.5]}, progress=False)
    with pytest.raises(MistError, match="unknown attribute set 'colour'"):
        mist.mist(tiny_sd, ["doctor"], "colour", measured=m, progress=False)
    with pytest.raises(MistError, match="classifier=.* or measured="):
        mist.mist(tiny_sd, ["doctor"], "gender", progress=False)
    with pytest.raises(MistError, match="measured distribution of 'doctor' must sum to 1"):
        mist.mist(tiny_sd, ["doctor"], "gender", measured={"doctor": [0.5, 0.6]}, progress=False)
    with pytest.raises(MistError, match="lam > 0"):
        mist.mist(tiny_sd, ["doctor"], "gender", measured=m, lam=0.0, progress=False)
    bad = lambda images: torch.ones(len(images), 3) / 3  # noqa: E731
    with pytest.raises(MistError, match="3 classes"):
        mist.joint_probs(bad, [None], mist.parse_attributes("gender"))
    assert not mist.is_edited(tiny_sd)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def test_cli_edit_and_generate(tmp_path, capsys, tiny_sd):
    from fastfair.cli import main

    measured = tmp_path / "p.json"
    measured.write_text(json.dumps({"doctor": [0.9, 0.1], "nurse": [0.1, 0.9]}))
    out = tmp_path / "edits" / "x.safetensors"
    rc = main(["edit", "mist", "--model", "tiny-sd", "--concepts", "doctor,nurse", "--attributes", "gender",
               "--target", "0.6,0.4", "--measured", str(measured), "--out", str(out), "--device", "cpu",
               "--no-progress"])
    assert rc == 0 and out.exists()
    text = capsys.readouterr().out
    assert "doctor" in text and str(out) in text
    assert mist.load(out).meta["model"]["id"] == "tiny-sd"
    rc = main(["generate", "--model", "tiny-sd", "--prompt", "a doctor", "--seeds", "0", "--steps", "1",
               "--height", "64", "--width", "64", "--edit", str(out), "--out", str(tmp_path / "gen"),
               "--device", "cpu", "--no-progress"])
    assert rc == 0 and "MIST edit" in capsys.readouterr().out
    meta = json.loads((tmp_path / "gen" / "generation.json").read_text())  # the images say which model made them
    assert meta["model"].startswith("tiny-sd+mist:") and meta["edit"] == str(out)
    # refusing a bad target is an error message, not a traceback
    rc = main(["edit", "mist", "--model", "tiny-sd", "--concepts", "doctor", "--target", "0.7,0.2",
               "--measured", str(measured), "--out", str(tmp_path / "y.safetensors"), "--device", "cpu"])
    assert rc == 1 and "sum to 1" in capsys.readouterr().err


def test_cli_edit_with_a_python_classifier(tmp_path, capsys, tiny_sd):
    from fastfair.cli import main

    clf = tmp_path / "clf.py"
    clf.write_text("import numpy as np\n\n"
                   "class C:\n"
                   "    labels = {'gender': ('female', 'male')}\n\n"
                   "    def predict(self, images):\n"
                   "        return {'gender': np.tile([0.8, 0.2], (len(images), 1))}\n\n"
                   "def make(attribute_sets=(), device=None):\n"
                   "    return C()\n")
    out = tmp_path / "x.safetensors"
    rc = main(["edit", "mist", "--model", "tiny-sd", "--concepts", "doctor", "--classifier", f"python:{clf}:make",
               "--images", "1", "--steps", "1", "--height", "64", "--width", "64", "--rounds", "1",
               "--out", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 0
    meta = mist.load(out).meta
    assert [r["p_hat"]["doctor"] for r in meta["rounds"]] == [[0.0, 1.0], [0.0, 1.0]]  # argmax: all female
    assert meta["edit_rounds"] == 1 and meta["converged"] == {"doctor": False}
    assert "1 edit rounds" in capsys.readouterr().out


def test_audit_cli_with_an_edit(tiny_sd, tmp_path, capsys):
    """fastfair audit --edit: the edit is applied and the run names the edited model, so a run
    directory made without the edit refuses the edited run."""
    from fastfair.cli import main

    edit = mist.mist(tiny_sd, ["doctor"], "gender", measured={"doctor": [1.0, 0.0]}, eta_e=1e7, step=0.5,
                     progress=False)
    path = edit.save(tmp_path / "e.safetensors")
    edit.revert(tiny_sd)
    common = ["audit", "--model", "tiny-sd", "--prompts", "list:doctor", "--seeds", "1", "--steps", "2",
              "--classifier", "none", "--entanglement", "none", "--no-report", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "run")]) == 0
    rc = main(common + ["--edit", str(path), "--out", str(tmp_path / "run"), "--resume"])
    assert rc != 0 and "mist:" in capsys.readouterr().err
    assert main(common + ["--edit", str(path), "--out", str(tmp_path / "run_edit")]) == 0
    cfg = (tmp_path / "run_edit" / "audit.json").read_text()
    assert "tiny-sd+mist:" in cfg


def test_cli_reference_protocol(monkeypatch, tmp_path, capsys):
    """--protocol reference gives the MIST authors' prompt and measurement settings; explicit flags win;
    --seeds with --reseed is refused."""
    from fastfair import mist as mist_mod
    from fastfair.cli import main

    seen = {}

    def fake(pipe, concepts, attributes, **kw):
        seen.update(kw)
        raise KeyboardInterrupt  # stop before any work: only the settings are under test

    monkeypatch.setattr(mist_mod, "mist", fake)
    base = ["edit", "mist", "--model", "tiny-sd", "--concepts", "doctor", "--out", str(tmp_path / "e.safetensors")]
    assert main(base + ["--protocol", "reference"]) != 0
    assert (seen["template"], seen["measure_template"], seen["images"], seen["max_rounds"], seen["reseed"],
            seen["clip_model"], seen["negative_prompt"]) == (
        "a person of {concept}", "a headshot of a person of {concept}", 100, 150, True, "openai/clip-vit-base-patch32",
        "black and white, drawing, painting, unrealistic, low quality")
    assert main(base + ["--protocol", "reference", "--images", "8", "--template", "a {concept}"]) != 0
    assert (seen["images"], seen["template"], seen["max_rounds"]) == (8, "a {concept}", 150)
    assert main(base) != 0
    assert (seen["template"], seen["images"], seen["max_rounds"], seen["reseed"], seen["clip_model"]) == (
        "a {concept}", 20, 10, False, None)
    assert main(base + ["--protocol", "reference", "--seeds", "0-3"]) != 0  # explicit fixed seeds win
    assert (seen["seeds"], seen["reseed"], seen["images"]) == ("0-3", False, 100)
    capsys.readouterr()
    assert main(base + ["--seeds", "0-3", "--reseed"]) == 1
    assert "--reseed" in capsys.readouterr().err
    # the authors edit and measure in fp32: the reference protocol loads fp32 where fastfair's default is fp16 (CUDA)
    from fastfair import pipelines

    def loader(model, device=None, dtype=None):
        seen.update(device=device, dtype=dtype)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines, "load_pipeline", loader)
    for extra, want in (([], "fp16"), (["--protocol", "reference"], "fp32"),
                        (["--protocol", "reference", "--dtype", "bf16"], "bf16")):
        assert main(base + ["--device", "cuda"] + extra) != 0
        assert (seen["device"], seen["dtype"]) == ("cuda", want)


def test_face_crops_in_the_measurement():
    """face_detector: the classifier sees each image's largest face crop; images without a face are NaN rows
    (abstentions, left out of the distribution); joint-class callables are refused with the way out."""
    from PIL import Image

    from fastfair.faces import Face

    sets = mist.parse_attributes("gender")
    seen = []

    class Audit:
        labels = {"gender": ("male", "female")}

        def predict(self, images):
            seen.extend(im.size for im in images)
            return {"gender": np.tile([0.9, 0.1], (len(images), 1))}

    def detector(im):   # a face in bright images only
        return [Face((2, 2, 10, 10))] if im.mean() > 100 else []

    imgs = [Image.new("RGB", (16, 16), (200, 200, 200)), Image.new("RGB", (16, 16), (10, 10, 10))]
    f = mist.resolve_classifier(Audit(), sets, face_detector=detector)
    p = f(imgs)
    assert torch.isfinite(p[0]).all() and torch.isnan(p[1]).all() and seen == [(224, 224)]
    torch.testing.assert_close(mist.distribution(p), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert "face_crops" in f.describe
    with pytest.raises(mist.MistError, match="face crops need a fastfair.classify classifier"):
        mist.resolve_classifier(lambda ims: torch.ones(len(ims), 2) / 2, sets, face_detector=detector)
