"""Grounding supervision (`loupe.grounding`): which rows are watched, that watching changes
nothing the model computes, that the reported attention is the eager reference's, and that
the loss teaches the answer row to look at the box."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loupe
from loupe.data.batches import collate, tokenize
from loupe.data.llava import Example
from loupe.grounding import answer_rows, box_targets, grounding_loss, turn_boxes
from loupe.methods import Watch
from loupe.nn.attention import eager_attention
from loupe.reproduce import dataset_tokenizer
from loupe.tiny import init_random_, synth_tiny_config
from loupe.train import InMemory, PixelImages, TrainConfig, train

BOX = [0.75, 0.75, 0.875, 0.875]  # exactly token (6, 6) of the 8 x 8 grid


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[loupe.Tokenizer, loupe.VLM, list[Example], Path]:
    root = tmp_path_factory.mktemp("g")
    image = root / "noise.png"
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()).save(image)
    examples = [
        Example("a", image, [("<image>\nWhere is the red circle?", "top-left"), ("How many?", "two")],
                {"turns": [{"tag_box": BOX}, {}]}),
        Example("b", image, [("<image>\nWhat pattern is on the blue square?", "stripes")], {"tag_box": BOX}),
    ]
    tok = dataset_tokenizer(examples, root / "tok")
    torch.manual_seed(0)
    model = init_random_(loupe.VLM(synth_tiny_config(tok.inner.get_vocab_size())), std=0.1)
    assert isinstance(model, loupe.VLM)
    return tok, model, examples, image


def test_turn_boxes_and_answer_rows() -> None:
    assert turn_boxes({"turns": [{"tag_box": BOX}, {}, {"tag_box": [0, 0, 1, 1]}]}, 3) == [BOX, None, [0, 0, 1, 1]]
    assert turn_boxes({"tag_box": BOX}, 1) == [BOX] and turn_boxes({}, 2) == [None, None]
    for bad in ([0.5, 0.5, 0.4, 0.6], [0, 0, 1], [0, 0, 1.5, 1], "top"):  # a clear error, not torch's
        with pytest.raises(loupe.LoupeError, match=r"tag_box=.*left < right"):
            turn_boxes({"tag_box": bad}, 1)
    assert answer_rows([False, False, True, True, False, True]) == [1, 4]
    target = box_targets(torch.tensor([[BOX, [0.0, 0.0, 0.25, 0.125]]]), 8)  # (1, 2, 64)
    assert target[0, 0, 6 * 8 + 6] == 1 and target.sum(-1).allclose(torch.ones(1, 2))
    assert target[0, 1, :2].tolist() == [0.5, 0.5]


def test_grounded_rows_predict_each_grounded_turns_first_answer_token(setup: tuple) -> None:
    tok, model, examples, _ = setup
    samples, _ = tokenize(examples, tok, model)
    assert [len(s.grounds) for s in samples] == [1, 1]  # the count turn carries no box
    batch = collate(samples, tok.pad_id)  # the shorter row is left-padded
    assert batch.ground_valid is not None and batch.ground_rows is not None and batch.ground_boxes is not None
    for b, answer in enumerate(["top-left", "stripes"]):
        row = int(batch.ground_rows[b, 0])
        assert batch.loss_rows[b, row] and not batch.loss_rows[b, row - 1]  # the answer's first row
        first = tok.decode([int(batch.targets[b, row])]).strip()
        assert first and answer.startswith(first)
    assert batch.ground_boxes[:, 0].tolist() == [BOX, BOX] and batch.grounded_rows == 2


def test_watching_changes_nothing_and_reports_the_eager_attention(setup: tuple) -> None:
    tok, model, examples, image = setup
    batch = collate(tokenize(examples, tok, model)[0], tok.pad_id)
    pixels = model.prepare_images([loupe.load_image(image)] * 2).pixel_values
    assert batch.ground_rows is not None and batch.ground_valid is not None
    with torch.no_grad():
        plain = model(batch.input_ids, pixels, batch.attention_mask)
        watched = model(batch.input_ids, pixels, batch.attention_mask,
                        watch=Watch(batch.ground_rows, batch.ground_valid, (1, 3)))
        torch.testing.assert_close(watched.logits, plain.logits)
        assert sorted(watched.report.watched) == [1, 3]
    reference = _eager_row_attention(model, batch, pixels, 1)  # (B, H, 1, N): the eager kernel's probabilities
    torch.testing.assert_close(watched.report.watched[1], reference, rtol=1e-4, atol=1e-6)


def _eager_row_attention(model: loupe.VLM, batch: object, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """Run the model on the eager kernel, capturing layer `layer`'s probabilities of the rows."""
    captured: dict[str, torch.Tensor] = {}
    attn = model.decoder.layers[layer].self_attn

    def hook(mod: torch.nn.Module, args: tuple, _out: torch.Tensor) -> None:
        x, ctx = args[0], args[1]
        q, k, v = mod.qkv(x, ctx.rope)
        captured["p"] = eager_attention(q, k, v, ctx.mask, causal=ctx.causal)[1]  # (B, H, T, T)

    handle = attn.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.set_kernel("eager")
            model(batch.input_ids, pixels, batch.attention_mask)  # type: ignore[attr-defined]
    finally:
        model.set_kernel("sdpa")
        handle.remove()
    p = captured["p"]
    rows, image = batch.ground_rows, batch.input_ids == model.cfg.image_token_id  # type: ignore[attr-defined]
    cols = image.nonzero()[:, 1].view(image.shape[0], -1)  # (B, N)
    p = p.gather(2, rows[:, None, :, None].expand(-1, p.shape[1], -1, p.shape[3]))  # (B, H, R, T)
    return p.gather(3, cols[:, None, None].expand(-1, p.shape[1], p.shape[2], -1))  # (B, H, R, N)


