"""The production loader on every key layout found in the wild, sharded files, dtype
choice at load, and the errors a bad checkpoint folder gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import pixels, prompt_ids, save_hf_llava
from safetensors.torch import load_file, save_file

import loupe
from loupe.checkpoints import hf_to_loupe, loupe_to_hf, to_published
from loupe.errors import CheckpointError, ConfigError

# Published llava-hf files and transformers >= 4.52 in memory, written from the same weights.
PUBLISHED = [  # what transformers 5 writes -> llava-hf/llava-1.5-7b-hf layout
    (r"vision_tower.", "vision_tower.vision_model."),
]
NEW = [  # -> `model.language_model.layers.N`, `model.vision_tower`, `lm_head`
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


def relayout(src: Path, dst: Path, rules: list[tuple[str, str]]) -> Path:
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    renamed = {}
    for key, tensor in state.items():
        for old, new in rules:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = tensor
    save_file(renamed, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def logits(model: loupe.VLM) -> torch.Tensor:
    with torch.no_grad():
        return model(prompt_ids(6, 16, seed=0), pixels(1, seed=0)).logits


@pytest.mark.parametrize("layout", ["published", "new"])
def test_both_key_layouts_load_to_the_same_model(hf_tiny, tmp_path: Path, layout: str) -> None:
    hf, path = hf_tiny
    rules = {"published": PUBLISHED, "new": NEW}[layout]
    other = relayout(path, tmp_path / layout, rules)
    keys = load_file(other / "model.safetensors").keys()
    marker = {"published": "language_model.model.layers.0.self_attn.q_proj.weight",
              "new": "model.language_model.layers.0.self_attn.q_proj.weight"}[layout]
    assert marker in keys
    torch.testing.assert_close(logits(loupe.from_pretrained(other)), logits(loupe.from_pretrained(path)),
                               rtol=0, atol=0)


def test_key_map_round_trips() -> None:
    names = ["decoder.layers.3.self_attn.q_proj.weight", "decoder.lm_head.weight", "decoder.norm.weight",
             "vision_tower.layers.0.mlp.fc1.bias", "vision_tower.embeddings.class_embedding",
             "projector.linear_2.weight", "method.layers.0.k_proj.weight"]
    for name in names:
        assert hf_to_loupe(loupe_to_hf(name)) == name
    assert to_published("model.language_model.norm.weight") == "language_model.model.norm.weight"
    assert hf_to_loupe("vision_tower.vision_model.post_layernorm.weight") is None


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    model = loupe.from_pretrained(_tiny(tmp_path))
    loupe.save_pretrained(model, tmp_path / "sharded", shard_bytes=50_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(logits(loupe.from_pretrained(tmp_path / "sharded")), logits(model), rtol=0, atol=0)


def test_dtype_and_device_chosen_at_load(hf_tiny) -> None:
    _, path = hf_tiny
    model = loupe.from_pretrained(path, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    out = logits(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bf16_checkpoint_loads_without_an_fp32_copy(tmp_path: Path) -> None:
    """Peak resident memory while loading a ~190 MB bf16 checkpoint stays well under the
    ~380 MB an fp32 copy would add (measured in a fresh process)."""
    folder = tmp_path / "bf16"
    cfg = loupe.VLMConfig(
        vision=loupe.VisionConfig(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                                  image_size=28, patch_size=14),
        text=loupe.TextConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                              num_heads=8, num_kv_heads=8),
        image_token_id=31999)
    with torch.device("meta"):
        model = loupe.VLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    loupe.save_pretrained(model, folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    del model
    script = textwrap.dedent(f"""
        import resource, torch, loupe
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        m = loupe.from_pretrained({str(folder)!r})
        assert {{p.dtype for p in m.parameters()}} == {{torch.bfloat16}}
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               check=True).stdout.strip())
    assert size > 150e6
    assert grown < 1.5 * size, f"loading grew resident memory by {grown / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


def test_pickled_checkpoint_is_refused_unopened(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match=r"pickled weights \(pytorch_model.bin.*never unpickles"):
        loupe.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="pickled checkpoint"):
        loupe.from_pretrained(folder / "pytorch_model.bin")


def test_missing_and_unexpected_keys_are_listed(hf_tiny, tmp_path: Path) -> None:
    _, path = hf_tiny
    state = load_file(path / "model.safetensors")
    layer_keys = sorted(k for k in state if ".layers.1." in k and k.startswith("language_model"))
    short = {k: v for k, v in state.items() if k not in layer_keys}
    (tmp_path / "short").mkdir()
    save_file(short, tmp_path / "short" / "model.safetensors")
    (tmp_path / "short" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=rf"lacks {len(layer_keys)} weight\(s\).*layers\.1\..*in all"):
        loupe.from_pretrained(tmp_path / "short")

    extra = dict(state, **{f"language_model.model.layers.9.extra.{i}": torch.zeros(1) for i in range(12)})
    (tmp_path / "extra").mkdir()
    save_file(extra, tmp_path / "extra" / "model.safetensors")
    (tmp_path / "extra" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"12 weight\(s\) the model does not use: .*\(12 in all\)"):
        loupe.from_pretrained(tmp_path / "extra")


@pytest.mark.parametrize(("field", "value", "match"), [
    ("text_config.hidden_act", "gelu", "text_config.hidden_act='gelu'"),
    ("text_config.rope_scaling", {"rope_type": "linear", "factor": 2.0}, "rope_type='linear'"),
    ("vision_feature_select_strategy", "cls", "vision_feature_select_strategy='cls'"),
    ("vision_config.model_type", "dinov2", "vision_config.model_type='dinov2'"),
    ("vision_config.model_type", "siglip_vision_model", "SigLIP has none"),  # its strategy must be "full"
])
def test_unsupported_config_value_is_named(hf_tiny, tmp_path: Path, field: str, value: object, match: str) -> None:
    _, path = hf_tiny
    cfg = json.loads((path / "config.json").read_text())
    node = cfg
    *parents, leaf = field.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    folder = tmp_path / "bad"
    folder.mkdir()
    os.symlink(path / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match.replace("[", r"\[")):
        loupe.from_pretrained(folder)


def test_fp16_on_cpu_warns_and_suggests_bf16(hf_tiny) -> None:
    _, path = hf_tiny
    with pytest.warns(UserWarning, match="bfloat16"):
        loupe.from_pretrained(path, dtype=torch.float16)


def test_save_refuses_to_clobber_and_is_atomic(tmp_path: Path) -> None:
    model = loupe.from_pretrained(_tiny(tmp_path))
    target = tmp_path / "saved"
    loupe.save_pretrained(model, target)
    with pytest.raises(CheckpointError, match="already exists"):
        loupe.save_pretrained(model, target)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved.")]  # no temp folder left behind


def _tiny(tmp_path: Path) -> Path:
    save_hf_llava(tmp_path / "base")
    return tmp_path / "base"
