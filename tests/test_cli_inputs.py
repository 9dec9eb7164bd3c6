"""Bad input and damaged files on the command line and its APIs (a helper's hostile-user review, 2026-11-27): each case
fails with one line naming the problem and the way out, or is handled, and never deletes another run's files."""
import json
import shutil

import pytest
import torch

import fastfair
from fastfair.cli import main
from test_run_safety import finished_audit  # noqa: F401,F811  (a finished tiny audit, module-scoped)

PROMPT = "a photo of the face of a doctor"
GEN = ["generate", "--model", "tiny-sd", "--prompt", PROMPT, "--steps", "1", "--seeds", "0-1", "--no-progress"]


def test_audit_resume_with_overwrite_is_refused(tiny_sd, tmp_path):
    """--overwrite won silently and deleted the run the user asked to continue."""
    with pytest.raises(fastfair.audit.AuditInputError, match="give one"):
        fastfair.audit("tiny-sd", "list:doctor", pipeline=tiny_sd, attributes="gender", classifier="none",
                       seeds=1, steps=1, out=tmp_path / "a", resume=True, overwrite=True, progress=False)
    assert not (tmp_path / "a").exists()


def test_no_command_writes_into_another_commands_run(tiny_sd, tmp_path, capsys):
    """generate --overwrite into an audit folder deleted the audit's images, and the audit then looked intact."""
    run = tmp_path / "aud"
    (run / "images").mkdir(parents=True)
    (run / "images" / "x.png").write_bytes(b"keep")
    (run / "audit.json").write_text("{}")
    assert main(GEN + ["--out", str(run), "--overwrite"]) == 1
    assert "is an audit run (audit.json); choose another folder" in capsys.readouterr().err
    assert (run / "images" / "x.png").read_bytes() == b"keep"
    from fastfair.dft import DFTError, _check_run_dir

    with pytest.raises(DFTError, match="an audit run"):
        _check_run_dir(run, resuming=False, overwrite=True)
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "generation.json").write_text("{}")
    with pytest.raises(fastfair.audit.RunDirError, match="is a generation"):
        fastfair.audit("tiny-sd", "list:doctor", pipeline=tiny_sd, attributes="gender", classifier="none",
                       seeds=1, steps=1, out=tmp_path / "gen", progress=False)


def test_a_generation_that_failed_before_its_first_batch_leaves_nothing_to_resume(tmp_path, capsys):
    """A bad size failed in the first batch after run.json was written; the corrected command was then told to
    continue the failed settings with --resume, which could not work."""
    out = tmp_path / "g"
    assert main(GEN + ["--out", str(out), "--height", "33"]) == 1
    assert "multiples of 8" in capsys.readouterr().err
    assert main(GEN + ["--out", str(out), "--height", "64", "--width", "64"]) == 0
    assert len(list((out / "images").glob("*.png"))) == 2
    out2 = tmp_path / "g2"
    assert main(GEN + ["--out", str(out2), "--height", "0"]) == 1  # 0 gave the default size silently
    assert "positive number of pixels" in capsys.readouterr().err
    assert main(GEN + ["--out", str(out2), "--height", "64", "--width", "64", "--resume"]) == 0


def test_percentile_is_checked_before_the_run(tmp_path, capsys):
    assert main(GEN + ["--maps", "doctor,face", "--percentile", "200", "--out", str(tmp_path / "p")]) == 1
    assert "--percentile must be in [0, 100)" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_backend_environment_variable(tiny_sd, tmp_path, monkeypatch, capsys):
    """FASTFAIR_BACKEND was not in a run's settings (a resume under another value mixed backends, while --backend
    is compared), and a bad value was reported as if the user had passed it."""
    from test_run_safety import GEN as G, _interrupted
    from fastfair.generation import generate_to_dir

    monkeypatch.setenv("FASTFAIR_BACKEND", "reference")
    _interrupted(tiny_sd, tmp_path / "g", batch_size=2)
    monkeypatch.delenv("FASTFAIR_BACKEND")
    with pytest.raises(ValueError, match=r"other settings \(call\)"):
        generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=2, resume=True, **G)
    monkeypatch.setenv("FASTFAIR_BACKEND", "bogus")
    assert main(GEN + ["--maps", "doctor", "--out", str(tmp_path / "b")]) == 1
    assert "environment variable FASTFAIR_BACKEND=bogus" in capsys.readouterr().err


