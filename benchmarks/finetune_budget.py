"""Is 150 fine-tuning steps what holds the high-resolution methods back? `loupe reproduce`'s
lowres, hd, flexattn (with its oracle row) and flexattn-random, fine-tuned from the same
base for each of several step counts (`--finetune-steps`; VISOR and the token-reduction
peers left out to keep it short), on one seed's benchmark.

    python benchmarks/finetune_budget.py --steps 150 600 [--seed 0] [--base DIR] [--out ...]

Each count's full `loupe reproduce` output goes to --out/steps{N}/; prints the table and
writes finetune_budget.json and finetune_budget.md to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loupe.files import write_atomic, write_json
from loupe.reproduce import RUNS, SHIPPED_BASE, reproduce

LABELS = ("lowres", "hd", "flexattn", "flexattn-random")
COLUMNS = ("easy", "hard", "overall", "tag_hit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", required=True, help="fine-tuning step counts to compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default=str(SHIPPED_BASE), help="a folder made by `loupe reproduce --stage base`")
    parser.add_argument("--out", default="benchmarks/results/finetune-budget")
    args = parser.parse_args()
    out = Path(args.out)
    runs = [r for r in RUNS if r.label in LABELS]
    rows: list[dict] = []
    for steps in args.steps:
        report = reproduce(out / f"steps{steps}", seed=args.seed, overwrite=True, runs=runs, with_visor=False,
                           with_reductions=False, base=args.base, finetune_steps=steps)
        for run in report["runs"]:
            acc = run["accuracy"]
            rows.append({"steps": steps, "label": run["label"], "final_loss": run["final_loss"],
                         "train_seconds": run["train_seconds"], **{k: acc.get(k) for k in COLUMNS}})
    lines = ["| fine-tuning steps | method | " + " | ".join(COLUMNS) + " | final train loss |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for r in rows:
        cells = ["-" if r[k] is None else f"{r[k]:.1f}" for k in COLUMNS]
        lines.append(f"| {r['steps']} | {r['label']} | " + " | ".join(cells) + f" | {r['final_loss']:.3f} |")
    text = "\n".join(lines)
    print(text)
    write_json(out / "finetune_budget.json", {"seed": args.seed, "base": args.base, "rows": rows})
    write_atomic(out / "finetune_budget.md", text + "\n")
    print(f"\nwritten to {out}/finetune_budget.json and finetune_budget.md")


if __name__ == "__main__":
    main()
