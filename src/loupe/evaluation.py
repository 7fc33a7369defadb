"""`loupe eval`: a benchmark task on a checkpoint: batched, streamed, resumable, sharded.

    OUT/spec.json                     what the run is (model, method, options, task, data, limit)
    OUT/predictions.rank{R}.jsonl     one line per question, written as it is answered
    OUT/results.json, results.md      the summary (rank 0, atomically), when every question is done

Every question is answered with the model family's chat template (`loupe.chat`), greedy,
in left-padded batches; tasks with options are also ranked by likelihood (mean
cross-entropy of each option's tokens after the prompt, lowest wins: FlexAttention's V*
protocol). A prediction is scored when it is made and carries its FLOPs (`loupe.cost` with
the selection or routing the method reported) and its share of the batch's wall time.

A rerun in the same OUT skips the questions already there (a half-written last line is
dropped) and ends with the same summary. Under `torchrun`, rank r answers every world-th
remaining question; rank 0 merges. A different model, method, options, task or data in the
same OUT is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from loupe.chat import ChatTemplate, template_for
from loupe.cost import estimate, measured_selection, measured_tiles
from loupe.distributed import World
from loupe.errors import LoupeError
from loupe.files import write_atomic, write_json
from loupe.flops import Workload
from loupe.generation import SamplingConfig, generate
from loupe.methods import MethodReport
from loupe.packing import PreparedImages
from loupe.tasks import Item, Task, metrics, task
from loupe.text import Tokenizer
from loupe.vlm import VLM

SPEC = "spec.json"


@dataclass
class EvalSpec:
    model: str
    task: str
    data: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None


# ---- predictions on disk ---------------------------------------------------------------------
def read_predictions(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The complete lines of a predictions file; with `repair`, a half-written last line is cut off."""
    if not path.exists():
        return []
    text = path.read_text()
    rows, good = [], 0
    for line in text.splitlines(keepends=True):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if repair and good < len(text):
        with open(path, "r+") as f:
            f.truncate(good)
    return rows


def done_ids(out: Path) -> set[str]:
    return {r["id"] for p in sorted(out.glob("predictions.rank*.jsonl")) for r in read_predictions(p)}


def _claim(out: Path, spec: EvalSpec, world: World) -> None:
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        saved = out / SPEC
        if saved.exists():
            before = json.loads(saved.read_text())
            diff = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(spec).items()
                    if before.get(k) != v]
            if diff:
                raise LoupeError(f"{out} holds an evaluation of something else (" + "; ".join(diff)
                                 + "); use another --out")
        write_json(saved, dataclasses.asdict(spec))
    world.barrier()


# ---- answering -------------------------------------------------------------------------------
@dataclass
class Asker:
    """A model, its tokenizer and template, asking one task's questions."""

    model: VLM
    tok: Tokenizer
    chat: ChatTemplate
    task: Task
    options: dict[str, Any]

    def prompts(self, items: list[Item], tokens: list[int]) -> list[list[int]]:
        return [self.chat.prompt_ids(self.task.prompt(i, self.options), self.tok, n) for i, n in zip(items, tokens,
                                                                                                   strict=True)]

    @torch.inference_mode()
    def generate(self, items: list[Item], images: PreparedImages) -> tuple[list[str], MethodReport, list[int]]:
        """Greedy answers, the method's prefill report, and each prompt's text tokens (without the image's)."""
        prompts = self.prompts(items, images.tokens)
        ids, mask = self.tok.pad_left(prompts)
        stops = [self.tok.eos_id] if self.tok.eos_id is not None else []
        reports: list[MethodReport] = []
        out = generate(self.model, ids, images.pixel_values, mask, SamplingConfig(self.task.max_new_tokens,
                                                                                  stop_tokens=stops),
                       image_sizes=images.image_sizes, on_report=reports.append)
        texts = [self.tok.decode([t for t in row.tolist() if t not in stops]) for row in out]
        return texts, reports[0], [len(p) - n for p, n in zip(prompts, images.tokens, strict=True)]

    @torch.inference_mode()
    def option_losses(self, items: list[Item], images: PreparedImages) -> list[list[float]]:
        """Mean cross-entropy of every option's tokens after each item's prompt."""
        rows, owner = [], []
        prompts = self.prompts(items, images.tokens)
        for k, item in enumerate(items):
            for option in item.options:
                reply = self.tok.encode(self.chat.reply(option), add_bos=False)
                rows.append((prompts[k], reply))
                owner.append(k)
        seqs = [p + r for p, r in rows]
        ids, mask = self.tok.pad_left(seqs)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for r, (p, reply) in enumerate(rows):
            scored[r, ids.shape[1] - len(reply) - 1: ids.shape[1] - 1] = True  # the rows predicting the reply
        targets = torch.roll(ids, -1, dims=1)
        index = torch.tensor(owner)
        logits = self.model(ids, images.pixel_values[index], mask, loss_rows=scored, logit_rows=scored,
                            image_sizes=images.image_sizes[index]).logits  # (K, V)
        ce = F.cross_entropy(logits.float(), targets.to(logits.device)[scored.to(logits.device)], reduction="none")
        per_row = torch.zeros(len(rows)).index_add_(0, scored.nonzero()[:, 0], ce.cpu()) / scored.sum(1)
        out: list[list[float]] = [[] for _ in items]
        for r, k in enumerate(owner):
            out[k].append(float(per_row[r]))
        return out