def test_damaged_files_are_named_with_the_way_out(finished_audit, tiny_sd, tmp_path, capsys):
    from test_run_safety import GEN as G, _interrupted
    from fastfair.generation import generate_to_dir

    # a finished batch's file of an interrupted generation (a traceback from safetensors)
    _interrupted(tiny_sd, tmp_path / "g", batch_size=1, after=2)
    part = sorted((tmp_path / "g" / ".parts").glob("part-*.safetensors"))[0]
    part.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match=r"unreadable .*delete .* and rerun with --resume"):
        generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=1, resume=True, **G)
    # an audit's map shard and image: the report marks the cells instead of failing
    run = tmp_path / "aud"
    shutil.copytree(finished_audit.run_dir, run)
    for shard in (run / "maps").glob("*.safetensors"):
        shard.write_bytes(b"junk")
    img = next((run / "images").rglob("*.png"))
    img.write_bytes(b"junk")
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "map file unreadable" in page and "image unreadable" in page
    # an audit record without its settings: said so, not "error: 'settings'"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "audit.json").write_text("{}")
    assert main(["report", str(bad)]) == 1
    assert "damaged or not an audit record (it has no 'settings' or 'work')" in capsys.readouterr().err


def test_lora_trained_on_another_kind_of_model_is_refused(tmp_path, capsys):
    d = tmp_path / "d"
    (d / "lora").mkdir(parents=True)
    (d / "dft.json").write_text(json.dumps({"model": "tiny-sdxl", "pipeline": "StableDiffusionXLPipeline"}))
    assert main(GEN + ["--lora", str(d / "lora"), "--out", str(tmp_path / "o")]) == 1
    assert "was trained on 'tiny-sdxl' (StableDiffusionXLPipeline" in capsys.readouterr().err


def test_user_classifier_factories_fail_in_one_line(tmp_path):
    from fastfair.classify import ClassifierMismatchError, load_classifier

    (tmp_path / "c.py").write_text("def notclf():\n    return 42\n\ndef broken():\n    raise RuntimeError('my model broke')\n")
    (tmp_path / "s.py").write_text("def f(:\n")
    with pytest.raises(ClassifierMismatchError, match=r"returned int: expected an AttributeClassifier"):
        load_classifier(f"python:{tmp_path / 'c.py'}:notclf")
    with pytest.raises(ValueError, match=r"the factory raised RuntimeError: my model broke \(at c\.py:5\)"):
        load_classifier(f"python:{tmp_path / 'c.py'}:broken")
    with pytest.raises(ValueError, match=r"importing .*s\.py failed: SyntaxError.*\(at s\.py:1\)"):
        load_classifier(f"python:{tmp_path / 's.py'}:f")


def test_non_finite_mist_settings_and_dft_steps_are_refused(tiny_sd):
    from fastfair import mist
    from fastfair.dft import DFTConfig, DFTError

    for kw in (dict(eta_e=float("nan")), dict(lam=float("inf")), dict(eta_p=float("inf"))):
        with pytest.raises(mist.MistError, match="need finite lam"):
            mist.mist(tiny_sd, ["doctor"], "gender", measured={"doctor": [0.5, 0.5]}, **kw)
    edit = mist.MistEdit({"x": torch.tensor([float("nan")])}, {})
    with pytest.raises(mist.MistError, match="not finite"):
        edit.save("unused.safetensors")
    with pytest.raises(DFTError, match="steps .* must be >= 1"):
        DFTConfig(steps=0)


def test_prompt_files_drop_a_byte_order_mark(tmp_path):
    from fastfair._io import read_text_lines

    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa photo of a doctor\r\na photo of a nurse\r\n".encode("utf-8"))
    assert read_text_lines(f, "--prompt-file") == ["a photo of a doctor", "a photo of a nurse"]
    with pytest.raises(ValueError, match="is a folder"):
        read_text_lines(tmp_path, "--prompt-file")


