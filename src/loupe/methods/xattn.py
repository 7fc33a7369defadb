"""`xattn` (LLaVA-XAttn, CogAgent-style): a cross-attention sublayer in every decoder layer.

Shape legend: B batch, T new rows, M HR tokens, W text width, H heads, D head dim.

Each decoder layer becomes: x + self_attn(x); x + tanh(gate) * cross_attn(norm(x), HR);
x + mlp(x). Queries are the hidden states (LR image and text rows alike); keys/values are
ALL HR tokens, projected once per request and kept for the rest of generation. The gate
starts at zero, so a freshly converted model equals its base model exactly; training
opens it. New weights live under `method.cross.N`, base weights are untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from loupe.config import VLMConfig
from loupe.errors import LoupeError
from loupe.flops import CostPlan, Workload, attention, linear
from loupe.methods.base import (
    ImageFeatures,
    ImageInputs,
    MethodConfig,
    MethodReport,
    Step,
    cached_state,
    keep_state,
    register,
)
from loupe.methods.highres import HighResMethod, TiledConfig, tiled_plan
from loupe.nn.attention import Kernel
from loupe.nn.decoder import AttnContext
from loupe.nn.fusion import CrossAttention, FusedLayer
from loupe.nn.kv_cache import KVStore
from loupe.nn.static import StaticStep

if TYPE_CHECKING:
    from loupe.vlm import VLM


@dataclass(frozen=True)
class XAttnConfig(TiledConfig):
    name: ClassVar[str] = "xattn"


@dataclass
class XAttnState:
    """Per request: each layer's HR keys and values (B, H, M, D), projected at prefill."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor | None = None  # (B, 1, 1, M) False at padding HR slots (None: none)


@register
class XAttn(HighResMethod):
    name = "xattn"
    config_class = XAttnConfig
    options: XAttnConfig

    def __init__(self, cfg: VLMConfig, options: XAttnConfig) -> None:
        super().__init__(cfg, options)
        self.cross = nn.ModuleList(CrossAttention(cfg.text) for _ in range(cfg.text.num_layers))

    def assemble(self, features: ImageFeatures, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        return ImageInputs(features.lr, hr=self.hr_of(features))  # (I, N, W), hr: (I, M, W)

    def run_layers(self, vlm: VLM, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, MethodReport]:
        state = self._keys_values(step, x.shape[0])
        return self._layers(vlm, x, state, lambda i: step.ctx, step.layer_cache, step.ctx.kernel), MethodReport()

    def decode_layers(self, vlm: VLM, x: torch.Tensor, step: StaticStep) -> torch.Tensor:
        if not isinstance(step.state, XAttnState):
            raise LoupeError("xattn needs an image: pass pixel_values (or encoded images) with the prompt")
        return self._layers(vlm, x, step.state, step.ctx, step.layer_cache, step.kernel)

    def _layers(self, vlm: VLM, x: torch.Tensor, state: XAttnState, ctx: Callable[[int], AttnContext],
                cache: Callable[[int], KVStore | None], kernel: Kernel) -> torch.Tensor:
        """Each layer with its cross-attention after self-attention; `ctx(i)`, `cache(i)`: layer i's."""
        for i, layer in enumerate(vlm.decoder.layers):
            cross = partial(self.cross[i], kv=state.kv[i], kernel=kernel, mask=state.mask)
            x = FusedLayer(layer, cross, "attention")(x, ctx(i), cache(i))
        return x

    def _keys_values(self, step: Step, batch: int) -> XAttnState:
        """Per-layer HR keys/values: projected at prefill, reused from the cache afterwards."""
        state = cached_state(step, XAttnState)
        if state is not None:
            return state
        if step.images is None or step.images.hr is None:
            raise LoupeError("xattn needs an image: pass pixel_values (or encoded images) with the prompt")
        hr = step.images.hr
        if hr.shape[0] != batch:
            raise LoupeError(f"xattn takes one image per sample: {hr.shape[0]} images for a batch of {batch}")
        kvs = [c.keys_values(hr.to(c.q_proj.weight.dtype)) for c in self.cross]
        valid = step.images.hr_valid
        state = XAttnState(kvs, None if valid is None else valid[:, None, None, :].to(hr.device))
        keep_state(step, state)
        return state
    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        """Every layer: q/o projections and attention of every row over all M HR tokens;
        the HR keys/values are projected once, at prefill."""
        assert isinstance(options, XAttnConfig)
        plan, m = cls.hr_plan(cfg, options, workload)
        t = cfg.text
        inner, layers = t.num_heads * t.head_dim, t.num_layers

        def cross(rows: int) -> float:
            return layers * (2 * linear(rows, t.hidden_size, inner) + attention(rows, m, t.num_heads, t.head_dim))

        plan.prefill_extra = lambda tokens: {"cross_attention": cross(tokens),
                                             "cross_kv": layers * 2 * linear(m, t.hidden_size, inner)}
        plan.decode_extra = lambda keys: {"cross_attention": cross(1)}
        plan.image_parts = ("cross_attention", "cross_kv")
        return plan

    @classmethod
    def hr_plan(cls, cfg: VLMConfig, options: XAttnConfig, workload: Workload) -> tuple[CostPlan, int]:
        """The encoder's part of the plan, and M: the k x k tiles' tokens."""
        return tiled_plan(cfg, options.resolved_hr_size(cfg))

    def init_from_base(self, vlm: VLM) -> None:
        for c in self.cross:
            c.reset()
