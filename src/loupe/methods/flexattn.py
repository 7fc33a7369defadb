"""`flexattn`: FlexAttention (Li et al., ECCV 2024), exact to the official code, batched.

Shape legend: B batch, T new rows, Tk keys (cached + new), R rows that see HR per sample,
H query heads, G key/value heads, D head dim, W text width, g LR grid side, N = g*g LR
image tokens, M HR tokens, S selected HR tokens (padded to the batch's largest).

Layers before `first_layer - 1` are vanilla. Layer `first_layer - 1` is vanilla too but
also yields, for each HR row, the attention over the LR image columns from which the
first selection is made. From `first_layer` on, each layer is a hierarchical
self-attention: the HR rows attend to [text/LR keys ; selected HR keys], with
    K_hr = RoPE_hr(n(Z) W'_K),  V_hr = n(Z) W'_V   (Z = selected HR features; n = a per-layer
    RMSNorm initialised from the layer's input norm, Loupe's default, or none as officially)
and each layer selects anew, from its own attention, for the next layer (DESIGN.md §2).

Which rows see HR (`hr_rows="answer"`, official): with `loss_rows` (training) the rows that
predict answer tokens; otherwise the last row (inference), and every generated token's row.
Prompt rows never see HR, and HR tokens are never queries. `hr_rows="text"` (beyond the
paper) adds every text row after the image - the question and its options - each with its
own selection, so a prompt row can read HR detail before the answer row reads it.

Fast: all rows go through the fused kernel; only the R HR rows (1 per sample at
inference) are recomputed eagerly, which is where the selection probabilities come from;
no full attention map is ever materialised. In generation the projections Z W'_K, Z W'_V
are memoised per layer and request, so each HR token is projected at most once; the memo
is compact (`HRMemo`: memory grows with the tokens projected, not with the HR grid) and a
layer attends over its slots under the selection's mask, so a decode step gathers nothing.
Its one host read per HR layer is how many tokens it must project anew: that count is data,
and it sizes the projection (a static shape would project a fixed number every step). With
`lazy_hr=True` the HR tiles are encoded on first use too (`TileFeatures`), only those a
selection reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from loupe.config import TextConfig, VLMConfig
from loupe.errors import ConfigError, LoupeError
from loupe.flops import CostPlan, Workload, attention, linear
from loupe.methods import selection
from loupe.methods.base import (
    ImageFeatures,
    ImageInputs,
    MethodConfig,
    MethodReport,
    RunOptions,
    Step,
    TrainDraw,
    TrainStep,
    cached_state,
    keep_state,
    register,
)
from loupe.methods.highres import HighResMethod, TiledConfig, TileFeatures, low_res, tiled_plan
from loupe.nn.decoder import ExtraKeys, RMSNorm, Rows
from loupe.nn.rope import Rope

if TYPE_CHECKING:
    from loupe.vlm import VLM


@dataclass(frozen=True)
class FlexAttnConfig(TiledConfig):
    name: ClassVar[str] = "flexattn"
    first_layer: int = 0  # 0: the same fraction of depth as layer 9 of 32
    threshold: float = 48.0  # binarisation threshold on the 0..255 scale
    pool: int = 0  # coarse grid side, one cell = one block of HR tokens; 0: 9 (the paper's), or the grid where smaller
    strategy: str = "attnmap"  # attnmap | random | center | oracle (needs the tag boxes: FlexRun)
    budget: float | None = None  # keep the top fraction of blocks instead of thresholding
    ablation_ratio: float = 0.1  # block fraction of the random / center strategies
    source: str = "official"  # official: attention without HR columns; paper: first N columns of it
    memoise: bool = True  # project each HR token at most once per request in generation
    # Encode an HR tile the first time a selection reads one of its tokens, only those (beyond
    # both papers; outputs equal). Off by default: on the selections measured so far (the
    # threshold rule on the synth base, a random budget at 7B shapes) nearly every tile is read
    # anyway, and encoding them in several batches inside the layer loop cost more wall time
    # and peak memory than one batch at prefill (docs/benchmarks.md). False: as the papers do.
    lazy_hr: bool = False
    gate_warmup: float = 10.0  # the official training gate: a = min(1, epoch * gate_warmup)
    # HR features before W'_K, W'_V: "layer" = a per-layer RMSNorm initialised from the layer's
    # input norm (Loupe's default: W_K was trained on normed hidden states, and the projector's
    # output is ~20x their scale - DESIGN.md section 2); "none" = the raw projector output (official).
    hr_norm: str = "layer"
    # Which rows see HR: "answer" = the rows that predict answer tokens in training, the last
    # row (and each generated token's) in inference (official); "text" = those and every text
    # row after the image (beyond the paper: a multiple-choice question's options can each be
    # checked against the detail in their own rows, as LLaVA-HD's every row can).
    hr_rows: str = "answer"

    # Checkpoints saved before `hr_norm` existed were trained on raw HR features.
    saved_defaults: ClassVar[dict[str, object]] = {"hr_norm": "none"}

    def variant(self, cfg: VLMConfig) -> str:
        """Labels the cost switches off their defaults (the outputs are the same either way)."""
        return ", ".join(label for on, label in ((self.lazy_hr, "lazy tiles"), (not self.memoise, "no memo")) if on)

    def resolved_first_layer(self, cfg: VLMConfig) -> int:
        return self.first_layer or max(1, round(9 / 32 * cfg.text.num_layers))

    def validate(self, cfg: VLMConfig) -> None:
        super().validate(cfg)
        self.validate_selection(cfg, self.resolved_hr_size(cfg) // cfg.vision.patch_size)

    def validate_selection(self, cfg: VLMConfig, hr_grid: int) -> None:
        """Everything but how the HR tokens are made; `hr_grid`: the HR grid's (shorter) side."""
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
        if not 0 <= self.pool <= min(cfg.vision.grid, hr_grid):
            raise ConfigError(f"pool={self.pool} must be in 1..{min(cfg.vision.grid, hr_grid)} (0: the default, 9 or "
                              "the grid where smaller)")
        if self.strategy not in selection.STRATEGIES:
            raise ConfigError(f"strategy={self.strategy!r}; choose one of {list(selection.STRATEGIES)}")
        if self.source not in ("official", "paper"):
            raise ConfigError(f"source={self.source!r}; choose 'official' or 'paper'")
        if not self.gate_warmup > 0:
            raise ConfigError(f"gate_warmup={self.gate_warmup} must be > 0")
        if self.hr_norm not in HR_NORMS:
            raise ConfigError(f"hr_norm={self.hr_norm!r}; choose one of {list(HR_NORMS)}")
        if self.hr_rows not in HR_ROWS:
            raise ConfigError(f"hr_rows={self.hr_rows!r}; choose one of {list(HR_ROWS)}")


