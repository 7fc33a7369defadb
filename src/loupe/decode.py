"""Decode steps after a prefill: the method's own (eager) step, or the same step at static
shapes (`loupe.nn.static`), run as is or through `torch.compile` (gpt-fast's recipe).

Shape legend: B batch, V vocabulary, W width.

"eager" runs `VLM.forward` for each new token: the cache is read as a growing prefix, so
shapes change every step. "static" runs `Method.decode_layers` over the whole cache
buffers with a mask, every shape fixed by (batch, capacity); it is the reference the
compiled step is tested against. "compiled" is "static" captured by `torch.compile`
(fullgraph, static shapes): one graph per (model, batch, capacity), reused by every step
and every later request of that shape. A method whose step cannot be static (FlexAttention:
how many HR tokens a step projects is data) decodes eagerly, with one warning per reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch

from loupe.errors import LoupeError
from loupe.methods import RunOptions
from loupe.nn.kv_cache import DecoderCache
from loupe.nn.static import StaticStep
from loupe.nn.tokens import RopeSpec
from loupe.vlm import VLM

DecodeMode = Literal["eager", "static", "compiled"]
DECODE_MODES: tuple[DecodeMode, ...] = ("eager", "static", "compiled")
# Static caches are sized in multiples of this many columns, so that requests of nearby
# lengths share one compiled graph (the extra columns are masked: they cost attention only).
CAPACITY_STEP = 128

Stepper = Callable[[torch.Tensor], torch.Tensor]  # tokens (B,) -> the next logits (B, V)


def check_mode(mode: str) -> DecodeMode:
    if mode not in DECODE_MODES:
        raise LoupeError(f"decode={mode!r}: choose one of {list(DECODE_MODES)}")
    return mode  # type: ignore[return-value]


def resolve_mode(model: VLM, mode: DecodeMode) -> DecodeMode:
    """The mode a request runs: `mode`, or "eager" where the method's step cannot be static
    (warned once per reason)."""
    if check_mode(mode) == "eager":
        return mode
    reason = model.method.static_decode()
    if reason is None:
        return mode
    warnings.warn(f"{mode} decoding is not available: {reason}; decoding eagerly", stacklevel=3)
    return "eager"


def cache_capacity(tokens: int, mode: DecodeMode) -> int:
    """Columns to allocate for `tokens` positions: exact when eager, else rounded up to a
    multiple of CAPACITY_STEP (one compiled graph serves nearby lengths)."""
    return tokens if mode == "eager" else -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


def stepper(model: VLM, cache: DecoderCache, run: RunOptions | None, mode: DecodeMode) -> Stepper:
    """The decode step of the request whose prefill filled `cache`."""
    if mode == "eager":
        def eager(tok: torch.Tensor) -> torch.Tensor:
            logits = model(tok[:, None], cache=cache, last_only=True, run=run).logits[:, -1]  # (B, V)
            return never_image(logits, model.cfg.image_token_id)
        return eager
    rope = RopeSpec(model.cfg.text.head_dim, model.cfg.text.rope_theta, model.dtype)
    step = StaticStep.from_prefill(cache, lambda i: model.method.decode_keys(cache, i), model.kernel, rope.at)
    fn = compiled_step() if mode == "compiled" else static_step
    return lambda tok: fn(model, tok, step)


def static_step(model: VLM, tok: torch.Tensor, step: StaticStep) -> torch.Tensor:
    """Tokens (B,) -> logits (B, V) of the next position, every shape fixed; advances `step`."""
    step.begin()
    x = model.decoder.embed_tokens(tok[:, None])  # (B, 1, W)
    x = model.method.decode_layers(model, x, step)  # (B, 1, W)
    step.end()
    return never_image(model.decoder.logits(x)[:, -1], model.cfg.image_token_id)  # (B, V)


def never_image(logits: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """logits (B, V) with the <image> placeholder never chosen: it stands for image features
    only a prompt carries, and the next step would read it as an image without any (LLaVA-1.5-hf
    and OneVision keep it inside the vocabulary; transformers does not mask it)."""
    if 0 <= image_token_id < logits.shape[-1]:
        logits[:, image_token_id] = float("-inf")  # in place: these logits are read only here
    return logits


_COMPILED: list[Callable[..., torch.Tensor]] = []


def compiled_step() -> Callable[..., torch.Tensor]:
    """`static_step` under `torch.compile` (made once per process; dynamo keys its graphs by
    the model and the shapes). fullgraph: a graph break would mean a host sync after all."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(static_step, fullgraph=True, dynamic=False))
    return _COMPILED[0]
