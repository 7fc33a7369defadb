"""Where the accuracy of `loupe reproduce` runs goes: per method and question type, and,
for FlexAttention's selections, on the short-answer hard questions whose named tag the
answer row's selection reached at every hierarchical layer against those it missed.

    python benchmarks/reproduce_gaps.py runs/seed0 runs/seed1 runs/seed2 [--out docs/reproduce/seeds]

Reads each run's runs/<label>/predictions.json (a folder without one is skipped), prints
two tables (mean over the seeds, and each seed's value) and writes gaps.json and gaps.md.
The question types come from the built-in benchmark's metadata: easy = answerable from the
low-resolution image (colour, shape, count, and `where`: the named object's cell of a 3 x 3
grid), hard = the pattern of the named object's small tag.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loupe.evaluate import EvalResult, Prediction
from loupe.files import write_atomic, write_json

METHODS = ("lowres", "hd", "xattn", "flexattn", "flexattn-oracle", "flexattn-random", "flexattn-center",
           "visor-2", "visor-router")
SELECTIONS = ("flexattn", "flexattn-random", "flexattn-center")
GROUP = ("kind", "type", "format")  # the metadata a question group is named by


def load(folder: Path, label: str) -> EvalResult | None:
    path = folder / "runs" / label / "predictions.json"
    return EvalResult([Prediction(**p) for p in json.loads(path.read_text())]) if path.is_file() else None


def by_type(result: EvalResult) -> dict[str, dict[str, Any]]:
    """Question group ("kind type format") -> accuracy and count."""
    groups = sorted({tuple(p.meta[k] for k in GROUP) for p in result.predictions})
    return {" ".join(g): {"accuracy": result.accuracy(**dict(zip(GROUP, g, strict=True))),
                          "n": result.count(**dict(zip(GROUP, g, strict=True)))} for g in groups}


def by_hit(result: EvalResult) -> dict[str, Any]:
    """Hard short-answer questions split by whether every layer's selection held the tag."""
    hard = [p for p in result.predictions if p.meta["kind"] == "hard" and p.meta["format"] == "short" and p.tag_hit]
    hit = EvalResult([p for p in hard if all(p.tag_hit.values())])
    miss = EvalResult([p for p in hard if not all(p.tag_hit.values())])
    return {"hit": {"accuracy": hit.accuracy(), "n": len(hit.predictions)},
            "miss": {"accuracy": miss.accuracy(), "n": len(miss.predictions)},
            "hit_share": 100 * len(hit.predictions) / len(hard) if hard else None}


def collect(folders: list[Path], fn: Callable[[EvalResult], dict], labels: tuple[str, ...]) -> dict[str, list[dict]]:
    """label -> one `fn` result per seed (runs without predictions skipped)."""
    out: dict[str, list[dict]] = {}
    for label in labels:
        per_seed = [fn(result) for result in (load(f, label) for f in folders) if result is not None]
        if per_seed:
            out[label] = per_seed
    return out


def cell(values: list[float | None]) -> str:
    real = [v for v in values if v is not None]
    if not real:
        return "-"
    spread = f" ({', '.join(f'{v:.0f}' for v in real)})" if len(real) > 1 else ""
    return f"{statistics.fmean(real):.1f}{spread}"


def type_table(types: dict[str, list[dict]]) -> str:
    groups = sorted({g for seeds in types.values() for s in seeds for g in s})
    counts = {g: next(s[g]["n"] for seeds in types.values() for s in seeds if g in s) for g in groups}
    lines = ["| method | " + " | ".join(f"{g} ({counts[g]})" for g in groups) + " |",
             "|---|" + "---|" * len(groups)]
    for label, seeds in types.items():
        lines.append(f"| {label} | " + " | ".join(cell([s.get(g, {}).get("accuracy") for s in seeds])
                                                  for g in groups) + " |")
    return "\n".join(lines)


def hit_table(hits: dict[str, list[dict]]) -> str:
    lines = ["| selection | tag held at every HR layer, % of questions | accuracy when held | accuracy when missed |",
             "|---|---|---|---|"]
    for label, seeds in hits.items():
        lines.append(f"| {label} | {cell([s['hit_share'] for s in seeds])} | "
                     f"{cell([s['hit']['accuracy'] for s in seeds])} | {cell([s['miss']['accuracy'] for s in seeds])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="folders written by `loupe reproduce`")
    parser.add_argument("--out", default="benchmarks/results/reproduce-gaps")
    args = parser.parse_args()
    folders = [Path(f) for f in args.runs]
    for f in folders:
        if not (f / "runs").is_dir():
            parser.error(f"{f / 'runs'} does not exist: pass folders written by `loupe reproduce`")
    types, hits = collect(folders, by_type, METHODS), collect(folders, by_hit, SELECTIONS)
    head = (f"{len(folders)} runs ({', '.join(f.name for f in folders)}); accuracy % on the test split, mean over "
            "the runs (each run's value); (n): questions in the first run")
    text = (f"{head}\n\nBy question type (kind, type, answer format):\n\n{type_table(types)}\n\n"
            f"Hard short-answer questions by whether the answer row's selection held the named tag at every "
            f"hierarchical layer (the oracle's always does):\n\n{hit_table(hits)}\n")
    print(text)
    out = Path(args.out)
    write_json(out / "gaps.json", {"runs": [f.name for f in folders], "by_type": types, "by_hit": hits})
    write_atomic(out / "gaps.md", text)
    print(f"written to {out}/gaps.json and gaps.md")


if __name__ == "__main__":
    main()
