"""Evaluation of a VQA split: greedy answers, exact match, accuracy per question kind and
object size, the selection fractions methods report, and per-sample prefill latency."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from loupe.data.llava import Example
from loupe.generation import SamplingConfig, generate
from loupe.images import ImageProcessor, load_image
from loupe.methods import MethodReport, RunOptions
from loupe.text import Tokenizer
from loupe.train import ImageSource, Sample, prompt_ids
from loupe.vlm import VLM


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


@dataclass
class Prediction:
    id: str
    answer: str
    output: str
    correct: bool
    meta: dict[str, Any]
    selected: float | None  # mean selected fraction of HR tokens at prefill (methods that select)
    sa_layers: int | None = None  # VISOR: SA layers the sample ran
    route: int | None = None  # VISOR with its router: the configuration it chose


@dataclass
class EvalResult:
    predictions: list[Prediction] = field(default_factory=list)

    def accuracy(self, **where: str) -> float | None:
        """Accuracy (0-100) over predictions whose meta matches `where`; None if there are none."""
        chosen = [p for p in self.predictions if all(p.meta.get(k) == v for k, v in where.items())]
        return 100 * sum(p.correct for p in chosen) / len(chosen) if chosen else None

    def count(self, **where: str) -> int:
        return sum(all(p.meta.get(k) == v for k, v in where.items()) for p in self.predictions)

    def summary(self) -> dict[str, Any]:
        selected = [p.selected for p in self.predictions if p.selected is not None]
        sa = {kind: [p.sa_layers for p in self.predictions if p.sa_layers is not None
                     and (kind == "all" or p.meta.get("kind") == kind)] for kind in ("all", "easy", "hard")}
        return {"easy": self.accuracy(kind="easy"), "hard": self.accuracy(kind="hard"),
                "overall": self.accuracy(),
                "hard_small": self.accuracy(kind="hard", size="small"),
                "hard_large": self.accuracy(kind="hard", size="large"),
                "n": len(self.predictions), "n_hard": self.count(kind="hard"),
                "selected_fraction": statistics.fmean(selected) if selected else None,
                **{f"sa_layers_{kind}" if kind != "all" else "sa_layers": statistics.fmean(v) if v else None
                   for kind, v in sa.items()}}


@torch.inference_mode()
def evaluate(model: VLM, samples: Sequence[Sample], images: ImageSource, tok: Tokenizer, batch_size: int = 32,
             max_new_tokens: int = 4, progress: bool = True, run: RunOptions | None = None) -> EvalResult:
    """Greedy answers to the first question of every sample, scored by exact match; `run`:
    the method's per-call choices (e.g. a VISOR budget) for every sample."""
    model.eval()
    result = EvalResult()
    stops = [tok.eos_id] if tok.eos_id is not None else []
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_tokens=stops)
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    for chunk in tqdm(chunks, desc="eval", unit="batch", disable=not progress, leave=False):
        ids, mask = tok.pad_left([s.ids[: s.prompt_length] for s in chunk])
        reports: list[MethodReport] = []
        pics = images.model_inputs([s.image for s in chunk])
        out = generate(model, ids, pics.pixel_values, mask, sampling=sampling, images=pics.images, run=run,
                       on_report=reports.append)
        report = reports[0]
        fractions = _per_sample_fraction(report)
        sa_layers = report.sa_layers.tolist() if report.sa_layers is not None else None
        routes = report.route.tolist() if report.route is not None else None
        for row, s in enumerate(chunk):
            assert s.example is not None
            answer = s.example.answer
            text = tok.decode([t for t in out[row].tolist() if t not in stops])
            result.predictions.append(Prediction(s.example.id, answer, text, normalise(text) == normalise(answer),
                                                 s.example.meta, fractions[row] if fractions else None,
                                                 sa_layers[row] if sa_layers else None,
                                                 routes[row] if routes else None))
    return result


def _per_sample_fraction(report: MethodReport) -> list[float] | None:
    fractions = report.selected_fraction
    if not fractions:
        return None
    per_layer = torch.stack([f.float() for f in fractions.values()])  # (layers, B)
    return per_layer.mean(0).tolist()


@torch.inference_mode()
def prefill_latency(model: VLM, examples: Sequence[Example], tok: Tokenizer, repeats: int = 1,
                    run: RunOptions | None = None) -> float:
    """Median seconds of one sample's prefill from pixels (encoder, projector, decoder) at batch 1."""
    processor = ImageProcessor(size=model.method.image_size())
    times = []
    for ex in examples:
        ids = torch.tensor([prompt_ids(ex, tok, model.method.tokens_per_image())], device=model.device)
        px = processor(load_image(ex.image))[None].to(model.device, model.dtype)
        for _ in range(repeats):
            cache = model.new_cache(1, ids.shape[1] + 1)
            start = time.perf_counter()
            model(ids, px, cache=cache, last_only=True, run=run)
            times.append(time.perf_counter() - start)
    return statistics.median(times)
