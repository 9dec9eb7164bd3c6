"""Small random models built in code for tests (no hub)."""
from __future__ import annotations

import torch


def tiny_clip(seed: int = 0):
    """A randomly initialised CLIPModel (32-wide, 2 layers, 32x32 images) and the real CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from fastfair.pipelines import clip_tokenizer

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(cfg).eval(), clip_tokenizer()
