"""Bad input, table-driven: each case breaks one thing in a working tiny checkpoint or command
line, runs the real command, and asserts exit status 2, a one-line message naming the
offending value, and no traceback. Then the same property fuzzed over config values.

The classes (docs/errors.md): config files, method options, weight files, generation inputs.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loupe
from loupe.cli import main
from loupe.errors import LoupeError
from loupe.tiny import write_tiny_checkpoint

Edit = Callable[[Path], None]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("good") / "m")


@pytest.fixture()
def hf(pristine: Path, tmp_path: Path) -> Path:
    """A Hugging Face-layout copy (config.json only, no loupe.json) to break."""
    folder = tmp_path / "m"
    shutil.copytree(pristine, folder)
    (folder / "loupe.json").unlink()
    return folder


def set_config(path: str, value: object) -> Edit:
    """Set `text_config.hidden_size`-style `path` in config.json."""
    def edit(folder: Path) -> None:
        d = json.loads((folder / "config.json").read_text())
        *parents, leaf = path.split(".")
        node = d
        for p in parents:
            node = node[p]
        node[leaf] = value
        (folder / "config.json").write_text(json.dumps(d))
    return edit


def write(name: str, text: str | bytes) -> Edit:
    def edit(folder: Path) -> None:
        (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return edit


def truncate(folder: Path) -> None:
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def random_bytes(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(random.Random(0).randbytes(4096))


def nan_weight(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(state) if k.endswith("q_proj.weight"))
    state[key][0, 0] = math.nan
    save_file(state, folder / "model.safetensors")


def split_overlapping(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    keys = sorted(state)
    save_file({k: state[k] for k in keys[: len(keys) // 2 + 1]}, folder / "a.safetensors")
    save_file({k: state[k] for k in keys[len(keys) // 2:]}, folder / "b.safetensors")
    (folder / "model.safetensors").unlink()


def index_outside(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    other = folder.parent / "other"
    other.mkdir()
    shutil.move(folder / "model.safetensors", other / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../other/model.safetensors" for k in state}}))


def wrong_shape(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(state) if k.endswith("q_proj.weight"))
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, folder / "model.safetensors")


CHECKPOINTS: list[tuple[str, Edit, str]] = [
    ("string size", set_config("text_config.hidden_size", "64"), r"text_config.hidden_size='64'.*expected an integer"),
    ("negative size", set_config("text_config.intermediate_size", -5), r"text_config.intermediate_size=-5.*at least 1"),
    ("zero heads", set_config("vision_config.num_attention_heads", 0), r"vision_config.num_heads=0.*at least 1"),
    ("fractional size", set_config("vision_config.hidden_size", 32.5), r"vision_config.hidden_size=32.5.*integer"),
    ("negative eps", set_config("text_config.rms_norm_eps", -1), r"text_config.rms_norm_eps=-1.*above 0"),
    ("NaN rope_theta", set_config("text_config.rope_theta", math.nan), r"text_config.rope_theta=nan.*finite"),
    ("string bool", set_config("multimodal_projector_bias", "false"), r"projector_bias='false'.*true or false"),
    ("config not JSON", write("config.json", "{oops"), r"config.json is not valid JSON"),
    ("config a list", write("config.json", "[]"), r"config.json must hold a JSON object, not list"),
    ("config not UTF-8", write("config.json", b"\xff\xfe{"), r"config.json is not valid JSON"),
    ("loupe.json invalid", write("loupe.json", '{"model": 3}'), r"loupe.json must hold \{\"model\""),
    ("loupe.json unknown field", write("loupe.json", '{"model": {"visoin": {}}, "method": {"name": "lowres"}}'),
     r"loupe.json: .*unknown field\(s\) \['visoin'\]"),
    ("truncated weights", truncate, r"model.safetensors is not a readable safetensors file"),
    ("random weights file", random_bytes, r"model.safetensors is not a readable safetensors file"),
    ("NaN weight", nan_weight, r"q_proj.weight holds 1 non-finite value"),
    ("wrong shape", wrong_shape, r"q_proj.weight has shape \(\d+, \d+\), but the config makes it"),
    ("overlapping files", split_overlapping, r"weight '.*' is in both a.safetensors and b.safetensors"),
    ("index without weight_map", write("model.safetensors.index.json", '{"metadata": {}}'),
     r"weight_map must be a non-empty object"),
    ("index leaving the folder", index_outside, r"names shard '../other/model.safetensors', which is not a file of"),
]


@pytest.mark.parametrize("case, edit, match", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_a_broken_checkpoint_is_one_clear_line(case: str, edit: Edit, match: str, hf: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    edit(hf)
    assert main(["info", "--model", str(hf)]) == 2, case
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert __import__("re").search(match, err), err


OPTIONS: list[tuple[list[str], str]] = [
    (["-o", "tiles=no"], r"tiles='no' in hd's options: expected true or false"),
    (["-o", "hr_size=abc"], r"hr_size='abc' in hd's options: expected an integer"),
    (["-o", "hr_size=-112"], r"hr_size=-112 must be larger than the encoder's native size 336"),
    (["-o", "hr_size=14"], r"hr_size=14 must be larger than the encoder's native size 336"),
    (["-o", "hr_sise=672"], r"option\(s\) \['hr_sise'\] belong to none of the methods \['hd'\]"),
    (["-o", "novalue"], r"option 'novalue' is not KEY=VALUE"),
]


@pytest.mark.parametrize("argv, match", OPTIONS, ids=[" ".join(a) for a, _ in OPTIONS])
def test_bad_method_options_are_named(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--preset", "llava-1.5-7b", "--method", "hd", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(match, err), err


def test_defaults_adapt_to_a_small_grid(capsys: pytest.CaptureFixture[str]) -> None:
    # FlexAttention's pool of 9 cannot fit the tiny preset's 4x4 grid: the default adapts, an explicit value is refused
    assert main(["flops", "--preset", "tiny", "--compare", "lowres", "hd", "flexattn"]) == 0
    capsys.readouterr()
    assert main(["flops", "--preset", "tiny", "--method", "flexattn", "-o", "pool=9"]) == 2
    assert "pool=9 must be in 1..4" in capsys.readouterr().err


def test_generation_inputs_are_checked(pristine: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "x.png")
    base = ["generate", "--model", str(pristine), "--image", str(tmp_path / "x.png"), "--prompt", "hi"]
    assert main([*base, "--temperature", "nan"]) == 2
    assert "temperature=nan in sampling: expected a finite number" in capsys.readouterr().err
    model = loupe.from_pretrained(pristine)
    ids = torch.tensor([[1, 5, 6, 0], [1, 5, 6, 7]])
    sampling = loupe.SamplingConfig(max_new_tokens=2)
    with pytest.raises(LoupeError, match=r"row\(s\) \[0\] end in padding \(right-padded\)"):
        loupe.generate(model, ids, None, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), sampling)
    with pytest.raises(LoupeError, match=r"row\(s\) \[1\] mask every position"):
        loupe.generate(model, ids, None, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), sampling)


# ---- fuzzing: "a clear error or a valid model, never a traceback or a non-finite output" --------
FIELDS = ["text_config.hidden_size", "text_config.num_attention_heads", "text_config.num_key_value_heads",
          "text_config.rms_norm_eps", "text_config.rope_theta", "text_config.vocab_size", "vision_config.patch_size",
          "vision_config.image_size", "vision_config.layer_norm_eps", "image_token_index", "vision_feature_layer",
          "multimodal_projector_bias", "text_config.max_position_embeddings"]
VALUES: list[object] = [0, -1, 1, 2, 7, 3.5, -0.0, 1e-300, 1e300, math.nan, math.inf, "8", "", None, True, [], [1],
                        {}, 10**12]


def test_fuzzed_config_values_give_an_error_or_a_working_model(pristine: Path, tmp_path: Path) -> None:
    rng = random.Random(1234)
    outcomes = {"error": 0, "ok": 0}
    for trial in range(60):
        folder = tmp_path / f"f{trial}"
        shutil.copytree(pristine, folder)
        (folder / "loupe.json").unlink()
        for _ in range(rng.randint(1, 2)):
            set_config(rng.choice(FIELDS), rng.choice(VALUES))(folder)
        try:
            model = loupe.from_pretrained(folder)
        except LoupeError as e:
            assert "\n" not in str(e) and str(e), e
            outcomes["error"] += 1
            continue
        # accepted: it must run and give finite logits (the load and the config agree)
        try:
            logits = model(torch.tensor([[1, 5, 6]])).logits
        except LoupeError:
            outcomes["error"] += 1
            continue
        assert torch.isfinite(logits).all(), f"trial {trial}: accepted, but the logits are not finite"
        outcomes["ok"] += 1
    print(outcomes)
    assert outcomes["error"] > 10 and outcomes["ok"] > 0  # the fuzzing reached the validation, and past it
