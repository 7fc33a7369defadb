"""Image packing: how a batch of image features becomes part of the token sequence.

Shape legend: B batch, T positions, I images, N tokens per image, W text width.

The packing is a part of the model family, chosen by `VLMConfig.image_packing`, not by
method code: a method produces features (`ImageInputs.sequence`), the packing places them.
LLaVA-1.5 splices each image's N tokens at its N `<image>` ids ("splice"). OneVision's
AnyRes ("anyres") splices the same way, but its images differ in length (the sequence is
a list of (N_i, W)), and it owns the learned `image_newline` that closes every row of an
image's tile grid (`loupe.anyres`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from PIL import Image
from torch import nn

from loupe.anyres import AnyResProcessor, grid_tokens, token_count, with_newlines
from loupe.config import VLMConfig
from loupe.errors import ConfigError, LoupeError
from loupe.images import ImageProcessor

if TYPE_CHECKING:
    from loupe.methods import Method

Sequence = torch.Tensor | list[torch.Tensor]  # (I, N, W), or per image (N_i, W)


@dataclass
class PreparedImages:
    """Pictures made ready for a model and method: what `VLM.forward` takes, and how many
    <image> ids each needs in the prompt."""

    pixel_values: torch.Tensor  # (I, 3, S, S) for LLaVA-1.5; (I, P, 3, s, s) AnyRes tiles for OneVision
    image_sizes: torch.Tensor  # (I, 2) original (height, width)
    tokens: list[int]  # <image> ids per image


class Splice(nn.Module):
    """LLaVA-1.5: the I images' features, in order, at the <image> positions."""

    name: ClassVar[str] = "splice"

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_token_id = cfg.image_token_id

    def prepare(self, images: list[Image.Image], method: Method) -> PreparedImages:
        """LLaVA-1.5's preprocessing at the method's image size (pad to square, resize, crop)."""
        processor = ImageProcessor(size=method.image_size(), mean=self.cfg.image_mean, std=self.cfg.image_std)
        sizes = torch.tensor([[im.height, im.width] for im in images])
        return PreparedImages(processor.batch(images), sizes, [method.tokens_per_image()] * len(images))

    def image_tokens(self, path: Path, method: Method) -> int:
        """<image> ids the image file at `path` takes (LLaVA-1.5: the same for every image)."""
        return method.tokens_per_image()

    def pack(self, embeds: torch.Tensor, image_mask: torch.Tensor, features: Sequence | None) -> torch.Tensor:
        """Text embeddings (B, T, W) with the image features placed at `image_mask` (B, T)."""
        images = [] if features is None else list(features)
        n_slots, n_feats = int(image_mask.sum()), sum(f.shape[0] for f in images)
        if n_slots != n_feats:
            each = sorted({f.shape[0] for f in images})
            raise LoupeError(f"image tokens and image features disagree: input_ids hold {n_slots} image tokens "
                             f"(id {self.image_token_id}) but {len(images)} image(s) give {n_feats} features "
                             f"({'/'.join(map(str, each)) or 0} per image)")
        if not images:
            return embeds
        flat = torch.cat(images).to(embeds.dtype)  # (sum N_i, W)
        return embeds.masked_scatter(image_mask[..., None], flat)


class AnyResPacking(Splice):
    """LLaVA-OneVision: splice per-image sequences of different lengths; `image_newline` (W,)
    is the token `loupe.anyres.with_newlines` puts after every grid row."""

    name: ClassVar[str] = "anyres"

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__(cfg)
        self.image_newline = nn.Parameter(torch.empty(cfg.text.hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.image_newline, std=1 / math.sqrt(self.cfg.text.hidden_size))  # transformers' init

    def arrange(self, overview: torch.Tensor, tiles: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """One image's OneVision sequence (N_i, W): the overview's tokens (g*g, W), then its
        stitched grid from the tile features (P, g*g, W) (overview first) with a newline after
        every row."""
        grid, _ = grid_tokens(tiles, self.cfg, height, width)  # (H, L, W)
        return torch.cat([overview, with_newlines(grid, self.image_newline)])

    def image_tokens(self, path: Path, method: Method) -> int:
        """OneVision's count depends on the image's size: read from the file's header only."""
        try:
            with Image.open(path) as im:
                width, height = im.size
                if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees: `to_rgb` turns it
                    width, height = height, width
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise LoupeError(f"cannot read image {path}: {e}") from None
        return method.tokens_for(height, width)

    def prepare(self, images: list[Image.Image], method: Method) -> PreparedImages:
        """OneVision's AnyRes tiles; the method says how many tokens each image takes."""
        limit = self.cfg.text.max_position_embeddings
        for im in images:
            n = token_count(self.cfg, im.height, im.width)
            if n >= limit:
                raise LoupeError(f"an image of {im.height}x{im.width} (height x width) takes {n} AnyRes tokens, "
                                 f"more than the model's {limit} positions (max_position_embeddings)")
        pixels, sizes = AnyResProcessor(self.cfg, self.cfg.image_mean, self.cfg.image_std).batch(images)
        return PreparedImages(pixels, sizes, [method.tokens_for(int(h), int(w)) for h, w in sizes.tolist()])


PACKINGS: dict[str, type[Splice]] = {Splice.name: Splice, AnyResPacking.name: AnyResPacking}


def build_packing(cfg: VLMConfig) -> Splice:
    if cfg.image_packing not in PACKINGS:
        raise ConfigError(f"unsupported config value image_packing={cfg.image_packing!r}: Loupe supports "
                          f"{sorted(PACKINGS)}")
    return PACKINGS[cfg.image_packing](cfg)
