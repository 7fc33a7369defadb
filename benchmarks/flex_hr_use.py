"""Does a FlexAttention model use its high-resolution path? Test-split accuracy with oracle
selection (the named tag's blocks, at `--ratio` of the HR tokens) with the HR keys on (gate 1)
and off (gate 0), and the share of hard answers the HR keys change.

    python benchmarks/flex_hr_use.py --base BASE --test RUN/data/test.json --ratio 0.11 \\
        [--model RUN/runs/flexattn/final] [--out benchmarks/results/flex-hr-use/NAME]

Without --model: the base converted as `loupe reproduce` converts it, before any fine-tuning.
`--ratio`: the selected fraction the run's own selection took (its metrics.json). Prints the
figures and writes flex_hr_use.json to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from loupe.checkpoints import from_pretrained
from loupe.data.batches import Sample, tokenize
from loupe.data.llava import read_llava
from loupe.evaluate import evaluate, tag_boxes
from loupe.files import write_json
from loupe.methods.flexattn import FlexRun
from loupe.reproduce import RUNS
from loupe.text import Tokenizer
from loupe.train import FeatureImages
from loupe.vlm import VLM


def load(model: str | None, base: Path) -> VLM:
    if model is not None:
        return from_pretrained(Path(model), dtype=torch.float32)
    options = dict(next(r for r in RUNS if r.label == "flexattn").options)
    return from_pretrained(base, "flexattn", dtype=torch.float32, **options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base the run started from (its tokenizer)")
    parser.add_argument("--test", required=True, help="the run's data/test.json")
    parser.add_argument("--ratio", type=float, required=True, help="the fraction of HR tokens selected")
    parser.add_argument("--model", default=None, help="a fine-tuned flexattn folder (default: the converted base)")
    parser.add_argument("--out", default="benchmarks/results/flex-hr-use")
    args = parser.parse_args()
    if not 0 < args.ratio <= 1:
        parser.error(f"--ratio {args.ratio} must be in (0, 1]")
    model = load(args.model, Path(args.base)).eval()
    tok = Tokenizer.from_folder(Path(args.base), image_token_id=4)
    samples, paths = tokenize(read_llava(Path(args.test)), tok, model)
    images = FeatureImages(model, paths, {}, tag="test", progress=False)

    def oracle(batch: list[Sample]) -> FlexRun:
        return FlexRun(boxes=tag_boxes(batch), ratio=args.ratio)

    outputs, report = {}, {"model": args.model or f"{args.base} (converted)", "ratio": args.ratio}
    for gate in (1.0, 0.0):
        model.method.gate.fill_(gate)  # the HR rows' mix (1 - a) out_noHR + a out_HR: 0 leaves out every HR key
        result = evaluate(model, samples, images, tok, progress=True, run=oracle)
        outputs[gate] = result.predictions
        report[f"gate{gate:.0f}"] = {k: result.summary()[k] for k in ("easy", "hard", "overall")}
    hard = [(on, off) for on, off in zip(outputs[1.0], outputs[0.0], strict=True) if on.meta.get("kind") == "hard"]
    if not hard:
        raise SystemExit(f"{args.test} holds no hard questions: give a run's data/test.json")
    report["hard_changed"] = 100 * sum(on.output != off.output for on, off in hard) / len(hard)
    print(f"oracle selection, hard questions: HR keys on {report['gate1']['hard']:.1f}%, off "
          f"{report['gate0']['hard']:.1f}%; the HR keys change {report['hard_changed']:.1f}% of the hard answers")
    write_json(Path(args.out) / "flex_hr_use.json", report)
    print(f"written to {args.out}/flex_hr_use.json")


if __name__ == "__main__":
    main()
