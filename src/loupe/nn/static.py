"""A decode step at static shapes (gpt-fast's recipe), so that `torch.compile` can capture it
as one graph and the same graph serves every step of every request of one shape.

Shape legend: B batch, G key/value heads, C cache capacity, D head dim, L decoder layers,
W width.

The eager decode step reads the cache as a growing prefix (`LayerCache.append` returns
`k[:, :, :length]`) and builds its mask from a key validity that grows by one column per
step: every step has new shapes, and the Python ints that track them are guards. Here
every layer attends over its whole buffer (B, G, C, D) under a mask (B, 1, 1, C) that hides
the columns not written yet; the column a step writes, and the RoPE position of its row,
are device tensors advanced in place. Nothing in a step reads the host.

A `StaticStep` is made from the cache an eager prefill filled (`from_prefill`), so the
prefill stays the method's own code; each layer's key validity before the first step is
the method's answer to `Method.decode_keys` (VISOR's text-only layers see fewer columns
than its joint ones, so validity and write column are per layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loupe.errors import LoupeError
from loupe.nn.attention import Kernel
from loupe.nn.decoder import AttnContext
from loupe.nn.kv_cache import DecoderCache
from loupe.nn.rope import Rope


class StaticLayerCache:
    """One layer's cache buffers, written at a device-side column; read whole."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, column: torch.Tensor) -> None:
        self.k, self.v = k, v  # (B, G, C, D) each: the eager cache's own buffers
        self.column = column  # (1,) long: the column the next row is written at

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one row k, v (B, G, 1, D) at `column`; return the whole buffers (B, G, C, D)."""
        self.k.index_copy_(2, self.column, k)
        self.v.index_copy_(2, self.column, v)
        return self.k, self.v


@dataclass
class StaticStep:
    """What a static decode step reads and advances (all device tensors of fixed shape).

    key_valid: (L, B, C) per layer, True at the columns its next row may see (the new row's
        own column is set by `begin`).
    columns: (L,) long, the column each layer writes next.
    position: (B, 1) long, the RoPE position of the next row (padding does not advance it).
    state: the method's per-request state from the prefill (`DecoderCache.method_state`).
    """

    key_valid: torch.Tensor
    columns: torch.Tensor
    position: torch.Tensor
    keys: list[torch.Tensor]  # per layer (B, G, C, D): the eager cache's buffers
    values: list[torch.Tensor]  # per layer (B, G, C, D)
    state: object | None
    kernel: Kernel
    rope_of: Callable[[torch.Tensor], Rope]  # positions (B, 1) -> angles
    rope: Rope  # this step's angles (made by `begin`; set from the start, so every step sees one type)

    @classmethod
    def from_prefill(cls, cache: DecoderCache, keys: Callable[[int], torch.Tensor], kernel: Kernel,
                     rope_of: Callable[[torch.Tensor], Rope]) -> StaticStep:
        """The step after an eager prefill into `cache`; `keys(i)` (B, length_i): the validity of
        the columns layer i holds (`Method.decode_keys`)."""
        first = cache.segments[0]
        if first.next_position is None:
            raise LoupeError("a static decode step continues a request: run the prefill into the cache first")
        b, _, capacity, _ = cache.layers[0].k.shape
        valid = torch.zeros(len(cache.layers), b, capacity, dtype=torch.bool, device=first.next_position.device)
        for i, layer in enumerate(cache.layers):
            held = keys(i)  # (B, length_i)
            if held.shape != (b, layer.length):
                raise LoupeError(f"layer {i} holds {layer.length} cached columns but its method says it sees "
                                 f"{tuple(held.shape)}: the static decode step would misread the cache")
            if layer.length >= capacity:
                raise LoupeError(f"layer {i}'s cache is full ({capacity} columns): no room for a decode step")
            valid[i, :, : layer.length] = held
        columns = torch.tensor([layer.length for layer in cache.layers], device=valid.device)
        position = first.next_position.clone()
        return cls(valid, columns, position, [layer.k for layer in cache.layers], [layer.v for layer in cache.layers],
                   cache.method_state, kernel, rope_of, rope_of(position))

    def begin(self) -> None:
        """Open this step: the new row's column becomes visible in every layer; its angles are made."""
        index = self.columns[:, None, None].expand(-1, self.key_valid.shape[1], 1)  # (L, B, 1)
        self.key_valid.scatter_(2, index, True)
        self.rope = self.rope_of(self.position)

    def end(self) -> None:
        """Close this step: every layer writes its next column, the next row takes the next position."""
        self.columns.add_(1)
        self.position.add_(1)

    def ctx(self, i: int) -> AttnContext:
        """Layer i's attention context: this step's row over the layer's whole buffer."""
        valid = self.key_valid[i]  # (B, C)
        return AttnContext(self.rope, valid[:, None, None, :], False, self.kernel, valid)

    def layer_cache(self, i: int) -> StaticLayerCache:
        # made per call: a view of `columns` taken here, inside the step, follows its in-place advance
        return StaticLayerCache(self.keys[i], self.values[i], self.columns[i : i + 1])
