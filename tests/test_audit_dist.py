"""Sharding: ``torchrun --nproc-per-node 2 -m fastfair audit`` on CPU (gloo) equals a single-process audit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fastfair
from fastfair.classify import load_classifier

ROOT = Path(__file__).resolve().parents[1]

CLASSIFIER = '''
import torch

class Tint(torch.nn.Module):
    """Deterministic stand-in classifier: gender from mean brightness, age from red minus blue."""
    labels = {"gender": ["male", "female"], "age": ["young", "old"]}

    def forward(self, x):
        g = torch.sigmoid((x.mean(dim=(1, 2, 3)) - 0.5) * 200)
        a = torch.sigmoid((x[:, 0].mean(dim=(1, 2)) - x[:, 2].mean(dim=(1, 2))) * 200)
        return {"gender": torch.stack([g, 1 - g], 1), "age": torch.stack([a, 1 - a], 1)}

def make(attribute_sets, device):
    return Tint()
'''


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_process_gloo_equals_single_process(tiny_sd, tmp_path):
    clf_file = tmp_path / "tint.py"
    clf_file.write_text(CLASSIFIER)
    spec = f"python:{clf_file}:make"
    out2 = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fastfair", "audit", "--model", "tiny-sd", "--prompts", "list:doctor,nurse", "--attributes",
           "gender,age", "--seeds", "2", "--steps", "2", "--batch-size", "1", "--classifier", spec,
           "--entanglement", "open,inprompt", "--n-boot", "100", "--no-progress", "--out", str(out2)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("wrote 20 rows") == 1  # rank 0 reports, once
    names = [q.name for q in (out2 / "parts").glob("part-*.parquet")]
    assert {n.split("-")[1] for n in names} == {"r0", "r1"}  # each rank wrote its own shard files
    assert {q.name.split("-")[1] for q in (out2 / "maps").glob("*.safetensors")} == {"r0", "r1"}
    two = pd.read_parquet(out2 / "results.parquet")

    one = fastfair.audit("tiny-sd", "list:doctor,nurse", pipeline=tiny_sd, attributes="gender,age", seeds=2, steps=2,
                         batch_size=1, classifier=load_classifier(spec, []), n_boot=100, progress=False,
                         out=tmp_path / "one").results
    assert len(two) == len(one) == 2 * (2 + 2 * 4)
    assert two["work_id"].tolist() == one["work_id"].tolist()  # same ids, same (plan) order, each once
    # round-robin: plan item i ran on rank i % 2
    assert two["rank"].tolist() == [i % 2 for i in range(len(two))]
    for col in ("kind", "profession", "prompt", "seed", "attribute", "label", "image", "pred_gender", "pred_age",
                "pred_gender_x_age"):
        assert two[col].tolist() == one[col].tolist(), col
    for col in ("iou_open_gender", "iou_open_age", "iou_inprompt"):
        np.testing.assert_array_equal(two[col].to_numpy(), one[col].to_numpy())
    for col in ("softiou_open_gender", "softiou_inprompt", "p_gender_male", "p_age_old"):
        np.testing.assert_allclose(two[col].to_numpy(), one[col].to_numpy(), rtol=1e-6, atol=1e-9)
    s2 = json.loads((out2 / "summary.json").read_text())
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert s2["entanglement"]["open"]["gender"]["iou"]["overall"] == pytest.approx(
        s1["entanglement"]["open"]["gender"]["iou"]["overall"])
    assert s2["distribution"] == s1["distribution"]
    assert (out2 / "report.html").is_file()
