"""HiRED on LLaVA-1.5: the tokens equal the official selection on transformers' eager CLIP
attention, rate 1 is the base model, batched = per sample, cached = teacher-forced, and
bad budgets are named (the AnyRes form is tested in test_onevision.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids, save_hf_llava

import loupe
from loupe.cli import main
from loupe.errors import ConfigError
from loupe.generation import SamplingConfig, answer, generate
from loupe.tiny import write_tiny_checkpoint

TOL = dict(rtol=1e-4, atol=1e-5)
transformers = pytest.importorskip("transformers")


@pytest.fixture
def hf_path(tmp_path: Path) -> Path:
    save_hf_llava(tmp_path / "hf", text_num_hidden_layers=3)
    return tmp_path / "hf"


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.75])
@torch.no_grad()
def test_tokens_equal_the_official_selection_on_transformers_attention(hf_path: Path, rate: float) -> None:
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(hf_path, attn_implementation="eager").eval()
    model = loupe.from_pretrained(hf_path, "hired", dtype=torch.float32, rate=rate)
    px = pixels(3, seed=1)
    out = hf.model.vision_tower(px, output_hidden_states=True, output_attentions=True)
    k = int(16 * rate)  # the official budget arithmetic
    ours = model.method.encode(model, px).sequence
    assert ours.shape[:2] == (3, k)
    for i in range(3):
        cls = out.attentions[-2][i, :, 0, 1:].sum(0)  # the class row over the patches, summed over heads
        mask = torch.zeros(16, dtype=torch.bool)
        mask[cls.topk(k).indices] = True
        expected = hf.model.multi_modal_projector(out.hidden_states[-2][i, 1:][mask])
        torch.testing.assert_close(ours[i], expected, **TOL)


def test_rate_one_is_the_base_model(hf_path: Path) -> None:
    base = loupe.from_pretrained(hf_path, "lowres", dtype=torch.float32)
    everything = loupe.from_pretrained(hf_path, "hired", dtype=torch.float32, rate=1.0)
    ids, px = prompt_ids(9, 16, seed=3), pixels(1, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(everything(ids, px).logits, base(ids, px).logits, rtol=0, atol=0)


def test_batched_equals_each_sample_and_cached_equals_recomputed(hf_path: Path) -> None:
    model = loupe.from_pretrained(hf_path, "hired", dtype=torch.float32, keep=5)
    short, long = prompt_ids(4, 5, seed=5, image_at=1), prompt_ids(11, 5, seed=6)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    px = pixels(2, seed=7)
    with torch.no_grad():
        both = model(ids, px, mask).logits
        for i, row in enumerate((short, long)):
            torch.testing.assert_close(both[i, -1], model(row, px[i:i + 1]).logits[0, -1], **TOL)
    out = generate(model, long, px[1:], sampling=SamplingConfig(max_new_tokens=5))
    with torch.no_grad():
        full = model(torch.cat([long, out[:, :-1]], 1), px[1:]).logits[0, long.shape[1] - 1:].argmax(-1)
    assert full.tolist() == out[0].tolist()


def test_bad_options_are_named(hf_path: Path) -> None:
    for options, match in (({"rate": 0.0}, "rate=0.0 must be in \\(0, 1\\]"), ({"rate": 1.2}, "rate=1.2"),
                           ({"alpha": -0.1}, "alpha=-0.1 must be in \\[0, 1\\]"), ({"keep": 0}, "keep=0 must be"),
                           ({"keep": 17}, "keep=17 is more than the image's 16 tokens"),
                           ({"signal": "cls"}, "signal='cls'"), ({"partition": "grid"}, "partition='grid'")):
        with pytest.raises(ConfigError, match=match):
            loupe.from_pretrained(hf_path, "hired", **options).method.tokens_per_image()


def test_loupe_generate_runs_hired(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image
    path = write_tiny_checkpoint(tmp_path / "tiny")
    image = tmp_path / "odd.png"
    Image.new("RGB", (91, 47), (10, 200, 30)).save(image)
    assert main(["generate", "--model", str(path), "--method", "hired", "-o", "rate=0.5", "--image", str(image),
                 "--prompt", "What colour?", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    model = loupe.from_pretrained(path, "hired", rate=0.5)
    tok = loupe.Tokenizer.from_folder(path, model.cfg.image_token_id)
    assert printed == answer(model, tok, image, "What colour?", SamplingConfig(4, stop_tokens=[tok.eos_id])) + "\n"