HR_NORMS = ("layer", "none")
HR_ROWS = ("answer", "text")


class HRProjection(nn.Module):
    """W'_K, W'_V of one FlexAttention layer (with a bias where the base's k/v have one, as
    Qwen2's; the official k_proj_hd/v_proj_hd of LLaMA have none), and the optional norm on Z."""

    def __init__(self, cfg: TextConfig, normed: bool) -> None:
        super().__init__()
        width, kv_width = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
        bias = cfg.attention_bias or cfg.qkv_bias
        self.norm = RMSNorm(width, cfg.rms_norm_eps) if normed else None
        self.k_proj = nn.Linear(width, kv_width, bias=bias)
        self.v_proj = nn.Linear(width, kv_width, bias=bias)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HR features (B, S, W) -> unrotated keys, values (B, S, G*D)."""
        if self.norm is not None:
            z = self.norm(z)
        return self.k_proj(z), self.v_proj(z)


@dataclass
class HRMemo:
    """One layer's projected HR keys/values in a request, compact: slot j of sample b holds the
    rotated key and the value of HR token `token[b, j]`. Slots are appended (capacity doubling,
    as a list), so memory follows the tokens projected, not the HR grid; C = capacity, U = used."""

    k: torch.Tensor  # (B, G, C, D) rotated keys
    v: torch.Tensor  # (B, G, C, D)
    token: torch.Tensor  # (B, C) the HR token in each slot (0 where empty)
    filled: torch.Tensor  # (B, C) bool: the slot holds a projection (samples project unequal counts)
    done: torch.Tensor  # (B, M) bool: the token is projected
    used: int = 0  # slots [0, used) have been written

    @classmethod
    def empty(cls, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> HRMemo:
        kv = torch.zeros(batch, heads, 0, head_dim, dtype=dtype, device=device)
        return cls(kv, kv.clone(), torch.zeros(batch, 0, dtype=torch.long, device=device),
                   torch.zeros(batch, 0, dtype=torch.bool, device=device),
                   torch.zeros(batch, tokens, dtype=torch.bool, device=device))

    def add(self, token: torch.Tensor, real: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append tokens (B, n) (`real` (B, n) False at padding) with their k, v (B, G, n, D)."""
        start, end = self.used, self.used + token.shape[1]
        if end > self.k.shape[2]:
            self._grow(max(end, 2 * self.k.shape[2]))
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.token[:, start:end], self.filled[:, start:end] = token, real
        self.done |= torch.zeros_like(self.done).scatter_(1, token, real)  # tokens in a row are distinct
        self.used = end

    def slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The written slots: k, v (B, G, U, D), their tokens (B, U) and which are filled (B, U)."""
        u = self.used
        return self.k[:, :, :u], self.v[:, :, :u], self.token[:, :u], self.filled[:, :u]

    def _grow(self, capacity: int) -> None:
        def wider(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = capacity
            out = t.new_zeros(shape)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out

        self.k, self.v = wider(self.k, 2), wider(self.v, 2)
        self.token, self.filled = wider(self.token, 1), wider(self.filled, 1)


@dataclass
class FlexState:
    """Per request: built at prefill, kept in the cache for the decode steps."""

    hr: torch.Tensor | TileFeatures  # (B, M, W) HR features, or tiles encoded on first use
    hr_rope: Rope  # (B, M, D) angles of the HR keys
    image_cols: torch.Tensor  # (B, N) key index of each LR image token
    allowed: torch.Tensor  # (B, g, g) False on the square-padding margin
    hr_valid: torch.Tensor  # (B, M) False at padding HR slots (images of different HR lengths)
    memo: dict[int, HRMemo] = field(default_factory=dict)  # layer -> its projected HR keys/values
    hr_grids: list[tuple[int, int]] | None = None  # per image (rows, cols) of its HR grid, where they differ
    memoise: bool = False  # keep projections across calls (generation with a cache)
    projected_count: torch.Tensor | None = None  # () HR tokens projected so far (all layers), on the device

    @property
    def tokens(self) -> int:
        """M: HR tokens per sample."""
        return self.hr.shape[1]

    @property
    def projected(self) -> int:
        """HR tokens projected so far in this request (all layers); reads the device."""
        return 0 if self.projected_count is None else int(self.projected_count)

    def count_projected(self, real: torch.Tensor) -> None:
        n = real.sum()
        self.projected_count = n if self.projected_count is None else self.projected_count + n

    def hr_features(self, idx: torch.Tensor) -> torch.Tensor:
        """HR features (B, S, W) of tokens idx (B, S)."""
        if isinstance(self.hr, TileFeatures):
            return self.hr.gather(idx)
        return self.hr.gather(1, idx[..., None].expand(-1, -1, self.hr.shape[-1]))


@dataclass
class FlexReport(MethodReport):
    """FlexAttention's report: per layer that selects for the next, the HR tokens each HR row chose."""

    selection: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, R, M) bool
    lr_attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, R, N) over the LR image
    hr_rows: torch.Tensor | None = None  # (B, R) index of each HR row among the call's rows
    hr_rows_valid: torch.Tensor | None = None  # (B, R) False at padding

    def answer_selection(self) -> dict[int, torch.Tensor]:
        return {layer: self._last_row(sel) for layer, sel in self.selection.items()}  # (B, M) the last HR row's

    def answer_attention(self) -> dict[int, torch.Tensor]:
        return {layer: self._last_row(att) for layer, att in self.lr_attention.items()}  # (B, N)

    def _last_row(self, per_row: torch.Tensor) -> torch.Tensor:
        """(B, R, X) -> (B, X) at each sample's last real HR row (its real rows come first)."""
        if self.hr_rows_valid is None or per_row.shape[1] == 1:
            return per_row[:, -1]
        last = (self.hr_rows_valid.sum(1) - 1).clamp_min(0).to(per_row.device)  # (B,)
        return per_row.gather(1, last[:, None, None].expand(-1, 1, per_row.shape[2]))[:, 0]


