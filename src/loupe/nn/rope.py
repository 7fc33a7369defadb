"""Rotary position embedding, rotate-half form (as LLaMA and transformers write it).

Shape legend: B batch, T positions, H heads, D head dim.
cos/sin are computed in float32 from integer positions, then cast to the activations'
dtype, exactly as transformers does, so bf16 runs match it bit for bit in the angle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rope:
    """cos and sin for a set of positions: each (B, T, D)."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def at(cls, positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Rope:
        """Angles for integer `positions` (B, T)."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
        inv_freq = 1.0 / (theta**exponents)  # (D/2,)
        freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (B, T, D)
        return cls(angles.cos().to(dtype), angles.sin().to(dtype))

    def select(self, index: torch.Tensor) -> Rope:
        """Rows `index` (B, T') of each sample."""
        idx = index[..., None].expand(-1, -1, self.cos.shape[-1])  # (B, T', D)
        return Rope(self.cos.gather(1, idx), self.sin.gather(1, idx))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, D) by these angles."""
        cos, sin = self.cos[:, None], self.sin[:, None]  # (B, 1, T, D)
        return x * cos + rotate_half(x) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)
