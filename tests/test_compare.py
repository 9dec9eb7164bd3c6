"""fastfair.audit.compare / `fastfair compare`: paired differences between audit runs, against values computed
here with pandas from the two runs' rows; intervals of exactly known differences; refusals."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import fastfair
from fastfair.audit import CompareError, compare
from fastfair.classify import AttributeClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


class Alternating(AttributeClassifier):
    """Gender and race by image brightness: a deterministic function of the image."""
    labels = {"gender": ("male", "female"), "race": ("White", "African-American")}

    def predict(self, images):
        m = [np.asarray(im).mean() for im in images]
        g = np.array([[0.8, 0.2] if int(x * 10) % 2 else [0.3, 0.7] for x in m])
        r = np.array([[0.6, 0.4] if int(x * 100) % 3 else [0.1, 0.9] for x in m])
        return {"gender": g, "race": r}


@pytest.fixture(scope="module")
def base(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "base"
    fastfair.audit("tiny-sd", "list:doctor,nurse", pipeline=tiny_sd, attributes="gender,race", seeds=4, steps=2,
                   progress=False, n_boot=0, classifier=Alternating(), entanglement="open,inprompt", out=out,
                   report=False)
    return out


def edited(base, tmp_path, fn, config_fn=None):
    """A copy of the run whose rows went through ``fn`` (and its audit.json through ``config_fn``)."""
    dst = tmp_path / "other"
    shutil.copytree(base, dst)
    df = pd.read_parquet(dst / "results.parquet")
    fn(df).to_parquet(dst / "results.parquet")
    if config_fn is not None:
        cfg = json.loads((dst / "audit.json").read_text())
        config_fn(cfg)
        (dst / "audit.json").write_text(json.dumps(cfg))
    return dst


def test_identical_runs_differ_by_zero(base):
    res = compare(base, base, n_boot=200)
    c = res["comparisons"][0]
    assert c["differs"] == []
    assert sorted(c["distribution"]) == ["gender", "gender×race", "race"]  # intersections too
    for v in list(c["entanglement"].values()) + [v for d in c["distribution"].values() for v in d.values()]:
        assert v["diff"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert c["coverage"]["neutral_pairs"] == 8 and not c["coverage"]["professions_left_out"]
    assert c["entanglement"]["IoU(profession, gender), open"]["n_pairs"] == 8
    assert c["entanglement"]["IoU(profession, gender word), in-prompt"]["n_pairs"] == 16


def test_known_differences(base, tmp_path):
    """IoU + 0.1 on every neutral image: difference 0.1 with a zero-width interval; SoftIoU perturbed per image:
    the point difference is the macro mean (over professions) of the per-pair differences; every image
    classified "female": DFT bias and Delta follow from the frequencies."""
    rng = np.random.default_rng(1)

    def fn(df):
        df = df.copy()
        neu = df["kind"] == "neutral"
        df.loc[neu, "iou_open_gender"] += 0.1
        df.loc[neu, "softiou_open_gender"] += rng.normal(0, 0.05, neu.sum())
        df.loc[neu, "pred_gender"] = "female"
        return df

    other = edited(base, tmp_path, fn)
    c = compare(base, other, n_boot=300)["comparisons"][0]
    iou = c["entanglement"]["IoU(profession, gender), open"]["diff"]
    assert iou["mean"] == pytest.approx(0.1) and iou["lo"] == pytest.approx(0.1) and iou["hi"] == pytest.approx(0.1)
    a = pd.read_parquet(base / "results.parquet")
    b = pd.read_parquet(other / "results.parquet")
    a, b = a[a["kind"] == "neutral"], b[b["kind"] == "neutral"]
    m = a.merge(b, on=["profession", "seed"], suffixes=("_a", "_b"))
    want = (m["softiou_open_gender_b"] - m["softiou_open_gender_a"]).groupby(m["profession"]).mean().mean()
    soft = c["entanglement"]["SoftIoU(profession, gender), open"]
    assert soft["diff"]["mean"] == pytest.approx(want, abs=1e-12)
    assert soft["diff"]["lo"] < soft["diff"]["mean"] < soft["diff"]["hi"]
    assert soft["baseline"] == pytest.approx(a.groupby("profession")["softiou_open_gender"].mean().mean())
    # distribution: the other run is all "female" (bias 1, Delta 1); the baseline's from its own frequencies
    fa = [(g == "female").mean() for _, g in a.groupby("profession", sort=False)["pred_gender"]]
    dist = c["distribution"]["gender"]
    assert dist["dft_bias"]["other"] == pytest.approx(1.0) and dist["delta"]["other"] == pytest.approx(1.0)
    assert dist["dft_bias"]["baseline"] == pytest.approx(np.mean([abs(1 - 2 * f) for f in fa]))
    assert dist["dft_bias"]["diff"]["mean"] == pytest.approx(1.0 - np.mean([abs(1 - 2 * f) for f in fa]))
    assert dist["risk_difference"]["other"] == pytest.approx(-1.0)  # male - female


def test_abstentions_partial_runs_and_shared_classifier(base, tmp_path):
    """A run that abstains on every nurse image is compared on the doctor images alone, for baseline, run and
    difference alike; a run missing the nurse rows is flagged as partial; a classifier description that differs
    only for a set the other run does not audit is the same classifier."""
    from fastfair.audit.compare import format_markdown

    def abstain(df):
        df = df.copy()
        df.loc[(df["kind"] == "neutral") & (df["profession"] == "nurse"), "pred_gender"] = None
        return df

    other = edited(base, tmp_path, abstain)
    g = compare(base, other, n_boot=100)["comparisons"][0]["distribution"]["gender"]["dft_bias"]
    a = pd.read_parquet(base / "results.parquet")
    doc = a[(a["kind"] == "neutral") & (a["profession"] == "doctor")]["pred_gender"]
    want = abs(2 * (doc == "female").mean() - 1)
    assert g["n_pairs"] == 4 and g["professions"] == 1
    assert g["baseline"] == pytest.approx(want) and g["other"] == pytest.approx(want) and g["diff"]["mean"] == 0
    shutil.rmtree(other)
    other = edited(base, tmp_path, lambda df: df[df["profession"] == "doctor"])
    res = compare(base, other, n_boot=100)
    cov = res["comparisons"][0]["coverage"]
    assert cov["neutral_pairs"] == 4 and cov["professions_left_out"] == ["nurse"]
    assert "**partial:**" in format_markdown(res) and "professions nurse" in format_markdown(res)
    shutil.rmtree(other)

    def no_race(cfg):
        del cfg["settings"]["attributes"]["race"]
        cfg["settings"]["intersections"] = []
        cfg["settings"]["classifier"] = {"type": "Alternating", "labels": {"gender": ["male", "female"]}}

    other = edited(base, tmp_path, lambda df: df, no_race)
    c = compare(base, other, n_boot=100)["comparisons"][0]
    assert sorted(c["distribution"]) == ["gender"]


def test_refusals(base, tmp_path):
    other = edited(base, tmp_path, lambda df: df, lambda cfg: cfg["settings"]["metrics"].update(percentile=50.0))
    with pytest.raises(CompareError, match="measured differently.*metrics"):
        compare(base, other)
    shutil.rmtree(other)
    other = edited(base, tmp_path, lambda df: df,
                   lambda cfg: cfg["settings"].update(classifier={"type": "another"}))
    with pytest.raises(CompareError, match="different classifiers"):
        compare(base, other)
    with pytest.raises(CompareError, match="n_boot"):
        compare(base, base, n_boot="abc")
    with pytest.raises(CompareError, match="at least one run"):
        compare(base)
    with pytest.raises(fastfair.audit.RunDirError, match="not a fastfair audit"):
        compare(base, tmp_path)


def test_mitigated_run_and_cli(base, tiny_sd, tmp_path, capsys):
    """A Fair Diffusion audit of the same plan against the baseline: the differing settings are named, the
    CLI prints the table and writes the JSON."""
    from fastfair.cli import main

    fd = tmp_path / "fd"
    fastfair.audit("tiny-sd", "list:doctor,nurse", pipeline=tiny_sd, attributes="gender,race", seeds=4, steps=2,
                   progress=False, n_boot=0, classifier=Alternating(), entanglement="open,inprompt", out=fd,
                   report=False, edit_guidance=fastfair.FairDiffusion.preset("gender", warmup=0))
    c = compare(base, fd, n_boot=100)["comparisons"][0]
    assert c["differs"] == ["generation.edit_guidance"]
    assert main(["compare", str(base), str(fd), "--n-boot", "100", "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "| IoU(profession, gender), open |" in out and "settings that differ: generation.edit_guidance" in out
    assert json.loads((tmp_path / "c.json").read_text())["comparisons"][0]["run"] == str(fd)
    assert main(["compare", str(base), str(tmp_path / "nowhere")]) == 1
    assert "not a fastfair audit" in capsys.readouterr().err


def test_environments_recorded_and_compared(base, tmp_path, tiny_sd, monkeypatch):
    """audit.json records the library versions, device and git revision of every session that added rows
    (a resume under another environment appends it); compare lists the environment fields that differ."""
    import torch

    from fastfair.audit import runner
    from fastfair.audit.compare import format_markdown

    cfg = json.loads((base / "audit.json").read_text())
    env = cfg["environments"][0]
    assert len(cfg["environments"]) == 1 and env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert "diffusers" in env and "git_revision" in env and "date" not in env
    kw = dict(pipeline=tiny_sd, attributes="gender", seeds=2, steps=2, progress=False, n_boot=0, classifier="none",
              entanglement="open", report=False)
    run = tmp_path / "r"
    fastfair.audit("tiny-sd", "list:doctor", out=run, **kw)
    monkeypatch.setattr(runner, "provenance", lambda dev: dict(env, torch="9.9.9"))
    fastfair.audit("tiny-sd", "list:doctor", out=run, resume=True, **dict(kw, seeds=2))
    envs = json.loads((run / "audit.json").read_text())["environments"]
    assert [e["torch"] for e in envs] == [torch.__version__, "9.9.9"]
    other = edited(base, tmp_path, lambda df: df,
                   lambda c: c.update(environments=[dict(e, torch="9.9.9") for e in c["environments"]]))
    res = compare(base, other, n_boot=50)
    assert res["comparisons"][0]["environment_differs"] == {"torch": [[torch.__version__], ["9.9.9"]]}
    assert f"environment differs: torch {torch.__version__} vs 9.9.9" in format_markdown(res)


def test_provenance_ignores_the_thread_count():
    import torch

    from fastfair._env import provenance

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = provenance("cpu")
        torch.set_num_threads(2)
        assert provenance("cpu") == a
    finally:
        torch.set_num_threads(n)


def test_image_similarity_to_the_baseline(base, tmp_path, capsys):
    """--image-similarity: per pair of neutral images (same profession and seed) the cosine of encoder features;
    untouched images give 1, flipped ones the value computed here from the PNGs; CLIP from a saved CLIPModel
    gives CLIPModel's own image features."""
    import torch
    from PIL import Image, ImageOps

    from fastfair.cli import main
    from tiny_models import tiny_clip

    other = edited(base, tmp_path, lambda df: df)
    df = pd.read_parquet(other / "results.parquet")
    doctor = df[(df["kind"] == "neutral") & (df["profession"] == "doctor")].sort_values("seed")
    for rel in doctor["image"]:
        ImageOps.mirror(Image.open(other / rel)).save(other / rel)
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(3),
                              torch.nn.Flatten())

    def feats(path):
        x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        with torch.no_grad():
            return enc(x[None])[0]

    manual = np.mean([float(torch.nn.functional.cosine_similarity(feats(base / r), feats(other / r), dim=0))
                      for r in doctor["image"]])
    res = compare(base, other, n_boot=200, image_similarity=enc)
    sim = res["comparisons"][0]["image_similarity"]["Sequential"]
    assert sim["per_profession"]["nurse"] == pytest.approx(1.0, abs=1e-6)
    assert sim["per_profession"]["doctor"] == pytest.approx(manual, rel=1e-6) and manual < 0.999
    assert sim["mean"] == pytest.approx((manual + 1) / 2, rel=1e-6) and sim["n_pairs"] == 8
    assert sim["lo"] <= sim["mean"] <= sim["hi"]
    # the CLI with CLIP loaded from a saved CLIPModel folder
    model, _ = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    assert main(["compare", str(base), str(other), "--image-similarity", f"clip:{tmp_path / 'clip'}", "--device",
                 "cpu", "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "image similarity to the baseline's image" in out and "ClipFeatures(" in out
    with pytest.raises(CompareError, match="use clip, clip:MODEL_ID, dinov2"):
        compare(base, other, image_similarity="vgg")


def test_clip_score_in_audits_summary_report_and_compare(tiny_sd, tmp_path):
    """--clip-score: 100 * max(cos(image, prompt), 0) with CLIP for every image (against CLIPModel's own image and
    text features here), per-profession means in the summary, a report section, a paired row in compare."""
    import torch
    from PIL import Image

    from fastfair.classify import clip_preprocess
    from tiny_models import tiny_clip

    model, tok = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    kw = dict(pipeline=tiny_sd, attributes="gender", seeds=2, steps=2, progress=False, n_boot=50, classifier="none",
              entanglement="none", clip_score=True, clip_model=str(tmp_path / "clip"))
    res = fastfair.audit("tiny-sd", "list:doctor,nurse", out=tmp_path / "a", **kw)
    df = res.results
    assert df["clip_score"].notna().all()
    row = df.iloc[0]
    img = Image.open(res.run_dir / row["image"])
    with torch.no_grad():
        fi = model.get_image_features(pixel_values=clip_preprocess([img], 32))
        fi = getattr(fi, "pooler_output", fi)
        t = tok([row["prompt"]], padding=True, return_tensors="pt")
        ft = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        ft = getattr(ft, "pooler_output", ft)
    expect = 100 * max(float(torch.nn.functional.cosine_similarity(fi, ft)), 0.0)
    assert row["clip_score"] == pytest.approx(expect, rel=1e-5, abs=1e-5)
    per = df.groupby("profession")["clip_score"].mean()
    cs = res.summary["clip_score"]
    assert cs["per_profession"]["doctor"]["mean"] == pytest.approx(per["doctor"])
    assert cs["overall"]["mean"] == pytest.approx(per.mean())
    assert "Prompt alignment (CLIP score)" in (res.run_dir / "report.html").read_text()
    c = compare(res.run_dir, res.run_dir, n_boot=50)["comparisons"][0]
    q = c["quality"]["CLIP score (prompt alignment), neutral"]
    assert q["diff"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0} and q["n_pairs"] == 4


def test_similarity_alone_notes_and_wrong_model_folders(tiny_sd, tmp_path):
    """Image similarity is a metric of its own (runs with nothing else to compare); runs scored with different
    CLIP models say why their CLIP scores are left out; a folder of another model kind is refused (its weights
    would be random); two encoders of one name both kept."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from fastfair.features import FeatureError, load_encoders
    from tiny_models import tiny_clip

    for i in (0, 1):
        model, tok = tiny_clip(seed=i)
        model.save_pretrained(tmp_path / f"clip{i}")
        tok.save_pretrained(tmp_path / f"clip{i}")
    kw = dict(pipeline=tiny_sd, attributes="gender", seeds=1, steps=2, progress=False, n_boot=20, classifier="none",
              entanglement="none", report=False)
    plain = fastfair.audit("tiny-sd", "list:doctor", out=tmp_path / "plain", **kw).run_dir
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    sims = compare(plain, plain, n_boot=20, image_similarity=[enc, enc])["comparisons"][0]["image_similarity"]
    assert sorted(sims) == ["Sequential", "Sequential#2"] and sims["Sequential"]["mean"] == pytest.approx(1.0)
    a = fastfair.audit("tiny-sd", "list:doctor", out=tmp_path / "a", clip_score=True, clip_model=str(tmp_path / "clip0"),
                       **kw).run_dir
    b = fastfair.audit("tiny-sd", "list:doctor", out=tmp_path / "b", clip_score=True, clip_model=str(tmp_path / "clip1"),
                       **kw).run_dir
    c = compare(a, b, n_boot=20, image_similarity=enc)["comparisons"][0]
    assert not c["quality"] and "CLIP score not compared: scored with" in c["notes"][0]
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "dino")
    with pytest.raises(FeatureError, match="not DINOv2"):
        load_encoders(f"dinov2:{tmp_path / 'clip0'}")
    with pytest.raises(FeatureError, match="not CLIP"):
        load_encoders(f"clip:{tmp_path / 'dino'}")
