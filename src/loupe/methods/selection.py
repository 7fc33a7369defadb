"""FlexAttention's high-resolution feature selection, as pure tensor functions.

Shape legend: R rows (query rows that need HR, flattened over the batch), g LR grid side
(24 for CLIP-L/336), P pooled grid side (9), G HR grid side (72), M = G*G HR tokens.

From the official code (DESIGN.md section 2): attention over the g x g LR image columns,
summed over heads -> zero the square-padding margin -> min-max normalise -> binarise with
`x * 255 > threshold` -> adaptive max-pool to P x P -> nearest upsample to G x G. Each
pooled cell is one block of HR tokens (8 x 8 at the defaults). Ablations: random blocks,
center blocks, and `oracle`: the blocks that hold the ground-truth tag (from the data's
boxes) at the same budget - the ceiling of what selection can give. A fixed budget keeps
the top fraction of blocks instead of thresholding,
which makes cost predictable. A row never selects nothing: if nothing passes, the block
with the most attention is kept.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Strategy = Literal["attnmap", "random", "center", "oracle"]
STRATEGIES: tuple[Strategy, ...] = ("attnmap", "random", "center", "oracle")


def normalise(attn: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each (g, g) map of attn (R, g, g) to [0, 1]; constant maps -> 0."""
    flat = attn.flatten(1)  # (R, g*g)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = (hi - lo).clamp_min(torch.finfo(flat.dtype).tiny)
    return ((flat - lo) / span).view_as(attn)


def blocks_from_attention(attn: torch.Tensor, allowed: torch.Tensor, pool: int, threshold: float,
                          budget: float | None) -> torch.Tensor:
    """Selected blocks (R, P, P) bool from attention (R, g, g) and allowed cells (R, g, g)."""
    x = normalise(attn.float() * allowed)  # margin zeroed, then normalised as the official code
    if budget is None:
        binary = (x * 255 > threshold).float()
        return F.adaptive_max_pool2d(binary[:, None], pool)[:, 0] > 0
    pooled = F.adaptive_max_pool2d(x[:, None], pool)[:, 0].flatten(1)  # (R, P*P)
    keep = max(1, math.ceil(budget * pool * pool))
    top = pooled.topk(keep, dim=1).indices
    return torch.zeros_like(pooled, dtype=torch.bool).scatter(1, top, True).view(-1, pool, pool)


