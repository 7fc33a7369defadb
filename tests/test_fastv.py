"""FastV: keep-everything is the base model, the ranking rows equal eager attention, the
pruned layers equal a per-sample reference written out by hand, batched = per sample, and
cached decoding equals a teacher-forced continuation under FastV's decode rule (pruning
decided once, at prefill)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids

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
    from conftest import save_hf_llava
    save_hf_llava(tmp_path / "deep", text_num_hidden_layers=4, text_num_key_value_heads=2)
    return tmp_path / "deep"


def test_keep_everything_is_the_base_model(hf_deep: Path) -> None:
    base = loupe.from_pretrained(hf_deep, "lowres", dtype=torch.float32)
    fastv = loupe.from_pretrained(hf_deep, "fastv", dtype=torch.float32, ratio=0.0)
    ids, px = prompt_ids(9, 16, seed=1), pixels(1, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(fastv(ids, px).logits, base(ids, px).logits, rtol=0, atol=0)
    assert int(fastv(ids, px).report.kept_counts[0]) == 16


@torch.no_grad()
def reference(model: loupe.VLM, ids: torch.Tensor, px: torch.Tensor, k: int, kept: int) -> tuple[torch.Tensor, ...]:
    """FastV for one sample, written out: layers < k over everything; layer k - 1's last-row
    attention (eager, mean over heads) ranks the image tokens; layers k.. run over the text
    and the top `kept` image tokens at their original positions."""
    cfg = model.cfg
    image = ids == cfg.image_token_id  # (1, T)
    x = model.packing.pack(model.decoder.embed_tokens(ids.masked_fill(image, 0)), image,
                           model.method.encode(model, px).sequence)
    t = ids.shape[1]
    rope = RopeSpec(cfg.text.head_dim, cfg.text.rope_theta, x.dtype)
    ones = torch.ones(1, t, dtype=torch.bool)
    full = TokenSet.build(torch.arange(t)[None], ones, ones, image, rope, "eager")
    layers = model.decoder.layers
    for layer in layers[: k - 1]:
        x = layer(x, full.ctx)
    last = layers[k - 1]
    q, kk, v = last.self_attn.qkv(last.input_layernorm(x), full.ctx.rope)
    _, probs = eager_attention(q, kk, v, full.ctx.mask, causal=full.ctx.causal)  # (1, H, T, T)
    scores = probs[:, :, -1].mean(1).masked_fill(~image, 0)  # (1, T)
    x = last(x, full.ctx)
    top = scores.masked_fill(~image, float("-inf")).topk(kept, dim=1).indices
    keep = ~image
    keep[0, top[0]] = True
    pos = torch.arange(t)[keep[0]][None]  # the kept rows' ORIGINAL positions
    x = x[:, keep[0]]
    n = pos.shape[1]
    pruned = TokenSet.build(pos, torch.ones(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool),
                            image[:, keep[0]], rope, "eager")
    for layer in layers[k:]:
        x = layer(x, pruned.ctx)
    return model.decoder.logits(x[:, -1:]), scores, keep


@pytest.mark.parametrize("k", [1, 2, 3])
def test_prefill_equals_the_written_out_reference(hf_deep: Path, k: int) -> None:
    model = loupe.from_pretrained(hf_deep, "fastv", dtype=torch.float32, k=k, ratio=0.5)
    ids, px = prompt_ids(9, 16, seed=3), pixels(1, seed=4)
    expected, scores, keep = reference(model, ids, px, k, kept=8)
    with torch.no_grad():
        out = model(ids, px)
    torch.testing.assert_close(out.report.scores, scores, **TOL)  # the explicit row = eager probabilities
    assert out.report.kept.tolist() == keep.tolist()
    torch.testing.assert_close(out.logits[:, -1:], expected, **TOL)


@pytest.mark.parametrize("rank_by", ["last", "mean"])
def test_batch_with_left_padding_equals_each_sample(hf_deep: Path, rank_by: str) -> None:
    model = loupe.from_pretrained(hf_deep, "fastv", dtype=torch.float32, keep=5, rank_by=rank_by)
    short, long = prompt_ids(4, 16, seed=5, image_at=1), prompt_ids(11, 16, seed=6)
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
            assert int(both.report.kept_counts[i]) == 5
    assert torch.isfinite(both.logits).all() and torch.isfinite(both.report.scores).all()


@pytest.mark.parametrize("rank_by", ["last", "mean"])
def test_cached_decoding_equals_teacher_forced_continuation(hf_deep: Path, rank_by: str) -> None:
    """Decode steps attend to the pruned cache from layer k on: six cached steps give what
    one call with all six tokens after the same prefill gives."""
    model = loupe.from_pretrained(hf_deep, "fastv", dtype=torch.float32, ratio=0.75, rank_by=rank_by)
    ids, px = prompt_ids(7, 16, seed=8), pixels(1, seed=9)
    out = generate(model, ids, px, sampling=SamplingConfig(max_new_tokens=6))
    cache = model.new_cache(1, ids.shape[1] + 6)
    with torch.no_grad():
        first = model(ids, px, cache=cache, last_only=True).logits[:, -1].argmax(-1)
        rest = model(out[:, :-1], cache=cache).logits.argmax(-1)  # (1, 5): teacher-forced
    assert [int(first)] + rest[0].tolist() == out[0].tolist()


def test_bad_options_are_named(hf_deep: Path) -> None:
    for options, match in (({"k": 0}, "k=0 must be in 1..3"), ({"k": 4}, "k=4 must be in 1..3"),
                           ({"ratio": 1.0}, "ratio=1.0 must be in \\[0, 1\\)"), ({"keep": 0}, "keep=0 must be"),
                           ({"rank_by": "first"}, "rank_by='first'")):
        with pytest.raises(ConfigError, match=match):
            loupe.from_pretrained(hf_deep, "fastv", **options)
    model = loupe.from_pretrained(hf_deep, "fastv", dtype=torch.float32, keep=17)
    with pytest.raises(ConfigError, match="keep=17 is more than the image's 16 tokens"):
        model(prompt_ids(5, 16, seed=1), pixels(1, seed=1))


def test_loupe_generate_runs_fastv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image
    path = write_tiny_checkpoint(tmp_path / "tiny", cfg=tiny_config(layers=4))  # k = 2 needs 3 layers or more
    image = tmp_path / "odd.png"
    Image.new("RGB", (91, 47), (10, 200, 30)).save(image)
    assert main(["generate", "--model", str(path), "--method", "fastv", "--image", str(image), "--prompt",
                 "What colour?", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    model = loupe.from_pretrained(path, "fastv")
    tok = loupe.Tokenizer.from_folder(path, model.cfg.image_token_id)
    expected = answer(model, tok, image, "What colour?", SamplingConfig(4, stop_tokens=[tok.eos_id]))
    assert printed == expected + "\n"
