"""Dual-resolution image encoding shared by the high-resolution methods.

Shape legend: I images, S HR side in pixels, s native side, k = S / s tiles per side,
g native patch grid (24), N = g*g LR tokens, M = (k*g)^2 HR tokens, W text width.

The input image is the HR one (padded to square, resized to S, normalised). The LR image
is that HR image resized to the native size (bilinear, antialias), encoded exactly as
LLaVA does. HR: k x k tiles of the native size through the SAME encoder and projector,
stitched back into one (k*g) x (k*g) grid, without gradient (the encoder is frozen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loupe.config import VLMConfig
from loupe.errors import ConfigError, LoupeError
from loupe.flops import CostPlan
from loupe.methods.base import ImageFeatures, Method, MethodConfig

if TYPE_CHECKING:
    from loupe.vlm import VLM


def check_hr_size(cfg: VLMConfig, hr_size: int, *, tiled: bool) -> None:
    native, patch = cfg.vision.image_size, cfg.vision.patch_size
    if hr_size <= native:  # a high-resolution view no finer than the low-resolution one adds nothing
        raise ConfigError(f"hr_size={hr_size} must be larger than the encoder's native size {native} "
                          f"(e.g. {2 * native})")
    if tiled and (hr_size < native or hr_size % native):
        raise ConfigError(f"hr_size={hr_size} must be a multiple of the encoder's native size {native} "
                          f"(e.g. {2 * native}, {3 * native}, {4 * native})")
    if hr_size % patch:
        raise ConfigError(f"hr_size={hr_size} must be a multiple of the patch size {patch}")
    if tiled and cfg.feature_strategy != "default":
        raise ConfigError("tiled high-resolution encoding needs vision_feature_select_strategy='default' "
                          f"(patch tokens only), not {cfg.feature_strategy!r}")


def low_res(pixels: torch.Tensor, native: int) -> torch.Tensor:
    """(I, 3, S, S) -> (I, 3, s, s), bilinear with antialias."""
    if pixels.shape[-1] == native:
        return pixels
    return F.interpolate(pixels.float(), size=(native, native), mode="bilinear", antialias=True,
                         align_corners=False).to(pixels.dtype)


def tiles(pixels: torch.Tensor, native: int) -> torch.Tensor:
    """(I, 3, S, S) -> (I*k*k, 3, s, s), tiles in row-major order."""
    i, c, s, _ = pixels.shape
    k = s // native
    t = pixels.view(i, c, k, native, k, native).permute(0, 2, 4, 1, 3, 5)  # (I, k, k, 3, s, s)
    return t.reshape(i * k * k, c, native, native)


def crops(pixels: torch.Tensor, native: int) -> torch.Tensor:
    """(I, 3, S, S) -> (I * (1 + k*k), 3, s, s): per image the LR image, then its tiles (row-major)."""
    i = pixels.shape[0]
    lr = low_res(pixels, native)[:, None]  # (I, 1, 3, s, s)
    hr = tiles(pixels, native).view(i, -1, *lr.shape[2:])  # (I, k*k, 3, s, s)
    return torch.cat([lr, hr], dim=1).flatten(0, 1)


def stitch(features: torch.Tensor, images: int, k: int, g: int) -> torch.Tensor:
    """(I*k*k, g*g, W) tile features -> (I, (k*g)^2, W) one row-major HR grid."""
    w = features.shape[-1]
    f = features.view(images, k, k, g, g, w).permute(0, 1, 3, 2, 4, 5)  # (I, k, g, k, g, W)
    return f.reshape(images, k * g * k * g, w)


@torch.no_grad()
def encode_tiled(vlm: VLM, pixels: torch.Tensor) -> torch.Tensor:
    """HR features (I, M, W) from HR pixels (I, 3, S, S), S a multiple of the native size."""
    native, g = vlm.cfg.vision.image_size, vlm.cfg.vision.grid
    feats = vlm.image_features(tiles(pixels, native))  # (I*k*k, N, W)
    return stitch(feats, pixels.shape[0], pixels.shape[-1] // native, g)


class TileFeatures:
    """HR features of k x k native tiles, each tile encoded (encoder and projector) the first
    time one of its tokens is read and kept for the rest of the request. A selection that
    touches 2 of the 9 tiles pays for 2 encoder passes, not 9 (beyond both papers, which
    encode every tile). What `gather` reads equals the stitched grid of `encode_tiled`: the
    same tiles through the same encoder (tested).

    Shape legend: I images, K = k*k tiles per image, n = g*g tokens per tile, M = K*n HR
    tokens (row-major over the (k*g) x (k*g) grid), W width, S tokens read.
    """

    def __init__(self, vlm: VLM, pixels: torch.Tensor) -> None:
        native, g = vlm.cfg.vision.image_size, vlm.cfg.vision.grid
        i, k = pixels.shape[0], pixels.shape[-1] // native
        self._encode = vlm.image_features
        self.pixels = tiles(pixels, native).view(i, k * k, pixels.shape[1], native, native)  # (I, K, 3, s, s)
        self.done = torch.zeros(i, k * k, dtype=torch.bool, device=pixels.device)  # (I, K) encoded yet
        self.features: torch.Tensor | None = None  # (I, K, n, W), allocated at the first encode
        self.encoded = 0  # tiles encoded so far
        side = torch.arange(k * g, device=pixels.device)
        r, c = side[:, None], side[None, :]
        self.tile_of = ((r // g) * k + c // g).flatten()  # (M,) the tile holding HR token m
        self.slot = (self.tile_of * g * g + ((r % g) * g + c % g).flatten())  # (M,) m's row in the flat (K*n) order
        self.shape = (i, k * k * g * g, vlm.cfg.text.hidden_size)

    @property
    def tiles_per_image(self) -> int:
        return self.done.shape[1]

    @torch.no_grad()
    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """HR features (I, S, W) of the HR tokens idx (I, S), encoding the tiles not yet encoded."""
        self._ensure(torch.zeros_like(self.done).scatter_(1, self.tile_of[idx], True))
        assert self.features is not None
        flat = self.features.flatten(1, 2)  # (I, K*n, W)
        return flat.gather(1, self.slot[idx][..., None].expand(-1, -1, flat.shape[-1]))

    def dense(self) -> torch.Tensor:
        """Every tile encoded and stitched: (I, M, W), as `encode_tiled`."""
        return self.gather(torch.arange(self.shape[1], device=self.done.device).expand(self.shape[0], -1))

    def _ensure(self, wanted: torch.Tensor) -> None:
        """Encode the tiles `wanted` (I, K) that are not encoded yet, in one encoder batch."""
        need = wanted & ~self.done
        images, which = need.nonzero(as_tuple=True)  # (T,) each; one host read, only here
        if images.numel() == 0:
            return
        feats = self._encode(self.pixels[images, which])  # (T, n, W)
        if self.features is None:
            i, k2 = self.done.shape
            self.features = feats.new_zeros(i, k2, *feats.shape[1:])
        self.features[images, which] = feats
        self.done |= need
        self.encoded += images.numel()


@torch.no_grad()
def encode_interpolated(vlm: VLM, pixels: torch.Tensor) -> torch.Tensor:
    """HR features (I, (S/patch)^2, W) in one pass with resampled position embeddings."""
    return vlm.image_features(pixels)


@dataclass(frozen=True)
class TiledConfig(MethodConfig):
    """Options of a method that takes k x k native-size HR tiles (XAttn, FlexAttention, VISOR)."""

    hr_size: int = 0  # 0: 3x the native size (1008 for 336 -> 72 x 72 = 5184 HR tokens)

    def resolved_hr_size(self, cfg: VLMConfig) -> int:
        return self.hr_size or 3 * cfg.vision.image_size

    def validate(self, cfg: VLMConfig) -> None:
        check_hr_size(cfg, self.resolved_hr_size(cfg), tiled=True)


class HighResMethod(Method):
    """A method that takes the HR image (`hr_size` px) and derives the LR one from it.
    Its options class provides `resolved_hr_size(cfg)`."""

    def __init__(self, cfg: VLMConfig, options: MethodConfig) -> None:
        super().__init__(cfg, options)
        self.hr_size: int = options.resolved_hr_size(cfg)  # type: ignore[attr-defined]

    def image_size(self) -> int:
        return self.hr_size

    def tiled(self) -> bool:
        return True

    def feature_key(self) -> tuple[object, ...]:
        return ("tiled" if self.tiled() else "interpolated", self.hr_size)

    def features(self, vlm: VLM, pixel_values: torch.Tensor) -> ImageFeatures:
        """LR features (I, N, W) of the downsampled image, HR features (I, M, W)."""
        lr = vlm.image_features(low_res(pixel_values, self.cfg.vision.image_size))
        hr = (encode_tiled if self.tiled() else encode_interpolated)(vlm, pixel_values)
        return ImageFeatures(lr, hr)

    @staticmethod
    def hr_of(features: ImageFeatures) -> torch.Tensor:
        if features.hr is None:
            raise LoupeError("this high-resolution method needs HR features; these were computed without them")
        return features.hr


def tiled_plan(cfg: VLMConfig, hr_size: int, tiles: float = 1.0) -> tuple[CostPlan, int]:
    """Cost plan of an LR pass plus k x k native tiles kept beside the sequence (of which the
    fraction `tiles` is encoded and projected), and M."""
    native, n = cfg.vision.image_size, cfg.tokens_per_image
    k = hr_size // native
    m = (k * cfg.vision.grid) ** 2
    plan = CostPlan(image_tokens=n, vision={"vision.lr": (native, 1), "vision.hr": (native, tiles * k * k)},
                    projector_rows=n + tiles * m)
    return plan, m
