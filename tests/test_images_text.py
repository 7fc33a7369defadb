"""Preprocessing against transformers' CLIPImageProcessor / LlavaImageProcessor (PIL
backend) on real PIL images of odd sizes; tokenizer and prompt expansion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from loupe.images import ImageProcessor
from loupe.text import Tokenizer, llava_prompt
from loupe.tiny import tiny_tokenizer

SIZES = [(337, 211), (123, 501), (64, 64), (1000, 999)]


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A structured image (gradients + noise) so resampling differences would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_matches_clip_image_processor(w: int, h: int) -> None:
    image = photo(w, h, seed=w)
    ref = transformers.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    expected = torch.from_numpy(np.asarray(ref(images=image)["pixel_values"][0]))
    got = ImageProcessor(size=336, pad_to_square=False)(image)
    assert got.shape == expected.shape == (3, 336, 336)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_pad_to_square_matches_llava_image_processor(w: int, h: int) -> None:
    image = photo(w, h, seed=h)
    ref = transformers.LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 336},
                                              crop_size={"height": 336, "width": 336})
    expected = torch.from_numpy(np.asarray(ref(images=image)["pixel_values"][0]))
    got = ImageProcessor(size=336, pad_to_square=True)(image)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_grayscale_and_rgba_become_rgb() -> None:
    proc = ImageProcessor(size=56)
    for mode in ("L", "RGBA", "P"):
        assert proc(photo(70, 40, 0).convert(mode)).shape == (3, 56, 56)


@pytest.fixture
def tokenizer(tmp_path: Path) -> Tokenizer:
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    return Tokenizer.from_folder(tmp_path, image_token_id=4)


def test_image_placeholder_expands_like_the_expanded_string(tokenizer: Tokenizer) -> None:
    prompt = llava_prompt("What colour is the square?")
    assert prompt.endswith("USER: <image>\nWhat colour is the square? ASSISTANT:")
    ids = tokenizer.encode(prompt, tokens_per_image=5)
    expanded = tokenizer.encode(prompt.replace("<image>", "<image>" * 5), tokens_per_image=1)
    assert ids == expanded
    assert ids.count(4) == 5 and ids[0] == tokenizer.bos_id


def test_matches_transformers_fast_tokenizer(tokenizer: Tokenizer, tmp_path: Path) -> None:
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = llava_prompt("Where is the small red triangle?")
    assert tokenizer.encode(text, add_bos=False) == fast(text, add_special_tokens=False)["input_ids"]


def test_left_padding(tokenizer: Tokenizer) -> None:
    ids, mask = tokenizer.pad_left([[7, 8, 9], [5]])
    assert ids.tolist() == [[7, 8, 9], [tokenizer.pad_id, tokenizer.pad_id, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
