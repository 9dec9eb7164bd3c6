"""Evaluating a finetuned model: ``--soft-tokens`` / ``--lora`` / ``--token`` in ``fastfair generate`` and ``audit``.

Soft tokens are the model's: every text the finetuned model encodes starts with them, the attribution prompts of
open-vocabulary maps included, however the attribution template spells the prompt; bad arguments are refused before
any model loads.
"""
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from fastfair.cli import main

PROMPT = "a photo of the face of a doctor"
BASE = ["--model", "tiny-sd", "--steps", "2", "--height", "64", "--width", "64", "--no-progress"]


@pytest.fixture
def soft(tmp_path):
    path = tmp_path / "soft_tokens.safetensors"   # SD 1.x soft tokens of tiny-sd (text width 32), 2 vectors
    save_file({"<fastfair>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, str(path))
    return path


def _audit(tmp_path, name, *extra):
    rc = main(["audit", *BASE, "--prompts", "list:doctor", "--seeds", "2", "--classifier", "none",
               "--entanglement", "open", "--no-report", "--n-boot", "0", "--out", str(tmp_path / name), *extra])
    assert rc == 0
    return pd.read_parquet(tmp_path / name / "results.parquet").sort_values("seed")


def test_attribution_prompts_carry_the_soft_tokens_whatever_the_template(tmp_path, soft, capsys):
    a = _audit(tmp_path, "a", "--soft-tokens", str(soft))
    b = _audit(tmp_path, "b", "--soft-tokens", str(soft), "--attribution-template",
               "a photo of the face of a {profession} and {attribute}")
    assert a["iou_open_gender"].tolist() == b["iou_open_gender"].tolist()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["entanglement"]["open"]["gender"]["attribution_example"] == \
        "<fastfair> a photo of the face of a doctor and gender"   # the prompt actually read
    # generate with the same soft tokens and the attribution prompt written out gives the audit's IoUs
    capsys.readouterr()
    assert main(["generate", *BASE, "--soft-tokens", str(soft), "--prompt", PROMPT, "--seeds", "0-1", "--maps",
                 "doctor,gender", "--attribution-prompt", "a photo of the face of a doctor and gender",
                 "--out", str(tmp_path / "g")]) == 0
    lines = [ln.split("\t") for ln in capsys.readouterr().out.splitlines() if ln[:1].isdigit()]
    assert [float(ln[-1]) for ln in lines] == pytest.approx(a["iou_open_gender"].tolist(), abs=1e-4)
    meta = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert meta["attribution_prompt"] == "<fastfair> a photo of the face of a doctor and gender"


def test_bad_finetuned_arguments_are_refused_before_loading(tmp_path, soft, capsys, monkeypatch):
    from fastfair import pipelines

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(pipelines, "load_pipeline", no_loading)
    lora_dir = tmp_path / "run"
    (lora_dir / "lora").mkdir(parents=True)
    (lora_dir / "dft.json").write_text("{}")
    cases = [
        (["audit", "--token", "<x>"], "--token names the placeholder of --soft-tokens"),
        (["generate", "--token", "<x>"], "--token names the placeholder of --soft-tokens"),
        (["generate", "--soft-tokens", str(soft), "--token", "docto"], "occurs in"),
        (["audit", "--soft-tokens", str(tmp_path)], "is a folder"),
        (["generate", "--soft-tokens", str(tmp_path / "missing.safetensors")], "no such file"),
        (["audit", "--lora", str(soft)], "load it with --soft-tokens"),
        (["generate", "--lora", str(lora_dir)], "is a DFT run folder"),
        (["generate", "--lora", str(tmp_path / "nothing")], "does not exist"),
    ]
    for extra, match in cases:
        cmd, rest = extra[0], extra[1:]
        args = [cmd, *BASE, *rest, "--out", str(tmp_path / "out")]
        args += ["--prompt", PROMPT] if cmd == "generate" else ["--prompts", "list:doctor", "--classifier", "none"]
        assert main(args) == 1, extra
        assert match in capsys.readouterr().err, extra


def test_soft_token_names_are_checked_against_the_prompts_before_loading(tmp_path, capsys, monkeypatch):
    """SD3 / Flux files name their tokens <T_0> ...: a prompt that contains one is refused before loading, and a
    --token that is only a substring of a word is not (the pipeline sees <doc_0>, not 'doc')."""
    from fastfair import dft, pipelines

    path = tmp_path / "sd3.safetensors"
    save_file({k: torch.zeros(2, 4) for k in ("clip_l", "clip_g", "t5")}, str(path),
              metadata={"fastfair_model_kind": "sd3", "fastfair_tokens": "<fastfair_0> <fastfair_1>"})
    assert dft.soft_token_names(path) == ["<fastfair_0>", "<fastfair_1>"]
    assert dft.soft_token_names(path, "doc") == ["<doc_0>", "<doc_1>"]
    assert dft.soft_token_names(path, "<a> <b>") == ["<a>", "<b>"]
    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["generate", *BASE, "--soft-tokens", str(path), "--prompt", "<fastfair_1> " + PROMPT,
                 "--out", str(tmp_path / "g")]) == 1
    assert "the soft token '<fastfair_1>' occurs in" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="loaded"):   # passed every check: it reached the loading
        main(["generate", *BASE, "--soft-tokens", str(path), "--token", "doc", "--prompt", PROMPT,
              "--out", str(tmp_path / "g2")])
    with pytest.raises(dft.DFTError, match="one word"):
        dft.DFTConfig(token="my tok")


def test_a_token_inside_a_profession_is_refused(tmp_path, soft, capsys):
    assert main(["audit", *BASE, "--soft-tokens", str(soft), "--token", "docto", "--prompts", "list:doctor",
                 "--classifier", "none", "--out", str(tmp_path / "a")]) == 1
    assert "occurs in the prompt" in capsys.readouterr().err
