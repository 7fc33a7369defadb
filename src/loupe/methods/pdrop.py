"""`pdrop`: PyramidDrop (Xing et al., CVPR 2025), exact to the official code, batched.

Shape legend: B batch, T rows of the current token set, H query heads, G key/value
heads, D head dim, W text width, n_b image tokens sample b holds at a stage.

The decoder is cut into stages at `layers` (the first layer of each new stage; default
8, 16, 24 of 32, scaled to depth). Before the first layer of a stage, the image tokens
still in the set are ranked by the attention of the last instruction token - at inference
the prompt's last row - computed with THAT layer's own q/k projections and RoPE on its
input norm, softmax in float32, mean over heads; each sample keeps its top `ratio` (lambda,
0.5) of them, at least one (DESIGN.md section 6). Kept rows are RENUMBERED contiguously
(`TokenSet.shrink(renumber=True)`), so the later layers see a shorter sequence, and each
stage's layers cache only their own rows (a cache segment per stage): a decode step's
position at a stage is the renumbered one, i.e. shifted by the tokens dropped before it.
ratio = 1 keeps everything and is the base model exactly.

Unlike the official training code, which ranks with the tokens before each answer span,
this is the inference rule; the official code batches, and so does this (per-sample keep
sets, left padding). On OneVision the whole AnyRes sequence (newlines included) is ranked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from loupe.config import VLMConfig
from loupe.errors import ConfigError
from loupe.flops import CostPlan, Workload, decoder_layer, linear
from loupe.methods.base import MethodConfig, MethodReport, Step, register
from loupe.methods.fastv import keep_top_images
from loupe.methods.sequence import OverSequence, check_source, sequence_plan
from loupe.nn.decoder import DecoderLayer
from loupe.nn.rope import Rope
from loupe.nn.tokens import TokenSet

if TYPE_CHECKING:
    from loupe.vlm import VLM

DEFAULT_STAGES = (8 / 32, 16 / 32, 24 / 32)  # the paper's boundaries on LLaVA-1.5-7B's 32 layers


@dataclass(frozen=True)
class PDropConfig(MethodConfig):
    name: ClassVar[str] = "pdrop"
    layers: list[int] | None = None  # first layer of each new stage; None: 8/16/24 of 32, scaled to depth
    ratio: float = 0.5  # lambda: the fraction of its image tokens a sample keeps at each stage
    hr_size: int = 0  # 0: LLaVA-1.5's native image tokens (the paper's); >0: LLaVA-HD's tiled sequence at that size

    def resolved_layers(self, cfg: VLMConfig) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        depth = cfg.text.num_layers
        return sorted({min(depth - 1, max(1, round(f * depth))) for f in DEFAULT_STAGES})

    def validate(self, cfg: VLMConfig) -> None:
        depth = cfg.text.num_layers
        if self.layers is not None and not (isinstance(self.layers, list) and all(isinstance(i, int)
                                                                                  for i in self.layers)):
            raise ConfigError(f"layers={self.layers!r} must be a list of layer indices, e.g. [8, 16, 24]")
        stages = self.resolved_layers(cfg)
        if not stages:
            raise ConfigError("layers=[] names no stage boundary: give at least one layer, e.g. [8]")
        bad = [i for i in stages if not 1 <= i < depth]
        if bad:
            raise ConfigError(f"layers={stages} names layer(s) {bad} outside 1..{depth - 1} (the first layer of a "
                              f"stage; the model has {depth} decoder layers)")
        if any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
            raise ConfigError(f"layers={stages} must be strictly increasing")
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio} must be in (0, 1]: the fraction of image tokens each stage keeps")
        check_source(cfg, self)

    def resolved_hr_size(self, cfg: VLMConfig) -> int:
        return self.hr_size

    def kept(self, n: int) -> int:
        """Image tokens kept at a stage from n (at least one)."""
        return max(1, int(n * self.ratio)) if n else 0

    def variant(self, cfg: VLMConfig) -> str:
        return f"stages {','.join(map(str, self.resolved_layers(cfg)))}, lambda {self.ratio:g}"


@dataclass
class PDropReport(MethodReport):
    """Image tokens each sample held in each stage (from its first layer)."""

    kept_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B,)


@register
class PyramidDrop(OverSequence):
    name = "pdrop"
    config_class = PDropConfig
    options: PDropConfig

    def run_layers(self, vlm: VLM, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, MethodReport]:
        tokens, stages = step.tokens, set(self.options.resolved_layers(self.cfg))
        report = PDropReport()
        for i, layer in enumerate(vlm.decoder.layers):
            tokens = tokens.resume(i, step.cache)  # decode: the (renumbered) set a prefill left at layer i
            if i in stages and step.images is not None:
                keep = self.keep_mask(instruction_attention(layer, x, tokens), tokens)  # (B, T)
                x, tokens = tokens.shrink(x, keep, layer=i, renumber=True, cache=step.cache)
                report.kept_counts[i] = (tokens.image & tokens.row_valid).sum(1)
            x = layer(x, tokens.ctx, step.layer_cache(i))
        return tokens.restore(x, step.tokens.positions.shape[1]), report

    def keep_mask(self, scores: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
        return keep_top_images(scores, tokens, self.options.kept)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        assert isinstance(options, PDropConfig)
        return with_stages(sequence_plan(cfg, options, workload), cfg, options)


def instruction_attention(layer: DecoderLayer, x: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
    """(B, T): the attention the last row pays each row under `layer`'s own q/k projections and
    RoPE on its input norm - float32 softmax, mean over heads (the ranking of PyramidDrop)."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)  # (B, T, W)
    rope = tokens.ctx.rope
    last = Rope(rope.cos[:, -1:], rope.sin[:, -1:])
    q = last.apply(attn.heads(attn.q_proj(h[:, -1:]), attn.num_heads))  # (B, H, 1, D)
    k = rope.apply(attn.heads(attn.k_proj(h), attn.num_kv_heads))  # (B, G, T, D)
    k = k.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=1)  # (B, H, T, D)
    logits = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)  # (B, H, 1, T)
    logits = logits.masked_fill(~tokens.row_valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(1)[:, 0]  # (B, T)


def with_stages(plan: CostPlan, cfg: VLMConfig, options: PDropConfig) -> CostPlan:
    """`plan` with PyramidDrop's decoder: each stage over its remaining image tokens, and the
    ranking at each boundary (the last row's query, every row's key, their scores)."""
    t, n = cfg.text, plan.image_tokens
    stages = options.resolved_layers(cfg)
    held = [n]  # image tokens in each stage, the first holding all
    for _ in stages:
        held.append(options.kept(held[-1]))
    bounds = [0, *stages, t.num_layers]
    pieces = [(bounds[j + 1] - bounds[j], held[j]) for j in range(len(held))]  # (layers, image tokens)
    inner, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim

    def prefill(seq: int) -> float:
        return sum(layers * decoder_layer(t, seq - n + m, seq - n + m) for layers, m in pieces)

    def decode(keys: int) -> float:
        return sum(layers * decoder_layer(t, 1, keys - n + m) for layers, m in pieces)

    def ranking(seq: int) -> dict[str, float]:
        rows = [seq - n + m for m in held[:-1]]  # the set each boundary ranks
        return {"ranking": sum(linear(1, t.hidden_size, inner) + linear(r, t.hidden_size, kv)
                               + 2.0 * r * inner for r in rows)}

    plan.prefill_llm, plan.decode_llm, plan.prefill_extra = prefill, decode, ranking
    plan.image_schedule = tuple((float(layers), float(m)) for layers, m in pieces)
    return plan
