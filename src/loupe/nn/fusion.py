"""Fusion: a pretrained decoder layer with an added sublayer (torchtune's fusion-by-wrapping).

Shape legend: B batch, T rows, M memory tokens, W width, H heads, D head dim.

`FusedLayer` composes, at call time, a pretrained `DecoderLayer` with a new sublayer -
XAttn's cross-attention after the layer's self-attention, VISOR's cross-attention before
the layer. It owns no parameters: the decoder's weights stay under `decoder.layers.N` and
the sublayer's under its owner (`method.cross.N`), so every pretrained key of a checkpoint
is unchanged and the method's keys are its own.

`CrossAttention` is the sublayer both use: pre-norm queries from the rows, keys/values
projected from a memory (HR features, VISOR's visual stream) once per request, and a
tanh gate initialised to 0, so a freshly added sublayer changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from loupe.config import TextConfig
from loupe.nn.attention import Kernel, attend
from loupe.nn.decoder import AttnContext, DecoderLayer, RMSNorm
from loupe.nn.kv_cache import KVStore

Sublayer = Callable[[torch.Tensor], torch.Tensor]  # rows (B, T, W) -> residual update (B, T, W)
Where = Literal["input", "attention"]


class CrossAttention(nn.Module):
    """Pre-norm, gated cross-attention from rows to a memory; returns the residual update."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        e, self.num_heads, self.head_dim = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.norm = RMSNorm(e, cfg.rms_norm_eps)
        self.q_proj, self.k_proj = nn.Linear(e, inner, bias=False), nn.Linear(e, inner, bias=False)
        self.v_proj, self.o_proj = nn.Linear(e, inner, bias=False), nn.Linear(inner, e, bias=False)
        self.gate = nn.Parameter(torch.zeros(1))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, t, D)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory (B, M, W) -> keys, values (B, H, M, D)."""
        return self.heads(self.k_proj(memory)), self.heads(self.v_proj(memory))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], kernel: Kernel,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, 1, 1, M): False at memory slots that are padding (memories of different lengths)."""
        q = self.heads(self.q_proj(self.norm(x)))  # (B, H, T, D)
        out, _ = attend(q, kv[0], kv[1], mask, kernel=kernel)  # (B, H, T, D)
        b, _, t, _ = out.shape
        return torch.tanh(self.gate) * self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, W)

    def reset(self, std: float = 0.02) -> None:
        """Fresh weights with the gate closed (the sublayer then adds exactly nothing)."""
        with torch.no_grad():
            for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                nn.init.normal_(lin.weight, std=std)
            self.norm.weight.fill_(1.0)
            self.gate.zero_()


class FusedLayer:
    """A decoder layer with a sublayer added at `where`: "attention" = between the layer's
    self-attention and its MLP (CogAgent / XAttn), "input" = before the layer (VISOR's CA).
    Holds references only (see the module docstring)."""

    def __init__(self, layer: DecoderLayer, sublayer: Sublayer, where: Where) -> None:
        self.layer, self.sublayer, self.where = layer, sublayer, where

    def fuse(self, x: torch.Tensor) -> torch.Tensor:
        """x plus the sublayer's residual update."""
        return x + self.sublayer(x)

    def __call__(self, x: torch.Tensor, ctx: AttnContext, cache: KVStore | None = None) -> torch.Tensor:
        if self.where == "input":
            return self.layer(self.fuse(x), ctx, cache)
        x = self.layer.attention_residual(x, ctx, cache)
        return self.layer.feed_forward(self.fuse(x))
