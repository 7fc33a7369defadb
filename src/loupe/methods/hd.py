"""`hd` (LLaVA-HD): high-resolution tokens as ordinary sequence tokens.

Each image contributes its N LR tokens followed by all its HR tokens; every decoder layer
attends to all of them. HR tokens come from one encoder pass at `hr_size` with resampled
position embeddings (the paper's setting: 448 -> 32 x 32 = 1024 tokens) or, with
`tiles=True`, from native-size tiles stitched into one grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from loupe.config import VLMConfig
from loupe.flops import CostPlan, Workload
from loupe.methods.base import ImageFeatures, ImageInputs, MethodConfig, register
from loupe.methods.highres import HighResMethod, check_hr_size


@dataclass(frozen=True)
class HDConfig(MethodConfig):
    name: ClassVar[str] = "hd"
    hr_size: int = 0  # 0: 4/3 of the native size rounded to the patch (448 for 336)
    tiles: bool = False

    def resolved_hr_size(self, cfg: VLMConfig) -> int:
        if self.hr_size:
            return self.hr_size
        patch = cfg.vision.patch_size
        return round(cfg.vision.image_size * 4 / 3 / patch) * patch

    def validate(self, cfg: VLMConfig) -> None:
        check_hr_size(cfg, self.resolved_hr_size(cfg), tiled=self.tiles)


@register
class HD(HighResMethod):
    name = "hd"
    config_class = HDConfig
    options: HDConfig

    def tokens_per_image(self) -> int:
        return self.cfg.tokens_per_image + hr_tokens(self.cfg, self.options)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        assert isinstance(options, HDConfig)
        native, hr = cfg.vision.image_size, options.resolved_hr_size(cfg)
        tokens = cfg.tokens_per_image + hr_tokens(cfg, options)
        hr_pass = (native, (hr // native) ** 2) if options.tiles else (hr, 1)
        return CostPlan(image_tokens=tokens, vision={"vision.lr": (native, 1), "vision.hr": hr_pass},
                        projector_rows=tokens)

    def tiled(self) -> bool:
        return self.options.tiles

    def assemble(self, features: ImageFeatures, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        return ImageInputs(torch.cat([features.lr, self.hr_of(features)], dim=1))  # (I, N + M, W)


def hr_tokens(cfg: VLMConfig, options: HDConfig) -> int:
    """HR tokens per image: the HR grid, plus the class token of an interpolated 'full' pass."""
    grid = options.resolved_hr_size(cfg) // cfg.vision.patch_size
    return grid * grid + (1 if cfg.feature_strategy == "full" and not options.tiles else 0)
