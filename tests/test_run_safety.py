"""Runs that are interrupted, resumed, or shared: what a helper's review found mixing or failing, each refused or
handled (generate's batch size -- now accepted on resume -- and folder lock, partial audits in reports and
comparisons, audit backends, the MIST command's output checks, NaN inputs, an unfinished DFT folder)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import fastfair
from fastfair._io import FolderLock
from fastfair.audit.summary import summarize
from fastfair.cli import main
from fastfair.generation import generate_to_dir

PROMPT = "a photo of the face of a doctor"
GEN = dict(seeds=[0, 1, 2], steps=2, maps=["doctor"], progress=False)


class _Stop(Exception):
    pass


def _interrupted(pipe, out, batch_size, after=1):
    """generate_to_dir stopped after ``after`` finished batches (as a kill between batches leaves it)."""
    from fastfair import generation

    real, calls = generation.generate, []

    def gen(*a, **k):
        if len(calls) == after:
            raise _Stop
        calls.append(1)
        return real(*a, **k)

    generation.generate = gen
    try:
        with pytest.raises(_Stop):
            generate_to_dir(pipe, PROMPT, out, settings={"model": "tiny-sd"}, batch_size=batch_size, **GEN)
    finally:
        generation.generate = real


@pytest.mark.parametrize("first,then", [(2, 1), (1, 3), (2, 4)])
def test_generate_resumes_with_another_batch_size(tiny_sd, tmp_path, first, then):
    """The CLI's out-of-memory hint says to lower --batch-size and --resume: that resume was refused (finished
    batches were files per batch index; reading them at another size took seed 1's map for seed 2). Each part now
    names its images; a resume at another size makes only the missing ones and the result equals one generate call,
    item by item."""
    _interrupted(tiny_sd, tmp_path / "g", batch_size=first)
    done = generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=then,
                           resume=True, **GEN)
    ref = fastfair.generate(tiny_sd, PROMPT, batch_size=1, **GEN)
    assert done.seeds == ref.seeds == [0, 1, 2]
    np.testing.assert_allclose(done.maps["doctor"].numpy(), ref.maps["doctor"].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(done.latents.numpy(), ref.latents.numpy(), rtol=0, atol=1e-4)
    for a, b in zip(done.images, ref.images):  # image files in item order
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert done.config["resumed_batches"] == 1
    assert done.config["batch_size"] == then and done.config["batch_sizes"] == sorted({first, then})
    saved = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert saved["batch_sizes"] == sorted({first, then}) and saved["batch_size"] == then


def test_generate_to_dir_resume_refuses_other_generate_arguments(tiny_sd, tmp_path):
    """The resume key was only the caller's settings: a Python caller resuming with other steps or guidance scale
    was accepted and generation.json then gave the first session's values for every image (a review: images 151-211
    pixel levels off). generate's own arguments are now part of it."""
    _interrupted(tiny_sd, tmp_path / "g", batch_size=2)
    for other in (dict(steps=3), dict(guidance_scale=1.0), dict(maps=["face"]), dict(negative_prompt="blurry")):
        with pytest.raises(ValueError, match=r"other settings \(call\)"):
            generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=2,
                            resume=True, **dict(GEN, **other))
    # the same call spelled otherwise is the same call: the default guidance scale given explicitly, maps as a string
    done = generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=2, resume=True,
                           **dict(GEN, guidance_scale=7.5, maps="doctor"))
    assert done.config["resumed_batches"] == 1 and done.config["call"]["steps"] == 2


