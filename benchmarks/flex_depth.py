"""Does FlexAttention on the 4-layer synth-tiny model have the depth to answer a
multiple-choice question from what it reads at high resolution?

    python benchmarks/flex_depth.py [--seed 0] [--first-layers 1] [--reference runs/seed0]

Fine-tunes `flexattn` from the shipped base exactly as `loupe reproduce` does (same data,
recipe and seed) but with its hierarchical layers starting at each of `--first-layers`
(the run's own setting is 2: HR in layers 2-3 of 4), and assesses each with its own
attention-map selection and with the oracle's (the named tag's blocks at the same budget).
Prints the hard questions' accuracy split by answer format (short answer / multiple
choice) beside the same split of a full `loupe reproduce` run given as `--reference` (its
predictions.json files), and writes flex_depth.json and flex_depth.md to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from loupe.files import write_atomic, write_json
from loupe.reproduce import FLEX, NATIVE, Run, reproduce

FORMATS = ("short", "mc")
REFERENCE_ROWS = ("hd", "flexattn", "flexattn-oracle", "flexattn-random", "flexattn-center")


def by_format(predictions: Path) -> dict[str, Any]:
    """% correct on the hard questions of each answer format, and how many there are."""
    rows = [p for p in json.loads(predictions.read_text()) if p["meta"].get("kind") == "hard"]
    out: dict[str, Any] = {}
    for fmt in FORMATS:
        picked = [p for p in rows if p["meta"].get("format") == fmt]
        out[fmt] = 100 * sum(p["correct"] for p in picked) / max(1, len(picked))
        out[f"{fmt}_questions"] = len(picked)
    return out


def probe(first_layer: int, seed: int, root: Path) -> dict[str, dict[str, Any]]:
    """The run's flexattn at `first_layer`, and its oracle: label -> the hard split by format."""
    label = f"flexattn-first{first_layer}"
    run = Run(label, "flexattn", {"hr_size": 3 * NATIVE, **FLEX, "first_layer": first_layer}, oracle=True)
    out = root / label
    reproduce(out, seed=seed, runs=(run,), with_visor=False, with_reductions=False)
    return {name: by_format(out / "runs" / name / "predictions.json") for name in (label, f"{label}-oracle")}


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | hard, short answer | hard, multiple choice |", "|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['short']:.1f} ({r['short_questions']}) | {r['mc']:.1f} ({r['mc_questions']}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-layers", type=int, nargs="+", default=[1], help="flexattn's first hierarchical layer")
    parser.add_argument("--reference", help="a `loupe reproduce` output folder of the same seed (its rows, split)")
    parser.add_argument("--out", default="benchmarks/results/flex-depth")
    args = parser.parse_args()
    rows: dict[str, dict[str, Any]] = {}
    if args.reference:
        for name in REFERENCE_ROWS:
            found = Path(args.reference) / "runs" / name / "predictions.json"
            if found.is_file():
                rows[f"{name} (loupe reproduce)"] = by_format(found)
    with tempfile.TemporaryDirectory() as tmp:
        for first in args.first_layers:
            rows.update(probe(first, args.seed, Path(tmp)))
    text = table(rows)
    print(text)
    out = Path(args.out)
    write_json(out / "flex_depth.json", {"seed": args.seed, "first_layers": args.first_layers, "rows": rows})
    head = (f"seed {args.seed}; accuracy % (questions); the `loupe reproduce` rows: flexattn with its first "
            f"hierarchical layer at {FLEX['first_layer']}; flexattn-firstK: at K")
    write_atomic(out / "flex_depth.md", f"{head}\n\n{text}\n")


if __name__ == "__main__":
    main()
