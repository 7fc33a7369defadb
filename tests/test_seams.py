"""The decoder's seams, each against an explicit reference: a token set that shrinks between
layers (per sample, in a padded batch, with the KV cache and positions following), score
rows (explicit probabilities of a few rows while the bulk runs fused), the fused-sublayer
wrapper, and the decoder config's q/k/v bias (Qwen2) against transformers."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids, save_hf_llava

import loupe
from loupe.generation import SamplingConfig, generate
from loupe.nn.attention import eager_attention
from loupe.nn.decoder import AttnContext, Rows
from loupe.nn.fusion import FusedLayer
from loupe.nn.rope import Rope
from loupe.nn.tokens import TokenSet
from loupe.vlm import VLM


# ---- a whole method on the token-set seam: the worked example of docs/architecture.md ---------
def worked_example() -> types.ModuleType:
    """The method file shown in docs/architecture.md, run as a module, so the page cannot drift
    from working code."""
    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    block = text.split("<!-- worked-example:start -->")[1].split("<!-- worked-example:end -->")[0]
    code = block.strip().removeprefix("```python").removesuffix("```")
    module = types.ModuleType("loupe_worked_example")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(code, "docs/architecture.md", "exec"), module.__dict__)
    return module


EXAMPLE = worked_example()
EveryOther, EveryOtherConfig = EXAMPLE.EveryOther, EXAMPLE.EveryOtherConfig


@pytest.fixture(scope="module")
def base_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seams") / "base"
    save_hf_llava(path, text_num_hidden_layers=3, text_num_key_value_heads=2)
    return path


def every_other(base_path: Path, **options: object) -> VLM:
    model = loupe.from_pretrained(base_path, dtype=torch.float32)
    model.method = EveryOther(model.cfg, EveryOtherConfig(**options))  # type: ignore[arg-type]
    return model


def reference(model: VLM, ids: torch.Tensor, px: torch.Tensor, after: int, renumber: bool) -> torch.Tensor:
    """Logits (T', V) of the kept rows of one unpadded sample, written without the seam: the
    first layers over every row, then the dropped rows cut out of the sequence."""
    dec, cfg = model.decoder, model.cfg
    image = ids[0] == cfg.image_token_id
    x = dec.embed_tokens(ids.masked_fill(ids == cfg.image_token_id, 0))
    x[0, image] = model.image_features(px)[0]
    positions = torch.arange(ids.shape[1])[None]

    def run(x: torch.Tensor, positions: torch.Tensor, layers: range) -> torch.Tensor:
        rope = Rope.at(positions, cfg.text.head_dim, cfg.text.rope_theta, x.dtype)
        for i in layers:
            x = dec.layers[i](x, AttnContext(rope, None, True, "eager"))
        return x

    x = run(x, positions, range(after))
    rank = image.long().cumsum(0) - 1
    kept = ~image | (rank % 2 == 0)
    x, positions = x[:, kept], positions[:, kept]
    if renumber:
        positions = torch.arange(x.shape[1])[None]
    return dec.logits(run(x, positions, range(after, cfg.text.num_layers)))[0]


def batch(lengths: tuple[int, ...], n_image: int = 16) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Left-padded prompts of different lengths (each with one image) and the unpadded ones."""
    prompts = [prompt_ids(n, n_image, seed=n, image_at=min(1 + n % 3, n - 1))[0] for n in lengths]  # text last
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, t - len(p):], mask[row, t - len(p):] = p, 1
    return ids, mask, prompts


@pytest.mark.parametrize("renumber", [False, True])
@torch.no_grad()
def test_shrinking_token_set_matches_the_explicit_reference(base_path: Path, renumber: bool) -> None:
    model = every_other(base_path, after=1, renumber=renumber)
    ids, mask, prompts = batch((7, 3, 5))
    px = pixels(3, seed=1)
    out = model(ids, px, mask).logits  # (B, T, V)
    for row, p in enumerate(prompts):
        image = p == model.cfg.image_token_id
        kept = ~image | ((image.long().cumsum(0) - 1) % 2 == 0)
        expected = reference(model, p[None], px[row:row + 1], after=1, renumber=renumber)
        got = out[row, ids.shape[1] - len(p):][kept]  # the sample's kept rows, in order
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("renumber", [False, True])
@torch.no_grad()
def test_shrinking_token_set_cached_generation_equals_recomputation(base_path: Path, renumber: bool) -> None:
    model = every_other(base_path, after=2, renumber=renumber)
    ids, mask, _ = batch((6, 2))
    px = pixels(2, seed=2)
    cached = generate(model, ids, px, mask, sampling=SamplingConfig(max_new_tokens=6))
    recomputed = []
    for _ in range(6):  # the whole sequence again each step: the prompt's image tokens shrink again
        tok = model(ids, px, mask).logits[:, -1].argmax(-1, keepdim=True)
        recomputed.append(tok)
        ids, mask = torch.cat([ids, tok], 1), torch.cat([mask, torch.ones_like(tok)], 1)
    assert torch.equal(cached, torch.cat(recomputed, 1))


@torch.no_grad()
def test_keeping_every_token_is_the_base_model_exactly(base_path: Path) -> None:
    base = loupe.from_pretrained(base_path, dtype=torch.float32)
    model = every_other(base_path, after=1, keep_all=True)
    ids, mask, _ = batch((5, 2))
    px = pixels(2, seed=3)
    torch.testing.assert_close(model(ids, px, mask).logits, base(ids, px, mask).logits, rtol=0, atol=0)
    sampling = SamplingConfig(max_new_tokens=4)
    assert torch.equal(generate(model, ids, px, mask, sampling=sampling),
                       generate(base, ids, px, mask, sampling=sampling))


