"""An audit killed with SIGKILL mid-run resumes with no lost and no duplicated rows."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import numpy as np
import pyarrow.parquet as pq
import pytest

import fastfair
from fastfair.audit import RunDirError

ROOT = Path(__file__).resolve().parents[1]
ARGS = dict(attributes="gender", seeds=4, steps=2, batch_size=2, classifier="none", report=False, progress=False,
            n_boot=50)
N_ROWS = 2 * (4 + 4 * 2)  # 2 professions x (4 neutral + 4 seeds x 2 gender words in the prompt)


pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _parts(out: Path) -> list[Path]:
    d = out / "parts"
    return sorted(d.glob("part-*.parquet")) if d.exists() else []


def test_sigkill_mid_run_then_resume(tiny_sd, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastfair", "audit", "--model", "tiny-sd", "--prompts", "list:doctor,pilot",
           "--attributes", "gender", "--seeds", "4", "--steps", "2", "--batch-size", "2", "--classifier", "none",
           "--out", str(out), "--no-progress", "--no-report", "--n-boot", "50"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while len(_parts(out)) < 3:
            if proc.poll() is not None:
                pytest.fail(f"the audit ended before it could be killed (rc {proc.returncode}): "
                            f"{proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no rows were committed within 240 s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: the next batch is being generated or written
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    committed = {p.name: p.read_bytes() for p in _parts(out)}
    n_before = sum(pq.read_metadata(out / "parts" / n).num_rows for n in committed)
    assert 0 < n_before < N_ROWS, "the kill should land mid-run"
    assert not (out / "results.parquet").exists()
    # the committed rows already make a (partial) report
    page = fastfair.audit.report(out, out=tmp_path / "partial.html").read_text()
    assert f"Partial run: {n_before} of {N_ROWS} planned images" in page

    kw = dict(pipeline=tiny_sd, out=out, **ARGS)
    with pytest.raises(RunDirError, match=f"already has {n_before} finished image.*--resume"):
        fastfair.audit("tiny-sd", "list:doctor,pilot", **kw)
    res = fastfair.audit("tiny-sd", "list:doctor,pilot", resume=True, **kw)

    # the rows committed before the kill are untouched; every planned row exists exactly once
    for name, data in committed.items():
        assert (out / "parts" / name).read_bytes() == data
    all_ids = [w for p in _parts(out) for w in pq.read_table(p, columns=["work_id"]).column("work_id").to_pylist()]
    assert len(all_ids) == N_ROWS and len(set(all_ids)) == N_ROWS  # no duplicates, none lost
    df = res.results
    assert len(df) == N_ROWS and df["work_id"].is_unique and set(df["work_id"]) == set(all_ids)
    envs = json.loads((out / "audit.json").read_text())["environments"]  # each session's batch size and processes
    assert {(e["batch_size"], e["processes"]) for e in envs} == {(2, 1)}
    assert not list(out.rglob(".*.tmp"))  # temporary files of the killed process are gone
    for rel in df["image"]:
        assert (out / rel).stat().st_size > 0

    # and the result equals an uninterrupted run
    ref = fastfair.audit("tiny-sd", "list:doctor,pilot", pipeline=tiny_sd, out=tmp_path / "ref", **ARGS).results
    assert df["work_id"].tolist() == ref["work_id"].tolist()
    for col in ("kind", "profession", "prompt", "seed", "label", "image"):
        assert df[col].tolist() == ref[col].tolist()
    np.testing.assert_array_equal(df["iou_open_gender"].to_numpy(), ref["iou_open_gender"].to_numpy())
    np.testing.assert_array_equal(df["iou_inprompt"].to_numpy(), ref["iou_inprompt"].to_numpy())
    np.testing.assert_allclose(df["softiou_inprompt"].to_numpy(), ref["softiou_inprompt"].to_numpy(), rtol=1e-6)
    summary, ref_summary = res.summary, json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["entanglement"]["open"]["gender"]["iou"]["overall"]["mean"] == pytest.approx(
        ref_summary["entanglement"]["open"]["gender"]["iou"]["overall"]["mean"])


def test_second_process_on_the_same_directory_is_refused(tiny_sd, tmp_path):
    from fastfair.audit.store import RunStore

    out = tmp_path / "busy"
    holder = RunStore(out)
    out.mkdir()
    holder.acquire()  # as a running audit holds it
    try:
        with pytest.raises(RunDirError, match="another fastfair audit process"):
            fastfair.audit("tiny-sd", "list:doctor", pipeline=tiny_sd, out=out, **ARGS)
    finally:
        holder.release()
    assert len(fastfair.audit("tiny-sd", "list:doctor", pipeline=tiny_sd, out=out, **ARGS).results) == 12


def test_part_files_are_compacted_without_changing_the_rows(tiny_sd, tmp_path, monkeypatch):
    """Every COMPACT_AT batches a rank's part files become one; rows equal an uncompacted run's, a kill between
    writing the compacted part and deleting its sources (duplicate rows) changes nothing, and --resume works."""
    import shutil

    from fastfair.audit import store as S

    kw = dict(ARGS, pipeline=tiny_sd, entanglement="inprompt")
    plain = fastfair.audit("tiny-sd", "list:doctor,nurse", out=tmp_path / "plain", **kw)
    n_batches = len(_parts(tmp_path / "plain"))
    assert n_batches == N_ROWS // 2  # batches of 2 images, one part file each
    monkeypatch.setattr(S, "COMPACT_AT", 3)
    comp = fastfair.audit("tiny-sd", "list:doctor,nurse", out=tmp_path / "comp", **kw)
    parts = _parts(tmp_path / "comp")
    assert sum(p.name.startswith("part-r0-compact-") for p in parts) == n_batches // 3 and len(parts) < n_batches
    cols = [c for c in plain.results.columns if c not in ("seconds", "maps")]  # maps: compacted shards' names
    assert all((tmp_path / "comp" / m).exists() for m in comp.results["maps"] if isinstance(m, str))
    a = plain.results[cols].sort_values("work_id").reset_index(drop=True)
    b = comp.results[cols].sort_values("work_id").reset_index(drop=True)
    import pandas as pd

    pd.testing.assert_frame_equal(a, b)
    # a kill after the compacted part was written but before its sources were deleted: duplicates are dropped
    src = next(p for p in _parts(tmp_path / "plain"))
    shutil.copy(src, tmp_path / "comp" / "parts" / src.name)
    again = fastfair.audit("tiny-sd", "list:doctor,nurse", out=tmp_path / "comp", resume=True, **kw)
    assert len(again.results) == len(plain.results) and again.results["work_id"].is_unique


def test_earlier_sessions_batch_parts_count_towards_compaction(tmp_path):
    """The compaction count started at 0 in every session, so a run resumed again and again in sessions of fewer than
    COMPACT_AT batches was never compacted (a review): it starts at this rank's batch parts on disk."""
    from fastfair.audit.store import RunStore

    store = RunStore(tmp_path / "run")
    parts = store.parts_dir
    parts.mkdir(parents=True)
    for i in range(5):
        (parts / f"part-r0-{i:020x}.parquet").write_bytes(b"")
    (parts / f"part-r1-{9:020x}.parquet").write_bytes(b"")          # another rank's
    (parts / "part-r0-compact-0123456789abcdef0123.parquet").write_bytes(b"")  # already compacted
    assert store.count_batch_parts() == 5 and store._batch_parts == 5


