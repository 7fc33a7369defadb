"""`hired`: HiRED (Arif et al., AAAI 2025), after the official code, batched.

Shape legend: C crops, n patch tokens per crop (g x g), P crops of one image (overview
first, then R x C tiles), K kept tokens of an image, W text width.

HiRED drops image tokens before the decoder, within a fixed budget (DESIGN.md section 6):
- budget: `int(P * n * rate)` tokens per image (official default rate 0.2), or `keep`;
- the overview gets `min(int(budget * alpha), n)` (alpha 0.5), its top tokens by the class
  token's attention at the feature layer (the official code: layer 22 of CLIP-L, i.e. the
  -2 feature layer), summed over heads;
- the rest is split across the tiles in proportion to how many of the overview's top
  `int(n * (1 - alpha))` tokens by LAYER-0 class attention fall in each tile's part of
  the image; each tile keeps its top tokens by its own feature-layer class attention.
Kept tokens keep their order: the overview's first, then the tiles' in the stitched grid's
raster order, without newlines (the official `image_newline=None`).

On LLaVA-1.5 there are no tiles: the image keeps its top `int(n * rate)` tokens (or
`keep`), in token order; rate 1 is the base model exactly.

Where Loupe differs from the official code, and why:
- Each tile's share is rounded so that the shares add up to the budget exactly (largest
  remainder, capped at what the tile holds, the excess passed on); the official code
  floors every share and clamps without passing on, so its token count depends on the
  attention - but a prompt must carry its <image> count before the model runs.
- Tokens in the padding of the tile grid are never chosen (the official code may choose
  them and then loses them to the unpadding, again changing the count).
- `partition="spatial"` (default) counts the top tokens in each tile's REGION of the
  overview, as the paper describes; the official code splits the overview's flattened
  token list into consecutive chunks (`partition="raster"`, kept as an option), which
  matches the regions only for a 1 x C grid and needs n to divide by the tile count.
- On OneVision (SigLIP, no class token) the signal is Loupe's substitute (`signal="mean"`,
  `loupe.methods.reduction`), and there is no anyres_max downsample: the budget bounds the
  count instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from loupe.anyres import Layout, check_tiles, layout, reference_size, stitch_tiles, used_tiles
from loupe.config import VLMConfig
from loupe.errors import ConfigError, LoupeError
from loupe.flops import CostPlan, Workload
from loupe.methods.base import ImageFeatures, ImageInputs, Method, MethodConfig, register
from loupe.methods.highres import check_hr_size, crops
from loupe.methods.reduction import SIGNAL_LABELS, Crops, check_signal, probe_crops, probe_flops, top_mask
from loupe.nn.vit import feature_layer_index

if TYPE_CHECKING:
    from loupe.vlm import VLM

PARTITIONS = ("spatial", "raster")


@dataclass(frozen=True)
class HiREDConfig(MethodConfig):
    name: ClassVar[str] = "hired"
    rate: float = 0.2  # the token budget as a fraction of the image's tokens (all its crops)
    alpha: float = 0.5  # the overview's share of the budget (AnyRes)
    keep: int | None = None  # or: the budget in tokens per image (overrides rate)
    signal: str = "class"  # class (official) | mean (Loupe's substitute where the tower has no class token)
    partition: str = "spatial"  # how the overview's attention is split over the tiles: spatial | raster (official)
    hr_size: int = 0  # LLaVA-1.5: 0 the native image; >0 the LR image as the overview and k x k native tiles

    def resolved_hr_size(self, cfg: VLMConfig) -> int:
        return self.hr_size

    def validate(self, cfg: VLMConfig) -> None:
        if not 0 < self.rate <= 1:
            raise ConfigError(f"rate={self.rate} must be in (0, 1]: the fraction of the image's tokens kept")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha={self.alpha} must be in [0, 1]: the overview's share of the budget")
        if self.keep is not None and (not isinstance(self.keep, int) or self.keep < 1):
            raise ConfigError(f"keep={self.keep!r} must be a whole number of tokens, at least 1")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"partition={self.partition!r}; choose one of {list(PARTITIONS)}")
        check_signal("hired", self.signal, cfg)
        feature_layer_index(cfg)
        if self.hr_size:
            check_hr_size(cfg, self.hr_size, tiled=True)

    def budget(self, crops: int, n: int) -> int:
        """Tokens an image of `crops` crops of n tokens keeps in all (the official arithmetic)."""
        if self.keep is None:
            return int(crops * n * self.rate)
        if self.keep > crops * n:
            raise ConfigError(f"keep={self.keep} is more than the image's {crops * n} tokens")
        return self.keep

    def variant(self, cfg: VLMConfig) -> str:
        parts = [f"keep {self.keep}" if self.keep is not None else f"rate {self.rate:g}"]
        if cfg.image_packing == "anyres" or self.hr_size:
            parts.append(f"alpha {self.alpha:g}" + (", raster partition" if self.partition == "raster" else ""))
        if SIGNAL_LABELS[self.signal]:
            parts.append(SIGNAL_LABELS[self.signal])
        return ", ".join(parts)


def select_tokens(crops: Crops, layer: int, budgets: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(C, n) True at each crop's top `budgets[c]` patches by the feature layer's attention
    (`allowed` (C, n): where it may choose; None: anywhere)."""
    scores = crops.scores(layer)  # (C, n)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return top_mask(scores, budgets)