def test_generate_resume_refuses_another_vae(tmp_path):
    """The VAE was not part of model_state: a resume after it changed mixed two decoders' images (a review: 255
    pixel levels). It is digested now; a run recorded before that resumes as it did."""
    pipe = fastfair.load_pipeline("tiny-sd")
    _interrupted(pipe, tmp_path / "g", batch_size=2)
    run = tmp_path / "g" / ".parts" / "run.json"
    key = json.loads(run.read_text())
    assert key["model_state"]["vae_weights"]
    with torch.no_grad():
        next(pipe.vae.decoder.parameters()).mul_(1.5)
    with pytest.raises(ValueError, match="model_state"):
        generate_to_dir(pipe, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=2, resume=True, **GEN)
    del key["model_state"]["vae_weights"]  # as recorded before the VAE was digested
    run.write_text(json.dumps(key, sort_keys=True))
    done = generate_to_dir(pipe, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=2, resume=True,
                           **GEN)
    assert done.config["resumed_batches"] == 1


def test_generate_resume_reads_batches_of_the_older_layout(tiny_sd, tmp_path):
    """Runs started before parts named their images ("batch-NNNNN" files of the first batch size) resume, also at
    another size: their batches are read from the first layout."""
    import os

    _interrupted(tiny_sd, tmp_path / "g", batch_size=2)
    parts = tmp_path / "g" / ".parts"
    (stem,) = [f.name[:-len(".safetensors")] for f in parts.glob("part-*.safetensors")]
    info = json.loads((parts / f"{stem}.json").read_text())
    assert info["items"] == [[0, 0], [0, 1]]
    del info["items"], info["batch_size"]
    (parts / "batch-00000.json").write_text(json.dumps(info))
    os.replace(parts / f"{stem}.safetensors", parts / "batch-00000.safetensors")
    (parts / f"{stem}.json").unlink()
    done = generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=1, resume=True,
                           **GEN)
    ref = fastfair.generate(tiny_sd, PROMPT, batch_size=1, **GEN)
    np.testing.assert_allclose(done.maps["doctor"].numpy(), ref.maps["doctor"].numpy(), rtol=1e-4, atol=1e-6)
    assert done.config["resumed_batches"] == 1 and done.config["batch_sizes"] == [1, 2]


def test_generate_resume_refuses_foreign_or_overlapping_parts(tiny_sd, tmp_path):
    import shutil

    _interrupted(tiny_sd, tmp_path / "g", batch_size=1, after=2)
    parts = tmp_path / "g" / ".parts"
    a, b = sorted(f.name[:-len(".safetensors")] for f in parts.glob("part-*.safetensors"))
    info = json.loads((parts / f"{a}.json").read_text())
    info["items"] = [[0, 1]]  # claims b's image
    (parts / f"{a}.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="overlap"):
        generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=1, resume=True,
                        **GEN)
    shutil.copy(parts / f"{b}.safetensors", parts / "stray.safetensors")
    with pytest.raises(ValueError, match="stray.safetensors.* not a part"):
        generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=1, resume=True,
                        **GEN)


def test_a_second_generate_into_the_same_folder_is_refused(tiny_sd, tmp_path):
    with FolderLock(tmp_path / "g", "generate"):  # as another process holding the folder
        with pytest.raises(RuntimeError, match="another fastfair generate process"):
            generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={}, overwrite=True, **GEN)
    generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={}, **GEN)
    assert not (tmp_path / "g" / ".fastfair.lock").exists()  # released and removed


@pytest.fixture(scope="module")
def finished_audit(tiny_sd, tmp_path_factory):
    from fastfair.audit.attributes import parse_attributes
    from test_audit import tiny_clip_classifier

    out = tmp_path_factory.mktemp("aud") / "run"
    clf = tiny_clip_classifier(parse_attributes("gender")[0])
    res = fastfair.audit("tiny-sd", "list:doctor,nurse", pipeline=tiny_sd, attributes="gender", classifier=clf,
                         entanglement="open,inprompt", seeds=1, steps=2, progress=False, n_boot=20, out=out)
    return res


