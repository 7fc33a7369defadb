"""Grounding supervision: the answer row's attention over the image, taught to land on the
object the question names.

Shape legend: B batch, R watched rows (one per grounded turn), H heads, N image tokens
(g x g in raster order), g the image's token grid side.

A turn is grounded when its record gives the box of what its answer depends on (the built-in
benchmark's `tag_box`: the named object's tag, fractions of the square image's side). The row
that predicts the turn's first answer token is watched: at each of the chosen layers its
attention over the image tokens - summed over heads and renormalised over the image, as
FlexAttention's selection reads it (`loupe.methods.selection`) - is scored by cross-entropy
against the box's share of each token's cell (`box_cover`).

Why the built-in benchmark's base trains with it: trained from the answers alone, the tiny
base never learnt to find the object a question names ("where is the red circle": 6% on
whole scenes, chance 11%; 9.9% after 2000 steps of where-questions alone), because the
answer loss reaches the attention only through a softmax over 64 nearly equal tokens. A
pretrained LLaVA's answer row looks at what the question names; this loss gives the small
base that property directly (docs/reproduce.md, "The shipped base: grounded").
Fine-tuning the compared methods never uses it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from loupe.errors import LoupeError
from loupe.methods.selection import box_cover

BOX_KEY = "tag_box"  # a turn's grounding box in its record's metadata: [left, top, right, bottom], fractions


def turn_boxes(meta: Mapping[str, Any], turns: int) -> list[list[float] | None]:
    """The grounding box of each of a record's `turns` (None: that turn is not grounded): from
    the per-turn metadata `meta["turns"][k]` of a conversation, or `meta` itself for one turn."""
    per_turn = meta.get("turns")
    if isinstance(per_turn, list):
        found = [t.get(BOX_KEY) if isinstance(t, Mapping) else None for t in per_turn]
        boxes = (found + [None] * turns)[:turns]
    else:
        boxes = [meta.get(BOX_KEY)] + [None] * (turns - 1) if turns else []
    return [None if box is None else _checked(box) for box in boxes]


def _checked(box: Any) -> list[float]:
    """A box [left, top, right, bottom] inside the image with positive area, or a clear error."""
    ok = (isinstance(box, list | tuple) and len(box) == 4
          and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box))
    if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise LoupeError(f"{BOX_KEY}={box!r}: a grounding box is [left, top, right, bottom], fractions of the "
                         "image side with left < right and top < bottom inside [0, 1]")
    return [float(v) for v in box]


def answer_rows(scored: Sequence[bool]) -> list[int]:
    """The row predicting the first answer token of each turn (one per run of scored tokens)."""
    return [i - 1 for i, s in enumerate(scored) if s and i > 0 and not scored[i - 1]]


def box_targets(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, R, g*g) target distribution over the image tokens: each cell's share of the box."""
    b, r, _ = boxes.shape
    cover = box_cover(boxes.reshape(-1, 4), grid).view(b, r, grid * grid)  # (B, R, N)
    return cover / cover.sum(-1, keepdim=True).clamp_min(torch.finfo(cover.dtype).tiny)


def image_grid(tokens: int) -> int:
    """The side g of a square grid of `tokens` image tokens (LLaVA-1.5's splice packing)."""
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise LoupeError(f"grounding needs a square grid of image tokens per image; this method places {tokens} "
                         "(train the base with the lowres method)")
    return grid


def grounding_loss(watched: Mapping[int, torch.Tensor], layers: Sequence[int], boxes: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the boxes' targets against the watched rows' attention, summed over the
    valid rows and averaged over `layers`.

    Args:
        watched: layer -> (B, H, R, N) float32 attention probabilities of the watched rows
            over the image tokens (`MethodReport.watched`).
        boxes: (B, R, 4) grounding boxes; valid: (B, R) False at padding rows.
    """
    missing = [i for i in layers if i not in watched]
    if missing:
        raise LoupeError(f"grounding layers {missing} reported no attention: this method's layer loop does not "
                         "watch rows (train the base with the lowres method)")
    first = watched[layers[0]]
    target = box_targets(boxes.to(first.device), image_grid(first.shape[-1]))  # (B, R, N), the same at every layer
    valid = valid.to(first.device)
    total = first.new_zeros((), dtype=torch.float32)
    for i in layers:
        attn = watched[i].float().sum(1)  # (B, R, N) summed over heads
        attn = attn / attn.sum(-1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)
        ce = -(target * attn.clamp_min(1e-8).log()).sum(-1)  # (B, R)
        total = total + ce[valid].sum()
    return total / len(layers)
