"""`loupe convert` for every HR method, and the released FlexAttention checkpoint layout."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pixels, prompt_ids
from PIL import Image
from safetensors.torch import save_file

import loupe
from loupe.cli import main
from loupe.release import from_flexattention_release
from loupe.tiny import write_tiny_checkpoint

OPTIONS = {"flexattn": ["-o", "pool=4", "-o", "threshold=40"], "hd": ["-o", "hr_size=84"], "xattn": [],
           "visor": ["-o", "hr_size=112", "-o", "ca_layers=[0]", "-o", "sa_layers=[1]"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("conv") / "tiny")


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_convert_then_generate_end_to_end(tiny: Path, tmp_path: Path, method: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / method
    assert main(["convert", str(tiny), str(dst), "--method", method, *OPTIONS[method]]) == 0
    meta = json.loads((dst / "loupe.json").read_text())
    assert meta["method"]["name"] == method
    restored = loupe.from_pretrained(dst)
    assert restored.method.name == method
    direct = loupe.from_pretrained(tiny, method, **{k: json.loads(v) for k, v in
                                                    (o.split("=") for o in OPTIONS[method][1::2])})
    size = restored.method.image_size()
    ids = torch.cat([torch.tensor([[1, 7]]), torch.full((1, restored.method.tokens_per_image()), 4),
                     torch.tensor([[9, 10]])], 1)
    px = pixels(1, seed=0, size=size)
    with torch.no_grad():
        torch.testing.assert_close(restored(ids, px).logits, direct(ids, px).logits, rtol=0, atol=0)
    image = tmp_path / "img.png"
    Image.new("RGB", (150, 90), (30, 60, 90)).save(image)
    capsys.readouterr()
    assert main(["generate", "--model", str(dst), "--image", str(image), "--prompt", "What?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("method", ["visor", "flexattn"])
def test_generate_compile_streams_what_eager_does(tiny: Path, tmp_path: Path, method: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`loupe generate --compile`: the same answer; a method without a static step says so once."""
    dst = tmp_path / method
    assert main(["convert", str(tiny), str(dst), "--method", method, *OPTIONS[method]]) == 0
    image = tmp_path / "img.png"
    Image.new("RGB", (150, 90), (30, 60, 90)).save(image)
    run = ["generate", "--model", str(dst), "--image", str(image), "--prompt", "What?", "--max-new-tokens", "5"]
    capsys.readouterr()
    assert main(run) == 0
    eager = capsys.readouterr().out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*run, "--compile"]) == 0
    assert capsys.readouterr().out == eager and eager.strip()
    said = [str(w.message) for w in caught if "decoding eagerly" in str(w.message)]
    assert len(said) == (method == "flexattn"), said


def write_release(model: loupe.VLM, llm: Path, clip: Path) -> None:
    """Write `model` the way the official FlexAttention release is laid out."""
    llm.mkdir()
    clip.mkdir()
    text, vision = {}, {}
    for name, t in model.state_dict().items():
        t = t.contiguous()
        if name.startswith("vision_tower.layers."):
            vision["vision_model.encoder.layers." + name[len("vision_tower.layers."):]] = t
        elif name.startswith("vision_tower."):
            vision["vision_model." + name[len("vision_tower."):]] = t
        elif name.startswith("projector.linear_1."):
            text["model.mm_projector.0." + name.split(".")[-1]] = t
        elif name.startswith("projector.linear_2."):
            text["model.mm_projector.2." + name.split(".")[-1]] = t
        elif name == "decoder.lm_head.weight":
            text["lm_head.weight"] = t
        elif name.startswith("decoder."):
            text["model." + name[len("decoder."):]] = t
        elif name.startswith("method.layers."):
            _, _, layer, proj, leaf = name.split(".")
            text[f"model.layers.{layer}.self_attn.{proj}_hd.{leaf}"] = t
    for layer in range(model.method.first):  # the release carries unused HR projections in early layers
        text[f"model.layers.{layer}.self_attn.k_proj_hd.weight"] = torch.zeros(2, 2)
    text["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    vision["text_model.embeddings.token_embedding.weight"] = torch.zeros(3, 2)
    vision["logit_scale"] = torch.zeros(())
    save_file(text, llm / "model.safetensors")
    save_file(vision, clip / "model.safetensors")
    t, v = model.cfg.text, model.cfg.vision
    (llm / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
        "hidden_act": "silu", "mm_hidden_size": v.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    (clip / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {
        "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
        "hidden_act": "quick_gelu"}}))


def test_release_layout_gives_the_same_logits(hf_tiny, tmp_path: Path) -> None:
    _, path = hf_tiny
    converted = tmp_path / "converted"
    # The released layout is the official path: raw HR features, no norm on Z.
    assert main(["convert", str(path), str(converted), "--method", "flexattn", "-o", "pool=4", "-o",
                 "hr_norm=none"]) == 0
    model = loupe.from_pretrained(converted)
    with torch.no_grad():  # distinct HR projections, so a mix-up of k_proj_hd / v_proj_hd would show
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    write_release(model, tmp_path / "llm", tmp_path / "clip")
    release = from_flexattention_release(tmp_path / "llm", tmp_path / "clip", pool=4)
    n = model.method.tokens_per_image()
    ids = torch.cat([prompt_ids(6, 0, seed=1)[:, :2], torch.full((1, n), model.cfg.image_token_id),
                     prompt_ids(6, 0, seed=1)[:, 2:]], 1)
    release_ids = ids.masked_fill(ids == model.cfg.image_token_id, release.cfg.image_token_id)
    px = pixels(1, seed=2, size=model.method.image_size())
    with torch.no_grad():
        torch.testing.assert_close(release(release_ids, px).logits, model(ids, px).logits, rtol=0, atol=0)
    assert release.method.name == "flexattn" and release.cfg.image_token_id == release.cfg.text.vocab_size


def test_convert_bad_option_is_one_clear_line(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tiny), str(tmp_path / "x"), "--method", "flexattn", "-o", "threshold=999",
                 "-o", "pool=4"]) == 2
    assert "threshold=999 must be in 0..255" in capsys.readouterr().err
    assert main(["convert", str(tiny), str(tmp_path / "y"), "--method", "hd", "-o", "nosuch=1"]) == 2
    assert "has no option(s) ['nosuch']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_generate_overlay_draws_where_flexattention_looked(tiny: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "flex"
    assert main(["convert", str(tiny), str(dst), "--method", "flexattn", *OPTIONS["flexattn"]]) == 0
    image = tmp_path / "img.png"
    Image.new("RGB", (150, 90), (30, 60, 90)).save(image)
    missing = tmp_path / "no" / "such" / "folder" / "look.png"
    assert main(["generate", "--model", str(dst), "--image", str(image), "--prompt", "What?", "--overlay",
                 str(missing)]) == 2
    assert f"its folder {missing.parent} does not exist" in capsys.readouterr().err
    out = tmp_path / "look.png"
    assert main(["generate", "--model", str(dst), "--image", str(image), "--prompt", "What?", "--max-new-tokens",
                 "3", "--overlay", str(out)]) == 0
    assert "where it looked" in capsys.readouterr().out
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)  # (H, W, 3)
    cyan = (drawn[..., 1] - drawn[..., 0] > 60) & (drawn[..., 2] - drawn[..., 0] > 60)
    assert cyan.sum() > 100  # the selected HR tokens are drawn over the image