def test_a_token_set_keeps_each_samples_last_row(base_path: Path) -> None:
    model = every_other(base_path)
    ids, mask, _ = batch((4,))
    tokens = TokenSet.build(torch.arange(ids.shape[1])[None], mask.bool(), mask.bool(),
                            ids == model.cfg.image_token_id, model_rope(model), "sdpa")
    keep = torch.ones_like(mask, dtype=torch.bool)
    keep[0, -1] = False
    with pytest.raises(loupe.LoupeError, match="keep each sample's last row"):
        tokens.shrink(torch.zeros(1, ids.shape[1], 8), keep, layer=1, renumber=False, cache=None)


def model_rope(model: VLM):
    from loupe.nn.tokens import RopeSpec
    return RopeSpec(model.cfg.text.head_dim, model.cfg.text.rope_theta, torch.float32)


# ---- score rows and the fused sublayer ----------------------------------------------------------
@torch.no_grad()
def test_score_rows_equal_the_eager_probabilities_and_change_no_output(base_path: Path) -> None:
    model = loupe.from_pretrained(base_path, dtype=torch.float32)
    layer, t = model.decoder.layers[1], 12
    x = torch.randn(2, t, model.cfg.text.hidden_size, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    tokens = TokenSet.build(positions, valid, valid, torch.zeros_like(valid), model_rope(model), "sdpa")
    rows = Rows(torch.tensor([[t - 1, 4], [t - 1, 7]]), torch.ones(2, 2, dtype=torch.bool),
                columns=torch.tensor([[0, 2, 5], [3, 4, 6]]))
    out, probs = layer.forward_rows(x, tokens.ctx, None, rows)
    torch.testing.assert_close(out, layer(x, tokens.ctx), rtol=0, atol=0)  # the bulk: the fused layer itself
    q, k, _ = layer.self_attn.qkv(layer.input_layernorm(x), tokens.ctx.rope)
    _, eager = eager_attention(q, k, k, tokens.ctx.mask)  # (B, H, T, T) the full map, explicitly
    for b in range(2):
        expected = eager[b][:, rows.index[b]][:, :, rows.columns[b]]  # (H, R, C)
        torch.testing.assert_close(probs[b], expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_fused_layer_adds_its_sublayer_and_owns_no_keys(base_path: Path) -> None:
    model = loupe.from_pretrained(base_path, dtype=torch.float32)
    layer = model.decoder.layers[0]
    x = torch.randn(1, 5, model.cfg.text.hidden_size, generator=torch.Generator().manual_seed(1))
    ctx = AttnContext(Rope.at(torch.arange(5)[None], model.cfg.text.head_dim, 10000.0, x.dtype), None, True)
    zero = FusedLayer(layer, torch.zeros_like, "attention")
    torch.testing.assert_close(zero(x, ctx), layer(x, ctx), rtol=0, atol=0)
    shift = torch.full_like(x, 0.25)
    before = FusedLayer(layer, lambda h: shift, "input")
    torch.testing.assert_close(before(x, ctx), layer(x + shift, ctx), rtol=0, atol=0)
    after = FusedLayer(layer, lambda h: shift, "attention")
    torch.testing.assert_close(after(x, ctx), layer.feed_forward(layer.attention_residual(x, ctx) + shift),
                               rtol=0, atol=0)
    xattn = loupe.from_pretrained(base_path, "xattn", dtype=torch.float32, hr_size=112)
    base_keys = set(model.state_dict())
    assert base_keys <= set(xattn.state_dict())  # every pretrained key unchanged
    assert all(k.startswith("method.cross.") for k in set(xattn.state_dict()) - base_keys)


# ---- the decoder config: q/k/v bias and tied embeddings (Qwen2) ---------------------------------
@torch.no_grad()
def test_qwen2_decoder_matches_transformers(tmp_path: Path) -> None:
    """A LLaVA with a Qwen2 decoder (q/k/v bias, no o bias, RoPE theta from the config, tied
    embeddings) through the production loader, against transformers."""
    transformers = pytest.importorskip("transformers")
    from conftest import IMAGE_SIZE, IMAGE_TOKEN, VOCAB
    text = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                                    rope_theta=1e6, tie_word_embeddings=True, initializer_range=0.2)
    vision = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=14)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                   image_seq_length=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    for name, p in hf.named_parameters():
        if name.endswith("bias") and "language_model" in name:
            p.normal_(0, 0.5)  # make the q/k/v biases matter
    hf.save_pretrained(tmp_path / "qwen2-llava")
    ours = loupe.from_pretrained(tmp_path / "qwen2-llava", dtype=torch.float32)
    assert ours.cfg.text.qkv_bias and not ours.cfg.text.attention_bias and ours.cfg.text.rope_theta == 1e6
    assert ours.decoder.layers[0].self_attn.q_proj.bias is not None
    assert ours.decoder.layers[0].self_attn.o_proj.bias is None
    assert ours.decoder.lm_head.weight is ours.decoder.embed_tokens.weight
    ids, px = prompt_ids(9, 16, seed=4), pixels(1, seed=4)
    expected = hf(input_ids=ids, pixel_values=px).logits
    torch.testing.assert_close(ours(ids, px).logits, expected, rtol=1e-4, atol=1e-4)