def test_summary_and_report_of_a_partial_audit(finished_audit, tmp_path):
    """A profession without any image yet (an interrupted audit): summarize failed in numpy's reshape."""
    config = json.loads((finished_audit.run_dir / "audit.json").read_text())
    df = finished_audit.results
    part = df[df["profession"] == "doctor"]
    s = summarize(part, config)
    assert s["n_images"] == len(part) < s["n_planned"] == len(df)
    from fastfair.audit.page import write_report

    page = write_report(finished_audit.run_dir, df=part, config=config, summary=s, out=tmp_path / "r.html")
    assert "Partial run" in page.read_text()


def test_compare_flags_an_unfinished_run(finished_audit, tmp_path):
    """In-prompt rows missing while every neutral pair is there: the comparison said nothing."""
    import shutil

    from fastfair.audit import compare

    part = tmp_path / "part"
    shutil.copytree(finished_audit.run_dir, part)
    df = pd.read_parquet(part / "results.parquet")
    keep = df[(df["kind"] == "neutral") | (df["profession"] == "doctor")]
    for f in (part / "parts").glob("*.parquet"):
        f.unlink()
    keep.to_parquet(part / "parts" / "part-r0-0123456789abcdef0123.parquet")
    (part / "results.parquet").unlink()
    res = compare(finished_audit.run_dir, part, n_boot=20)
    notes = res["comparisons"][0]["notes"]
    assert any("unfinished" in n and f"{len(keep)} of {len(df)}" in n for n in notes), notes


def test_audit_resume_with_another_backend_is_refused(tiny_sd, tmp_path):
    from fastfair.audit import RunDirError

    kw = dict(pipeline=tiny_sd, attributes="gender", classifier="none", entanglement="open", seeds=1, steps=2,
              progress=False, report=False, out=tmp_path / "a")
    fastfair.audit("tiny-sd", "list:doctor", backend="reference", **kw)
    with pytest.raises(RunDirError, match="backend"):
        fastfair.audit("tiny-sd", "list:doctor", backend="native", resume=True, **kw)


def test_nan_guidance_scale_is_refused(tmp_path, capsys):
    rc = main(["generate", "--model", "tiny-sd", "--prompt", PROMPT, "--steps", "1", "--seeds", "0",
               "--guidance-scale", "nan", "--out", str(tmp_path / "g")])
    assert rc == 1 and "finite" in capsys.readouterr().err
    assert not (tmp_path / "g" / "generation.json").exists()


