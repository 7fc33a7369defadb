"""Evaluation of a VQA split: greedy answers, exact match, accuracy per question kind and
object size, the selection fractions methods report, and per-sample prefill latency."""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from loupe.data.batches import Sample, prompt_ids
from loupe.data.llava import Example
from loupe.generation import SamplingConfig, generate
from loupe.images import ImageProcessor, load_image
from loupe.methods import MethodReport, RunOptions, selection
from loupe.text import Tokenizer
from loupe.train import ImageSource
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
    tag_hit: dict[int, bool] | None = None  # per selecting layer: did the answer row select the named tag


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
        hits = [p.tag_hit for p in self.predictions if p.tag_hit and p.meta.get("kind") == "hard"]
        layers = sorted({layer for h in hits for layer in h})
        by_layer = {str(layer): 100 * statistics.fmean(h[layer] for h in hits) for layer in layers}
        return {"easy": self.accuracy(kind="easy"), "hard": self.accuracy(kind="hard"),
                # % of hard questions whose named tag the answer row selected, per layer and over layers
                "tag_hit": statistics.fmean(by_layer.values()) if by_layer else None, "tag_hit_by_layer": by_layer,
                "overall": self.accuracy(),
                "hard_small": self.accuracy(kind="hard", size="small"),
                "hard_large": self.accuracy(kind="hard", size="large"),
                # by answer format (a record's meta "format": short answer, multiple choice)
                "hard_short": self.accuracy(kind="hard", format="short"),
                "hard_mc": self.accuracy(kind="hard", format="mc"),
                "n": len(self.predictions), "n_hard": self.count(kind="hard"),
                "selected_fraction": statistics.fmean(selected) if selected else None,
                **{f"sa_layers_{kind}" if kind != "all" else "sa_layers": statistics.fmean(v) if v else None
                   for kind, v in sa.items()}}


RunFor = Callable[[Sequence[Sample]], RunOptions | None]  # a batch's samples -> its run options


@torch.inference_mode()
def evaluate(model: VLM, samples: Sequence[Sample], images: ImageSource, tok: Tokenizer, batch_size: int = 32,
             max_new_tokens: int = 4, progress: bool = True, run: RunOptions | RunFor | None = None) -> EvalResult:
    """Greedy answers to the first question of every sample, scored by exact match; `run`:
    the method's per-call choices for every sample (e.g. a VISOR budget), or a function that
    gives them for each batch's samples (e.g. FlexAttention's oracle: their tag boxes)."""
    model.eval()
    result = EvalResult()
    stops = [tok.eos_id] if tok.eos_id is not None else []
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_tokens=stops)
    chunks = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    for chunk in tqdm(chunks, desc="eval", unit="batch", disable=not progress, leave=False):
        ids, mask = tok.pad_left([s.ids[: s.prompt_length] for s in chunk])
        reports: list[MethodReport] = []
        pics = images.model_inputs([s.image for s in chunk])
        batch_run = run(chunk) if callable(run) else run
        out = generate(model, ids, pics.pixel_values, mask, sampling=sampling, image_sizes=pics.image_sizes,
                       images=pics.images, run=batch_run, on_report=reports.append)
        report = reports[0]
        hits = _tag_hits(report, chunk)
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
                                                 routes[row] if routes else None, hits[row]))
    return result


def tag_boxes(samples: Sequence[Sample]) -> torch.Tensor:
    """(B, 4) each sample's tag box from its metadata; the whole image where it has none."""
    whole = [0.0, 0.0, 1.0, 1.0]
    return torch.tensor([(s.example.meta.get("tag_box") if s.example else None) or whole for s in samples])


def _tag_hits(report: MethodReport, samples: Sequence[Sample]) -> list[dict[int, bool] | None]:
    """Per sample with a tag box: per layer, whether the answer row's selection holds the tag."""
    chosen = report.answer_selection()  # layer -> (B, M)
    if not chosen:
        return [None] * len(samples)
    boxes = tag_boxes(samples)
    grid = math.isqrt(next(iter(chosen.values())).shape[1])
    per_layer = {layer: selection.tag_hits(sel.cpu(), boxes, grid).tolist() for layer, sel in chosen.items()}
    return [{layer: hits[row] for layer, hits in per_layer.items()}
            if s.example is not None and "tag_box" in s.example.meta else None for row, s in enumerate(samples)]


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
        ids = torch.tensor([prompt_ids(model, ex, tok)], device=model.device)
        image = load_image(ex.image)
        px = processor(image)[None].to(model.device, model.dtype)
        sizes = torch.tensor([[image.height, image.width]])
        for _ in range(repeats):
            cache = model.new_cache(1, ids.shape[1] + 1)
            model.synchronize()
            start = time.perf_counter()
            model(ids, px, cache=cache, last_only=True, image_sizes=sizes, run=run)
            model.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)
