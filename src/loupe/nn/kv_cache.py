"""Key/value cache: preallocated per layer, appended in place, read as a prefix view.

Shape legend: B batch, G key/value heads, T new positions, C capacity, D head dim,
Tk cached + new positions.

In the spirit of gpt-fast's KVCache: static buffers (no torch.cat per generated token),
one small object per layer. Each layer keeps its own length so that methods that drop
tokens mid-network (token pruning) or keep streams apart (VISOR) can cache fewer
positions in some layers than in others. Which keys are padding, and where the next
token's RoPE position is, is kept per `Segment`: a run of layers that sees one token set
(one segment for the plain model; a new one from each layer where the token set shrank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from loupe.errors import LoupeError


class KVStore(Protocol):
    """What a layer's attention writes its new keys/values to and reads all of them from:
    `LayerCache` (a growing prefix) or `loupe.nn.static.StaticLayerCache` (whole buffers)."""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, G, T, D); return every key/value the layer attends over (B, G, Tk, D)."""
        ...


class LayerCache:
    """Cached keys and values of one attention layer."""

    def __init__(self, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (B, G, C, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (B, G, C, D)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, G, T, D) after what is cached; return all cached (B, G, length, D)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise LoupeError(f"KV cache overflow: {end} positions do not fit its capacity {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on (VISOR's routing row, which no later row may see)."""
        if not 0 <= length <= self.length:
            raise LoupeError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length


@dataclass
class Segment:
    """What the layers from `first_layer` on (up to the next segment) have cached: which of
    their keys are padding, and the RoPE position their next row takes."""

    first_layer: int
    key_valid: torch.Tensor | None = None  # (B, Tk) False at padding
    next_position: torch.Tensor | None = None  # (B, 1)

    def extend(self, new_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, T) of `new_valid` (B, T) rows after what is cached (padding does not
        advance them) and the key validity (B, Tk) they attend over; both are remembered."""
        positions = new_positions(new_valid, self.next_position)
        key_valid = new_valid if self.key_valid is None else torch.cat([self.key_valid, new_valid], dim=1)
        self.key_valid = key_valid
        self.next_position = positions[:, -1:] + 1  # (B, 1); left padding keeps the last row real
        return positions, key_valid


def new_positions(new_valid: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """RoPE positions (B, T) of rows `new_valid` (B, T) following position `start` (B, 1) or 0."""
    offset = start if start is not None else 0
    return (offset + new_valid.long().cumsum(-1) - 1).clamp(min=0)


class DecoderCache:
    """Everything a request keeps between forward calls.

    layers: one LayerCache per decoder layer.
    segments: the token sets runs of layers have seen (the first from layer 0), in layer order.
    method_state: the active method's per-request state (a dataclass the method defines,
        e.g. FlexAttention's memo of projected high-resolution keys); None until it keeps one.
    """

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = layers
        self.segments: list[Segment] = [Segment(0)]
        self.method_state: object | None = None

    @classmethod
    def allocate(cls, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> DecoderCache:
        return cls([LayerCache(batch, kv_heads, capacity, head_dim, dtype, device) for _ in range(num_layers)])

    @property
    def key_valid(self) -> torch.Tensor | None:
        """(B, Tk) key validity of the first segment: every position of the request so far."""
        return self.segments[0].key_valid

    @property
    def length(self) -> int:
        return 0 if self.key_valid is None else self.key_valid.shape[1]

    def segment_at(self, layer: int) -> Segment | None:
        """The segment that starts at `layer`, if an earlier call made one."""
        return next((s for s in self.segments if s.first_layer == layer), None)

    def add_segment(self, segment: Segment) -> None:
        if self.segment_at(segment.first_layer) is not None:
            raise LoupeError(f"the token set already changed at layer {segment.first_layer} in this request")
        self.segments = sorted([*self.segments, segment], key=lambda s: s.first_layer)
