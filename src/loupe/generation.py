"""Autoregressive generation with a KV cache: greedy or sampled (temperature, top-p),
stop tokens, max new tokens, left-padded batches, streaming through a callback.

Shape legend: B batch, T prompt length, V vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loupe.chat import template_for
from loupe.decode import DecodeMode, cache_capacity, never_image, resolve_mode, stepper
from loupe.errors import LoupeError
from loupe.images import load_image
from loupe.methods import ImageInputs, MethodReport, RunOptions
from loupe.schema import at_least, check
from loupe.text import Tokenizer
from loupe.vlm import VLM


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=32, metadata=at_least(1))
    temperature: float = field(default=0.0, metadata=at_least(0))  # 0: greedy
    top_p: float = 1.0
    stop_tokens: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        check(self, "sampling")  # types, finiteness (NaN temperature), ranges
        if self.max_new_tokens < 1:
            raise LoupeError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise LoupeError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise LoupeError(f"top_p={self.top_p} must be in (0, 1]")


def next_token(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)  # (B, V)
    if cfg.top_p < 1:
        probs = top_p_filter(probs, cfg.top_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always >= 1 token)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


@torch.inference_mode()
def generate(
    model: VLM,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    image_sizes: torch.Tensor | None = None,
    images: ImageInputs | None = None,
    run: RunOptions | None = None,
    on_report: Callable[[MethodReport], None] | None = None,
    decode: DecodeMode = "eager",
) -> torch.Tensor:
    """New tokens (B, <= max_new_tokens) after the prompt; rows that stopped are padded
    with their stop token. `on_token` gets each step's tokens (B,) as they come.
    `images`: features already encoded by `model.method.encode` instead of pixels.
    `run`: the method's per-call choices (e.g. `VisorRun(configuration="router")`), for
    every step of the request. `on_report` gets what the method reported at prefill (e.g.
    the selection fractions, the routing). `decode`: "eager" (the method's own step),
    "static" (the same step at static shapes) or "compiled" (that, through `torch.compile`);
    a method whose step cannot be static decodes eagerly, with a warning (`loupe.decode`)."""
    cfg = sampling or SamplingConfig()
    b, t = input_ids.shape
    limit = model.cfg.text.max_position_embeddings
    if t + cfg.max_new_tokens > limit:
        raise LoupeError(f"prompt of {t} tokens + {cfg.max_new_tokens} new tokens exceeds the model's "
                         f"maximum of {limit} positions")
    if attention_mask is not None:
        check_left_padded(attention_mask)
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed) if cfg.seed is not None else None
    stops = torch.tensor(cfg.stop_tokens or [-1], device=model.device)
    mode = resolve_mode(model, decode)
    cache = model.new_cache(b, cache_capacity(t + cfg.max_new_tokens, mode))
    input_ids = input_ids.to(model.device)
    attention_mask = attention_mask.to(model.device) if attention_mask is not None else None
    pixels = pixel_values.to(model.device, model.dtype) if pixel_values is not None else None

    prefill = model(input_ids, pixels, attention_mask, cache=cache, last_only=True, image_sizes=image_sizes,
                    images=images, run=run)
    if on_report is not None:
        on_report(prefill.report)
    check_finite_logits(prefill.logits[:, -1])
    logits = never_image(prefill.logits[:, -1], model.cfg.image_token_id)  # (B, V)
    step = stepper(model, cache, run, mode)
    done = torch.zeros(b, dtype=torch.bool, device=model.device)
    out: list[torch.Tensor] = []
    for _ in range(cfg.max_new_tokens):
        tok = next_token(logits, cfg, gen)  # (B,)
        tok = torch.where(done, out[-1] if out else tok, tok)  # finished rows repeat their stop token
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        done |= torch.isin(tok, stops)
        if bool(done.all()) or len(out) == cfg.max_new_tokens:
            break
        logits = step(tok)  # (B, V)
    return torch.stack(out, dim=1)


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Generation continues every row from its last position: a mask (B, T) must end each row
    with a real token (left padding, `Tokenizer.pad_left`) and hold at least one."""
    last = attention_mask[:, -1] != 0  # (B,)
    if not bool(last.all()):
        rows = (~last).nonzero()[:, 0].tolist()
        empty = [r for r in rows if not bool(attention_mask[r].any())]
        what = f"row(s) {empty[:8]} mask every position" if empty else \
            f"row(s) {rows[:8]} end in padding (right-padded)"
        raise LoupeError(f"attention_mask: {what}; generation needs left-padded prompts of at least one token "
                         "(Tokenizer.pad_left)")


def check_finite_logits(logits: torch.Tensor) -> None:
    """Refuse to decode from non-finite prefill logits (B, V): one host sync per request, not per
    token. Loading refuses non-finite weights, so what is left is the config or the inputs."""
    finite = torch.isfinite(logits).all(-1)  # (B,)
    if not bool(finite.all()):
        rows = (~finite).nonzero()[:, 0].tolist()
        raise LoupeError(f"the model's logits are NaN or infinite for prompt row(s) {rows[:8]}: likely causes are a "
                         "config value the weights were not trained with (rms_norm_eps, rope_theta, layer sizes), "
                         "fp16 overflow (use bfloat16), or a prompt row with no unmasked token")


def answer(model: VLM, tok: Tokenizer, image: str | os.PathLike[str], question: str, sampling: SamplingConfig,
           run: RunOptions | None = None, on_token: Callable[[torch.Tensor], None] | None = None,
           on_report: Callable[[MethodReport], None] | None = None, decode: DecodeMode = "eager") -> str:
    """The answer to `question` about the image file `image`, in the model's chat template (the
    image's original size passed along: methods zero its square-padding margin, OneVision
    chooses its tile grid by it)."""
    images = model.prepare_images([load_image(image)])
    ids, mask = tok.pad_left([template_for(model.cfg).prompt_ids(question, tok, images.tokens)])
    out = generate(model, ids, images.pixel_values, mask, sampling, on_token=on_token,
                   image_sizes=images.image_sizes, run=run, on_report=on_report, decode=decode)
    return tok.decode([t for t in out[0].tolist() if t not in sampling.stop_tokens])


def stream_printer(tok: Tokenizer) -> Callable[[torch.Tensor], None]:
    """A callback printing newly decoded text as tokens arrive (batch of one)."""
    ids: list[int] = []
    shown = ""

    def on_token(step: torch.Tensor) -> None:
        nonlocal shown
        ids.append(int(step[0]))
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text

    return on_token
