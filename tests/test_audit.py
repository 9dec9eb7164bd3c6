"""fastfair.audit end to end on tiny-sd (2 professions, 2 seeds, 2 steps, tiny random CLIP classifier):
Parquet rows checked against an independent generate() + metrics + classifier, summaries against
hand-computed values, resume and the settings lock, every bad input the issue lists, the CLI, and the
HTML report in headless Chromium."""
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny_models import tiny_clip

import fastfair
from fastfair import metrics
from fastfair.audit import AuditInputError, RunDirError, load_results
from fastfair.audit.attributes import ATTRIBUTE_SETS, parse_attributes
from fastfair.audit.prompts import PROMPT_SETS, load_professions
from fastfair.audit.summary import summarize
from fastfair.classify import ClassifierMismatchError, ClipZeroShot, ModuleClassifier

PROFS = ["doctor", "nurse"]
COMMON = dict(seeds=2, steps=2, progress=False, n_boot=200)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_clip_classifier(sets):
    model, tok = tiny_clip()
    prompts = {s.name: {lab: list(p) for lab, p in zip(s.labels, s.prompts)} for s in sets}
    return ClipZeroShot(model, tok, prompts, model_id="tiny-random-clip")


@pytest.fixture(scope="module")
def run(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    sets, _ = parse_attributes("gender,race")
    clf = tiny_clip_classifier(sets)
    res = fastfair.audit("tiny-sd", "list:doctor,nurse", pipeline=tiny_sd, attributes="gender,race", out=out,
                         classifier=clf, targets={"gender": [0.5, 0.5]}, batch_size=2, **COMMON)
    return res, clf


def test_results_parquet_layout(run):
    res, _ = run
    df = res.results
    assert isinstance(df, pd.DataFrame)
    run_dir, df2 = res  # unpacks as (run_dir, DataFrame)
    assert run_dir == res.run_dir and df2 is df
    # 2 professions x 2 seeds neutral + 2 x 2 x (2 gender + 2 race words) in-prompt
    assert len(df) == 4 + 16 and df["work_id"].is_unique
    assert (df["kind"] == "neutral").sum() == 4
    ip = df[df["kind"] == "inprompt"]
    assert sorted(set(ip["prompt"])) == sorted(f"a photo of the face of a {w} {p}" for p in PROFS
                                               for w in ("male", "female", "white", "African-American"))
    assert set(df["seed"]) == {0, 1}
    for col in ("iou_open_gender", "softiou_open_gender", "iou_open_race", "softiou_open_race", "p_gender_male",
                "p_race_african_american", "pred_gender", "pred_race", "pred_gender_x_race"):
        assert col in df.columns
    neutral = df[df["kind"] == "neutral"]
    assert neutral[["iou_open_gender", "iou_open_race"]].notna().all().all()
    assert ip["iou_open_gender"].isna().all() and ip["iou_inprompt"].notna().all()
    assert ((df["pred_gender"] + "|" + df["pred_race"]) == df["pred_gender_x_race"]).all()
    on_disk = pd.read_parquet(res.run_dir / "results.parquet")
    pd.testing.assert_frame_equal(on_disk, df)
    pd.testing.assert_frame_equal(load_results(res.run_dir), df)
    for rel in df["image"]:
        assert (res.run_dir / rel).is_file()
    assert (res.run_dir / "report.html").is_file() and (res.run_dir / "summary.json").is_file()
    assert res.summary["n_images"] == res.summary["n_planned"] == 20
    assert not list(res.run_dir.rglob(".*.tmp"))


def test_rows_equal_independent_generation_metrics_and_classifier(run, tiny_sd):
    res, clf = run
    df = res.results
    # open vocabulary, as BiasMap: maps of the profession and "gender" in the attribution prompt
    for prof in PROFS:
        rows = df[(df["kind"] == "neutral") & (df["profession"] == prof)].sort_values("seed")
        prompt = f"a photo of the face of a {prof}"
        for word in ("gender", "race"):
            gen = fastfair.generate(tiny_sd, prompt, seeds=[0, 1], steps=2, maps=[prof, word],
                                    attribution_prompt=f"{prompt} and {word}", progress=False)
            np.testing.assert_array_equal(rows[f"iou_open_{word}"].to_numpy(), gen.iou(prof, word).numpy())
            # the audit reads all attribution prompts from one generation (maps-only ops.attention_maps for
            # each): float32 rounding apart from the fused op's maps (~3e-7), which Sinkhorn amplifies ~10x
            np.testing.assert_allclose(rows[f"softiou_open_{word}"].to_numpy(), gen.soft_iou(prof, word).numpy(),
                                       rtol=2e-5)
        # the stored image is the generated one (PNG is lossless)
        for i, (_, r) in enumerate(rows.iterrows()):
            np.testing.assert_array_equal(np.asarray(Image.open(res.run_dir / r["image"])), np.asarray(gen.images[i]))
        # stored maps (float16)
        from safetensors.torch import load_file

        shard = load_file(res.run_dir / rows.iloc[0]["maps"])
        m = shard[f"{rows.iloc[0]['work_id']}:open:race:attribute"]
        torch.testing.assert_close(m.float(), gen.maps["race"][0], rtol=2e-3, atol=1e-4)
    # in-prompt
    r = df[(df["kind"] == "inprompt") & (df["profession"] == "nurse") & (df["label"] == "female")].sort_values("seed")
    gen = fastfair.generate(tiny_sd, "a photo of the face of a female nurse", seeds=[0, 1], steps=2,
                            maps=["nurse", "female"], progress=False)
    np.testing.assert_array_equal(r["iou_inprompt"].to_numpy(), metrics.iou(gen.maps["nurse"], gen.maps["female"]))
    # classifier probabilities, recomputed from the PNG files
    imgs = [Image.open(res.run_dir / p) for p in df["image"]]
    probs = clf.predict(imgs)
    np.testing.assert_allclose(df[["p_gender_male", "p_gender_female"]].to_numpy(), probs["gender"], rtol=1e-6)
    np.testing.assert_allclose(df[["p_race_white", "p_race_african_american"]].to_numpy(), probs["race"], rtol=1e-6)
    assert df["pred_gender"].tolist() == [("male", "female")[i] for i in probs["gender"].argmax(1)]


def test_summary_matches_the_rows(run):
    res, _ = run
    df, s = res.results, res.summary
    neutral = df[df["kind"] == "neutral"]
    # mIoU per profession = mean over its images; overall = mean over professions
    per = {p: neutral.loc[neutral["profession"] == p, "iou_open_gender"].mean() for p in PROFS}
    blk = s["entanglement"]["open"]["gender"]["iou"]
    for p in PROFS:
        assert blk["per_profession"][p]["mean"] == pytest.approx(per[p])
        assert blk["per_profession"][p]["lo"] <= per[p] <= blk["per_profession"][p]["hi"]
    assert blk["overall"]["mean"] == pytest.approx(np.mean(list(per.values())))
    for p in PROFS:
        preds = neutral.loc[neutral["profession"] == p, "pred_gender"].tolist()
        f = np.array([preds.count("male"), preds.count("female")]) / len(preds)
        e = s["distribution"]["gender"]["per_profession"][p]
        np.testing.assert_allclose(e["freq"], f)
        assert e["dft_bias"]["mean"] == pytest.approx(abs(f[0] - f[1]))
        assert e["delta"]["mean"] == pytest.approx(abs(f[0] - 0.5) / 0.5)
        assert e["risk_difference"]["mean"] == pytest.approx(f[0] - f[1])
    assert s["distribution"]["gender×race"]["labels"] == ["male|White", "male|African-American",
                                                         "female|White", "female|African-American"]
    ip = df[(df["kind"] == "inprompt") & (df["attribute"] == "gender")]
    assert s["adherence"]["gender"]["overall"] == pytest.approx((ip["pred_gender"] == ip["label"]).mean())
    for lab in ("male", "female"):  # each word's share and the count it is of
        rows = ip[ip["label"] == lab]
        assert s["adherence"]["gender"]["per_label_n"][lab] == len(rows)
        assert s["adherence"]["gender"]["per_label"][lab] == pytest.approx((rows["pred_gender"] == lab).mean())


def _toy_config(profs, labels=("male", "female"), targets=None):
    return {"settings": {"entanglement": ["open"], "template": "a photo of a {}",
                         "attribution_template": "{prompt} and {attribute}",
                         "attributes": {"gender": {"labels": list(labels), "words": list(labels),
                                                   "prompts": [[x] for x in labels], "open_word": "gender"}},
                         "intersections": [], "classifier": {"type": "hand"}},
            "work": {"professions": profs, "seeds": [0, 1, 2, 3]},
            "summary": {"targets": targets or {}, "n_boot": 500, "boot_seed": 0, "level": 0.95}}


def test_summarize_hand_computed():
    # doctor: 3 male, 1 female; nurse: 1 male, 2 female, 1 abstained
    df = pd.DataFrame({
        "kind": ["neutral"] * 8, "profession": ["doctor"] * 4 + ["nurse"] * 4, "attribute": [None] * 8,
        "label": [None] * 8,
        "iou_open_gender": [0.2, 0.4, 0.6, np.nan, 0.1, 0.1, 0.3, 0.3],
        "softiou_open_gender": [0.5] * 8,
        "pred_gender": ["male", "male", "male", "female", "male", "female", "female", None],
    })
    s = summarize(df, _toy_config(["doctor", "nurse"], targets={"gender": [0.75, 0.25]}))
    ent = s["entanglement"]["open"]["gender"]["iou"]
    assert ent["per_profession"]["doctor"]["mean"] == pytest.approx(0.4)    # NaN (empty masks) left out
    assert ent["per_profession"]["doctor"]["n"] == 3
    assert ent["per_profession"]["nurse"]["mean"] == pytest.approx(0.2)
    assert ent["overall"]["mean"] == pytest.approx(0.3)
    g = s["distribution"]["gender"]
    d, n = g["per_profession"]["doctor"], g["per_profession"]["nurse"]
    assert d["freq"] == [0.75, 0.25] and n["freq"] == pytest.approx([1 / 3, 2 / 3]) and n["abstained"] == 1
    assert d["dft_bias"]["mean"] == pytest.approx(0.5) and n["dft_bias"]["mean"] == pytest.approx(1 / 3)
    assert g["overall"]["dft_bias"]["mean"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert d["delta"]["mean"] == pytest.approx(0.5)
    assert d["kl_uniform"]["mean"] == pytest.approx(0.1308120, abs=1e-7)
    assert d["target_gap"]["mean"] == pytest.approx(0.0)                  # exactly the 75/25 target
    assert n["target_gap"]["mean"] == pytest.approx((abs(1 / 3 - 0.75) + abs(2 / 3 - 0.25)) / 2)
    assert n["risk_difference"]["mean"] == pytest.approx(-1 / 3)
    assert g["overall"]["freq_pooled"] == pytest.approx([4 / 7, 3 / 7])
    # the same summary twice: the bootstrap is seeded
    assert summarize(df, _toy_config(["doctor", "nurse"], targets={"gender": [0.75, 0.25]})) == s


def test_resume_skips_everything_and_settings_lock(run, tiny_sd):
    res, clf = run
    before = sorted(p.name for p in (res.run_dir / "parts").iterdir())
    kw = dict(pipeline=tiny_sd, attributes="gender,race", out=res.run_dir, classifier=clf,
              targets={"gender": [0.5, 0.5]}, batch_size=2, **COMMON)
    with pytest.raises(RunDirError, match="already has 20 finished image.*--resume"):
        fastfair.audit("tiny-sd", "list:doctor,nurse", **kw)
    again = fastfair.audit("tiny-sd", "list:doctor,nurse", resume=True, **kw)
    assert sorted(p.name for p in (res.run_dir / "parts").iterdir()) == before  # nothing regenerated
    pd.testing.assert_frame_equal(again.results, res.results)
    # a run directory from another configuration is refused, with the differences and a way out
    with pytest.raises(RunDirError, match=r"(?s)different settings.*generation\.steps: 2 in the run directory, 3 now"
                                          r".*--overwrite"):
        fastfair.audit("tiny-sd", "list:doctor,nurse", resume=True, **dict(kw, steps=3))
    with pytest.raises(RunDirError, match=r"work\.professions"):
        fastfair.audit("tiny-sd", "list:doctor,pilot", resume=True, **kw)
    # the same classifier with other weights (a retrained checkpoint under the same name): refused, not mixed
    import copy

    clf2 = copy.deepcopy(clf)
    with torch.no_grad():
        next(clf2.model.parameters()).add_(0.01)
    assert clf2.describe() == clf.describe()
    with pytest.raises(RunDirError, match=r"classifier_weights"):
        fastfair.audit("tiny-sd", "list:doctor,nurse", resume=True, **dict(kw, classifier=clf2))


def test_overwrite_and_foreign_directories(tiny_sd, tmp_path):
    out = tmp_path / "ow"
    kw = dict(pipeline=tiny_sd, attributes="gender", entanglement="none", classifier="none", out=out, report=False,
              **COMMON)
    first = fastfair.audit("tiny-sd", "list:pilot", **kw)
    assert len(first.results) == 2 and not (out / "maps").exists()
    second = fastfair.audit("tiny-sd", "list:pilot", overwrite=True, **dict(kw, seeds=[5]))
    assert second.results["seed"].tolist() == [5]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a fastfair audit directory"):
        fastfair.audit("tiny-sd", "list:pilot", **dict(kw, out=foreign))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_bad_inputs_have_clear_errors(tiny_sd, tmp_path):
    kw = dict(pipeline=tiny_sd, attributes="gender", classifier="none", out=tmp_path / "bad", **COMMON)
    with pytest.raises(AuditInputError, match="unknown built-in prompt set 'nope'.*builtin:biasmap19"):
        fastfair.audit("tiny-sd", "builtin:nope", **kw)
    empty = tmp_path / "empty.txt"
    empty.write_text("# professions\n\n   \n")
    with pytest.raises(AuditInputError, match="has no professions"):
        fastfair.audit("tiny-sd", f"file:{empty}", **kw)
    with pytest.raises(AuditInputError, match="does not exist"):
        fastfair.audit("tiny-sd", f"file:{tmp_path / 'missing.txt'}", **kw)
    with pytest.raises(AuditInputError, match=r"attribute word 'gender' missing from the attribution prompt "
                                              r"'a photo of the face of a doctor and identity'"):
        fastfair.audit("tiny-sd", "list:doctor", attribution_template="{prompt} and identity", **kw)
    # an attribute word that is also part of the profession: its map averaged the profession's token (a review)
    with pytest.raises(AuditInputError, match="'race' occurs more than once in 'a photo of the face of a race car "
                                              "driver and race'"):
        fastfair.audit("tiny-sd", "list:race car driver", **dict(kw, attributes="race"))
    with pytest.raises(AuditInputError, match="'old' occurs more than once"):
        fastfair.audit("tiny-sd", "list:old age nurse", **dict(kw, attributes="age", entanglement="inprompt"))
    with pytest.raises(AuditInputError, match="unknown attribute set 'ethnicity'"):
        fastfair.audit("tiny-sd", "list:doctor", **dict(kw, attributes="gender,ethnicity"))
    with pytest.raises(AuditInputError, match="must contain {} or {profession} exactly once"):
        fastfair.audit("tiny-sd", "list:doctor", template="a photo of a person", **kw)
    with pytest.raises(AuditInputError, match="target for 'age'"):
        fastfair.audit("tiny-sd", "list:doctor", targets="age=0.75,0.25", **kw)
    with pytest.raises(AuditInputError, match="2 non-negative numbers summing to 1"):
        fastfair.audit("tiny-sd", "list:doctor", targets="gender=0.7,0.7", **kw)
    with pytest.raises(AuditInputError, match="unknown entanglement mode"):
        fastfair.audit("tiny-sd", "list:doctor", entanglement="closed", **kw)
    wrong = ModuleClassifier(torch.nn.Identity(), labels={"gender": ["man", "woman"]})
    with pytest.raises(ClassifierMismatchError, match="labels for 'gender' are \\['man', 'woman'\\]"):
        fastfair.audit("tiny-sd", "list:doctor", **dict(kw, classifier=wrong))
    with pytest.raises(RuntimeError, match="offline presets"):
        fastfair.audit("tiny-sdx", "list:doctor", **{k: v for k, v in kw.items() if k != "pipeline"})
    assert not (tmp_path / "bad").exists()  # nothing was started


def test_prompt_sets_and_attribute_sets():
    assert len(PROMPT_SETS["biasmap19"]) == 19 and PROMPT_SETS["biasmap19"][0] == "architect"
    assert len(PROMPT_SETS["winobias"]) == 40 and len(set(PROMPT_SETS["winobias"])) == 40
    assert len(PROMPT_SETS["broad"]) == 153 and len(set(PROMPT_SETS["broad"])) == 153
    assert load_professions("list: doctor , nurse") == ["doctor", "nurse"]
    assert ATTRIBUTE_SETS["fairface7"].labels == ("White", "Black", "Latino_Hispanic", "East Asian",
                                                  "Southeast Asian", "Indian", "Middle Eastern")
    assert ATTRIBUTE_SETS["race"].labels == ("White", "African-American")
    sets, inters = parse_attributes("gender,race,age*fairface4")
    assert [s.name for s in sets] == ["gender", "race", "age", "fairface4"]
    names = [i.name for i in inters]
    assert names[0] == "age×fairface4" and "gender×race" in names and len(names) == 5
    assert "race×fairface4" not in names  # two label sets of one attribute are not crossed
    with pytest.raises(ValueError, match="same attribute"):
        parse_attributes("race*fairface7")
    assert inters[0].labels[:2] == ("young|White", "young|Black")
    custom = {"skin": {"labels": ["light", "dark"], "words": ["light-skinned", "dark-skinned"],
                       "prompts": [["a photo of a light-skinned person"], ["a photo of a dark-skinned person"]],
                       "open_word": "skin"}}
    sets, inters = parse_attributes("gender*skin", custom)
    assert [s.name for s in sets] == ["gender", "skin"] and sets[1].words == ("light-skinned", "dark-skinned")
    assert [i.name for i in inters] == ["gender×skin"]
    with pytest.raises(ValueError, match="repeats a set"):
        parse_attributes("gender*gender")


def test_every_builtin_profession_fits_the_template(tiny_sd):
    from fastfair import concepts

    for name, profs in PROMPT_SETS.items():
        for p in profs:
            concepts.resolve(tiny_sd, f"a photo of the face of a {p} and gender", p)


def test_cli_audit_and_report(tmp_path, capsys):
    from fastfair.cli import main

    out = tmp_path / "cli"
    rc = main(["audit", "--model", "tiny-sd", "--prompts", "list:chef", "--attributes", "race,age", "--seeds", "2",
               "--steps", "2", "--classifier", "none", "--entanglement", "open", "--out", str(out), "--no-progress",
               "--n-boot", "50"])
    assert rc == 0
    text = capsys.readouterr().out
    assert re.search(r"mIoU\(profession, age\) = 0\.\d{4} \[", text) and "results.parquet" in text
    assert len(pd.read_parquet(out / "results.parquet")) == 2
    assert list(json.loads((out / "audit.json").read_text())["settings"]["attributes"]) == ["race", "age"]
    (out / "report.html").unlink()
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.index("Open vocabulary: “race”") < page.index("Open vocabulary: “age”")  # the listed order
    assert main(["audit", "--model", "tiny-sd", "--prompts", "builtin:nope", "--out", str(tmp_path / "x")]) == 1
    assert "unknown built-in prompt set" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 1


# ---------------------------------------------------------------------------------------- Chromium

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--hide-scrollbars"]


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(run, tmp_path):
    res, _ = run
    page = (res.run_dir / "report.html").resolve()
    html = page.read_text()
    assert "<svg" in html and "data:image/jpeg;base64," in html and "gender×race" in html
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)  # self-contained
    chrome = _chromium()
    base = [chrome, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    env = dict(os.environ, HOME=str(tmp_path))
    shot = tmp_path / "shot.png"
    p = subprocess.run(base + ["--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1200,1600",
                               page.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    assert shot.exists(), p.stderr[-2000:]
    console = [ln for ln in p.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    assert img.std() > 20  # not blank
    assert (img < 128).mean() > 0.01 and (img > 200).mean() > 0.3  # text and plots on a light page
    dom = subprocess.run(base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, env=env)
    assert 'data-ready="1"' in dom.stdout, dom.stderr[-2000:]
    assert re.search(r'<div id="js-errors"></div>', dom.stdout), "the page reported a script error"


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_mmdit_audit_open_and_inprompt(tmp_path, model):
    """SD3 / Flux audits: open-vocabulary entanglement (the attribution prompt's own text stream through the
    MMDiT, fastfair.shadow) and in-prompt entanglement; rows equal generate's metrics."""
    sd3 = fastfair.load_pipeline(model)
    size = dict(height=128, width=128)
    res = fastfair.audit(model, "list:doctor", pipeline=sd3, attributes="gender", out=tmp_path / "b",
                         classifier="none", entanglement="both", **COMMON, **size)
    df = res.results
    ip = df[df["kind"] == "inprompt"].sort_values(["prompt", "seed"])
    assert len(ip) == 4 and ip["iou_inprompt"].notna().all()
    row = ip.iloc[0]
    gen = fastfair.generate(sd3, row["prompt"], seeds=[int(row["seed"])], steps=2, maps=["doctor", row["word"]],
                            progress=False, **size)
    assert row["iou_inprompt"] == pytest.approx(float(gen.iou("doctor", row["word"])[0]), abs=1e-6)
    neutral = df[df["kind"] == "neutral"].sort_values("seed")
    assert len(neutral) == 2 and neutral["iou_open_gender"].notna().all()
    prompt = neutral.iloc[0]["prompt"]
    gen = fastfair.generate(sd3, prompt, seeds=[0, 1], steps=2, maps=["doctor", "gender"],
                            attribution_prompt=f"{prompt} and gender", progress=False, **size)
    np.testing.assert_allclose(neutral["iou_open_gender"].to_numpy(), gen.iou("doctor", "gender").numpy(), atol=1e-6)


def test_every_classifier_output_is_checked(tiny_sd, tmp_path):
    """A duck-typed classifier (labels + predict, no describe) or an AttributeClassifier subclass returning logits or a
    wrong column count went unchecked into the frequencies (a helper's review); now refused, while a valid one runs."""
    class Duck:
        labels = {"gender": ("male", "female")}

        def __init__(self, out):
            self.out = out

        def predict(self, images):
            return {"gender": np.tile(np.asarray(self.out, dtype=float), (len(images), 1))}

    kw = dict(pipeline=tiny_sd, attributes="gender", entanglement="none", seeds=1, steps=2, progress=False,
              report=False)
    for bad in ([5.0, -3.0], [0.3, 0.3, 0.4]):
        with pytest.raises(ClassifierMismatchError):
            fastfair.audit("tiny-sd", "list:doctor", classifier=Duck(bad), out=tmp_path / f"b{len(bad)}", **kw)
    res = fastfair.audit("tiny-sd", "list:doctor", classifier=Duck([0.25, 0.75]), out=tmp_path / "ok", **kw)
    assert (res.results["pred_gender"] == "female").all()
    assert json.loads((tmp_path / "ok" / "audit.json").read_text())["settings"]["classifier"]["type"].endswith("Duck")


def test_occurrence_check_counts_words_not_tokens():
    """An attribute or profession word must occur once; counting token positions refused a word T5 splits
    differently in context ("doctor" after a '/' on Flux) as occurring twice (a review)."""
    from fastfair.audit.runner import _resolve_or_raise

    pipe = fastfair.load_pipeline("tiny-flux")
    _resolve_or_raise(pipe, "a photo of the face of a nurse/doctor", "doctor", "profession")
    with pytest.raises(AuditInputError, match="occurs more than once"):
        _resolve_or_raise(pipe, "a photo of a doctor and a Doctor", "doctor", "profession")


def test_batch_size_over_the_seed_count_is_said(tmp_path):
    """An audit's GPU batch holds one prompt's seeds: a --batch-size above the seed count says so (a user raising it
    for throughput would otherwise get batches of the seed count without a word); at or under it, nothing."""
    import warnings

    from fastfair.audit import AuditInputError

    with pytest.warns(UserWarning, match=r"batch_size 16 > 4 seed\(s\).*at most 4 image"), \
            pytest.raises(AuditInputError, match="steps"):
        fastfair.audit("tiny-sd", "list:doctor", seeds=4, batch_size=16, steps=0, out=tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(AuditInputError, match="steps"):
            fastfair.audit("tiny-sd", "list:doctor", seeds=4, batch_size=4, steps=0, out=tmp_path / "b")
