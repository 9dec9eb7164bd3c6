"""fastfair bench --quick on CPU: one run, then the structure of its three outputs."""
from __future__ import annotations

import json

import pytest

from fastfair import bench


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = bench.run(suite="all", device="cpu", quick=True, out=out, log=lambda s: None)
    return out, res


def test_outputs_written(quick):
    out, res = quick
    for name in ("bench.json", "bench.md", "bench.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["wall_s"] < 120
    assert not (out / "bench.partial.json").exists()  # removed once the full results are written


def test_partial_results_survive_a_crash(tmp_path, monkeypatch):
    """A run that dies in the e2e suite leaves the finished kernel cases in bench.partial.json."""
    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(bench, "QUICK_SHAPES", bench.QUICK_SHAPES[:1])
    monkeypatch.setattr(bench, "_soft_iou_rows", lambda *a, **k: [])
    monkeypatch.setattr(bench, "e2e_suite", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        bench.run(suite="all", device="cpu", quick=True, out=tmp_path, log=lambda s: None)
    d = json.loads((tmp_path / "bench.partial.json").read_text())
    assert d["partial"] is True and not (tmp_path / "bench.json").exists()
    assert {r["method"] for r in d["kernels"] if "median_ms" in r} >= {"explicit", "sdpa"}


def test_json_structure(quick):
    out, _ = quick
    d = json.loads((out / "bench.json").read_text())
    env = d["environment"]
    for key in ("device_name", "torch", "triton", "diffusers", "git_revision"):
        assert key in env
    assert env["auto_backend"] == ("native" if d["backends"]["fastfair-native"]["available"] else "reference")
    assert d["ceilings"]["copy_bw_gbs"] > 0 and d["ceilings"]["matmul_tflops"] > 0
    assert set(d["backends"]) == set(bench.METHOD_ORDER)
    ran = {r["method"] for r in d["kernels"] if "median_ms" in r}
    for name, st in d["backends"].items():  # every backend ran, or says why not
        if st["available"]:
            assert name in ran, name
        else:
            assert isinstance(st["reason"], str) and st["reason"]
            assert name not in ran
    assert not d["backends"]["fastfair-triton"]["available"]  # CPU: no CUDA device
    assert {"fastfair-reference", "sdpa", "explicit"} <= ran
    passes = {r["pass_"] for r in d["kernels"] if "median_ms" in r}
    assert passes == set(bench.PASSES)
    for r in d["kernels"]:
        assert "error" not in r, r
        assert r["times_ms"] and r["median_ms"] > 0 and r["bytes"] > 0 and r["flops"] > 0
        for k in ("gbs", "pct_bw", "tflops", "pct_roofline", "shape", "B", "method"):
            assert k in r
    e2e = {r["mode"]: r for r in d["e2e"]}
    assert {"gen-maps", "gen-plain"} <= set(e2e)
    for r in e2e.values():
        assert r["images_per_s"] > 0 and "peak_mb" in r
    native = d["backends"]["fastfair-native"]["available"]
    assert e2e["gen-maps"]["backend"] == ("native" if native else "reference")  # what auto ran on CPU
    assert "backend" not in e2e["gen-plain"]
    assert d["e2e_ratios"] and d["e2e_ratios"][0]["throughput_ratio"] > 0


def test_markdown_structure(quick):
    out, res = quick
    md = (out / "bench.md").read_text()
    assert "| shape | B | pass | backend | ms |" in md
    assert "## End to end" in md and "gen-maps / gen-plain" in md
    for name, st in res["backends"].items():
        assert f"| {name} | {'ran' if st['available'] else 'unavailable: '}" in md


def test_pass_cost():
    b, f = bench.pass_cost("fwd", 2, 8, 4096, 40, 2, True)
    assert f == 4 * 2 * 8 * 4096 * 77 * 40
    assert b == (2 * 2 * 8 * 4096 * 40 + 2 * 2 * 8 * 77 * 40) * 2 + 2 * 8 * 4096 * 4
    assert bench.pass_cost("bwd_full", 2, 8, 4096, 40, 2, False)[1] == 3 * f


def test_png_without_matplotlib(quick, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    _, res = quick
    assert bench.write_png(res, tmp_path / "p.png") == "PIL"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind,unet_params,cross_dim", [("random-sd15", 859_520_964, 768),
                                                         ("random-sdxl", 2_567_463_684, 2048)])
def test_random_pipelines_have_the_published_sizes(kind, unet_params, cross_dim):
    """The GPU e2e suite's random-weight SD1.5 / SDXL (built on the meta device here: no memory, ~1 s): the
    UNets have the published parameter counts of SD1.5's and SDXL's UNets."""
    import torch

    pipe = bench.random_pipeline(kind, "meta", torch.float16)
    assert sum(p.numel() for p in pipe.unet.parameters()) == unet_params
    assert pipe.unet.config.cross_attention_dim == cross_dim
    assert pipe.unet.device.type == "meta" and pipe.unet.dtype == torch.float16
    assert pipe.scheduler.alphas_cumprod.device.type == "cpu"  # schedulers keep host tensors


def test_markdown_graph_columns(quick):
    """CUDA rows carry kernel-only times from a CUDA graph (or why capture failed); CPU rows leave them blank."""
    _, res = quick
    rows = [dict(r) for r in res["kernels"] if r["pass_"] == "fwd" and r["method"] in ("sdpa", "explicit")][:2]
    assert {r["method"] for r in rows} == {"sdpa", "explicit"} and rows[0]["shape"] == rows[1]["shape"]
    g = {"sdpa": 0.01, "explicit": 0.04}
    for r in rows:
        r.update(graph_ms=g[r["method"]], graph_pct_bw=12.5)
    failed = dict(rows[0], method="fastfair-native", graph_error="RuntimeError: capture failed")
    del failed["graph_ms"], failed["graph_pct_bw"]
    md = bench.to_markdown(dict(res, kernels=rows + [failed], e2e=[]))
    line = {r.split("|")[4].strip(): r for r in md.splitlines() if r.startswith(f"| {rows[0]['shape']} ")}
    assert line["explicit"].rstrip().endswith("| 0.0400 | 12.5 | 4.00 |")
    assert line["sdpa"].rstrip().endswith("| 0.0100 | 12.5 | 1.00 |")
    assert "no graph: RuntimeError: capture failed" in line["fastfair-native"]
    assert all(r.count("|") == 16 for r in line.values())


def test_e2e_counts_must_be_positive():
    """--images 0 / --steps 0 were silently replaced by the defaults."""
    import torch

    from fastfair.bench import e2e_suite

    for kw in (dict(images=0), dict(steps=0)):
        with pytest.raises(ValueError, match="whole number >= 1"):
            e2e_suite(torch.device("cpu"), "fp32", True, model="tiny-sd", **kw)


def test_failed_e2e_case_keeps_the_cause(monkeypatch):
    """A case process that dies of a CUDA error reports the error's first line (its cause) and where it was
    raised -- not only the last line of stderr, which for CUDA errors is the generic TORCH_USE_CUDA_DSA hint (the
    H200 run of 2026-11-27 recorded only that for the DFT case)."""
    import subprocess

    from fastfair import bench

    stderr = ("/x/warnings.py:1: UserWarning: w\n  warn()\nTraceback (most recent call last):\n"
              '  File "/r/fastfair/dft.py", line 1564, in step\n    loss.backward()\n'
              "RuntimeError: CUDA error: an illegal memory access was encountered\n"
              "For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
              "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", stderr))
    with pytest.raises(RuntimeError) as e:
        bench._e2e_subprocess({"mode": "dft-fastfair"}, None)
    msg = str(e.value)
    assert msg.startswith("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert 'dft.py", line 1564, in step' in msg and "TORCH_USE_CUDA_DSA" in msg
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 3, "", ""))
    with pytest.raises(RuntimeError, match="exit 3"):
        bench._e2e_subprocess({"mode": "gen-plain"}, None)