def test_edit_checks_its_output_before_the_rounds(tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    out.write_bytes(b"x")
    rc = main(["edit", "mist", "--model", "tiny-sd", "--concepts", "doctor", "--attributes", "gender", "--rounds", "1",
               "--out", str(out)])
    assert rc == 1 and "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"x"
    blocker = tmp_path / "file"
    blocker.write_text("")
    rc = main(["edit", "mist", "--model", "tiny-sd", "--concepts", "doctor", "--attributes", "gender", "--rounds", "1",
               "--out", str(blocker / "e.safetensors")])
    assert rc == 1


def test_report_of_an_unfinished_dft_run(tmp_path, capsys):
    (tmp_path / "d" / "checkpoints" / "checkpoint-000003").mkdir(parents=True)
    assert main(["report", str(tmp_path / "d")]) == 1
    assert "--resume latest" in capsys.readouterr().err


def test_report_warns_about_abstentions(finished_audit, tmp_path):
    """NaN classifier rows are abstentions (the documented protocol); the report now says how many."""
    from fastfair.audit.page import write_report

    config = json.loads((finished_audit.run_dir / "audit.json").read_text())
    df = finished_audit.results.copy()
    df["pred_gender"] = [None if i % 2 else "male" for i in range(len(df))]
    s = summarize(df, config)
    assert s["distribution"]["gender"]["overall"]["abstained"] > 0
    page = write_report(finished_audit.run_dir, df=df, config=config, summary=s, out=tmp_path / "r.html")
    assert "classifier abstained" in page.read_text()
    # per profession too (n 0 could be "no images yet" or "all abstained")
    import re

    html = page.read_text()
    assert "<th scope=col>abstained</th>" in html
    per = s["distribution"]["gender"]["per_profession"]
    for prof, e in per.items():
        assert re.search(rf"<td>{prof}</td><td>{e['n']}</td><td>{e['abstained']}</td>", html), prof
    assert math.isfinite(s["distribution"]["gender"]["overall"]["n"])


def test_runs_made_before_the_model_state_was_recorded_resume(tiny_sd, tmp_path):
    """Run folders written before model_state / backend / batch_size were recorded still resume (their rows keep
    their work ids), and record the keys from then on."""
    kw = dict(pipeline=tiny_sd, attributes="gender", classifier="none", entanglement="open", seeds=2, steps=2,
              progress=False, report=False, batch_size=1, out=tmp_path / "a")
    fastfair.audit("tiny-sd", "list:doctor", **kw)
    cfg_path = tmp_path / "a" / "audit.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["settings"]["model_state"], cfg["settings"]["generation"]["backend"]
    cfg_path.write_text(json.dumps(cfg))
    parts = sorted((tmp_path / "a" / "parts").glob("part-*.parquet"))
    ids = set(pd.read_parquet(tmp_path / "a" / "results.parquet")["work_id"])
    parts[0].unlink()
    (tmp_path / "a" / "results.parquet").unlink()
    res = fastfair.audit("tiny-sd", "list:doctor", resume=True, **kw)
    assert set(res.results["work_id"]) == ids and len(res.results) == 2
    assert "model_state" in json.loads(cfg_path.read_text())["settings"]

    _interrupted(tiny_sd, tmp_path / "g", batch_size=2)
    run = tmp_path / "g" / ".parts" / "run.json"
    key = json.loads(run.read_text())
    del key["model_state"], key["batch_size"]
    run.write_text(json.dumps(key, sort_keys=True))
    done = generate_to_dir(tiny_sd, PROMPT, tmp_path / "g", settings={"model": "tiny-sd"}, batch_size=2, resume=True,
                           **GEN)
    assert done.config["resumed_batches"] == 1


def test_generate_to_dir_negative_prompt_per_prompt(tiny_sd, tmp_path):
    prompts, negs = [PROMPT, "a photo of a nurse"], ["blurry", "dark"]
    kw = dict(seeds=[0], steps=2, maps=["a"], negative_prompt=negs, progress=False)
    done = generate_to_dir(tiny_sd, prompts, tmp_path / "g", settings={}, **kw)
    ref = fastfair.generate(tiny_sd, prompts, **kw)
    np.testing.assert_allclose(done.latents.numpy(), ref.latents.numpy(), rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "g" / "generation.json").read_text())["negative_prompt"] == negs  # all, not the 1st
    with pytest.raises(ValueError, match="one string per prompt"):
        generate_to_dir(tiny_sd, prompts, tmp_path / "h", settings={}, **dict(kw, negative_prompt=["x"]))
    assert not (tmp_path / "h").exists()


