"""Pictures of where a model looked: the answer row's attention over the low-resolution image,
the high-resolution blocks each FlexAttention layer selected, the tag the question names,
and the answer, drawn over the image.

Shape legend: g LR grid side, G HR grid side, M = G*G HR tokens.

`look(model, tok, image, question)` answers and returns a `Look` (plain lists, JSON-ready);
`draw([[Look, ...], ...], path)` draws a grid of them (rows: questions, columns: methods or
selection strategies) and writes the PNG atomically. `loupe generate --overlay OUT.png`
and `loupe reproduce` (its `overlays/`) use them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loupe.chat import template_for
from loupe.errors import LoupeError
from loupe.generation import SamplingConfig, generate
from loupe.images import ImageProcessor, load_image
from loupe.methods import MethodReport, RunOptions
from loupe.text import Tokenizer
from loupe.vlm import VLM


@dataclass
class Look:
    """One answer and what the model looked at to give it."""

    image: str  # the image file
    question: str
    output: str  # the model's answer
    title: str = ""  # e.g. the method or strategy
    attention: list[list[float]] | None = None  # (g, g) the answer row's attention over the LR image (first layer)
    selected: dict[int, list[bool]] = field(default_factory=dict)  # layer -> (M,) HR tokens the answer row selected
    box: list[float] | None = None  # the named tag [left, top, right, bottom], fractions of the image
    answer: str | None = None  # the reference answer, when known


def check_output(path: str | os.PathLike[str]) -> Path:
    """Refuse, before any work, a picture path whose folder does not exist."""
    out = Path(path)
    if not out.parent.is_dir():
        raise LoupeError(f"cannot write the overlay {out}: its folder {out.parent} does not exist")
    if out.is_dir():
        raise LoupeError(f"cannot write the overlay {out}: it is a folder")
    return out


def from_report(report: MethodReport, row: int = 0) -> tuple[list[list[float]] | None, dict[int, list[bool]]]:
    """The answer row's LR attention (at the first layer that reports one) and selections of sample `row`."""
    attention = None
    maps = report.answer_attention()  # layer -> (B, N)
    if maps:
        first = maps[min(maps)][row].float()  # (N,)
        g = math.isqrt(first.numel())
        attention = first.view(g, g).tolist()
    selected = {layer: sel[row].tolist() for layer, sel in report.answer_selection().items()}
    return attention, selected


@torch.inference_mode()
def look(model: VLM, tok: Tokenizer, image: str | os.PathLike[str], question: str, *, title: str = "",
         run: RunOptions | None = None, max_new_tokens: int = 8, prompt_ids: list[int] | None = None,
         box: list[float] | None = None, answer: str | None = None) -> Look:
    """Answer `question` about `image` greedily and keep what the method reported at prefill."""
    picture = load_image(image)
    pixels = ImageProcessor(size=model.method.image_size()).batch([picture])
    ids = prompt_ids or template_for(model.cfg).prompt_ids(question, tok, model.method.tokens_per_image())
    reports: list[MethodReport] = []
    stops = [tok.eos_id] if tok.eos_id is not None else model.cfg.text.eos_token_ids
    out = generate(model, torch.tensor([ids]), pixels, sampling=SamplingConfig(max_new_tokens, stop_tokens=stops),
                   image_sizes=torch.tensor([[picture.height, picture.width]]), run=run, on_report=reports.append)
    text = tok.decode([t for t in out[0].tolist() if t not in stops])
    attention, selected = from_report(reports[0])
    return Look(str(image), question, text, title, attention, selected, box, answer)


def draw(grid: Sequence[Sequence[Look]], path: str | os.PathLike[str], title: str = "") -> Path:
    """A grid of looks (rows x columns), each the image with its attention map (heat), the
    HR tokens its last selecting layer chose (cyan), the tag box (dashed yellow) and the
    answer; written to `path` atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    out = check_output(path)
    rows, cols = len(grid), max(len(r) for r in grid)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), dpi=110, squeeze=False)
    for r, line in enumerate(grid):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(line):
                _cell(ax, line[c], Rectangle)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def _cell(ax: Any, lk: Look, rectangle: Any) -> None:
    from PIL import Image

    image = Image.open(lk.image).convert("RGB")
    side = max(image.size)
    x0, y0 = (side - image.width) / 2 / side, (side - image.height) / 2 / side  # padded to a centred square
    ax.imshow(image, extent=(x0, x0 + image.width / side, y0 + image.height / side, y0))
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    if lk.attention is not None:
        ax.imshow(lk.attention, extent=(0, 1, 1, 0), cmap="magma", alpha=0.45, interpolation="nearest")
    if lk.selected:  # the last selecting layer's HR tokens, as one translucent mask
        chosen = lk.selected[max(lk.selected)]
        grid = math.isqrt(len(chosen))
        mask = torch.tensor(chosen, dtype=torch.float32).view(grid, grid)
        rgba = torch.stack([torch.zeros_like(mask), mask, mask, 0.45 * mask], -1)  # cyan where selected
        ax.imshow(rgba.numpy(), extent=(0, 1, 1, 0), interpolation="nearest")
    if lk.box is not None:
        left, top, right, bottom = lk.box
        ax.add_patch(rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="yellow",
                               linestyle="--", linewidth=1.2))
    verdict = "" if lk.answer is None else (" (right)" if lk.output.strip().lower() == lk.answer.lower() else
                                            f" (ref. {lk.answer})")
    ax.set_title(f"{lk.title}\n{_short(lk.question)}\n-> {lk.output}{verdict}", fontsize=6)


def _short(text: str, width: int = 42) -> str:
    text = text.replace("<image>", "").strip().split(" Options:")[0].split(" Answer with")[0]
    return text if len(text) <= width else text[: width - 3] + "..."
