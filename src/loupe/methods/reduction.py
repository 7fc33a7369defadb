"""Vision-side token reduction: what VisionZip and HiRED read in the vision tower.

Shape legend: C crops (images on LLaVA-1.5; the overview and tiles of every image on
OneVision), T tower tokens (the class token first where the tower has one, then the N
patch tokens), E vision width, D vision head dim, H vision heads.

Both methods rank a crop's patch tokens by an attention signal of an encoder layer and
keep the top ones (VisionZip also merges the rest). The signal is the class token's
attention row, computed explicitly beside the fused kernel (`VisionTower.trace`), summed
over heads. SigLIP (OneVision) has no class token: there the signal is Loupe's own
substitute, `signal="mean"` - the attention each patch receives averaged over every query
row of that layer (the layer runs eagerly to give its probabilities). No paper defines
either method on a tower without a class token, so the choice is named in every label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from loupe.config import VLMConfig
from loupe.errors import ConfigError
from loupe.flops import attention
from loupe.nn.vit import PROBE_QUERIES, LayerProbe

if TYPE_CHECKING:
    from loupe.vlm import VLM

SIGNAL_LABELS = {"class": "", "mean": "mean-attention signal (Loupe's)"}


def check_signal(method: str, signal: str, cfg: VLMConfig) -> None:
    if signal not in PROBE_QUERIES:
        raise ConfigError(f"signal={signal!r}; choose one of {list(PROBE_QUERIES)}")
    if signal == "class" and not cfg.vision.class_token:
        raise ConfigError(f"{method} signal='class' reads the class token's attention, and this model's "
                          f"{cfg.vision_tower!r} tower has no class token: choose signal='mean' (Loupe's substitute: "
                          f"the attention each patch receives, averaged over every query row)")


@dataclass
class Crops:
    """A batch of crops through the tower, with the probed layers' signals."""

    feats: torch.Tensor  # (C, T, E) the feature layer's states, class token first where the tower has one
    probes: dict[int, LayerProbe]  # encoder layer -> its probe
    lead: int  # 1 where the tower has a class token (feats[:, 0]), else 0

    @property
    def patches(self) -> torch.Tensor:
        return self.feats[:, self.lead:]  # (C, N, E)

    def scores(self, layer: int) -> torch.Tensor:
        """(C, N): each patch's attention at `layer` (from the class row, or received), summed over heads."""
        return self.probes[layer].attention[:, :, self.lead:].sum(1)

    def patch_keys(self, layer: int) -> torch.Tensor:
        return self.probes[layer].keys[:, self.lead:]  # (C, N, D)


def probe_crops(vlm: VLM, pixels: torch.Tensor, layers: tuple[int, ...], signal: str) -> Crops:
    """Crops (C, 3, s, s) through the tower up to the feature layer, probing `layers`."""
    vlm.check_pixels(pixels)
    feats, probes = vlm.vision_tower.trace(pixels, vlm.cfg.feature_layers, vlm.kernel, layers,
                                           query=signal)  # type: ignore[arg-type]
    return Crops(feats, probes, 1 if vlm.cfg.vision.class_token else 0)


def top_mask(scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """(C, N) True at each row's top `budget[c]` scores (ties to the earlier token)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (C, N)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))  # (C, N) each token's place
    return rank < budget[:, None]


def gather(tokens: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """(C, N, E) at mask (C, N) with `count` Trues per row -> (C, count, E), in token order."""
    return tokens[mask].view(tokens.shape[0], count, tokens.shape[-1])


def probe_flops(cfg: VLMConfig, signal: str, tokens: int) -> float:
    """The explicit class row of one probed layer (scores only: its output comes from the fused
    kernel); the mean signal's eager layer costs what the fused one does."""
    v = cfg.vision
    return attention(1, tokens, v.num_heads, v.head_dim) / 2 if signal == "class" else 0.0
