"""Image packing: how a batch of image features becomes part of the token sequence.

Shape legend: B batch, T positions, I images, N tokens per image, W text width.

The packing is a part of the model family, chosen by `VLMConfig.image_packing`, not by
method code: a method produces features (`ImageInputs.sequence`), the packing places them.
LLaVA-1.5 splices each image's N tokens at its N `<image>` ids ("splice"); OneVision's
AnyRes grid with its newline tokens is another packing of the same interface.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch

from loupe.config import VLMConfig
from loupe.errors import ConfigError, LoupeError


class ImagePacking(Protocol):
    name: ClassVar[str]

    def pack(self, embeds: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings (B, T, W) with the image features placed at `image_mask` (B, T)."""
        ...


class Splice:
    """LLaVA-1.5: the I images' features (I, N, W), in order, at the <image> positions."""

    name: ClassVar[str] = "splice"

    def __init__(self, cfg: VLMConfig) -> None:
        self.image_token_id = cfg.image_token_id

    def pack(self, embeds: torch.Tensor, image_mask: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        n_slots = int(image_mask.sum())
        n_feats = 0 if features is None else features.shape[0] * features.shape[1]
        if n_slots != n_feats:
            n_img = 0 if features is None else features.shape[0]
            raise LoupeError(f"image tokens and image features disagree: input_ids hold {n_slots} image tokens "
                             f"(id {self.image_token_id}) but {n_img} image(s) give {n_feats} features")
        if features is None:
            return embeds
        flat = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)  # (I*N, W)
        return embeds.masked_scatter(image_mask[..., None], flat)


PACKINGS: dict[str, type[Splice]] = {Splice.name: Splice}


def build_packing(cfg: VLMConfig) -> ImagePacking:
    if cfg.image_packing not in PACKINGS:
        raise ConfigError(f"unsupported config value image_packing={cfg.image_packing!r}: Loupe supports "
                          f"{sorted(PACKINGS)}")
    return PACKINGS[cfg.image_packing](cfg)
