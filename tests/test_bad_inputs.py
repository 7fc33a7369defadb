"""Bad input, table-driven: each case breaks one thing in a working tiny checkpoint or command
line, runs the real command, and asserts exit status 2, a one-line message naming the
offending value, and no traceback. Then the same property fuzzed over config values.

The classes (docs/errors.md): config files, method options, weight files, generation inputs.
"""

from __future__ import annotations

import json
import math
import random
import re
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
    ("config a list", write("config.json", "[]"), r"config.json must hold a JSON object of model settings, not list"),
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
    assert re.search(match, err), err


OPTIONS: list[tuple[list[str], str]] = [
    (["-o", "tiles=no"], r"tiles='no' in hd's options: expected true or false"),
    (["-o", "hr_size=abc"], r"hr_size='abc' in hd's options: expected an integer"),
    (["-o", "hr_size=-112"], r"hr_size=-112 must be larger than the encoder's native size 336"),
    (["-o", "hr_size=14"], r"hr_size=14 must be larger than the encoder's native size 336"),
    (["-o", "hr_sise=672"], r"option\(s\) \['hr_sise'\] belong to none of the methods \['hd'\]"),
    (["-o", "novalue"], r"option 'novalue' is not KEY=VALUE"),
    (["--hr-tiles", "0"], r"hr_tiles=0.0 must be in \(0, 1\]: the fraction of HR tiles encoded"),
    (["--hr-tiles", "1.5"], r"hr_tiles=1.5 must be in \(0, 1\]"),
]