def test_map_shards_are_compacted_with_their_parts(tiny_sd, tmp_path, monkeypatch):
    """Compaction also merges the batches' map shards (a run of 100,000 images kept 12,500 shard files): every
    row's `maps` names a shard that exists and holds its maps, equal to an uncompacted run's; the report reads
    them; a kill after the compacted part is written (sources not yet deleted) loses nothing, and the next
    compaction (other sources, so other shard names) never overwrites a shard a surviving part names."""
    import pandas as pd
    from safetensors.torch import load_file

    from fastfair.audit import store as S

    kw = dict(ARGS, pipeline=tiny_sd, entanglement="open,inprompt")
    plain = fastfair.audit("tiny-sd", "list:doctor,nurse", out=tmp_path / "plain", **kw)
    monkeypatch.setattr(S, "COMPACT_AT", 3)
    comp = fastfair.audit("tiny-sd", "list:doctor,nurse", out=tmp_path / "comp", **dict(kw, report=True))
    shards = sorted((tmp_path / "comp" / "maps").glob("*.safetensors"))
    n_plain = len(list((tmp_path / "plain" / "maps").glob("*.safetensors")))
    assert any("compact-" in p.name for p in shards) and len(shards) < n_plain

    def maps_of(res, root):
        out = {}
        for r in res.results.itertuples():
            t = load_file(str(root / r.maps))
            keys = sorted(k for k in t if k.startswith(r.work_id + ":"))
            assert keys, (r.work_id, r.maps)
            out[r.work_id] = {k: t[k] for k in keys}
        return out
    a, b = maps_of(plain, tmp_path / "plain"), maps_of(comp, tmp_path / "comp")
    assert a.keys() == b.keys()
    for w in a:
        assert a[w].keys() == b[w].keys() and all(torch.equal(a[w][k], b[w][k]) for k in a[w])
    assert "<img" in (tmp_path / "comp" / "report.html").read_text()  # overlays read from the compacted shards

    # a kill right after the compacted part is written: the batch parts and their shards stay
    run = tmp_path / "kill"
    real_unlink = Path.unlink

    class Killed(Exception):
        pass

    def dying_unlink(self, *a, **k):
        if self.suffix in (".parquet", ".safetensors") and ("/parts/" in str(self) or "/maps/" in str(self)):
            raise Killed
        return real_unlink(self, *a, **k)
    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with pytest.raises(Killed):
        fastfair.audit("tiny-sd", "list:doctor,nurse", out=run, **kw)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    rows = S.RunStore(run).read_rows()
    assert all((run / m).exists() for m in rows["maps"])
    again = fastfair.audit("tiny-sd", "list:doctor,nurse", out=run, resume=True, **kw)
    assert len(again.results) == N_ROWS and again.results["work_id"].is_unique
    b2 = maps_of(again, run)
    assert all(torch.equal(a[w][k], b2[w][k]) for w in a for k in a[w])
    cols = [c for c in plain.results.columns if c not in ("seconds", "maps")]
    pd.testing.assert_frame_equal(plain.results[cols].sort_values("work_id").reset_index(drop=True),
                                  again.results[cols].sort_values("work_id").reset_index(drop=True))


