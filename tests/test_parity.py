"""Loupe against transformers' LlavaForConditionalGeneration, through the production loader.

Tolerance (fp32): rtol 1e-4, atol 1e-5 on logits — float32 round-off of a different but
equivalent order of operations, far below any real disagreement (a wrong RoPE, norm or
mask moves logits by > 1e-2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import IMAGE_TOKEN, pixels, prompt_ids, save_hf_llava

import loupe
from loupe.generation import SamplingConfig, generate

TOL = dict(rtol=1e-4, atol=1e-5)

CONFIGS = {
    "mha-layer-2": dict(),
    "gqa-layer-1": dict(text_num_key_value_heads=2, vision_feature_layer=-1),
    "mqa-bias-full-tied": dict(text_num_key_value_heads=1, text_attention_bias=True, text_rope_theta=500.0,
                               vision_feature_select_strategy="full", image_seq_length=17,
                               text_tie_word_embeddings=True, tie_word_embeddings=True),
    "multi-layer-features": dict(vision_feature_layer=[-3, -1], vision_hidden_act="gelu"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path: Path, name: str) -> None:
    hf = save_hf_llava(tmp_path / name, **CONFIGS[name])
    ours = loupe.from_pretrained(tmp_path / name, dtype=torch.float32)
    n = ours.method.tokens_per_image()
    ids, px = prompt_ids(12, n, seed=1), pixels(1, seed=2)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px).logits
        got = ours(input_ids=ids, pixel_values=px).logits
    assert got.shape == expected.shape == (1, 12 + n, 128)
    torch.testing.assert_close(got, expected, **TOL)


def test_left_padded_batch_of_two_images(hf_tiny) -> None:
    hf, path = hf_tiny
    ours = loupe.from_pretrained(path, dtype=torch.float32)
    short, long = prompt_ids(5, 16, seed=3, image_at=1), prompt_ids(11, 16, seed=4)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])  # (2, T)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    px = pixels(2, seed=5)
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got = ours(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        alone = ours(input_ids=short, pixel_values=px[:1]).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], **TOL)
    torch.testing.assert_close(got[0, pad:], alone[0], **TOL)  # padding changes nothing
    assert torch.isfinite(got).all()  # padding rows too: no NaN anywhere


def test_greedy_generation_matches_transformers(hf_tiny) -> None:
    hf, path = hf_tiny
    ours = loupe.from_pretrained(path, dtype=torch.float32)
    ids, px = prompt_ids(8, 16, seed=6), pixels(1, seed=7)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=16, do_sample=False,
                               pad_token_id=0)[:, ids.shape[1]:]
    got = generate(ours, ids, px, sampling=SamplingConfig(max_new_tokens=16))
    assert expected.shape == (1, 16)
    assert got.tolist() == expected.tolist()


def test_left_padded_generation_matches_per_sample(hf_tiny) -> None:
    _, path = hf_tiny
    ours = loupe.from_pretrained(path, dtype=torch.float32)
    a, b = prompt_ids(4, 16, seed=8, image_at=1), prompt_ids(9, 16, seed=9)
    pad = b.shape[1] - a.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    px = pixels(2, seed=10)
    cfg = SamplingConfig(max_new_tokens=12)
    batched = generate(ours, ids, px, mask, cfg)
    assert batched[0].tolist() == generate(ours, a, px[:1], sampling=cfg)[0].tolist()
    assert batched[1].tolist() == generate(ours, b, px[1:], sampling=cfg)[0].tolist()


def test_image_token_id_is_the_config_one(hf_tiny) -> None:
    _, path = hf_tiny
    assert loupe.from_pretrained(path).cfg.image_token_id == IMAGE_TOKEN