@pytest.mark.parametrize("argv, match", OPTIONS, ids=[" ".join(a) for a, _ in OPTIONS])
def test_bad_method_options_are_named(argv: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--preset", "llava-1.5-7b", "--method", "hd", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


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


# ---- images ----------------------------------------------------------------------------------
def test_images_of_every_mode_convert_as_they_should(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image
    from transformers.image_utils import load_image as hf_load_image

    from loupe.images import load_image

    rgba = Image.new("RGBA", (8, 6), (200, 100, 50, 128))
    for im in (rgba, rgba.convert("CMYK"), rgba.convert("P"), rgba.convert("LA"), Image.new("1", (5, 5), 1)):
        im.save(tmp_path / f"x.{im.mode}.{'tiff' if im.mode == 'CMYK' else 'png'}")
    for path in sorted(tmp_path.glob("x.*")):  # transformers' own behaviour for 8-bit modes
        assert np.array_equal(np.asarray(load_image(path)), np.asarray(hf_load_image(str(path)).convert("RGB"))), path
    # EXIF orientation 6 (turn 90 degrees clockwise), applied as transformers' load_image applies it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), "red").save(tmp_path / "rot.jpg", exif=exif)
    ours = load_image(tmp_path / "rot.jpg")
    assert ours.size == (20, 40) == hf_load_image(str(tmp_path / "rot.jpg")).size
    # 16-bit grey: rescaled, not clipped to white
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    got = np.asarray(load_image(tmp_path / "g16.png"))[..., 0].astype(int)
    assert abs(got - np.round(ramp / 257)).max() <= 1 and got.max() == 255 and got.min() == 0
    # 0..1 floats (TIFF): scaled by 255, not black
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "f.tiff")
    assert np.asarray(load_image(tmp_path / "f.tiff")).mean() == pytest.approx(127.5, abs=1)


def test_bad_images_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    import loupe.images as I

    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(LoupeError, match=r"cannot read image .*junk.png"):
        I.load_image(tmp_path / "junk.png")
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(I, "MAX_PIXELS", 10_000)  # the check reads the header: no need for a 20000^2 file
    with pytest.raises(LoupeError, match=r"big.png is 300x200 = 0M pixels, above Loupe's limit"):
        I.load_image(tmp_path / "big.png")


# ---- runs and files --------------------------------------------------------------------------
def test_convert_onto_itself_keeps_the_tokenizer(pristine: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(pristine, folder)
    assert main(["convert", str(folder), str(folder), "--method", "hd", "-o", "hr_size=112", "--overwrite"]) == 0
    assert (folder / "tokenizer.json").read_bytes() == (pristine / "tokenizer.json").read_bytes()
    assert json.loads((folder / "loupe.json").read_text())["method"]["name"] == "hd"
    assert not list(tmp_path.glob(".m.*"))  # no temporary folder left behind


def test_a_failed_replacement_leaves_the_old_checkpoint(pristine: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import loupe.checkpoints as C

    folder = tmp_path / "m"
    shutil.copytree(pristine, folder)
    before = sorted(p.name for p in folder.iterdir())

    def full_disk(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C, "save_file", full_disk)
    assert main(["convert", str(pristine), str(folder), "--method", "hd", "-o", "hr_size=112", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "No space left on device" in err and "untouched" in err, err
    assert sorted(p.name for p in folder.iterdir()) == before  # the old one, whole
    assert not list(tmp_path.glob(".m.*"))


def test_swapping_a_folder_never_leaves_neither(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import loupe.files as F

    old, new = tmp_path / "out", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "a").write_text("old"), (new / "a").write_text("new")
    real = os.replace

    def fails_on_the_new(src, dst):  # type: ignore[no-untyped-def]
        if Path(src) == new:
            raise OSError(5, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(F.os, "replace", fails_on_the_new)
    with pytest.raises(OSError):
        F.swap_in(new, old)
    assert (old / "a").read_text() == "old"  # put back
    monkeypatch.setattr(F.os, "replace", real)
    F.swap_in(new, old)
    assert (old / "a").read_text() == "new" and not list(tmp_path.glob(".out.*"))


def test_stale_temporary_folders_are_cleaned(pristine: Path, tmp_path: Path) -> None:
    import os
    import time

    stale, live = tmp_path / ".m.abc123", tmp_path / ".m.def456"
    stale.mkdir(), live.mkdir()
    os.utime(stale, (time.time() - 3 * 24 * 3600,) * 2)
    from loupe.files import folder_atomic

    with folder_atomic(tmp_path / "m") as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists() and live.exists()  # a younger one may be another writer's


def test_output_paths_are_checked_before_the_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "res").mkdir()
    assert main(["bench", "--preset", "tiny", "--methods", "lowres", "--out", str(tmp_path / "res")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--native", "4096"]) == 2
    assert "--native 4096 must be a multiple of 8 in 16..512" in capsys.readouterr().err


def test_a_closed_pipe_is_silent(pristine: Path) -> None:
    import subprocess
    import sys

    cmd = f"{sys.executable} -m loupe info --model {pristine} | head -c 1"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_non_finite_training_settings_are_refused() -> None:
    from loupe.train import TrainConfig

    for bad, match in ((dict(lr=math.inf), r"lr=inf in the training config: expected a finite number"),
                       (dict(grad_clip=math.nan), r"grad_clip=nan"), (dict(steps="10"), r"steps='10'")):
        with pytest.raises(LoupeError, match=match):
            TrainConfig(**bad)  # type: ignore[arg-type]


def test_an_interrupted_runs_folder_is_not_silently_reused(tmp_path: Path) -> None:
    from loupe.distributed import World
    from loupe.runs import RunSpec
    from loupe.train import _prepare_folder

    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 3, "loss": 2.0}\n')  # killed before its first checkpoint
    spec = RunSpec(model="m", method=None)
    with pytest.raises(LoupeError, match=r"already holds a training run \(train_log.jsonl\); pass --resume"):
        _prepare_folder(run, spec, World.from_env("cpu"), resume=False, overwrite=False)
    _prepare_folder(run, spec, World.from_env("cpu"), resume=False, overwrite=True)
    assert not (run / "train_log.jsonl").exists() and (run / "run.json").exists()


def test_bad_dataset_rows_labels_and_prompts_are_named(pristine: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess
    import sys

    from loupe.data.llava import read_llava

    for row, match in (({"conversations": ["hi", "there"]}, r"row 0 of .*: turn 0 must be \{\"from\""),
                       ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
                        r"turn 0 must be"),
                       ({"image": 5, "conversations": [{"from": "human", "value": "<image> q"},
                                                       {"from": "gpt", "value": "a"}]}, r"must be a file path")):
        (tmp_path / "d.json").write_text(json.dumps([row]))
        with pytest.raises(LoupeError, match=match):
            read_llava(tmp_path / "d.json")
    (tmp_path / "d.json").write_bytes(b"\xff\xfe[")
    with pytest.raises(LoupeError, match=r"d.json is not valid JSON"):
        read_llava(tmp_path / "d.json")
    # undecodable prompt bytes on the command line
    proc = subprocess.run([sys.executable, "-m", "loupe", "generate", "--model", str(pristine), "--image", "x.png",
                           "--prompt", b"caf\xe9"], capture_output=True, timeout=120)
    assert proc.returncode == 2 and b"is not valid UTF-8 text" in proc.stderr and b"Traceback" not in proc.stderr


def test_devices_are_checked_before_any_work(pristine: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(pristine), "--device", "gpu0"]) == 2
    assert "--device 'gpu0' is not a device" in capsys.readouterr().err
    with pytest.raises(LoupeError, match=r"is not a device"):
        loupe.from_pretrained(pristine, device="cuda:banana")
    if not torch.cuda.is_available():
        assert main(["info", "--model", str(pristine), "--device", "cuda"]) == 2
        assert "this machine has no CUDA device" in capsys.readouterr().err


def test_fuzzed_method_options_give_an_error_or_a_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """Every method's options, set to random values through `loupe flops -o` (LLaVA-1.5-7B and
    OneVision-0.5B shapes): exit 0 with finite costs, or exit 2 with one line; never a traceback."""
    import dataclasses

    from loupe.methods import METHODS, method_options

    rng = random.Random(7)
    values = ["0", "-1", "1", "3", "0.5", "2.5", "nan", "inf", "true", "no", "abc", "[]", "[0,2]", "[[1]]", "null",
              "1e9", '"max"', "router", "min"]
    outcomes = {0: 0, 2: 0}
    for _ in range(300):
        name = rng.choice(sorted(METHODS))
        fields = [f.name for f in dataclasses.fields(type(method_options(name)))]
        if not fields:
            continue
        opts = [f"{rng.choice(fields)}={rng.choice(values)}" for _ in range(rng.randint(1, 2))]
        preset = rng.choice(["llava-1.5-7b", "llava-ov-0.5b"])
        argv = ["flops", "--preset", preset, "--method", name, "--json"] + [a for o in opts for a in ("-o", o)]
        code = main(argv)
        out, err = capsys.readouterr()
        assert code in (0, 2), (argv, code, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and err.startswith("loupe: error: "), (argv, err)
        else:
            report = json.loads(out)
            costs = [report[k] for k in ("total", "prefill", "decode_per_token")] + list(report["parts"].values())
            assert all(math.isfinite(c) and c >= 0 for c in costs), (argv, out[:300])
        outcomes[code] += 1
    assert outcomes[0] > 5 and outcomes[2] > 20, outcomes