@pytest.mark.parametrize("stderr,want", [
    # a CUDA error, then the C++ abort at exit: the Python exception, not the abort's frames
    ("Traceback (most recent call last):\n  File \"d.py\", line 9, in step\n    f()\nRuntimeError: CUDA error: an "
     "illegal memory access was encountered\nCompile with `TORCH_USE_CUDA_DSA`.\n\nterminate called after throwing\n"
     "  what():  CUDA error: x\nException raised from check at c.cpp:4\nframe #0: c10::Error\n",
     "RuntimeError: CUDA error: an illegal memory access was encountered; Compile with `TORCH_USE_CUDA_DSA`. "
     "(raised at File \"d.py\", line 9, in step)"),
    # no Python traceback: the C++ what() line
    ("terminate called after throwing\n  what():  CUDA error: misaligned address\nframe #1: <unknown> + 0x12\n",
     "what():  CUDA error: misaligned address"),
    # warnings printed after the traceback are not part of the message
    ("Traceback (most recent call last):\n  File \"a.py\", line 3, in f\nValueError: boom\n"
     "/lib/resource_tracker.py:254: UserWarning: leaked semaphore\n", "ValueError: boom (raised at File \"a.py\", "
     "line 3, in f)"),
    # a chained exception names its direct cause
    ("Traceback (most recent call last):\n  File \"a.py\", line 3, in f\nKeyError: 'x'\n\nThe above exception was "
     "the direct cause of the following exception:\n\nTraceback (most recent call last):\n  File \"b.py\", line 9, "
     "in g\nValueError: bad config\n", "ValueError: bad config (raised at File \"b.py\", line 9, in g); caused by "
     "KeyError: 'x'"),
])
def test_child_error_finds_the_exception(stderr, want):
    from fastfair.bench import _child_error

    assert _child_error(stderr) == want


