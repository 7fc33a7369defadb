"""The token-set seam: the rows a run of decoder layers works on, which may shrink between
layers, per sample, in a padded batch (FastV, PyramidDrop), or be a subset of the call's
rows (VISOR's text stream).

Shape legend: B batch, T rows of this call, T' current rows, Tk keys (cached + current),
W width.

A `TokenSet` holds what attention over its rows needs - the RoPE angles of the rows, the
mask over their keys - and where each row came from (`index` into the call's rows), so
that any per-row tensor can follow it and `restore` can put the final hidden states back
in the call's row order. `VLM.forward` builds the first one; a method's layer loop moves
to another with `shrink` (prefill: keep some rows from this layer on, recorded in the KV
cache as a new `Segment`) or `resume` (a later call: the layers from a recorded segment on
see that segment's keys and positions).

Kept rows stay in order and are left-padded to the batch's largest keep set (the last row,
whose logits are read, stays last). Positions are either the original ones (FastV) or
renumbered contiguously over the kept rows (PyramidDrop; later calls' positions then shift
by the number dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loupe.errors import LoupeError
from loupe.nn.attention import Kernel, decoder_mask
from loupe.nn.decoder import AttnContext
from loupe.nn.kv_cache import DecoderCache, Segment, new_positions
from loupe.nn.rope import Rope


@dataclass
class RopeSpec:
    """How RoPE angles are made for this decoder."""

    head_dim: int
    theta: float
    dtype: torch.dtype

    def at(self, positions: torch.Tensor) -> Rope:
        return Rope.at(positions, self.head_dim, self.theta, self.dtype)


@dataclass
class TokenSet:
    """The rows some decoder layers run over, and what their attention needs."""

    ctx: AttnContext  # rope of the rows, mask over the keys, kernel
    positions: torch.Tensor  # (B, T') RoPE position of each row
    key_valid: torch.Tensor  # (B, Tk) False at padding, over cached + current rows
    index: torch.Tensor  # (B, T') index of each row among the call's rows
    row_valid: torch.Tensor  # (B, T') False at padding rows
    image: torch.Tensor  # (B, T') True at image-token rows
    rope_spec: RopeSpec
    segment: int = 0  # the first layer of the cache segment these rows belong to

    @classmethod
    def build(cls, positions: torch.Tensor, key_valid: torch.Tensor, row_valid: torch.Tensor, image: torch.Tensor,
              rope_spec: RopeSpec, kernel: Kernel, segment: int = 0, index: torch.Tensor | None = None) -> TokenSet:
        """A token set whose rows are the last T' of the keys `key_valid` (B, Tk)."""
        t = positions.shape[1]
        mask, causal = decoder_mask(key_valid, t)
        ctx = AttnContext(rope_spec.at(positions), mask, causal, kernel, key_valid)
        if index is None:
            index = torch.arange(t, device=positions.device).expand(positions.shape[0], t)
        return cls(ctx, positions, key_valid, index, row_valid, image, rope_spec, segment)

    @property
    def cached(self) -> int:
        """Keys cached before this call (the columns before the current rows)."""
        return self.key_valid.shape[1] - self.positions.shape[1]

    def shrink(self, x: torch.Tensor, keep: torch.Tensor, *, layer: int, renumber: bool,
               cache: DecoderCache | None) -> tuple[torch.Tensor, TokenSet]:
        """Keep the rows `keep` (B, T') of hidden states x (B, T', W) from `layer` on.

        Each sample keeps its own rows (at least its last one), in order, left-padded to the
        largest count. With `renumber` the kept rows get contiguous positions; else their own.
        With a cache, the layers from `layer` on form a new segment: they cache only the kept
        rows, and later calls `resume` there.
        """
        if keep.shape != self.positions.shape:
            raise LoupeError(f"a keep mask of shape {tuple(keep.shape)} for {tuple(self.positions.shape)} rows")
        keep = keep & self.row_valid
        if not bool(keep[:, -1].all()):
            raise LoupeError("a token set must keep each sample's last row (its logits are read)")
        n = int(keep.sum(1).max())
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, -n:]  # (B, n) kept last, in order
        kept_valid = keep.gather(1, order)  # (B, n) False at the new left padding
        if renumber:
            start = self.positions.gather(1, self.row_valid.long().argmax(1, keepdim=True))  # (B, 1) first real row
            positions = new_positions(kept_valid, start)
        else:
            positions = self.positions.gather(1, order)
        key_valid = torch.cat([self.key_valid[:, : self.cached], kept_valid], dim=1)
        x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))  # (B, n, W)
        out = TokenSet.build(positions, key_valid, kept_valid, self.image.gather(1, order), self.rope_spec,
                             self.ctx.kernel, layer, self.index.gather(1, order))
        if cache is not None:
            cache.add_segment(Segment(layer, key_valid, positions[:, -1:] + 1))
        return x, out

    def resume(self, layer: int, cache: DecoderCache | None) -> TokenSet:
        """The token set of the layers from `layer` on, if an earlier call of the request
        shrank it there (the new rows of this call are all kept); else this one."""
        segment = cache.segment_at(layer) if cache is not None and layer > 0 else None
        if segment is None or segment.first_layer == self.segment:
            return self
        positions, key_valid = segment.extend(self.row_valid)
        return TokenSet.build(positions, key_valid, self.row_valid, self.image, self.rope_spec, self.ctx.kernel,
                              layer, self.index)

    def subset(self, rows: torch.Tensor, keys: torch.Tensor) -> TokenSet:
        """The rows `rows` (B, T'') (in order, the same count per sample) over the key columns
        `keys` (B, Tk) True (the same count per sample, the rows' own among them), with the
        rows' own positions; nothing is recorded in the cache (VISOR's text stream)."""
        b = rows.shape[0]
        key_valid = self.key_valid[keys].view(b, -1)  # (B, Tk'')
        return TokenSet.build(self.positions.gather(1, rows), key_valid, self.row_valid.gather(1, rows),
                              self.image.gather(1, rows), self.rope_spec, self.ctx.kernel, self.segment,
                              self.index.gather(1, rows))

    def with_keys(self, key_valid: torch.Tensor) -> TokenSet:
        """The same rows over the same key columns with validity `key_valid` (B, Tk) instead
        (VISOR's joint layers hide the visual keys from the samples that skip them)."""
        mask, causal = decoder_mask(key_valid, self.positions.shape[1])
        ctx = AttnContext(self.ctx.rope, mask, causal, self.ctx.kernel, key_valid)
        return TokenSet(ctx, self.positions, key_valid, self.index, self.row_valid, self.image, self.rope_spec,
                        self.segment)

    def extended(self, positions: torch.Tensor) -> TokenSet:
        """This set with one more row per sample, after every key, at RoPE position
        `positions` (B, 1) (VISOR's routing row; its `index` is -1: not a row of the call)."""
        b = positions.shape[0]
        ones = self.row_valid.new_ones(b, 1)
        return TokenSet.build(torch.cat([self.positions, positions], 1), torch.cat([self.key_valid, ones], 1),
                              torch.cat([self.row_valid, ones], 1), torch.cat([self.image, ~ones], 1),
                              self.rope_spec, self.ctx.kernel, self.segment,
                              torch.cat([self.index, torch.full_like(positions, -1)], 1))

    def restore(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Hidden states x (B, T', W) back at the call's `rows` rows (B, rows, W); rows this set
        dropped are zero (their logits are never read)."""
        if x.shape[1] == rows and bool((self.index == torch.arange(rows, device=x.device)).all()):
            return x
        out = x.new_zeros(x.shape[0], rows, x.shape[-1])
        return out.scatter(1, self.index[..., None].expand(-1, -1, x.shape[-1]), x)
