"""Shared fixtures: tiny random Hugging Face LLaVA checkpoints written with transformers'
own `save_pretrained`, so the tests exercise Loupe's production loader on real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

IMAGE_SIZE = 56  # 4x4 patches of 14 -> 16 image tokens
VOCAB = 128
IMAGE_TOKEN = VOCAB - 1


def hf_llava_config(**overrides: Any) -> transformers.LlavaConfig:
    """A tiny LlavaConfig; `text_*` / `vision_*` overrides reach the sub-configs."""
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.2,
                rms_norm_eps=1e-6, pad_token_id=0)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=14, projection_dim=32, initializer_range=0.2)
    top: dict[str, Any] = dict(image_token_index=IMAGE_TOKEN, image_seq_length=16)
    for key, value in overrides.items():
        if key.startswith("text_"):
            text[key[5:]] = value
        elif key.startswith("vision_"):
            vision[key[7:]] = value
        else:
            top[key] = value
    return transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**vision), text_config=transformers.LlamaConfig(**text), **top)


def save_hf_llava(folder: Path, seed: int = 0, **overrides: Any) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(hf_llava_config(**overrides)).eval()
    with torch.no_grad():  # lift the projector out of near-zero so image tokens matter
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


def prompt_ids(n_text: int, n_image_tokens: int, seed: int, image_at: int = 2) -> torch.Tensor:
    """A prompt (1, T): random text ids with one image block at `image_at`."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(5, IMAGE_TOKEN, (n_text,), generator=g)
    image = torch.full((n_image_tokens,), IMAGE_TOKEN)
    return torch.cat([text[:image_at], image, text[image_at:]])[None]


def pixels(n: int, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def hf_tiny(tmp_path: Path) -> tuple[transformers.LlavaForConditionalGeneration, Path]:
    path = tmp_path / "hf-tiny"
    return save_hf_llava(path), path
