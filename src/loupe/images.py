"""Image preprocessing, equal to transformers' CLIPImageProcessor as LLaVA-1.5 uses it.

Steps (all on uint8 PIL images until the rescale, as transformers' PIL backend does):
optional pad to square with the mean colour, shortest-side bicubic resize, center crop,
rescale to [0, 1], normalise with the CLIP mean/std. Output (3, S, S) float32.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from loupe.config import CLIP_MEAN, CLIP_STD
from loupe.errors import LoupeError


@dataclass
class ImageProcessor:
    size: int = 336  # shortest side after resize, and the crop size
    pad_to_square: bool = True  # LLaVA-1.5's "pad" aspect-ratio mode
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> (3, size, size) float32."""
        image = image.convert("RGB")
        if self.pad_to_square:
            image = pad_to_square(image, self.fill)
        image = resize_shortest_side(image, self.size)
        image = center_crop(image, self.size)
        return self.normalise(image)

    @property
    def fill(self) -> tuple[int, int, int]:
        """Padding colour: the mean, in 0..255 (truncated, as LLaVA and transformers do)."""
        r, g, b = (int(m * 255) for m in self.mean)
        return (r, g, b)

    def normalise(self, image: Image.Image) -> torch.Tensor:
        x = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)  # (S, S, 3)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, S, S)

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(im) for im in images])  # (I, 3, S, S)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `image` on a square canvas of its longer side."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side is `size` (longer side truncated, as transformers)."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if w < size or h < size:
        raise LoupeError(f"image of {w}x{h} is smaller than the crop size {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return image.crop((left, top, left + size, top + size))


MAX_PIXELS = 16384 * 16384  # 268M pixels (~0.8 GB as RGB); above it an image is refused before it is decoded


def load_image(source: str | os.PathLike[str] | bytes, name: str | None = None) -> Image.Image:
    """An image file (or its encoded bytes) as an RGB image, with an error that names it when
    it cannot be read, is empty, or is larger than `MAX_PIXELS`. `to_rgb` does the conversion."""
    label = name or (f"{len(source)} bytes of image data" if isinstance(source, bytes) else str(source))
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise LoupeError(f"image file not found: {source}")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as im:
            w, h = im.size
            if w * h == 0:
                raise LoupeError(f"image {label} is empty ({w}x{h} pixels)")
            if w * h > MAX_PIXELS:
                raise LoupeError(f"image {label} is {w}x{h} = {w * h / 1e6:.0f}M pixels, above Loupe's limit of "
                                 f"{MAX_PIXELS / 1e6:.0f}M (loupe.images.MAX_PIXELS); downscale it first")
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise LoupeError(f"cannot read image {label}: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB, oriented as its EXIF tag says (as transformers'
    `load_image` does). 8-bit modes (RGBA, LA, P, CMYK, YCbCr, 1, L) convert as
    transformers' `convert_rgb` does (PIL's `convert("RGB")`: alpha dropped). Modes that
    PIL would clip are rescaled instead: 16-bit integer (I;16*, and I holding values above
    255) by 1/257, 0..1 floats (F) by 255."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif image.mode == "I":
        high = image.getextrema()[1]
        image = image.point(lambda v: v * (1 / 257 if high > 255 else 1)).convert("L")
    elif image.mode == "F":
        low, high = image.getextrema()
        if not (math.isfinite(low) and math.isfinite(high)):
            raise LoupeError(f"a float image holds non-finite pixels (extrema {low}, {high})")
        image = image.point(lambda v: v * (255 if high <= 1 else 1)).convert("L")
    return image if image.mode == "RGB" else image.convert("RGB")