def _flops(model: VLM, text_tokens: int, new_tokens: int, report: MethodReport, size: tuple[int, int]) -> float:
    """FLOPs of one question from `loupe.cost`, with the selection the method reported at prefill."""
    workload = Workload(prompt_tokens=max(1, text_tokens), new_tokens=max(1, new_tokens),
                        selected=measured_selection(report) or 0.1, image_size=size,
                        hr_tiles=measured_tiles(report))
    return estimate(model.cfg, model.method.options, workload).total


def answer_batch(asker: Asker, items: list[Item]) -> list[dict[str, Any]]:
    pictures = [i.picture() for i in items]
    asker.model.synchronize()
    start = time.perf_counter()
    images = asker.model.prepare_images(pictures)  # once for both passes
    texts, report, text_tokens = asker.generate(items, images)
    losses = asker.option_losses(items, images) if asker.task.likelihood else None
    asker.model.synchronize()
    seconds = (time.perf_counter() - start) / len(items)
    rows = []
    for k, (item, text) in enumerate(zip(items, texts, strict=True)):
        scores = asker.task.score(text, item)
        if losses is not None:
            best = min(range(len(losses[k])), key=losses[k].__getitem__)
            scores["likelihood_accuracy"] = float(metrics.LETTERS[best] == item.answers[0])
            scores["letter_accuracy"] = scores.pop("accuracy")
        tokens = len(asker.tok.encode(text, add_bos=False)) + 1
        size = (pictures[k].height, pictures[k].width)
        rows.append({"id": item.id, "category": item.category, "output": text, "answers": item.answers,
                     "scores": scores, "option_losses": losses[k] if losses is not None else None,
                     "flops": _flops(asker.model, text_tokens[k], tokens, report, size), "seconds": seconds})
    return rows


