"""`sparsevlm`: SparseVLM (Zhang et al., ICML 2025), after the official code, batched.

Shape legend: B batch, T rows of the current token set, Tq text rows after the image,
R rater rows, v visual (image) tokens a sample holds, m recycled tokens, c clusters,
W text width, H heads.

What the official inference code does (DESIGN.md section 6), step for step:
1. Raters, once, at the decoder's input: each image token's softmax over the text AFTER
   the image (its embedding dotted with theirs), averaged over the image tokens; the text
   tokens scoring above the mean are the raters.
2. At each pruning layer (default 2, 6, 15 of 32, scaled to depth) the layer runs as usual,
   its rater rows recomputed explicitly: their attention (float32 softmax over every key,
   mean over heads) to the image tokens, averaged over the raters, ranks the image tokens;
   the layer's OUTPUT keeps the top `keep` (official budget lists at 576 tokens: "retain 192"
   = 300, 200, 110; 128 = 303, 110, 36; 64 = 66, 30, 17 - scaled to the image's tokens).
3. Recycling: of the dropped tokens, the top 30% (+1) by that score are clustered
   (density-peak clustering with k nearest neighbours, c = m // 10 + 1 centres) and each
   cluster's mean becomes a new image token, placed after the kept ones.
4. From the next layer on the set is shorter and positions are RENUMBERED contiguously (the
   official `position_ids[:, :n]`); decode positions follow each layer's own cache length,
   i.e. shift by the tokens dropped before it (`TokenSet.shrink(renumber=True)`).

Where Loupe differs, and why:
- Batched: every sample its own raters, ranking, recycling and counts (the official code
  reads batch item 0); the rater rows are every text row after the image, their scores
  averaged over each sample's raters (a fixed row count, so the cost is known in advance).
- The density peaks break ties by token order, where the official code adds uniform noise
  of 1e-6 (a run is then reproducible); distances come from a matrix product (the official
  code forms every difference vector: m^2 x W memory) - equal up to rounding.
- A budget at or above what a sample holds keeps everything (the official code keeps at
  most v - 1, so it always drops one token); `recycle=false` with such budgets is the base
  model exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from loupe.config import VLMConfig
from loupe.errors import ConfigError
from loupe.flops import CostPlan, Workload, attention, decoder_layer, linear
from loupe.methods.base import MethodConfig, MethodReport, Step, register
from loupe.methods.sequence import OverSequence, check_source, sequence_plan
from loupe.nn.decoder import DecoderLayer, Rows
from loupe.nn.kv_cache import LayerCache
from loupe.nn.tokens import TokenSet

if TYPE_CHECKING:
    from loupe.vlm import VLM

DEFAULT_LAYERS = (2 / 32, 6 / 32, 15 / 32)  # the official pruning layers of LLaVA-1.5-7B's 32
RETAIN = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}  # official lists at 576 tokens
OFFICIAL_TOKENS = 576


@dataclass(frozen=True)
class SparseVLMConfig(MethodConfig):
    name: ClassVar[str] = "sparsevlm"
    layers: list[int] | None = None  # pruning layers (their outputs shrink); None: 2, 6, 15 of 32, scaled
    retain: int = 192  # the official budget preset: 192 | 128 | 64 (its lists, scaled to the image's tokens)
    keep: list[int] | None = None  # or: image tokens kept after each pruning layer
    ratios: list[float] | None = None  # or: those as fractions of the image's tokens
    recycle: bool = True  # merge the best of the dropped tokens into new ones
    recycle_ratio: float = 0.3  # the share of the dropped tokens recycled (the most attended)
    cluster_ratio: float = 0.1  # clusters per recycled token (official: m // 10 + 1)
    hr_size: int = 0  # 0: LLaVA-1.5's native image tokens (the paper's); >0: LLaVA-HD's tiled sequence at that size

    def resolved_layers(self, cfg: VLMConfig) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        depth = cfg.text.num_layers
        return sorted({min(depth - 2, round(f * depth)) for f in DEFAULT_LAYERS})

    def validate(self, cfg: VLMConfig) -> None:
        depth = cfg.text.num_layers
        layers = self.resolved_layers(cfg)
        if not layers or not all(isinstance(i, int) for i in layers):
            raise ConfigError(f"layers={self.layers!r} must be a non-empty list of layer indices, e.g. [2, 6, 15]")
        bad = [i for i in layers if not 0 <= i < depth - 1]
        if bad:
            raise ConfigError(f"layers={layers} names layer(s) {bad} outside 0..{depth - 2} (a pruning layer "
                              f"needs a layer after it; the model has {depth} decoder layers)")
        if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
            raise ConfigError(f"layers={layers} must be strictly increasing")
        given = [name for name in ("keep", "ratios") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigError("give the budget as keep or as ratios, not both")
        if not given and self.retain not in RETAIN:
            raise ConfigError(f"retain={self.retain}: the official presets are {sorted(RETAIN)}")
        for name in given:
            values = getattr(self, name)
            if not isinstance(values, list) or len(values) != len(layers):
                raise ConfigError(f"{name}={values!r} must give one budget per pruning layer ({len(layers)})")
        if self.keep is not None and any(not isinstance(k, int) or k < 1 for k in self.keep):
            raise ConfigError(f"keep={self.keep} must be whole numbers of tokens, at least 1")
        if self.ratios is not None and any(not 0 < r <= 1 for r in self.ratios):
            raise ConfigError(f"ratios={self.ratios} must each be in (0, 1]")
        for name in ("recycle_ratio", "cluster_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be in (0, 1]")
        check_source(cfg, self)

    def resolved_hr_size(self, cfg: VLMConfig) -> int:
        return self.hr_size

    def budgets(self, n: int) -> list[int]:
        """Image tokens kept after each pruning layer, for an image of n tokens."""
        if self.keep is not None:
            over = [k for k in self.keep if k > n]
            if over:
                raise ConfigError(f"keep={self.keep} asks for {over[0]} tokens, more than the image's {n}")
            return list(self.keep)
        if self.ratios is not None:
            return [max(1, round(r * n)) for r in self.ratios]
        return [max(1, round(k * n / OFFICIAL_TOKENS)) for k in RETAIN[self.retain]]

    def recycled(self, dropped: int) -> tuple[int, int]:
        """(tokens recycled, clusters) from `dropped` tokens (the official int(d * 0.3) + 1, m // 10 + 1)."""
        if not self.recycle or dropped == 0:
            return 0, 0
        m = min(dropped, int(dropped * self.recycle_ratio) + 1)
        return m, min(m, int(m * self.cluster_ratio) + 1)

    def schedule(self, n: int) -> list[int]:
        """Image tokens held after each pruning layer (kept + clusters), from n."""
        held, out = n, []
        for budget in self.budgets(n):
            kept = min(budget, held)
            held = kept + self.recycled(held - kept)[1]
            out.append(held)
        return out

    def variant(self, cfg: VLMConfig) -> str:
        budget = (f"keep {','.join(map(str, self.keep))}" if self.keep is not None else
                  f"ratios {','.join(f'{r:g}' for r in self.ratios)}" if self.ratios is not None else
                  f"retain {self.retain}")
        return f"layers {','.join(map(str, self.resolved_layers(cfg)))}, {budget}" + ("" if self.recycle
                                                                                       else ", no recycling")


@dataclass
class SparseVLMReport(MethodReport):
    raters: torch.Tensor | None = None  # (B, T) True at the call's rows that rated
    kept_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # pruning layer -> (B,) image tokens after it


@register
class SparseVLM(OverSequence):
    name = "sparsevlm"
    config_class = SparseVLMConfig
    options: SparseVLMConfig

    def run_layers(self, vlm: VLM, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, MethodReport]:
        tokens, layers = step.tokens, set(self.options.resolved_layers(self.cfg))
        report = SparseVLMReport()
        prefill = step.images is not None
        if prefill:
            question = after_image(tokens)  # (B, T) the text after each sample's image
            report.raters = raters(x, tokens, question)
        for i, layer in enumerate(vlm.decoder.layers):
            tokens = tokens.resume(i, step.cache)  # decode: the (renumbered) set a prefill left after layer i - 1
            if prefill and i in layers:
                rows = Rows(*pick_rows(question.gather(1, tokens.index.clamp_min(0)) & tokens.row_valid))
                x, scores = self._rated_layer(layer, x, tokens, step.layer_cache(i), rows,
                                              report.raters.gather(1, tokens.index.clamp_min(0)))
                x, tokens = self._prune(x, tokens, scores, i, step)
                report.kept_counts[i] = (tokens.image & tokens.row_valid).sum(1)
                continue
            x = layer(x, tokens.ctx, step.layer_cache(i))
        return tokens.restore(x, step.tokens.positions.shape[1]), report

    def _rated_layer(self, layer: DecoderLayer, x: torch.Tensor, tokens: TokenSet, cache: LayerCache | None,
                     rows: Rows, rater: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer, and each row's score (B, T): the raters' attention to it, mean over heads
        and raters (0 off the image)."""
        x, probs = layer.forward_rows(x, tokens.ctx, cache, rows)  # probs (B, H, R, Tk)
        t = tokens.positions.shape[1]
        probs = probs[..., -t:].mean(1)  # (B, R, T) this call's columns (no cache before a prefill)
        weights = (rows.valid & rater.gather(1, rows.index))[..., None]  # (B, R, 1) the raters
        probs = torch.where(weights, probs, 0.0)  # a padding row sees no key: its softmax is NaN
        scores = probs.sum(1) / weights.sum(1).clamp_min(1)  # (B, T)
        return x, scores.masked_fill(~(tokens.image & tokens.row_valid), 0.0)

    def _prune(self, x: torch.Tensor, tokens: TokenSet, scores: torch.Tensor, layer: int,
               step: Step) -> tuple[torch.Tensor, TokenSet]:
        """The layer's output keeps, per sample, its top image tokens and one row per cluster
        of the recycled ones; the rows' states are then the kept tokens, then the clusters'."""
        image = tokens.image & tokens.row_valid
        budget = self._budget(layer, image, step)  # (B,)
        order = torch.sort(scores.masked_fill(~image, float("-inf")), dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=x.device)
                                                .expand_as(order))  # (B, T) place in the ranking
        kept = image & (rank < budget[:, None])
        keep, merged = ~image, []
        for b in range(x.shape[0]):
            dropped = order[b, int(budget[b]):int(image[b].sum())]  # the sample's dropped rows, best first
            m, c = self.options.recycled(len(dropped))
            centres, tokens_b = cluster_merge(x[b, dropped[:m]], c)  # (c,), (c, W)
            keep[b] |= kept[b]
            keep[b, dropped[:m][centres]] = True
            merged.append((x[b][kept[b]], tokens_b))
        x, out = tokens.shrink(x, keep, layer=layer + 1, renumber=True, cache=step.cache)
        x = x.clone()
        for b, (states, clusters) in enumerate(merged):  # image rows: kept tokens in order, then clusters
            rows = (out.image[b] & out.row_valid[b]).nonzero()[:, 0]
            x[b, rows] = torch.cat([states, clusters])
        return x, out

    def _budget(self, layer: int, image: torch.Tensor, step: Step) -> torch.Tensor:
        """(B,) image tokens each sample keeps at `layer` (its budget from its own image size)."""
        index = self.options.resolved_layers(self.cfg).index(layer)
        n = step.tokens.image.sum(1).tolist()  # each sample's original image tokens
        held = image.sum(1)
        wanted = torch.tensor([self.options.budgets(int(k))[index] for k in n], device=image.device)
        return torch.minimum(wanted, held)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        assert isinstance(options, SparseVLMConfig)
        return with_sparse_layers(sequence_plan(cfg, options, workload), cfg, options, workload)


def after_image(tokens: TokenSet) -> torch.Tensor:
    """(B, T) True at each sample's text rows after its last image row."""
    t = tokens.image.shape[1]
    last = torch.where(tokens.image, torch.arange(t, device=tokens.image.device), -1).max(1).values  # (B,)
    return (torch.arange(t, device=last.device) > last[:, None]) & tokens.row_valid & ~tokens.image


def raters(x: torch.Tensor, tokens: TokenSet, question: torch.Tensor) -> torch.Tensor:
    """(B, T) the text rows that rate: each image token's softmax over the question rows (its
    embedding dotted with theirs), averaged over the image tokens, above the mean."""
    out = torch.zeros_like(question)
    image = tokens.image & tokens.row_valid
    for b in range(x.shape[0]):
        text = question[b].nonzero()[:, 0]
        relevance = (x[b][image[b]].float() @ x[b, text].float().T).softmax(-1).mean(0)  # (Tq,)
        out[b, text[relevance > relevance.mean()]] = True
    return out


def pick_rows(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) chosen rows -> their indices (B, R) and validity (B, R), left-aligned, padded."""
    r = max(1, int(chosen.sum(1).max()))
    order = torch.sort(chosen.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :r]
    return order, chosen.gather(1, order)


def cluster_merge(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering (k = count nearest neighbours) of tokens x (m, W): the centres'
    indices (c,) and each cluster's mean (c, W), in the order of the centres' scores."""
    m, w = x.shape
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device), x[:0]
    x32 = x.float()
    sq = (x32 * x32).sum(-1)
    dist = (sq[:, None] + sq[None, :] - 2 * x32 @ x32.T).clamp_min(0).sqrt() / math.sqrt(w)  # (m, m)
    near = dist.topk(count, dim=-1, largest=False).values  # (m, k) itself first
    density = (-(near**2).mean(-1)).exp() - torch.arange(m, device=x.device) * 1e-12  # ties: earlier token first
    higher = density[None, :] > density[:, None]  # (m, m) [i, j]: j is denser than i
    parent = torch.where(higher, dist, dist.max()).min(-1).values  # (m,) distance to a denser token
    centres = (parent * density).topk(count).indices  # (c,)
    assign = dist[centres].argmin(0)  # (m,) each token's nearest centre
    assign[centres] = torch.arange(count, device=x.device)  # a centre belongs to itself
    onehot = F.one_hot(assign, count).to(x.dtype)  # (m, c)
    return centres, (onehot.T @ x) / onehot.sum(0)[:, None]


def with_sparse_layers(plan: CostPlan, cfg: VLMConfig, options: SparseVLMConfig, workload: Workload) -> CostPlan:
    """`plan` with SparseVLM's decoder: n image tokens up to and including the first pruning
    layer, then each pruning layer's kept + clusters; the raters' relevance at the input, the
    question rows recomputed at each pruning layer, the clustering of the recycled tokens."""
    t, n = cfg.text, plan.image_tokens
    layers, held = options.resolved_layers(cfg), options.schedule(n)
    bounds = [0, *[i + 1 for i in layers], t.num_layers]
    counts = [n, *held]
    pieces = [(bounds[j + 1] - bounds[j], counts[j]) for j in range(len(counts))]  # (layers, image tokens)
    question = workload.prompt_tokens if workload.question_tokens is None else workload.question_tokens

    def prefill(seq: int) -> float:
        return sum(k * decoder_layer(t, seq - n + v, seq - n + v) for k, v in pieces)

    def decode(keys: int) -> float:
        return sum(k * decoder_layer(t, 1, keys - n + v) for k, v in pieces)

    def extras(seq: int) -> dict[str, float]:
        rows = sum(attention(question, seq - n + counts[j], t.num_heads, t.head_dim) for j in range(len(layers)))
        merging, before = 0.0, n
        for budget in options.budgets(n):
            kept = min(budget, before)
            m, c = options.recycled(before - kept)
            merging += linear(m, t.hidden_size, m) + linear(c, m, t.hidden_size) if c else 0.0
            before = kept + c
        return {"relevance": linear(n, t.hidden_size, question), "rater_rows": rows, "recycling": merging}

    plan.prefill_llm, plan.decode_llm, plan.prefill_extra = prefill, decode, extras
    plan.image_schedule = tuple((float(k), float(v)) for k, v in pieces)
    return plan
