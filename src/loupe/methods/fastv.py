"""`fastv`: FastV (Chen et al., ECCV 2024), exact to the official code, batched.

Shape legend: B batch, T new rows, Tk keys, H heads, N_b image tokens of sample b.

At prefill, layer `k - 1` runs as usual and also yields the attention of the ranking rows
over the image tokens (explicit score rows; every row still goes through the fused kernel);
from layer `k` on, each sample keeps only its top image tokens by that attention (mean over
heads), with their ORIGINAL positions (DESIGN.md section 6). Pruning happens once, at
prefill: the layers from `k` on cache only the kept tokens (a new cache segment), and decode
steps attend to that pruned cache; layers before `k` keep every token.

Ranking rows: the LAST row (every official script; default) or, as the paper's text says,
the mean over all rows (`rank_by="mean"`: every row recomputed explicitly at layer k - 1 -
eager attention for that layer). Budget: `ratio` R of the image tokens dropped (paper: 50%)
or `keep` tokens kept per image; R = 0 is the base model exactly. The official code reads
batch item 0 only; here each sample keeps its own tokens (left-padded, `TokenSet.shrink`),
and images of different token counts (OneVision) each keep their own share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from loupe.config import VLMConfig
from loupe.errors import ConfigError
from loupe.flops import CostPlan, Workload, attention, decoder_layer
from loupe.methods.base import MethodConfig, MethodReport, Step, register
from loupe.methods.sequence import OverSequence, check_source, sequence_plan
from loupe.nn.decoder import DecoderLayer, Rows
from loupe.nn.kv_cache import LayerCache
from loupe.nn.tokens import TokenSet

if TYPE_CHECKING:
    from loupe.vlm import VLM

RANK_BY = ("last", "mean")


@dataclass(frozen=True)
class FastVConfig(MethodConfig):
    name: ClassVar[str] = "fastv"
    k: int = 2  # the first layer that sees only the kept image tokens (ranked by layer k - 1)
    ratio: float = 0.5  # R: the fraction of each image's tokens dropped
    keep: int | None = None  # or: image tokens kept per image (overrides ratio)
    rank_by: str = "last"  # last (the official code) | mean (the paper's text: all rows)
    hr_size: int = 0  # 0: LLaVA-1.5's native image tokens (the paper's); >0: LLaVA-HD's tiled sequence at that size

    def validate(self, cfg: VLMConfig) -> None:
        layers = cfg.text.num_layers
        if not 1 <= self.k < layers:
            raise ConfigError(f"k={self.k} must be in 1..{layers - 1}: layer k - 1 ranks the image tokens and "
                              f"layers k.. see the kept ones (the model has {layers} decoder layers)")
        if not 0 <= self.ratio < 1:
            raise ConfigError(f"ratio={self.ratio} must be in [0, 1): the fraction of image tokens dropped")
        if self.keep is not None and self.keep < 1:
            raise ConfigError(f"keep={self.keep} must be at least 1 image token")
        if self.rank_by not in RANK_BY:
            raise ConfigError(f"rank_by={self.rank_by!r}; choose one of {list(RANK_BY)}")
        check_source(cfg, self)

    def resolved_hr_size(self, cfg: VLMConfig) -> int:
        return self.hr_size

    def kept(self, n: int) -> int:
        """Image tokens an image of n keeps."""
        if self.keep is not None:
            if self.keep > n:
                raise ConfigError(f"keep={self.keep} is more than the image's {n} tokens")
            return self.keep
        return n - math.floor(self.ratio * n)

    def variant(self, cfg: VLMConfig) -> str:
        budget = f"keep {self.keep}" if self.keep is not None else f"R {self.ratio:g}"
        return f"K {self.k}, {budget}" + (", mean rows" if self.rank_by == "mean" else "")


@dataclass
class FastVReport(MethodReport):
    """Which image tokens each sample kept at prefill."""

    kept: torch.Tensor | None = None  # (B, T) True at the prompt rows kept from layer k on
    scores: torch.Tensor | None = None  # (B, T) the ranking attention (0 off the image)
    kept_counts: torch.Tensor | None = None  # (B,) image tokens kept


@register
class FastV(OverSequence):
    name = "fastv"
    config_class = FastVConfig
    options: FastVConfig

    def run_layers(self, vlm: VLM, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, MethodReport]:
        tokens, k = step.tokens, self.options.k
        report = FastVReport()
        for i, layer in enumerate(vlm.decoder.layers):
            tokens = tokens.resume(i, step.cache)  # decode: the pruned set a prefill left at layer k
            cache = step.layer_cache(i)
            if i == k - 1 and step.images is not None:  # prefill: this layer also ranks
                x, scores = self._ranked_layer(layer, x, tokens, cache)
                report.scores = scores
                continue
            if i == k and step.images is not None:
                keep = self.keep_mask(report.scores, tokens)  # (B, T)
                report.kept, report.kept_counts = keep, (keep & tokens.image).sum(1)
                x, tokens = tokens.shrink(x, keep, layer=i, renumber=False, cache=step.cache)
            x = layer(x, tokens.ctx, cache)
        return tokens.restore(x, step.tokens.positions.shape[1]), report

    def _ranked_layer(self, layer: DecoderLayer, x: torch.Tensor, tokens: TokenSet,
                      cache: LayerCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer k - 1 with the ranking rows recomputed explicitly: the new hidden states and
        each prompt row's score (B, T): the attention it receives, mean over heads (and rows)."""
        b, t = tokens.positions.shape
        if self.options.rank_by == "last":
            index, valid = torch.full((b, 1), t - 1, device=x.device), tokens.row_valid[:, -1:]
        else:
            index, valid = torch.arange(t, device=x.device).expand(b, t), tokens.row_valid
        x, probs = layer.forward_rows(x, tokens.ctx, cache, Rows(index, valid))  # probs (B, H, R, Tk)
        probs = probs[..., -t:].mean(1)  # (B, R, T): over heads, this call's columns (no cache at prefill)
        weights = valid[..., None]  # (B, R, 1)
        probs = torch.where(weights, probs, 0.0)  # a left-padding row sees no key: its softmax is NaN
        scores = probs.sum(1) / weights.sum(1).clamp_min(1)  # (B, T) mean over the ranking rows
        return x, scores.masked_fill(~tokens.image, 0.0)

    def keep_mask(self, scores: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
        return keep_top_images(scores, tokens, lambda n: self.options.kept(n) if n else 0)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        """Layers before k over the whole prompt, layers k.. over the kept rows; the ranking
        rows recomputed explicitly at layer k - 1; decode steps attend to the pruned keys from k on."""
        assert isinstance(options, FastVConfig)
        plan = sequence_plan(cfg, options, workload)
        return with_pruned_layers(plan, cfg, options, workload)


def keep_top_images(scores: torch.Tensor, tokens: TokenSet, kept: Callable[[int], int]) -> torch.Tensor:
    """(B, T): every text row, and each sample's top `kept(n)` of its n image rows by `scores`
    (B, T) (ties to the earlier row). Shared by the token-reduction methods."""
    image = tokens.image & tokens.row_valid
    budget = torch.tensor([kept(int(n)) for n in image.sum(1).tolist()], device=scores.device)  # (B,)
    order = torch.sort(scores.masked_fill(~image, float("-inf")), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))  # (B, T) each row's place in the ranking
    return ~image | (rank < budget[:, None])


def with_pruned_layers(plan: CostPlan, cfg: VLMConfig, options: FastVConfig, workload: Workload) -> CostPlan:
    """`plan` with FastV's decoder: n image tokens, of which the layers from k on keep `kept(n)`."""
    t, k = cfg.text, options.k
    n = plan.image_tokens
    dropped = n - options.kept(n)
    rows = 1 if options.rank_by == "last" else None

    def prefill(seq: int) -> float:
        return k * decoder_layer(t, seq, seq) + (t.num_layers - k) * decoder_layer(t, seq - dropped, seq - dropped)

    def decode(keys: int) -> float:
        return k * decoder_layer(t, 1, keys) + (t.num_layers - k) * decoder_layer(t, 1, keys - dropped)

    plan.prefill_llm, plan.decode_llm = prefill, decode
    plan.prefill_extra = lambda seq: {"score_rows": attention(rows or seq, seq, t.num_heads, t.head_dim)}
    plan.image_schedule = ((k, n), (t.num_layers - k, n - dropped))  # image-macs: n tokens, then the kept
    return plan