def test_grounding_loss_moves_the_answer_rows_attention_onto_the_box(setup: tuple, tmp_path: Path) -> None:
    tok, base, examples, image = setup
    samples, paths = tokenize(examples, tok, base)
    data = InMemory(samples, PixelImages(paths, 64, progress=False), tok.pad_id)
    batch = collate(samples, tok.pad_id)
    pixels = base.prepare_images([loupe.load_image(image)] * 2).pixel_values

    def mass_on_box(model: loupe.VLM) -> float:
        assert batch.ground_rows is not None and batch.ground_valid is not None
        with torch.no_grad():
            out = model(batch.input_ids, pixels, batch.attention_mask,
                        watch=Watch(batch.ground_rows, batch.ground_valid, (2,)))
        p = out.report.watched[2].sum(1)  # (B, R, N)
        return float((p / p.sum(-1, keepdim=True))[..., 6 * 8 + 6].mean())

    masses = {}
    for weight in (0.0, 1.0):
        model = init_random_(loupe.VLM(base.cfg), std=0.1)
        model.load_state_dict(base.state_dict())
        cfg = TrainConfig(steps=25, batch_size=2, lr=3e-3, warmup=2, train=("projector", "decoder"), log_every=25,
                          grounding=weight, grounding_layers=(1, 2))
        log = train(model, data, cfg, progress=False)
        assert ("grounding" in log[-1]) == (weight > 0)
        masses[weight] = mass_on_box(model)
    uniform = 1 / 64
    assert masses[1.0] > 0.5 and masses[0.0] < 5 * uniform, masses


def test_grounding_refuses_bad_settings(setup: tuple) -> None:
    tok, model, examples, _ = setup
    with pytest.raises(loupe.LoupeError, match="grounding_layers"):
        TrainConfig(grounding=1.0)
    with pytest.raises(loupe.LoupeError, match="grounding=-1"):
        TrainConfig(grounding=-1.0, grounding_layers=(1,))
    samples, paths = tokenize(examples, tok, model)
    with pytest.raises(loupe.LoupeError, match=r"grounding_layers \[7\]: the decoder has layers 0..3"):
        train(model, InMemory(samples, PixelImages(paths, 64, progress=False), tok.pad_id),
              TrainConfig(steps=1, batch_size=2, grounding=1.0, grounding_layers=(1, 7)), progress=False)
    with pytest.raises(loupe.LoupeError, match="reported no attention"):
        grounding_loss({1: torch.ones(1, 4, 1, 64)}, (1, 2), torch.tensor([[BOX]]), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(loupe.LoupeError, match="square grid of image tokens.*640"):
        grounding_loss({1: torch.ones(1, 4, 1, 640)}, (1,), torch.tensor([[BOX]]), torch.ones(1, 1, dtype=torch.bool))
