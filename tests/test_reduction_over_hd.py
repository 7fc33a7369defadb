"""Token reduction over LLaVA-HD's tiled sequence (`hr_size`, VISOR's comparison on LLaVA-1.5):
each method's keep-everything setting is `hd` with tiles exactly, VisionZip reduces every crop
(the LR image, each tile) as it reduces one image, a batch equals each sample, and the OneVision
forms refuse an HR size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids, save_hf_llava

import loupe
from loupe.errors import ConfigError
from loupe.methods.highres import crops
from loupe.methods.visionzip import VisionZipConfig, zipped_tokens

HR = 112  # the LR image (16 tokens) + 2 x 2 native tiles (64 tokens)
EVERYTHING = {"fastv": {"ratio": 0.0}, "pdrop": {"layers": [1, 3], "ratio": 1.0},
              "sparsevlm": {"layers": [0, 2], "ratios": [1.0, 1.0], "recycle": False}, "hired": {"rate": 1.0}}
REDUCED = {"fastv": {"keep": 30}, "pdrop": {"layers": [1, 3]}, "sparsevlm": {"layers": [0, 2], "keep": [40, 20]},
           "hired": {"rate": 0.3}, "visionzip": {"dominant": 6, "contextual": 3}}


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hd") / "hf"
    save_hf_llava(path, text_num_hidden_layers=4, text_num_key_value_heads=2)
    return path


@pytest.mark.parametrize("method", list(EVERYTHING))
def test_keep_everything_is_hd_with_tiles(hf_path: Path, method: str) -> None:
    hd = loupe.from_pretrained(hf_path, "hd", dtype=torch.float32, hr_size=HR, tiles=True)
    every = loupe.from_pretrained(hf_path, method, dtype=torch.float32, hr_size=HR, **EVERYTHING[method])
    assert every.method.tokens_per_image() == hd.method.tokens_per_image() == 80
    ids, px = prompt_ids(9, 80, seed=1), pixels(1, seed=2, size=HR)
    with torch.no_grad():
        torch.testing.assert_close(every(ids, px).logits, hd(ids, px).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_visionzip_reduces_every_crop(hf_path: Path) -> None:
    model = loupe.from_pretrained(hf_path, "visionzip", dtype=torch.float32, hr_size=HR, dominant=6, contextual=3)
    assert model.method.tokens_per_image() == 5 * 9
    px = pixels(2, seed=3, size=HR)
    each = [zipped_tokens(model, c[None], VisionZipConfig(dominant=6, contextual=3)) for c in crops(px, 56)]
    torch.testing.assert_close(model.method.encode(model, px).sequence, torch.cat(each).view(2, 45, -1), rtol=1e-5,
                               atol=1e-5)  # batch of 2 against one crop at a time: fp32 summation order


@pytest.mark.parametrize("method", list(REDUCED))
def test_batch_with_left_padding_equals_each_sample(hf_path: Path, method: str) -> None:
    model = loupe.from_pretrained(hf_path, method, dtype=torch.float32, hr_size=HR, **REDUCED[method])
    n = model.method.tokens_per_image()
    short, long = prompt_ids(5, n, seed=5, image_at=1), prompt_ids(12, n, seed=6)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    px = pixels(2, seed=7, size=HR)
    with torch.no_grad():
        both = model(ids, px, mask).logits
        for i, row in enumerate((short, long)):
            torch.testing.assert_close(both[i, -1], model(row, px[i:i + 1]).logits[0, -1], rtol=1e-4, atol=1e-5)
    label = loupe.methods.method_label(model.method.options, model.cfg)
    assert label.startswith(f"{method}@{HR}")


def test_bad_hr_sizes_are_named(hf_path: Path) -> None:
    for method in REDUCED:
        with pytest.raises(ConfigError, match="hr_size=100 must be a multiple of the encoder's native size 56"):
            loupe.from_pretrained(hf_path, method, hr_size=100)
