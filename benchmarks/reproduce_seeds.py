"""Summarise `loupe reproduce` runs on several seeds: per method the mean, standard
deviation and per-seed value of easy / hard (all, short-answer, multiple-choice) / overall
accuracy and tag-hit rate, and per target on how many seeds it holds. A run written before
results.json split the hard questions by answer format gets the split from its
runs/<label>/predictions.json where that folder has one.

    for s in 0 1 2; do loupe reproduce --seed $s --out runs/seed$s; done
    python benchmarks/reproduce_seeds.py runs/seed0 runs/seed1 runs/seed2 [--out docs/reproduce/seeds]

Prints the table and writes seeds.json and seeds.md to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loupe.evaluate import EvalResult, Prediction
from loupe.files import write_atomic, write_json
from loupe.reproduce import seed_summary, seed_table

SPLIT = ("hard_short", "hard_mc")


def with_format_split(report: dict, folder: Path) -> dict:
    """`report` with each run's hard accuracy by answer format filled in from its predictions
    (runs/<label>/predictions.json) where results.json predates the split."""
    for run in report["runs"]:
        found = folder / "runs" / run["label"] / "predictions.json"
        if all(k in run["accuracy"] for k in SPLIT) or not found.is_file():
            continue
        result = EvalResult([Prediction(**p) for p in json.loads(found.read_text())])
        summary = result.summary()
        run["accuracy"].update({k: summary[k] for k in SPLIT})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="folders written by `loupe reproduce` (each with results.json)")
    parser.add_argument("--out", default="benchmarks/results/reproduce-seeds")
    args = parser.parse_args()
    reports = []
    for folder in args.runs:
        path = Path(folder) / "results.json"
        if not path.is_file():
            parser.error(f"{path} does not exist: run `loupe reproduce --out {folder}` first")
        reports.append(with_format_split(json.loads(path.read_text()), Path(folder)))
    summary = seed_summary(reports)
    text = seed_table(summary)
    print(text)
    out = Path(args.out)
    write_json(out / "seeds.json", summary)
    write_atomic(out / "seeds.md", text + "\n")
    print(f"\nwritten to {out}/seeds.json and seeds.md")


if __name__ == "__main__":
    main()
