"""SparseVLM: keep-everything is the base model, the pruned layers equal a per-sample
reference written out from the official steps (raters, rater attention, recycling by
density-peak clustering, renumbered positions), batched = per sample, cached decoding =
a teacher-forced continuation, and bad budgets are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids, save_hf_llava

import loupe
from loupe.cli import main
from loupe.errors import ConfigError
from loupe.generation import SamplingConfig, answer, generate
from loupe.nn.attention import eager_attention
from loupe.nn.tokens import RopeSpec, TokenSet
from loupe.tiny import tiny_config, write_tiny_checkpoint

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture
def hf_deep(tmp_path: Path) -> Path:
    save_hf_llava(tmp_path / "deep", text_num_hidden_layers=4, text_num_key_value_heads=2)
    return tmp_path / "deep"


def test_keep_everything_without_recycling_is_the_base_model(hf_deep: Path) -> None:
    base = loupe.from_pretrained(hf_deep, "lowres", dtype=torch.float32)
    every = loupe.from_pretrained(hf_deep, "sparsevlm", dtype=torch.float32, layers=[0, 2], keep=[16, 16],
                                  recycle=False)
    ids, px = prompt_ids(9, 16, seed=1), pixels(1, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(every(ids, px).logits, base(ids, px).logits, rtol=0, atol=0)


def official_clusters(x: torch.Tensor, count: int) -> torch.Tensor:
    """The official cluster_and_merge for one sample, its noise left out: x (m, W) -> (c, W)."""
    m, w = x.shape
    dist = (x[:, None] - x[None, :]).norm(dim=-1) / w**0.5
    near = dist.topk(count, dim=-1, largest=False).values
    density = (-(near**2).mean(-1)).exp()
    mask = (density[None, :] > density[:, None]).float()
    parent = (dist * mask + dist.max() * (1 - mask)).min(-1).values
    centres = (parent * density).topk(count).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(count)
    return torch.stack([x[assign == j].mean(0) for j in range(count)])


@torch.no_grad()
def reference(model: loupe.VLM, ids: torch.Tensor, px: torch.Tensor, layers: list[int],
              keep: list[int]) -> tuple[torch.Tensor, list[int]]:
    """SparseVLM for one unpadded sample, written out: logits of the last row, image tokens held
    after each pruning layer."""
    cfg = model.cfg
    image = (ids == cfg.image_token_id)[0]
    x = model.packing.pack(model.decoder.embed_tokens(ids.masked_fill(ids == cfg.image_token_id, 0)), image[None],
                           model.method.encode(model, px).sequence)[0]
    end = int(image.nonzero().max()) + 1
    vis = x[image]
    relevance = (vis @ x[end:].T).softmax(-1).mean(0)
    raters = end + (relevance > relevance.mean()).nonzero()[:, 0]  # rows after the image
    rope = RopeSpec(cfg.text.head_dim, cfg.text.rope_theta, x.dtype)
    start, n_vis, held = int(image.nonzero().min()), int(image.sum()), []
    for i, layer in enumerate(model.decoder.layers):
        t = x.shape[0]
        ones = torch.ones(1, t, dtype=torch.bool)
        img = torch.zeros(1, t, dtype=torch.bool)
        img[0, start:start + n_vis] = True
        full = TokenSet.build(torch.arange(t)[None], ones, ones, img, rope, "eager")  # renumbered: 0..t-1
        if i in layers:
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(x[None]), full.ctx.rope)
            _, probs = eager_attention(q, k, v, full.ctx.mask, causal=full.ctx.causal)  # (1, H, T, T)
            score = probs[0].mean(0)[raters][:, start:start + n_vis].mean(0)  # (n_vis,)
        x = layer(x[None], full.ctx)[0]
        if i in layers:
            budget = min(keep[layers.index(i)], n_vis)
            order = score.argsort(descending=True, stable=True)
            kept = torch.zeros(n_vis, dtype=torch.bool)
            kept[order[:budget]] = True
            dropped = order[budget:]
            m = int(len(dropped) * 0.3) + 1 if len(dropped) else 0
            c = int(m / 10) + 1 if m else 0
            visual = x[start:start + n_vis]
            merged = official_clusters(visual[dropped[:m]], c) if c else visual[:0]
            x = torch.cat([x[:start], visual[kept], merged, x[start + n_vis:]])
            raters = raters - (n_vis - budget - c)
            n_vis = budget + c
            held.append(n_vis)
    return model.decoder.logits(x[None, -1:]), held


@pytest.mark.parametrize("layers, keep", [([0, 2], [10, 4]), ([1], [6]), ([0, 1, 2], [12, 7, 3])])
def test_prefill_equals_the_written_out_reference(hf_deep: Path, layers: list[int], keep: list[int]) -> None:
    model = loupe.from_pretrained(hf_deep, "sparsevlm", dtype=torch.float32, layers=layers, keep=keep)
    ids, px = prompt_ids(12, 16, seed=3), pixels(1, seed=4)
    expected, held = reference(model, ids, px, layers, keep)
    with torch.no_grad():
        out = model(ids, px)
    assert [int(out.report.kept_counts[i][0]) for i in layers] == held == model.method.options.schedule(16)
    torch.testing.assert_close(out.logits[:, -1:], expected, **TOL)


def test_batch_with_left_padding_equals_each_sample(hf_deep: Path) -> None:
    model = loupe.from_pretrained(hf_deep, "sparsevlm", dtype=torch.float32, layers=[0, 2], keep=[9, 5])
    short, long = prompt_ids(6, 16, seed=5, image_at=1), prompt_ids(13, 16, seed=6)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    px = pixels(2, seed=7)
    with torch.no_grad():
        both = model(ids, px, mask)
        for i, row in enumerate((short, long)):
            alone = model(row, px[i:i + 1])
            torch.testing.assert_close(both.logits[i, -1], alone.logits[0, -1], **TOL)
            assert both.report.raters[i, -row.shape[1]:].tolist() == alone.report.raters[0].tolist()
    assert torch.isfinite(both.logits).all()


def test_cached_decoding_equals_teacher_forced_continuation(hf_deep: Path) -> None:
    """Decode steps attend to the pruned, renumbered cache: six cached steps give what one
    call with all six tokens after the same prefill gives."""
    model = loupe.from_pretrained(hf_deep, "sparsevlm", dtype=torch.float32, layers=[0, 2], keep=[9, 5])
    ids, px = prompt_ids(7, 16, seed=8), pixels(1, seed=9)
    out = generate(model, ids, px, sampling=SamplingConfig(max_new_tokens=6))
    cache = model.new_cache(1, ids.shape[1] + 6)
    with torch.no_grad():
        first = model(ids, px, cache=cache, last_only=True).logits[:, -1].argmax(-1)
        rest = model(out[:, :-1], cache=cache).logits.argmax(-1)  # (1, 5): teacher-forced
    assert [int(first)] + rest[0].tolist() == out[0].tolist()


def test_the_official_presets_scale_to_the_image(hf_deep: Path) -> None:
    from loupe.methods.sparsevlm import SparseVLMConfig
    assert SparseVLMConfig(retain=64).budgets(576) == [66, 30, 17]
    assert SparseVLMConfig(retain=192).schedule(576) == [300 + 9, 200 + 4, 110 + 3]  # kept + clusters (m // 10 + 1)
    assert SparseVLMConfig(ratios=[0.5, 0.25]).budgets(16) == [8, 4]
    model = loupe.from_pretrained(hf_deep, "sparsevlm", dtype=torch.float32)
    assert model.method.options.resolved_layers(model.cfg) == [0, 1, 2]  # 2, 6, 15 of 32, scaled to 4
    assert model.method.options.budgets(16) == [8, 6, 3]


def test_bad_options_are_named(hf_deep: Path) -> None:
    for options, match in (({"layers": [3]}, "names layer\\(s\\) \\[3\\] outside 0..2"),
                           ({"layers": [2, 1], "keep": [4, 2]}, "must be strictly increasing"),
                           ({"layers": [1], "keep": [4, 2]}, "one budget per pruning layer \\(1\\)"),
                           ({"layers": [1], "keep": [0]}, "keep=\\[0\\] must be"),
                           ({"layers": [1], "ratios": [1.5]}, "ratios=\\[1.5\\] must each be in \\(0, 1\\]"),
                           ({"retain": 100}, "retain=100: the official presets are \\[64, 128, 192\\]"),
                           ({"layers": [1], "keep": [4], "ratios": [0.5]}, "not both"),
                           ({"recycle_ratio": 0.0}, "recycle_ratio=0.0")):
        with pytest.raises(ConfigError, match=match):
            loupe.from_pretrained(hf_deep, "sparsevlm", **options)
    model = loupe.from_pretrained(hf_deep, "sparsevlm", dtype=torch.float32, layers=[1], keep=[17])
    with pytest.raises(ConfigError, match="keep=\\[17\\] asks for 17 tokens, more than the image's 16"):
        model(prompt_ids(5, 16, seed=1), pixels(1, seed=1))


def test_loupe_generate_runs_sparsevlm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image
    path = write_tiny_checkpoint(tmp_path / "tiny", cfg=tiny_config(layers=4))
    image = tmp_path / "odd.png"
    Image.new("RGB", (91, 47), (10, 200, 30)).save(image)
    assert main(["generate", "--model", str(path), "--method", "sparsevlm", "--image", str(image), "--prompt",
                 "What colour?", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    model = loupe.from_pretrained(path, "sparsevlm")
    tok = loupe.Tokenizer.from_folder(path, model.cfg.image_token_id)
    assert printed == answer(model, tok, image, "What colour?", SamplingConfig(4, stop_tokens=[tok.eos_id])) + "\n"