def random_blocks(rows: int, pool: int, ratio: float, device: torch.device,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Each block kept with probability `ratio` (R, P, P)."""
    return torch.rand(rows, pool, pool, device=device, generator=generator) < ratio


def center_blocks(rows: int, pool: int, ratio: float, device: torch.device) -> torch.Tensor:
    """The central c x c blocks, c = round(P * sqrt(ratio)) (at least 1): (R, P, P)."""
    c = max(1, round(pool * math.sqrt(ratio)))
    start = (pool - c) // 2
    blocks = torch.zeros(rows, pool, pool, dtype=torch.bool, device=device)
    blocks[:, start:start + c, start:start + c] = True
    return blocks


def box_cover(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """(R, grid, grid) float: the fraction of each cell of a grid over the image that the box
    [left, top, right, bottom] (fractions of the square image's side) covers."""
    edges = torch.linspace(0, 1, grid + 1, device=boxes.device, dtype=torch.float32)
    lo, hi = edges[:-1], edges[1:]  # (grid,) each

    def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (R,) -> (R, grid)
        return ((torch.minimum(hi, b[:, None]) - torch.maximum(lo, a[:, None])).clamp(min=0) * grid)

    boxes = boxes.float()
    return overlap(boxes[:, 1], boxes[:, 3])[:, :, None] * overlap(boxes[:, 0], boxes[:, 2])[:, None, :]


def oracle_blocks(boxes: torch.Tensor, pool: int, ratio: float) -> torch.Tensor:
    """(R, P, P): the `ceil(ratio * P * P)` blocks that cover most of each row's tag box,
    ties (and blocks beyond the box, to fill the budget) by distance to the box's centre."""
    cover = box_cover(boxes, pool).flatten(1)  # (R, P*P)
    centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1).float()  # (R, 2) x, y
    mid = (torch.arange(pool, device=boxes.device, dtype=torch.float32) + 0.5) / pool
    cells = torch.stack(torch.meshgrid(mid, mid, indexing="xy"), -1).view(-1, 2)  # (P*P, 2) x, y of each block
    distance = (cells[None] - centre[:, None]).norm(dim=-1)  # (R, P*P)
    keep = max(1, math.ceil(ratio * pool * pool))
    top = (cover - 1e-3 * distance).topk(keep, dim=1).indices
    return torch.zeros_like(cover, dtype=torch.bool).scatter(1, top, True).view(-1, pool, pool)


def tag_tokens(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """(R, grid*grid) bool: the HR tokens of a tag - the cells the box covers at least half of,
    or the single cell it covers most when it is smaller than that."""
    cover = box_cover(boxes, grid).flatten(1)  # (R, M)
    most = F.one_hot(cover.argmax(1), cover.shape[1]).bool()
    return (cover >= 0.5) | most


def tag_hits(selected: torch.Tensor, boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """(R,) bool: whether a selection (R, grid*grid) holds at least half of the tag's tokens."""
    tag = tag_tokens(boxes, grid)
    return 2 * (selected & tag).sum(1) >= tag.sum(1)


def never_empty(blocks: torch.Tensor, attn: torch.Tensor | None) -> torch.Tensor:
    """Rows with no block keep their most-attended block (or the central one)."""
    empty = ~blocks.flatten(1).any(1)  # (R,); no host read: the fallback is cheap, and decode stays on device
    r, p = blocks.shape[0], blocks.shape[1]
    if attn is None:
        best = torch.full((r,), (p // 2) * p + p // 2, device=blocks.device)
    else:
        best = F.adaptive_max_pool2d(attn.float()[:, None], p)[:, 0].flatten(1).argmax(1)  # (R,)
    fallback = F.one_hot(best, p * p).bool().view(r, p, p)
    return torch.where(empty[:, None, None], fallback, blocks)


def upsample(blocks: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """(R, P, P) bool -> (R, M) bool over the G x G (or rows x cols) HR tokens (nearest)."""
    size = (grid, grid) if isinstance(grid, int) else grid
    up = F.interpolate(blocks[:, None].float(), size=size, mode="nearest")  # (R, 1, G, G)
    return up[:, 0].flatten(1) > 0


def overlap(cells: int, blocks: int, device: torch.device) -> torch.Tensor:
    """(cells, blocks) float: 1 where cell i of a side split into `cells` overlaps block p of
    the same side split into `blocks` (open intervals: touching is not overlapping)."""
    i = torch.arange(cells, device=device)[:, None]
    p = torch.arange(blocks, device=device)[None]
    return ((i * blocks < (p + 1) * cells) & (p * cells < (i + 1) * blocks)).float()


def spread(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(R, P, P) bool -> (R, rows*cols) bool: every HR token whose cell overlaps a selected block.
    On a grid that is a multiple of P this is exactly `upsample` (nearest); on any other grid
    (OneVision's H x L) no selected block is lost, however few rows the grid has."""
    p = blocks.shape[-1]
    a_r, a_c = overlap(rows, p, blocks.device), overlap(cols, p, blocks.device)  # (rows, P), (cols, P)
    hit = a_r @ blocks.float() @ a_c.T  # (R, rows, cols): selected blocks each cell overlaps
    return hit.flatten(1) > 0


def margin_allowed(image_sizes: torch.Tensor | None, batch: int, g: int, device: torch.device) -> torch.Tensor:
    """(B, g, g) bool: False on the LR cells covering square padding.

    image_sizes (B, 2) = original (height, width). As the official code: the padded sides
    lose k = int(margin / max(H, W) * g) rows (or columns) each.
    """
    allowed = torch.ones(batch, g, g, dtype=torch.bool, device=device)
    if image_sizes is None:
        return allowed
    for b, (h, w) in enumerate(image_sizes.tolist()):
        side = max(h, w)
        k = int((side - min(h, w)) / 2 / side * g)
        if k == 0:
            continue
        if w > h:  # padded top and bottom
            allowed[b, :k], allowed[b, g - k:] = False, False
        else:
            allowed[b, :, :k], allowed[b, :, g - k:] = False, False
    return allowed


def select(attn: torch.Tensor, allowed: torch.Tensor, *, hr_grid: int, pool: int, threshold: float,
           strategy: Strategy, budget: float | None, ablation_ratio: float,
           generator: torch.Generator | None = None, boxes: torch.Tensor | None = None) -> torch.Tensor:
    """HR token mask (R, M) from LR-column attention (R, g, g) and allowed cells (R, g, g)
    (`oracle`: from the rows' tag boxes (R, 4) instead)."""
    return upsample(select_blocks(attn, allowed, pool=pool, threshold=threshold, strategy=strategy, budget=budget,
                                  ablation_ratio=ablation_ratio, generator=generator, boxes=boxes), hr_grid)


def select_blocks(attn: torch.Tensor, allowed: torch.Tensor, *, pool: int, threshold: float, strategy: Strategy,
                  budget: float | None, ablation_ratio: float, generator: torch.Generator | None = None,
                  boxes: torch.Tensor | None = None) -> torch.Tensor:
    """The selected blocks (R, P, P) of `select`, before they are spread over an HR grid."""
    r, device = attn.shape[0], attn.device
    if strategy == "oracle":
        if boxes is None:
            raise ValueError("oracle selection needs the tag boxes of the rows")
        blocks = oracle_blocks(boxes, pool, ablation_ratio)
    elif strategy == "attnmap":
        blocks = blocks_from_attention(attn, allowed, pool, threshold, budget)
        blocks = never_empty(blocks, attn * allowed)
    elif strategy == "random":
        blocks = never_empty(random_blocks(r, pool, ablation_ratio, device, generator), None)
    else:
        blocks = center_blocks(r, pool, ablation_ratio, device)
    return blocks
