"""FLOP formulas of Loupe's building blocks, and the plan through which each method
describes its cost to `loupe.cost`.

Shape legend: T rows (queries), Tk keys, W text width, H query heads, G key/value heads,
D head dim, m MLP width, E vision width, P patches per image side.

A FLOP here is 2 x one multiply-accumulate of a matrix product: linear layers, the patch
convolution, attention scores (Q K^T) and mixing (P V) - exactly what torch's
`FlopCounterMode` counts, which the tests hold every formula to. Norms, activations,
softmax, RoPE and gathers are elementwise and left out (under 1% at these shapes).
Attention is counted over the full T x Tk score matrix even when it is causal, as SDPA's
FLOP formula and the papers do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from loupe.config import TextConfig, VLMConfig
from loupe.errors import LoupeError


@dataclass(frozen=True)
class Workload:
    """What one request does. FLOPs are for the whole batch; each sample is the same."""

    prompt_tokens: int = 64  # text tokens of the prompt, besides the image tokens
    new_tokens: int = 1  # generated tokens: the first comes out of prefill, each further one is a decode step
    batch: int = 1
    selected: float = 0.1  # FlexAttention: fraction of HR tokens each HR layer selects (paper: about 10%)
    memoised: bool = True  # FlexAttention: decode steps reuse the HR keys/values projected before
    fresh: float = 0.0  # with memoised: fraction of HR tokens a decode step projects anew (0: selection repeats)
    # FlexAttention with lazy_hr: fraction of a sample's HR tiles the request encodes (1: every
    # tile, as the papers; measured: `MethodReport.tiles_encoded`)
    hr_tiles: float = 1.0
    lm_head: Literal["last", "all"] = "last"  # prefill logits for the last position only, or for all
    mix: tuple[float, ...] | None = None  # VISOR router: fraction of samples per configuration (cheapest first)
    # (height, width) of the input image, for models whose image tokens depend on it (OneVision's
    # AnyRes); None: the model's reference size (OneVision: its largest pinpoint, the most tokens)
    image_size: tuple[int, int] | None = None
    # Text tokens after the image (the question and the answer prompt): SparseVLM rates the image
    # with them; None: all of prompt_tokens.
    question_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.question_tokens is not None and not 0 <= self.question_tokens <= self.prompt_tokens:
            raise LoupeError(f"question_tokens={self.question_tokens} must be in 0..prompt_tokens={self.prompt_tokens}")
        for name in ("prompt_tokens", "new_tokens"):
            if getattr(self, name) < 0:
                raise LoupeError(f"{name}={getattr(self, name)} must not be negative")
        if self.batch < 1:
            raise LoupeError(f"batch={self.batch} must be at least 1")
        if not 0 < self.selected <= 1:
            raise LoupeError(f"selected ratio {self.selected} must be in (0, 1]")
        if not 0 < self.hr_tiles <= 1:
            raise LoupeError(f"hr_tiles={self.hr_tiles} must be in (0, 1]: the fraction of HR tiles encoded")
        if not 0 <= self.fresh <= self.selected:
            raise LoupeError(f"fresh={self.fresh} must be in [0, selected={self.selected}]")
        if self.lm_head not in ("last", "all"):
            raise LoupeError(f"lm_head={self.lm_head!r}; choose 'last' or 'all'")
        if self.image_size is not None:
            object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
            if len(self.image_size) != 2 or min(self.image_size) < 1:
                raise LoupeError(f"image_size={list(self.image_size)} must be (height, width), both positive")
        if self.mix is not None:
            object.__setattr__(self, "mix", tuple(float(f) for f in self.mix))
            if any(not 0 <= f <= 1 for f in self.mix) or abs(sum(self.mix) - 1) > 1e-6:
                raise LoupeError(f"mix={list(self.mix)} must be fractions in [0, 1] that sum to 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Extras = Callable[[int], dict[str, float]]
Layers = Callable[[int], float]


def _none(_: int) -> dict[str, float]:
    return {}


@dataclass
class CostPlan:
    """How a method spends compute, in terms the cost model turns into FLOPs."""

    image_tokens: int  # image tokens each sample puts in the decoder sequence
    vision: dict[str, tuple[int, float]]  # part -> (image side in px, encoder passes per sample)
    projector_rows: int  # feature rows through the projector per sample
    prefill_extra: Extras = _none  # T (sequence length) -> the method's extra parts of a prefill
    decode_extra: Extras = _none  # Tk (keys incl. the new one) -> extra parts of one decode step
    image_parts: tuple[str, ...] = field(default=())  # extras counted as image cost (image-macs convention)
    # Methods whose decoder layers do not all run over the whole sequence (VISOR) give their own:
    prefill_llm: Layers | None = None  # T -> FLOPs of the decoder layers at prefill (None: every layer, T rows)
    decode_llm: Layers | None = None  # Tk -> FLOPs of the decoder layers of one decode step
    image_layers: float | None = None  # layers the image tokens run through (image-macs; None: all)
    # Or, where the count changes with depth (token pruning): (layers, image tokens) pieces.
    image_schedule: tuple[tuple[float, float], ...] | None = None


# ---- formulas (FLOPs for one sample) --------------------------------------------------
def attention(rows: int | float, keys: int | float, heads: int, head_dim: int) -> float:
    """Scores and mixing of `rows` queries over `keys` keys."""
    return 4.0 * rows * keys * heads * head_dim


def linear(rows: int | float, d_in: int, d_out: int) -> float:
    return 2.0 * rows * d_in * d_out


def decoder_layer(t: TextConfig, rows: int | float, keys: int | float) -> float:
    """One LLaMA layer: q/k/v/o projections, attention over `keys`, SwiGLU MLP."""
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    proj = linear(rows, t.hidden_size, q + 2 * kv) + linear(rows, q, t.hidden_size)
    mlp = 3 * linear(rows, t.hidden_size, t.intermediate_size)
    return proj + attention(rows, keys, t.num_heads, t.head_dim) + mlp


def lm_head(t: TextConfig, rows: int) -> float:
    return linear(rows, t.hidden_size, t.vocab_size)


def vision_layers_run(cfg: VLMConfig) -> int:
    """Encoder layers that actually run: up to the deepest feature layer read."""
    count = cfg.vision.num_layers + 1
    return max(i % count for i in cfg.feature_layers)


def vision_pass(cfg: VLMConfig, side: int, class_token: bool = True) -> float:
    """One image of `side` px through the patch embedding and the encoder layers that run."""
    v = cfg.vision
    patches = (side // v.patch_size) ** 2
    tokens = patches + (1 if class_token else 0)
    embed = linear(patches, v.num_channels * v.patch_size**2, v.hidden_size)
    layer = (4 * linear(tokens, v.hidden_size, v.hidden_size) + attention(tokens, tokens, v.num_heads, v.head_dim)
             + 2 * linear(tokens, v.hidden_size, v.intermediate_size))
    return embed + vision_layers_run(cfg) * layer


def projector(cfg: VLMConfig, rows: int) -> float:
    w = cfg.text.hidden_size
    return linear(rows, cfg.vision.hidden_size * len(cfg.feature_layers), w) + linear(rows, w, w)


def image_token_macs(t: TextConfig, n: float, ffn: int = 3) -> float:
    """The token-pruning papers' per-layer MACs of n image tokens: 4nd^2 + 2n^2d + ffn*ndm
    (ffn 3: SwiGLU, PyramidDrop's and SparseVLM's count; 2: FastV's formula)."""
    d, m = t.hidden_size, t.intermediate_size
    return 4 * n * d * d + 2 * n * n * d + ffn * n * d * m
