"""Outputs never mix and bad input fails before any work: generate / finetune folders that hold an earlier
run, an --out that is a file, seeds, audit settings that cannot give a result, overlay names."""
import json
import time

import pytest
import torch

import fastfair
from fastfair.cli import main
from fastfair.generation import check_out_dir, parse_seeds

PROMPT = "a photo of the face of a doctor"


def _gen(out, *extra):
    return main(["generate", "--model", "tiny-sd", "--prompt", PROMPT, "--steps", "2", "--out", str(out),
                 "--no-progress", *extra])


def test_generate_refuses_a_folder_with_an_earlier_generation_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "o"
    assert _gen(out, "--maps", "doctor", "--seeds", "0-3") == 0
    assert len(list((out / "images").iterdir())) == 4
    capsys.readouterr()
    t = time.perf_counter()
    assert _gen(out, "--seeds", "5") == 1
    err = capsys.readouterr().err
    assert "already holds a generation" in err and "--overwrite" in err
    assert time.perf_counter() - t < 5  # refused before loading or generating anything
    assert len(list((out / "images").iterdir())) == 4  # untouched
    (out / "notes.txt").write_text("mine")
    assert _gen(out, "--seeds", "5", "--overwrite") == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0000_seed5.png"]
    assert not (out / "maps.safetensors").exists() and not (out / "overlays").exists()  # the old run's maps are gone
    assert (out / "notes.txt").read_text() == "mine"  # nothing but fastfair's outputs is removed
    meta = json.loads((out / "generation.json").read_text())
    assert meta["seeds"] == [5] and meta["model"] == "tiny-sd" and meta["edit"] is None


