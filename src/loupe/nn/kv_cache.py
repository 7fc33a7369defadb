"""Key/value cache: preallocated per layer, appended in place, read as a prefix view.

Shape legend: B batch, G key/value heads, T new positions, C capacity, D head dim.
In the spirit of gpt-fast's KVCache: static buffers (no torch.cat per generated token),
one small object per layer. Each layer keeps its own length so that methods that drop
tokens mid-network (token pruning) or keep streams apart (VISOR) can cache fewer
positions in some layers than in others.
"""

from __future__ import annotations

from typing import Any

import torch

from loupe.errors import LoupeError


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


class DecoderCache:
    """Everything a request keeps between forward calls.

    layers: one LayerCache per decoder layer.
    key_valid: (B, length) bool, False at left padding; grows with each call.
    method_state: per-request memo of the active method (e.g. projected high-resolution
        keys/values), keyed by the method; cleared with the cache.
    """

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = layers
        self.key_valid: torch.Tensor | None = None
        self.next_position: torch.Tensor | None = None  # (B, 1) RoPE position of the next token
        self.method_state: dict[str, Any] = {}

    @classmethod
    def allocate(cls, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> DecoderCache:
        return cls([LayerCache(batch, kv_heads, capacity, head_dim, dtype, device) for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return 0 if self.key_valid is None else self.key_valid.shape[1]