# ---- the run ---------------------------------------------------------------------------------
def run_eval(spec: EvalSpec, out: str | Path, *, batch_size: int = 8, device: str = "cpu",
             dtype: torch.dtype | None = None, progress: bool = True) -> dict[str, Any] | None:
    """Evaluate; returns the summary on rank 0 (None on the other ranks)."""
    from loupe.checkpoints import from_pretrained

    if batch_size < 1:
        raise LoupeError(f"batch_size={batch_size} must be at least 1")
    world = World.from_env(device)
    t = task(spec.task)
    options = t.task_options(spec.task_options)
    items = t.read(Path(spec.data))[: spec.limit]
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise LoupeError(f"{spec.data}: question ids repeat (e.g. {next(i for i in ids if ids.count(i) > 1)!r})")
    out = Path(out)
    _claim(out, spec, world)
    model = from_pretrained(spec.model, spec.method, dtype=dtype, device=world.device(device), **spec.options)
    asker = Asker(model, Tokenizer.from_folder(spec.model, model.cfg.image_token_id), template_for(model.cfg), t,
                  options)
    mine = out / f"predictions.rank{world.rank}.jsonl"
    read_predictions(mine, repair=True)
    done = done_ids(out)
    world.barrier()  # every rank has read what is done before any writes more
    todo = [i for i in items if i.id not in done][world.rank::world.size]
    batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    with open(mine, "a") as f:
        for batch in tqdm(batches, desc=f"eval {spec.task}", unit="batch", disable=not (progress and world.main)):
            for row in answer_batch(asker, batch):
                f.write(json.dumps(row) + "\n")
            f.flush()
    world.barrier()
    if not world.main:
        return None
    rows = [r for p in sorted(out.glob("predictions.rank*.jsonl")) for r in read_predictions(p)]
    by_id = {r["id"]: r for r in rows}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise LoupeError(f"{len(missing)} question(s) have no prediction in {out} (e.g. {missing[0]!r}); rerun")
    summary = summarise(t, spec, [by_id[i] for i in ids])
    write_json(out / "results.json", summary)
    write_atomic(out / "results.md", results_table([summary]))
    return summary


def summarise(t: Task, spec: EvalSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    names = sorted(rows[0]["scores"]) if rows else []
    overall = {n: 100 * statistics.fmean(r["scores"][n] for r in rows) for n in names if n not in t.flags}
    if t.aggregate is not None:
        overall.update({k: 100 * v for k, v in t.aggregate([r["scores"] for r in rows]).items()})
    categories = sorted({r["category"] for r in rows})
    by_category = {c: {n: 100 * statistics.fmean(r["scores"][n] for r in rows if r["category"] == c) for n in overall
                       if n in names} for c in categories} if len(categories) > 1 else {}
    return {"task": t.name, "metric": t.metric, "spec": dataclasses.asdict(spec), "n": len(rows), "scores": overall,
            "by_category": by_category, "flops_per_sample": statistics.fmean(r["flops"] for r in rows) if rows else 0,
            "seconds_per_sample": statistics.fmean(r["seconds"] for r in rows) if rows else 0}


def _label(summary: dict[str, Any]) -> str:
    spec = summary["spec"]
    opts = ",".join(f"{k}={v}" for k, v in sorted(spec["options"].items()))
    return f"{spec['method'] or Path(spec['model']).name}" + (f"({opts})" if opts else "")


def results_table(summaries: list[dict[str, Any]]) -> str:
    lines = ["| run | task | n | metric | score | GFLOPs / sample | s / sample |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        score = s["scores"].get(s["metric"], math.nan)
        lines.append(f"| {_label(s)} | {s['task']} | {s['n']} | {s['metric']} | {score:.2f} | "
                     f"{s['flops_per_sample'] / 1e9:.3f} | {s['seconds_per_sample']:.3f} |")
    return "\n".join(lines) + "\n"


def compare(runs: list[Path], out: Path) -> dict[str, Any]:
    """Accuracy against cost for several evaluation runs: a table, JSON and one plot per task."""
    summaries = []
    for run in runs:
        path = run / "results.json"
        if not path.is_file():
            raise LoupeError(f"{run} has no results.json: finish its `loupe eval` first")
        summaries.append(json.loads(path.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(summaries)
    write_atomic(out / "compare.md", table)
    write_json(out / "compare.json", {"runs": [str(r) for r in runs], "summaries": summaries})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name in sorted({s["task"] for s in summaries}):
        chosen = [s for s in summaries if s["task"] == name]
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for s in chosen:
            ax.scatter(s["flops_per_sample"] / 1e12, s["scores"][s["metric"]])
            ax.annotate(_label(s), (s["flops_per_sample"] / 1e12, s["scores"][s["metric"]]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("TFLOPs per sample (loupe.cost)")
        ax.set_ylabel(chosen[0]["metric"])
        ax.set_title(name)
        fig.tight_layout()
        fig.savefig(out / f"compare-{name}.png", dpi=120)
        plt.close(fig)
    return {"table": table, "summaries": summaries}
