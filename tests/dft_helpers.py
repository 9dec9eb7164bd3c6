"""Shared pieces of the DFT tests: a deterministic differentiable stand-in classifier, a small feature encoder,
and a small fast config (32x32 images, 2 sampling steps, rank-4 LoRA)."""
import pytest
import torch

from fastfair.dft import DFTConfig, DFTTrainer

try:
    import peft  # noqa: F401
    HAVE_PEFT = True
except ImportError:  # LoRA needs the [train] extra
    HAVE_PEFT = False
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="peft is not installed (pip install 'fastfair[train]')")


class RedClassifier(torch.nn.Module):
    """p(class 0) = sigmoid(a * (mean red - b)); images (N, 3, H, W) in [0, 1]."""

    labels = {"gender": ("male", "female")}

    def __init__(self, a: float = 300.0, b: float = 0.43):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        p0 = torch.sigmoid(self.a * (x[:, 0].mean((1, 2)) - self.b))
        return {"gender": torch.stack([p0, 1 - p0], 1)}


def tiny_encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten())


def small(**kw):
    # two images cannot give certain targets (threshold 0.2): keep them all so that every step has a gradient
    base = dict(images_per_prompt=2, sampling_steps=(2, 2), steps=2, quality_weight=0.0, ema_decay=None, lr=1e-2,
                rank=4, checkpoint_every=0, height=32, width=32, gradient_checkpointing=False,
                uncertainty_threshold=1.0)
    base.update(kw)
    return DFTConfig(**base)


def distribution_shift(pipe, prompt, cfg, seeds=range(100, 132)):
    """Train ``cfg`` on ``pipe`` with a RedClassifier whose threshold is the 10% quantile of the mean red of the frozen
    model's images at ``seeds`` (a = 1 / their std: the frozen model is ~90/10 there). Returns (share of class 0
    before, class frequencies after, the run's history)."""
    clf = RedClassifier()
    tr = DFTTrainer(pipe, [prompt], clf, cfg, quality_encoder=None)
    with torch.no_grad():
        noise = torch.cat([tr.noises(1, torch.Generator().manual_seed(s)) for s in seeds])
        red = tr.sample(prompt, noise, cfg.sampling_steps[0], grad=False)[:, 0].mean((1, 2))
    clf.b, clf.a = float(torch.quantile(red, 0.1)), 1.0 / float(red.std())
    before = float((red > clf.b).float().mean())          # = the classifier's argmax on these images
    res = tr.train(progress=False)
    after = tr.measure(seeds=seeds, n_steps=cfg.sampling_steps[0], batch_size=32)["gender"]
    tr.close()
    return before, after, res.history