def test_failed_case_row_keeps_the_markdown_table(tmp_path, monkeypatch):
    """An error text with pipes and newlines stays one cell: the e2e table keeps its 8 columns."""
    from fastfair import bench

    res = {"suite": "e2e", "dtype": "fp32", "quick": True, "backends": {},
           "environment": {"device_name": "cpu", "date": "d", "torch": "t", "triton": None, "diffusers": "x",
                           "git_revision": None},
           "e2e": [{"model": "m", "group": "g", "mode": "dft-fastfair", "available": True,
                    "error": "RuntimeError: a | b\nc"}], "e2e_ratios": []}
    rows = [ln for ln in bench.to_markdown(res).splitlines() if ln.startswith("| m |")]
    assert len(rows) == 1 and rows[0].replace("\\|", "").count("|") == 9, rows


def test_methods_subset(tmp_path):
    """--methods times only the methods named; the others are listed as not selected; unknown names are refused."""
    from fastfair import bench

    res = bench.run("kernels", "cpu", quick=True, out=tmp_path, methods="fastfair-reference, sdpa", log=lambda s: None)
    assert {r["method"] for r in res["kernels"]} == {"fastfair-reference", "sdpa"}
    assert res["backends"]["explicit"] == {"available": False, "reason": "not selected (--methods)"}
    assert "unavailable: not selected (--methods)" in (tmp_path / "bench.md").read_text()
    assert "x SDPA columns are empty" not in (tmp_path / "bench.md").read_text()
    no_sdpa = dict(res, backends=dict(res["backends"], sdpa={"available": False, "reason": "not selected (--methods)"}))
    assert "The x SDPA columns are empty: SDPA not selected (--methods)." in bench.to_markdown(no_sdpa)
    with pytest.raises(ValueError, match="unknown flash.*choose from fastfair-triton"):
        bench.run("kernels", "cpu", quick=True, out=tmp_path, methods="flash")
    with pytest.raises(ValueError, match="--suite e2e runs none"):
        bench.run("e2e", "cpu", quick=True, out=tmp_path, methods="sdpa")
