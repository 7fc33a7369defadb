"""Does a `loupe reproduce` base read? Its accuracy per question type and answer format on
unseen native-size crops (where a tag is legible at 64 px: what the base must read on one
high-resolution tile) and on unseen whole scenes (where it is not, by design).

    python benchmarks/base_reading.py [--base src/loupe/assets/synth-base] [--scenes 100] [--seed 77]

The crops and scenes are the train split of a seed the base was not trained on (the base
is made from seed 0's), one question per record. Prints the table and writes
base_reading.json and base_reading.md to --out.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from loupe.checkpoints import from_pretrained
from loupe.data.batches import tokenize
from loupe.data.llava import read_llava
from loupe.data.synthetic import SynthConfig, write_dataset
from loupe.evaluate import evaluate
from loupe.files import write_atomic, write_json
from loupe.reproduce import NATIVE, SCENES, SHIPPED_BASE, verified_base
from loupe.text import Tokenizer
from loupe.tiny import position_readout_error
from loupe.train import PixelImages
from loupe.visor_train import single_turns


def accuracy_by_type(base: Path, scenes: int, seed: int,
                     cfg: SynthConfig = SCENES) -> dict[str, dict[str, float | int]]:
    """{"crop pattern short": {"accuracy": %, "n": questions}, ...} on `scenes` fresh scenes
    (drawn with `cfg`: the benchmark's by default)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, scenes, seed, cfg, progress=False, splits=("train",))
        turns = single_turns([ex for ex in read_llava(Path(tmp) / "train.json") if not ex.meta.get("caption")])
        tok = Tokenizer.from_folder(base, image_token_id=4)
        model = from_pretrained(base, "lowres", dtype=torch.float32)
        samples, paths = tokenize(turns, tok, model)
        result = evaluate(model, samples, PixelImages(paths, NATIVE, progress=False), tok)
    groups: dict[str, list[bool]] = defaultdict(list)
    for p in result.predictions:
        where = "crop" if p.meta.get("crop") else "scene"
        groups[f"{where} {p.meta['type']} {p.meta['format']}"].append(p.correct)
    return {k: {"accuracy": 100 * sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


def position_error(base: Path, scenes: int, seed: int) -> float:
    """`loupe.tiny.position_readout_error` of the base's projected features on fresh scenes."""
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(tmp, scenes, seed, SCENES, progress=False, splits=("val",))
        pixels = PixelImages(sorted(Path(tmp).glob("images/*.png")), NATIVE, progress=False).pixels.float()
        model = from_pretrained(base, "lowres", dtype=torch.float32)
        with torch.no_grad():
            return position_readout_error(model.image_features(pixels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(SHIPPED_BASE), help="a folder made by `loupe reproduce --stage base`")
    parser.add_argument("--scenes", type=int, default=100, help="fresh scenes (each with its two crops)")
    parser.add_argument("--seed", type=int, default=77, help="their seed (not the base's)")
    parser.add_argument("--out", default="benchmarks/results/base-reading")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = accuracy_by_type(verified_base(Path(args.base)), args.scenes, args.seed)
    position = position_error(Path(args.base), 40, args.seed)
    text = "\n".join(["| image, question type, format | accuracy % | questions |", "|---|---|---|",
                      *(f"| {k} | {v['accuracy']:.1f} | {v['n']} |" for k, v in rows.items())])
    text += (f"\n\nposition read-out error of the image features: {position:.2f} patches "
             "(2.00: none, the mean's; `loupe.tiny.position_readout_error`, 40 scenes)")
    print(text)
    out = Path(args.out)
    write_json(out / "base_reading.json", {"base": args.base, "scenes": args.scenes, "seed": args.seed,
                                           "accuracy": rows, "position_readout_error": position})
    write_atomic(out / "base_reading.md", text + "\n")
    print(f"\nwritten to {out}/base_reading.json and base_reading.md")


if __name__ == "__main__":
    main()
