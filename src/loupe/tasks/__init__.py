"""The benchmarks `loupe eval` runs: how each is read, asked and scored (../shared/DESIGN.md section 8).

A `Task` is data: its reader (the release's format), the prompt after `<image>` (the
wording lmms-eval and the papers use), how a prediction is scored (`metrics`), and whether
it generates or ranks options by likelihood. Per-task options (`-t KEY=VALUE`) are checked
against what the benchmark allows.

| task | data | scoring |
|---|---|---|
| vstar | V* folders | option likelihood (FlexAttention: lowest mean CE wins) and letter generation |
| textvqa | lmms-lab/textvqa parquet | VQA accuracy (-t ocr=true adds the OCR tokens, as LLaVA's own eval) |
| docvqa | lmms-lab/DocVQA parquet | ANLS |
| chartqa | lmms-lab/ChartQA parquet | relaxed accuracy, by human / augmented |
| magnifierbench | Otter-AI/MagnifierBench parquet (or its fields as JSON) | option letter, parsed as its authors do |
| gqa | lmms-lab/GQA parquet (instructions + images) | exact match after EvalAI normalisation |
| scienceqa_img | lmms-lab/ScienceQA parquet (ScienceQA-IMG) | option letter |
| mmbench | lmms-lab/MMBench parquet (dev, with answers) | option letter, by category |
| pope | lmms-lab/POPE parquet | yes/no accuracy, precision, recall, F1, yes ratio |
| synth | the built-in benchmark (LLaVA JSON) | exact match |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loupe.errors import LoupeError
from loupe.tasks import metrics
from loupe.tasks.readers import Item, image_of, json_list, parquet_rows, require, vstar_items

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."

Scores = dict[str, float]


@dataclass(frozen=True)
class Task:
    name: str
    read: Callable[[Path], list[Item]]
    prompt: Callable[[Item, dict[str, Any]], str]
    score: Callable[[str, Item], Scores]  # generated text -> metric values
    metric: str  # the headline metric among `score`'s
    likelihood: bool = False  # also rank the options by mean answer cross-entropy
    max_new_tokens: int = 16
    options: dict[str, Any] = field(default_factory=dict)  # allowed task options and their defaults
    aggregate: Callable[[list[Scores]], Scores] | None = None  # task-level metrics beyond the means (POPE's F1)
    flags: tuple[str, ...] = ()  # per-question values only `aggregate` reads (not averaged)

    def task_options(self, given: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise LoupeError(f"task {self.name!r} takes no option(s) {unknown}; it allows "
                             f"{self.options or 'none'}")
        return {**self.options, **given}


def lettered(options: list[str]) -> str:
    return "\n".join(f"{metrics.LETTERS[k]}. {o}" for k, o in enumerate(options))


def letter_score(text: str, item: Item) -> Scores:
    return {"accuracy": float(metrics.option_letter(text, item.options) == item.answers[0])}


# ---- readers of each release -------------------------------------------------------------------
Maker = Callable[[str, dict[str, Any], Path], Item]  # (where, row, root) -> Item


def _parquet(path: Path, fields: list[str], schema: str, make: Maker) -> list[Item]:
    root = path if path.is_dir() else path.parent
    items = []
    for where, row in parquet_rows(path):
        require(row, fields, where, schema)
        items.append(make(where, row, root))
    return items


def read_textvqa(path: Path) -> list[Item]:
    return _parquet(path, ["question_id", "question", "image", "answers"], "lmms-lab/textvqa", lambda w, r, root: Item(
        str(r["question_id"]), image_of(r["image"], w, root), r["question"], list(r["answers"]),
        meta={"ocr_tokens": list(r.get("ocr_tokens") or [])}))


def read_docvqa(path: Path) -> list[Item]:
    return _parquet(path, ["questionId", "question", "image", "answers"], "lmms-lab/DocVQA", lambda w, r, root: Item(
        str(r["questionId"]), image_of(r["image"], w, root), r["question"], list(r["answers"]),
        category=(list(r.get("question_types") or ["all"]) or ["all"])[0]))


def read_chartqa(path: Path) -> list[Item]:
    def make(where: str, r: dict[str, Any], root: Path) -> Item:
        kind = str(r["type"]).split("_")[0]  # human_test / augmented_test
        return Item(f"{kind}/{where}", image_of(r["image"], where, root), r["question"], [str(r["answer"])],
                    category=kind)
    return _parquet(path, ["type", "question", "answer", "image"], "lmms-lab/ChartQA", make)


def read_pope(path: Path) -> list[Item]:
    return _parquet(path, ["question_id", "question", "answer", "image"], "lmms-lab/POPE", lambda w, r, root: Item(
        str(r["question_id"]), image_of(r["image"], w, root), r["question"], [str(r["answer"]).lower().strip()],
        category=str(r.get("category") or "all")))


def read_mmbench(path: Path) -> list[Item]:
    def make(where: str, r: dict[str, Any], root: Path) -> Item:
        options = [str(r[k]) for k in "ABCD" if r.get(k) not in (None, "", "nan")]
        return Item(str(r["index"]), image_of(r["image"], where, root), r["question"], [str(r["answer"])], options,
                    str(r.get("category") or "all"), {"hint": r.get("hint") if r.get("hint") not in ("nan",) else None})
    return _parquet(path, ["index", "question", "A", "B", "answer", "image"], "lmms-lab/MMBench", make)


def read_scienceqa(path: Path) -> list[Item]:
    def make(where: str, r: dict[str, Any], root: Path) -> Item:
        return Item(where, image_of(r["image"], where, root), r["question"], [metrics.LETTERS[int(r["answer"])]],
                    [str(c) for c in r["choices"]], str(r.get("subject") or "all"), {"hint": r.get("hint")})
    rows = [(w, r) for w, r in parquet_rows(path) if r.get("image") is not None]  # ScienceQA-IMG: those with one
    root = path if path.is_dir() else path.parent
    for where, row in rows:
        require(row, ["question", "choices", "answer", "image"], where, "lmms-lab/ScienceQA")
    return [make(w, r, root) for w, r in rows]


def read_gqa(path: Path) -> list[Item]:
    """lmms-lab/GQA ships questions ("*_instructions") and images ("*_images", id -> image) apart."""
    rows = list(parquet_rows(path))
    images = {str(r["id"]): r["image"] for _, r in rows if "image" in r and "question" not in r}
    items = []
    for where, r in rows:
        if "question" not in r:
            continue
        require(r, ["id", "imageId", "question", "answer"], where, "lmms-lab/GQA instructions")
        if str(r["imageId"]) not in images:
            raise LoupeError(f"{where}: image {r['imageId']!r} is in none of the image parquet files at {path}")
        items.append(Item(str(r["id"]), image_of(images[str(r["imageId"])], where, path), r["question"],
                          [str(r["answer"])]))
    if not items:
        raise LoupeError(f"no GQA questions at {path} (expected instruction rows with id, imageId, question, answer)")
    return items


MAGNIFIER_PROMPT = "Answer with the option letter from the given choices directly."  # Otter's benchmark.yaml


def read_magnifierbench(path: Path) -> list[Item]:
    """Otter-AI/MagnifierBench as the hub ships it (parquet: `id`, `instruction` - the question
    with its options inline, "...? A. x, B. y, C. z, D. w" -, `images` [one image], `answer`
    the letter), or the same fields as a JSON list with `images` as paths beside the file."""
    if path.is_file() and path.suffix == ".json" or path.is_dir() and not any(path.rglob("*.parquet")):
        root, rows = json_list(path, "MagnifierBench")
    else:
        root, rows = path if path.is_dir() else path.parent, list(parquet_rows(path))
    items = []
    for where, r in rows:
        require(r, ["id", "instruction", "images", "answer"], where, "Otter-AI/MagnifierBench")
        images = r["images"] if isinstance(r["images"], list) else [r["images"]]
        if len(images) != 1:  # the authors skip these too; Loupe refuses rather than score a subset silently
            raise LoupeError(f"{where}: {len(images)} images; MagnifierBench questions have one")
        items.append(Item(str(r["id"]), image_of(images[0], where, root), str(r["instruction"]),
                          [str(r["answer"]).strip().upper()]))
    return items


def read_synth(path: Path) -> list[Item]:
    from loupe.data.llava import read_llava

    return [Item(ex.id, ex.image, ex.question.replace("<image>", "").strip(), [ex.answer],
                 category=str(ex.meta.get("kind", "all"))) for ex in read_llava(path) if ex.image is not None]


# ---- scoring -------------------------------------------------------------------------------------
def pope_score(text: str, item: Item) -> Scores:
    said, truth = metrics.yes_no(text), item.answers[0]
    return {"accuracy": float(said == truth), "said_yes": float(said == "yes"), "is_yes": float(truth == "yes")}


def synth_score(text: str, item: Item) -> Scores:
    from loupe.evaluate import normalise

    return {"accuracy": float(normalise(text) == normalise(item.answers[0]))}


def _with_hint(item: Item, question: str) -> str:
    hint = item.meta.get("hint")
    return f"{hint}\n{question}" if hint else question


def pope_summary(rows: list[Scores]) -> Scores:
    """POPE's precision, recall, F1 and yes ratio over the per-question flags."""
    tp = sum(r["said_yes"] * r["is_yes"] for r in rows)
    said, truth = sum(r["said_yes"] for r in rows), sum(r["is_yes"] for r in rows)
    precision = tp / said if said else 0.0
    recall = tp / truth if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "yes_ratio": said / len(rows) if rows else 0.0}


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("vstar", vstar_items, lambda i, o: f"{i.question}\n{lettered(i.options)}{LETTER}", letter_score,
         "likelihood_accuracy", likelihood=True, max_new_tokens=4),
    Task("textvqa", read_textvqa,
         lambda i, o: i.question.capitalize() + (f"\nReference OCR token: {', '.join(i.meta['ocr_tokens'])}"
                                                 if o["ocr"] else "") + SHORT,
         lambda t, i: {"accuracy": metrics.vqa_accuracy(t, i.answers)}, "accuracy", options={"ocr": False}),
    Task("docvqa", read_docvqa, lambda i, o: i.question + SHORT, lambda t, i: {"anls": metrics.anls(t, i.answers)},
         "anls", max_new_tokens=32),
    Task("chartqa", read_chartqa, lambda i, o: i.question + SHORT,
         lambda t, i: {"relaxed_accuracy": metrics.relaxed_accuracy(t, i.answers[0])}, "relaxed_accuracy"),
    Task("magnifierbench", read_magnifierbench, lambda i, o: f"{MAGNIFIER_PROMPT} {i.question}",
         lambda t, i: {"accuracy": float(metrics.magnifier_letter(t, i.question) == i.answers[0])}, "accuracy",
         max_new_tokens=16),
    Task("gqa", read_gqa, lambda i, o: i.question + SHORT,
         lambda t, i: {"accuracy": float(metrics.normalise_answer(t) == metrics.normalise_answer(i.answers[0]))},
         "accuracy"),
    Task("scienceqa_img", read_scienceqa,
         lambda i, o: _with_hint(i, f"{i.question}\n{lettered(i.options)}") + LETTER, letter_score, "accuracy",
         max_new_tokens=4),
    Task("mmbench", read_mmbench, lambda i, o: _with_hint(i, f"{i.question}\n{lettered(i.options)}") + LETTER,
         letter_score, "accuracy", max_new_tokens=4),
    Task("pope", read_pope, lambda i, o: i.question + SHORT, pope_score, "accuracy", max_new_tokens=4,
         aggregate=pope_summary, flags=("said_yes", "is_yes")),
    Task("synth", read_synth, lambda i, o: i.question, synth_score, "accuracy", max_new_tokens=8),
)}


def task(name: str) -> Task:
    if name not in TASKS:
        raise LoupeError(f"unknown task {name!r}; Loupe evaluates {sorted(TASKS)}")
    return TASKS[name]
