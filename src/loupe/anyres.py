"""AnyRes (LLaVA-OneVision): the image as an overview plus a grid of native-size tiles.

Shape legend: P tiles of one image (overview first), s tile side in pixels (384), g patch
grid of a tile (27), W text width, R x C tiles in the chosen grid, H x L the stitched
token grid after unpadding and downsampling.

The geometry is transformers' `LlavaOnevisionModel` / `LlavaOnevisionProcessor`, step for step:

1. pick the grid pinpoint (height, width) that keeps most of the image's pixels and wastes
   fewest (`best_resolution`);
2. resize the image keeping its aspect ratio to fit that pinpoint, pad it centred with
   black, cut it into R x C tiles of s px; the whole image squashed to s x s comes first;
3. encode every tile; the overview's g*g tokens open the image's sequence (no newline);
4. stitch the tile tokens into one (R*g) x (C*g) grid, drop the rows or columns that
   are padding, and - when it holds more than ~N tiles' worth ("anyres_max_N") - shrink it
   bilinearly; append the learned `image_newline` after every row.

`token_count` gives the sequence length from the image size alone, as the processor
does when it expands `<image>`, and `AnyResPacking.arrange` builds the same number of
tokens from the features (a test holds the two equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loupe.config import SIGLIP_MEAN, SIGLIP_STD, VLMConfig
from loupe.errors import LoupeError


def best_resolution(height: int, width: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The pinpoint (height, width) with the most effective pixels, then the least waste
    (transformers' `select_best_resolution`, first of equals wins)."""
    best, best_effective, best_waste = (0, 0), 0, math.inf
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (pin_h, pin_w), effective, waste
    return best


def fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(height, width) of the image resized to fit (target_h, target_w) keeping its aspect
    ratio (transformers' `get_patch_output_size`)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclass(frozen=True)
class Layout:
    """Where one image's tokens come from: an R x C tile grid, and the stitched token grid
    (rows, cols) after unpadding, before and after the anyres_max downsample."""

    tiles_rows: int  # R
    tiles_cols: int  # C
    unpadded: tuple[int, int]  # token rows, cols of the stitched grid without its padding
    kept: tuple[int, int]  # after the downsample (equal to `unpadded` when none)
    overview: int  # g*g tokens of the overview

    @property
    def patches(self) -> int:
        """Tiles the encoder sees: the overview plus R x C."""
        return 1 + self.tiles_rows * self.tiles_cols

    @property
    def tokens(self) -> int:
        """The image's sequence length: overview + grid + one newline per grid row."""
        rows, cols = self.kept
        return self.overview + rows * (cols + 1)

    @property
    def grid_tokens(self) -> int:
        """The stitched grid's tokens without newlines (H * L)."""
        return self.kept[0] * self.kept[1]


def layout(cfg: VLMConfig, height: int, width: int) -> Layout:
    """The AnyRes layout of an image of (height, width) pixels for model `cfg`."""
    if height <= 0 or width <= 0:
        raise LoupeError(f"image size {height}x{width} (height x width): both must be positive")
    tile, g = cfg.vision.image_size, cfg.vision.grid
    pin_h, pin_w = best_resolution(height, width, cfg.image_grid_pinpoints)
    r, c = pin_h // tile, pin_w // tile
    cur_h, cur_w = r * g, c * g
    # Unpadding, in tokens: the same rounding as `unpad_image` and the processor.
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    ratio = math.sqrt(cur_h * cur_w / (cfg.max_tiles * g * g))
    kept = (int(cur_h // ratio), int(cur_w // ratio)) if ratio > 1.1 else (cur_h, cur_w)
    return Layout(r, c, (cur_h, cur_w), kept, g * g)


def token_count(cfg: VLMConfig, height: int, width: int) -> int:
    """Image tokens an image of (height, width) pixels takes, without running the model
    (equal to transformers' LlavaOnevisionProcessor count)."""
    return layout(cfg, height, width).tokens


# ---- a batch's inputs -------------------------------------------------------------------
def check_tiles(cfg: VLMConfig, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[Layout]:
    """Refuse OneVision inputs of the wrong shape; the layout of every image."""
    s, channels = cfg.vision.image_size, cfg.vision.num_channels
    shape = tuple(pixel_values.shape)
    if len(shape) != 5 or shape[2:] != (channels, s, s):
        raise LoupeError(f"pixel_values of shape {shape}: a OneVision model takes AnyRes tiles (images, tiles, "
                         f"{channels}, {s}, {s}), overview first, as `loupe.anyres.AnyResProcessor` makes them")
    if image_sizes is None or tuple(image_sizes.shape) != (shape[0], 2):
        got = None if image_sizes is None else tuple(image_sizes.shape)
        raise LoupeError(f"a OneVision model needs image_sizes ({shape[0]}, 2), the (height, width) of each "
                         f"image, to know its tile grid; got {got}")
    if not torch.isfinite(pixel_values).all():
        raise LoupeError("pixel_values contain NaN or infinity")
    return [layout(cfg, int(h), int(w)) for h, w in image_sizes.tolist()]


def used_tiles(pixel_values: torch.Tensor, layouts: list[Layout]) -> tuple[torch.Tensor, list[int]]:
    """The tiles the images use, (sum P_i, 3, s, s) (overview first per image), and each P_i."""
    needed = [lay.patches for lay in layouts]
    if max(needed) > pixel_values.shape[1]:
        i = needed.index(max(needed))
        raise LoupeError(f"image {i} needs {needed[i]} tiles (overview + {layouts[i].tiles_rows}x"
                         f"{layouts[i].tiles_cols}) for its size, but pixel_values hold {pixel_values.shape[1]}")
    return torch.cat([px[:p] for px, p in zip(pixel_values, needed, strict=True)]), needed


def reference_size(cfg: VLMConfig) -> tuple[int, int]:
    """The image size the cost model assumes when the workload names none: the largest
    pinpoint, square - the most tokens OneVision gives an image (7,371 at the published
    0.5B's settings: 729 overview + 81 x 82 downsampled grid with newlines)."""
    side = max(max(p) for p in cfg.image_grid_pinpoints)
    return side, side


# ---- features -> the image's token sequence -----------------------------------------------
def stitch_tiles(tiles: torch.Tensor, lay: Layout, g: int) -> torch.Tensor:
    """Tile tokens (R*C, g*g, W) -> one grid (W, R*g, C*g), channels first as the unpad and
    interpolate steps want it."""
    w = tiles.shape[-1]
    grid = tiles.view(lay.tiles_rows, lay.tiles_cols, g, g, w).permute(4, 0, 2, 1, 3)  # (W, R, g, C, g)
    return grid.reshape(w, lay.tiles_rows * g, lay.tiles_cols * g)


def unpad_and_shrink(grid: torch.Tensor, lay: Layout) -> torch.Tensor:
    """(W, R*g, C*g) -> (W, H, L): the padding rows/columns cut off (centred), then the
    bilinear downsample of anyres_max_N where the layout asks for it."""
    w, full_h, full_w = grid.shape
    rows, cols = lay.unpadded
    top, left = (full_h - rows) // 2, (full_w - cols) // 2
    grid = grid[:, top:top + rows, left:left + cols]  # (W, rows, cols)
    if lay.kept != lay.unpadded:
        grid = F.interpolate(grid[None], size=list(lay.kept), mode="bilinear")[0]  # (W, H, L)
    return grid


def grid_tokens(features: torch.Tensor, cfg: VLMConfig, height: int, width: int) -> tuple[torch.Tensor, Layout]:
    """One image's projected tile features (P, g*g, W), overview first -> its stitched,
    unpadded, downsampled grid (H, L, W) (no newlines) and its layout."""
    lay = layout(cfg, height, width)
    if features.shape[0] < lay.patches:
        raise LoupeError(f"an image of {height}x{width} needs {lay.patches} tiles (overview + "
                         f"{lay.tiles_rows}x{lay.tiles_cols}), but its pixel_values hold {features.shape[0]}")
    grid = unpad_and_shrink(stitch_tiles(features[1:lay.patches], lay, cfg.vision.grid), lay)  # (W, H, L)
    return grid.permute(1, 2, 0), lay  # (H, L, W)


def with_newlines(grid: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """(H, L, W) grid -> (H * (L + 1), W) row-major tokens, `newline` (W,) closing every row."""
    h, _, w = grid.shape
    ends = newline.to(grid.dtype).expand(h, 1, w)  # (H, 1, W)
    return torch.cat([grid, ends], dim=1).reshape(-1, w)


# ---- preprocessing ----------------------------------------------------------------------
@dataclass
class AnyResProcessor:
    """Equal to transformers' LlavaOnevisionImageProcessor (PIL backend) for single images:
    bicubic aspect-preserving resize to the best pinpoint, centred black padding, s px tiles,
    the whole image squashed to s x s first, rescale to [0, 1], normalise (SigLIP: mean =
    std = 0.5). Output per image (P, 3, s, s); a batch pads P with zero tiles."""

    cfg: VLMConfig
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> (P, 3, s, s) float32, overview first."""
        image = image.convert("RGB")
        s = self.cfg.vision.image_size
        lay = layout(self.cfg, image.height, image.width)
        pin_h, pin_w = lay.tiles_rows * s, lay.tiles_cols * s
        new_h, new_w = fit_size(image.height, image.width, pin_h, pin_w)
        canvas = Image.new("RGB", (pin_w, pin_h), (0, 0, 0))
        canvas.paste(image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC),
                     ((pin_w - new_w) // 2, (pin_h - new_h) // 2))
        tiles = [canvas.crop((x, y, x + s, y + s)) for y in range(0, pin_h, s) for x in range(0, pin_w, s)]
        overview = image.resize((s, s), resample=Image.Resampling.BICUBIC)
        return torch.stack([self.normalise(t) for t in [overview, *tiles]])  # (P, 3, s, s)

    def normalise(self, image: Image.Image) -> torch.Tensor:
        x = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)  # (s, s, 3)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, s, s)

    def batch(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (I, P_max, 3, s, s), zero tiles after each image's own, and
        image_sizes (I, 2) as (height, width)."""
        each = [self(im) for im in images]
        p = max(x.shape[0] for x in each)
        out = torch.zeros(len(each), p, *each[0].shape[1:])
        for i, x in enumerate(each):
            out[i, :x.shape[0]] = x
        return out, torch.tensor([[im.height, im.width] for im in images])
