"""The image tokens a decoder-side token reduction (FastV, PyramidDrop, SparseVLM) prunes on
LLaVA-1.5: the native image's, as in those papers, or - with `hr_size` - LLaVA-HD's tiled
sequence (the LR image's tokens, then the k x k native tiles' stitched grid, as `hd` with
`tiles=True` builds it). The second is VISOR's comparison: token reduction over the same
high-resolution visual tokens that VISOR keeps out of the text stream.

Shape legend: I images, N LR tokens, M HR tokens, W text width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loupe.config import VLMConfig
from loupe.flops import CostPlan, Workload
from loupe.methods.base import ImageFeatures, ImageInputs, Method, MethodConfig
from loupe.methods.hd import HD, HDConfig
from loupe.methods.highres import check_hr_size, encode_tiled, low_res

if TYPE_CHECKING:
    from loupe.vlm import VLM


def hd_source(options: MethodConfig) -> HDConfig | None:
    """LLaVA-HD's tiled options where `options.hr_size` asks for them, else None (native)."""
    hr_size = getattr(options, "hr_size", 0)
    return HDConfig(hr_size=hr_size, tiles=True) if hr_size else None


def check_source(cfg: VLMConfig, options: MethodConfig) -> None:
    hd = hd_source(options)
    if hd is not None:
        check_hr_size(cfg, hd.resolved_hr_size(cfg), tiled=True)


class OverSequence(Method):
    """A method whose image tokens are LLaVA-1.5's, or LLaVA-HD's tiled sequence (`hr_size`)."""

    def tokens_per_image(self) -> int:
        hd = hd_source(self.options)
        return self.cfg.tokens_per_image if hd is None else HD(self.cfg, hd).tokens_per_image()

    def image_size(self) -> int:
        hd = hd_source(self.options)
        return self.cfg.vision.image_size if hd is None else hd.resolved_hr_size(self.cfg)

    def feature_key(self) -> tuple[object, ...]:
        hd = hd_source(self.options)
        return super().feature_key() if hd is None else ("tiled", hd.resolved_hr_size(self.cfg))

    def features(self, vlm: VLM, pixel_values: torch.Tensor) -> ImageFeatures:
        if hd_source(self.options) is None:
            return super().features(vlm, pixel_values)
        lr = vlm.image_features(low_res(pixel_values, self.cfg.vision.image_size))  # (I, N, W)
        return ImageFeatures(lr, encode_tiled(vlm, pixel_values))  # HR (I, M, W)

    def assemble(self, features: ImageFeatures, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        if features.hr is None:
            return ImageInputs(features.lr)
        return ImageInputs(torch.cat([features.lr, features.hr], dim=1))  # (I, N + M, W)


def sequence_plan(cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
    """The encoder's part of the plan for the tokens the method prunes."""
    hd = hd_source(options)
    return Method.cost_plan(cfg, options, workload) if hd is None else HD.cost_plan(cfg, hd, workload)