@register
class HiRED(Method):
    name = "hired"
    config_class = HiREDConfig
    options: HiREDConfig

    def tokens_per_image(self) -> int:
        lay = self.tiled_layout()
        return self.options.budget(1, self.cfg.vision.grid**2) if lay is None else sum(
            anyres_budget(self.options, self.cfg, lay))

    def image_size(self) -> int:
        return self.options.hr_size or self.cfg.vision.image_size

    def tiled_layout(self) -> Layout | None:
        """With hr_size, the k x k tile grid as an AnyRes layout without padding (the LR image
        is the overview: HiRED's own LLaVA-NeXT setting); else None."""
        return square_layout(self.cfg, self.options.hr_size) if self.options.hr_size else None

    def feature_key(self) -> tuple[object, ...]:
        return tuple(sorted(self.options.to_dict().items()))

    def features(self, vlm: VLM, pixel_values: torch.Tensor) -> ImageFeatures:
        lay = self.tiled_layout()
        if lay is not None:  # the AnyRes form over the LR image and the tiles
            tokens = hired_tokens(vlm, crops(pixel_values, self.cfg.vision.image_size),
                                  [lay] * pixel_values.shape[0], self.options)
            return ImageFeatures(torch.stack(tokens))  # (I, K, W)
        layer = feature_layer_index(self.cfg)
        probed = probe_crops(vlm, pixel_values, (layer,), self.options.signal)
        k = self.tokens_per_image()
        keep = select_tokens(probed, layer, torch.full((probed.feats.shape[0],), k, device=pixel_values.device))
        kept = probed.patches[keep].view(keep.shape[0], k, -1)  # (I, K, E) in token order
        return ImageFeatures(vlm.projector(kept))  # (I, K, W)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        assert isinstance(options, HiREDConfig)
        if options.hr_size:
            return tiles_plan(cfg, options, square_layout(cfg, options.hr_size))
        n = cfg.vision.grid**2
        k = options.budget(1, n)
        work = probe_flops(cfg, options.signal, n + int(cfg.vision.class_token))
        return CostPlan(image_tokens=k, vision={"vision.lr": (cfg.vision.image_size, 1)}, projector_rows=k,
                        prefill_extra=lambda seq: {"token_selection": work})


def square_layout(cfg: VLMConfig, hr_size: int) -> Layout:
    k, g = hr_size // cfg.vision.image_size, cfg.vision.grid
    return Layout(k, k, (k * g, k * g), (k * g, k * g), g * g)


# ---- OneVision -----------------------------------------------------------------------------
def anyres_budget(options: HiREDConfig, cfg: VLMConfig, lay: Layout) -> tuple[int, int]:
    """(overview tokens, tile tokens) an image of layout `lay` keeps."""
    n = cfg.vision.grid**2
    total = options.budget(lay.patches, n)
    overview = min(int(total * options.alpha), n)
    return overview, min(total - overview, lay.unpadded[0] * lay.unpadded[1])


def tile_capacity(cfg: VLMConfig, lay: Layout) -> torch.Tensor:
    """(R*C, n) True at each tile's cells that lie inside the unpadded image."""
    g = cfg.vision.grid
    rows, cols = lay.unpadded
    full_h, full_w = lay.tiles_rows * g, lay.tiles_cols * g
    inside = torch.zeros(full_h, full_w, dtype=torch.bool)
    top, left = (full_h - rows) // 2, (full_w - cols) // 2
    inside[top:top + rows, left:left + cols] = True
    return inside.view(lay.tiles_rows, g, lay.tiles_cols, g).permute(0, 2, 1, 3).reshape(-1, g * g)


def tile_weights(top: torch.Tensor, lay: Layout, partition: str) -> torch.Tensor:
    """(R*C,) how many of the overview's top tokens (g, g mask) each tile's part holds."""
    tiles = lay.tiles_rows * lay.tiles_cols
    if partition == "raster":
        if top.numel() % tiles:
            raise LoupeError(f"partition='raster' splits the overview's {top.numel()} tokens into {tiles} equal "
                             f"chunks, which this {lay.tiles_rows}x{lay.tiles_cols} grid does not allow: use "
                             "partition='spatial'")
        return top.reshape(tiles, -1).sum(-1).float()
    g = top.shape[0]  # each overview cell split evenly over the tiles its area spans
    spread = top.float().repeat_interleave(lay.tiles_rows, 0).repeat_interleave(lay.tiles_cols, 1)  # (R*g, C*g)
    return spread.view(lay.tiles_rows, g, lay.tiles_cols, g).sum((1, 3)).flatten()


