"""Bad input reaches the user as one clear error naming the offending value; the CLI
turns it into a message and exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids
from PIL import Image

import loupe
from loupe.cli import main
from loupe.generation import SamplingConfig, generate, top_p_filter
from loupe.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny")


def test_missing_and_unreadable_image_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(loupe.LoupeError, match=r"image file not found: .*nope\.png"):
        loupe.load_image(tmp_path / "nope.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(loupe.LoupeError, match=r"cannot read image .*broken\.png"):
        loupe.load_image(broken)


def test_image_token_count_mismatch_gives_both_numbers(hf_tiny) -> None:
    _, path = hf_tiny
    model = loupe.from_pretrained(path)
    with pytest.raises(loupe.LoupeError, match=r"hold 15 image tokens .* 1 image\(s\) give 16 features"):
        model(prompt_ids(4, 15, seed=0), pixels(1, seed=0))
    with pytest.raises(loupe.LoupeError, match=r"hold 16 image tokens .* 0 image\(s\) give 0 features"):
        model(prompt_ids(4, 16, seed=0))


def test_prompt_longer_than_max_positions(hf_tiny) -> None:
    _, path = hf_tiny
    model = loupe.from_pretrained(path)  # max_position_embeddings = 256
    with pytest.raises(loupe.LoupeError, match=r"position 259, beyond the model's maximum of 256"):
        model(prompt_ids(244, 16, seed=0), pixels(1, seed=0))
    with pytest.raises(loupe.LoupeError, match=r"250 tokens \+ 10 new tokens exceeds .* 256 positions"):
        generate(model, prompt_ids(234, 16, seed=0), pixels(1, seed=0), sampling=SamplingConfig(10))


def test_bad_pixels_and_ids(hf_tiny) -> None:
    _, path = hf_tiny
    model = loupe.from_pretrained(path)
    with pytest.raises(loupe.LoupeError, match=r"pixel_values of shape \(1, 3, 50, 50\)"):
        model(prompt_ids(4, 16, seed=0), torch.zeros(1, 3, 50, 50))
    nan = pixels(1, seed=0)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(loupe.LoupeError, match="NaN"):
        model(prompt_ids(4, 16, seed=0), nan)
    with pytest.raises(loupe.LoupeError, match="token id 500 is outside the vocabulary"):
        model(torch.tensor([[1, 500]]))


def test_sampling_options_are_checked() -> None:
    for bad, match in [(dict(max_new_tokens=0), "max_new_tokens=0"), (dict(top_p=1.5), "top_p=1.5"),
                       (dict(temperature=-1.0), "temperature=-1.0")]:
        with pytest.raises(loupe.LoupeError, match=match):
            SamplingConfig(**bad)


def test_top_p_keeps_the_nucleus_and_never_nothing() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    torch.testing.assert_close(top_p_filter(probs, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(probs, 0.01), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_seeded_sampling_is_reproducible_and_stops(hf_tiny) -> None:
    _, path = hf_tiny
    model = loupe.from_pretrained(path)
    ids, px = prompt_ids(5, 16, seed=1), pixels(1, seed=1)
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=3)
    first, second = generate(model, ids, px, sampling=cfg), generate(model, ids, px, sampling=cfg)
    assert first.tolist() == second.tolist()
    stop = int(first[0, 2])
    stopped = generate(model, ids, px, sampling=SamplingConfig(10, 1.5, 0.9, [stop], seed=3))
    assert stopped[0].tolist() == first[0, :first[0].tolist().index(stop) + 1].tolist()


def test_generation_never_emits_the_image_placeholder(hf_tiny) -> None:
    """A model that prefers the <image> id (inside the vocabulary, as in LLaVA-1.5-hf) still
    generates text: the placeholder would make the next step an image without features."""
    _, path = hf_tiny
    model = loupe.from_pretrained(path)
    image_id = model.cfg.image_token_id
    plain = model.decoder.logits

    def prefers_image(h: torch.Tensor) -> torch.Tensor:
        return plain(h).index_add(-1, torch.tensor([image_id]), torch.full((*h.shape[:-1], 1), 1e4))

    model.decoder.logits = prefers_image  # the test model only: every step's argmax is the placeholder
    ids, px = prompt_ids(5, 16, seed=2), pixels(1, seed=2)
    assert int(model(ids, px).logits[0, -1].argmax()) == image_id
    out = generate(model, ids, px, sampling=SamplingConfig(max_new_tokens=4))
    assert out.shape == (1, 4) and image_id not in out[0].tolist()


def test_cli_help_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "loupe.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("generate", "info", "demo"):
        assert command in out.stdout


def test_cli_generate_and_info(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "odd.png"
    Image.new("RGB", (91, 47), (10, 200, 30)).save(image)
    assert main(["generate", "--model", str(tiny), "--image", str(image), "--prompt", "What colour?",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["info", "--model", str(tiny), "--json"]) == 0
    info = capsys.readouterr().out
    assert '"method": {\n    "name": "lowres"' in info and '"total"' in info


def test_cli_bad_input_is_one_line_and_exit_2(tiny: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tiny), "--image", str(tmp_path / "missing.jpg"),
                 "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loupe: error: image file not found") and "missing.jpg" in err
    assert "Traceback" not in err
    assert main(["info", "--model", str(tmp_path / "no-such-model")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--max-new-tokens", "4"]) == 0
    assert "generated 4 tokens" in capsys.readouterr().out