def test_compaction_never_deletes_a_shard_a_surviving_part_names(tmp_path, monkeypatch):
    """A kill while a compaction deletes its batch parts, then the next compaction: a shard the surviving older
    compacted part still names (a group of one is left unmerged) must stay (a review reproduced rows naming deleted
    shards); at the end, remove_unnamed_shards deletes only shards no part names."""
    import random

    import pyarrow as pa
    from safetensors.torch import load_file

    from fastfair.audit import store as S

    rng = random.Random(0)
    schema = pa.schema([("work_id", pa.string()), ("maps", pa.string())])
    root = tmp_path / "run"

    made = []

    def batch(st):
        ids = sorted("%020x" % rng.getrandbits(80) for _ in range(2))
        made.extend(ids)
        maps = {f"{w}:open:x:profession": torch.full((64, 64), float(i)).half() for i, w in enumerate(ids)}
        st.commit([{"work_id": w, "maps": f"maps/maps-r0-{ids[0]}.safetensors"} for w in ids], schema, {}, maps,
                  ids[0])

    monkeypatch.setattr(S, "COMPACT_AT", 5)
    st = S.RunStore(root)
    batch(st)
    monkeypatch.setattr(S, "SHARD_BYTES", 4 * next((root / "maps").glob("*")).stat().st_size)  # groups of 4 + 1
    for _ in range(3):
        batch(st)

    class Killed(Exception):
        pass
    real, n = Path.unlink, [0]

    def dying(self, *a, **k):
        if "/parts/" in str(self):
            n[0] += 1
            if n[0] > 2:
                raise Killed
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "unlink", dying)
    with pytest.raises(Killed):
        batch(st)  # the 5th batch compacts; killed after deleting 2 of its 5 batch parts
    monkeypatch.setattr(Path, "unlink", real)
    monkeypatch.setattr(S, "COMPACT_AT", 4)
    st = S.RunStore(root)
    st.count_batch_parts()
    while True:  # resumed: batches until the next compaction ran
        batch(st)
        if st._batch_parts == 0:
            break
    (root / "maps" / "maps-r0-compact-00000000000000000000.safetensors").write_bytes(b"orphan")
    for _ in range(2):
        rows = st.read_rows()
        for r in rows.itertuples():  # every kept row names a shard that exists and holds its map
            assert f"{r.work_id}:open:x:profession" in load_file(str(root / r.maps)), r
        if _ == 0:
            assert st.remove_unnamed_shards() >= 1
            assert not (root / "maps" / "maps-r0-compact-00000000000000000000.safetensors").exists()
    assert sorted(rows["work_id"]) == sorted(made)


def test_a_resumed_run_drops_its_stale_results_file(tiny_sd, tmp_path, monkeypatch):
    """A finished run resumed to redo work (a lost part file) and killed before it merges again: results.parquet
    would describe the earlier state (and could name shards a compaction deleted). It is removed when the resumed
    run starts adding rows, so load_results reads the committed parts; the finished resume writes it again."""
    from fastfair import generation
    from fastfair.audit import load_results

    kw = dict(ARGS, pipeline=tiny_sd, entanglement="open")
    out = tmp_path / "run"
    first = fastfair.audit("tiny-sd", "list:doctor,nurse", out=out, **kw)
    lost = _parts(out)[0]
    lost.unlink()
    real = generation.generate

    class Killed(Exception):
        pass

    def dying(*a, **k):
        raise Killed
    monkeypatch.setattr(generation, "generate", dying)
    with pytest.raises(Killed):
        fastfair.audit("tiny-sd", "list:doctor,nurse", out=out, resume=True, **kw)
    assert not (out / "results.parquet").exists()
    assert len(load_results(out)) == len(first.results) - 2  # the lost batch's rows: not in the parts
    monkeypatch.setattr(generation, "generate", real)
    again = fastfair.audit("tiny-sd", "list:doctor,nurse", out=out, resume=True, **kw)
    assert (out / "results.parquet").exists() and len(load_results(out)) == len(first.results) == len(again.results)