def split_budget(weights: torch.Tensor, budget: int, capacity: torch.Tensor) -> torch.Tensor:
    """(T,) whole shares of `budget` in proportion to `weights` (T,), none above `capacity`
    (T,), adding up to `budget` exactly, or to all the capacity where that is less (largest
    remainder; a full tile passes on its excess; no weight left where there is room: even shares)."""
    out = torch.zeros_like(capacity)
    left = min(budget, int(capacity.sum()))
    while left > 0:
        room = out < capacity
        w = weights.double() * room
        if float(w.sum()) == 0:
            w = room.double()
        share = w / w.sum() * left  # (T,)
        add = torch.minimum(share.floor().long(), capacity - out)
        if int(add.sum()) == 0:  # one more each for the largest remainders
            order = torch.sort(-(share - share.floor()) * room, stable=True).indices[:left]
            add = torch.zeros_like(out).index_fill_(0, order[room[order]], 1)
        out += add
        left -= int(add.sum())
    return out


def hired_anyres(vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
                 options: HiREDConfig) -> ImageInputs:
    """Per image (K_i, W): the overview's kept tokens, then the tiles' in grid order."""
    layouts = check_tiles(vlm.cfg, pixel_values, image_sizes)
    flat, _ = used_tiles(pixel_values, layouts)
    return ImageInputs(hired_tokens(vlm, flat, layouts, options), image_sizes=image_sizes)


def hired_tokens(vlm: VLM, flat: torch.Tensor, layouts: list[Layout], options: HiREDConfig) -> list[torch.Tensor]:
    """Crops (sum P_i, 3, s, s), each image's overview then its tiles -> per image (K_i, W)."""
    cfg = vlm.cfg
    needed = [lay.patches for lay in layouts]
    layer = feature_layer_index(cfg)
    probed = probe_crops(vlm, flat, (0, layer), options.signal)
    keep = keep_masks(cfg, options, probed, layer, layouts, needed)  # (sum P_i, n)
    tokens = vlm.projector(probed.patches[keep])  # (sum K_i, W), crop by crop, each in token order
    per_image = [int(c.sum()) for c in keep.sum(1).split(needed)]
    return [in_grid_order(cfg, t, m, lay) for t, m, lay in
            zip(tokens.split(per_image), keep.split(needed), layouts, strict=True)]


def keep_masks(cfg: VLMConfig, options: HiREDConfig, crops: Crops, layer: int, layouts: list[Layout],
               needed: list[int]) -> torch.Tensor:
    """(sum P_i, n): what every crop keeps - the overview its share, each tile its part."""
    g, dev = cfg.vision.grid, crops.feats.device
    budgets, allowed = [], []
    early = crops.scores(0)  # (C, n) layer-0 attention
    for lay, start in zip(layouts, [sum(needed[:i]) for i in range(len(needed))], strict=True):
        overview, tiles = anyres_budget(options, cfg, lay)
        capacity = tile_capacity(cfg, lay).to(dev)  # (R*C, n)
        top = top_mask(early[start:start + 1], torch.tensor([int(g * g * (1 - options.alpha))], device=dev))
        weights = tile_weights(top.view(g, g), lay, options.partition)
        shares = split_budget(weights, tiles, capacity.sum(1))  # (R*C,)
        budgets.append(torch.cat([shares.new_tensor([overview]), shares]))
        allowed.append(torch.cat([torch.ones(1, g * g, dtype=torch.bool, device=dev), capacity]))
    return select_tokens(crops, layer, torch.cat(budgets), torch.cat(allowed))


def in_grid_order(cfg: VLMConfig, tokens: torch.Tensor, keep: torch.Tensor, lay: Layout) -> torch.Tensor:
    """One image's kept tokens (K, W), crop by crop, -> the overview's, then the tiles' in the
    stitched grid's raster order."""
    counts = keep.sum(1).tolist()
    overview, tiles = tokens[:counts[0]], tokens[counts[0]:]
    g = cfg.vision.grid
    slot = torch.full(keep[1:].shape, -1, dtype=torch.long, device=keep.device)  # (R*C, n)
    slot[keep[1:]] = torch.arange(tiles.shape[0], device=keep.device)
    raster = stitch_tiles(slot[..., None], lay, g).flatten()  # (R*g * C*g,) tile-token index or -1
    return torch.cat([overview, tiles[raster[raster >= 0]]])


def anyres_hired_tokens(cfg: VLMConfig, options: HiREDConfig, height: int, width: int) -> int:
    return sum(anyres_budget(options, cfg, layout(cfg, height, width)))


def anyres_hired_plan(cfg: VLMConfig, options: HiREDConfig, workload: Workload) -> CostPlan:
    return tiles_plan(cfg, options, layout(cfg, *(workload.image_size or reference_size(cfg))))


def tiles_plan(cfg: VLMConfig, options: HiREDConfig, lay: Layout) -> CostPlan:
    """Every crop through the encoder with two probed layers, the kept tokens projected."""
    k, s, n = sum(anyres_budget(options, cfg, lay)), cfg.vision.image_size, cfg.vision.grid**2
    work = 2 * lay.patches * probe_flops(cfg, options.signal, n + int(cfg.vision.class_token))  # layer 0, feature layer
    return CostPlan(image_tokens=k, vision={"vision.lr": (s, 1), "vision.hr": (s, lay.patches - 1)},
                    projector_rows=k, prefill_extra=lambda seq: {"token_selection": work})
