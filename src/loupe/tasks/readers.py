"""Readers of the public releases' formats, into `Item`s.

- parquet as the hub's lmms-lab datasets ship them (one file or a folder of shards; images
  as `{"bytes", "path"}` structs), through pyarrow (`pip install "loupe[eval]"`);
- JSON with image folders: V* Bench (`direct_attributes/`, `relative_position/`: one JSON
  per image beside it, the correct option first; or lmms-lab/vstar-bench parquet) and
  MagnifierBench (a JSON list);
- the LLaVA conversation format (the built-in benchmark).

A row that lacks what the task needs is an error naming the row and the missing fields,
before anything is evaluated.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from loupe.errors import LoupeError
from loupe.files import read_json
from loupe.images import load_image
from loupe.tasks.metrics import LETTERS


@dataclass
class Item:
    """One benchmark question."""

    id: str
    image: Path | bytes | None  # a file, or the encoded image a parquet row carries
    question: str
    answers: list[str]  # the ground truths (VQA: the ten human answers; multiple choice: the letter)
    options: list[str] = field(default_factory=list)  # multiple choice: the options' texts, in order
    category: str = "all"
    meta: dict[str, Any] = field(default_factory=dict)  # hint, OCR tokens, ...

    def picture(self) -> Image.Image:
        if self.image is None:
            raise LoupeError(f"item {self.id!r} has no image")
        if isinstance(self.image, Path):
            return load_image(self.image)
        return load_image(self.image, name=f"of item {self.id!r}")


# ---- parquet -----------------------------------------------------------------------------------
def parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of every row of a parquet file or of every *.parquet under a folder."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoupeError("reading parquet needs pyarrow: pip install \"loupe[eval]\"") from None
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise LoupeError(f"no parquet files at {path}")
    for file in files:
        for k, row in enumerate(pq.read_table(file).to_pylist()):
            yield f"row {k} of {file}", row


def require(row: dict[str, Any], fields: Sequence[str], where: str, schema: str) -> None:
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise LoupeError(f"{where}: missing {missing} - not the {schema} schema (it needs {list(fields)}; the row "
                         f"has {sorted(row)})")


def image_of(value: Any, where: str, root: Path) -> Path | bytes:
    """A parquet image cell (a {"bytes", "path"} struct, raw bytes or a path) as bytes or a file."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str) and value:
        path = root / value
        if not path.is_file():
            raise LoupeError(f"{where}: image not found: {path}")
        return path
    raise LoupeError(f"{where}: the image cell holds neither bytes nor a path")


# ---- JSON with image folders -----------------------------------------------------------------
def vstar_items(path: Path) -> list[Item]:
    """V* Bench, in either public form.

    - SEAL's folders: `<category>/<name>.json` ({"question", "options", ...}) beside
      `<name>.jpg|png`, the correct option first. The likelihood protocol does not care about
      order; for letter generation the options are rotated by a stable hash of the question's
      id, so "always answer A" scores chance (~1/n), not 100%.
    - lmms-lab/vstar-bench parquet (what lmms-eval reads): `text` holds the question and
      "(A) ... (B) ..." options, `label` the letter, `category` the split.
    """
    if path.is_file() or any(path.rglob("*.parquet")):
        return [_vstar_row(where, row, path if path.is_dir() else path.parent) for where, row in parquet_rows(path)]
    items = []
    for category in ("direct_attributes", "relative_position"):
        folder = path / category
        for meta_file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            where = str(meta_file)
            row = json.loads(meta_file.read_text())
            require(row, ["question", "options"], where, "V* Bench")
            images = [p for p in meta_file.parent.glob(meta_file.stem + ".*") if p.suffix.lower() != ".json"]
            if not images:
                raise LoupeError(f"{where}: no image {meta_file.stem}.* beside it")
            qid = f"{category}/{meta_file.stem}"
            options = [str(o) for o in row["options"]]
            shift = zlib.crc32(qid.encode()) % len(options)  # the correct option moves to position `shift`
            options = options[-shift:] + options[:-shift] if shift else options
            items.append(Item(qid, images[0], row["question"], [LETTERS[shift]], options, category))
    if not items:
        raise LoupeError(f"{path} holds no V* Bench questions (expected direct_attributes/*.json and "
                         "relative_position/*.json beside their images, or lmms-lab/vstar-bench parquet)")
    return items


_OPTION = re.compile(r"\(([A-F])\)\s*(.+?)(?=\s*\([A-F]\)|$)", re.S)


def _vstar_row(where: str, row: dict[str, Any], root: Path) -> Item:
    require(row, ["text", "label", "image"], where, "lmms-lab/vstar-bench")
    text = str(row["text"]).split("\nAnswer with")[0]  # the release may carry the instruction; the task adds it
    found = _OPTION.findall(text)
    if len(found) < 2 or [letter for letter, _ in found] != list(LETTERS[:len(found)]):
        raise LoupeError(f"{where}: its text does not list options as (A) ... (B) ...: {text!r}")
    label = str(row["label"]).strip().upper()
    if label not in list(LETTERS[:len(found)]):
        raise LoupeError(f"{where}: label {row['label']!r} is none of the {len(found)} options' letters")
    return Item(str(row.get("question_id", where)), image_of(row["image"], where, root), text.split("(A)")[0].strip(),
                [label], [o.strip() for _, o in found], str(row.get("category") or "all"))


def json_list(path: Path, schema: str) -> tuple[Path, list[tuple[str, dict[str, Any]]]]:
    """The rows of a JSON list file (or of the only *.json in a folder), and the images' root."""
    file = path if path.is_file() else next(iter(sorted(path.glob("*.json"))), None)
    if file is None:
        raise LoupeError(f"no {schema} JSON file at {path}")
    rows = read_json(file, list, f"{schema} questions")
    return file.parent, [(f"row {k} of {file}", row) for k, row in enumerate(rows)]
