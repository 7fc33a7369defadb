"""Reader of datasets in the LLaVA conversation format - the built-in benchmark goes
through it exactly as a real instruction-tuning or evaluation set would:

    [{"id": "...", "image": "images/000001.png",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                        {"from": "gpt", "value": "..."}, ...],
      "meta": {...}}]                      # optional; anything the dataset records

Rows without "image" are text-only conversations (the LLaVA-1.5 mix holds about 40k of
them); any number of turns is read. Every problem is reported with the row it is in,
before any training starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loupe.errors import LoupeError
from loupe.files import read_json
from loupe.text import IMAGE_PLACEHOLDER


@dataclass
class Example:
    id: str
    image: Path | None  # None: a text-only conversation
    turns: list[tuple[str, str]]  # (human, assistant) pairs; with an image, the first human turn holds <image>
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        return self.turns[0][0]

    @property
    def answer(self) -> str:
        return self.turns[0][1]


def read_llava(path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None) -> list[Example]:
    """Examples of a LLaVA-format JSON file; image paths are relative to `image_root`
    (default: the JSON file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise LoupeError(f"dataset file not found: {path}")
    rows = read_json(path, list, "conversations")
    root = Path(image_root) if image_root is not None else path.parent
    return [_example(row, i, path, root) for i, row in enumerate(rows)]


def _example(row: Any, i: int, path: Path, root: Path) -> Example:
    where = f"row {i}" + (f" (id {row.get('id')!r})" if isinstance(row, dict) and "id" in row else "") + f" of {path}"
    if not isinstance(row, dict) or "conversations" not in row:
        raise LoupeError(f"{where}: needs 'conversations' (and 'image', unless it is text-only)")
    convo = row["conversations"]
    if not isinstance(convo, list) or len(convo) < 2 or len(convo) % 2:
        raise LoupeError(f"{where}: 'conversations' must alternate human and gpt turns, in pairs")
    turns = []
    for k in range(0, len(convo), 2):
        human, gpt = convo[k], convo[k + 1]
        for j, turn in ((k, human), (k + 1, gpt)):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise LoupeError(f"{where}: turn {j} must be {{\"from\": ..., \"value\": \"text\"}}, not "
                                 f"{str(turn)[:60]!r}")
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise LoupeError(f"{where}: turn {k} must come from 'human' and turn {k + 1} from 'gpt'")
        turns.append((human["value"], gpt["value"]))
    if any(not a.strip() for _, a in turns):
        raise LoupeError(f"{where}: an answer is empty")
    if not isinstance(row.get("meta") or {}, dict):
        raise LoupeError(f"{where}: 'meta' must be an object, not {row['meta']!r}")
    placeholders = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in turns)
    if "image" not in row:
        if placeholders:
            raise LoupeError(f"{where}: a text-only conversation (no 'image') holds {IMAGE_PLACEHOLDER}")
        return Example(str(row.get("id", i)), None, turns, dict(row.get("meta") or {}))
    if IMAGE_PLACEHOLDER not in turns[0][0]:
        raise LoupeError(f"{where}: the question has no {IMAGE_PLACEHOLDER} placeholder: {turns[0][0][:60]!r}")
    if placeholders != 1:
        raise LoupeError(f"{where}: exactly one {IMAGE_PLACEHOLDER} per conversation is supported")
    if not isinstance(row["image"], str) or not row["image"]:
        raise LoupeError(f"{where}: 'image' must be a file path, not {row['image']!r}")
    image = root / row["image"]
    if not image.is_file():
        raise LoupeError(f"{where}: image not found: {image}")
    return Example(str(row.get("id", i)), image, turns, dict(row.get("meta") or {}))