def test_stale_generation_folders(tiny_sd, tmp_path, monkeypatch):
    """A diff review: a resume of a generation that never finished a batch deleted an audit's images written into
    the same folder before saying whose folder it was; a first batch cut off while its images were written blocked
    the same command; an audit accepted a folder holding an unfinished generation."""
    from fastfair.generation import generate_to_dir
    from test_run_safety import GEN as G

    out = tmp_path / "g"
    (out / ".parts").mkdir(parents=True)
    (out / ".parts" / "run.json").write_text("{}")
    (out / "images").mkdir()
    (out / "images" / "keep.png").write_bytes(b"an audit's image")
    (out / "audit.json").write_text("{}")
    with pytest.raises(ValueError, match="is an audit run"):
        generate_to_dir(tiny_sd, PROMPT, out, settings={}, resume=True, batch_size=2, **G)
    assert (out / "images" / "keep.png").read_bytes() == b"an audit's image"
    (out / "audit.json").unlink()
    with pytest.raises(fastfair.audit.RunDirError, match="unfinished generation"):
        fastfair.audit("tiny-sd", "list:doctor", pipeline=tiny_sd, attributes="gender", classifier="none",
                       seeds=1, steps=1, out=out, progress=False)
    with pytest.raises(ValueError, match="holds an unfinished generation"):  # not only this run's files: refused
        generate_to_dir(tiny_sd, PROMPT, out, settings={}, batch_size=2, **G)
    (out / "images" / "keep.png").unlink()
    (out / "images" / "0000_seed0.png").write_bytes(b"cut off")  # this run's own, from a batch that never finished
    done = generate_to_dir(tiny_sd, PROMPT, out, settings={}, batch_size=2, **G)
    assert len(done.seeds) == 3 and (out / "images" / "0000_seed0.png").read_bytes() != b"cut off"


def test_a_write_failure_does_not_hide_the_error_that_stopped_the_run(tiny_sd, tmp_path, monkeypatch, capsys):
    from fastfair import generation
    from test_run_safety import GEN as G

    real, calls = generation.generate, []

    def gen(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    def full_disk(*a):
        raise OSError(28, "No space left on device", "x.png")

    monkeypatch.setattr(generation, "generate", gen)
    monkeypatch.setattr(generation, "_write_part", full_disk)
    with pytest.raises(KeyboardInterrupt):
        generation.generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={}, batch_size=2, **G)
    assert "also, writing the last batch failed" in capsys.readouterr().err


def test_resume_that_makes_nothing_records_the_size_used(tiny_sd, tmp_path, monkeypatch):
    from fastfair import generation
    from test_run_safety import GEN as G

    real = generation.Generation.save

    def stop(self, *a, **k):  # every batch finished, killed before the final save
        raise KeyboardInterrupt

    monkeypatch.setattr(generation.Generation, "save", stop)
    with pytest.raises(KeyboardInterrupt):
        generation.generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={}, batch_size=3, **G)
    monkeypatch.setattr(generation.Generation, "save", real)
    done = generation.generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={}, batch_size=1, resume=True, **G)
    assert done.config["batch_size"] == 3 and "batch_sizes" not in done.config


def test_relax_factors_above_one_are_kept():
    from fastfair import dft

    got = dft.relax_factors({"a": torch.tensor([True, False])}, 1.5)
    assert got.tolist() == [1.5, 1.0]


def test_mist_edit_paths_as_the_command_wrote_them(tmp_path):
    """`edit mist --out o/e9` writes o/e9.safetensors; `--edit o/e9` was refused ("no MIST edit"), a folder or the
    .json sidecar gave the reader's errno text."""
    from fastfair import mist

    mist.MistEdit({"x": torch.ones(2)}, {"concepts": ["doctor"]}).save(tmp_path / "e9")
    assert mist.load(tmp_path / "e9").meta == {"concepts": ["doctor"]}
    for bad in (tmp_path, tmp_path / "e9.json"):
        with pytest.raises(mist.MistError, match="not an edit file: give the .safetensors file"):
            mist.load(bad)


def test_a_busy_folder_is_said_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A second process on a folder was refused only after loading its model (15-25 s here, minutes for SDXL)."""
    from fastfair import pipelines
    from fastfair._io import release_flock, try_flock

    monkeypatch.setattr(pipelines, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    held = try_flock(tmp_path / "g" / ".fastfair.lock")  # as the first process holds it
    try:
        assert main(GEN + ["--out", str(tmp_path / "g"), "--resume"]) == 1
        assert "another fastfair generate process is writing" in capsys.readouterr().err
    finally:
        release_flock(held)
    held = try_flock(tmp_path / "a" / "locks" / "rank0.lock")
    try:
        with pytest.raises(fastfair.audit.RunDirError, match="another fastfair audit process"):
            fastfair.audit("tiny-sd", "list:doctor", attributes="gender", classifier="none", seeds=1, steps=1,
                           out=tmp_path / "a", progress=False)
    finally:
        release_flock(held)
