"""VisionZip on LLaVA-1.5: the class-row probe equals transformers' eager CLIP attention,
the tokens equal the official algorithm written out on transformers' own hidden states,
keep-everything is the base model, batched = per sample, cached = teacher-forced, and bad
budgets are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids, save_hf_llava

import loupe
from loupe.cli import main
from loupe.errors import ConfigError
from loupe.generation import SamplingConfig, answer, generate
from loupe.methods.reduction import probe_crops
from loupe.nn.vit import feature_layer_index
from loupe.tiny import write_tiny_checkpoint

TOL = dict(rtol=1e-4, atol=1e-5)
transformers = pytest.importorskip("transformers")


@pytest.fixture
def hf_path(tmp_path: Path) -> Path:
    save_hf_llava(tmp_path / "hf", text_num_hidden_layers=3)
    return tmp_path / "hf"


@torch.no_grad()
def official(hidden: torch.Tensor, attn: torch.Tensor, metric: torch.Tensor, dominant: int,
             contextual: int) -> torch.Tensor:
    """The official VisionZip step, written out for one image: hidden (1, 1+N, E) and attn
    (1, H, 1+N, 1+N) of the feature layer, metric (1, 1+N, D) its head-mean keys."""
    e, d = hidden.shape[-1], metric.shape[-1]
    top = attn[:, :, 0, 1:].sum(1).topk(dominant - 1, dim=1).indices + 1
    keep = torch.cat([torch.zeros(1, 1, dtype=torch.long), top], dim=1)
    rest = torch.ones(hidden.shape[:2], dtype=torch.bool).scatter_(1, keep, False)  # (1, 1+N)
    dominant_tokens = hidden.masked_select(~rest[..., None]).view(1, dominant, e)
    filtered = hidden.masked_select(rest[..., None]).view(1, -1, e)
    m = metric[rest].view(1, -1, d)
    m = m / m.norm(dim=-1, keepdim=True)
    r = m.shape[1]
    target = torch.arange(0, r, max(1, r // contextual))[:contextual]
    other = ~torch.isin(torch.arange(r), target)
    similarity = torch.bmm(m[:, other], m[:, target].transpose(1, 2))
    one_hot = torch.zeros(1, int(other.sum()), contextual).scatter_(2, similarity.argmax(2)[..., None], 1.0)
    counts = one_hot.sum(1).clamp(min=1)[..., None]
    merged = filtered[:, target] + torch.bmm(one_hot.transpose(1, 2), filtered[:, other]) / counts
    return torch.cat([dominant_tokens, merged], dim=1)


def hf_eager(path: Path) -> transformers.LlavaForConditionalGeneration:
    return transformers.LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


@torch.no_grad()
def test_probe_equals_transformers_eager_attention(hf_path: Path) -> None:
    hf = hf_eager(hf_path)
    model = loupe.from_pretrained(hf_path, "visionzip", dtype=torch.float32, dominant=6, contextual=3)
    px = pixels(2, seed=1)
    out = hf.model.vision_tower(px, output_hidden_states=True, output_attentions=True)
    layer = feature_layer_index(model.cfg)  # layer -2's attention, as the official code reads it
    crops = probe_crops(model, px, (layer,), "class")
    torch.testing.assert_close(crops.feats, out.hidden_states[-2], **TOL)
    torch.testing.assert_close(crops.probes[layer].attention, out.attentions[-2][:, :, 0], **TOL)
    hf_layer = hf.model.vision_tower.encoder.layers[layer]
    keys = hf_layer.self_attn.k_proj(hf_layer.layer_norm1(out.hidden_states[-3]))
    heads = model.cfg.vision.num_heads
    torch.testing.assert_close(crops.probes[layer].keys, keys.view(2, 17, heads, -1).mean(2), **TOL)


@pytest.mark.parametrize("dominant, contextual", [(6, 3), (9, 2), (1, 4), (12, 1)])
@torch.no_grad()
def test_tokens_equal_the_official_algorithm_on_transformers_states(hf_path: Path, dominant: int,
                                                                     contextual: int) -> None:
    hf = hf_eager(hf_path)
    model = loupe.from_pretrained(hf_path, "visionzip", dtype=torch.float32, dominant=dominant, contextual=contextual)
    px = pixels(3, seed=2)
    out = hf.model.vision_tower(px, output_hidden_states=True, output_attentions=True)
    hf_layer = hf.model.vision_tower.encoder.layers[-2]
    keys = hf_layer.self_attn.k_proj(hf_layer.layer_norm1(out.hidden_states[-3]))
    metric = keys.view(3, 17, model.cfg.vision.num_heads, -1).mean(2)
    ours = model.method.encode(model, px).sequence
    assert ours.shape == (3, dominant + contextual, model.cfg.text.hidden_size)
    for i in range(3):
        expected = official(out.hidden_states[-2][i:i + 1], out.attentions[-2][i:i + 1], metric[i:i + 1],
                            dominant, contextual)
        torch.testing.assert_close(ours[i:i + 1], hf.model.multi_modal_projector(expected), **TOL)


def test_keep_everything_is_the_base_model(hf_path: Path) -> None:
    base = loupe.from_pretrained(hf_path, "lowres", dtype=torch.float32)
    zip_all = loupe.from_pretrained(hf_path, "visionzip", dtype=torch.float32, keep_class=False, dominant=16,
                                    contextual=0)
    by_ratio = loupe.from_pretrained(hf_path, "visionzip", dtype=torch.float32, keep_class=False, ratio=1.0,
                                     contextual=0)
    ids, px = prompt_ids(9, 16, seed=3), pixels(1, seed=4)
    with torch.no_grad():
        expected = base(ids, px).logits
        torch.testing.assert_close(zip_all(ids, px).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(by_ratio(ids, px).logits, expected, rtol=0, atol=0)


def test_ratio_gives_the_budget_split_like_the_counts(hf_path: Path) -> None:
    model = loupe.from_pretrained(hf_path, "visionzip", dtype=torch.float32, ratio=0.5)  # 8 of 16, 54:10
    assert model.method.options.budget(model.cfg) == (1, 6, 1)
    assert model.method.tokens_per_image() == 8
    assert loupe.methods.method_label(model.method.options, model.cfg) == "visionzip [7+1]"


def test_batch_with_left_padding_equals_each_sample(hf_path: Path) -> None:
    model = loupe.from_pretrained(hf_path, "visionzip", dtype=torch.float32, dominant=5, contextual=2)
    short, long = prompt_ids(4, 7, seed=5, image_at=1), prompt_ids(11, 7, seed=6)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    px = pixels(2, seed=7)
    with torch.no_grad():
        both = model(ids, px, mask).logits
        for i, row in enumerate((short, long)):
            torch.testing.assert_close(both[i, -1], model(row, px[i:i + 1]).logits[0, -1], **TOL)


def test_cached_decoding_equals_teacher_forced_continuation(hf_path: Path) -> None:
    model = loupe.from_pretrained(hf_path, "visionzip", dtype=torch.float32, dominant=4, contextual=2)
    ids, px = prompt_ids(7, 6, seed=8), pixels(1, seed=9)
    out = generate(model, ids, px, sampling=SamplingConfig(max_new_tokens=5))
    with torch.no_grad():
        full = model(torch.cat([ids, out[:, :-1]], 1), px).logits[0, ids.shape[1] - 1:].argmax(-1)
    assert full.tolist() == out[0].tolist()


def test_bad_options_are_named(hf_path: Path) -> None:
    for options, match in (({"dominant": 0, "contextual": 3}, "dominant=0 counts the class token"),
                           ({"dominant": 15, "contextual": 3}, "keeps 18 tokens per crop, more than the crop's 17"),
                           ({"dominant": 0, "contextual": 0}, "keeps no token"),
                           ({"dominant": -1}, "dominant=-1 must be"),
                           ({"ratio": 0.0}, "ratio=0.0 must be in \\(0, 1\\]"),
                           ({"ratio": 1.5}, "ratio=1.5 must be in"),
                           ({"signal": "max"}, "signal='max'")):
        with pytest.raises(ConfigError, match=match):
            loupe.from_pretrained(hf_path, "visionzip", **options)
    model = loupe.from_pretrained(hf_path, "visionzip", dtype=torch.float32, dominant=4, contextual=2)
    with pytest.raises(loupe.LoupeError, match="6"):  # the prompt carries the lowres count, not VisionZip's
        model(prompt_ids(5, 16, seed=1), pixels(1, seed=1))


def test_loupe_generate_runs_visionzip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image
    path = write_tiny_checkpoint(tmp_path / "tiny")
    image = tmp_path / "odd.png"
    Image.new("RGB", (91, 47), (10, 200, 30)).save(image)
    assert main(["generate", "--model", str(path), "--method", "visionzip", "-o", "dominant=4", "-o", "contextual=2",
                 "--image", str(image), "--prompt",
                 "What colour?", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    model = loupe.from_pretrained(path, "visionzip", dominant=4, contextual=2)
    tok = loupe.Tokenizer.from_folder(path, model.cfg.image_token_id)
    assert printed == answer(model, tok, image, "What colour?", SamplingConfig(4, stop_tokens=[tok.eos_id])) + "\n"