def test_audit_refuses_uncond_guidance_without_cfg_up_front(tiny_sd, tmp_path):
    from fastfair.audit import AuditInputError

    with pytest.raises(AuditInputError, match="branch='uncond'"):
        fastfair.audit("tiny-sd", "list:doctor", pipeline=tiny_sd, attributes="gender", classifier="none", seeds=1,
                       steps=2, guide="gender", guide_options={"branch": "uncond"}, guidance_scale=1.0,
                       entanglement="open", progress=False, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_report_pooled_row_and_intervals_that_exclude_their_estimate(finished_audit, tmp_path):
    """The intersection table's 'all (pooled)' row showed the macro mean's DFT bias beside the pooled frequencies;
    an estimate outside its own percentile interval was printed without a word (a review)."""
    from fastfair.audit.page import _ci_text, write_report
    from fastfair.audit.summary import _ci

    config = json.loads((finished_audit.run_dir / "audit.json").read_text())
    neutral = finished_audit.results[finished_audit.results["kind"] == "neutral"]
    rows = []
    for prof, preds in (("doctor", ["male"] * 4 + ["female"]), ("nurse", ["male"] + ["female"] * 4)):
        base = neutral[neutral["profession"] == prof].iloc[0]
        for i, lab in enumerate(preds):
            r = base.copy()
            r["seed"], r["work_id"], r["pred_gender"] = 100 + i, f"{prof}-{i}", lab
            rows.append(r)
    import pandas as pd

    df = pd.DataFrame(rows)
    s = summarize(df, config)
    ov = s["distribution"]["gender"]["overall"]
    assert ov["freq_pooled"] == [0.5, 0.5]
    assert ov["pooled"]["dft_bias"] == pytest.approx(0.0, abs=1e-12)      # |0.5 - 0.5|
    assert ov["dft_bias"]["mean"] == pytest.approx(0.6, abs=1e-12)        # mean of |0.8 - 0.2| and |0.2 - 0.8|
    assert _ci((0.2, 0.25, 0.4)).get("outside") and not _ci((0.3, 0.25, 0.4)).get("outside")
    assert "†" in _ci_text(_ci((0.2, 0.25, 0.4))) and "†" not in _ci_text(_ci((0.3, 0.25, 0.4)))
    page = write_report(finished_audit.run_dir, df=df, config=config, summary=s, out=tmp_path / "r.html")
    assert "mean over professions" in page.read_text()


def test_report_targets_override_and_out_checks(finished_audit, tmp_path):
    """--target rewrote the run's report.html under other targets, with no word on the page, while summary.json
    kept the run's; --out a directory named a hidden temp file; --out another run's report.html overwrote it."""
    import shutil

    from fastfair.audit.page import write_report
    from fastfair.audit.store import RunDirError

    run = tmp_path / "run"
    shutil.copytree(finished_audit.run_dir, run)
    before = (run / "report.html").read_bytes()
    page = write_report(run, targets="gender=0.9,0.1")
    assert page.name == "report-targets.html" and (run / "report.html").read_bytes() == before
    assert "Targets overridden for this page: gender = 90% / 10%" in page.read_text()
    with pytest.raises(RunDirError, match="is a directory"):
        write_report(run, out=tmp_path)
    other = tmp_path / "other"
    shutil.copytree(finished_audit.run_dir, other)
    with pytest.raises(RunDirError, match="another audit run's report"):
        write_report(run, out=other / "report.html")
    before = (run / "audit.json").read_bytes()
    with pytest.raises(RunDirError, match="not an .html file"):  # it overwrote the run's audit.json
        write_report(run, out=run / "audit.json")
    assert (run / "audit.json").read_bytes() == before


def test_resumed_audit_report_keeps_the_first_start_and_every_environment(finished_audit, tiny_sd, tmp_path):
    """The report written at the end of a resumed run showed the resume time as 'created' and only this session's
    environment (audit.json had both)."""
    import shutil

    from fastfair.audit.attributes import parse_attributes
    from test_audit import tiny_clip_classifier

    run = tmp_path / "run"
    shutil.copytree(finished_audit.run_dir, run)
    cfg = json.loads((run / "audit.json").read_text())
    cfg["created"] = "2020-01-01T00:00:00"
    cfg["environments"] = [dict(cfg["environments"][0], torch="2.99.0-earlier")] + cfg["environments"]
    (run / "audit.json").write_text(json.dumps(cfg))
    clf = tiny_clip_classifier(parse_attributes("gender")[0])
    fastfair.audit("tiny-sd", "list:doctor,nurse", pipeline=tiny_sd, attributes="gender", classifier=clf,
                   entanglement="open,inprompt", seeds=1, steps=2, progress=False, n_boot=20, out=run, resume=True)
    html = (run / "report.html").read_text()
    assert "2020-01-01T00:00:00" in html and "2.99.0-earlier" in html
    assert "made in 2 different environments" in html


def test_results_parquet_says_which_run_it_is(finished_audit):
    """Rows of concatenated runs could not be told apart (no run column, no settings in the file) (a review)."""
    import pyarrow.parquet as pq

    cfg = json.loads((finished_audit.run_dir / "audit.json").read_text())
    t = pq.read_table(finished_audit.run_dir / "results.parquet")
    assert set(t.column("run_id").to_pylist()) == {cfg["settings_hash"]}
    assert json.loads(t.schema.metadata[b"fastfair"])["settings_hash"] == cfg["settings_hash"]


def test_sigterm_stops_like_ctrl_c(monkeypatch, capsys):
    """SIGTERM (a scheduler's stop) ended a run with rc 143 and no word; now as Ctrl-C: the resume hint."""
    import os
    import signal
    import time

    from fastfair import cli

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("this test process handles SIGTERM itself")

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(cli, "_generate", killed)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr("sys.argv", ["fastfair", "generate", "--model", "tiny-sd", "--prompt", "a doctor", "--out", "x"])
    assert cli.main() == 143  # the console script's call (no argv)
    assert "terminated (SIGTERM); finished batches are kept: rerun with --resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    # a program calling main([...]) in-process keeps its own SIGTERM handling: no handler is installed
    seen = []
    monkeypatch.setattr(cli, "_generate", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    assert cli.main(["generate", "--model", "tiny-sd", "--prompt", "a doctor", "--out", "x"]) == 0
    assert seen == [signal.SIG_DFL]


def test_full_disk_names_the_file(tmp_path, monkeypatch):
    """ENOSPC names no file; atomic_write says which one it was writing."""
    import errno
    import os

    from fastfair._io import atomic_write

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left") as e:
        atomic_write(tmp_path / "a.bin", b"x")
    assert e.value.filename == str(tmp_path / "a.bin") and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_report_names_metrics_and_counts_in_prompt_images(finished_audit):
    """Column headers were code names (dft_bias, risk_difference) with RD's direction unsaid, and in-prompt
    entanglement had no per-profession table (counts only in chart hover text) (a review)."""
    import re

    html = (finished_audit.run_dir / "report.html").read_text()
    labels = json.loads((finished_audit.run_dir / "audit.json").read_text())["settings"]["attributes"]["gender"]["labels"]
    assert f"RD ({labels[0]} − {labels[1]})" in html and "<th scope=col>DFT bias</th>" in html
    assert ">dft_bias<" not in html
    assert len(re.findall(r"<th scope=col>mSoftIoU</th>", html)) == 2  # open-vocabulary and in-prompt tables


@pytest.mark.parametrize("command,err,want", [
    ("generate", RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                              "asynchronously reported\nCompile with `TORCH_USE_CUDA_DSA`"),
     ["CUDA error: an illegal memory access was encountered -- a GPU fault (finished batches are kept: rerun with "
      "--resume)", "FASTFAIR_BACKEND=reference", "CUDA_LAUNCH_BLOCKING=1"]),
    ("finetune", RuntimeError("CUDA error: misaligned address\nCompile with `TORCH_USE_CUDA_DSA`"),
     ["--attention diffusers", "rerun with --resume latest"]),
    ("audit", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..."),
     ["out of GPU memory: lower --batch-size (finished batches are kept: rerun with --resume)"]),
    ("generate", RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
     ["Triton Error [CUDA]: an illegal memory access was encountered -- a GPU fault", "FASTFAIR_BACKEND=reference"]),
    # not a GPU failure: the plain message
    ("generate", RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory: "
                              "you tried to allocate 123 bytes. Error code 12 (Cannot allocate memory)"),
     ["DefaultCPUAllocator: can't allocate memory"]),
])
def test_gpu_failures_name_the_way_out(monkeypatch, capsys, command, err, want):
    """A CUDA fault or running out of GPU memory prints the error's first line and what to do (not torch's
    multi-line text ending in the TORCH_USE_CUDA_DSA hint)."""
    from fastfair import cli

    def boom(args):
        raise err
    monkeypatch.setattr(cli, f"_{command}", boom)
    argv = {"generate": ["generate", "--model", "tiny-sd", "--prompt", "a doctor", "--out", "x"],
            "finetune": ["finetune", "dft", "--model", "tiny-sd", "--out", "x"],
            "audit": ["audit", "--model", "tiny-sd", "--out", "x"]}[command]
    assert main(argv) == 1
    msg = capsys.readouterr().err
    assert msg.count("\n") == 1 and "TORCH_USE_CUDA_DSA" not in msg, msg
    assert ("GPU" in msg) == ("DefaultCPUAllocator" not in msg), msg
    for w in want:
        assert w in msg, (w, msg)