def test_out_that_is_a_file_fails_up_front(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert _gen(f) == 1
    assert "is a file" in capsys.readouterr().err
    assert _gen(f / "sub") == 1
    with pytest.raises(ValueError, match="is a file"):
        check_out_dir(f / "sub")
    # an OSError anywhere in a command is one clear line, not a traceback
    assert main(["report", str(tmp_path / "missing-run"), "--out", str(f / "r.html")]) == 1


def test_overlay_names_are_unique_per_word(tiny_sd, tmp_path):
    prompt = "a photo of a doctor \U0001F469\u200d\u2695\ufe0f and \U0001F468\u200d\u2695\ufe0f"
    words = ["\U0001F469\u200d\u2695\ufe0f", "\U0001F468\u200d\u2695\ufe0f"]  # both sanitise to "____"
    gen = fastfair.generate(tiny_sd, prompt, seeds=[0], steps=1, maps=words, progress=False)
    out = gen.save(tmp_path / "e")
    assert len(list((out / "overlays").glob("*.png"))) == 2


@pytest.mark.parametrize("bad,msg", [("abc", "not a seed or a range"), ("-1", "not a seed or a range"),
                                     ("0,0", "given twice"), ("3-1", "empty"), ("", "no seeds")])
def test_seed_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        parse_seeds(bad)
    with pytest.raises(ValueError, match="must be >= 0"):
        parse_seeds([2, -3])


def test_seed_forms():
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("0,2,5-7") == [0, 2, 5, 6, 7]
    assert parse_seeds(3) == [3] and parse_seeds([4, 1]) == [4, 1] and parse_seeds(" 4 - 5 ") == [4, 5]


@pytest.mark.parametrize("flag,value,msg", [("--n-boot", "-1", "n_boot"), ("--percentile", "100", "percentile"),
                                            ("--steps", "0", "steps")])
def test_audit_settings_refused_before_any_work(tmp_path, capsys, flag, value, msg):
    out = tmp_path / "a"
    args = ["audit", "--model", "tiny-sd", "--prompts", "list:doctor", "--seeds", "1", "--steps", "2",
            "--classifier", "none", "--no-progress", "--out", str(out), flag, value]
    assert main(args) == 1
    assert msg in capsys.readouterr().err
    assert not (out / "audit.json").exists()  # nothing written: the corrected run is not locked out


def test_audit_without_bootstrap_prints_na(tmp_path, capsys):
    rc = main(["audit", "--model", "tiny-sd", "--prompts", "list:doctor", "--seeds", "1", "--steps", "2",
               "--classifier", "none", "--no-progress", "--n-boot", "0", "--no-report", "--out", str(tmp_path / "a")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mIoU(profession, gender) = " in out and "[" not in out.split("mIoU(profession, gender) = ")[1].split("\n")[0]


def test_dft_refuses_an_out_with_a_run_unless_resume_or_overwrite(tmp_path):
    from fastfair.dft import DFTError, _check_run_dir

    out = tmp_path / "run"
    (out / "lora").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-000004").mkdir(parents=True)
    (out / "mine.txt").write_text("x")
    with pytest.raises(DFTError, match="holds a DFT run"):
        _check_run_dir(out, resuming=False, overwrite=False)
    _check_run_dir(out, resuming=True, overwrite=False)  # resuming: fine, nothing removed
    assert (out / "lora").exists()
    _check_run_dir(out, resuming=False, overwrite=True)
    assert not (out / "lora").exists() and not (out / "checkpoints").exists() and (out / "mine.txt").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(DFTError, match="is a file"):
        _check_run_dir(tmp_path / "f", resuming=False, overwrite=False)
    # the command refuses before loading the model
    rc = main(["finetune", "dft", "--model", "tiny-sd", "--prompt", PROMPT, "--attributes", "gender",
               "--classifier", "python:nope.py:make", "--out", str(tmp_path / "f")])
    assert rc == 1


def test_metrics_iou_percentile_range():
    a = torch.rand(2, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        fastfair.metrics.iou(a, a, 100)


def test_generate_to_dir_resumes_an_interrupted_run(tiny_sd, tmp_path, monkeypatch):
    """Batches land on disk as they finish; a killed run resumes with only the missing batches and ends equal
    to one generate call; other settings are refused."""
    import numpy as np

    from fastfair import generation

    prompts = [PROMPT, "a photo of the face of a nurse"]
    kw = dict(maps=["face"], steps=2, progress=False)
    whole = fastfair.generate(tiny_sd, prompts, seeds=[0, 1, 2], **kw)
    settings = {"model": "tiny-sd", "prompts": prompts, "seeds": [0, 1, 2], **kw}
    real, calls = generation.generate, []

    def dying(*a, **k):
        calls.append(k["seeds"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(generation, "generate", dying)
    out = tmp_path / "g"
    with pytest.raises(KeyboardInterrupt):
        generation.generate_to_dir(tiny_sd, prompts, out, seeds=[0, 1, 2], settings=settings, batch_size=2, **kw)
    assert calls == [[0, 1], [2], [0, 1]]  # batches never span two prompts
    assert len(list((out / "images").iterdir())) == 3 and (out / ".parts").is_dir()
    with pytest.raises(ValueError, match="--resume"):
        check_out_dir(out)
    with pytest.raises(ValueError, match="other settings"):
        generation.generate_to_dir(tiny_sd, prompts, out, seeds=[0, 1, 2], settings={**settings, "steps": 3},
                                   resume=True, batch_size=2, **kw)
    calls.clear()
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(k["seeds"]) or real(*a, **k))
    gen = generation.generate_to_dir(tiny_sd, prompts, out, seeds=[0, 1, 2], settings=settings, resume=True,
                                     batch_size=2, **kw)
    assert calls == [[0, 1], [2]]  # only the second prompt's batches
    assert gen.config["resumed_batches"] == 2 and not (out / ".parts").exists()
    # an uninterrupted run with the same batches: identical
    monkeypatch.setattr(generation, "generate", real)
    ref = generation.generate_to_dir(tiny_sd, prompts, tmp_path / "ref", seeds=[0, 1, 2], settings=settings,
                                     batch_size=2, **kw)
    torch.testing.assert_close(gen.maps["face"], ref.maps["face"], rtol=0, atol=0)
    torch.testing.assert_close(gen.latents, ref.latents, rtol=0, atol=0)
    for a, b in zip(gen.images, ref.images):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # one generate call (one batch of 6): the same seeds, BLAS rounding apart (maps 1 ulp, latents 2e-5 via CFG)
    torch.testing.assert_close(gen.maps["face"], whole.maps["face"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gen.latents, whole.latents, rtol=0, atol=1e-4)
    assert gen.prompts == whole.prompts and gen.seeds == whole.seeds
    for a, b in zip(gen.images, whole.images):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(out / "maps.safetensors")["face"], gen.maps["face"], rtol=0, atol=0)
    meta = json.loads((out / "generation.json").read_text())
    assert meta["seeds"] == [0, 1, 2, 0, 1, 2] and meta["model"] == "tiny-sd" and meta["height"] is not None
    assert meta["environment"]["torch"] == torch.__version__ and "environments" not in meta  # one environment
    with pytest.raises(ValueError, match="finished generation"):
        generation.generate_to_dir(tiny_sd, prompts, out, seeds=[0, 1, 2], settings=settings, resume=True, **kw)


def test_generate_cli_checks_every_prompt_before_the_first_image(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["generate", "--model", "tiny-sd", "--prompt", PROMPT, "--prompt", "a photo of a nurse", "--maps",
                 "face", "--steps", "2", "--out", str(out), "--no-progress"]) == 1
    assert "not in the prompt 'a photo of a nurse'" in capsys.readouterr().err
    assert not out.exists()


def test_generate_to_dir_lists_every_environment(tiny_sd, tmp_path, monkeypatch):
    """A run resumed under another environment (library versions, device, git revision) says so in
    generation.json: every distinct environment its batches were made under."""
    from tiny_models import interrupt_generate

    from fastfair import generation

    kw = dict(steps=1, progress=False)
    settings = {"model": "tiny-sd", "seeds": [0, 1]}
    restore = interrupt_generate(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        generation.generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", seeds=[0, 1], settings=settings, batch_size=1, **kw)
    restore()
    here = generation.provenance("cpu")
    monkeypatch.setattr(generation, "provenance", lambda dev: dict(here, diffusers="0.0.1"))
    gen = generation.generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", seeds=[0, 1], settings=settings, resume=True,
                                     batch_size=1, **kw)
    meta = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert [e["diffusers"] for e in meta["environments"]] == [here["diffusers"], "0.0.1"]
    assert gen.environment["diffusers"] == "0.0.1"


def test_generate_to_dir_streams_images_and_overlays(tiny_sd, tmp_path, monkeypatch):
    """A long run kept every image in memory and, once the GPU was done, encoded every image a second time and every
    overlay (~0.2 s per 512 px image: an hour for 10,000); now each image and overlay is encoded once, per batch, and
    the returned images are read from their files."""
    import numpy as np

    from fastfair.generation import ImagesOnDisk, generate_to_dir

    from fastfair import _io

    encoded = []
    real = _io.png_bytes
    monkeypatch.setattr(_io, "png_bytes", lambda img: encoded.append(1) or real(img))
    prompts = ["a photo of the face of a doctor", "a photo of the face of a nurse"]
    gen = generate_to_dir(tiny_sd, prompts, tmp_path / "g", seeds=[0, 1, 2], settings={"t": 1}, batch_size=2,
                          maps=["face", "photo"], steps=2, progress=False)
    assert len(encoded) == 6 * (1 + 2)  # each image once, each (image, word) overlay once
    assert isinstance(gen.images, ImagesOnDisk) and len(gen.images) == 6
    assert len(list((tmp_path / "g" / "overlays").glob("*.png"))) == 12
    ref = fastfair.generate(tiny_sd, prompts, seeds=[0, 1, 2], maps=["face", "photo"], steps=2, progress=False)
    for a, b in zip(gen.images, ref.images):  # the same pictures (PNG is lossless; batches differ: float rounding)
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1
    torch.testing.assert_close(gen.maps["face"], ref.maps["face"], rtol=1e-5, atol=1e-7)
    # saving over its own folder reads the images before clearing it (they were deleted, then not found)
    gen.save(tmp_path / "g", overwrite=True)
    assert len(list((tmp_path / "g" / "images").glob("*.png"))) == 6
    assert len(gen.images + []) == 6


def test_image_names_sort_past_9999():
    from fastfair.generation import image_names

    assert image_names([7, 8]) == ["0000_seed7", "0001_seed8"]
    names = image_names(list(range(10001)))
    assert names[9999] == "09999_seed9999" and names[10000] == "10000_seed10000" and names == sorted(names)


def test_generate_prompt_file_and_an_interrupted_cleanup(tmp_path, capsys):
    """Thousands of prompts needed thousands of --prompt arguments: --prompt-file reads them ('#' comments, blank
    lines); a finished run's .parts is renamed before it is deleted, and a leftover of that rename is a finished
    folder (a kill while deleting .parts left one that every command refused)."""
    f = tmp_path / "prompts.txt"
    f.write_text("# professions\na photo of a doctor\n\n  # indented comment\na photo of a nurse, #portrait\n")
    out = tmp_path / "g"
    assert main(["generate", "--model", "tiny-sd", "--prompt-file", str(f), "--seeds", "0", "--steps", "1",
                 "--out", str(out), "--no-progress"]) == 0
    meta = json.loads((out / "generation.json").read_text())
    assert meta["prompts"] == ["a photo of a doctor", "a photo of a nurse, #portrait"]  # '#' in a prompt is kept
    assert not (out / ".parts").exists() and not (out / ".parts.done").exists()
    (out / ".parts.done").mkdir()  # a kill while deleting the renamed parts
    assert main(["generate", "--model", "tiny-sd", "--prompt-file", str(f), "--seeds", "0", "--steps", "1",
                 "--out", str(out), "--resume", "--no-progress"]) == 1
    assert "finished generation" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-sd", "--prompt-file", str(f), "--seeds", "0", "--steps", "1",
                 "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert not (out / ".parts.done").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main(["generate", "--model", "tiny-sd", "--prompt-file", str(empty), "--out", str(tmp_path / "e")]) == 1
    assert "has no prompts" in capsys.readouterr().err


def test_generate_to_dir_packs_prompts_with_few_seeds(tiny_sd, tmp_path, monkeypatch):
    """Many prompts with fewer seeds than --batch-size ran one prompt per batch (a batch of 1 for one seed: the GPU
    mostly idle, a review); whole prompts now share a batch. Images and maps equal one generate() call's; a run
    started with the older layout (run.json without batch_layout) resumes with its own batches."""
    from fastfair import generation
    from fastfair.generation import generate_to_dir

    calls = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda pipe, p, **k: calls.append(p) or real(pipe, p, **k))
    prompts = [f"a photo of the face of a {w}" for w in ("doctor", "nurse", "pilot", "chef", "judge")]
    kw = dict(seeds=[3], settings={"t": 1}, batch_size=4, maps=["face"], steps=2, progress=False)
    gen = generate_to_dir(tiny_sd, prompts, tmp_path / "g", negative_prompt=[f"blurry {i}" for i in range(5)], **kw)
    assert [len(p) for p in calls] == [4, 1]  # two batches, not five
    ref = real(tiny_sd, prompts, seeds=[3], maps=["face"], steps=2, progress=False,
               negative_prompt=[f"blurry {i}" for i in range(5)])
    torch.testing.assert_close(gen.maps["face"], ref.maps["face"], rtol=1e-4, atol=1e-6)  # batches differ: rounding
    torch.testing.assert_close(gen.latents, ref.latents, rtol=0, atol=1e-4)
    assert gen.prompts == prompts and gen.config["negative_prompt"] == [f"blurry {i}" for i in range(5)]
    # an unfinished run of the older layout: its run.json has no batch_layout, its batches one prompt each, its
    # finished batch files "batch-NNNNN" without the images they hold
    run = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert "batch_layout" in run
    import shutil

    from fastfair.pipelines import pipeline_fingerprint

    one = tmp_path / "one"  # batch 0 of the older layout: the first prompt alone
    generate_to_dir(tiny_sd, prompts[:1], one, **dict(kw, seeds=[3]))
    old = tmp_path / "old"
    (old / ".parts").mkdir(parents=True)
    shutil.copytree(one / "images", old / "images")
    calls.clear()
    real_write = generation._write_part

    def keep_part(out, stem, *a):  # the first prompt's finished batch, kept as an older run would have it
        real_write(out, stem, *a)
        info = json.loads((out / ".parts" / f"{stem}.json").read_text())
        del info["items"], info["batch_size"]
        (old / ".parts" / "batch-00000.json").write_text(json.dumps(info))
        shutil.copy(out / ".parts" / f"{stem}.safetensors", old / ".parts" / "batch-00000.safetensors")

    monkeypatch.setattr(generation, "_write_part", keep_part)
    shutil.rmtree(one)
    generate_to_dir(tiny_sd, prompts[:1], one, **dict(kw, seeds=[3]))
    monkeypatch.setattr(generation, "_write_part", real_write)
    (old / ".parts" / "run.json").write_text(json.dumps({"t": 1, "batch_size": 4,
                                                         "model_state": pipeline_fingerprint(tiny_sd)}, default=str))
    calls.clear()
    done = generate_to_dir(tiny_sd, prompts[:2], old, resume=True, **kw)
    assert [len(p) for p in calls] == [1] and done.config["resumed_batches"] == 1  # the second prompt alone
