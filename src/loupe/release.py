"""The released FlexAttention checkpoint (`senfu/llava-v1.5-7b-flexattn`) layout.

It is an original-LLaVA checkpoint: `model.layers.N...`, `model.embed_tokens`,
`model.norm`, `model.mm_projector.{0,2}`, `lm_head`, plus `k_proj_hd` / `v_proj_hd` per
layer, with a LLaVA-repo `config.json` (`mm_*` fields), and the CLIP vision tower in a
separate Hugging Face CLIP folder (`vision_model.*` keys; a full CLIPModel folder's text
tower is skipped). Original LLaVA marks images with id -200 in input_ids and has no
`<image>` token in its vocabulary: Loupe uses id = vocab_size (outside the embedding
table, never looked up) as the image token of such a model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from loupe.checkpoints import assemble, hf_to_loupe, iter_tensors, safetensors_files
from loupe.config import VLMConfig, _text_from_hf, _vision_from_hf
from loupe.errors import CheckpointError, ConfigError
from loupe.methods import method_options
from loupe.vlm import VLM

# Official FlexAttention keys -> Loupe names. Applied in order; the first match wins.
OFFICIAL_RULES: list[tuple[str, str]] = [
    (r"^model\.layers\.(\d+)\.self_attn\.k_proj_hd\.", r"method.layers.\1.k_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.v_proj_hd\.", r"method.layers.\1.v_proj."),
    (r"^model\.mm_projector\.0\.", "projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "projector.linear_2."),
    (r"^model\.vision_tower\.", ""),  # some LLaVA exports embed the tower; the CLIP folder is the source
    (r"^model\.", "decoder."),
    (r"^lm_head\.", "decoder.lm_head."),
]
CLIP_SKIPPED = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale)")


def official_to_loupe(key: str, first_layer: int) -> str | None:
    for pattern, replacement in OFFICIAL_RULES:
        if re.match(pattern, key):
            name = re.sub(pattern, replacement, key)
            if not name or name.endswith("rotary_emb.inv_freq"):
                return None
            layer = re.match(r"method\.layers\.(\d+)\.", name)
            # HR projections of layers before the first FlexAttention layer are never used
            # by the method (the official code only reads them from that layer on).
            return None if layer and int(layer.group(1)) < first_layer else name
    return "?" + key


def clip_to_loupe(key: str) -> str | None:
    return None if CLIP_SKIPPED.match(key) else hf_to_loupe("vision_tower." + key)


def release_config(llm: dict, clip: dict) -> VLMConfig:
    projector = llm.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConfigError(f"unsupported config value mm_projector_type={projector!r}: Loupe supports mlp2x_gelu")
    select = llm.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"unsupported config value mm_vision_select_feature={select!r}: patch or cls_patch")
    text = _text_from_hf({**llm, "model_type": "llama"})
    return VLMConfig(vision=_vision_from_hf(clip.get("vision_config", clip) | {"model_type": "clip_vision_model"}),
                     text=text, image_token_id=text.vocab_size,
                     feature_layer=int(llm.get("mm_vision_select_layer", -2)),
                     feature_strategy="default" if select == "patch" else "full")


def from_flexattention_release(llm_dir: str | os.PathLike[str], clip_dir: str | os.PathLike[str], *,
                               dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                               **options: object) -> VLM:
    """Load the released FlexAttention checkpoint (LLM folder + CLIP folder) as a `flexattn` model."""
    llm, clip = Path(llm_dir), Path(clip_dir)
    device = torch.device(device)
    configs = []
    for folder in (llm, clip):
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder} has no config.json")
        configs.append(json.loads((folder / "config.json").read_text()))
    cfg = release_config(*configs)
    method = method_options("flexattn", **{"hr_norm": "none", **options})  # trained on raw HR features
    first = method.resolved_first_layer(cfg)  # type: ignore[attr-defined]

    def named() -> Iterator[tuple[str | None, torch.Tensor]]:
        for key, tensor in iter_tensors(safetensors_files(llm), device):
            yield official_to_loupe(key, first), tensor
        for key, tensor in iter_tensors(safetensors_files(clip), device):
            yield clip_to_loupe(key), tensor

    return assemble(cfg, method, named(), dtype=dtype, device=device, source=f"{llm} + {clip}", new_method=False)
