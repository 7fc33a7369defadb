"""Why does FlexAttention on the 4-layer synth-tiny model not answer multiple-choice
questions from what it reads at high resolution - too few HR layers, or too few HR rows?

    python benchmarks/flex_depth.py [--seed 0] [--first-layers 1] [--hr-rows answer] [--steps 150]
                                    [--reference runs/seed0]

Fine-tunes `flexattn` from the shipped base exactly as `loupe reproduce` does (same data,
recipe and seed) but with its hierarchical layers starting at each of `--first-layers`
(the run's own setting is 2: HR in layers 2-3 of 4) and with HR seen by the rows
`--hr-rows` names ("answer": the official answer rows; "text": also every prompt row after
the image, so each option of a multiple-choice question can be checked against the detail
in its own row), for `--steps` fine-tuning steps (the run's: 150), and assesses each with its own attention-map selection and with the
oracle's (the named tag's blocks at the same budget).
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

from loupe.evaluate import EvalResult, Prediction
from loupe.files import write_atomic, write_json
from loupe.reproduce import FLEX, NATIVE, Run, reproduce

FORMATS = ("short", "mc")
REFERENCE_ROWS = ("hd", "flexattn", "flexattn-oracle", "flexattn-random", "flexattn-center")


def by_format(predictions: Path) -> dict[str, Any]:
    """% correct on the hard questions of each answer format, and how many there are."""
    result = EvalResult([Prediction(**p) for p in json.loads(predictions.read_text())])
    out: dict[str, Any] = {}
    for fmt in FORMATS:
        out[fmt] = result.accuracy(kind="hard", format=fmt) or 0.0
        out[f"{fmt}_questions"] = result.count(kind="hard", format=fmt)
    return out


def probe(first_layer: int, hr_rows: str, steps: int | None, seed: int, root: Path) -> dict[str, dict[str, Any]]:
    """The run's flexattn at `first_layer` with `hr_rows` after `steps` (None: the run's), and its
    oracle: label -> the hard split by format."""
    label = (f"flexattn-first{first_layer}" + ("" if hr_rows == "answer" else f"-{hr_rows}-rows")
             + ("" if steps is None else f"-{steps}steps"))
    options = {"hr_size": 3 * NATIVE, **FLEX, "first_layer": first_layer, "hr_rows": hr_rows}
    run = Run(label, "flexattn", options, oracle=True)
    out = root / label
    reproduce(out, seed=seed, runs=(run,), with_visor=False, with_reductions=False, finetune_steps=steps)
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
    parser.add_argument("--hr-rows", default="answer", choices=("answer", "text"), help="which rows see HR")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the run's)")
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
            rows.update(probe(first, args.hr_rows, args.steps, args.seed, Path(tmp)))
    text = table(rows)
    print(text)
    out = Path(args.out)
    stem = ("flex_depth" + ("" if args.hr_rows == "answer" else f"_{args.hr_rows}_rows")
            + ("" if args.steps is None else f"_{args.steps}steps"))
    stem += "" if stem == "flex_depth" else f"_seed{args.seed}"
    write_json(out / f"{stem}.json", {"seed": args.seed, "first_layers": args.first_layers, "hr_rows": args.hr_rows,
                                      "steps": args.steps, "rows": rows})
    head = (f"seed {args.seed}; accuracy % (questions); the `loupe reproduce` rows: flexattn with its first "
            f"hierarchical layer at {FLEX['first_layer']}, HR in the answer rows; flexattn-firstK: at K; "
            "-text-rows: HR in every text row after the image too; -Nsteps: fine-tuned N steps (the run: 150)")
    write_atomic(out / f"{stem}.md", f"{head}\n\n{text}\n")


if __name__ == "__main__":
    main()
