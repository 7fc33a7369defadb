"""PyramidDrop: keep-everything is the base model, the staged prefill equals a per-sample
reference written out by hand (next layer's q/k + RoPE, float32 softmax, renumbered
positions), batched = per sample, and cached decoding (shifted positions per stage) equals
a teacher-forced continuation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids, save_hf_llava

import loupe
from loupe.errors import ConfigError
from loupe.generation import SamplingConfig, generate
from loupe.methods import method_options
from loupe.nn.tokens import RopeSpec, TokenSet
from loupe.tiny import tiny_config

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture
def hf_deep(tmp_path: Path) -> Path:
    save_hf_llava(tmp_path / "deep", text_num_hidden_layers=4, text_num_key_value_heads=2)
    return tmp_path / "deep"


def test_keep_everything_is_the_base_model(hf_deep: Path) -> None:
    base = loupe.from_pretrained(hf_deep, "lowres", dtype=torch.float32)
    pdrop = loupe.from_pretrained(hf_deep, "pdrop", dtype=torch.float32, layers=[1, 2, 3], ratio=1.0)
    ids, px = prompt_ids(9, 16, seed=1), pixels(1, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(pdrop(ids, px).logits, base(ids, px).logits, rtol=0, atol=0)


@torch.no_grad()
def reference(model: loupe.VLM, ids: torch.Tensor, px: torch.Tensor, stages: list[int], ratio: float) -> torch.Tensor:
    """PyramidDrop for one sample, written out: before each stage's first layer, the last
    row's attention under that layer's q/k (+ RoPE at the current positions) ranks the image
    tokens still held; the top `ratio` stay and every row is renumbered 0..n-1."""
    cfg = model.cfg
    image = ids == cfg.image_token_id  # (1, T)
    x = model.packing.pack(model.decoder.embed_tokens(ids.masked_fill(image, 0)), image,
                           model.method.encode(model, px).sequence)[0]  # (T, W)
    img = image[0]
    rope = RopeSpec(cfg.text.head_dim, cfg.text.rope_theta, x.dtype)
    for i, layer in enumerate(model.decoder.layers):
        if i in stages:
            t = x.shape[0]
            r = rope.at(torch.arange(t)[None])
            attn = layer.self_attn
            h = layer.input_layernorm(x[None])
            q = r.apply(attn.heads(attn.q_proj(h), attn.num_heads))[:, :, -1:]  # (1, H, 1, D)
            k = r.apply(attn.heads(attn.k_proj(h), attn.num_kv_heads)).repeat_interleave(
                attn.num_heads // attn.num_kv_heads, dim=1)
            scores = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim),
                                   -1).mean(1)[0, 0]  # (T,)
            n = int(img.sum())
            top = scores.masked_fill(~img, float("-inf")).topk(max(1, int(n * ratio))).indices
            keep = ~img
            keep[top] = True
            x, img = x[keep], img[keep]
        t = x.shape[0]
        ones = torch.ones(1, t, dtype=torch.bool)
        tokens = TokenSet.build(torch.arange(t)[None], ones, ones, img[None], rope, "eager")  # renumbered
        x = layer(x[None], tokens.ctx)[0]
    return model.decoder.logits(x[None, -1:])


@pytest.mark.parametrize("stages", [[1], [1, 3], [2, 3]])
def test_prefill_equals_the_written_out_reference(hf_deep: Path, stages: list[int]) -> None:
    model = loupe.from_pretrained(hf_deep, "pdrop", dtype=torch.float32, layers=stages, ratio=0.5)
    ids, px = prompt_ids(9, 16, seed=3), pixels(1, seed=4)
    with torch.no_grad():
        out = model(ids, px)
    torch.testing.assert_close(out.logits[:, -1:], reference(model, ids, px, stages, 0.5), **TOL)
    counts = [int(c[0]) for c in out.report.kept_counts.values()]
    assert counts == [16 // 2 ** (j + 1) for j in range(len(stages))]


def test_batch_with_left_padding_equals_each_sample(hf_deep: Path) -> None:
    model = loupe.from_pretrained(hf_deep, "pdrop", dtype=torch.float32, layers=[1, 3], ratio=0.4)
    short, long = prompt_ids(4, 16, seed=5, image_at=1), prompt_ids(11, 16, seed=6)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    px = pixels(2, seed=7)
    with torch.no_grad():
        both = model(ids, px, mask)
        for i, row in enumerate((short, long)):
            torch.testing.assert_close(both.logits[i, -1], model(row, px[i:i + 1]).logits[0, -1], **TOL)
    assert torch.isfinite(both.logits).all()


def test_cached_decoding_equals_teacher_forced_continuation(hf_deep: Path) -> None:
    """Each stage's layers continue their own (renumbered) positions: six cached steps give
    what one call with all six tokens after the same prefill gives."""
    model = loupe.from_pretrained(hf_deep, "pdrop", dtype=torch.float32, layers=[1, 3], ratio=0.5)
    ids, px = prompt_ids(7, 16, seed=8), pixels(1, seed=9)
    out = generate(model, ids, px, sampling=SamplingConfig(max_new_tokens=6))
    cache = model.new_cache(1, ids.shape[1] + 6)
    with torch.no_grad():
        first = model(ids, px, cache=cache, last_only=True).logits[:, -1].argmax(-1)
        rest = model(out[:, :-1], cache=cache).logits.argmax(-1)  # (1, 5): teacher-forced
    assert [int(first)] + rest[0].tolist() == out[0].tolist()


def test_default_stages_scale_with_depth() -> None:
    assert method_options("pdrop").resolved_layers(tiny_config(layers=32)) == [8, 16, 24]  # the paper's
    assert method_options("pdrop").resolved_layers(tiny_config(layers=24)) == [6, 12, 18]  # OneVision-0.5B
    assert method_options("pdrop").resolved_layers(tiny_config(layers=4)) == [1, 2, 3]


def test_bad_options_are_named(hf_deep: Path) -> None:
    for options, match in (({"layers": [2, 1]}, "layers=\\[2, 1\\] must be strictly increasing"),
                           ({"layers": [0]}, "outside 1..3"), ({"layers": [4]}, "outside 1..3"),
                           ({"layers": []}, "names no stage boundary"),
                           ({"ratio": 0.0}, "ratio=0.0 must be in \\(0, 1\\]"), ({"ratio": 1.5}, "ratio=1.5")):
        with pytest.raises(ConfigError, match=match):
            loupe.from_pretrained(hf_deep, "pdrop", **options)
