"""`flexattn`: FlexAttention (Li et al., ECCV 2024), exact to the official code, batched.

Shape legend: B batch, T new rows, Tk keys (cached + new), R rows that see HR per sample,
H query heads, G key/value heads, D head dim, W text width, g LR grid side, N = g*g LR
image tokens, M HR tokens, S selected HR tokens (padded to the batch's largest).

Layers before `first_layer - 1` are vanilla. Layer `first_layer - 1` is vanilla too but
also yields, for each HR row, the attention over the LR image columns from which the
first selection is made. From `first_layer` on, each layer is a hierarchical
self-attention: the HR rows attend to [text/LR keys ; selected HR keys], with
    K_hr = RoPE_hr(Z W'_K),  V_hr = Z W'_V   (Z = selected HR features, no norm)
and each layer selects anew, from its own attention, for the next layer (DESIGN.md §2).

Which rows see HR: with `loss_rows` (training) the rows that predict answer tokens;
otherwise the last row (inference), and every generated token's row. Prompt rows never
see HR, and HR tokens are never queries.

Fast: all rows go through the fused kernel; only the R HR rows (1 per sample at
inference) are recomputed eagerly, which is where the selection probabilities come from;
no full attention map is ever materialised. In generation the projections Z W'_K, Z W'_V
are memoised per layer and request, so each HR token is projected at most once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loupe.config import VLMConfig
from loupe.errors import ConfigError, LoupeError
from loupe.flops import CostPlan, Workload, attention, linear
from loupe.methods import selection
from loupe.methods.base import ImageInputs, MethodConfig, Step, register
from loupe.methods.highres import HighResMethod, check_hr_size, tiled_plan
from loupe.nn.attention import attend
from loupe.nn.decoder import DecoderLayer
from loupe.nn.rope import Rope

if TYPE_CHECKING:
    from loupe.vlm import VLM



@dataclass
class FlexAttnConfig(MethodConfig):
    name: ClassVar[str] = "flexattn"
    hr_size: int = 0  # 0: 3x the native size (1008 for 336)
    first_layer: int = 0  # 0: the same fraction of depth as layer 9 of 32
    threshold: float = 48.0  # binarisation threshold on the 0..255 scale
    pool: int = 9  # coarse grid side; one cell = one block of HR tokens
    strategy: str = "attnmap"  # attnmap | random | center
    budget: float | None = None  # keep the top fraction of blocks instead of thresholding
    ablation_ratio: float = 0.1  # block fraction of the random / center strategies
    source: str = "official"  # official: attention without HR columns; paper: first N columns of it
    memoise: bool = True  # project each HR token at most once per request in generation

    def resolved_hr_size(self, cfg: VLMConfig) -> int:
        return self.hr_size or 3 * cfg.vision.image_size

    def resolved_first_layer(self, cfg: VLMConfig) -> int:
        return self.first_layer or max(1, round(9 / 32 * cfg.text.num_layers))

    def validate(self, cfg: VLMConfig) -> None:
        check_hr_size(cfg, self.resolved_hr_size(cfg), tiled=True)
        layers, first = cfg.text.num_layers, self.resolved_first_layer(cfg)
        if not 1 <= first < layers:
            raise ConfigError(f"first_layer={first} is out of range: it must be in 1..{layers - 1} (the layer "
                              f"before it makes the first selection; the model has {layers} layers)")
        if not 0 <= self.threshold <= 255:
            raise ConfigError(f"threshold={self.threshold} must be in 0..255")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ConfigError(f"budget={self.budget} must be in (0, 1]")
        if not 0 < self.ablation_ratio <= 1:
            raise ConfigError(f"ablation_ratio={self.ablation_ratio} must be in (0, 1]")
        hr_grid = self.resolved_hr_size(cfg) // cfg.vision.patch_size
        if not 1 <= self.pool <= min(cfg.vision.grid, hr_grid):
            raise ConfigError(f"pool={self.pool} must be in 1..{min(cfg.vision.grid, hr_grid)}")
        if self.strategy not in selection.STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r}; choose one of {list(selection.STRATEGIES)}")
        if self.source not in ("official", "paper"):
            raise ConfigError(f"source={self.source!r}; choose 'official' or 'paper'")


class HRProjection(nn.Module):
    """W'_K, W'_V of one FlexAttention layer (no bias, as the official k_proj_hd/v_proj_hd)."""

    def __init__(self, width: int, kv_width: int) -> None:
        super().__init__()
        self.k_proj = nn.Linear(width, kv_width, bias=False)
        self.v_proj = nn.Linear(width, kv_width, bias=False)


@dataclass
class Request:
    """Per-request state: built at prefill, kept in the cache for the decode steps."""

    hr: torch.Tensor  # (B, M, W) HR features
    hr_rope: Rope  # (B, M, D) angles of the HR keys
    image_cols: torch.Tensor  # (B, N) key index of each LR image token
    allowed: torch.Tensor  # (B, g, g) False on the square-padding margin
    memo_k: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, G, M, D) rotated keys
    memo_v: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, G, M, D)
    memo_done: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, M) projected yet
    memoise: bool = False  # keep projections across calls (generation with a cache)
    projected: int = 0  # HR tokens projected so far in this request (all layers)


@register
class FlexAttention(HighResMethod):
    name = "flexattn"
    config_class = FlexAttnConfig
    options: FlexAttnConfig

    def __init__(self, cfg: VLMConfig, options: FlexAttnConfig) -> None:
        super().__init__(cfg, options)
        self.first = options.resolved_first_layer(cfg)
        self.hr_grid = self.hr_size // cfg.vision.patch_size
        t = cfg.text
        self.layers = nn.ModuleDict({str(i): HRProjection(t.hidden_size, t.num_kv_heads * t.head_dim)
                                     for i in range(self.first, t.num_layers)})
        self.gate = 1.0  # training gate a = min(1, epoch * warmup); 1 = HR rows fully hierarchical

    def set_gate(self, epoch: float, warmup: float = 10.0) -> float:
        """The official training gate: HR rows mix (1 - a) * out_noHR + a * out_HR with
        a = min(1, epoch * warmup) (epoch may be fractional). Returns a."""
        if epoch < 0 or warmup <= 0:
            raise LoupeError(f"gate needs epoch >= 0 and warmup > 0, got epoch={epoch}, warmup={warmup}")
        self.gate = min(1.0, epoch * warmup)
        return self.gate

    def init_from_base(self, vlm: VLM) -> None:
        """W'_K, W'_V start as copies of the layer's W_K, W_V (the official code's intent)."""
        with torch.no_grad():
            for key, proj in self.layers.items():
                attn = vlm.decoder.layers[int(key)].self_attn
                proj.k_proj.weight.copy_(attn.k_proj.weight)
                proj.v_proj.weight.copy_(attn.v_proj.weight)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        """Per sample (one HR row, the last): layers first-1.. recompute that row eagerly
        (its attention over the Tk keys, for the selection); layers first.. add its
        attention over the S selected HR tokens and project them with W'_K, W'_V - at
        prefill all S, at a memoised decode step only the fresh ones. A decode step's row
        recomputation replaces the fused pass, so it costs nothing extra there."""
        assert isinstance(options, FlexAttnConfig)
        plan, m = tiled_plan(cfg, options.resolved_hr_size(cfg))
        t = cfg.text
        hierarchical = t.num_layers - options.resolved_first_layer(cfg)
        kv = t.num_kv_heads * t.head_dim
        s = workload.selected * m
        fresh = workload.fresh * m if workload.memoised else s

        def hr(projected: float) -> dict[str, float]:
            return {"hr_attention": hierarchical * attention(1, s, t.num_heads, t.head_dim),
                    "hr_projection": hierarchical * 2 * linear(projected, t.hidden_size, kv)}

        def prefill(tokens: int) -> dict[str, float]:
            rows = (hierarchical + 1) * attention(1, tokens, t.num_heads, t.head_dim)
            return {**hr(s), "hr_row_recompute": rows}

        plan.prefill_extra, plan.decode_extra = prefill, lambda keys: hr(fresh)
        plan.image_parts = ("hr_attention", "hr_projection")
        return plan

    def assemble(self, features: dict[str, torch.Tensor], image_sizes: torch.Tensor | None = None) -> ImageInputs:
        extras = {"hr": features["hr"]}  # (I, M, W)
        if image_sizes is not None:
            extras["image_sizes"] = image_sizes.to(features["hr"].device)
        return ImageInputs(features["lr"], extras)  # (I, N, W)

    # ---- layer loop -----------------------------------------------------------------
    def run_layers(self, vlm: VLM, x: torch.Tensor, step: Step) -> torch.Tensor:
        req = self._request(vlm, step, x.shape[0])
        rows, row_valid = self._hr_rows(step, x.shape[:2])  # (B, R), (B, R)
        sel: torch.Tensor | None = None  # (B, R, M) selection made by the previous layer
        masks, fractions, projected_before = {}, {}, req.projected
        for i, layer in enumerate(vlm.decoder.layers):
            cache = step.cache.layers[i] if step.cache is not None else None
            if i < self.first - 1:
                x = layer(x, step.ctx, cache)
                continue
            x, attn_lr = self._layer(i, layer, x, step, cache, req, rows, row_valid, sel)
            if i + 1 < len(vlm.decoder.layers):  # the last layer has no next layer to select for
                sel = self._select(attn_lr, req, row_valid)  # (B, R, M) for layer i + 1
                masks[i + 1] = sel
                fractions[i + 1] = _fraction(sel, row_valid)
        step.info["selection"] = masks
        step.info["selected_fraction"] = fractions
        step.info["hr_rows"] = (rows, row_valid)
        hr_layers = len(vlm.decoder.layers) - self.first
        step.info["projected_fraction"] = (req.projected - projected_before) / (req.hr.shape[0] * req.hr.shape[1]
                                                                                * hr_layers)
        return x

    def _layer(self, i: int, layer: DecoderLayer, x: torch.Tensor, step: Step, cache, req: Request,
               rows: torch.Tensor, row_valid: torch.Tensor,
               sel: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer whose HR rows (hierarchical if i >= first) are recomputed eagerly.
        Returns the new hidden states and the HR rows' attention over the LR image columns."""
        attn = layer.self_attn
        q, k, v = attn.qkv(layer.input_layernorm(x), step.ctx.rope)  # (B, H, T, D), (B, G, T, D)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, G, Tk, D)
        q_rows = _gather_rows(q, rows)  # (B, H, R, D)
        key_mask = _row_key_mask(step, rows, k.shape[2])  # (B, R, Tk)
        hierarchical = i >= self.first and sel is not None
        # A decode step's only row is its HR row, whose eager recomputation below gives the
        # layer's whole output (with the training gate fully open): the fused pass is skipped.
        only_hr_rows = q.shape[2] == 1 and bool(row_valid.all()) and (self.gate == 1.0 or not hierarchical)
        out = None if only_hr_rows else attend(q, k, v, step.ctx.mask, causal=step.ctx.causal,
                                               kernel=step.ctx.kernel)[0]  # (B, H, T, D)
        if hierarchical:
            k_hr, v_hr, hr_mask = self._hr_keys(i, req, sel)  # (B, G, S, D) x2, (B, R, S)
            rows_out, probs = _row_attention(q_rows, k, v, key_mask, k_hr, v_hr, hr_mask,
                                             lr_probs=self.options.source == "official")
        else:
            rows_out, probs = _row_attention(q_rows, k, v, key_mask)
        if out is None:
            out = rows_out  # T == R == 1
        elif hierarchical:
            rows_out = (1 - self.gate) * _gather_rows(out, rows) + self.gate * rows_out
            out = _scatter_rows(out, rows, row_valid, rows_out)
        x = x + attn.o_proj(attn.merge(out))
        attn_lr = probs[..., : k.shape[2]].sum(1)  # (B, R, Tk) summed over heads
        attn_lr = attn_lr.gather(2, req.image_cols[:, None].expand(-1, rows.shape[1], -1))  # (B, R, N)
        return layer.feed_forward(x), attn_lr.detach()

    # ---- selection ------------------------------------------------------------------
    def _select(self, attn_lr: torch.Tensor, req: Request, row_valid: torch.Tensor) -> torch.Tensor:
        b, r, _ = attn_lr.shape
        g = self.cfg.vision.grid
        allowed = req.allowed[:, None].expand(b, r, g, g).reshape(b * r, g, g)
        o = self.options
        flat = selection.select(attn_lr.reshape(b * r, g, g), allowed, hr_grid=self.hr_grid, pool=o.pool,
                                threshold=o.threshold, strategy=o.strategy,  # type: ignore[arg-type]
                                budget=o.budget, ablation_ratio=o.ablation_ratio)
        return flat.view(b, r, -1) & row_valid[..., None]  # (B, R, M)

    def _hr_keys(self, i: int, req: Request, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys/values of the HR tokens any row of a sample selected, and each row's mask."""
        union = sel.any(1)  # (B, M)
        s = max(1, int(union.sum(1).max()))
        idx = torch.argsort((~union).to(torch.int8), dim=1, stable=True)[:, :s]  # (B, S) selected first
        picked = union.gather(1, idx)  # (B, S)
        k_hr, v_hr = self._project(i, req, idx)  # (B, G, S, D) x2
        hr_mask = sel.gather(2, idx[:, None].expand(-1, sel.shape[1], -1)) & picked[:, None]  # (B, R, S)
        return k_hr, v_hr, hr_mask

    def _project(self, i: int, req: Request, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE_hr(Z W'_K), Z W'_V for HR tokens idx (B, S); memoised per request if enabled."""
        if not req.memoise:
            return self._project_now(i, req, idx)
        if i not in req.memo_k:
            b, m = req.hr.shape[:2]
            shape = (b, self.cfg.text.num_kv_heads, m, self.cfg.text.head_dim)
            req.memo_k[i] = req.hr.new_zeros(shape)
            req.memo_v[i] = req.hr.new_zeros(shape)
            req.memo_done[i] = torch.zeros(b, m, dtype=torch.bool, device=req.hr.device)
        done = req.memo_done[i]
        need = torch.zeros_like(done).scatter(1, idx, True) & ~done  # (B, M)
        if bool(need.any()):
            n = int(need.sum(1).max())
            new = torch.argsort((~need).to(torch.int8), dim=1, stable=True)[:, :n]  # (B, n) needed first
            k_new, v_new = self._project_now(i, req, new)  # (B, G, n, D)
            slot = new[:, None, :, None].expand_as(k_new)
            req.memo_k[i].scatter_(2, slot, k_new)
            req.memo_v[i].scatter_(2, slot, v_new)
            req.memo_done[i] = done | need
        slot = idx[:, None, :, None].expand(-1, req.memo_k[i].shape[1], -1, req.memo_k[i].shape[3])
        return req.memo_k[i].gather(2, slot), req.memo_v[i].gather(2, slot)

    def _project_now(self, i: int, req: Request, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.layers[str(i)]
        z = req.hr.gather(1, idx[..., None].expand(-1, -1, req.hr.shape[-1]))  # (B, S, W)
        req.projected += idx.numel()
        g, d = self.cfg.text.num_kv_heads, self.cfg.text.head_dim
        b, s = idx.shape
        k = proj.k_proj(z).view(b, s, g, d).transpose(1, 2)  # (B, G, S, D)
        v = proj.v_proj(z).view(b, s, g, d).transpose(1, 2)  # (B, G, S, D)
        return req.hr_rope.select(idx).apply(k), v

    # ---- per-request state ----------------------------------------------------------
    def _request(self, vlm: VLM, step: Step, batch: int) -> Request:
        memo = step.cache.method_state if step.cache is not None else {}
        if "flexattn" in memo:
            return memo["flexattn"]
        if step.images is None or "hr" not in step.images.extras:
            raise LoupeError("flexattn needs an image: pass pixel_values (or encoded images) with the prompt")
        hr = step.images.extras["hr"].to(vlm.dtype)  # (B, M, W)
        n = self.cfg.tokens_per_image
        counts = step.image_mask.sum(1)
        if hr.shape[0] != batch or bool((counts != n).any()):
            raise LoupeError(f"flexattn takes exactly one image per sample: got {hr.shape[0]} images and "
                             f"{counts.tolist()} image tokens for a batch of {batch} ({n} tokens per image)")
        offset = step.key_valid.shape[1] - step.image_mask.shape[1]  # keys cached before this call
        image_cols = offset + torch.nonzero(step.image_mask)[:, 1].view(batch, n)  # (B, N)
        req = Request(hr, self._hr_rope(step.ctx.rope, image_cols - offset), image_cols,
                      selection.margin_allowed(step.images.extras.get("image_sizes"), batch, self.cfg.vision.grid,
                                               hr.device),
                      memoise=self.options.memoise and step.cache is not None)
        memo["flexattn"] = req
        return req

    def _hr_rope(self, rope: Rope, cols: torch.Tensor) -> Rope:
        """HR key angles: cos/sin at the LR image positions, (g, g) grid, bicubic to HR grid."""
        g, b = self.cfg.vision.grid, cols.shape[0]
        lr = rope.select(cols)  # (B, N, D)

        def up(t: torch.Tensor) -> torch.Tensor:
            grid = t.float().view(b, g, g, -1).permute(0, 3, 1, 2)  # (B, D, g, g)
            hr = F.interpolate(grid, size=(self.hr_grid, self.hr_grid), mode="bicubic", align_corners=False)
            return hr.permute(0, 2, 3, 1).reshape(b, self.hr_grid**2, -1).to(t.dtype)  # (B, M, D)

        return Rope(up(lr.cos), up(lr.sin))

    def _hr_rows(self, step: Step, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, R) of the new rows that see HR, and which of them are real."""
        b, t = shape
        if step.loss_rows is None:
            return torch.full((b, 1), t - 1, device=step.image_mask.device), step.image_mask.new_ones(b, 1)
        counts = step.loss_rows.sum(1)
        r = max(1, int(counts.max()))
        order = torch.argsort((~step.loss_rows).to(torch.int8), dim=1, stable=True)[:, :r]  # (B, R) marked first
        valid = torch.arange(r, device=counts.device)[None] < counts[:, None]  # (B, R)
        return torch.where(valid, order, t - 1), valid


def _fraction(sel: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
    """Mean selected fraction of HR tokens per sample over its real rows: (B,)."""
    per_row = sel.float().mean(-1)  # (B, R)
    return (per_row * row_valid).sum(1) / row_valid.sum(1).clamp_min(1)


def _gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, R, D)."""
    return x.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _scatter_rows(x: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) with its real rows (B, R) replaced by values (B, H, R, D)."""
    b_idx, r_idx = valid.nonzero(as_tuple=True)  # (K,) each
    out = x.clone()
    out[b_idx, :, rows[b_idx, r_idx]] = values[b_idx, :, r_idx]  # (K, H, D)
    return out


def _row_key_mask(step: Step, rows: torch.Tensor, tk: int) -> torch.Tensor:
    """(B, R, Tk): the keys each HR row may see in the ordinary causal, padded attention."""
    t = step.image_mask.shape[1]
    own = rows + (tk - t)  # (B, R) key index of each row
    k_pos = torch.arange(tk, device=rows.device)
    return (k_pos[None, None] <= own[..., None]) & step.key_valid[:, None, :]


def _row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                   k_hr: torch.Tensor | None = None, v_hr: torch.Tensor | None = None,
                   hr_mask: torch.Tensor | None = None, lr_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention of a few rows q (B, H, R, D) over keys (B, G, Tk, D) and, if given,
    HR keys (B, G, S, D); the two key sets are never concatenated, only their scores.

    Returns out (B, H, R, D) and probabilities: (B, H, R, Tk + S) of the hierarchical map,
    or, with `lr_probs`, (B, H, R, Tk) of the same rows' attention WITHOUT the HR columns
    (the official selection source), both from the same scores.
    """
    scale = 1 / math.sqrt(q.shape[-1])
    scores = _grouped_scores(q, k) * scale  # (B, H, R, Tk)
    scores = scores.masked_fill(~key_mask[:, None], float("-inf"))
    if k_hr is None or v_hr is None or hr_mask is None:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        return _grouped_mix(probs.to(q.dtype), v), probs
    hr_scores = (_grouped_scores(q, k_hr) * scale).masked_fill(~hr_mask[:, None], float("-inf"))  # (B, H, R, S)
    probs = torch.softmax(torch.cat([scores, hr_scores], dim=-1), dim=-1, dtype=torch.float32)
    tk = k.shape[2]
    p = probs.to(q.dtype)
    out = _grouped_mix(p[..., :tk], v) + _grouped_mix(p[..., tk:], v_hr)  # (B, H, R, D)
    return out, torch.softmax(scores, dim=-1, dtype=torch.float32) if lr_probs else probs


def _grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, R, D) . k (B, G, K, D) -> (B, H, R, K) without repeating k over the groups."""
    b, h, r, d = q.shape
    g = k.shape[1]
    qg = q.view(b, g, (h // g) * r, d)  # (B, G, H/G*R, D): heads of a group share keys
    return (qg @ k.transpose(-1, -2)).view(b, h, r, -1)


def _grouped_mix(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, H, R, K) . v (B, G, K, D) -> (B, H, R, D)."""
    b, h, r, kk = p.shape
    g = v.shape[1]
    return (p.reshape(b, g, (h // g) * r, kk) @ v).view(b, h, r, -1)