@dataclass
class FlexRun(RunOptions):
    """FlexAttention's per-call choices: the oracle's ground truth."""

    boxes: torch.Tensor | None = None  # (B, 4) each sample's tag [left, top, right, bottom], fractions of the image
    ratio: float | None = None  # the oracle's block budget (None: the options' ablation_ratio)


@register
class FlexAttention(HighResMethod):
    name = "flexattn"
    config_class = FlexAttnConfig
    run_class = FlexRun
    options: FlexAttnConfig

    def __init__(self, cfg: VLMConfig, options: FlexAttnConfig) -> None:
        super().__init__(cfg, options)
        self.first = options.resolved_first_layer(cfg)
        self.hr_grid = self.hr_size // cfg.vision.patch_size
        t = cfg.text
        self.layers = nn.ModuleDict({str(i): HRProjection(t, normed=options.hr_norm == "layer")
                                     for i in range(self.first, t.num_layers)})
        # The training gate a (HR rows mix (1 - a) * out_noHR + a * out_HR), a persistent buffer so
        # that a checkpoint saved mid-warm-up resumes where it was; 1 = fully hierarchical.
        self.register_buffer("gate", torch.ones(()), persistent=True)
        # While training, the exact (float64) value the official code mixes with; the buffer
        # holds it in the model's dtype, which would round 1 - a differently during warm-up.
        self._training_gate: float | None = None

    def init_buffers(self) -> None:
        self.gate.fill_(1.0)

    def current_gate(self) -> float:
        return self._training_gate if self._training_gate is not None else float(self.gate)

    def gate_at(self, epoch: float) -> float:
        """The official training gate a = min(1, epoch * gate_warmup) (epoch may be fractional)."""
        if epoch < 0:
            raise LoupeError(f"the training gate needs epoch >= 0, got epoch={epoch}")
        return min(1.0, epoch * self.options.gate_warmup)

    def on_train_step(self, where: TrainStep) -> TrainDraw:
        self._training_gate = self.gate_at(where.epoch)
        self.gate.fill_(self._training_gate)
        return TrainDraw()

    def on_train_end(self) -> None:
        self._training_gate = None
        self.gate.fill_(1.0)  # inference: HR rows fully hierarchical

    def init_from_base(self, vlm: VLM) -> None:
        """W'_K, W'_V (and their biases) start as copies of the layer's W_K, W_V (the official
        code's intent); the norm on Z as a copy of the layer's input norm."""
        with torch.no_grad():
            for key, proj in self.layers.items():
                layer = vlm.decoder.layers[int(key)]
                for mine, base in ((proj.k_proj, layer.self_attn.k_proj), (proj.v_proj, layer.self_attn.v_proj)):
                    mine.weight.copy_(base.weight)
                    if mine.bias is not None and base.bias is not None:
                        mine.bias.copy_(base.bias)
                if proj.norm is not None:
                    proj.norm.weight.copy_(layer.input_layernorm.weight)

    @classmethod
    def cost_plan(cls, cfg: VLMConfig, options: MethodConfig, workload: Workload) -> CostPlan:
        """Per sample and HR row (one, the last; with `hr_rows="text"` at prefill, every text
        row after the image): layers first-1.. recompute the row eagerly (its attention over
        the Tk keys, for the selection); layers first.. add its attention over the S selected
        HR tokens and project them with W'_K, W'_V - at prefill all S, at a memoised decode
        step only the fresh ones. With several rows, S is the union of their selections (the
        rows attend over it, masked to their own): `workload.selected` is then the fraction a
        layer projects. A decode step's row recomputation replaces the fused pass, so it costs
        nothing extra there."""
        assert isinstance(options, FlexAttnConfig)
        plan, m = cls.hr_plan(cfg, options, workload)
        t = cfg.text
        hierarchical = t.num_layers - options.resolved_first_layer(cfg)
        kv = t.num_kv_heads * t.head_dim
        s = workload.selected * m
        fresh = workload.fresh * m if workload.memoised else s
        after = workload.prompt_tokens if workload.question_tokens is None else workload.question_tokens
        prefill_rows = max(1, after) if options.hr_rows == "text" else 1

        def hr(projected: float, rows: int) -> dict[str, float]:
            return {"hr_attention": hierarchical * rows * attention(1, s, t.num_heads, t.head_dim),
                    "hr_projection": hierarchical * 2 * linear(projected, t.hidden_size, kv)}

        def prefill(tokens: int) -> dict[str, float]:
            recompute = (hierarchical + 1) * prefill_rows * attention(1, tokens, t.num_heads, t.head_dim)
            return {**hr(s, prefill_rows), "hr_row_recompute": recompute}

        plan.prefill_extra, plan.decode_extra = prefill, lambda keys: hr(fresh, 1)
        plan.image_parts = ("hr_attention", "hr_projection")
        return plan

    @classmethod
    def hr_plan(cls, cfg: VLMConfig, options: FlexAttnConfig, workload: Workload) -> tuple[CostPlan, int]:
        """The encoder's part of the plan (with `lazy_hr`, the workload's fraction of tiles), and M:
        the k x k tiles' tokens."""
        return tiled_plan(cfg, options.resolved_hr_size(cfg), workload.hr_tiles if options.lazy_hr else 1.0)

    def assemble(self, features: ImageFeatures, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        hr = self.hr_of(features)  # (I, M, W)
        sizes = None if image_sizes is None else image_sizes.to(hr.device)
        return ImageInputs(features.lr, hr=hr, image_sizes=sizes)  # (I, N, W)

    def encode(self, vlm: VLM, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> ImageInputs:
        """LR features now; with `lazy_hr` the HR tiles later, each when a selection first reads it."""
        if not self.options.lazy_hr:
            return super().encode(vlm, pixel_values, image_sizes)
        lr = vlm.image_features(low_res(pixel_values, self.cfg.vision.image_size))  # (I, N, W)
        sizes = None if image_sizes is None else image_sizes.to(lr.device)
        return ImageInputs(lr, hr=TileFeatures(vlm, pixel_values), image_sizes=sizes)

    # ---- layer loop -----------------------------------------------------------------
    def static_decode(self) -> str | None:
        return ("flexattn's decode step projects the HR tokens its selection reaches for the first time: how many "
                "is data, so the step's shapes change with it (see HRMemo)")

    def run_layers(self, vlm: VLM, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, FlexReport]:
        req = self._request(vlm, step, x.shape[0])
        boxes = self._oracle_boxes(step)
        rows, row_valid, all_real = self._hr_rows(step, x.shape[:2])  # (B, R), (B, R)
        gate = self.current_gate()
        sel: torch.Tensor | None = None  # (B, R, M) selection made by the previous layer
        report = FlexReport(hr_rows=rows, hr_rows_valid=row_valid)
        projected_before = req.projected_count  # () on the device; replaced, never written in place
        for i, layer in enumerate(vlm.decoder.layers):
            cache = step.layer_cache(i)
            if i < self.first - 1:
                x = layer(x, step.ctx, cache)
                continue
            extra = self._hr_keys(i, req, sel, gate) if i >= self.first and sel is not None else None
            # The HR rows recomputed explicitly: their attention over the LR image columns is
            # what the next layer selects from (DESIGN.md section 2).
            x, probs = layer.forward_rows(x, step.ctx, cache, Rows(rows, row_valid, extra, columns=None,
                                                                   probs_without_extra=self._official(),
                                                                   all_valid=all_real))
            attn_lr = probs[..., : step.key_valid.shape[1]].sum(1)  # (B, R, Tk) summed over heads
            attn_lr = attn_lr.gather(2, req.image_cols[:, None].expand(-1, rows.shape[1], -1)).detach()  # (B, R, N)
            report.lr_attention[i] = attn_lr
            if i + 1 < len(vlm.decoder.layers):  # the last layer has no next layer to select for
                sel = self._select(attn_lr, req, row_valid, boxes)  # (B, R, M) for layer i + 1
                report.selection[i + 1] = sel
                report.selected_fraction[i + 1] = _fraction(sel, row_valid, req.hr_valid)
        hr_layers = len(vlm.decoder.layers) - self.first
        report.projected_fraction = self._projected_fraction(req, projected_before, hr_layers)
        if isinstance(req.hr, TileFeatures):
            report.tiles_encoded = req.hr.encoded / (req.hr.tiles_per_image * x.shape[0])
        return x, report

    @staticmethod
    def _projected_fraction(req: FlexState, before: torch.Tensor | None, hr_layers: int) -> float:
        """HR tokens this call projected / (HR tokens x HR layers), in one host read."""
        if req.projected_count is None:
            return 0.0
        fresh = req.projected_count if before is None else req.projected_count - before
        return float(fresh / (req.hr_valid.sum() * hr_layers))

    def _official(self) -> bool:
        return self.options.source == "official"

    def _oracle_boxes(self, step: Step) -> tuple[torch.Tensor, float] | None:
        """The tag boxes (B, 4) and block budget of an oracle call (None: select as the options say)."""
        run = step.run if isinstance(step.run, FlexRun) else None
        if run is None or run.boxes is None:
            if self.options.strategy == "oracle":
                raise LoupeError("strategy='oracle' selects the ground-truth tag blocks: pass each sample's tag box "
                                 "(run=FlexRun(boxes=...))")
            return None
        b = step.image_mask.shape[0]
        if tuple(run.boxes.shape) != (b, 4):
            raise LoupeError(f"FlexRun.boxes of shape {tuple(run.boxes.shape)}: expected ({b}, 4), one "
                             "[left, top, right, bottom] box per sample")
        return run.boxes.to(step.image_mask.device), run.ratio or self.options.ablation_ratio

    def run_options(self, run: RunOptions | None) -> MethodConfig:
        """An oracle call is costed and labelled as `strategy="oracle"` at its budget."""
        if isinstance(run, FlexRun) and run.boxes is not None:
            return dataclasses.replace(self.options, strategy="oracle",
                                       ablation_ratio=run.ratio or self.options.ablation_ratio)
        return self.options

    # ---- selection ------------------------------------------------------------------
    def _select(self, attn_lr: torch.Tensor, req: FlexState, row_valid: torch.Tensor,
                boxes: tuple[torch.Tensor, float] | None) -> torch.Tensor:
        b, r, _ = attn_lr.shape
        g = self.cfg.vision.grid
        allowed = req.allowed[:, None].expand(b, r, g, g).reshape(b * r, g, g)
        o = self.options
        strategy, ratio, row_boxes = o.strategy, o.ablation_ratio, None
        if boxes is not None:  # the oracle: every row of a sample selects its tag's blocks
            strategy, ratio = "oracle", boxes[1]
            row_boxes = boxes[0][:, None].expand(b, r, 4).reshape(b * r, 4)
        pool = o.pool or min(9, g, self.hr_grid)
        blocks = selection.select_blocks(attn_lr.reshape(b * r, g, g), allowed, pool=pool, threshold=o.threshold,
                                         strategy=strategy,  # type: ignore[arg-type]
                                         budget=o.budget, ablation_ratio=ratio, boxes=row_boxes)  # (B*R, P, P)
        return self._spread(blocks.view(b, r, pool, pool), req) & row_valid[..., None]  # (B, R, M)

    def _spread(self, blocks: torch.Tensor, req: FlexState) -> torch.Tensor:
        """Blocks (B, R, P, P) -> the HR tokens they hold (B, R, M): nearest over the square HR grid."""
        b, r, p, _ = blocks.shape
        return selection.upsample(blocks.view(b * r, p, p), self.hr_grid).view(b, r, -1)

    def _hr_keys(self, i: int, req: FlexState, sel: torch.Tensor, gate: float) -> ExtraKeys:
        """Keys/values of the HR tokens any row of a sample selected, and each row's mask."""
        if req.memoise:
            return self._memo_keys(i, req, sel, gate)
        union = sel.any(1)  # (B, M)
        s = max(1, int(union.sum(1).max()))
        idx = torch.argsort((~union).to(torch.int8), dim=1, stable=True)[:, :s]  # (B, S) selected first
        picked = union.gather(1, idx)  # (B, S)
        k_hr, v_hr = self._project_now(i, req, idx, picked)  # (B, G, S, D) x2
        hr_mask = sel.gather(2, idx[:, None].expand(-1, sel.shape[1], -1)) & picked[:, None]  # (B, R, S)
        return ExtraKeys(k_hr, v_hr, hr_mask, gate)

    def _memo_keys(self, i: int, req: FlexState, sel: torch.Tensor, gate: float) -> ExtraKeys:
        """The layer's memo, with the tokens selected for the first time projected into it. The
        rows attend over every slot, masked to what each selected (a masked slot weighs exactly
        0), so nothing is gathered and a repeated selection projects nothing."""
        memo = req.memo.get(i)
        if memo is None:
            t = self.cfg.text
            weight = self.layers[str(i)].k_proj.weight
            memo = req.memo[i] = HRMemo.empty(sel.shape[0], t.num_kv_heads, req.tokens, t.head_dim,
                                              weight.dtype, sel.device)
        need = sel.any(1) & ~memo.done  # (B, M) selected, not projected yet
        n = int(need.sum(1).max())  # the layer's one host read: how many tokens it projects
        if n:
            new = torch.argsort((~need).to(torch.int8), dim=1, stable=True)[:, :n]  # (B, n) needed first
            real = need.gather(1, new)  # (B, n) False where a sample needs fewer
            memo.add(new, real, *self._project_now(i, req, new, real))
        k, v, token, filled = memo.slots()  # (B, G, U, D) x2, (B, U) x2
        mask = sel.gather(2, token[:, None].expand(-1, sel.shape[1], -1)) & filled[:, None]  # (B, R, U)
        return ExtraKeys(k, v, mask, gate)

    def _project_now(self, i: int, req: FlexState, idx: torch.Tensor,
                     real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE_hr(n(Z) W'_K), n(Z) W'_V (B, G, S, D) of HR tokens idx (B, S); `real` (B, S) marks
        the ones counted as projected (the rest pad a sample to the batch's count)."""
        proj = self.layers[str(i)]
        z = req.hr_features(idx)  # (B, S, W)
        req.count_projected(real)
        g, d = self.cfg.text.num_kv_heads, self.cfg.text.head_dim
        b, s = idx.shape
        k, v = proj(z)  # (B, S, G*D) each
        k = k.view(b, s, g, d).transpose(1, 2)  # (B, G, S, D)
        v = v.view(b, s, g, d).transpose(1, 2)  # (B, G, S, D)
        return req.hr_rope.select(idx).apply(k), v

    # ---- per-request state ----------------------------------------------------------
    def _request(self, vlm: VLM, step: Step, batch: int) -> FlexState:
        state = cached_state(step, FlexState)
        if state is not None:
            return state
        if step.images is None or step.images.hr is None:
            raise LoupeError("flexattn needs an image: pass pixel_values (or encoded images) with the prompt")
        hr = step.images.hr  # (B, M, W), or its tiles encoded on first use
        if isinstance(hr, torch.Tensor):
            hr = hr.to(vlm.dtype)
        n = self.cfg.tokens_per_image
        counts = step.image_mask.sum(1)
        if hr.shape[0] != batch or bool((counts != n).any()):
            raise LoupeError(f"flexattn takes exactly one image per sample: got {hr.shape[0]} images and "
                             f"{counts.tolist()} image tokens for a batch of {batch} ({n} tokens per image)")
        offset = step.key_valid.shape[1] - step.image_mask.shape[1]  # keys cached before this call
        image_cols = offset + torch.nonzero(step.image_mask)[:, 1].view(batch, n)  # (B, N)
        valid = step.images.hr_valid
        device = image_cols.device
        req = FlexState(hr, self._hr_rope(step.ctx.rope, image_cols - offset, step.images), image_cols,
                        self._allowed(step.images, batch, device),
                        valid.to(device) if valid is not None else torch.ones(hr.shape[:2], dtype=torch.bool,
                                                                               device=device),
                        memoise=self.options.memoise and step.cache is not None)
        keep_state(step, req)
        return req

    def _allowed(self, images: ImageInputs, batch: int, device: torch.device) -> torch.Tensor:
        """(B, g, g) LR cells selection may use: not the square-padding margin."""
        return selection.margin_allowed(images.image_sizes, batch, self.cfg.vision.grid, device)

    def _hr_rope(self, rope: Rope, cols: torch.Tensor, images: ImageInputs) -> Rope:
        """HR key angles: cos/sin at the LR image positions, (g, g) grid, bicubic to HR grid."""
        g, b = self.cfg.vision.grid, cols.shape[0]
        lr = rope.select(cols)  # (B, N, D)

        def up(t: torch.Tensor) -> torch.Tensor:
            grid = t.float().view(b, g, g, -1).permute(0, 3, 1, 2)  # (B, D, g, g)
            hr = F.interpolate(grid, size=(self.hr_grid, self.hr_grid), mode="bicubic", align_corners=False)
            return hr.permute(0, 2, 3, 1).reshape(b, self.hr_grid**2, -1).to(t.dtype)  # (B, M, D)

        return Rope(up(lr.cos), up(lr.sin))

    def _hr_rows(self, step: Step, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor, bool | None]:
        """Indices (B, R) of the new rows that see HR, which of them are real, and whether the
        host knows that all are (inference: the one last row; None: read the mask). A sample's
        real rows fill the first of its R slots, in order (the rest repeat row T - 1, masked)."""
        b, t = shape
        marked = self._marked_rows(step, t)  # (B, T) or None
        if marked is None:
            return torch.full((b, 1), t - 1, device=step.image_mask.device), step.image_mask.new_ones(b, 1), True
        counts = marked.sum(1)
        r = max(1, int(counts.max()))
        order = torch.argsort((~marked).to(torch.int8), dim=1, stable=True)[:, :r]  # (B, R) marked first
        valid = torch.arange(r, device=counts.device)[None] < counts[:, None]  # (B, R)
        return torch.where(valid, order, t - 1), valid, None

    def _marked_rows(self, step: Step, t: int) -> torch.Tensor | None:
        """(B, T) True at the new rows that see HR; None: only the last row (inference, official)."""
        after = self._text_after_image(step, t) if self.options.hr_rows == "text" else None
        if step.loss_rows is not None:
            return step.loss_rows if after is None else step.loss_rows | after
        if after is None:
            return None
        last = torch.zeros_like(after)
        last[:, -1] = True  # the row that predicts the next token, as officially
        return after | last

    @staticmethod
    def _text_after_image(step: Step, t: int) -> torch.Tensor:
        """(B, T) True at the real new rows after the sample's last image token (all False
        on a decode step, whose new rows hold no image)."""
        pos = torch.arange(t, device=step.image_mask.device)
        last_image = torch.where(step.image_mask, pos, -1).max(1).values  # (B,) -1: none in these rows
        after = (pos[None] > last_image[:, None]) & (last_image[:, None] >= 0)  # (B, T)
        return after & step.key_valid[:, -t:]


def _fraction(sel: torch.Tensor, row_valid: torch.Tensor, hr_valid: torch.Tensor) -> torch.Tensor:
    """Fraction of a sample's (real) HR tokens that any of its real rows selected: (B,) - what
    the layer brings in for it (`Workload.selected`; one row's selection at inference, officially)."""
    union = (sel & row_valid[..., None]).any(1)  # (B, M)
    return union.float().sum(-1) / hr_valid.sum(-1).clamp_min(1)
