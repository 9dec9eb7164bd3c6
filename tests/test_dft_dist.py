"""Data-parallel DFT: ``torchrun --nproc-per-node 2 -m fastfair finetune dft`` on CPU (gloo) shares every step's N
images between the processes -- alignment targets over all N, gradients summed -- and equals one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import peft  # noqa: F401
except ImportError:
    pytest.skip("peft is not installed (pip install 'fastfair[train]')", allow_module_level=True)

PARTS = '''
import torch
from fastfair.faces import Face, ARCFACE_TEMPLATE_112

class Red(torch.nn.Module):
    labels = {"gender": ("male", "female")}
    def forward(self, x):
        p0 = torch.sigmoid(60.0 * (x[:, 0].mean((1, 2)) - 0.45))
        return {"gender": torch.stack([p0, 1 - p0], 1)}

def make(attribute_sets=None, device=None):
    return Red()

def detector():
    return lambda im: [Face((0, 0, im.shape[1], im.shape[0]), ARCFACE_TEMPLATE_112 * im.shape[1] / 112)]

def nothing():
    return lambda im: []
'''

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("batch,det", [(None, "detector"), (1, "detector"), (None, "nothing")])
def test_two_processes_equal_one(tmp_path, batch, det):
    """... and with no face anywhere (no gradient at all): no update on either side (AdamW skips the tensors)."""
    parts = tmp_path / "parts.py"
    parts.write_text(PARTS)
    args = ["finetune", "dft", "--model", "tiny-sd", "--prompt", "a photo of the face of a doctor", "--prompt",
            "a photo of the face of a nurse", "--steps", "2", "--images-per-prompt", "4", "--sampling-steps", "1-2",
            "--height", "32", "--width", "32", "--rank", "4", "--lr", "1e-2", "--classifier", f"python:{parts}:make",
            "--quality-encoder", "none", "--ema-decay", "0.9", "--uncertainty-threshold", "0.45",
            "--checkpoint-every", "1", "--eval-every", "1", "--eval-seeds", "3", "--eval-steps", "1",
            "--face-detector", f"python:{parts}:{det}", "--face-expand", "0", "--face-crop-size", "32",
            "--no-progress"] + (["--batch-size", str(batch)] if batch else [])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastfair",
           *args, "--out", str(tmp_path / "two")]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("wrote LoRA:") == 1                 # rank 0 writes and reports, once
    from fastfair.cli import main

    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "dft.json").read_text())
    one = json.loads((tmp_path / "one" / "dft.json").read_text())
    for h2, h1 in zip(two["history"], one["history"], strict=True):
        assert (h2["prompt"], h2["sampling_steps"], h2["faces"]) == (h1["prompt"], h1["sampling_steps"], h1["faces"])
        assert h2["kept"] == h1["kept"] and str(h2["distribution"]) == str(h1["distribution"])   # NaN == NaN
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5, abs=1e-7)
        assert h2["grad_norm"] == pytest.approx(h1["grad_norm"], rel=1e-4)
    if det == "nothing":
        assert all(h["faces"] == 0 and h["grad_norm"] == 0 for h in one["history"]) and two["processes"] == 2
    else:
        assert h1["faces"] == 4 and any(h["kept"]["gender"] > 0 for h in one["history"])
    assert [e["step"] for e in two["evaluations"]] == [0, 1, 2]
    for e2, e1 in zip(two["evaluations"], one["evaluations"]):
        assert e2["model"] == e1["model"] and e2.get("ema") == e1.get("ema")
    from safetensors.torch import load_file

    for sub in ("lora", "lora-ema"):
        w2 = load_file(tmp_path / "two" / sub / "pytorch_lora_weights.safetensors")
        w1 = load_file(tmp_path / "one" / sub / "pytorch_lora_weights.safetensors")
        assert w2.keys() == w1.keys()
        for k in w1:   # Adam moves each weight by ~lr whatever its gradient's size: summation-order noise in
            # near-zero gradient entries shows as up to ~1e-3 lr (lr 1e-2 here)
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4)
    assert sorted(q.name for q in (tmp_path / "two" / "checkpoints").iterdir()) == ["checkpoint-000001",
                                                                                      "checkpoint-000002"]