def test_report_says_whether_a_map_was_never_saved_or_is_missing(finished_audit, tmp_path):
    """An overlay without a map says why: the run saved none ("no map saved") or the row names a shard that is not
    there ("map file missing": a moved or deleted file) -- both used to read "no map saved"."""
    import shutil

    from fastfair.audit.page import write_report

    run = tmp_path / "run"
    shutil.copytree(finished_audit.run_dir, run)
    for f in (run / "maps").glob("*.safetensors"):
        f.unlink()
    df = pd.read_parquet(run / "results.parquet")
    config = json.loads((run / "audit.json").read_text())
    page = write_report(run, df=df, config=config, summary=summarize(df, config), out=tmp_path / "r.html").read_text()
    assert "map file missing" in page and "no map saved" not in page
    page = write_report(run, df=df.assign(maps=None), config=config, summary=summarize(df, config),
                        out=tmp_path / "r2.html").read_text()
    assert "no map saved" in page and "map file missing" not in page


def test_generation_records_scheduler_dtype_batch_and_attention(tiny_sd, tmp_path):
    """generation.json of the Python API recorded none of them (a review: a DDIM and an Euler-ancestral run wrote
    identical records, and a reference-backend run's environment named 'auto_backend: native', which had not run)."""
    g = fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=1, maps=["doctor"], backend="reference", batch_size=3,
                          progress=False)
    c = g.config
    assert (c["scheduler"], c["dtype"], c["batch_size"], c["backend"], c["attention"]) == (
        type(tiny_sd.scheduler).__name__, "float32", 3, "reference", "fastfair (reference)")
    plain = fastfair.generate(tiny_sd, PROMPT, seeds=[0], steps=1, progress=False)
    assert plain.config["attention"] == "diffusers (no maps, no guidance)"
    g.save(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "generation.json").read_text())["attention"] == "fastfair (reference)"


