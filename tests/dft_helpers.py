"""Shared pieces of the DFT tests: a deterministic differentiable stand-in classifier, a small feature encoder,
and a small fast config (32x32 images, 2 sampling steps, rank-4 LoRA)."""
import torch

from fastfair.dft import DFTConfig


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
