"""`xattn` (LLaVA-XAttn, CogAgent-style): a cross-attention sublayer in every decoder layer.

Shape legend: B batch, T new rows, M HR tokens, W text width, H heads, D head dim.

Each decoder layer becomes: x + self_attn(x); x + tanh(gate) * cross_attn(norm(x), HR);
x + mlp(x). Queries are the hidden states (LR image and text rows alike); keys/values are
ALL HR tokens, projected once per request and kept for the rest of generation. The gate
starts at zero, so a freshly converted model equals its base model exactly; training
opens it. New weights live under `method.cross.N`, base weights are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from loupe.config import TextConfig, VLMConfig
from loupe.errors import LoupeError
from loupe.flops import CostPlan, Workload, attention, linear
from loupe.methods.base import ImageInputs, MethodConfig, Step, register
from loupe.methods.highres import HighResMethod, check_hr_size, tiled_plan
from loupe.nn.attention import attend
from loupe.nn.decoder import RMSNorm

if TYPE_CHECKING:
    from loupe.vlm import VLM


@dataclass
class XAttnConfig(MethodConfig):
    name: ClassVar[str] = "xattn"
    hr_size: int = 0  # 0: 3x the native size (1008 for 336 -> 72 x 72 = 5184 HR tokens)

    def resolved_hr_size(self, cfg: VLMConfig) -> int:
        return self.hr_size or 3 * cfg.vision.image_size

    def validate(self, cfg: VLMConfig) -> None:
        check_hr_size(cfg, self.resolved_hr_size(cfg), tiled=True)


class CrossAttention(nn.Module):
    """Pre-norm, gated cross-attention from hidden states to HR features."""

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

    def keys_values(self, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HR features (B, M, W) -> keys, values (B, H, M, D)."""
        return self.heads(self.k_proj(hr)), self.heads(self.v_proj(hr))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], kernel: str) -> torch.Tensor:
        q = self.heads(self.q_proj(self.norm(x)))  # (B, H, T, D)
        out, _ = attend(q, kv[0], kv[1], kernel=kernel)  # (B, H, T, D)
        b, _, t, _ = out.shape
        return torch.tanh(self.gate) * self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, W)


@register
class XAttn(HighResMethod):
    name = "xattn"
    config_class = XAttnConfig
    options: XAttnConfig

    def __init__(self, cfg: VLMConfig, options: XAttnConfig) -> None:
        super().__init__(cfg, options)
        self.cross = nn.ModuleList(CrossAttention(cfg.text) for _ in range(cfg.text.num_layers))

    def assemble(self, features: dict[str, torch.Tensor], image_sizes: torch.Tensor | None = None) -> ImageInputs:
        return ImageInputs(features["lr"], {"hr": features["hr"]})  # (I, N, W), hr: (I, M, W)

    def run_layers(self, vlm: VLM, x: torch.Tensor, step: Step) -> torch.Tensor:
        kvs = self._keys_values(step, x.shape[0])
        for i, layer in enumerate(vlm.decoder.layers):
            x = layer.attention_residual(x, step.ctx, step.cache.layers[i] if step.cache else None)
            x = x + self.cross[i](x, kvs[i], step.ctx.kernel)
            x = layer.feed_forward(x)
        return x

    def _keys_values(self, step: Step, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer HR keys/values: projected at prefill, reused from the cache afterwards."""
        memo = step.cache.method_state if step.cache is not None else {}
        if "xattn_kv" in memo:
            return memo["xattn_kv"]
        if step.images is None or "hr" not in step.images.extras:
            raise LoupeError("xattn needs an image: pass pixel_values (or encoded images) with the prompt")
        hr = step.images.extras["hr"]
        if hr.shape[0] != batch:
            raise LoupeError(f"xattn takes one image per sample: {hr.shape[0]} images for a batch of {batch}")
        kvs = [c.keys_values(hr.to(c.q_proj.weight.dtype)) for c in self.cross]
        memo["xattn_kv"] = kvs
        return kvs

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        """Every layer: q/o projections and attention of every row over all M HR tokens;
        the HR keys/values are projected once, at prefill."""
        assert isinstance(options, XAttnConfig)
        plan, m = tiled_plan(cfg, options.resolved_hr_size(cfg))
        t = cfg.text
        inner, layers = t.num_heads * t.head_dim, t.num_layers

        def cross(rows: int) -> float:
            return layers * (2 * linear(rows, t.hidden_size, inner) + attention(rows, m, t.num_heads, t.head_dim))

        plan.prefill_extra = lambda tokens: {"cross_attention": cross(tokens),
                                             "cross_kv": layers * 2 * linear(m, t.hidden_size, inner)}
        plan.decode_extra = lambda keys: {"cross_attention": cross(1)}
        plan.image_parts = ("cross_attention", "cross_kv")
        return plan

    def init_from_base(self, vlm: VLM) -> None:
        with torch.no_grad():
            for c in self.cross:
                for lin in (c.q_proj, c.k_proj, c.v_proj, c.o_proj):
                    nn.init.normal_(lin.weight, std=0.02)
                c.norm.weight.fill_(1.0)
                c.gate.zero_()