def test_dpm_sde_scheduler_noise_follows_the_seeds(tiny_sd):
    """DPMSolverSDEScheduler draws its step noise from a Brownian tree the per-image generators never reach: its seed
    came from the global RNG and one tree served the whole batch (a review: images depended on the batch and on
    torch's global state). generate now gives each image its own tree, seeded by its seed."""
    pytest.importorskip("torchsde")
    import copy

    import diffusers

    pipe = copy.copy(tiny_sd)
    pipe.scheduler = diffusers.DPMSolverSDEScheduler.from_config(tiny_sd.scheduler.config)
    pipe.unet, pipe.text_encoder, pipe.vae = tiny_sd.unet, tiny_sd.text_encoder, tiny_sd.vae
    kw = dict(seeds=[0, 1, 2], steps=3, progress=False)
    torch.manual_seed(1)
    a = fastfair.generate(pipe, PROMPT, batch_size=3, **kw).latents
    torch.manual_seed(2)
    b = fastfair.generate(pipe, PROMPT, batch_size=1, **kw).latents
    alone = fastfair.generate(pipe, PROMPT, seeds=[2], steps=3, progress=False).latents
    assert (a - b).abs().max() < 1e-4 and (a[2:] - alone).abs().max() < 1e-4
    other = fastfair.generate(pipe, PROMPT, seeds=[3], steps=3, progress=False).latents
    assert (other - alone).abs().max() > 1e-2
    assert pipe.scheduler.noise_sampler_seed is None  # the user's setting is restored
